//! Attached apps and their workers, as shuntd sees them.

use std::fmt;
use std::sync::Arc;

use shunt_sapi::message::Scope;

use crate::limits::Owner;
use crate::link::WorkerLink;

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

pub struct AppRecord {
    pub id: AppId,
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub cred: PeerCred,
    pub(crate) token: [u8; 32],
    pub workers: Vec<WorkerId>,
    /// Whose allowance the app's resources come out of: its user's and its namespace's.
    pub(crate) owner: Owner,
}

impl AppRecord {
    pub fn owner(&self) -> Owner {
        self.owner.clone()
    }
}

pub struct WorkerRecord {
    pub id: WorkerId,
    pub app: AppId,
    /// The shuntd worker thread this app worker, and the sessions it owns, are pinned to.
    pub thread: usize,
    pub link: Arc<dyn WorkerLink>,
    pub listeners: Vec<ListenerId>,
}
