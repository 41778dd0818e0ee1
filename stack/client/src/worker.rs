//! An attached app worker: its connection to shuntd, its event queue, its peers and sessions.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::event::epoll;
use rustix::net::{self, AddressFamily, SocketFlags, SocketType};
use shunt_sapi::event::{Event, FifoPair};
use shunt_sapi::message::{
    CertificateMaterial, DaemonReply, MAX_BATCH, MAX_MESSAGE_LEN, MAX_RESUMED_PER_MESSAGE,
    PairOffer, PairRole, Request, Resume, ResumedSession, Scope,
};
use shunt_sapi::{ErrorCode, UsageReport, layout};
use shunt_shm::doorbell::Doorbell;
use shunt_shm::fdpass;
use shunt_shm::fifo::{Consumer, Producer};
use shunt_shm::ring::RingConsumer;
use shunt_shm::segment::Segment;
use shunt_shm::wake::polling::{Polled, PolledReceiver};
use shunt_shm::wake::{Drained, WakeReceiver};

use crate::Error;
use crate::peer::{PeerSegment, SegmentKey};
use crate::session::{Session, SessionState};

/// How long blocking calls wait for shuntd before giving up.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(10);

/// The worker's own eventfd, which only its threads ring (never shared with another process:
/// any holder of an eventfd can make its writers block).
const TOKEN_DOORBELL: u64 = 0;
/// The socket to shuntd.
const TOKEN_SOCKET: u64 = 1;
/// The wake-up pipe shuntd rings when it posted events.
const TOKEN_DAEMON_WAKE: u64 = 2;
const ZERO_TIMEOUT: rustix::event::Timespec = rustix::event::Timespec {
    tv_sec: 0,
    tv_nsec: 0,
};
/// Peers' wake-up pipes (wake-ups and liveness) use tokens from here: TOKEN_PEER + (epoch <<
/// 32 | segment id).
const TOKEN_PEER: u64 = 1 << 63;
/// Records taken from one peer's ring per dispatch. Well-behaved peers never have more
/// outstanding (see `layout::CT_MAX_SLOTS`); a peer that keeps writing gets its turn at the
/// next dispatch, after everyone else's.
const PEER_RECORDS_PER_DISPATCH: usize = layout::CT_RING_RECORDS as usize;
/// Re-attach attempts while shuntd is away start this often and slow down to once a second.
const REATTACH_FIRST_RETRY: Duration = Duration::from_millis(20);
const REATTACH_MAX_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct AttachOptions {
    pub socket: PathBuf,
    pub namespace: String,
    pub secret: Vec<u8>,
    pub app_name: String,
    pub scope: Scope,
    /// Events in the worker's queue; 0 takes shuntd's default.
    pub event_queue_len: u32,
    /// How long a blocking call polls for events before it sleeps on the doorbell (see
    /// [`AttachOptions::busy_poll`]). Zero, the default, sleeps at once.
    pub busy_poll: Duration,
    /// Sessions per remote kept established in standby (see [`AttachOptions::preconnect`]).
    /// Zero, the default, keeps none.
    pub preconnect: u16,
}

impl AttachOptions {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            namespace: "default".into(),
            secret: Vec::new(),
            app_name: std::env::args().next().unwrap_or_else(|| "app".into()),
            scope: Scope::Local,
            event_queue_len: 0,
            busy_poll: Duration::ZERO,
            preconnect: 0,
        }
    }

    pub fn namespace(mut self, id: &str, secret: &[u8]) -> Self {
        self.namespace = id.to_owned();
        self.secret = secret.to_vec();
        self
    }

    pub fn app_name(mut self, name: &str) -> Self {
        self.app_name = name.to_owned();
        self
    }

    pub fn scope(mut self, scope: Scope) -> Self {
        self.scope = scope;
        self
    }

    /// Makes blocking calls poll for up to `budget` before sleeping, like the kernel's
    /// `SO_BUSY_POLL` or VPP's adaptive rx-mode. A wake-up from sleep costs what the scheduler
    /// charges to wake an idle core, tens of microseconds on a virtual machine; a peer that
    /// answers within the budget is seen in about one microsecond instead. The price is up to
    /// `budget` of CPU per wait that ends in sleep anyway.
    pub fn busy_poll(mut self, budget: Duration) -> Self {
        self.busy_poll = budget;
        self
    }

    /// After a connect to a remote, keeps up to `depth` more sessions to it established in
    /// standby, as Envoy's preconnect policy keeps connections ready. The listener's worker
    /// holds each one back from accept until this worker opens it, with a record in their
    /// shared ring: so a connect that finds one ready costs no round trip to shuntd, and the
    /// listening app never sees a connection nobody made. shuntd decided each under the policy
    /// of its time, and has every worker drop them when policy changes.
    ///
    /// Each standby session holds a FIFO pair in shared memory until it is used or dropped.
    pub fn preconnect(mut self, depth: u16) -> Self {
        self.preconnect = depth;
        self
    }
}

/// A session shuntd announced to this worker: its id, FIFO pair, and the peer's address.
type Announced = (u64, FifoPair, SocketAddr);

/// What draining a peer's ring did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Drain {
    /// Records taken.
    taken: usize,
    /// The per-dispatch budget ran out before the ring was empty.
    unfinished: bool,
}

impl Drain {
    fn done(taken: usize) -> Drain {
        Drain {
            taken,
            unfinished: false,
        }
    }
}

pub(crate) struct ListenerState {
    pub(crate) endpoint: SocketAddr,
    pub(crate) backlog: VecDeque<Announced>,
    /// Sessions connected in standby, by (segment id, slot): accepted once the peer opens them.
    standby: HashMap<(u32, u32), Announced>,
    pub(crate) waker: Option<std::task::Waker>,
}

pub(crate) enum ConnectState {
    Waiting(Option<std::task::Waker>),
    Done(Result<Announced, Error>),
    /// Served from the standby pool: the session is open at this index.
    Opened(usize),
}

pub(crate) struct Daemon {
    pub(crate) socket: OwnedFd,
    pub(crate) queue: RingConsumer,
    /// Readable when shuntd posted events this worker may be asleep on.
    wake: PolledReceiver,
    _queue_segment: Arc<Segment>,
    pub(crate) epoch: u32,
    worker_id: u32,
}

pub(crate) struct State {
    options: AttachOptions,
    pub(crate) daemon: Option<Daemon>,
    epoch: u32,
    next_request: u32,
    pub(crate) peers: HashMap<SegmentKey, PeerSegment>,
    pub(crate) sessions: Vec<Option<SessionState>>,
    pub(crate) listeners: HashMap<u64, ListenerState>,
    connects: HashMap<u32, ConnectState>,
    /// Standby connects in flight, by request id, with the remote each is for.
    standby_requests: HashMap<u32, SocketAddr>,
    /// Remotes whose standby pools are to be refilled at the next dispatch or sleep.
    refills_due: Vec<SocketAddr>,
    /// Standby sessions by remote (see [`AttachOptions::preconnect`]), as shuntd announced
    /// them; the peer has not been told about them yet. They are mapped only when taken: a
    /// dispatch in between drains events the peer sent to an earlier session in the same slot,
    /// which would otherwise land on this one.
    standby: HashMap<SocketAddr, VecDeque<Announced>>,
    /// Requests that want no answer soon (standby refills), sent in one datagram with the next
    /// request or at the next flush (see [`Worker::flush`]).
    outbox: Vec<(u32, Request)>,
    replies: HashMap<u32, DaemonReply>,
    local_address: SocketAddr,
    /// When to try attaching again while shuntd is away, and the wait after that.
    next_reattach: Instant,
    reattach_retry: Duration,
}

