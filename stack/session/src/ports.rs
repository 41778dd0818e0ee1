//! Which local ports are taken toward each remote, to pick a free source port in a few steps.
//!
//! A connect needs a local port that no session of the same transport uses toward the same
//! remote (ports are reused across remotes, as the kernel reuses them). Scanning the session
//! table port by port costs up to 64k lookups under the registry lock once a remote's ports
//! fill up, which an app holding many sessions could force on every connect. Instead each
//! (transport, local address, remote) keeps a two-level bitmap of its taken ports: a summary
//! word says which of the 1024 port words still have a free port, so finding one costs at most
//! a few dozen word reads, and a full remote is refused at once.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use crate::transport::TransportProto;

/// First port handed out to connects; below are the well-known and registered-by-root ports.
pub const FIRST_EPHEMERAL_PORT: u16 = 1024;

const WORDS: usize = 1 << 16 >> 6;

/// Taken ports of one (transport, local address, remote).
#[derive(Clone)]
struct PortMap {
    taken: Box<[u64; WORDS]>,
    /// Bit `w` set: word `w` of `taken` is full.
    full: [u64; WORDS / 64],
    count: u32,
}

impl PortMap {
    fn new() -> Self {
        Self {
            taken: Box::new([0; WORDS]),
            full: [0; WORDS / 64],
            count: 0,
        }
    }

    fn is_taken(&self, port: u16) -> bool {
        self.taken[usize::from(port) >> 6] & (1 << (port & 63)) != 0
    }

    fn set(&mut self, port: u16, taken: bool) {
        let w = usize::from(port) >> 6;
        let bit = 1u64 << (port & 63);
        if taken == (self.taken[w] & bit != 0) {
            return;
        }
        if taken {
            self.taken[w] |= bit;
            self.count += 1;
        } else {
            self.taken[w] &= !bit;
            self.count -= 1;
        }
        let full_bit = 1u64 << (w & 63);
        if self.taken[w] == u64::MAX {
            self.full[w >> 6] |= full_bit;
        } else {
            self.full[w >> 6] &= !full_bit;
        }
    }

    /// The first free port at or after `from` (wrapping within the ephemeral range).
    fn first_free(&self, from: u16) -> Option<u16> {
        let from = from.max(FIRST_EPHEMERAL_PORT);
        self.free_in(from, u16::MAX)
            .or_else(|| self.free_in(FIRST_EPHEMERAL_PORT, from))
    }

    /// The first free port in `lo..=hi`.
    fn free_in(&self, lo: u16, hi: u16) -> Option<u16> {
        let (first_word, last_word) = (usize::from(lo) >> 6, usize::from(hi) >> 6);
        let mut w = first_word;
        while w <= last_word {
            // Skip whole words that are full, 64 at a time.
            let summary = self.full[w >> 6] >> (w & 63);
            if summary == u64::MAX >> (w & 63) {
                w = (w | 63) + 1;
                continue;
            }
            w += summary.trailing_ones() as usize;
            if w > last_word {
                break;
            }
            let mut free = !self.taken[w];
            if w == first_word {
                free &= u64::MAX << (lo & 63);
            }
            if w == last_word && hi & 63 != 63 {
                free &= (1u64 << ((hi & 63) + 1)) - 1;
            }
            if free != 0 {
                return Some(((w << 6) + free.trailing_zeros() as usize) as u16);
            }
            w += 1;
        }
        None
    }
}

type Key = (TransportProto, IpAddr, SocketAddr);

/// Remotes whose maps stay when emptied (8 KiB each).
const MAX_MAPS_KEPT: usize = 1024;

/// Taken local ports, per (transport, local address, remote).
#[derive(Default)]
pub struct LocalPorts {
    maps: HashMap<Key, PortMap>,
    /// Where the next search starts, per local address, so ports are not reused at once.
    cursor: HashMap<IpAddr, u16>,
}

impl std::fmt::Debug for LocalPorts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPorts")
            .field("remotes", &self.maps.len())
            .finish_non_exhaustive()
    }
}

impl LocalPorts {
    pub fn take(&mut self, proto: TransportProto, local: SocketAddr, remote: SocketAddr) {
        self.maps
            .entry((proto, local.ip(), remote))
            .or_insert_with(PortMap::new)
            .set(local.port(), true);
    }

    pub fn release(&mut self, proto: TransportProto, local: SocketAddr, remote: SocketAddr) {
        let key = (proto, local.ip(), remote);
        if let Some(map) = self.maps.get_mut(&key) {
            map.set(local.port(), false);
            // An emptied map is kept for the next connect to the same remote (8 KiB made and
            // zeroed each time would cost a connect more than the search); past a bound on idle
            // maps, the empty ones go.
            if map.count == 0 && self.maps.len() > MAX_MAPS_KEPT {
                self.maps.retain(|_, m| m.count > 0);
            }
        }
    }

