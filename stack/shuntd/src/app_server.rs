//! The attach socket and the worker threads that serve attached app workers.
//!
//! Each app worker's connection is pinned to one shuntd worker thread (round robin), which runs
//! a single-threaded runtime. Everything the app worker asks for is handled there, and the
//! sessions it opens are pinned there too.
//!
//! Anyone on the node can connect to the attach socket, so nothing here trusts a connection
//! until it attached: connections that have not attached yet are capped (per user and in all)
//! and must attach within a timeout, and none of them holds a buffer of its own. When shuntd
//! runs out of file descriptors, accepting backs off instead of spinning.

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::{self, AddressFamily, SocketFlags, SocketType};
use shunt_sapi::ErrorCode;
use shunt_sapi::event::Event;
use shunt_sapi::message::{
    CertificateMaterial, DaemonReply, DecodeError, MAX_MESSAGE_LEN, Request, ResumedSession,
};
use shunt_session::SessionLayer;
use shunt_session::app::{PeerCred, WorkerId};
use shunt_session::layer::{AttachRequest, Attached, PairOutcome, SessionError, SessionId};
use shunt_session::link::WorkerLink;
use shunt_shm::fdpass;
use shunt_shm::wake::WakeReceiver;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::link::DaemonLink;
use crate::log_throttle::LogThrottle;
use crate::sidecar_usage::SidecarUsage;

/// Daemon-side counters that the session layer does not see.
#[derive(Debug, Default)]
pub struct ServerCounters {
    pub decode_errors: AtomicU64,
    /// Control API calls refused for the caller's credentials.
    pub control_refusals: AtomicU64,
    pub sidecar_usage: SidecarUsage,
    /// Deliveries that found an app's socket full and waited for it to read.
    pub socket_full: AtomicU64,
    /// App-socket connections closed before they attached, by reason.
    pub refused_connections: Mutex<HashMap<&'static str, u64>>,
    /// Failed accepts on the app socket, by reason.
    pub accept_errors: Mutex<HashMap<&'static str, u64>>,
    /// Lines an app could trigger at will, written once per interval.
    pub log: LogThrottle,
}

impl ServerCounters {
    fn bump(map: &Mutex<HashMap<&'static str, u64>>, key: &'static str) {
        *map.lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default() += 1;
    }
}

/// Caps on app-socket connections that have not attached yet.
#[derive(Debug, Clone, Copy)]
pub struct UnattachedLimits {
    /// In all.
    pub total: usize,
    /// Per user.
    pub per_uid: usize,
    /// How long a connection may take to attach.
    pub timeout: Duration,
}

impl Default for UnattachedLimits {
    fn default() -> Self {
        Self {
            total: 1024,
            per_uid: 64,
            timeout: Duration::from_secs(10),
        }
    }
}

/// What the app server needs besides the session layer.
#[derive(Debug, Clone, Copy)]
pub struct AppServerConfig {
    /// Events per worker's event queue, unless the app asks for another size.
    pub event_queue_len: u32,
    pub unattached: UnattachedLimits,
}

/// Connections that have not attached yet, counted against [`UnattachedLimits`].
#[derive(Debug, Default)]
struct Unattached {
    total: usize,
    by_uid: HashMap<u32, usize>,
}

/// One connection's place among the unattached; given back when dropped.
struct UnattachedTicket {
    uid: u32,
    pool: Arc<Mutex<Unattached>>,
}

impl Drop for UnattachedTicket {
    fn drop(&mut self) {
        let mut u = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        u.total -= 1;
        if let Some(n) = u.by_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                u.by_uid.remove(&self.uid);
            }
        }
    }
}

struct NewConnection {
    fd: OwnedFd,
    cred: PeerCred,
    ticket: UnattachedTicket,
}

pub struct AppServer {
    workers: Vec<mpsc::UnboundedSender<NewConnection>>,
    next: AtomicUsize,
    unattached: Arc<Mutex<Unattached>>,
    limits: UnattachedLimits,
    counters: Arc<ServerCounters>,
}

#[derive(Clone)]
struct Shared {
    layer: Arc<SessionLayer>,
    counters: Arc<ServerCounters>,
    config: AppServerConfig,
}

