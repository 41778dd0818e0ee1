//! How the session layer reaches one attached app worker: fds over its socket, events through
//! its shared-memory event queue, and a wake-up through its wake-up pipe.
//!
//! Whatever the layer hands over is queued here, under the layer's registry lock, and delivered
//! by [`DaemonLink::flush`] once that lock is free (see `shunt_session::link`). Delivering
//! never blocks:
//!
//! * grants go out with `MSG_DONTWAIT` on shuntd's own end of the app's socket. When the app
//!   has let its socket fill up, the grant and everything queued after it wait, in order,
//!   until the app reads; the app's connection task is told ([`DaemonLink::stalled`]) and
//!   flushes again once the socket is writable. Nothing is lost and nobody else waits;
//! * events are memory writes into the app's event queue; the room they need was counted when
//!   they were queued ([`WorkerLink::has_room`]), so they always fit;
//! * the wake-up is one write to a pipe whose write end only shuntd holds, non-blocking, and
//!   whose read end the app holds. The app cannot make that write block: it does not hold
//!   shuntd's description, and a full pipe means a wake-up is pending anyway.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use shunt_sapi::event::Event;
use shunt_sapi::layout;
use shunt_sapi::message::DaemonReply;
use shunt_session::link::{LinkError, SegmentGrant, WorkerLink};
use shunt_shm::fdpass;
use shunt_shm::ring::{self, RECORD_LEN, RingProducer, Wake};
use shunt_shm::segment::Segment;
use shunt_shm::wake::{self, WakeReceiver, WakeSender};

use crate::app_server::ServerCounters;

pub struct DaemonLink {
    /// A duplicate of shuntd's end of the app's connection.
    socket: OwnedFd,
    /// The write end of the app's wake-up pipe.
    wake: WakeSender,
    queue_len: u32,
    segment: Arc<Segment>,
    outbox: Mutex<Outbox>,
    /// Told when a grant waits for the app to read its socket.
    stalled: tokio::sync::Notify,
    counters: Arc<ServerCounters>,
}

enum Outgoing {
    Grant(SegmentGrant),
    Event {
        record: [u8; RECORD_LEN],
        /// Whether the app must be woken for it (see `WorkerLink::post_quietly`).
        loud: bool,
    },
}

struct Outbox {
    producer: RingProducer,
    items: VecDeque<Outgoing>,
    /// Events in `items`, which the event queue must have room for.
    queued_events: usize,
    /// A quiet event found the queue empty and did not wake the app: it may be asleep on it.
    wake_owed: bool,
    /// Someone is delivering; others only queue.
    flushing: bool,
    /// The first item is a grant the app's full socket refused.
    stalled: bool,
    /// The app's socket or queue failed for good; it is detaching.
    gone: bool,
}

impl Outbox {
    fn room(&self) -> usize {
        (self.producer.free_slots() as usize).saturating_sub(self.queued_events)
    }
}

impl DaemonLink {
    /// Makes the worker's event queue and wake-up pipe. `socket` is a duplicate of the worker's
    /// connection. Returns the link and the pipe's read end, for the app.
    pub fn new(
        socket: OwnedFd,
        queue_len: u32,
        name: &str,
        counters: Arc<ServerCounters>,
    ) -> anyhow::Result<(Self, WakeReceiver)> {
        let segment = Arc::new(Segment::create(
            name,
            layout::event_queue_segment_len(queue_len),
        )?);
        let offset = layout::event_queue_offset();
        ring::init_ring(segment.region(), offset, queue_len)?;
        let producer = RingProducer::attach(segment.clone(), offset)?;
        // shuntd ignores SIGPIPE, so it needs no anchor: an app that closed its end is `PeerGone`.
        let (wake, app_end) = wake::channel()?;
        let wake = wake.without_anchor();
        let link = Self {
            socket,
            wake,
            queue_len,
            segment,
            outbox: Mutex::new(Outbox {
                producer,
                items: VecDeque::new(),
                queued_events: 0,
                wake_owed: false,
                flushing: false,
                stalled: false,
                gone: false,
            }),
            stalled: tokio::sync::Notify::new(),
            counters,
        };
        Ok((link, app_end))
    }

