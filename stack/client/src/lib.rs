//! Shunt's client library.
//!
//! An app attaches a [`Worker`] to its node's `shuntd`, then listens, accepts and connects.
//! Sessions between co-located apps are *cut-through*: bytes move through a FIFO pair in shared
//! memory and peers wake each other through pipes, without `shuntd` or the kernel's TCP stack in
//! the path. Once established, a session keeps flowing even if `shuntd` restarts.
//!
//! The library starts no threads and needs no runtime. Everything happens in the caller's calls;
//! [`Worker::readiness_fd`] is an fd to put in the caller's own epoll (or Envoy's dispatcher),
//! after which the caller runs [`Worker::dispatch`]. With the `tokio` feature, [`tokio_io`] adds
//! `AsyncRead`/`AsyncWrite` sessions driven by the caller's runtime.

mod error;
mod peer;
mod session;
#[cfg(feature = "tokio")]
pub mod tokio_io;
mod worker;

pub use error::Error;
pub use session::{BUSY_POLL_DISPATCH_INTERVAL, Session, SessionInfo};
pub use shunt_sapi::message::Scope;
pub use worker::{AttachOptions, Listener, PendingConnect, Worker, WorkerStats};
