//! Registering owned file descriptors with tokio's reactor.
//!
//! tokio's safe `AsyncFd::new` is deprecated because an arbitrary `AsRawFd` type could hand it a
//! descriptor it does not own. An `OwnedFd` moved into the `AsyncFd` has no such problem, which
//! is the whole argument of the one unsafe block here.
#![allow(
    unsafe_code,
    reason = "tokio's fd registration is unsafe; see the safety comment"
)]

use std::io;
use std::os::fd::OwnedFd;

use tokio::io::unix::AsyncFd;

/// Moves `fd` into tokio's reactor for readiness notifications.
pub(crate) fn watch(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd takes ownership of `fd`, so the descriptor stays open and names the
    // same open file description until the AsyncFd is dropped or unwrapped, and
    // `OwnedFd::as_raw_fd` returns that same descriptor on every call.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}
