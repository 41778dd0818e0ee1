//! Lookup tables: sessions by 5-tuple (established and half-open) and listeners by endpoint.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::ports::LocalPorts;
use crate::transport::TransportProto;

/// A session as the network would name it. The local side is the side that owns the entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FiveTuple {
    pub proto: TransportProto,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl FiveTuple {
    pub fn reversed(&self) -> Self {
        Self {
            proto: self.proto,
            local: self.remote,
            remote: self.local,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("{0:?} is already in the table")]
    Exists(FiveTuple),
    #[error("{0:?} is not half-open")]
    NotHalfOpen(FiveTuple),
}

/// Established and half-open sessions, IPv4 and IPv6 alike, each mapped to a value `V`
/// (a session id in shuntd).
#[derive(Debug)]
pub struct SessionTable<V> {
    established: HashMap<FiveTuple, V>,
    half_open: HashMap<FiveTuple, V>,
    /// Local ports in use by either, per remote.
    ports: LocalPorts,
}

impl<V> Default for SessionTable<V> {
    fn default() -> Self {
        Self {
            established: HashMap::new(),
            half_open: HashMap::new(),
            ports: LocalPorts::default(),
        }
    }
}

impl<V: Copy> SessionTable<V> {
    fn in_use(&self, key: &FiveTuple) -> bool {
        self.established.contains_key(key) || self.half_open.contains_key(key)
    }

    pub fn insert_half_open(&mut self, key: FiveTuple, value: V) -> Result<(), TableError> {
        if self.in_use(&key) {
            return Err(TableError::Exists(key));
        }
        self.half_open.insert(key, value);
        self.ports.take(key.proto, key.local, key.remote);
        Ok(())
    }

    /// Moves a half-open entry to the established table once its transport completed.
    pub fn establish(&mut self, key: &FiveTuple) -> Result<V, TableError> {
        let value = self
            .half_open
            .remove(key)
            .ok_or(TableError::NotHalfOpen(*key))?;
        self.established.insert(*key, value);
        Ok(value)
    }

    pub fn insert_established(&mut self, key: FiveTuple, value: V) -> Result<(), TableError> {
        match self.established.entry(key) {
            Entry::Occupied(_) => Err(TableError::Exists(key)),
            Entry::Vacant(v) if !self.half_open.contains_key(&key) => {
                v.insert(value);
                self.ports.take(key.proto, key.local, key.remote);
                Ok(())
            }
            Entry::Vacant(_) => Err(TableError::Exists(key)),
        }
    }

    pub fn lookup(&self, key: &FiveTuple) -> Option<V> {
        self.established.get(key).copied()
    }

    pub fn lookup_half_open(&self, key: &FiveTuple) -> Option<V> {
        self.half_open.get(key).copied()
    }

    pub fn remove(&mut self, key: &FiveTuple) -> Option<V> {
        let removed = self
            .established
            .remove(key)
            .or_else(|| self.half_open.remove(key));
        if removed.is_some() {
            self.ports.release(key.proto, key.local, key.remote);
        }
        removed
    }

    pub fn len(&self) -> usize {
        self.established.len()
    }

    pub fn half_open_len(&self) -> usize {
        self.half_open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.established.is_empty() && self.half_open.is_empty()
    }

    /// A local port on `ip` that no session of `proto` uses toward `remote`; `None` when
    /// every ephemeral port is taken. Costs a few word reads however full the table is.
    pub fn free_local_port(
        &mut self,
        proto: TransportProto,
        ip: IpAddr,
        remote: SocketAddr,
    ) -> Option<u16> {
        self.ports.pick(proto, ip, remote)
    }
}

/// Listeners by (transport, endpoint). A lookup tries the exact address, then the wildcard
/// address of the same family and port.
#[derive(Debug)]
pub struct ListenerTable<V> {
    by_endpoint: HashMap<(TransportProto, SocketAddr), V>,
}

impl<V> Default for ListenerTable<V> {
    fn default() -> Self {
        Self {
            by_endpoint: HashMap::new(),
        }
    }
}

fn wildcard(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, addr.port())
}

