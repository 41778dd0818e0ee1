//! Kernel sockets that wait the way an adaptive cut-through worker does: try again without
//! sleeping for up to a budget, then block in poll(2). The adaptive mode compares like with like
//! only if the kernel baselines may poll too.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use shunt_shm::{wait_readable, wait_writable};

/// Tries between two yields of the core, so a peer sharing it gets to run.
const YIELD_INTERVAL: u32 = 64;

/// Polls `fd` with zero timeouts for up to `budget`, then blocks for the rest of `timeout`;
/// whether it became readable.
pub(crate) fn readable_polling(
    fd: BorrowedFd<'_>,
    budget: Duration,
    timeout: Duration,
) -> io::Result<bool> {
    let start = Instant::now();
    while start.elapsed() < budget.min(timeout) {
        if wait_readable(fd, Some(Duration::ZERO))? {
            return Ok(true);
        }
        std::thread::yield_now();
    }
    wait_readable(fd, Some(timeout.saturating_sub(start.elapsed())))
}

/// A connected kernel socket; with a non-zero `busy_poll` it is non-blocking and each read or
/// write spins on the system call for up to the budget before it sleeps in poll(2).
pub(crate) struct Polled<S> {
    pub(crate) inner: S,
    busy_poll: Duration,
}

/// How a spent spin sleeps: [`wait_readable`] or [`wait_writable`].
type Wait = fn(BorrowedFd<'_>, Option<Duration>) -> io::Result<bool>;

impl<S: AsFd> Polled<S> {
    pub(crate) fn new(inner: S, busy_poll: Duration) -> io::Result<Self> {
        if !busy_poll.is_zero() {
            // One system call, as the cut-through side pays none for this.
            rustix::io::ioctl_fionbio(inner.as_fd(), true)?;
        }
        Ok(Self { inner, busy_poll })
    }

    fn retry<T>(
        &mut self,
        wait: Wait,
        mut op: impl FnMut(&mut S) -> io::Result<T>,
    ) -> io::Result<T> {
        if self.busy_poll.is_zero() {
            return op(&mut self.inner);
        }
        let start = Instant::now();
        let mut tries = 0u32;
        loop {
            match op(&mut self.inner) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return other,
            }
            tries = tries.wrapping_add(1);
            if start.elapsed() < self.busy_poll {
                if tries.is_multiple_of(YIELD_INTERVAL) {
                    std::thread::yield_now();
                }
                continue;
            }
            wait(self.inner.as_fd(), None)?;
        }
    }
}

impl<S: Read + AsFd> Read for Polled<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.retry(wait_readable, |s| s.read(buf))
    }
}

impl<S: Write + AsFd> Write for Polled<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.retry(wait_writable, |s| s.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
