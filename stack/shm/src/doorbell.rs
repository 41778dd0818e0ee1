//! Eventfd doorbells: how one process wakes another that sleeps in `poll`/`epoll`.
//!
//! # Why an eventfd, and why it never blocks
//!
//! The FIFO and ring protocols decide *whether* a wake-up is needed (`set_event`,
//! `take_tx_space_request`, [`crate::ring::Wake`]); the doorbell is only the transport. An eventfd
//! is a 64-bit counter in the kernel: [`Doorbell::ring`] adds 1, [`Doorbell::drain`] reads and
//! resets it, and the fd is readable while the counter is non-zero, so it plugs into any readiness
//! loop (tokio's `AsyncFd`, mio, plain `poll`). Many rings between two drains coalesce into one
//! wake-up, which is what we want.
//!
//! The fd is always non-blocking: a doorbell is rung from the data path, which must never sleep
//! in the kernel. The only way a non-blocking write can fail with `EAGAIN` is counter overflow
//! (the counter saturates at `u64::MAX - 1`), which only a peer that rings without ever draining
//! can cause. Like mio's eventfd waker, [`Doorbell::ring`] then drains the counter and retries:
//! the reader is woken either way because the write after the drain makes the fd readable again.
//!
//! Waiting is explicit and bounded with [`wait_readable`], so tests and daemons can fail instead
//! of hanging when a peer disappears.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec, eventfd, poll};
use rustix::io::Errno;

/// A non-blocking, close-on-exec eventfd used to wake a peer.
#[derive(Debug)]
pub struct Doorbell {
    fd: OwnedFd,
}

