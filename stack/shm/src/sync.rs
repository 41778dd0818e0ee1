//! Atomics used for shared-memory headers.
//!
//! Under `cfg(loom)` the atomics and fences come from loom, so that the FIFO and ring protocols
//! can be model-checked; otherwise they are the standard library's. `Ordering` is the same type
//! in both worlds.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, fence};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, fence};

pub(crate) use std::sync::atomic::Ordering;