impl State {
    /// The epoch that names segments granted now: the attached shuntd's, or the last one's
    /// while none is attached.
    fn segment_epoch(&self) -> u32 {
        self.daemon.as_ref().map_or(self.epoch, |d| d.epoch)
    }

    /// Whether `epoch` is the attached shuntd's.
    fn is_current_epoch(&self, epoch: u32) -> bool {
        self.daemon.as_ref().is_some_and(|d| d.epoch == epoch)
    }

    /// Has the pool of standby sessions to `remote` topped up at the next dispatch or sleep:
    /// then the request to shuntd costs the connect nothing, and overlaps with the peer's work.
    fn plan_refill(&mut self, remote: SocketAddr) {
        if !self.refills_due.contains(&remote) {
            self.refills_due.push(remote);
        }
    }
}

pub(crate) struct Inner {
    pub(crate) state: Mutex<State>,
    epoll: OwnedFd,
    doorbell: Doorbell,
    pub(crate) busy_poll: Duration,
    preconnect: u16,
    /// Threads blocked on this worker (see [`Worker::sleep`]).
    sleeper: Mutex<Sleeper>,
    dispatched: Condvar,
    /// Blocked calls that found they could go on only after their sleep's safety timeout ran
    /// out, with no wake-up announcing it: each one a lost wake-up (see [`WorkerStats`]).
    pub(crate) fallback_wakeups: AtomicU64,
    /// See [`WorkerStats::peer_records`].
    peer_records: AtomicU64,
}

/// How a sleep on a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Woke {
    /// Something was dispatched (by this thread, or by the thread that slept for it).
    Dispatched,
    /// The timeout ran out first.
    TimedOut,
}

/// What a worker counted about itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Blocked reads and writes that could go on only after their one-second safety re-check,
    /// with no wake-up announcing it. Zero unless a wake-up was lost: the re-check keeps an app
    /// going, and this count keeps the loss from going unseen.
    pub fallback_wakeups: u64,
    /// Records taken from peers' rings: notifications of data, space, opens and closes, each
    /// announced by at most one wake-up.
    pub peer_records: u64,
}

/// Who sleeps in `epoll_wait` for a worker, and who waits for that sleeper's dispatch.
#[derive(Default)]
struct Sleeper {
    leading: bool,
    followers: usize,
    /// Counts dispatches, so a follower knows when one happened.
    generation: u64,
}

/// An attached app worker. Cheap to clone; clones share the worker.
#[derive(Clone)]
pub struct Worker {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("epoll", &self.inner.epoll.as_raw_fd())
            .finish_non_exhaustive()
    }
}

fn connect_socket(path: &std::path::Path) -> Result<OwnedFd, Error> {
    let fd = net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| Error::DaemonUnavailable(e.into()))?;
    let addr = net::SocketAddrUnix::new(path).map_err(|e| Error::DaemonUnavailable(e.into()))?;
    net::connect(&fd, &addr).map_err(|e| Error::DaemonUnavailable(e.into()))?;
    Ok(fd)
}

fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> std::io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(fd)?;
    let flags = if on {
        flags | rustix::fs::OFlags::NONBLOCK
    } else {
        flags - rustix::fs::OFlags::NONBLOCK
    };
    rustix::fs::fcntl_setfl(fd, flags)?;
    Ok(())
}

/// Sends one request and waits for its reply on a still-blocking socket (attach only).
fn request_blocking(
    fd: BorrowedFd<'_>,
    req: &Request,
    fds: &[BorrowedFd<'_>],
) -> Result<(DaemonReply, Vec<OwnedFd>), Error> {
    fdpass::send_with_fds(fd, &req.encode(1), fds).map_err(|_| Error::DaemonGone)?;
    let mut buf = vec![0u8; MAX_MESSAGE_LEN];
    let deadline = Instant::now() + DAEMON_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !shunt_shm::doorbell::wait_readable(fd, Some(left))? {
            return Err(Error::Timeout);
        }
        let (n, fds) = fdpass::recv_with_fds(fd, &mut buf, 3)?;
        if n == 0 {
            return Err(Error::DaemonGone);
        }
        let (id, reply) =
            DaemonReply::decode(&buf[..n]).map_err(|e| Error::Protocol(e.to_string()))?;
        if id == 1 {
            return Ok((reply, fds));
        }
    }
}