impl Doorbell {
    /// A new eventfd with counter 0, non-blocking and close-on-exec.
    pub fn new() -> io::Result<Doorbell> {
        let fd = eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)?;
        Ok(Doorbell { fd })
    }

    /// Wraps an eventfd received from a peer.
    ///
    /// Where `/proc/self/fd` is available, the descriptor must be an eventfd (`InvalidInput`
    /// otherwise); elsewhere it is accepted as is. `O_NONBLOCK` is set if missing, so that
    /// neither [`Doorbell::ring`] nor [`Doorbell::drain`] can block (this changes the shared file
    /// description, which the peer uses the same way).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Doorbell> {
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        if let Ok(target) = rustix::fs::readlink(path.as_str(), Vec::new())
            && target.as_bytes() != b"anon_inode:[eventfd]"
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("not an eventfd: {}", target.to_string_lossy()),
            ));
        }
        let flags = rustix::fs::fcntl_getfl(&fd)?;
        if !flags.contains(rustix::fs::OFlags::NONBLOCK) {
            rustix::fs::fcntl_setfl(&fd, flags | rustix::fs::OFlags::NONBLOCK)?;
        }
        Ok(Doorbell { fd })
    }

    /// Adds 1 to the counter, waking a reader. On counter overflow (`EAGAIN`) drains the counter
    /// and retries once; never blocks.
    pub fn ring(&self) -> io::Result<()> {
        let one = 1u64.to_ne_bytes();
        for _ in 0..2 {
            match retry_eintr(|| rustix::io::write(&self.fd, &one)) {
                Ok(8) => return Ok(()),
                Ok(n) => {
                    return Err(io::Error::other(format!(
                        "short eventfd write of {n} bytes"
                    )));
                }
                Err(Errno::AGAIN) => {
                    self.drain()?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(io::Error::from(io::ErrorKind::WouldBlock))
    }

    /// Reads and resets the counter; returns how many rings were pending (0 if none).
    pub fn drain(&self) -> io::Result<u64> {
        let mut buf = [0u8; 8];
        match retry_eintr(|| rustix::io::read(&self.fd, &mut buf)) {
            Ok(8) => Ok(u64::from_ne_bytes(buf)),
            Ok(n) => Err(io::Error::other(format!("short eventfd read of {n} bytes"))),
            Err(Errno::AGAIN) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Another handle to the same eventfd (close-on-exec).
    pub fn try_clone(&self) -> io::Result<Doorbell> {
        Ok(Doorbell {
            fd: self.fd.try_clone()?,
        })
    }

    /// Waits until the doorbell has been rung or `timeout` passes; see [`wait_readable`].
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<bool> {
        wait_readable(self.fd.as_fd(), timeout)
    }
}

fn retry_eintr<T>(mut f: impl FnMut() -> rustix::io::Result<T>) -> rustix::io::Result<T> {
    loop {
        match f() {
            Err(Errno::INTR) => continue,
            other => return other,
        }
    }
}

impl AsFd for Doorbell {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Doorbell {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl IntoRawFd for Doorbell {
    fn into_raw_fd(self) -> RawFd {
        self.fd.into_raw_fd()
    }
}

impl From<Doorbell> for OwnedFd {
    fn from(d: Doorbell) -> OwnedFd {
        d.fd
    }
}

/// Waits with `poll` until `fd` is readable (or reports hang-up/error, which also means a read
/// will not block), or until `timeout` passes (`None`: no limit).
///
/// Returns `Ok(true)` when ready, `Ok(false)` on timeout. `EINTR` is retried with the remaining
/// time. An invalid descriptor (`POLLNVAL`) is an error.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<bool> {
    wait_ready(fd, PollFlags::IN, timeout)
}

/// Like [`wait_readable`], until a write to `fd` will not block.
pub fn wait_writable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<bool> {
    wait_ready(fd, PollFlags::OUT, timeout)
}

fn wait_ready(fd: BorrowedFd<'_>, flags: PollFlags, timeout: Option<Duration>) -> io::Result<bool> {
    // `None` (no timeout, or one so large that the deadline overflows `Instant`) waits forever.
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    loop {
        let ts = deadline.map(|d| {
            let r = d.saturating_duration_since(Instant::now());
            Timespec {
                tv_sec: i64::try_from(r.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(r.subsec_nanos()),
            }
        });
        let mut fds = [PollFd::from_borrowed_fd(fd, flags)];
        match poll(&mut fds, ts.as_ref()) {
            Ok(0) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(false);
                }
                // Woke early (clock granularity): poll again for what is left.
            }
            Ok(_) => {
                let rev = fds[0].revents();
                if rev.contains(PollFlags::NVAL) {
                    return Err(Errno::BADF.into());
                }
                return Ok(!rev.is_empty());
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(miri, ignore = "eventfd syscalls")]
    fn ring_then_drain_counts() {
        let d = Doorbell::new().unwrap();
        assert_eq!(d.drain().unwrap(), 0);
        d.ring().unwrap();
        d.ring().unwrap();
        d.ring().unwrap();
        assert_eq!(d.drain().unwrap(), 3);
        assert_eq!(d.drain().unwrap(), 0);
    }

    #[test]
    #[cfg_attr(miri, ignore = "eventfd syscalls")]
    fn fd_is_nonblocking_and_cloexec() {
        let d = Doorbell::new().unwrap();
        let fl = rustix::fs::fcntl_getfl(&d).unwrap();
        assert!(fl.contains(rustix::fs::OFlags::NONBLOCK));
        let fdfl = rustix::io::fcntl_getfd(&d).unwrap();
        assert!(fdfl.contains(rustix::io::FdFlags::CLOEXEC));
    }

    #[test]
    #[cfg_attr(miri, ignore = "eventfd syscalls")]
    fn an_eventfd_is_writable_at_once() {
        let d = Doorbell::new().unwrap();
        assert!(wait_writable(d.as_fd(), Some(Duration::ZERO)).unwrap());
    }

    #[test]
    #[cfg_attr(miri, ignore = "eventfd syscalls")]
    fn wait_readable_times_out_then_sees_ring() {
        let d = Doorbell::new().unwrap();
        let start = Instant::now();
        assert!(!d.wait(Some(Duration::from_millis(20))).unwrap());
        assert!(start.elapsed() >= Duration::from_millis(20));
        assert!(!wait_readable(d.as_fd(), Some(Duration::ZERO)).unwrap());
        let clone = d.try_clone().unwrap();
        clone.ring().unwrap();
        assert!(wait_readable(d.as_fd(), Some(Duration::from_secs(5))).unwrap());
        assert!(wait_readable(d.as_fd(), None).unwrap());
        assert_eq!(d.drain().unwrap(), 1);
    }

    #[test]
    #[cfg_attr(miri, ignore = "eventfd syscalls")]
    fn ring_recovers_from_counter_overflow() {
        // Start the counter one below its maximum (u64::MAX - 1): the next ring would overflow.
        let d = Doorbell::new().unwrap();
        let almost = (u64::MAX - 1).to_ne_bytes();
        assert_eq!(rustix::io::write(&d, &almost).unwrap(), 8);
        assert_eq!(
            rustix::io::write(&d, &1u64.to_ne_bytes()),
            Err(Errno::AGAIN)
        );
        d.ring().unwrap();
        assert_eq!(d.drain().unwrap(), 1);
    }

    #[test]
    #[cfg_attr(miri, ignore = "eventfd syscalls")]
    fn from_fd_validates_and_sets_nonblocking() {
        let (r, _w) = rustix::pipe::pipe().unwrap();
        let err = Doorbell::from_fd(r).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);

        let blocking = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
        let d = Doorbell::from_fd(blocking).unwrap();
        let fl = rustix::fs::fcntl_getfl(&d).unwrap();
        assert!(fl.contains(rustix::fs::OFlags::NONBLOCK));
        // Draining an empty doorbell returns at once instead of blocking.
        assert_eq!(d.drain().unwrap(), 0);

        let d2 = Doorbell::from_fd(OwnedFd::from(d.try_clone().unwrap())).unwrap();
        d2.ring().unwrap();
        assert_eq!(d.drain().unwrap(), 1);
        let raw = d2.as_raw_fd();
        let owned = OwnedFd::from(d2);
        assert_eq!(owned.as_raw_fd(), raw);
    }

    #[test]
    #[cfg_attr(miri, ignore = "eventfd syscalls")]
    fn wait_readable_reports_hangup() {
        let (r, w) = rustix::pipe::pipe().unwrap();
        drop(w);
        assert!(wait_readable(r.as_fd(), Some(Duration::from_secs(5))).unwrap());
    }
}
