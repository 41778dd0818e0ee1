//! How the session layer reaches one attached app worker: fds over its socket, events through
//! its shared-memory event queue, and a ring of its eventfd doorbell.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};

use shunt_sapi::event::Event;
use shunt_sapi::layout;
use shunt_sapi::message::DaemonReply;
use shunt_session::app::{LinkError, SegmentGrant, WorkerLink};
use shunt_shm::doorbell::Doorbell;
use shunt_shm::fdpass;
use shunt_shm::ring::{self, RingProducer, Wake};
use shunt_shm::segment::Segment;

pub struct DaemonLink {
    socket: OwnedFd,
    queue: Mutex<Queue>,
    queue_len: u32,
    doorbell: Doorbell,
    segment: Arc<Segment>,
}

struct Queue {
    producer: RingProducer,
    /// A quiet post found the queue empty and did not ring: the worker may be asleep on it.
    ring_owed: bool,
}

impl Queue {
    fn push(&mut self, event: &Event) -> Result<Wake, LinkError> {
        self.producer.push(&event.encode()).map_err(|e| match e {
            ring::RingError::Full => LinkError::QueueFull,
            _ => LinkError::Gone,
        })
    }
}

impl DaemonLink {
    /// Makes the worker's event queue. `socket` is a duplicate of the worker's connection.
    pub fn new(
        socket: OwnedFd,
        doorbell: Doorbell,
        queue_len: u32,
        name: &str,
    ) -> anyhow::Result<Self> {
        let segment = Arc::new(Segment::create(
            name,
            layout::event_queue_segment_len(queue_len),
        )?);
        let offset = layout::event_queue_offset();
        ring::init_ring(segment.region(), offset, queue_len)?;
        let producer = RingProducer::attach(segment.clone(), offset)?;
        Ok(Self {
            socket,
            queue: Mutex::new(Queue {
                producer,
                ring_owed: false,
            }),
            queue_len,
            doorbell,
            segment,
        })
    }

    pub fn segment(&self) -> &Arc<Segment> {
        &self.segment
    }

    pub fn doorbell_fd(&self) -> std::io::Result<OwnedFd> {
        self.doorbell.as_fd().try_clone_to_owned()
    }
}

impl WorkerLink for DaemonLink {
    fn grant_segment(&self, grant: SegmentGrant) -> Result<(), LinkError> {
        let msg = DaemonReply::SegmentAdded {
            segment_id: grant.segment_id,
            is_client: grant.is_client,
        }
        .encode(0);
        let fds = [
            grant.segment.as_fd(),
            grant.peer_doorbell.as_fd(),
            grant.liveness.as_fd(),
        ];
        fdpass::send_with_fds(self.socket.as_fd(), &msg, &fds)?;
        Ok(())
    }

    fn post(&self, event: &Event) -> Result<(), LinkError> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let wake = q.push(event)?;
        if wake == Wake::Needed || q.ring_owed {
            q.ring_owed = false;
            self.doorbell.ring()?;
        }
        Ok(())
    }

    fn post_quietly(&self, event: &Event) -> Result<(), LinkError> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.push(event)? == Wake::Needed {
            q.ring_owed = true;
        }
        Ok(())
    }

    fn has_room(&self, n: usize) -> bool {
        let q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.producer.free_slots() as usize >= n.min(self.queue_len as usize)
    }
}
