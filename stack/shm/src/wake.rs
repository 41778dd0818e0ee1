//! Wake-up channels between processes that do not trust each other.
//!
//! # Why not an eventfd
//!
//! An eventfd is a single open file description: whoever holds it, writer or reader, shares its
//! flags and its counter. Any holder can clear `O_NONBLOCK` with `fcntl` and write
//! `0xffff_ffff_ffff_fffe` into it, after which every `write` on it, by anyone, sleeps in the
//! kernel until somebody reads. Handing a peer one's eventfd, or ringing the peer's, therefore
//! hands the peer a way to freeze the ringer. Linux offers no per-call non-blocking `write` on
//! an eventfd, so no care on the ringer's side can close that hole.
//!
//! # What instead
//!
//! A connected pair of Unix stream sockets, one end per side:
//!
//! * **Each side rings through its own end.** A socketpair's two ends are two open file
//!   descriptions, and a side never holds the other's, so nobody can change the flags of the
//!   description a side rings through.
//! * **Every send and receive is `MSG_DONTWAIT`.** The call itself is non-blocking, whatever the
//!   description's flags say, so even a side that shares its own end with somebody (a forked
//!   child, say) cannot be made to sleep.
//! * **A full buffer is a successful ring.** `EAGAIN` means the receiver has unread rings and
//!   is readable, so it is awake or about to be; nothing is lost by not adding another.
//! * **The receiver drains before it looks.** A side woken by its end being readable reads all
//!   pending rings ([`WakeSocket::drain`]) *before* it looks at the shared memory the rings
//!   announce, so a ring that arrives while it looks keeps its end readable for the next wait.
//! * **The same pair carries liveness.** When a side's process dies the kernel closes its end;
//!   the other side reads end-of-file, and a ring toward it fails with [`WakeError::PeerGone`].
//!
//! A ring costs one `send` of one byte: a few hundred nanoseconds more than an eventfd write,
//! and a wake-up across CPUs costs tens of microseconds either way.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvFlags, SendFlags, Shutdown, SocketFlags, SocketType, recv, send, shutdown,
    socketpair,
};

/// The byte a ring sends. Its value carries nothing: any byte is a ring.
const RING_BYTE: [u8; 1] = [1];

/// Rings read per `recv` while draining.
const DRAIN_CHUNK: usize = 256;
/// Reads per drain. A well-behaved peer has rung a few times at most; one that keeps writing
/// must not keep the drainer here. What is left keeps the socket readable, so the drainer's
/// next wait returns at once and drains again.
const DRAIN_READS: usize = 16;

/// What a ring did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rung {
    /// The byte was queued: the receiver is readable now.
    Sent,
    /// The receiver's buffer is full of rings it has not read: it is readable already.
    AlreadyPending,
}

/// What draining found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// The other end is open; this many rings were pending (0: none).
    Open(u64),
    /// The other end was closed (its process died or closed it) after this many rings.
    PeerGone(u64),
}

#[derive(Debug, thiserror::Error)]
pub enum WakeError {
    /// The other end is closed: nobody is there to wake.
    #[error("the other end of the wake-up channel is closed")]
    PeerGone,
    #[error("wake-up channel: {0}")]
    Io(#[from] io::Error),
}

/// One end of a wake-up channel (see the module docs).
#[derive(Debug)]
pub struct WakeSocket {
    fd: OwnedFd,
}

impl WakeSocket {
    /// A connected pair of ends, close-on-exec and non-blocking.
    pub fn pair() -> io::Result<(WakeSocket, WakeSocket)> {
        let (a, b) = socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?;
        Ok((WakeSocket { fd: a }, WakeSocket { fd: b }))
    }

    /// Wraps an end received from a peer: it must be a Unix stream socket. Its flags are left
    /// alone; every call on it is non-blocking anyway.
    pub fn from_fd(fd: OwnedFd) -> io::Result<WakeSocket> {
        let domain = rustix::net::sockopt::socket_domain(&fd).ok();
        let kind = rustix::net::sockopt::socket_type(&fd).ok();
        if domain != Some(AddressFamily::UNIX) || kind != Some(SocketType::STREAM) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a wake-up channel is a Unix stream socket",
            ));
        }
        Ok(WakeSocket { fd })
    }

    /// Makes this end ring-only: the other side's sends toward it fail instead of piling up
    /// bytes nobody reads. For channels where only this side rings (shuntd waking an app).
    pub fn stop_receiving(&self) -> io::Result<()> {
        shutdown(&self.fd, Shutdown::Read)?;
        Ok(())
    }

    /// Wakes the other side. Never blocks.
    pub fn ring(&self) -> Result<Rung, WakeError> {
        loop {
            match send(
                &self.fd,
                &RING_BYTE,
                SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
            ) {
                Ok(_) => return Ok(Rung::Sent),
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return Ok(Rung::AlreadyPending),
                Err(Errno::PIPE | Errno::CONNRESET | Errno::NOTCONN) => {
                    return Err(WakeError::PeerGone);
                }
                Err(e) => return Err(WakeError::Io(e.into())),
            }
        }
    }

    /// Reads every pending ring. Never blocks.
    ///
    /// A short read ends the drain without another system call to look for end-of-file: a
    /// closed end stays readable (and reports `EPOLLRDHUP`), so the next drain says
    /// [`Drained::PeerGone`]. At most [`DRAIN_READS`] reads are made; whatever is left stays
    /// readable.
    pub fn drain(&self) -> io::Result<Drained> {
        let mut buf = [0u8; DRAIN_CHUNK];
        let mut rings = 0u64;
        for _ in 0..DRAIN_READS {
            match recv(&self.fd, &mut buf, RecvFlags::DONTWAIT) {
                Ok((_, 0)) => return Ok(Drained::PeerGone(rings)),
                Ok((_, n)) => {
                    rings += n as u64;
                    if n < DRAIN_CHUNK {
                        return Ok(Drained::Open(rings));
                    }
                }
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return Ok(Drained::Open(rings)),
                Err(Errno::CONNRESET) => return Ok(Drained::PeerGone(rings)),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Drained::Open(rings))
    }

    /// Waits until a ring is pending or the other end closed, or `timeout` passes; see
    /// [`crate::doorbell::wait_readable`].
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<bool> {
        crate::doorbell::wait_readable(self.fd.as_fd(), timeout)
    }
}

