//! Offers waiting for the other end of a pairing.
//!
//! Two workers that each took part in the same handshake (an mTLS exchange between two Envoy
//! sidecars, say) derive the same secret token from it and offer it here. The first offer waits;
//! the second, with the same token and the opposite role, completes the pair. A token is used
//! once: a matched or expired offer is forgotten, so nobody can join a pairing later.
//!
//! The token alone binds the two ends. Their views of the replaced connection are recorded but
//! not compared: between sidecars, redirects and original-destination handling make the two
//! views legitimately differ.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shunt_sapi::message::{PAIR_TOKEN_LEN, PairRole};

use crate::app::WorkerId;

/// How long an offer waits for its other end by default.
pub const DEFAULT_PAIR_TIMEOUT: Duration = Duration::from_secs(2);

/// One end of a pairing, as offered by an attached worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub worker: WorkerId,
    pub request_id: u32,
    pub role: PairRole,
    /// The replaced connection as this end sees it.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Bytes per FIFO this end asked for.
    pub fifo_size: Option<u32>,
    /// The other end's identity as this end verified it, if it verified one.
    pub peer_identity: Option<String>,
}

// Returned and taken apart at once, never stored: boxing the matched pair would only add two
// allocations per pairing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq, Eq)]
pub enum OfferOutcome {
    /// Stored until the other end arrives or the offer expires.
    Waiting,
    /// Both ends are here.
    Matched { initiator: Offer, responder: Offer },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairingError {
    #[error("an offer with this token and role is already waiting")]
    Conflict,
    #[error("both ends of the pairing come from the same worker")]
    SameWorker,
}

#[derive(Debug)]
struct Waiting {
    offer: Offer,
    since: Instant,
}

#[derive(Debug)]
pub struct PairingTable {
    waiting: HashMap<[u8; PAIR_TOKEN_LEN], Waiting>,
    timeout: Duration,
}

impl Default for PairingTable {
    fn default() -> Self {
        Self::new(DEFAULT_PAIR_TIMEOUT)
    }
}

impl PairingTable {
    pub fn new(timeout: Duration) -> Self {
        Self {
            waiting: HashMap::new(),
            timeout,
        }
    }

    /// Adds `offer` under `token`, completing the pair if its other end is waiting.
    pub fn offer(
        &mut self,
        token: [u8; PAIR_TOKEN_LEN],
        offer: Offer,
        now: Instant,
    ) -> Result<OfferOutcome, PairingError> {
        match self.waiting.entry(token) {
            Entry::Vacant(v) => {
                v.insert(Waiting { offer, since: now });
                Ok(OfferOutcome::Waiting)
            }
            Entry::Occupied(o) => {
                let first = &o.get().offer;
                if first.role == offer.role {
                    return Err(PairingError::Conflict);
                }
                if first.worker == offer.worker {
                    return Err(PairingError::SameWorker);
                }
                let first = o.remove().offer;
                let (initiator, responder) = match offer.role {
                    PairRole::Initiator => (offer, first),
                    PairRole::Responder => (first, offer),
                };
                Ok(OfferOutcome::Matched {
                    initiator,
                    responder,
                })
            }
        }
    }

    /// Removes and returns the offers that waited longer than the timeout.
    pub fn expire(&mut self, now: Instant) -> Vec<Offer> {
        let timeout = self.timeout;
        let mut gone = Vec::new();
        self.waiting.retain(|_, w| {
            let keep = now.saturating_duration_since(w.since) < timeout;
            if !keep {
                gone.push(w.offer.clone());
            }
            keep
        });
        gone
    }

    /// Forgets the offers of a worker that went away.
    pub fn remove_worker(&mut self, worker: WorkerId) {
        self.waiting.retain(|_, w| w.offer.worker != worker);
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "10.0.0.1:40000";
    const B: &str = "10.0.0.2:15006";

    fn offer(worker: u32, role: PairRole) -> Offer {
        let (local, remote) = match role {
            PairRole::Initiator => (A, B),
            PairRole::Responder => (B, A),
        };
        Offer {
            worker: WorkerId(worker),
            request_id: worker * 10,
            role,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            fifo_size: None,
            peer_identity: None,
        }
    }

    #[test]
    fn second_end_completes_the_pair_in_either_order() {
        for first in [PairRole::Initiator, PairRole::Responder] {
            let mut t = PairingTable::default();
            let now = Instant::now();
            assert_eq!(
                t.offer([1; 32], offer(1, first), now),
                Ok(OfferOutcome::Waiting)
            );
            let OfferOutcome::Matched {
                initiator,
                responder,
            } = t.offer([1; 32], offer(2, first.opposite()), now).unwrap()
            else {
                panic!("no match");
            };
            assert_eq!(initiator.role, PairRole::Initiator);
            assert_eq!(responder.role, PairRole::Responder);
            assert!(t.is_empty(), "a token is used once");
        }
    }

    #[test]
    fn a_used_token_starts_over_instead_of_joining() {
        let mut t = PairingTable::default();
        let now = Instant::now();
        t.offer([1; 32], offer(1, PairRole::Initiator), now)
            .unwrap();
        t.offer([1; 32], offer(2, PairRole::Responder), now)
            .unwrap();
        // A third party replaying the token only creates an offer nobody completes.
        assert_eq!(
            t.offer([1; 32], offer(3, PairRole::Responder), now),
            Ok(OfferOutcome::Waiting)
        );
    }

    #[test]
    fn refuses_same_role_and_same_worker() {
        let mut t = PairingTable::default();
        let now = Instant::now();
        t.offer([1; 32], offer(1, PairRole::Initiator), now)
            .unwrap();
        assert_eq!(
            t.offer([1; 32], offer(2, PairRole::Initiator), now),
            Err(PairingError::Conflict)
        );
        assert_eq!(
            t.offer([1; 32], offer(1, PairRole::Responder), now),
            Err(PairingError::SameWorker)
        );
        assert_eq!(t.len(), 1, "refusals leave the waiting offer alone");
    }

    #[test]
    fn offers_expire_and_leave_with_their_worker() {
        let mut t = PairingTable::new(Duration::from_millis(100));
        let now = Instant::now();
        t.offer([1; 32], offer(1, PairRole::Initiator), now)
            .unwrap();
        t.offer(
            [2; 32],
            offer(2, PairRole::Initiator),
            now + Duration::from_millis(60),
        )
        .unwrap();
        let gone = t.expire(now + Duration::from_millis(120));
        assert_eq!(gone, vec![offer(1, PairRole::Initiator)]);
        t.remove_worker(WorkerId(2));
        assert!(t.is_empty());
    }
}
