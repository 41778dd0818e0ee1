//! Attached apps and their workers, as shuntd sees them.

use std::fmt;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use shunt_sapi::event::Event;
use shunt_sapi::message::Scope;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AppId(pub u64);

/// An app worker, unique for the life of this shuntd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerId(pub u64);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}", self.0)
    }
}

/// The attaching process, from SO_PEERCRED.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the worker's event queue is full")]
    QueueFull,
    #[error("the worker is gone")]
    Gone,
    #[error("i/o error talking to the worker: {0}")]
    Io(#[from] std::io::Error),
}

/// A segment handed to one side of a cut-through pair: the memfd, the peer worker's doorbell,
/// and this side's end of the pair's liveness socket.
#[derive(Debug)]
pub struct SegmentGrant {
    pub segment_id: u32,
    pub is_client: bool,
    pub segment: OwnedFd,
    pub peer_doorbell: OwnedFd,
    pub liveness: OwnedFd,
}

/// How the session layer reaches an app worker. shuntd implements it over the worker's socket
/// (fds) and its shared-memory event queue (events).
pub trait WorkerLink: Send + Sync {
    /// Sends fds the worker needs before it can use a session in that segment. Must be called
    /// before posting the event that refers to it.
    fn grant_segment(&self, grant: SegmentGrant) -> Result<(), LinkError>;
    /// Posts an event to the worker's event queue and rings its doorbell if the queue was empty.
    fn post(&self, event: &Event) -> Result<(), LinkError>;
    /// Posts an event the worker needs only at its next dispatch, without waking it. The next
    /// [`WorkerLink::post`] rings the doorbell if this one would have, so a worker asleep on a
    /// queue that holds only quiet events is still woken by the next loud one.
    fn post_quietly(&self, event: &Event) -> Result<(), LinkError>;
    /// Whether the event queue has room for `n` more events.
    fn has_room(&self, n: usize) -> bool;
}

pub struct AppRecord {
    pub id: AppId,
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub cred: PeerCred,
    pub(crate) token: [u8; 32],
    pub workers: Vec<WorkerId>,
}

pub struct WorkerRecord {
    pub id: WorkerId,
    pub app: AppId,
    /// The shuntd worker thread this app worker, and the sessions it owns, are pinned to.
    pub thread: usize,
    pub link: Arc<dyn WorkerLink>,
    pub doorbell: Arc<OwnedFd>,
    pub listeners: Vec<ListenerId>,
}
