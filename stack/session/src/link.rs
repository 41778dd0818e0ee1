//! How the session layer reaches app workers, and the rule that keeps one app from stalling the
//! others: nothing that touches an app's file descriptors happens under the registry lock.
//!
//! Every connect, close and policy change runs under one registry lock, which every app needs.
//! A system call on a descriptor an app can reach (its socket, its wake-up pipe) could block
//! or fail slowly because of what that app did to it, and everybody would wait behind it. So a
//! [`WorkerLink`] only *queues* under the lock (grants and events, in order, in the link's own
//! memory), and [`Deliveries`] remembers which links it queued to; once the lock is released,
//! [`Deliveries::deliver`] has each link flush. Flushing never blocks either: a worker whose
//! socket is full keeps the rest of its queue until it reads.

use std::sync::Arc;

use shunt_sapi::event::Event;
use shunt_shm::segment::Segment;
use shunt_shm::wake::{WakeReceiver, WakeSender};

/// A segment handed to one side of a cut-through pair: the memfd, and this side's ends of the
/// pair's two wake-up channels (see `shunt_shm::wake`): it rings its peer through `sender`,
/// and is rung, and learns of its peer's death, on `receiver`.
#[derive(Debug)]
pub struct SegmentGrant {
    pub segment_id: u32,
    pub is_client: bool,
    /// shuntd's own mapping; its memfd is what travels.
    pub segment: Arc<Segment>,
    pub sender: WakeSender,
    pub receiver: WakeReceiver,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the worker's event queue is full")]
    QueueFull,
    #[error("the worker is gone")]
    Gone,
}

/// The session layer's way to an app worker. shuntd implements it over the worker's socket
/// (fds), its shared-memory event queue (events) and its wake-up pipe.
///
/// `grant_segment`, `post`, `post_quietly` and `has_room` are called under the registry lock:
/// they must only queue or look at memory, never make a system call. `flush` is called without
/// it.
pub trait WorkerLink: Send + Sync {
    /// Queues fds the worker needs before it can use a session in that segment; they reach it
    /// before any event queued after them.
    fn grant_segment(&self, grant: SegmentGrant) -> Result<(), LinkError>;
    /// Queues an event for the worker's event queue; it is woken when the event arrives if the
    /// queue was empty. `QueueFull` when the queue, counting what is already queued, has no room.
    fn post(&self, event: &Event) -> Result<(), LinkError>;
    /// Queues an event the worker needs only at its next dispatch, without waking it. The next
    /// [`WorkerLink::post`] wakes it if this one would have, so a worker asleep on a queue that
    /// holds only quiet events is still woken by the next loud one.
    fn post_quietly(&self, event: &Event) -> Result<(), LinkError>;
    /// Whether the event queue has room for `n` more events, counting those queued.
    fn has_room(&self, n: usize) -> bool;
    /// Delivers what is queued, in order. Never blocks.
    fn flush(&self);
}

/// The links something was queued to while the registry lock was held.
#[derive(Default)]
#[must_use = "queued deliveries reach nobody until delivered"]
pub struct Deliveries {
    links: Vec<Arc<dyn WorkerLink>>,
}

impl Deliveries {
    /// Remembers that `link` has something queued.
    pub fn note(&mut self, link: &Arc<dyn WorkerLink>) {
        if !self.links.iter().any(|l| Arc::ptr_eq(l, link)) {
            self.links.push(link.clone());
        }
    }

    /// Queues `event` to `link` and remembers it.
    pub fn post(&mut self, link: &Arc<dyn WorkerLink>, event: &Event) -> Result<(), LinkError> {
        self.note(link);
        link.post(event)
    }

    /// Queues `event` quietly (see [`WorkerLink::post_quietly`]) and remembers it.
    pub fn post_quietly(
        &mut self,
        link: &Arc<dyn WorkerLink>,
        event: &Event,
    ) -> Result<(), LinkError> {
        self.note(link);
        link.post_quietly(event)
    }

    /// Queues `grant` to `link` and remembers it.
    pub fn grant(
        &mut self,
        link: &Arc<dyn WorkerLink>,
        grant: SegmentGrant,
    ) -> Result<(), LinkError> {
        self.note(link);
        link.grant_segment(grant)
    }

    /// Flushes every link noted. Call with no lock held.
    pub fn deliver(self) {
        for link in self.links {
            link.flush();
        }
    }
}