thread_local! {
    /// One receive buffer per worker thread, shared by every connection it serves: a message
    /// is decoded into owned values before anything awaits, so no connection holds it.
    static RECEIVE_BUFFER: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_MESSAGE_LEN]);
}

/// How long accepting pauses after the first failure for lack of descriptors or memory, and
/// at most.
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Binds a SOCK_SEQPACKET listening socket at `path`, replacing a stale socket file.
pub fn bind_seqpacket(path: &Path) -> std::io::Result<OwnedFd> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    remove_stale_socket(path)?;
    let fd = net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    let addr = net::SocketAddrUnix::new(path)?;
    net::bind(&fd, &addr)?;
    net::listen(&fd, 1024)?;
    Ok(fd)
}

/// Removes `path` if it is a socket nobody listens on; refuses to steal a live one.
pub fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    let probe = net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let in_use = net::SocketAddrUnix::new(path)
        .and_then(|a| net::connect(&probe, &a))
        .is_ok();
    if in_use {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("another shuntd is serving {}", path.display()),
        ));
    }
    std::fs::remove_file(path)
}

impl AppServer {
    /// Starts `n` worker threads.
    pub fn start(
        n: usize,
        layer: Arc<SessionLayer>,
        counters: Arc<ServerCounters>,
        config: AppServerConfig,
    ) -> std::io::Result<Self> {
        let shared = Shared {
            layer,
            counters: counters.clone(),
            config,
        };
        let mut workers = Vec::with_capacity(n);
        for thread in 0..n {
            let (tx, mut rx) = mpsc::unbounded_channel::<NewConnection>();
            let shared = shared.clone();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            std::thread::Builder::new()
                .name(format!("shunt-wrk-{thread}"))
                .spawn(move || {
                    rt.block_on(async move {
                        while let Some(conn) = rx.recv().await {
                            tokio::spawn(serve(conn, thread, shared.clone()));
                        }
                    })
                })?;
            workers.push(tx);
        }
        Ok(Self {
            workers,
            next: AtomicUsize::new(0),
            unattached: Arc::new(Mutex::new(Unattached::default())),
            limits: config.unattached,
            counters,
        })
    }

    /// Accepts app connections forever, handing each to the next worker thread.
    pub async fn accept_loop(&self, listener: OwnedFd) -> std::io::Result<()> {
        let listener = crate::reactor::watch(listener)?;
        let mut backoff = ACCEPT_BACKOFF_FIRST;
        loop {
            let mut guard = listener.readable().await?;
            match net::accept_with(
                guard.get_inner(),
                SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            ) {
                Ok(fd) => {
                    backoff = ACCEPT_BACKOFF_FIRST;
                    self.admit(fd);
                }
                Err(Errno::AGAIN) => guard.clear_ready(),
                Err(e) => {
                    let reason = match e {
                        Errno::MFILE => "process_fd_limit",
                        Errno::NFILE => "system_fd_limit",
                        Errno::NOBUFS | Errno::NOMEM => "no_memory",
                        _ => "other",
                    };
                    ServerCounters::bump(&self.counters.accept_errors, reason);
                    if let Some(held_back) = self.counters.log.admit(reason) {
                        tracing::warn!(error = %e, held_back, "accept on the app socket failed");
                    }
                    if reason != "other" {
                        // The connection waits in the backlog; retrying at once would spin
                        // until a descriptor frees up.
                        drop(guard);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    }
                }
            }
        }
    }

