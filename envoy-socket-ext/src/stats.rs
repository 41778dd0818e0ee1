//! What happened to connections, per Envoy process: modes, bytes, fallbacks and pairing time.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How a connection carries its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Through the FIFO pair; the TCP connection carries doorbells.
    CutThrough,
    /// Mutual TLS over the TCP connection.
    Tls,
    /// Plain TCP.
    Plain,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::CutThrough, Mode::Tls, Mode::Plain];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::CutThrough => "cut_through",
            Mode::Tls => "tls",
            Mode::Plain => "plain",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Upper bounds of the pairing-latency buckets, in microseconds.
pub const PAIRING_BUCKETS_US: [u64; 8] = [50, 100, 250, 500, 1_000, 5_000, 25_000, 100_000];

#[derive(Debug, Default)]
pub struct Stats {
    connections: [AtomicU64; Mode::ALL.len()],
    bytes: [AtomicU64; Mode::ALL.len()],
    fallbacks: Mutex<Vec<(&'static str, u64)>>,
    handshake_failures: Mutex<Vec<(&'static str, u64)>>,
    pairing_us: [AtomicU64; PAIRING_BUCKETS_US.len() + 1],
}

impl Stats {
    pub const fn new() -> Self {
        Self {
            connections: [const { AtomicU64::new(0) }; Mode::ALL.len()],
            bytes: [const { AtomicU64::new(0) }; Mode::ALL.len()],
            fallbacks: Mutex::new(Vec::new()),
            handshake_failures: Mutex::new(Vec::new()),
            pairing_us: [const { AtomicU64::new(0) }; PAIRING_BUCKETS_US.len() + 1],
        }
    }

    pub fn connection(&self, mode: Mode) {
        self.connections[mode.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn bytes(&self, mode: Mode, n: usize) {
        self.bytes[mode.index()].fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn fallback(&self, reason: &'static str) {
        count(&self.fallbacks, reason);
    }

    pub fn handshake_failure(&self, label: &'static str) {
        count(&self.handshake_failures, label);
    }

    pub fn pairing(&self, took: Duration) {
        let us = took.as_micros() as u64;
        let i = PAIRING_BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(PAIRING_BUCKETS_US.len());
        self.pairing_us[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn connections(&self, mode: Mode) -> u64 {
        self.connections[mode.index()].load(Ordering::Relaxed)
    }

    pub fn bytes_of(&self, mode: Mode) -> u64 {
        self.bytes[mode.index()].load(Ordering::Relaxed)
    }

    pub fn fallbacks(&self) -> Vec<(&'static str, u64)> {
        snapshot(&self.fallbacks)
    }

    pub fn handshake_failures(&self) -> Vec<(&'static str, u64)> {
        snapshot(&self.handshake_failures)
    }

    /// Pairings per latency bucket; the last counts those above every bound.
    pub fn pairing_histogram(&self) -> Vec<u64> {
        self.pairing_us
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }
}

fn count(counts: &Mutex<Vec<(&'static str, u64)>>, label: &'static str) {
    let mut counts = counts.lock().unwrap_or_else(|e| e.into_inner());
    match counts.iter_mut().find(|(l, _)| *l == label) {
        Some((_, n)) => *n += 1,
        None => counts.push((label, 1)),
    }
}

fn snapshot(counts: &Mutex<Vec<(&'static str, u64)>>) -> Vec<(&'static str, u64)> {
    counts.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// This process's statistics.
pub static STATS: Stats = Stats::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_reasons_accumulate() {
        let s = Stats::new();
        s.pairing(Duration::from_micros(40));
        s.pairing(Duration::from_micros(300));
        s.pairing(Duration::from_secs(1));
        let h = s.pairing_histogram();
        assert_eq!((h[0], h[3], h[PAIRING_BUCKETS_US.len()]), (1, 1, 1));
        s.fallback("shuntd_down");
        s.fallback("shuntd_down");
        s.fallback("peer_without_shunt");
        assert_eq!(
            s.fallbacks(),
            vec![("shuntd_down", 2), ("peer_without_shunt", 1)]
        );
        s.bytes(Mode::CutThrough, 10);
        assert_eq!(s.bytes_of(Mode::CutThrough), 10);
        assert_eq!(s.bytes_of(Mode::Plain), 0);
    }
}
