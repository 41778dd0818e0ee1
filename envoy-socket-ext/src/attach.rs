//! One shuntd attachment per Envoy worker thread and configuration.
//!
//! Envoy runs every hook of a connection on that connection's worker thread, and the client
//! library needs neither threads nor a runtime, so each worker thread attaches on its own: no
//! locks on the data path, and no thread of ours inside Envoy.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use shunt_client::{AttachOptions, Scope, Worker};

use crate::config::SocketConfig;

/// After a failed attach, new connections skip shuntd for this long instead of each paying
/// for a connect that is likely to fail again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Slot {
    worker: Option<Worker>,
    failed_at: Option<Instant>,
}

thread_local! {
    static WORKERS: RefCell<HashMap<(PathBuf, String), Slot>> = RefCell::new(HashMap::new());
}

/// This thread's worker for `config`'s shuntd and namespace, attaching if needed. `None` means
/// shuntd is unreachable or refused us; the caller falls back.
pub fn worker_for(config: &SocketConfig) -> Option<Worker> {
    let key = (config.shuntd_socket.clone(), config.namespace.id.clone());
    WORKERS.with(|workers| {
        let mut workers = workers.borrow_mut();
        let slot = workers.entry(key).or_default();
        if let Some(w) = &slot.worker {
            return Some(w.clone());
        }
        if slot.failed_at.is_some_and(|t| t.elapsed() < RETRY_AFTER) {
            return None;
        }
        let options = AttachOptions::new(&config.shuntd_socket)
            .namespace(&config.namespace.id, config.namespace.secret.as_bytes())
            .app_name("envoy")
            .scope(Scope::Global);
        match Worker::attach(options) {
            Ok(w) => {
                slot.worker = Some(w.clone());
                slot.failed_at = None;
                Some(w)
            }
            Err(_) => {
                slot.failed_at = Some(Instant::now());
                None
            }
        }
    })
}

/// Drops this thread's worker for `config` after shuntd failed it (shuntd restarted or died),
/// so that the next connection attaches afresh instead of reusing a dead attachment.
pub fn forget(config: &SocketConfig) {
    let key = (config.shuntd_socket.clone(), config.namespace.id.clone());
    WORKERS.with(|workers| {
        if let Some(slot) = workers.borrow_mut().get_mut(&key) {
            slot.worker = None;
        }
    });
}
