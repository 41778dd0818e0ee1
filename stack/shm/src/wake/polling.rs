//! How a receiver polls its wake-up pipes, and when it reads them.
//!
//! Where the kernel reports an edge for every write to a polled pipe, even one that was not
//! empty (Linux 5.16 and later, and before 5.5; [`edge_per_write`] finds out once per process),
//! a receiver polls its ends edge-triggered and reads the rings only now and then, so that a
//! wake-up costs it no `read`. Elsewhere it polls them level-triggered and reads the rings at
//! every wake-up, before it looks at what they announce, so that a ring that comes while it
//! looks keeps the end readable for the next wait.
//!
//! # Reading before looking
//!
//! A receiver reads its end only right after a wait returned and before it looks at the
//! shared memory the rings announce ([`PolledReceiver::before_looking`]). A ring it reads then
//! was written after its record was pushed, so the look that follows finds the record. Reading
//! at any other time could swallow a ring whose record it will not look for until the next
//! wake-up: epoll polls the pipe again before it reports an edge, and drops the edge of a pipe
//! found empty.
//!
//! # Why unread rings never fill the pipe
//!
//! A sender that finds its pipe full skips the ring, and an edge-triggered receiver would never
//! hear of it. Edges do not bound the unread rings (one edge may stand for many writes), but
//! the records they announce do: a well-behaved sender rings only when it pushes a record into
//! a ring or queue it found empty ([`crate::ring::Wake::Needed`]), so before each ring but the
//! first the receiver took the record the previous ring announced. Rings written never exceed
//! one more than the records taken. An edge-triggered receiver that reads its end before it
//! next looks once it took [`READ_AFTER_RECORDS`] records ([`PolledReceiver::taken`]), up to
//! [`READ_AT_MOST`] bytes at a time, therefore never leaves more than a few thousand rings
//! unread in a pipe that holds 65,536.
//!
//! A sender that rings more than that fills only its own pipe and loses only its own wake-ups;
//! a read takes a bounded share of whatever it wrote.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::OnceLock;

use rustix::event::epoll;

use super::{Drained, RING_BYTE, WakeReceiver};

/// Set to `1` in the environment, makes [`edge_per_write`] say no, so receivers poll
/// level-triggered and read at every wake-up: the way kernels without an edge per write go,
/// which CI runs on kernels that have one.
pub const LEVEL_TRIGGERED_ENV: &str = "SHUNT_WAKE_LEVEL_TRIGGERED";

/// Records an edge-triggered receiver takes between two reads of its end (see the module docs).
pub const READ_AFTER_RECORDS: u32 = 2048;

/// Bytes a records-paced read takes at most: more than the rings [`READ_AFTER_RECORDS`] records
/// allow, so a well-behaved sender's rings never pile up across reads.
pub const READ_AT_MOST: usize = 4 * READ_AFTER_RECORDS as usize;

/// Whether this kernel reports an edge for every write to a polled pipe, even one that was not
/// empty, so that an edge-triggered receiver sees each ring without reading the last. Linux 5.5
/// to 5.15 reported only the write that made a pipe non-empty. Probed once per process.
pub fn edge_per_write() -> bool {
    static PROBED: OnceLock<bool> = OnceLock::new();
    *PROBED.get_or_init(|| {
        let forced_level = std::env::var_os(LEVEL_TRIGGERED_ENV).is_some_and(|v| v == "1");
        !forced_level && probe_edge_per_write().unwrap_or(false)
    })
}

fn probe_edge_per_write() -> io::Result<bool> {
    let (sender, receiver) = super::channel()?;
    let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    let edge_triggered = epoll::EventFlags::IN | epoll::EventFlags::ET;
    epoll::add(&ep, &receiver, epoll::EventData::new_u64(0), edge_triggered)?;
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let mut edges = 0;
    for _ in 0..2 {
        rustix::io::write(&sender.write, &RING_BYTE)?;
        let mut events = Vec::with_capacity(1);
        edges += epoll::wait(
            &ep,
            rustix::buffer::spare_capacity(&mut events),
            Some(&zero),
        )?;
    }
    Ok(edges == 2)
}

/// A wake-up pipe's read end as a receiver polls it: how to register it, and when to read it.
#[derive(Debug)]
pub struct PolledReceiver {
    receiver: WakeReceiver,
    edge_triggered: bool,
    /// Records taken since the end was last read (edge-triggered only).
    taken_since_read: u32,
}

/// Whether the wait that just returned reported the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polled {
    Reported,
    NotReported,
}

impl PolledReceiver {
    pub fn new(receiver: WakeReceiver) -> PolledReceiver {
        PolledReceiver {
            receiver,
            edge_triggered: edge_per_write(),
            taken_since_read: 0,
        }
    }