impl Worker {
    /// Attaches to shuntd as a new app with one worker.
    pub fn attach(options: AttachOptions) -> Result<Worker, Error> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(std::io::Error::from)?;
        let doorbell = Doorbell::new()?;
        epoll::add(
            &epoll,
            doorbell.as_fd(),
            epoll::EventData::new_u64(TOKEN_DOORBELL),
            // Edge-triggered: every ring is an edge, so the counter never needs the read system
            // call that draining it would cost each wake-up. It cannot overflow in practice
            // (2^64 rings), and no other process holds it.
            epoll::EventFlags::IN | epoll::EventFlags::ET,
        )
        .map_err(std::io::Error::from)?;
        let (busy_poll, preconnect) = (options.busy_poll, options.preconnect);
        let state = State {
            options,
            daemon: None,
            epoch: 0,
            next_request: 1,
            peers: HashMap::new(),
            sessions: Vec::new(),
            listeners: HashMap::new(),
            connects: HashMap::new(),
            standby_requests: HashMap::new(),
            refills_due: Vec::new(),
            standby: HashMap::new(),
            outbox: Vec::new(),
            replies: HashMap::new(),
            local_address: "0.0.0.0:0".parse().expect("literal"),
            next_reattach: Instant::now(),
            reattach_retry: REATTACH_FIRST_RETRY,
        };
        let inner = Arc::new(Inner {
            state: Mutex::new(state),
            epoll,
            doorbell,
            busy_poll,
            preconnect,
            sleeper: Mutex::new(Sleeper::default()),
            dispatched: Condvar::new(),
            fallback_wakeups: AtomicU64::new(0),
            peer_records: AtomicU64::new(0),
        });
        let worker = Worker { inner };
        worker.reattach()?;
        Ok(worker)
    }

    /// What this worker counted about itself.
    pub fn stats(&self) -> WorkerStats {
        WorkerStats {
            fallback_wakeups: self.inner.fallback_wakeups.load(Ordering::Relaxed),
            peer_records: self.inner.peer_records.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether shuntd is currently reachable. Established sessions flow either way.
    pub fn is_attached(&self) -> bool {
        self.lock().daemon.is_some()
    }

    /// Attaches again after shuntd restarted, keeping every session and re-opening listeners.
    pub fn reattach(&self) -> Result<(), Error> {
        let mut st = self.lock();
        if st.daemon.is_some() {
            return Ok(());
        }
        let socket = connect_socket(&st.options.socket)?;
        // Listeners are re-opened, and sessions reported, after the attach.
        let resume = Resume::default();
        let req = Request::Attach {
            namespace_id: st.options.namespace.clone(),
            namespace_secret: st.options.secret.clone(),
            app_name: st.options.app_name.clone(),
            scope: st.options.scope,
            event_queue_len: st.options.event_queue_len,
            resume,
        };
        let (reply, mut fds) = request_blocking(socket.as_fd(), &req, &[])?;
        let (worker_id, offset, ns_address) = match reply {
            DaemonReply::Attached {
                worker_id,
                event_queue_offset,
                namespace_address,
                ..
            } => (worker_id, event_queue_offset, namespace_address),
            DaemonReply::Failure { code, message } => return Err(Error::Refused { code, message }),
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected attach reply {other:?}"
                )));
            }
        };
        if fds.len() != 2 || offset as usize != layout::event_queue_offset() {
            return Err(Error::Protocol(
                "attach reply must carry the event-queue segment, at the agreed offset, and a wake-up pipe".into(),
            ));
        }
        let wake = WakeReceiver::from_fd(fds.pop().expect("two"))
            .map(PolledReceiver::new)
            .map_err(|e| Error::Protocol(format!("wake-up pipe: {e}")))?;
        let seg = Arc::new(Segment::open(fds.remove(0)).map_err(|e| Error::Shm(e.to_string()))?);
        let queue = RingConsumer::attach(seg.clone(), offset as usize)
            .map_err(|e| Error::Shm(e.to_string()))?;
        set_nonblocking(socket.as_fd(), true)?;
        for (fd, token, flags) in [
            (socket.as_fd(), TOKEN_SOCKET, epoll::EventFlags::IN),
            (wake.as_fd(), TOKEN_DAEMON_WAKE, wake.events()),
        ] {
            epoll::add(
                &self.inner.epoll,
                fd,
                epoll::EventData::new_u64(token),
                flags,
            )
            .map_err(std::io::Error::from)?;
        }
        st.epoch += 1;
        let epoch = st.epoch;
        st.local_address = ns_address;
        st.daemon = Some(Daemon {
            socket,
            queue,
            wake,
            _queue_segment: seg,
            epoch,
            worker_id,
        });
        st.reattach_retry = REATTACH_FIRST_RETRY;
        // Listeners belong to shuntd's tables, which a restart emptied: open them again.
        let listeners: Vec<(u64, SocketAddr)> = st
            .listeners
            .iter()
            .map(|(id, l)| (*id, l.endpoint))
            .collect();
        drop(st);
        for (old_id, ep) in listeners {
            match self.request(Request::Listen { endpoint: ep }) {
                Ok(DaemonReply::Listening { listener_id, .. }) => {
                    let mut st = self.lock();
                    if let Some(l) = st.listeners.remove(&old_id) {
                        st.listeners.insert(listener_id, l);
                    }
                }
                other => {
                    tracing::warn!(endpoint = %ep, result = ?other.err(), "cannot re-open listener after re-attach")
                }
            }
        }
        self.resume_sessions(epoch);
        tracing::debug!(worker_id, epoch, "attached to shuntd");
        Ok(())
    }

    /// Reports the sessions that kept flowing while shuntd was away, one segment at a time
    /// with the segment's memfd, so shuntd can check them; each learns its id at this shuntd.
    fn resume_sessions(&self, epoch: u32) {
        type Group = (OwnedFd, Vec<(usize, ResumedSession)>);
        let groups: Vec<Group> = {
            let st = self.lock();
            let mut by_segment: HashMap<SegmentKey, Vec<(usize, ResumedSession)>> = HashMap::new();
            for (index, s) in st.sessions.iter().enumerate() {
                let Some(s) = s else { continue };
                if s.daemon_epoch != epoch && s.is_usable() {
                    by_segment
                        .entry(s.segment)
                        .or_default()
                        .push((index, s.report()));
                }
            }
            by_segment
                .into_iter()
                .filter_map(|(key, sessions)| {
                    let fd = st.peers.get(&key)?.segment.try_clone_fd().ok()?;
                    Some((fd, sessions))
                })
                .collect()
        };
        for (fd, sessions) in groups {
            for chunk in sessions.chunks(MAX_RESUMED_PER_MESSAGE) {
                let reports = chunk.iter().map(|(_, r)| *r).collect();
                let outcomes = match self
                    .request_with_fds(Request::ResumeSessions(reports), &[fd.as_fd()])
                {
                    Ok(DaemonReply::Resumed(outcomes)) if outcomes.len() == chunk.len() => outcomes,
                    other => {
                        tracing::warn!(result = ?other.err(), "shuntd did not take the resumed sessions");
                        return;
                    }
                };
                let mut st = self.lock();
                for ((index, _), outcome) in chunk.iter().zip(outcomes) {
                    match (st.sessions.get_mut(*index), outcome) {
                        (Some(Some(s)), Ok(id)) => {
                            s.session_id = id;
                            s.daemon_epoch = epoch;
                        }
                        (_, Err(code)) => {
                            tracing::warn!(%code, "shuntd refused a resumed session; it flows on unlisted")
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// The fd to watch for readability; when it is readable, call [`Worker::dispatch`].
    pub fn readiness_fd(&self) -> BorrowedFd<'_> {
        self.inner.epoll.as_fd()
    }

    fn next_request(st: &mut State) -> u32 {
        let id = st.next_request;
        st.next_request = st.next_request.wrapping_add(1).max(2);
        id
    }

    /// Sends a request now, in one datagram with any queued ones.
    fn send(&self, st: &mut State, id: u32, req: Request) -> Result<(), Error> {
        if st.daemon.is_none() {
            return Err(Error::DaemonGone);
        }
        st.outbox.push((id, req));
        self.flush(st)
    }

    /// Queues a request that wants no answer soon; see [`Worker::flush`].
    fn defer(st: &mut State, id: u32, req: Request) {
        if st.daemon.is_some() {
            st.outbox.push((id, req));
        }
    }

    /// Sends the queued requests, as one datagram when they fit. A worker flushes before it
    /// sleeps or polls, when the app dispatches, and with any request sent at once; so the
    /// refills a burst of connects leaves due cost shuntd one message, not one each.
    fn flush(&self, st: &mut State) -> Result<(), Error> {
        if st.outbox.is_empty() {
            return Ok(());
        }
        let queued = std::mem::take(&mut st.outbox);
        let Some(d) = st.daemon.as_ref() else {
            return Err(Error::DaemonGone);
        };
        for chunk in queued.chunks(MAX_BATCH) {
            let msg = match chunk {
                [(id, req)] => req.encode(*id),
                _ => Request::Batch(chunk.to_vec()).encode(0),
            };
            fdpass::send_with_fds(d.socket.as_fd(), &msg, &[]).map_err(|e| {
                tracing::debug!(error = %e, "shuntd socket failed");
                Error::DaemonGone
            })?;
        }
        Ok(())
    }

    /// Sends a request and waits for its reply, dispatching events meanwhile.
    fn request(&self, req: Request) -> Result<DaemonReply, Error> {
        self.request_with_fds(req, &[])
    }

    /// Like [`Worker::request`], with fds riding along (never batched).
    fn request_with_fds(&self, req: Request, fds: &[BorrowedFd<'_>]) -> Result<DaemonReply, Error> {
        let id = {
            let mut st = self.lock();
            let id = Self::next_request(&mut st);
            if fds.is_empty() {
                self.send(&mut st, id, req)?;
            } else {
                self.flush(&mut st)?;
                let d = st.daemon.as_ref().ok_or(Error::DaemonGone)?;
                fdpass::send_with_fds(d.socket.as_fd(), &req.encode(id), fds)
                    .map_err(|_| Error::DaemonGone)?;
            }
            id
        };
        let deadline = Instant::now() + DAEMON_TIMEOUT;
        loop {
            let seen = self.generation();
            if let Some(reply) = self.lock().replies.remove(&id) {
                return match reply {
                    DaemonReply::Failure { code, message } => Err(Error::Refused { code, message }),
                    other => Ok(other),
                };
            }
            if !self.is_attached() {
                return Err(Error::DaemonGone);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout);
            }
            self.wait_since(Some(Duration::from_millis(100)), Some(seen))?;
        }
    }

    fn ensure_attached(&self) -> Result<(), Error> {
        if self.is_attached() {
            Ok(())
        } else {
            self.reattach()
        }
    }

    /// Opens a listener at `endpoint` (cut-through only: reachable by co-located apps).
    pub fn listen(&self, endpoint: SocketAddr) -> Result<Listener, Error> {
        self.ensure_attached()?;
        match self.request(Request::Listen { endpoint })? {
            DaemonReply::Listening {
                listener_id,
                endpoint,
            } => {
                self.lock().listeners.insert(
                    listener_id,
                    ListenerState {
                        endpoint,
                        backlog: VecDeque::new(),
                        standby: HashMap::new(),
                        waker: None,
                    },
                );
                Ok(Listener {
                    worker: self.clone(),
                    endpoint,
                })
            }
            other => Err(Error::Protocol(format!(
                "unexpected listen reply {other:?}"
            ))),
        }
    }

    /// The workload certificate `name` of this app's namespace, as shuntd holds it. Blocks for
    /// one shuntd round trip; compare [`CertificateMaterial::version`] to know whether it
    /// changed.
    pub fn certificate(&self, name: &str) -> Result<CertificateMaterial, Error> {
        self.ensure_attached()?;
        let name = name.to_owned();
        match self.request(Request::GetCertificate { name })? {
            DaemonReply::Certificate(c) => Ok(c),
            other => Err(Error::Protocol(format!(
                "unexpected certificate reply {other:?}"
            ))),
        }
    }

    /// Starts a connect; finish it with [`Worker::poll_connect`]. With
    /// [`AttachOptions::preconnect`], a standby session to `remote` serves it at once.
    pub fn start_connect(&self, remote: SocketAddr) -> Result<PendingConnect, Error> {
        let refill = self.inner.preconnect > 0;
        if refill && let Some(index) = self.take_standby(remote)? {
            let mut st = self.lock();
            let id = Self::next_request(&mut st);
            st.connects.insert(id, ConnectState::Opened(index));
            return Ok(PendingConnect {
                id,
                remote,
                is_client: true,
                refill,
            });
        }
        let req = Request::Connect {
            remote,
            standby: false,
        };
        let mut pending = self.start_session_request(req, remote, true)?;
        pending.refill = refill;
        Ok(pending)
    }

    fn take_standby(&self, remote: SocketAddr) -> Result<Option<usize>, Error> {
        // A revocation may wait in the queue: a policy change that shuntd finished before this
        // connect began must apply to it. So may the answers to earlier standby connects.
        self.dispatch()?;
        Ok(self.open_standby(&mut self.lock(), remote))
    }

    /// Standby sessions to `remote` ready to serve a connect (see
    /// [`AttachOptions::preconnect`]), not counting those whose peer worker is gone.
    pub fn standby_ready(&self, remote: SocketAddr) -> Result<usize, Error> {
        self.dispatch()?;
        let st = self.lock();
        let epoch = st.segment_epoch();
        let alive = |a: &&Announced| {
            st.peers
                .get(&(epoch, a.1.segment_id))
                .is_some_and(|p| !p.dead)
        };
        Ok(st
            .standby
            .get(&remote)
            .map_or(0, |pool| pool.iter().filter(alive).count()))
    }

    /// Takes a usable standby session to `remote` from the pool and tells its peer to accept
    /// it; returns its index. Sessions whose peer closed, reset or died meanwhile are reset.
    fn open_standby(&self, st: &mut State, remote: SocketAddr) -> Option<usize> {
        loop {
            let (session_id, fifos, local) = st.standby.get_mut(&remote)?.pop_front()?;
            let index = match Self::open_session_state(st, session_id, fifos, local, remote, true) {
                Ok(index) => index,
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "cannot open a standby session");
                    self.give_back(st, session_id);
                    continue;
                }
            };
            let s = st.sessions[index].as_ref().expect("just opened");
            let (segment, slot) = (s.segment, s.slot);
            let opened = s.is_usable()
                && st
                    .peers
                    .get_mut(&segment)
                    .is_some_and(|p| p.notify(Event::Opened { slot }).is_ok());
            if opened {
                return Some(index);
            }
            self.finish_session(st, index, true);
        }
    }

    /// Queues standby connects until each pool due for a refill has
    /// [`AttachOptions::preconnect`] sessions ready or coming. Errors are left for the next
    /// connect, which asks shuntd itself.
    fn queue_refills(&self, st: &mut State) {
        let depth = usize::from(self.inner.preconnect);
        for remote in std::mem::take(&mut st.refills_due) {
            let ready = st.standby.get(&remote).map_or(0, VecDeque::len);
            let coming = st
                .standby_requests
                .values()
                .filter(|r| **r == remote)
                .count();
            for _ in 0..depth.saturating_sub(ready + coming) {
                let id = Self::next_request(st);
                let req = Request::Connect {
                    remote,
                    standby: true,
                };
                Self::defer(st, id, req);
                st.standby_requests.insert(id, remote);
            }
        }
    }

    /// Sends a request that shuntd answers with a `Connected` or `ConnectFailed` event.
    fn start_session_request(
        &self,
        req: Request,
        remote: SocketAddr,
        is_client: bool,
    ) -> Result<PendingConnect, Error> {
        self.ensure_attached()?;
        let mut st = self.lock();
        let id = Self::next_request(&mut st);
        st.connects.insert(id, ConnectState::Waiting(None));
        if let Err(e) = self.send(&mut st, id, req) {
            st.connects.remove(&id);
            return Err(e);
        }
        Ok(PendingConnect {
            id,
            remote,
            is_client,
            refill: false,
        })
    }

    /// Offers one end of a pairing (see `PairOffer`); finish it with [`Worker::poll_connect`].
    /// The session comes when the other end offers the same token, or the offer is refused
    /// (`ErrorCode::PairTimeout` when no other end came in time).
    pub fn start_pair(&self, offer: PairOffer) -> Result<PendingConnect, Error> {
        let (remote, is_client) = (offer.remote, offer.role == PairRole::Initiator);
        self.start_session_request(Request::Pair(offer), remote, is_client)
    }

    /// Gives up on a connect or pairing; a session that still arrives for it is closed.
    pub fn abandon_connect(&self, pending: PendingConnect) {
        let mut st = self.lock();
        match st.connects.remove(&pending.id) {
            Some(ConnectState::Done(Ok((session_id, ..)))) => self.give_back(&mut st, session_id),
            Some(ConnectState::Opened(index)) => self.finish_session(&mut st, index, true),
            _ => {}
        }
    }

    /// Sends shuntd what this app's connections did, for its metrics. No reply comes; an
    /// error means shuntd is gone and the report was not delivered.
    pub fn report_usage(&self, report: UsageReport) -> Result<(), Error> {
        let mut st = self.lock();
        self.send(&mut st, 0, Request::Usage(report))
    }

    /// Tells shuntd that a session nobody will open is reset.
    fn give_back(&self, st: &mut State, session_id: u64) {
        let epoch = st.segment_epoch();
        self.report_closed(st, epoch, session_id, true);
    }

    /// Finishes a connect if shuntd has answered; `Ok(None)` means not yet.
    pub fn poll_connect(&self, pending: &PendingConnect) -> Result<Option<Session>, Error> {
        self.dispatch()?;
        self.take_connect(pending, None)
    }

    pub(crate) fn take_connect(
        &self,
        pending: &PendingConnect,
        waker: Option<&std::task::Waker>,
    ) -> Result<Option<Session>, Error> {
        let mut st = self.lock();
        match st.connects.get_mut(&pending.id) {
            Some(ConnectState::Waiting(w)) => {
                if let Some(waker) = waker {
                    *w = Some(waker.clone());
                }
                if st.daemon.is_none() {
                    st.connects.remove(&pending.id);
                    return Err(Error::DaemonGone);
                }
                Ok(None)
            }
            Some(ConnectState::Opened(_)) => {
                let Some(ConnectState::Opened(index)) = st.connects.remove(&pending.id) else {
                    unreachable!()
                };
                st.plan_refill(pending.remote);
                Ok(Some(Session::new(self.clone(), index)))
            }
            Some(ConnectState::Done(_)) => {
                let Some(ConnectState::Done(result)) = st.connects.remove(&pending.id) else {
                    unreachable!()
                };
                let (session_id, fifos, local) = result?;
                let s = self.open_session(
                    &mut st,
                    session_id,
                    fifos,
                    local,
                    pending.remote,
                    pending.is_client,
                )?;
                if pending.refill {
                    st.plan_refill(pending.remote);
                }
                Ok(Some(s))
            }
            None => Err(Error::Protocol("unknown connect".into())),
        }
    }

    /// Connects and waits until the session is established.
    pub fn connect(&self, remote: SocketAddr) -> Result<Session, Error> {
        let pending = self.start_connect(remote)?;
        // Served from standby: nothing to wait for.
        if let Some(s) = self.take_connect(&pending, None)? {
            return Ok(s);
        }
        let deadline = Instant::now() + DAEMON_TIMEOUT;
        loop {
            self.dispatch()?;
            let seen = self.generation();
            if let Some(s) = self.take_connect(&pending, None)? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                self.lock().connects.remove(&pending.id);
                return Err(Error::Timeout);
            }
            self.wait_since(Some(Duration::from_millis(100)), Some(seen))?;
        }
    }

    pub(crate) fn open_session(
        &self,
        st: &mut State,
        session_id: u64,
        fifos: FifoPair,
        local: SocketAddr,
        remote: SocketAddr,
        is_client: bool,
    ) -> Result<Session, Error> {
        let index = Self::open_session_state(st, session_id, fifos, local, remote, is_client)?;
        Ok(Session::new(self.clone(), index))
    }

    /// Maps a session's FIFOs and registers it; returns its index in `st.sessions`.
    fn open_session_state(
        st: &mut State,
        session_id: u64,
        fifos: FifoPair,
        local: SocketAddr,
        remote: SocketAddr,
        is_client: bool,
    ) -> Result<usize, Error> {
        let epoch = st.segment_epoch();
        let key = (epoch, fifos.segment_id);
        let peer = st.peers.get_mut(&key).ok_or_else(|| {
            Error::Protocol(format!("session in unknown segment {}", fifos.segment_id))
        })?;
        let shm = |e: &dyn std::fmt::Display| Error::Shm(e.to_string());
        let rx = Consumer::attach(peer.segment.clone(), fifos.rx_offset as usize)
            .map_err(|e| shm(&e))?;
        let tx = Producer::attach(peer.segment.clone(), fifos.tx_offset as usize)
            .map_err(|e| shm(&e))?;
        let index = st
            .sessions
            .iter()
            .position(Option::is_none)
            .unwrap_or_else(|| {
                st.sessions.push(None);
                st.sessions.len() - 1
            });
        peer.slots.insert(fifos.slot, index);
        st.sessions[index] = Some(SessionState::new(
            session_id, key, fifos, rx, tx, local, remote, is_client, peer.dead,
        ));
        Ok(index)
    }

    /// Waits up to `timeout` (`None`: until something happens), then dispatches it. With a
    /// [`AttachOptions::busy_poll`] budget, it polls first and sleeps only once the budget is
    /// spent.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<(), Error> {
        self.wait_since(timeout, None).map(drop)
    }

    /// The number of dispatches so far. A thread that looks for something, finds nothing and
    /// then sleeps passes the number it read before looking to [`Worker::wait_since`]: if a
    /// dispatch by another thread came in between, it may have taken what the thread looks
    /// for, and the thread must look again instead of sleeping.
    pub(crate) fn generation(&self) -> u64 {
        self.sleeper().generation
    }

    /// Like [`Worker::wait`], but returns at once when a dispatch happened since `seen` (see
    /// [`Worker::generation`]).
    pub(crate) fn wait_since(
        &self,
        timeout: Option<Duration>,
        seen: Option<u64>,
    ) -> Result<Woke, Error> {
        self.reattach_if_due();
        let timeout = self.until_reattach(timeout);
        let start = Instant::now();
        let budget = timeout.map_or(self.inner.busy_poll, |t| t.min(self.inner.busy_poll));
        if !budget.is_zero() {
            self.flush_all(&mut self.lock())?;
            loop {
                if self.dispatch_within(Some(&ZERO_TIMEOUT))? {
                    self.handled_outside_sleep()?;
                    return Ok(Woke::Dispatched);
                }
                if start.elapsed() >= budget {
                    break;
                }
                // Polling must not starve the thread it waits for when both share a core.
                std::thread::yield_now();
            }
        }
        self.sleep(timeout.map(|t| t.saturating_sub(start.elapsed())), seen)
    }

    /// While shuntd is away, calls that dispatch or wait try to attach again, at most once per
    /// retry interval (growing to a second): a restarted shuntd finds its apps back, listeners
    /// and sessions included, without the app doing anything.
    fn reattach_if_due(&self) {
        {
            let mut st = self.lock();
            let now = Instant::now();
            if st.daemon.is_some() || now < st.next_reattach {
                return;
            }
            let retry = st.reattach_retry;
            st.next_reattach = now + retry;
            st.reattach_retry = (retry * 2).min(REATTACH_MAX_RETRY);
        }
        match self.reattach() {
            Ok(()) => tracing::info!("attached to shuntd again"),
            Err(e) => tracing::debug!(error = %e, "shuntd is still away"),
        }
    }

    /// How long a wait may sleep: while shuntd is away, only until the next attempt to attach
    /// again, since nothing would wake it when shuntd comes back.
    fn until_reattach(&self, timeout: Option<Duration>) -> Option<Duration> {
        let st = self.lock();
        if st.daemon.is_some() {
            return timeout;
        }
        let until = st.next_reattach.saturating_duration_since(Instant::now());
        Some(timeout.map_or(until, |t| t.min(until)))
    }

    /// Sleeps until something happens or `timeout` passes (`None`: no limit), then dispatches
    /// it; never polls.
    ///
    /// Threads blocked on one worker take turns as leader and followers: at most one sleeps in
    /// `epoll_wait` and dispatches for all, the others sleep until its dispatch is done and then
    /// look at their own sessions again. Were several threads in `epoll_wait`, the one the
    /// kernel woke could take another's notification, and that other would sleep on.
    ///
    /// With `seen` (see [`Worker::generation`]), a dispatch since then ends the call at once:
    /// it may have taken the caller's notification after the caller looked and before it got
    /// here, and nothing would announce it again.
    pub(crate) fn sleep(
        &self,
        timeout: Option<Duration>,
        seen: Option<u64>,
    ) -> Result<Woke, Error> {
        self.flush_all(&mut self.lock())?;
        let mut sleeper = self.sleeper();
        if seen.is_some_and(|g| g != sleeper.generation) {
            return Ok(Woke::Dispatched);
        }
        if sleeper.leading {
            let generation = sleeper.generation;
            sleeper.followers += 1;
            let still = |s: &mut Sleeper| s.generation == generation;
            let (mut sleeper, woke) = match timeout {
                None => (
                    self.inner
                        .dispatched
                        .wait_while(sleeper, still)
                        .unwrap_or_else(|e| e.into_inner()),
                    Woke::Dispatched,
                ),
                Some(t) => {
                    let (sleeper, result) = self
                        .inner
                        .dispatched
                        .wait_timeout_while(sleeper, t, still)
                        .unwrap_or_else(|e| e.into_inner());
                    let woke = if result.timed_out() {
                        Woke::TimedOut
                    } else {
                        Woke::Dispatched
                    };
                    (sleeper, woke)
                }
            };
            sleeper.followers -= 1;
            return Ok(woke);
        }
        sleeper.leading = true;
        drop(sleeper);
        // Hands the lead back however the dispatch ends, a panic included, so that followers
        // never wait for a leader that is gone.
        struct Lead<'a>(&'a Worker);
        impl Drop for Lead<'_> {
            fn drop(&mut self) {
                let mut sleeper = self.0.sleeper();
                sleeper.leading = false;
                self.0.dispatched(&mut sleeper);
            }
        }
        let _lead = Lead(self);
        let timeout = timeout.map(|t| rustix::event::Timespec {
            tv_sec: t.as_secs().try_into().unwrap_or(i64::MAX),
            tv_nsec: t.subsec_nanos().into(),
        });
        let woke = if self.dispatch_within(timeout.as_ref())? {
            Woke::Dispatched
        } else {
            Woke::TimedOut
        };
        Ok(woke)
    }

    fn sleeper(&self) -> MutexGuard<'_, Sleeper> {
        self.inner.sleeper.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the followers that a dispatch happened, so they look at their sessions again.
    fn dispatched(&self, sleeper: &mut Sleeper) {
        sleeper.generation = sleeper.generation.wrapping_add(1);
        if sleeper.followers > 0 {
            self.inner.dispatched.notify_all();
        }
    }

    /// Handles everything pending: shuntd messages and events, peer events and hang-ups.
    /// Never blocks.
    pub fn dispatch(&self) -> Result<(), Error> {
        self.reattach_if_due();
        let handled = self.dispatch_within(Some(&ZERO_TIMEOUT))?;
        if handled {
            self.handled_outside_sleep()?;
        }
        self.flush_all(&mut self.lock())
    }

    /// Queues the refills due and sends everything queued. Gone shuntd is not an error here:
    /// refills are optional, and the app learns of it from its sessions and connects.
    fn flush_all(&self, st: &mut State) -> Result<(), Error> {
        if !st.refills_due.is_empty() {
            self.queue_refills(st);
        }
        match self.flush(st) {
            Err(Error::DaemonGone) => Ok(()),
            other => other,
        }
    }

    /// A dispatch outside [`Worker::sleep`] may have taken what a sleeping leader waits for:
    /// wake it (its `epoll_wait` sees our own doorbell), and tell the followers.
    fn handled_outside_sleep(&self) -> Result<(), Error> {
        let mut sleeper = self.sleeper();
        if sleeper.leading {
            self.inner.doorbell.ring()?;
        }
        self.dispatched(&mut sleeper);
        Ok(())
    }

    /// One `epoll_wait` both waits and says what is ready, so an event-driven wake-up costs a
    /// single system call here (plus draining the doorbell). Returns whether anything was
    /// ready.
    fn dispatch_within(&self, timeout: Option<&rustix::event::Timespec>) -> Result<bool, Error> {
        let mut events: Vec<epoll::Event> = Vec::with_capacity(64);
        match epoll::wait(
            &self.inner.epoll,
            rustix::buffer::spare_capacity(&mut events),
            timeout,
        ) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(std::io::Error::from(e).into()),
        }
        let mut st = self.lock();
        let mut hung_up = Vec::new();
        let mut socket_ready = false;
        let mut daemon_rang = false;
        let mut peers_rang = Vec::new();
        for ev in &events {
            match ev.data.u64() {
                TOKEN_DOORBELL => {}
                TOKEN_SOCKET => socket_ready = true,
                TOKEN_DAEMON_WAKE => daemon_rang = true,
                t if t >= TOKEN_PEER => {
                    let packed = t - TOKEN_PEER;
                    let flags = ev.flags;
                    // A hang-up is a pipe whose writer is gone (as is a read of end-of-file).
                    let closed = flags.intersects(epoll::EventFlags::HUP | epoll::EventFlags::ERR);
                    peers_rang.push(((packed >> 32) as u32, packed as u32, closed));
                }
                _ => {}
            }
        }
        // A hang-up is final whether or not the end is read.
        for &(segment, id, closed) in &peers_rang {
            if closed {
                hung_up.push((segment, id));
            }
        }
        if socket_ready {
            self.read_socket(&mut st);
        }
        // Wake-up pipes are read, when they are, before what they announce is looked at (see
        // `PolledReceiver::before_looking`).
        let polled = |rang: bool| {
            if rang {
                Polled::Reported
            } else {
                Polled::NotReported
            }
        };
        if let Some(d) = st.daemon.as_mut() {
            let _ = d.wake.before_looking(polled(daemon_rang));
        }
        let mut taken = self.drain_daemon_queue(&mut st);
        if let Some(d) = st.daemon.as_mut() {
            d.wake.taken(taken);
        }
        let keys: Vec<SegmentKey> = st.peers.keys().copied().collect();
        let mut unfinished = false;
        for key in keys {
            let Some(peer) = st.peers.get_mut(&key) else {
                continue;
            };
            let rang = peers_rang.iter().any(|&(s, i, _)| (s, i) == key);
            let read = peer.receiver.before_looking(polled(rang));
            if matches!(read, Some(Ok(Drained::PeerGone(_)) | Err(_))) {
                hung_up.push(key);
            }
            let drained = self.drain_peer(&mut st, key);
            if drained.taken > 0 {
                self.inner
                    .peer_records
                    .fetch_add(drained.taken as u64, Ordering::Relaxed);
            }
            taken += drained.taken;
            unfinished |= drained.unfinished;
            if let Some(peer) = st.peers.get_mut(&key) {
                peer.receiver.taken(drained.taken);
            }
        }
        for key in hung_up {
            self.peer_died(&mut st, key);
        }
        if unfinished {
            // A peer wrote more than a dispatch takes: come back for the rest at once.
            self.inner.doorbell.ring()?;
        }
        // Records count even when no wake-up was seen: this dispatch may have taken one that
        // another thread sleeps for (its writer, finding it taken, sent no wake-up of its
        // own), and the caller must then tell the sleepers.
        Ok(!events.is_empty() || taken > 0)
    }

    fn read_socket(&self, st: &mut State) {
        let mut buf = vec![0u8; MAX_MESSAGE_LEN];
        loop {
            let Some(d) = st.daemon.as_ref() else { return };
            match fdpass::recv_with_fds(d.socket.as_fd(), &mut buf, 4) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Ok((n, fds)) if n > 0 => match DaemonReply::decode(&buf[..n]) {
                    Ok((
                        _,
                        DaemonReply::SegmentAdded {
                            segment_id,
                            is_client,
                        },
                    )) => self.add_segment(st, segment_id, is_client, fds),
                    Ok((id, reply)) => {
                        if let (
                            DaemonReply::Failure { code, message },
                            Some(ConnectState::Waiting(w)),
                        ) = (&reply, st.connects.get_mut(&id))
                        {
                            if let Some(w) = w.take() {
                                w.wake();
                            }
                            let r = Err(Error::Refused {
                                code: *code,
                                message: message.clone(),
                            });
                            st.connects.insert(id, ConnectState::Done(r));
                        } else {
                            st.replies.insert(id, reply);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "malformed message from shuntd"),
                },
                other => {
                    tracing::info!(result = ?other.map(|(n, _)| n).map_err(|e| e.to_string()), "shuntd went away; sessions keep flowing");
                    self.daemon_gone(st);
                    return;
                }
            }
        }
    }

    fn daemon_gone(&self, st: &mut State) {
        if let Some(d) = st.daemon.take() {
            let _ = epoll::delete(&self.inner.epoll, d.socket.as_fd());
        }
        // Standby sessions are shuntd's promises; a new shuntd would not know them.
        self.drop_standby(st);
        st.standby_requests.clear();
        st.outbox.clear();
        for c in st.connects.values_mut() {
            if let ConnectState::Waiting(w) = c {
                if let Some(w) = w.take() {
                    w.wake();
                }
                *c = ConnectState::Done(Err(Error::DaemonGone));
            }
        }
    }

    fn add_segment(&self, st: &mut State, segment_id: u32, is_client: bool, fds: Vec<OwnedFd>) {
        let Ok([seg, write, anchor, read]) = <[OwnedFd; 4]>::try_from(fds) else {
            tracing::warn!(segment_id, "segment grant without its four fds");
            return;
        };
        let epoch = st.segment_epoch();
        match PeerSegment::open(seg, [write, anchor, read], is_client) {
            Ok(peer) => {
                let token = TOKEN_PEER + ((u64::from(epoch) << 32) | u64::from(segment_id));
                let watch = epoll::add(
                    &self.inner.epoll,
                    peer.receiver.as_fd(),
                    epoll::EventData::new_u64(token),
                    peer.receiver.events(),
                );
                if let Err(e) = watch {
                    tracing::warn!(error = %e, "cannot watch the peer");
                }
                st.peers.insert((epoch, segment_id), peer);
            }
            Err(e) => tracing::warn!(segment_id, error = %e, "cannot map a granted segment"),
        }
    }

    /// Handles shuntd's events; returns how many were taken.
    fn drain_daemon_queue(&self, st: &mut State) -> usize {
        let mut taken = 0;
        loop {
            let Some(d) = st.daemon.as_mut() else {
                return taken;
            };
            let rec = match d.queue.pop() {
                Ok(Some(rec)) => rec,
                Ok(None) => return taken,
                Err(e) => {
                    tracing::warn!(error = %e, "event queue corrupt; detaching");
                    self.daemon_gone(st);
                    return taken;
                }
            };
            taken += 1;
            match Event::decode(&rec) {
                Ok(Event::Accepted {
                    listener_id,
                    session_id,
                    fifos,
                    peer,
                    standby,
                }) => {
                    self.learn_segment(st, fifos.segment_id);
                    let Some(l) = st.listeners.get_mut(&listener_id) else {
                        continue;
                    };
                    if standby {
                        l.standby
                            .insert((fifos.segment_id, fifos.slot), (session_id, fifos, peer));
                    } else {
                        l.backlog.push_back((session_id, fifos, peer));
                        if let Some(w) = l.waker.take() {
                            w.wake();
                        }
                    }
                }
                Ok(Event::StandbyRevoked) => self.drop_standby(st),
                Ok(Event::Connected {
                    request_id,
                    session_id,
                    fifos,
                    local,
                }) => {
                    self.learn_segment(st, fifos.segment_id);
                    self.finish_connect(st, request_id, Ok((session_id, fifos, local)));
                }
                Ok(Event::ConnectFailed { request_id, code }) => {
                    let message = format!("connect refused: {code}");
                    self.finish_connect(st, request_id, Err(Error::Refused { code, message }));
                }
                Ok(Event::Reset { session_id }) => {
                    // shuntd resets sessions whose peer worker went away. A peer that shut its
                    // side down cleanly before going left complete data and an end-of-stream,
                    // which must stay readable, exactly as when its hang-up arrives first.
                    let epoch = st.segment_epoch();
                    for s in st.sessions.iter_mut().flatten() {
                        // Ids are this shuntd's: a session another one named may share it.
                        if s.session_id == session_id && s.daemon_epoch == epoch {
                            s.peer_died();
                        }
                    }
                    self.drop_pooled_standby(st, |id, _| id == session_id, true);
                    self.drop_held_standby(st, |id, _| id == session_id);
                }
                Ok(other) => {
                    tracing::warn!(event = ?other, "peer event in shuntd's queue; ignored")
                }
                Err(e) => tracing::warn!(error = %e, "malformed event from shuntd; ignored"),
            }
        }
    }

    /// shuntd sends a segment's grant over the socket before it posts an event naming the
    /// segment, but this dispatch may have looked at the socket before the grant came: then
    /// it is waiting there now.
    fn learn_segment(&self, st: &mut State, segment_id: u32) {
        if !st.peers.contains_key(&(st.segment_epoch(), segment_id)) {
            self.read_socket(st);
        }
    }

    fn finish_connect(&self, st: &mut State, request_id: u32, result: Result<Announced, Error>) {
        if let Some(remote) = st.standby_requests.remove(&request_id) {
            self.add_standby(st, remote, result);
        } else if let Some(ConnectState::Waiting(w)) = st.connects.get_mut(&request_id) {
            if let Some(w) = w.take() {
                w.wake();
            }
            st.connects.insert(request_id, ConnectState::Done(result));
        } else if let Ok((session_id, ..)) = result {
            // Nobody waits any more (timed out): give the session back.
            self.give_back(st, session_id);
        }
    }

    /// Puts the answer to a standby connect into the pool.
    fn add_standby(&self, st: &mut State, remote: SocketAddr, result: Result<Announced, Error>) {
        match result {
            Ok(announced) => st.standby.entry(remote).or_default().push_back(announced),
            // The next connect asks shuntd itself and gets the error first-hand.
            Err(e) => tracing::debug!(%remote, error = %e, "standby connect refused"),
        }
    }

    /// Drops every standby session: the pooled ones this worker connected (closed, as if used
    /// and closed at once) and the ones its listeners hold (reset: their connector may have
    /// opened them in the meantime, and must not take the silence for a clean close).
    fn drop_standby(&self, st: &mut State) {
        self.drop_pooled_standby(st, |_, _| true, false);
        self.drop_held_standby(st, |_, _| true);
    }

    /// Closes (or resets) the pooled standby sessions that `which(session id, segment id)`
    /// picks.
    fn drop_pooled_standby(&self, st: &mut State, which: impl Fn(u64, u32) -> bool, reset: bool) {
        let mut pooled = Vec::new();
        for (remote, pool) in &mut st.standby {
            pool.retain(|announced| {
                let picked = which(announced.0, announced.1.segment_id);
                if picked {
                    pooled.push((*remote, *announced));
                }
                !picked
            });
        }
        for (remote, (session_id, fifos, local)) in pooled {
            self.discard_unopened(st, (session_id, fifos, local, remote, true), reset);
        }
    }

    /// Resets the standby sessions this worker's listeners hold that `which(session id,
    /// segment id)` picks.
    fn drop_held_standby(&self, st: &mut State, which: impl Fn(u64, u32) -> bool) {
        let mut held = Vec::new();
        for l in st.listeners.values_mut() {
            l.standby.retain(|_, announced| {
                let picked = which(announced.0, announced.1.segment_id);
                if picked {
                    held.push((l.endpoint, *announced));
                }
                !picked
            });
        }
        for (endpoint, (session_id, fifos, peer)) in held {
            self.discard_unopened(st, (session_id, fifos, endpoint, peer, false), true);
        }
    }

    /// Undoes [`Worker::open_session_state`] for a session that stays unopened.
    fn unmap_session(st: &mut State, index: usize) {
        if let Some(s) = st.sessions[index].take()
            && let Some(peer) = st.peers.get_mut(&s.segment)
        {
            peer.slots.remove(&s.slot);
        }
    }

    /// Ends a session shuntd announced and nobody here opened: the peer hears of it through
    /// their ring, and shuntd through the close report.
    fn discard_unopened(
        &self,
        st: &mut State,
        (session_id, fifos, local, remote, is_client): (
            u64,
            FifoPair,
            SocketAddr,
            SocketAddr,
            bool,
        ),
        reset: bool,
    ) {
        match Self::open_session_state(st, session_id, fifos, local, remote, is_client) {
            Ok(index) => self.finish_session(st, index, reset),
            Err(_) => self.give_back(st, session_id),
        }
    }

    /// A peer event about a slot with no open session here: if it is a standby session a
    /// listener holds, `Opened` moves it to the backlog and a close drops it.
    fn standby_event(&self, st: &mut State, key: SegmentKey, event: Event, slot: u32) {
        if !st.is_current_epoch(key.0) {
            return;
        }
        let held = (key.1, slot);
        let Some(listener_id) = st
            .listeners
            .iter()
            .find(|(_, l)| l.standby.contains_key(&held))
            .map(|(id, _)| *id)
        else {
            return;
        };
        let l = st.listeners.get_mut(&listener_id).expect("found");
        match event {
            Event::Opened { .. } => {
                let announced = l.standby.remove(&held).expect("found");
                l.backlog.push_back(announced);
                if let Some(w) = l.waker.take() {
                    w.wake();
                }
            }
            Event::PeerClosed { .. } | Event::PeerReset { .. } => {
                // The event may be older than this session: meant for the slot's previous
                // session, whose peer closed it after this side had. The FIFOs, made afresh for
                // this session, say whether its peer really went.
                let (session_id, fifos, peer) = l.standby[&held];
                let endpoint = l.endpoint;
                let Ok(index) =
                    Self::open_session_state(st, session_id, fifos, endpoint, peer, false)
                else {
                    return;
                };
                if st.sessions[index].as_ref().is_some_and(|s| s.is_usable()) {
                    Self::unmap_session(st, index);
                } else {
                    self.finish_session(st, index, false);
                    let l = st.listeners.get_mut(&listener_id).expect("found");
                    l.standby.remove(&held);
                }
            }
            // Data waits in the FIFO for whoever accepts the session.
            _ => {}
        }
    }

    /// Handles what the peer of segment `key` posted, up to [`PEER_RECORDS_PER_DISPATCH`].
    fn drain_peer(&self, st: &mut State, key: SegmentKey) -> Drain {
        for taken in 0..PEER_RECORDS_PER_DISPATCH {
            let Some(peer) = st.peers.get_mut(&key) else {
                return Drain::done(taken);
            };
            let rec = match peer.inbound.pop() {
                Ok(Some(rec)) => rec,
                Ok(None) => return Drain::done(taken),
                Err(e) => {
                    tracing::warn!(error = %e, "cut-through ring corrupt; resetting the peer's sessions");
                    self.peer_died(st, key);
                    return Drain::done(taken);
                }
            };
            let event = match Event::decode(&rec) {
                Ok(ev) => ev,
                Err(e) => {
                    tracing::warn!(error = %e, "malformed peer event; ignored");
                    continue;
                }
            };
            let slot = match event {
                Event::Opened { slot }
                | Event::RxData { slot }
                | Event::TxSpace { slot }
                | Event::PeerClosed { slot }
                | Event::PeerReset { slot } => slot,
                other => {
                    tracing::warn!(event = ?other, "shuntd event in a peer ring; ignored");
                    continue;
                }
            };
            let Some(&index) = peer.slots.get(&slot) else {
                self.standby_event(st, key, event, slot);
                continue;
            };
            let Some(Some(s)) = st.sessions.get_mut(index) else {
                continue;
            };
            match event {
                Event::RxData { .. } => s.on_rx_data(),
                Event::TxSpace { .. } => s.on_tx_space(),
                Event::PeerClosed { .. } => s.peer_closed(),
                Event::PeerReset { .. } => s.peer_reset(),
                _ => {}
            }
        }
        Drain {
            taken: PEER_RECORDS_PER_DISPATCH,
            unfinished: true,
        }
    }

    fn peer_died(&self, st: &mut State, key: SegmentKey) {
        let Some(peer) = st.peers.get_mut(&key) else {
            return;
        };
        if !peer.dead {
            tracing::debug!(segment = key.1, "cut-through peer hung up");
        }
        peer.dead = true;
        let _ = epoll::delete(&self.inner.epoll, peer.receiver.as_fd());
        let indexes: Vec<usize> = peer.slots.values().copied().collect();
        for i in indexes {
            if let Some(Some(s)) = st.sessions.get_mut(i) {
                s.peer_died();
            }
        }
        if st.is_current_epoch(key.0) {
            self.drop_pooled_standby(st, |_, segment| segment == key.1, true);
            self.drop_held_standby(st, |_, segment| segment == key.1);
        }
        self.gc_peer(st, key);
    }

    /// Unmaps a segment nobody uses any more: no sessions, and the peer is dead or the shuntd
    /// that could put new sessions in it is gone.
    pub(crate) fn gc_peer(&self, st: &mut State, key: SegmentKey) {
        let current = st.is_current_epoch(key.0);
        let Some(peer) = st.peers.get(&key) else {
            return;
        };
        if peer.slots.is_empty() && (peer.dead || !current) {
            let _ = epoll::delete(&self.inner.epoll, peer.receiver.as_fd());
            st.peers.remove(&key);
        }
    }

    /// Tells shuntd a session is closed, if it is reachable and still knows the session. The
    /// report goes at once, with any queued requests: an app may close and then leave the
    /// worker alone for good, and shuntd must not go on holding the session.
    pub(crate) fn report_closed(&self, st: &mut State, epoch: u32, session_id: u64, reset: bool) {
        if st.is_current_epoch(epoch) {
            let _ = self.send(st, 0, Request::SessionClosed { session_id, reset });
        }
    }

    /// The worker's id at shuntd, for logs.
    pub fn id(&self) -> Option<u32> {
        self.lock().daemon.as_ref().map(|d| d.worker_id)
    }

    /// This worker's address in its namespace.
    pub fn local_address(&self) -> SocketAddr {
        self.lock().local_address
    }
}

