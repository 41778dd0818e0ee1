//! Wake-up channels between processes that do not trust each other.
//!
//! # Why not an eventfd
//!
//! An eventfd is a single open file description: whoever holds it, writer or reader, shares its
//! flags and its counter. Any holder can clear `O_NONBLOCK` with `fcntl` and write
//! `0xffff_ffff_ffff_fffe` into it, after which every `write` on it, by anyone, sleeps in the
//! kernel until somebody reads; and a holder that drains it between another's `poll` and `read`
//! makes that `read` sleep. Handing a peer one's eventfd, or ringing the peer's, therefore hands
//! the peer a way to freeze the ringer. Linux has no per-call non-blocking `write` on an eventfd,
//! so no care on the ringer's side can close that hole.
//!
//! # What instead
//!
//! A pipe per direction, whose every end is a description exactly one process holds:
//!
//! * **The sender alone holds the write end** ([`WakeSender`]), non-blocking. Nobody else can
//!   change its flags, so a ring never sleeps; a full pipe means wake-ups are pending at the
//!   receiver, so `EAGAIN` counts as a ring.
//! * **The receiver alone holds the read end** ([`WakeReceiver`]), non-blocking, so its drain
//!   never sleeps either.
//! * **The sender also holds a read description of its own pipe** (an *anchor*, opened anew
//!   through `/proc/self/fd`, so it shares no flags with the receiver's). While it is open the
//!   pipe always has a reader: a sender whose receiver died gets a full pipe, never `EPIPE` and
//!   the `SIGPIPE` that would kill an app that does not ignore it.
//! * **No ring goes unseen.** A receiver that polls its end level-triggered reads the pending
//!   bytes ([`WakeReceiver::drain`]) *before* it looks at the shared memory they announce, so a
//!   ring that arrives while it looks keeps the end readable for the next wait. Where every
//!   write to a pipe is an edge, a receiver polls edge-triggered and reads only now and then
//!   ([`polling`]).
//! * **The channel carries liveness.** When the sender's process dies its write end closes, and
//!   the receiver's end reads end-of-file (`EPOLLHUP`).
//!
//! A ring costs one `write` of one byte to a pipe. (A Unix socketpair would also do, with
//! `MSG_DONTWAIT` per call, but each send allocates a buffer: a ping-pong between two processes
//! measured a quarter slower.)
//!
//! # What a holder can still do
//!
//! What a hostile holder can still do: the receiver can fill the sender's pipe (through a write
//! description of its own) or shrink it, which only makes the sender's rings report pending;
//! the sender can read its own pipe through its anchor, which only loses its own wake-ups.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;
use rustix::pipe::{PipeFlags, pipe_with};

pub mod polling;

/// The byte a ring writes. Its value carries nothing: any byte is a ring.
const RING_BYTE: [u8; 1] = [1];
/// Bytes read per `read` while draining.
const DRAIN_CHUNK: usize = 1024;
/// Reads per drain. A well-behaved sender has rung a few times at most; one that keeps writing
/// must not keep the receiver here. What is left keeps the end readable, so the receiver's next
/// wait returns at once and drains again.
const DRAIN_READS: usize = 16;

/// What a ring did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rung {
    /// The byte was written: the receiver is readable now.
    Sent,
    /// The pipe is full of rings the receiver has not read: it is readable already.
    AlreadyPending,
}

/// What draining found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// The sender is still there; this many rings were pending (0: none).
    Open(u64),
    /// The sender's end closed (its process died or closed it), after this many rings.
    PeerGone(u64),
}

