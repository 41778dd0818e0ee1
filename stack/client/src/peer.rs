//! A cut-through segment shared with one peer worker: its rings, and the two wake-up pipes
//! through which the two wake each other and notice each other's death.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use shunt_sapi::event::Event;
use shunt_sapi::layout;
use shunt_shm::ring::{RingConsumer, RingProducer, Wake};
use shunt_shm::segment::Segment;
use shunt_shm::wake::polling::PolledReceiver;
use shunt_shm::wake::{WakeError, WakeReceiver, WakeSender};

use crate::Error;

/// Segments are named by the shuntd epoch that granted them, as ids restart with shuntd.
pub(crate) type SegmentKey = (u32, u32);

pub(crate) struct PeerSegment {
    pub(crate) segment: Arc<Segment>,
    pub(crate) inbound: RingConsumer,
    pub(crate) outbound: RingProducer,
    /// We ring the peer through this; only we hold it.
    pub(crate) sender: WakeSender,
    /// The peer rings us on this; its end-of-file says the peer died.
    pub(crate) receiver: PolledReceiver,
    /// Slot -> local session index.
    pub(crate) slots: HashMap<u32, usize>,
    /// The peer hung up; nothing it had not closed will ever complete.
    pub(crate) dead: bool,
}

impl PeerSegment {
    pub(crate) fn open(
        segment: OwnedFd,
        [write, anchor, read]: [OwnedFd; 3],
        is_client: bool,
    ) -> Result<Self, Error> {
        let shm = |e: &dyn std::fmt::Display| Error::Shm(e.to_string());
        let segment = Arc::new(Segment::open(segment).map_err(|e| shm(&e))?);
        let (inbound, outbound) = layout::ct_rings(is_client);
        Ok(Self {
            inbound: RingConsumer::attach(segment.clone(), inbound).map_err(|e| shm(&e))?,
            outbound: RingProducer::attach(segment.clone(), outbound).map_err(|e| shm(&e))?,
            sender: WakeSender::from_fds(write, anchor).map_err(|e| shm(&e))?,
            receiver: PolledReceiver::new(WakeReceiver::from_fd(read).map_err(|e| shm(&e))?),
            segment,
            slots: HashMap::new(),
            dead: false,
        })
    }

    /// Tells the peer about `event`, waking it only if its ring was empty.
    pub(crate) fn notify(&mut self, event: Event) -> std::io::Result<()> {
        if self.dead {
            return Ok(());
        }
        match self.outbound.push(&event.encode()) {
            Ok(Wake::Needed) => match self.sender.ring() {
                // A peer that closed its end is dead; its hang-up on our receiver says so too.
                Ok(_) | Err(WakeError::PeerGone) => Ok(()),
                Err(WakeError::Io(e)) => Err(e),
            },
            Ok(Wake::NotNeeded) => Ok(()),
            Err(e) => {
                // Between well-behaved peers the ring cannot overflow (see layout::CT_MAX_SLOTS),
                // so this peer is broken or hostile: stop talking to it.
                tracing::warn!(error = %e, "cut-through peer ring unusable; treating peer as dead");
                self.dead = true;
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    e.to_string(),
                ))
            }
        }
    }
}
