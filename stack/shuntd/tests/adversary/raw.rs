//! The session API spoken by hand, as an attacker would: no client library, every fd shuntd
//! or a peer hands over kept, and nothing read unless the attack wants it read.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use shunt_sapi::ErrorCode;
use shunt_sapi::event::{Event, FifoPair};
use shunt_sapi::layout;
use shunt_sapi::message::{DaemonReply, MAX_MESSAGE_LEN, Request, Resume, Scope};
use shunt_shm::fdpass;
use shunt_shm::ring::RingConsumer;
use shunt_shm::segment::Segment;

/// A segment shuntd granted: its memfd, and this side's wake-up ends (the write end of the pipe
/// to the peer, its anchor, and the read end of the pipe from the peer).
pub struct Grant {
    pub segment_id: u32,
    pub segment: OwnedFd,
    pub wake_ends: Vec<OwnedFd>,
}

impl Grant {
    /// The write end of the pipe to the peer.
    pub fn to_peer(&self) -> BorrowedFd<'_> {
        self.wake_ends[0].as_fd()
    }
}

/// A connection to shuntd's app socket, attached or not.
pub struct RawApp {
    pub sock: OwnedFd,
    /// The event queue, once attached.
    queue: Option<RingConsumer>,
    /// Everything shuntd handed over outside grants: the event-queue segment, the wake-up pipe.
    pub received: Vec<OwnedFd>,
    /// Segment grants as they came.
    pub grants: Vec<Grant>,
    next_id: u32,
}

impl RawApp {
    pub fn connect(path: &Path) -> io::Result<RawApp> {
        let sock = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        rustix::net::connect(&sock, &SocketAddrUnix::new(path)?)?;
        Ok(RawApp {
            sock,
            queue: None,
            received: Vec::new(),
            grants: Vec::new(),
            next_id: 1,
        })
    }

    pub fn send(&mut self, req: &Request, fds: &[BorrowedFd<'_>]) -> io::Result<u32> {
        let id = self.next_id;
        self.next_id += 1;
        fdpass::send_with_fds(self.sock.as_fd(), &req.encode(id), fds)?;
        Ok(id)
    }

    /// The next message from shuntd: `None` when it closed the connection or `timeout` passed.
    pub fn recv(&mut self, timeout: Duration) -> io::Result<Option<(u32, DaemonReply)>> {
        if !shunt_shm::wait_readable(self.sock.as_fd(), Some(timeout))? {
            return Ok(None);
        }
        let mut buf = vec![0u8; MAX_MESSAGE_LEN];
        let (n, fds) = match fdpass::recv_with_fds(self.sock.as_fd(), &mut buf, 4) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(None);
        }
        let (id, reply) = DaemonReply::decode(&buf[..n]).map_err(io::Error::other)?;
        if let DaemonReply::SegmentAdded { segment_id, .. } = reply {
            let mut fds = fds.into_iter();
            if let Some(segment) = fds.next() {
                self.grants.push(Grant {
                    segment_id,
                    segment,
                    wake_ends: fds.collect(),
                });
            }
        } else {
            self.received.extend(fds);
        }
        Ok(Some((id, reply)))
    }

    /// The reply to request `id`, keeping whatever else arrives first.
    pub fn reply(&mut self, id: u32) -> io::Result<DaemonReply> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left)? {
                Some((got, reply)) if got == id => return Ok(reply),
                Some(_) => {}
                None => return Err(io::Error::other("no reply from shuntd")),
            }
        }
    }

    /// Attaches to `namespace`; the refusal's code if shuntd refuses.
    pub fn attach(&mut self, namespace: &str, secret: &[u8]) -> io::Result<Result<(), ErrorCode>> {
        let id = self.send(
            &Request::Attach {
                namespace_id: namespace.into(),
                namespace_secret: secret.to_vec(),
                app_name: "hostile".into(),
                scope: Scope::Local,
                event_queue_len: 0,
                resume: Resume::default(),
            },
            &[],
        )?;
        match self.reply(id)? {
            DaemonReply::Attached {
                event_queue_offset, ..
            } => {
                let seg = Segment::open(self.received[0].try_clone()?).map_err(io::Error::other)?;
                let queue = RingConsumer::attach(Arc::new(seg), event_queue_offset as usize)
                    .map_err(io::Error::other)?;
                self.queue = Some(queue);
                Ok(Ok(()))
            }
            DaemonReply::Failure { code, .. } => Ok(Err(code)),
            other => Err(io::Error::other(format!("attach answered with {other:?}"))),
        }
    }

    /// The next event in the event queue, reading the socket meanwhile (grants come there).
    pub fn event(&mut self, timeout: Duration) -> io::Result<Option<Event>> {
        let deadline = Instant::now() + timeout;
        loop {
            let queue = self.queue.as_mut().expect("attached");
            if let Some(rec) = queue.pop().map_err(io::Error::other)? {
                return Ok(Some(Event::decode(&rec).map_err(io::Error::other)?));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let _ = self.recv(left.min(Duration::from_millis(10)))?;
        }
    }

    /// Connects to `remote` and returns the session's FIFOs and its segment, mapped.
    pub fn connect_session(&mut self, remote: SocketAddr) -> io::Result<(FifoPair, Arc<Segment>)> {
        let id = self.send(
            &Request::Connect {
                remote,
                standby: false,
            },
            &[],
        )?;
        loop {
            match self.event(Duration::from_secs(10))? {
                Some(Event::Connected {
                    request_id, fifos, ..
                }) if request_id == id => {
                    // The grant comes on the socket, maybe after the event.
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while !self.grants.iter().any(|g| g.segment_id == fifos.segment_id)
                        && Instant::now() < deadline
                    {
                        self.recv(Duration::from_millis(10))?;
                    }
                    let grant = self
                        .grants
                        .iter()
                        .find(|g| g.segment_id == fifos.segment_id)
                        .ok_or_else(|| io::Error::other("connected in a segment never granted"))?;
                    let seg =
                        Segment::open(grant.segment.try_clone()?).map_err(io::Error::other)?;
                    return Ok((fifos, Arc::new(seg)));
                }
                Some(Event::ConnectFailed { code, .. }) => {
                    return Err(io::Error::other(format!("connect refused: {code}")));
                }
                Some(_) => {}
                None => return Err(io::Error::other("no answer to the connect")),
            }
        }
    }
}

/// The attack on eventfd doorbells, tried on whatever fd it is given: make the description
/// blocking, and fill it from this side if this side can write to it at all.
pub fn make_blocking_and_full(fd: BorrowedFd<'_>) {
    use rustix::fs::{OFlags, fcntl_getfl, fcntl_setfl};
    let Ok(flags) = fcntl_getfl(fd) else {
        return;
    };
    let _ = fcntl_setfl(fd, flags | OFlags::NONBLOCK);
    let junk = [0xfeu8; 64 << 10];
    // An eventfd would take u64::MAX - 1 here; pipes take bytes until full (or refuse).
    let _ = rustix::io::write(fd, &(u64::MAX - 1).to_ne_bytes());
    while let Ok(n) = rustix::io::write(fd, &junk) {
        if n == 0 {
            break;
        }
    }
    let _ = fcntl_setfl(fd, flags - OFlags::NONBLOCK);
}

/// Offsets in a FIFO's header (see docs/architecture.md, "Memory layout").
pub const FIFO_CAPACITY: usize = 4;
pub const FIFO_HEAD: usize = 64;
pub const FIFO_TAIL: usize = 128;

/// The event ring this side of a segment writes into (toward its peer).
pub fn outbound_ring(is_client: bool) -> usize {
    layout::ct_rings(is_client).1
}
