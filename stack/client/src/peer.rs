//! A cut-through segment shared with one peer worker: its rings, the peer's doorbell, and the
//! socket whose hang-up says the peer died.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use shunt_sapi::event::Event;
use shunt_sapi::layout;
use shunt_shm::doorbell::Doorbell;
use shunt_shm::ring::{RingConsumer, RingProducer, Wake};
use shunt_shm::segment::Segment;

use crate::Error;

/// Segments are named by the shuntd epoch that granted them, as ids restart with shuntd.
pub(crate) type SegmentKey = (u32, u32);

pub(crate) struct PeerSegment {
    pub(crate) segment: Arc<Segment>,
    pub(crate) inbound: RingConsumer,
    pub(crate) outbound: RingProducer,
    pub(crate) peer_doorbell: Doorbell,
    pub(crate) liveness: OwnedFd,
    /// Slot -> local session index.
    pub(crate) slots: HashMap<u32, usize>,
    /// The peer hung up; nothing it had not closed will ever complete.
    pub(crate) dead: bool,
}

impl PeerSegment {
    pub(crate) fn open(
        segment: OwnedFd,
        peer_doorbell: OwnedFd,
        liveness: OwnedFd,
        is_client: bool,
    ) -> Result<Self, Error> {
        let shm = |e: &dyn std::fmt::Display| Error::Shm(e.to_string());
        let segment = Arc::new(Segment::open(segment).map_err(|e| shm(&e))?);
        let (inbound, outbound) = layout::ct_rings(is_client);
        Ok(Self {
            inbound: RingConsumer::attach(segment.clone(), inbound).map_err(|e| shm(&e))?,
            outbound: RingProducer::attach(segment.clone(), outbound).map_err(|e| shm(&e))?,
            peer_doorbell: Doorbell::from_fd(peer_doorbell).map_err(|e| shm(&e))?,
            segment,
            liveness,
            slots: HashMap::new(),
            dead: false,
        })
    }

    /// Tells the peer about `event`, ringing its doorbell only if its ring was empty.
    pub(crate) fn notify(&mut self, event: Event) -> std::io::Result<()> {
        if self.dead {
            return Ok(());
        }
        match self.outbound.push(&event.encode()) {
            Ok(Wake::Needed) => self.peer_doorbell.ring(),
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