/// A connect shuntd has not answered yet.
#[derive(Debug)]
pub struct PendingConnect {
    pub(crate) id: u32,
    pub(crate) remote: SocketAddr,
    pub(crate) is_client: bool,
    /// Tops up the standby pool to `remote` once connected.
    refill: bool,
}

/// A listener. Accepted sessions queue here until taken.
pub struct Listener {
    pub(crate) worker: Worker,
    pub(crate) endpoint: SocketAddr,
}

impl Listener {
    pub fn endpoint(&self) -> SocketAddr {
        self.endpoint
    }

    pub(crate) fn take(&self, waker: Option<&std::task::Waker>) -> Result<Option<Session>, Error> {
        let mut st = self.worker.lock();
        let endpoint = self.endpoint;
        let Some(lid) = st
            .listeners
            .iter()
            .find(|(_, l)| l.endpoint == endpoint)
            .map(|(id, _)| *id)
        else {
            return Err(Error::Refused {
                code: ErrorCode::NoListener,
                message: "listener closed".into(),
            });
        };
        let l = st.listeners.get_mut(&lid).expect("found");
        match l.backlog.pop_front() {
            Some((session_id, fifos, peer)) => {
                let s = self
                    .worker
                    .open_session(&mut st, session_id, fifos, endpoint, peer, false)?;
                Ok(Some(s))
            }
            None => {
                if let Some(w) = waker {
                    l.waker = Some(w.clone());
                }
                Ok(None)
            }
        }
    }

    /// Takes an accepted session if one is waiting; never blocks.
    pub fn try_accept(&self) -> Result<Option<Session>, Error> {
        self.worker.dispatch()?;
        self.take(None)
    }

    /// Waits for the next accepted session.
    pub fn accept(&self) -> Result<Session, Error> {
        loop {
            self.worker.dispatch()?;
            let seen = self.worker.generation();
            if let Some(s) = self.take(None)? {
                return Ok(s);
            }
            self.worker.wait_since(None, Some(seen))?;
        }
    }
}