impl AsFd for WakeSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for WakeSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<WakeSocket> for OwnedFd {
    fn from(w: WakeSocket) -> OwnedFd {
        w.fd
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use rustix::fs::{OFlags, fcntl_getfl, fcntl_setfl};

    #[test]
    #[cfg_attr(miri, ignore = "socket syscalls")]
    fn rings_are_read_in_one_drain() {
        let (a, b) = WakeSocket::pair().unwrap();
        assert_eq!(b.drain().unwrap(), Drained::Open(0));
        assert!(!b.wait(Some(Duration::ZERO)).unwrap());
        for _ in 0..3 {
            assert_eq!(a.ring().unwrap(), Rung::Sent);
        }
        assert!(b.wait(Some(Duration::ZERO)).unwrap());
        assert_eq!(b.drain().unwrap(), Drained::Open(3));
        assert!(!b.wait(Some(Duration::ZERO)).unwrap());
        // Both ways.
        b.ring().unwrap();
        assert_eq!(a.drain().unwrap(), Drained::Open(1));
    }

    #[test]
    #[cfg_attr(miri, ignore = "socket syscalls")]
    fn a_peer_that_never_drains_cannot_make_a_ring_block() {
        // The attack that breaks eventfds: the receiver makes its end blocking and never reads.
        // Each side's end is its own description, and every send is MSG_DONTWAIT besides.
        let (ringer, victim_of_nothing) = WakeSocket::pair().unwrap();
        let fl = fcntl_getfl(&victim_of_nothing).unwrap();
        fcntl_setfl(&victim_of_nothing, fl - OFlags::NONBLOCK).unwrap();
        // Even the ringer's own description made blocking (a fork shares it) does not block.
        let fl = fcntl_getfl(&ringer).unwrap();
        fcntl_setfl(&ringer, fl - OFlags::NONBLOCK).unwrap();
        let mut pending = 0;
        for _ in 0..1_000_000 {
            match ringer.ring().unwrap() {
                Rung::Sent => {}
                Rung::AlreadyPending => {
                    pending += 1;
                    break;
                }
            }
        }
        assert_eq!(pending, 1, "the buffer fills and rings report pending");
        assert_eq!(ringer.ring().unwrap(), Rung::AlreadyPending);
        // The receiver is readable all along, and draining (non-blocking per call) empties it.
        assert!(victim_of_nothing.wait(Some(Duration::ZERO)).unwrap());
        while victim_of_nothing.drain().unwrap() != Drained::Open(0) {}
        assert_eq!(ringer.ring().unwrap(), Rung::Sent);
    }

    #[test]
    #[cfg_attr(miri, ignore = "socket syscalls")]
    fn a_drain_takes_a_bounded_share_of_a_flood_and_leaves_the_rest_readable() {
        let (flooder, victim) = WakeSocket::pair().unwrap();
        let flood = vec![0u8; 64 << 10];
        rustix::net::send(&flooder, &flood, rustix::net::SendFlags::DONTWAIT).unwrap();
        assert_eq!(
            victim.drain().unwrap(),
            Drained::Open((DRAIN_READS * DRAIN_CHUNK) as u64)
        );
        assert!(
            victim.wait(Some(Duration::ZERO)).unwrap(),
            "the rest is still there"
        );
    }

    #[test]
    #[cfg_attr(miri, ignore = "socket syscalls")]
    fn a_closed_end_reads_as_gone_and_refuses_rings() {
        let (a, b) = WakeSocket::pair().unwrap();
        a.ring().unwrap();
        drop(a);
        assert!(b.wait(Some(Duration::ZERO)).unwrap());
        assert_eq!(b.drain().unwrap(), Drained::Open(1));
        assert!(
            b.wait(Some(Duration::ZERO)).unwrap(),
            "end-of-file keeps it readable"
        );
        assert_eq!(b.drain().unwrap(), Drained::PeerGone(0));
        assert!(matches!(b.ring(), Err(WakeError::PeerGone)));
    }

    #[test]
    #[cfg_attr(miri, ignore = "socket syscalls")]
    fn a_ring_only_end_refuses_what_the_other_side_sends() {
        let (daemon, app) = WakeSocket::pair().unwrap();
        daemon.stop_receiving().unwrap();
        assert!(matches!(app.ring(), Err(WakeError::PeerGone)));
        daemon.ring().unwrap();
        assert_eq!(app.drain().unwrap(), Drained::Open(1));
    }

    #[test]
    #[cfg_attr(miri, ignore = "socket syscalls")]
    fn only_unix_stream_sockets_are_accepted() {
        let (r, _w) = rustix::pipe::pipe().unwrap();
        assert_eq!(
            WakeSocket::from_fd(r).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        let (s, _t) = crate::fdpass::seqpacket_pair().unwrap();
        assert!(WakeSocket::from_fd(s).is_err());
        let (a, _b) = WakeSocket::pair().unwrap();
        assert!(WakeSocket::from_fd(OwnedFd::from(a)).is_ok());
    }
}