#[derive(Debug, thiserror::Error)]
pub enum WakeError {
    /// Nobody reads the channel any more (a sender without an anchor whose receiver closed).
    #[error("the other end of the wake-up channel is closed")]
    PeerGone,
    #[error("wake-up channel: {0}")]
    Io(#[from] io::Error),
}

/// The sending half of a wake-up channel (see the module docs).
#[derive(Debug)]
pub struct WakeSender {
    write: OwnedFd,
    /// A read description of the same pipe that only the sender holds.
    anchor: Option<OwnedFd>,
}

/// The receiving half of a wake-up channel (see the module docs).
#[derive(Debug)]
pub struct WakeReceiver {
    read: OwnedFd,
}

/// A new channel: the pipe's ends, non-blocking and close-on-exec, and the sender's anchor.
pub fn channel() -> io::Result<(WakeSender, WakeReceiver)> {
    let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
    let anchor = reopen_for_reading(read.as_fd())?;
    Ok((
        WakeSender {
            write,
            anchor: Some(anchor),
        },
        WakeReceiver { read },
    ))
}

/// A new open file description of pipe end `fd`, for reading: not a duplicate, so it shares no
/// flags with the original.
fn reopen_for_reading(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    Ok(rustix::fs::open(
        path.as_str(),
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Checks that `fd` is a pipe and makes this description non-blocking. The caller must be its
/// only holder: its flags are then the caller's alone.
fn own_pipe_end(fd: &OwnedFd) -> io::Result<()> {
    let stat = rustix::fs::fstat(fd)?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::Fifo {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a wake-up channel end is a pipe",
        ));
    }
    let flags = rustix::fs::fcntl_getfl(fd)?;
    rustix::fs::fcntl_setfl(fd, flags | OFlags::NONBLOCK)?;
    Ok(())
}

impl WakeSender {
    /// Wraps a write end and its anchor received from whoever made the channel.
    pub fn from_fds(write: OwnedFd, anchor: OwnedFd) -> io::Result<WakeSender> {
        own_pipe_end(&write)?;
        own_pipe_end(&anchor)?;
        Ok(WakeSender {
            write,
            anchor: Some(anchor),
        })
    }

    /// The write end and the anchor, to hand to the side that will ring.
    pub fn fds(&self) -> [BorrowedFd<'_>; 2] {
        let anchor = self.anchor.as_ref().unwrap_or(&self.write);
        [self.write.as_fd(), anchor.as_fd()]
    }

    /// Gives up the anchor: for a sender that ignores `SIGPIPE` and wants to hear `PeerGone`
    /// when its receiver closes.
    pub fn without_anchor(mut self) -> WakeSender {
        self.anchor = None;
        self
    }

    /// Wakes the receiver. Never blocks.
    pub fn ring(&self) -> Result<Rung, WakeError> {
        loop {
            match rustix::io::write(&self.write, &RING_BYTE) {
                Ok(_) => return Ok(Rung::Sent),
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return Ok(Rung::AlreadyPending),
                Err(Errno::PIPE) => return Err(WakeError::PeerGone),
                Err(e) => return Err(WakeError::Io(e.into())),
            }
        }
    }
}

impl WakeReceiver {
    /// Wraps a read end received from whoever made the channel.
    pub fn from_fd(read: OwnedFd) -> io::Result<WakeReceiver> {
        own_pipe_end(&read)?;
        Ok(WakeReceiver { read })
    }

    /// Reads pending rings. Never blocks.
    ///
    /// A short read ends the drain without another system call to look for end-of-file: a
    /// closed sender leaves the end readable (`EPOLLHUP`), so the next drain says
    /// [`Drained::PeerGone`]. At most [`DRAIN_READS`] reads are made; whatever is left stays
    /// readable.
    pub fn drain(&self) -> io::Result<Drained> {
        self.drain_at_most(DRAIN_READS * DRAIN_CHUNK)
    }

    /// Like [`WakeReceiver::drain`], reading up to about `max_bytes`.
    pub fn drain_at_most(&self, max_bytes: usize) -> io::Result<Drained> {
        let mut buf = [0u8; DRAIN_CHUNK];
        let mut rings = 0u64;
        for _ in 0..max_bytes.div_ceil(DRAIN_CHUNK).max(1) {
            match rustix::io::read(&self.read, &mut buf) {
                Ok(0) => return Ok(Drained::PeerGone(rings)),
                Ok(n) => {
                    rings += n as u64;
                    if n < DRAIN_CHUNK {
                        return Ok(Drained::Open(rings));
                    }
                }
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return Ok(Drained::Open(rings)),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Drained::Open(rings))
    }

    /// Waits until a ring is pending or the sender closed, or `timeout` passes; see
    /// [`crate::doorbell::wait_readable`].
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<bool> {
        crate::doorbell::wait_readable(self.read.as_fd(), timeout)
    }
}

impl AsFd for WakeReceiver {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }
}

impl AsRawFd for WakeReceiver {
    fn as_raw_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }
}

impl From<WakeReceiver> for OwnedFd {
    fn from(w: WakeReceiver) -> OwnedFd {
        w.read
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use rustix::fs::{fcntl_getfl, fcntl_setfl};

    #[test]
    #[cfg_attr(miri, ignore = "pipe syscalls")]
    fn rings_are_read_in_one_drain() {
        let (tx, rx) = channel().unwrap();
        assert_eq!(rx.drain().unwrap(), Drained::Open(0));
        assert!(!rx.wait(Some(Duration::ZERO)).unwrap());
        for _ in 0..3 {
            assert_eq!(tx.ring().unwrap(), Rung::Sent);
        }
        assert!(rx.wait(Some(Duration::ZERO)).unwrap());
        assert_eq!(rx.drain().unwrap(), Drained::Open(3));
        assert!(!rx.wait(Some(Duration::ZERO)).unwrap());
    }

    #[test]
    #[cfg_attr(miri, ignore = "pipe syscalls")]
    fn nothing_the_receiver_does_makes_a_ring_block() {
        // The attacks that break eventfds: the receiver makes every description it can reach
        // blocking, fills the pipe through a write description of its own, and never reads.
        let (tx, rx) = channel().unwrap();
        let fl = fcntl_getfl(&rx).unwrap();
        fcntl_setfl(&rx, fl - OFlags::NONBLOCK).unwrap();
        let path = format!("/proc/self/fd/{}", rx.as_raw_fd());
        let filler = rustix::fs::open(
            path.as_str(),
            OFlags::WRONLY | OFlags::NONBLOCK,
            Mode::empty(),
        )
        .unwrap();
        let junk = [0u8; 4096];
        while rustix::io::write(&filler, &junk).is_ok() {}
        fcntl_setfl(&filler, OFlags::WRONLY).unwrap();
        // The sender's own description is untouched: the ring returns, as pending.
        assert_eq!(tx.ring().unwrap(), Rung::AlreadyPending);
        // And its anchor is its own too: the receiver's blocking flag did not reach it.
        let anchor_flags = fcntl_getfl(tx.anchor.as_ref().unwrap()).unwrap();
        assert!(anchor_flags.contains(OFlags::NONBLOCK));
    }

    #[test]
    #[cfg_attr(miri, ignore = "pipe syscalls")]
    fn a_receiver_that_leaves_costs_its_sender_no_sigpipe() {
        let (tx, rx) = channel().unwrap();
        drop(rx);
        // The anchor keeps a reader: the pipe fills, and rings say pending.
        assert_eq!(tx.ring().unwrap(), Rung::Sent);
        let (tx, rx) = channel().unwrap();
        let tx = tx.without_anchor();
        drop(rx);
        assert!(matches!(tx.ring(), Err(WakeError::PeerGone)));
    }

    #[test]
    #[cfg_attr(miri, ignore = "pipe syscalls")]
    fn a_sender_that_leaves_reads_as_gone() {
        let (tx, rx) = channel().unwrap();
        tx.ring().unwrap();
        drop(tx);
        assert!(rx.wait(Some(Duration::ZERO)).unwrap());
        assert_eq!(rx.drain().unwrap(), Drained::Open(1));
        assert!(
            rx.wait(Some(Duration::ZERO)).unwrap(),
            "end-of-file keeps it readable"
        );
        assert_eq!(rx.drain().unwrap(), Drained::PeerGone(0));
    }

    #[test]
    #[cfg_attr(miri, ignore = "pipe syscalls")]
    fn a_drain_takes_a_bounded_share_of_a_flood_and_leaves_the_rest_readable() {
        let (tx, rx) = channel().unwrap();
        let flood = vec![0u8; 32 << 10];
        rustix::io::write(&tx.write, &flood).unwrap();
        assert_eq!(
            rx.drain().unwrap(),
            Drained::Open((DRAIN_READS * DRAIN_CHUNK) as u64)
        );
        assert!(
            rx.wait(Some(Duration::ZERO)).unwrap(),
            "the rest is still there"
        );
    }

    #[test]
    #[cfg_attr(miri, ignore = "pipe syscalls")]
    fn only_pipes_are_accepted_and_made_non_blocking() {
        let (s, _t) = crate::fdpass::seqpacket_pair().unwrap();
        assert_eq!(
            WakeReceiver::from_fd(s).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        let (r, w) = rustix::pipe::pipe().unwrap();
        let rx = WakeReceiver::from_fd(r).unwrap();
        assert!(fcntl_getfl(&rx).unwrap().contains(OFlags::NONBLOCK));
        let anchor = reopen_for_reading(rx.as_fd()).unwrap();
        let tx = WakeSender::from_fds(w, anchor).unwrap();
        tx.ring().unwrap();
        assert_eq!(rx.drain().unwrap(), Drained::Open(1));
    }
}