    pub fn segment(&self) -> &Arc<Segment> {
        &self.segment
    }

    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until a grant is stalled on the app's full socket.
    pub async fn stalled(&self) {
        self.stalled.notified().await;
    }

    /// Whether a grant still waits for the app to read its socket.
    pub fn is_stalled(&self) -> bool {
        self.outbox().stalled
    }

    fn queue_event(&self, event: &Event, loud: bool) -> Result<(), LinkError> {
        let mut ob = self.outbox();
        if ob.gone {
            return Err(LinkError::Gone);
        }
        if ob.room() == 0 {
            return Err(LinkError::QueueFull);
        }
        ob.items.push_back(Outgoing::Event {
            record: event.encode(),
            loud,
        });
        ob.queued_events += 1;
        Ok(())
    }

    /// Sends one grant; `false` if the socket is full.
    fn send_grant(&self, grant: &SegmentGrant) -> std::io::Result<bool> {
        let msg = DaemonReply::SegmentAdded {
            segment_id: grant.segment_id,
            is_client: grant.is_client,
        }
        .encode(0);
        let [write, anchor] = grant.sender.fds();
        let fds = [grant.segment.as_fd(), write, anchor, grant.receiver.as_fd()];
        match fdpass::try_send_with_fds(self.socket.as_fd(), &msg, &fds) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl WorkerLink for DaemonLink {
    fn grant_segment(&self, grant: SegmentGrant) -> Result<(), LinkError> {
        let mut ob = self.outbox();
        if ob.gone {
            return Err(LinkError::Gone);
        }
        ob.items.push_back(Outgoing::Grant(grant));
        Ok(())
    }

    fn post(&self, event: &Event) -> Result<(), LinkError> {
        self.queue_event(event, true)
    }

    fn post_quietly(&self, event: &Event) -> Result<(), LinkError> {
        self.queue_event(event, false)
    }

    fn has_room(&self, n: usize) -> bool {
        self.outbox().room() >= n.min(self.queue_len as usize)
    }

    fn flush(&self) {
        let mut ob = self.outbox();
        if ob.flushing {
            // The thread delivering now takes whatever was queued before this call.
            return;
        }
        ob.flushing = true;
        let mut wake = false;
        while let Some(item) = ob.items.pop_front() {
            match item {
                Outgoing::Event { record, loud } => {
                    ob.queued_events -= 1;
                    match ob.producer.push(&record) {
                        Ok(Wake::Needed) if !loud => ob.wake_owed = true,
                        Ok(Wake::Needed) => wake = true,
                        Ok(Wake::NotNeeded) if loud && ob.wake_owed => wake = true,
                        Ok(Wake::NotNeeded) => {}
                        Err(e) => {
                            // Room was counted, so only an app that wrote into its own queue's
                            // header gets here. It has lost its queue.
                            tracing::warn!(error = %e, "app event queue unusable; dropping the app's events");
                            ob.gone = true;
                        }
                    }
                    if wake {
                        ob.wake_owed = false;
                    }
                }
                Outgoing::Grant(grant) => {
                    // The socket call happens without the outbox lock; `flushing` keeps the
                    // order, as only this thread delivers until it is done.
                    drop(ob);
                    let sent = self.send_grant(&grant);
                    ob = self.outbox();
                    match sent {
                        Ok(true) => ob.stalled = false,
                        Ok(false) => {
                            ob.items.push_front(Outgoing::Grant(grant));
                            if !ob.stalled {
                                ob.stalled = true;
                                self.counters.socket_full.fetch_add(1, Ordering::Relaxed);
                                self.stalled.notify_one();
                            }
                            break;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "cannot send a segment grant; the app is going");
                            ob.gone = true;
                        }
                    }
                }
            }
            if ob.gone {
                ob.items.clear();
                ob.queued_events = 0;
                break;
            }
        }
        ob.flushing = false;
        drop(ob);
        if wake {
            // Pending or sent, the app will look; a closed end means it is going.
            let _ = self.wake.ring();
        }
    }
}