    /// What to poll the end for: readable, edge-triggered where every write is an edge. Either
    /// way a sender that is gone reports a hang-up.
    pub fn events(&self) -> epoll::EventFlags {
        if self.edge_triggered {
            epoll::EventFlags::IN | epoll::EventFlags::ET
        } else {
            epoll::EventFlags::IN
        }
    }

    /// To be called after a wait returned and before looking at what the end announces (see
    /// the module docs); reads the end when it must be read now and says what it found.
    /// Level-triggered, that is whenever the wait reported it; edge-triggered, once
    /// [`READ_AFTER_RECORDS`] records were taken since the last read.
    pub fn before_looking(&mut self, polled: Polled) -> Option<io::Result<Drained>> {
        if !self.edge_triggered {
            return (polled == Polled::Reported).then(|| self.receiver.drain());
        }
        if self.taken_since_read < READ_AFTER_RECORDS {
            return None;
        }
        self.taken_since_read = 0;
        Some(self.receiver.drain_at_most(READ_AT_MOST))
    }

    /// To be called with the number of records just taken from what the end announces.
    pub fn taken(&mut self, records: usize) {
        if self.edge_triggered {
            let records = u32::try_from(records).unwrap_or(u32::MAX);
            self.taken_since_read = self.taken_since_read.saturating_add(records);
        }
    }

    /// The end itself, for blocking waits outside a poll set.
    pub fn receiver(&self) -> &WakeReceiver {
        &self.receiver
    }
}

impl AsFd for PolledReceiver {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.receiver.as_fd()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::region::Region;
    use crate::ring::{RECORD_LEN, RingConsumer, RingProducer, Wake, init_ring, ring_footprint};
    use crate::wake::{Rung, channel};

    fn zero() -> rustix::event::Timespec {
        rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "pipe syscalls")]
    fn the_probe_agrees_with_what_an_edge_triggered_receiver_sees() {
        let (tx, rx) = channel().unwrap();
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC).unwrap();
        let et = epoll::EventFlags::IN | epoll::EventFlags::ET;
        epoll::add(&ep, &rx, epoll::EventData::new_u64(7), et).unwrap();
        let mut seen = 0;
        for _ in 0..3 {
            tx.ring().unwrap();
            let mut events = Vec::with_capacity(1);
            seen += epoll::wait(
                &ep,
                rustix::buffer::spare_capacity(&mut events),
                Some(&zero()),
            )
            .unwrap();
        }
        let forced_level = std::env::var_os(LEVEL_TRIGGERED_ENV).is_some_and(|v| v == "1");
        if forced_level {
            assert!(!edge_per_write());
        } else {
            assert_eq!(seen == 3, edge_per_write(), "{seen} edges for 3 rings");
        }
        assert_eq!(rx.drain().unwrap(), Drained::Open(3));
    }

    /// The worst a well-behaved sender can do: the receiver takes each record the moment it is
    /// pushed, so every push finds the ring empty and rings, and the receiver reads its end
    /// only as `before_looking` says. The pipe never fills, so no ring is ever skipped.
    #[test]
    #[cfg_attr(miri, ignore = "pipe syscalls")]
    fn rings_paced_by_records_taken_never_fill_the_pipe() {
        let region = Region::heap(ring_footprint(64));
        init_ring(&region, 0, 64).unwrap();
        let region = std::sync::Arc::new(region);
        let mut producer = RingProducer::attach(region.clone(), 0).unwrap();
        let mut consumer = RingConsumer::attach(region, 0).unwrap();
        let (tx, rx) = channel().unwrap();
        let mut rx = PolledReceiver::new(rx);
        let record = [0u8; RECORD_LEN];
        for _ in 0..200_000 {
            assert_eq!(producer.push(&record).unwrap(), Wake::Needed);
            assert_eq!(tx.ring().unwrap(), Rung::Sent, "a ring was skipped");
            if let Some(read) = rx.before_looking(Polled::Reported) {
                assert!(matches!(read.unwrap(), Drained::Open(_)));
            }
            assert!(consumer.pop().unwrap().is_some());
            rx.taken(1);
        }
    }

    /// What the receiver must not do: read its end after it looked. The ring of a record
    /// pushed after the look is swallowed, and epoll, finding the pipe empty, drops its edge.
    #[test]
    #[cfg_attr(miri, ignore = "pipe syscalls")]
    fn a_read_after_looking_would_swallow_the_next_edge() {
        let (tx, rx) = channel().unwrap();
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC).unwrap();
        let et = epoll::EventFlags::IN | epoll::EventFlags::ET;
        epoll::add(&ep, &rx, epoll::EventData::new_u64(7), et).unwrap();
        tx.ring().unwrap();
        rx.drain().unwrap();
        let mut events = Vec::with_capacity(1);
        let reported = epoll::wait(
            &ep,
            rustix::buffer::spare_capacity(&mut events),
            Some(&zero()),
        )
        .unwrap();
        assert_eq!(reported, 0, "the edge of a pipe read empty is not reported");
    }
}