    /// Hands a new connection to a worker thread, or closes it when its user (or everyone)
    /// already has as many unattached connections as allowed.
    fn admit(&self, fd: OwnedFd) {
        let cred = net::sockopt::socket_peercred(&fd)
            .map(|c| PeerCred {
                pid: c.pid.as_raw_nonzero().get() as u32,
                uid: c.uid.as_raw(),
                gid: c.gid.as_raw(),
            })
            .unwrap_or_default();
        let ticket = {
            let mut u = self.unattached.lock().unwrap_or_else(|e| e.into_inner());
            let mine = u.by_uid.get(&cred.uid).copied().unwrap_or(0);
            let full = if u.total >= self.limits.total {
                Some("unattached_total")
            } else if mine >= self.limits.per_uid {
                Some("unattached_per_uid")
            } else {
                None
            };
            if let Some(reason) = full {
                drop(u);
                ServerCounters::bump(&self.counters.refused_connections, reason);
                if let Some(held_back) = self.counters.log.admit(reason) {
                    tracing::warn!(
                        uid = cred.uid,
                        pid = cred.pid,
                        reason,
                        held_back,
                        "too many app connections that have not attached; closing"
                    );
                }
                return;
            }
            u.total += 1;
            *u.by_uid.entry(cred.uid).or_default() += 1;
            UnattachedTicket {
                uid: cred.uid,
                pool: self.unattached.clone(),
            }
        };
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        if self.workers[i]
            .send(NewConnection { fd, cred, ticket })
            .is_err()
        {
            tracing::error!(worker = i, "worker thread is gone; dropping app connection");
        }
    }
}

enum Step {
    Continue,
    Close,
}

/// What one datagram from an app brought.
enum Received {
    Message(Result<(u32, Request), DecodeError>, Vec<OwnedFd>),
    WouldBlock,
    Closed,
    Failed(std::io::Error),
}

struct Connection {
    fd: AsyncFd<OwnedFd>,
    cred: PeerCred,
    thread: usize,
    shared: Shared,
    worker: Option<(WorkerId, Arc<DaemonLink>)>,
    /// Held until the connection attaches.
    ticket: Option<UnattachedTicket>,
}

async fn serve(conn: NewConnection, thread: usize, shared: Shared) {
    let fd = match crate::reactor::watch(conn.fd) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch app connection");
            return;
        }
    };
    let attach_deadline = tokio::time::Instant::now() + shared.config.unattached.timeout;
    let mut c = Connection {
        fd,
        cred: conn.cred,
        thread,
        shared,
        worker: None,
        ticket: Some(conn.ticket),
    };
    loop {
        let link = c.worker.as_ref().map(|(_, l)| l.clone());
        let received = match link {
            Some(link) => {
                tokio::select! {
                    r = c.receive() => r,
                    () = link.stalled() => {
                        c.unstall(&link).await;
                        continue;
                    }
                }
            }
            None => match tokio::time::timeout_at(attach_deadline, c.receive()).await {
                Ok(r) => r,
                Err(_) => {
                    ServerCounters::bump(&c.shared.counters.refused_connections, "attach_timeout");
                    if let Some(held_back) = c.shared.counters.log.admit("attach_timeout") {
                        tracing::warn!(
                            pid = c.cred.pid,
                            uid = c.cred.uid,
                            held_back,
                            "app connection did not attach in time; closing"
                        );
                    }
                    break;
                }
            },
        };
        match received {
            Received::Message(msg, fds) => match c.handle(msg, fds).await {
                Step::Continue => {}
                Step::Close => break,
            },
            Received::WouldBlock => {}
            Received::Closed => break,
            Received::Failed(e) => {
                tracing::debug!(pid = c.cred.pid, error = %e, "app connection failed");
                break;
            }
        }
    }
    if let Some((worker, _)) = c.worker.take() {
        tracing::info!(%worker, pid = c.cred.pid, "app worker detached");
        c.shared.layer.detach_worker(worker);
    }
}

impl Connection {
    /// Waits for the next datagram and decodes it.
    async fn receive(&self) -> Received {
        let Ok(mut guard) = self.fd.readable().await else {
            return Received::Closed;
        };
        let fd = guard.get_inner().as_fd();
        let received =
            RECEIVE_BUFFER.with_borrow_mut(|buf| match fdpass::recv_with_fds(fd, buf, 1) {
                Ok((0, _)) => Received::Closed,
                Ok((n, fds)) => Received::Message(Request::decode(&buf[..n]), fds),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Received::WouldBlock,
                Err(e) => Received::Failed(e),
            });
        if matches!(received, Received::WouldBlock) {
            guard.clear_ready();
        }
        received
    }