impl<V: Copy> ListenerTable<V> {
    pub fn insert(&mut self, proto: TransportProto, ep: SocketAddr, value: V) -> bool {
        match self.by_endpoint.entry((proto, ep)) {
            Entry::Occupied(_) => false,
            Entry::Vacant(v) => {
                v.insert(value);
                true
            }
        }
    }

    pub fn remove(&mut self, proto: TransportProto, ep: SocketAddr) -> Option<V> {
        self.by_endpoint.remove(&(proto, ep))
    }

    pub fn lookup(&self, proto: TransportProto, ep: SocketAddr) -> Option<V> {
        self.by_endpoint
            .get(&(proto, ep))
            .or_else(|| self.by_endpoint.get(&(proto, wildcard(ep))))
            .copied()
    }

    pub fn lookup_exact(&self, proto: TransportProto, ep: SocketAddr) -> Option<V> {
        self.by_endpoint.get(&(proto, ep)).copied()
    }

    pub fn len(&self) -> usize {
        self.by_endpoint.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_endpoint.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(local: &str, remote: &str) -> FiveTuple {
        FiveTuple {
            proto: TransportProto::CutThrough,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
        }
    }

    #[test]
    fn half_open_then_established() {
        let mut t = SessionTable::default();
        let k = tuple("10.0.0.1:40000", "10.0.0.2:80");
        t.insert_half_open(k, 1u64).unwrap();
        assert_eq!(t.lookup(&k), None);
        assert_eq!(t.lookup_half_open(&k), Some(1));
        assert_eq!(t.insert_half_open(k, 2), Err(TableError::Exists(k)));
        assert_eq!(t.establish(&k), Ok(1));
        assert_eq!(t.lookup(&k), Some(1));
        assert_eq!(t.establish(&k), Err(TableError::NotHalfOpen(k)));
        assert_eq!(t.remove(&k), Some(1));
        assert!(t.is_empty());
    }

    #[test]
    fn free_ports_skip_sessions_in_either_table_until_they_go() {
        let mut t = SessionTable::default();
        let ip = "10.0.0.1".parse().unwrap();
        let remote = "10.0.0.2:80".parse().unwrap();
        let proto = TransportProto::CutThrough;
        let first = t.free_local_port(proto, ip, remote).unwrap();
        let half = FiveTuple {
            proto,
            local: SocketAddr::new(ip, first + 1),
            remote,
        };
        let full = FiveTuple {
            local: SocketAddr::new(ip, first + 2),
            ..half
        };
        t.insert_half_open(half, 1u64).unwrap();
        t.insert_established(full, 2).unwrap();
        assert_eq!(t.free_local_port(proto, ip, remote), Some(first + 3));
        t.remove(&half);
        t.remove(&full);
        t.remove(&full);
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(t.free_local_port(proto, ip, remote).unwrap());
        }
        assert_eq!(
            seen,
            [first + 4, first + 5, first + 6],
            "round robin goes on"
        );
    }

    #[test]
    fn v6_and_v4_keys_are_distinct() {
        let mut t = SessionTable::default();
        let a = tuple("[fd00::1]:1", "[fd00::2]:2");
        let b = tuple("10.0.0.1:1", "10.0.0.2:2");
        t.insert_established(a, 1u64).unwrap();
        t.insert_established(b, 2).unwrap();
        assert_eq!(t.lookup(&a), Some(1));
        assert_eq!(t.lookup(&b), Some(2));
        assert_eq!(t.lookup(&a.reversed()), None);
    }

    #[test]
    fn listener_wildcard_fallback() {
        let mut l = ListenerTable::default();
        let proto = TransportProto::CutThrough;
        assert!(l.insert(proto, "0.0.0.0:80".parse().unwrap(), 1u64));
        assert!(l.insert(proto, "127.0.0.1:80".parse().unwrap(), 2));
        assert!(!l.insert(proto, "127.0.0.1:80".parse().unwrap(), 3));
        assert_eq!(l.lookup(proto, "127.0.0.1:80".parse().unwrap()), Some(2));
        assert_eq!(l.lookup(proto, "10.9.9.9:80".parse().unwrap()), Some(1));
        assert_eq!(l.lookup(proto, "[::1]:80".parse().unwrap()), None);
        assert_eq!(l.lookup(proto, "10.9.9.9:81".parse().unwrap()), None);
    }
}