    pub fn is_taken(&self, proto: TransportProto, local: SocketAddr, remote: SocketAddr) -> bool {
        self.maps
            .get(&(proto, local.ip(), remote))
            .is_some_and(|m| m.is_taken(local.port()))
    }

    /// A free ephemeral port on `ip` toward `remote`, round robin; `None` when all are taken.
    pub fn pick(&mut self, proto: TransportProto, ip: IpAddr, remote: SocketAddr) -> Option<u16> {
        let cursor = self.cursor.entry(ip).or_insert(FIRST_EPHEMERAL_PORT);
        let port = match self.maps.get(&(proto, ip, remote)) {
            Some(map) => map.first_free(*cursor)?,
            None => (*cursor).max(FIRST_EPHEMERAL_PORT),
        };
        *cursor = port.checked_add(1).unwrap_or(FIRST_EPHEMERAL_PORT);
        Some(port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CT: TransportProto = TransportProto::CutThrough;

    fn ip() -> IpAddr {
        "127.0.0.1".parse().unwrap()
    }

    fn remote() -> SocketAddr {
        "127.0.0.1:7000".parse().unwrap()
    }

    #[test]
    fn picks_round_robin_and_skips_taken_ports() {
        let mut p = LocalPorts::default();
        assert_eq!(p.pick(CT, ip(), remote()), Some(1024));
        p.take(CT, SocketAddr::new(ip(), 1025), remote());
        assert_eq!(p.pick(CT, ip(), remote()), Some(1026));
        // Other remotes reuse the same ports.
        p.take(CT, SocketAddr::new(ip(), 1027), remote());
        let other: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        assert_eq!(p.pick(CT, ip(), other), Some(1027));
        assert!(p.is_taken(CT, SocketAddr::new(ip(), 1027), remote()));
        assert!(!p.is_taken(CT, SocketAddr::new(ip(), 1027), other));
    }

    #[test]
    fn a_full_remote_is_refused_and_a_freed_port_found_wherever_it_is() {
        let mut p = LocalPorts::default();
        for port in FIRST_EPHEMERAL_PORT..=u16::MAX {
            p.take(CT, SocketAddr::new(ip(), port), remote());
        }
        assert_eq!(p.pick(CT, ip(), remote()), None);
        for free in [FIRST_EPHEMERAL_PORT, 4000, 40_000, u16::MAX] {
            p.release(CT, SocketAddr::new(ip(), free), remote());
            assert_eq!(p.pick(CT, ip(), remote()), Some(free));
            p.take(CT, SocketAddr::new(ip(), free), remote());
        }
        assert_eq!(p.pick(CT, ip(), remote()), None);
    }

    #[test]
    fn emptied_remotes_are_forgotten_once_many_are_kept() {
        let mut p = LocalPorts::default();
        let a = SocketAddr::new(ip(), 2000);
        p.take(CT, a, remote());
        p.release(CT, a, remote());
        assert_eq!(p.maps.len(), 1, "kept for the next connect");
        let busy = SocketAddr::new(ip(), 2001);
        p.take(CT, busy, remote());
        for port in 0..2 * MAX_MAPS_KEPT as u16 {
            let r = SocketAddr::new(ip(), 10_000 + port);
            p.take(CT, a, r);
            p.release(CT, a, r);
            assert!(p.maps.len() <= MAX_MAPS_KEPT + 1);
        }
        assert!(p.is_taken(CT, busy, remote()), "maps in use stay");
    }

    proptest! {
        #[test]
        fn first_free_agrees_with_a_linear_scan(
            taken in proptest::collection::vec(FIRST_EPHEMERAL_PORT..=u16::MAX, 0..3000),
            dense_from in FIRST_EPHEMERAL_PORT..=u16::MAX,
            dense_len in 0u32..5000,
            from in FIRST_EPHEMERAL_PORT..=u16::MAX,
        ) {
            let mut map = PortMap::new();
            for t in &taken {
                map.set(*t, true);
            }
            for i in 0..dense_len {
                if let Ok(port) = u16::try_from(u32::from(dense_from) + i) {
                    map.set(port, true);
                }
            }
            let linear = (from..=u16::MAX)
                .chain(FIRST_EPHEMERAL_PORT..from)
                .find(|p| !map.is_taken(*p));
            prop_assert_eq!(map.first_free(from), linear);
        }
    }
}
