//! What the transport socket learnt about each connection, for the companion network filter
//! ([`crate::abi::network_filter`]) to hand to Envoy: Envoy cannot see TLS details of a
//! dynamic-module transport socket, and a transport socket cannot define Envoy stats, but a
//! network filter can set filter state, which RBAC and access logs read, and count stats.
//!
//! Keyed by Envoy's connection id, which both see. An entry lives from the handshake until the
//! transport socket is destroyed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::stats::Mode;

/// Filter-state key of the verified SPIFFE id (absent without mutual TLS).
pub const PEER_IDENTITY_KEY: &str = "shunt.peer_identity";
/// Filter-state key of the mode that carries the payload (`cut_through`, `tls`, `plain`).
pub const MODE_KEY: &str = "shunt.mode";

/// The peer of one connection, as its transport socket established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRecord {
    /// The SPIFFE id the peer's certificate proved, if the connection ran mutual TLS.
    pub identity: Option<Arc<str>>,
    /// The mode that carries the payload; `None` for a connection refused before it had one
    /// (shuntd's rules deny the pair, or a strict listener meets a peer without Shunt or TLS).
    pub mode: Option<Mode>,
    /// Why the connection is not cut-through, if it fell back or was refused: one of
    /// [`crate::stats::FALLBACK_REASONS`].
    pub fallback: Option<&'static str>,
}

static PEERS: Mutex<Option<HashMap<u64, PeerRecord>>> = Mutex::new(None);

fn with<T>(f: impl FnOnce(&mut HashMap<u64, PeerRecord>) -> T) -> T {
    let mut peers = PEERS.lock().unwrap_or_else(|e| e.into_inner());
    f(peers.get_or_insert_with(HashMap::new))
}

pub fn record(connection_id: u64, peer: PeerRecord) {
    with(|p| p.insert(connection_id, peer));
}

pub fn lookup(connection_id: u64) -> Option<PeerRecord> {
    with(|p| p.get(&connection_id).cloned())
}

pub fn forget(connection_id: u64) {
    with(|p| p.remove(&connection_id));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_live_until_forgotten() {
        let peer = PeerRecord {
            identity: Some("spiffe://cluster.local/ns/a/sa/b".into()),
            mode: Some(Mode::Tls),
            fallback: Some("peer_without_shunt"),
        };
        record(u64::MAX - 1, peer.clone());
        assert_eq!(lookup(u64::MAX - 1), Some(peer));
        forget(u64::MAX - 1);
        assert_eq!(lookup(u64::MAX - 1), None);
    }
}