    /// Delivers what waited for the app to read its socket, as its socket drains.
    async fn unstall(&self, link: &DaemonLink) {
        loop {
            let Ok(mut guard) = self.fd.writable().await else {
                return;
            };
            link.flush();
            if !link.is_stalled() {
                return;
            }
            guard.clear_ready();
        }
    }

    async fn send(&self, request_id: u32, reply: DaemonReply, fds: &[std::os::fd::BorrowedFd<'_>]) {
        let msg = reply.encode(request_id);
        loop {
            match fdpass::try_send_with_fds(self.fd.get_ref().as_fd(), &msg, fds) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    match self.fd.writable().await {
                        Ok(mut g) => g.clear_ready(),
                        Err(_) => return,
                    }
                }
                Err(e) => {
                    tracing::debug!(pid = self.cred.pid, error = %e, "cannot reply to app");
                    return;
                }
                Ok(_) => return,
            }
        }
    }

    async fn fail(&self, request_id: u32, code: ErrorCode, message: String) {
        self.send(request_id, DaemonReply::Failure { code, message }, &[])
            .await;
    }

    async fn handle(
        &mut self,
        decoded: Result<(u32, Request), DecodeError>,
        fds: Vec<OwnedFd>,
    ) -> Step {
        let (request_id, request) = match decoded {
            Ok(r) => r,
            Err(e) => {
                self.shared
                    .counters
                    .decode_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(pid = self.cred.pid, error = %e, "malformed session-API message");
                self.fail(0, ErrorCode::InvalidRequest, e.to_string()).await;
                return Step::Close;
            }
        };
        let Request::Batch(requests) = request else {
            return self.handle_request(request_id, request, fds).await;
        };
        for (id, request) in requests {
            if let Step::Close = self.handle_request(id, request, Vec::new()).await {
                return Step::Close;
            }
        }
        Step::Continue
    }

    async fn handle_request(
        &mut self,
        request_id: u32,
        request: Request,
        fds: Vec<OwnedFd>,
    ) -> Step {
        let worker = self.worker.as_ref().map(|(w, _)| *w);
        match (request, worker) {
            (
                Request::Attach {
                    namespace_id,
                    namespace_secret,
                    app_name,
                    scope,
                    event_queue_len,
                    resume,
                },
                None,
            ) => {
                let Some((link, app_wake)) = self.make_link(request_id, fds, event_queue_len).await
                else {
                    return Step::Close;
                };
                let req = AttachRequest {
                    namespace_id: namespace_id.clone(),
                    namespace_secret,
                    app_name: app_name.clone(),
                    scope,
                    cred: self.cred,
                    thread: self.thread,
                    link: link.clone(),
                    resume,
                };
                match self.shared.layer.attach(req) {
                    Ok(a) => {
                        tracing::info!(app = a.app.0, worker = %a.worker, name = %app_name, namespace = %namespace_id, pid = self.cred.pid, uid = self.cred.uid, "app attached");
                        self.attached(request_id, a, link, app_wake).await;
                        Step::Continue
                    }
                    Err(e) => {
                        self.refused("attach", &e);
                        self.fail(request_id, e.code(), e.to_string()).await;
                        Step::Close
                    }
                }
            }
            (
                Request::AttachWorker {
                    app_id,
                    app_token,
                    event_queue_len,
                    resume,
                },
                None,
            ) => {
                let Some((link, app_wake)) = self.make_link(request_id, fds, event_queue_len).await
                else {
                    return Step::Close;
                };
                let app = shunt_session::app::AppId(app_id);
                match self.shared.layer.attach_worker(
                    app,
                    &app_token,
                    self.thread,
                    link.clone(),
                    &resume,
                ) {
                    Ok(a) => {
                        tracing::info!(app = app_id, worker = %a.worker, pid = self.cred.pid, "app worker attached");
                        self.attached(request_id, a, link, app_wake).await;
                        Step::Continue
                    }
                    Err(e) => {
                        self.refused("worker attach", &e);
                        self.fail(request_id, e.code(), e.to_string()).await;
                        Step::Close
                    }
                }
            }
            (Request::Batch(_), _) => {
                // Request::decode never nests batches.
                self.fail(request_id, ErrorCode::InvalidRequest, "nested batch".into())
                    .await;
                Step::Close
            }
            (Request::ResumeSessions(sessions), Some(w)) => {
                self.resume_sessions(request_id, w, fds, &sessions).await;
                Step::Continue
            }
            (Request::Attach { .. } | Request::AttachWorker { .. }, Some(_)) => {
                self.fail(
                    request_id,
                    ErrorCode::InvalidRequest,
                    "already attached".into(),
                )
                .await;
                Step::Continue
            }
            (_, None) => {
                self.fail(request_id, ErrorCode::NotAttached, "attach first".into())
                    .await;
                Step::Close
            }
            (Request::Listen { endpoint }, Some(w)) => {
                match self.shared.layer.listen(w, endpoint) {
                    Ok(lid) => {
                        tracing::debug!(worker = %w, %endpoint, "listening");
                        self.send(
                            request_id,
                            DaemonReply::Listening {
                                listener_id: lid.0,
                                endpoint,
                            },
                            &[],
                        )
                        .await;
                    }
                    Err(e) => {
                        self.refused("listen", &e);
                        self.fail(request_id, e.code(), e.to_string()).await;
                    }
                }
                Step::Continue
            }
            (Request::Unlisten { listener_id }, Some(w)) => {
                match self
                    .shared
                    .layer
                    .unlisten(w, shunt_session::app::ListenerId(listener_id))
                {
                    Ok(()) => self.send(request_id, DaemonReply::Ack, &[]).await,
                    Err(e) => self.fail(request_id, e.code(), e.to_string()).await,
                }
                Step::Continue
            }
            (Request::Connect { remote, standby }, Some(w)) => {
                let layer = &self.shared.layer;
                let result = if standby {
                    layer.connect_standby(w, request_id, remote)
                } else {
                    layer.connect(w, request_id, remote)
                };
                if let Err(e) = result {
                    self.connect_failed(w, request_id, remote, e).await;
                }
                Step::Continue
            }
            (Request::Pair(offer), Some(w)) => {
                let remote = offer.remote;
                match self.shared.layer.pair(w, request_id, offer) {
                    Ok(PairOutcome::Paired(o)) => {
                        tracing::debug!(worker = %w, %remote, session = o.client_session.0, "paired")
                    }
                    Ok(PairOutcome::Waiting) => {}
                    Err(e) => self.connect_failed(w, request_id, remote, e).await,
                }
                Step::Continue
            }
            (Request::GetCertificate { name }, Some(w)) => {
                match self.shared.layer.certificate_for(w, &name) {
                    Ok(c) => {
                        let reply = DaemonReply::Certificate(CertificateMaterial {
                            cert_chain: c.cert_chain,
                            private_key: c.private_key,
                            trust_bundle: c.trust_bundle,
                            version: c.version,
                        });
                        self.send(request_id, reply, &[]).await;
                    }
                    Err(e) => self.fail(request_id, e.code(), e.to_string()).await,
                }
                Step::Continue
            }
            (Request::Usage(report), Some(_)) => {
                self.shared.counters.sidecar_usage.record(&report);
                Step::Continue
            }
            (Request::SessionClosed { session_id, reset }, Some(w)) => {
                if let Err(e) = self
                    .shared
                    .layer
                    .session_closed(w, SessionId(session_id), reset)
                {
                    tracing::debug!(worker = %w, session_id, error = %e, "close of an unknown session");
                }
                Step::Continue
            }
        }
    }

    async fn connect_failed(
        &self,
        w: WorkerId,
        request_id: u32,
        remote: std::net::SocketAddr,
        e: SessionError,
    ) {
        let code = e.code();
        match code {
            ErrorCode::Denied => tracing::info!(worker = %w, %remote, error = %e, "connect denied"),
            ErrorCode::LimitExceeded => self.refused("connect", &e),
            _ => tracing::debug!(worker = %w, %remote, error = %e, "connect failed"),
        }
        let posted = self.worker.as_ref().is_some_and(|(_, link)| {
            let posted = link
                .post(&Event::ConnectFailed { request_id, code })
                .is_ok();
            link.flush();
            posted
        });
        if !posted {
            // The worker's own queue is full: answer on the socket instead.
            self.fail(request_id, code, e.to_string()).await;
        }
    }

    /// Logs a refusal an app can provoke at will (limits, who may attach), one line per
    /// interval per kind; its metric counts each.
    fn refused(&self, what: &'static str, e: &SessionError) {
        if let Some(held_back) = self.shared.counters.log.admit(what) {
            tracing::warn!(pid = self.cred.pid, uid = self.cred.uid, error = %e, held_back, "{what} refused");
        }
    }

    /// Checks and lists the sessions of one segment an app kept across a restart of shuntd.
    async fn resume_sessions(
        &self,
        request_id: u32,
        w: WorkerId,
        mut fds: Vec<OwnedFd>,
        sessions: &[ResumedSession],
    ) {
        let Some(segment) = fds.pop().filter(|_| fds.is_empty()) else {
            self.fail(
                request_id,
                ErrorCode::InvalidRequest,
                "resumed sessions travel with their segment's memfd".into(),
            )
            .await;
            return;
        };
        let outcomes = self.shared.layer.resume_sessions(w, segment, sessions);
        let refused = outcomes.iter().filter(|o| o.is_err()).count();
        if refused > 0
            && let Some(held_back) = self.shared.counters.log.admit("resume")
        {
            let first = outcomes.iter().find_map(|o| o.as_ref().err());
            tracing::warn!(worker = %w, pid = self.cred.pid, refused, first = ?first.map(ToString::to_string), held_back, "resumed sessions refused");
        }
        let reply = DaemonReply::Resumed(
            outcomes
                .into_iter()
                .map(|o| o.map(|id| id.0).map_err(|e| e.code()))
                .collect(),
        );
        self.send(request_id, reply, &[]).await;
    }

    /// Builds the worker's event queue and wake-up pipe. An attach carries no fds: shuntd
    /// writes only to descriptors it made, so no app can hand it one that blocks.
    async fn make_link(
        &self,
        request_id: u32,
        fds: Vec<OwnedFd>,
        queue_len: u32,
    ) -> Option<(Arc<DaemonLink>, WakeReceiver)> {
        if !fds.is_empty() {
            self.fail(
                request_id,
                ErrorCode::InvalidRequest,
                format!("attach carries {} fds, expected none", fds.len()),
            )
            .await;
            return None;
        }
        let queue_len = if queue_len == 0 {
            self.shared.config.event_queue_len
        } else {
            queue_len
        };
        if !queue_len.is_power_of_two() || !(16..=1 << 20).contains(&queue_len) {
            self.fail(
                request_id,
                ErrorCode::InvalidRequest,
                "event_queue_len must be a power of two from 16 to 1048576".into(),
            )
            .await;
            return None;
        }
        let built = (|| -> anyhow::Result<(Arc<DaemonLink>, WakeReceiver)> {
            let socket = self.fd.get_ref().try_clone()?;
            let name = format!("shunt-evq-{}", self.cred.pid);
            let counters = self.shared.counters.clone();
            let (link, app_wake) = DaemonLink::new(socket, queue_len, &name, counters)?;
            Ok((Arc::new(link), app_wake))
        })();
        match built {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(pid = self.cred.pid, error = %e, "cannot set up an app worker");
                self.fail(request_id, ErrorCode::Internal, e.to_string())
                    .await;
                None
            }
        }
    }

    async fn attached(
        &mut self,
        request_id: u32,
        a: Attached,
        link: Arc<DaemonLink>,
        app_wake: WakeReceiver,
    ) {
        let reply = DaemonReply::Attached {
            app_id: a.app.0,
            app_token: a.app_token.to_vec(),
            worker_id: a.worker.0,
            event_queue_offset: shunt_sapi::layout::event_queue_offset() as u64,
            namespace_address: std::net::SocketAddr::new(a.namespace_address, 0),
        };
        let seg = link.segment().clone();
        self.send(request_id, reply, &[seg.as_fd(), app_wake.as_fd()])
            .await;
        tracing::trace!(fd = self.fd.get_ref().as_raw_fd(), "attach reply sent");
        self.worker = Some((a.worker, link));
        // Attached: no longer one of the connections that have not.
        self.ticket = None;
    }
}
