//! Caps on what apps may hold in shuntd, per user and per namespace.
//!
//! Every attached app, worker, listener, session and shared segment costs shuntd memory, file
//! descriptors or table space. One user, or one namespace, gets at most its cap of each, so a
//! hostile app exhausts its own allowance and nobody else's. The caps are charged to whoever
//! asks: a session to the app that connected (not to the listener it reached, so nobody can use
//! up a server's allowance by connecting to it), a segment to the connecting side of the pair
//! it serves, a resumed session to the app that reports it.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// Something an app holds in shuntd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Apps,
    Workers,
    Listeners,
    Sessions,
    /// Bytes of shared segments: what the memfds are sized to, not what is resident.
    SegmentBytes,
}

impl Resource {
    pub const ALL: [Resource; 5] = [
        Resource::Apps,
        Resource::Workers,
        Resource::Listeners,
        Resource::Sessions,
        Resource::SegmentBytes,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Apps => "apps",
            Resource::Workers => "workers",
            Resource::Listeners => "listeners",
            Resource::Sessions => "sessions",
            Resource::SegmentBytes => "segment_bytes",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whose allowance a cap is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Holder {
    Uid,
    Namespace,
}

impl Holder {
    pub fn as_str(self) -> &'static str {
        match self {
            Holder::Uid => "uid",
            Holder::Namespace => "namespace",
        }
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The most of each resource one holder may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub apps: u64,
    pub workers: u64,
    pub listeners: u64,
    pub sessions: u64,
    pub segment_bytes: u64,
}

impl Caps {
    /// Room for a busy node (every Istio sidecar runs as one user, 1337, so one user's caps
    /// are the whole mesh's on the node), yet within what shuntd's file descriptors allow:
    /// each worker costs shuntd four, each segment one.
    pub const DEFAULT: Caps = Caps {
        apps: 512,
        workers: 2048,
        listeners: 65_536,
        sessions: 1 << 20,
        // 8192 segments of the default 64 MiB.
        segment_bytes: 512 << 30,
    };

    pub fn get(&self, r: Resource) -> u64 {
        match r {
            Resource::Apps => self.apps,
            Resource::Workers => self.workers,
            Resource::Listeners => self.listeners,
            Resource::Sessions => self.sessions,
            Resource::SegmentBytes => self.segment_bytes,
        }
    }
}

impl Default for Caps {
    fn default() -> Self {
        Caps::DEFAULT
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub per_uid: Caps,
    pub per_namespace: Caps,
}

/// A charge refused: `holder` already has `cap` of `resource`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("limit of {cap} {resource} per {holder} reached ({holder} {who})")]
pub struct LimitExceeded {
    pub resource: Resource,
    pub holder: Holder,
    pub cap: u64,
    pub who: String,
}

/// Who a charge is made to: the user an app runs as, and the namespace it attached to. Cheap
/// to clone: every session keeps one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub namespace: Arc<str>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Usage([u64; Resource::ALL.len()]);

impl Usage {
    fn get(&self, r: Resource) -> u64 {
        self.0[r.index()]
    }

    fn add(&mut self, r: Resource, amount: u64) {
        self.0[r.index()] = self.0[r.index()].saturating_add(amount);
    }

    fn sub(&mut self, r: Resource, amount: u64) {
        self.0[r.index()] = self.0[r.index()].saturating_sub(amount);
    }
}

/// What every user and namespace holds, against their caps. Lives under the registry lock.
#[derive(Debug, Default)]
pub struct Ledger {
    limits: Limits,
    by_uid: HashMap<u32, Usage>,
    by_namespace: HashMap<Arc<str>, Usage>,
}

impl Ledger {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Ledger::default()
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Whether `owner` may take `amount` more of `resource`: the refusal if its user's or its
    /// namespace's cap would be passed.
    pub fn check(
        &self,
        owner: &Owner,
        resource: Resource,
        amount: u64,
    ) -> Result<(), LimitExceeded> {
        let used_uid = self.by_uid.get(&owner.uid).map_or(0, |u| u.get(resource));
        let cap = self.limits.per_uid.get(resource);
        if used_uid.saturating_add(amount) > cap {
            return Err(LimitExceeded {
                resource,
                holder: Holder::Uid,
                cap,
                who: owner.uid.to_string(),
            });
        }
        let used_ns = self
            .by_namespace
            .get(&*owner.namespace)
            .map_or(0, |u| u.get(resource));
        let cap = self.limits.per_namespace.get(resource);
        if used_ns.saturating_add(amount) > cap {
            return Err(LimitExceeded {
                resource,
                holder: Holder::Namespace,
                cap,
                who: owner.namespace.to_string(),
            });
        }
        Ok(())
    }

    /// Charges `amount` of `resource` to `owner`, or refuses without charging anything when
    /// either its user's or its namespace's cap would be passed.
    pub fn charge(
        &mut self,
        owner: &Owner,
        resource: Resource,
        amount: u64,
    ) -> Result<(), LimitExceeded> {
        self.check(owner, resource, amount)?;
        self.by_uid
            .entry(owner.uid)
            .or_default()
            .add(resource, amount);
        // The namespace's entry usually exists: look it up before making a key for it.
        match self.by_namespace.get_mut(&*owner.namespace) {
            Some(usage) => usage.add(resource, amount),
            None => {
                let mut usage = Usage::default();
                usage.add(resource, amount);
                self.by_namespace.insert(owner.namespace.clone(), usage);
            }
        }
        Ok(())
    }

    /// Gives back what [`Ledger::charge`] took. Entries stay when they reach zero: the same
    /// user comes back at its next connect, and users and namespaces are few.
    pub fn release(&mut self, owner: &Owner, resource: Resource, amount: u64) {
        if let Some(u) = self.by_uid.get_mut(&owner.uid) {
            u.sub(resource, amount);
        }
        if let Some(u) = self.by_namespace.get_mut(&*owner.namespace) {
            u.sub(resource, amount);
        }
    }

    /// Forgets a namespace that was deleted.
    pub fn forget_namespace(&mut self, id: &str) {
        self.by_namespace.remove(id);
    }

    /// What `uid` holds of `resource`.
    pub fn used_by_uid(&self, uid: u32, resource: Resource) -> u64 {
        self.by_uid.get(&uid).map_or(0, |u| u.get(resource))
    }

    /// What namespace `id` holds of `resource`.
    pub fn used_by_namespace(&self, id: &str, resource: Resource) -> u64 {
        self.by_namespace.get(id).map_or(0, |u| u.get(resource))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(uid: u32, ns: &str) -> Owner {
        Owner {
            uid,
            namespace: ns.into(),
        }
    }

    fn ledger() -> Ledger {
        Ledger::new(Limits {
            per_uid: Caps {
                sessions: 3,
                ..Caps::DEFAULT
            },
            per_namespace: Caps {
                sessions: 4,
                ..Caps::DEFAULT
            },
        })
    }

    #[test]
    fn a_user_is_refused_at_its_cap_and_others_are_not() {
        let mut l = ledger();
        let attacker = owner(1000, "default");
        for _ in 0..3 {
            l.charge(&attacker, Resource::Sessions, 1).unwrap();
        }
        let e = l.charge(&attacker, Resource::Sessions, 1).unwrap_err();
        assert_eq!((e.holder, e.cap, e.who.as_str()), (Holder::Uid, 3, "1000"));
        assert_eq!(
            l.used_by_uid(1000, Resource::Sessions),
            3,
            "a refusal charges nothing"
        );
        // Another user of the same namespace still has the namespace's last one.
        let other = owner(0, "default");
        l.charge(&other, Resource::Sessions, 1).unwrap();
        let e = l.charge(&other, Resource::Sessions, 1).unwrap_err();
        assert_eq!((e.holder, e.who.as_str()), (Holder::Namespace, "default"));
        // And the same user in another namespace is still held by its user cap.
        assert!(
            l.charge(&owner(1000, "blue"), Resource::Sessions, 1)
                .is_err()
        );
        assert!(l.check(&owner(7, "blue"), Resource::Sessions, 3).is_ok());
        assert!(l.check(&owner(7, "blue"), Resource::Sessions, 4).is_err());
    }

    #[test]
    fn releases_give_room_back_and_never_go_below_zero() {
        let mut l = ledger();
        let o = owner(5, "default");
        l.charge(&o, Resource::Sessions, 3).unwrap();
        l.charge(&o, Resource::SegmentBytes, 1 << 26).unwrap();
        assert!(l.charge(&o, Resource::Sessions, 1).is_err());
        l.release(&o, Resource::Sessions, 2);
        l.charge(&o, Resource::Sessions, 2).unwrap();
        l.release(&o, Resource::Sessions, 3);
        l.release(&o, Resource::SegmentBytes, 1 << 26);
        assert_eq!(l.used_by_uid(5, Resource::Sessions), 0);
        assert_eq!(l.used_by_uid(5, Resource::SegmentBytes), 0);
        l.forget_namespace("default");
        assert!(l.by_namespace.is_empty());
        // Releasing more than was charged cannot go below zero.
        l.release(&o, Resource::Sessions, 9);
        assert_eq!(l.used_by_namespace("default", Resource::Sessions), 0);
    }
}
