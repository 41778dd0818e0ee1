//! What this Envoy's connections did: modes, bytes, fallbacks, handshake failures and pairing
//! time. A transport socket cannot define Envoy stats, so the counts go to shuntd, whose
//! `/metrics` shows them as `shunt_sidecar_*`. (The companion network filter,
//! [`crate::abi::network_filter`], counts the connections it sees as Envoy stats as well.)
//!
//! Counts accumulate per Envoy worker thread, with no locks on the data path, and go to shuntd
//! whenever a connection's mode is decided or it closes, and while payload flows (every 16 MiB
//! or second). While shuntd
//! is unreachable they wait (pairing latencies up to a bound), so what happened during an
//! outage, such as `shuntd_down` fallbacks, shows once it is back.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use shunt_sapi::UsageReport;
use shunt_sapi::usage::MAX_LATENCIES;

use crate::attach;
use crate::config::SocketConfig;

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

    /// The mode's place in [`Mode::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Every reason [`fallback`] is given: why a connection is not cut-through. The companion
/// filter defines one Envoy counter per reason, and Envoy lets it define stats only while its
/// config loads, so a new reason belongs here.
pub const FALLBACK_REASONS: [&str; 12] = [
    "shuntd_down",
    "no_address",
    "no_randomness",
    "pairing_timeout",
    "pairing_refused",
    "pairing_denied",
    "peer_without_shunt",
    "peer_shuntd_down",
    "peer_pairing_timeout",
    "peer_pairing_refused",
    "peer_unknown_reason",
    "refused_by_strict_policy",
];

#[derive(Debug, Default)]
struct Pending {
    connections: [u64; Mode::ALL.len()],
    bytes: [u64; Mode::ALL.len()],
    fallbacks: Vec<(&'static str, u64)>,
    handshake_failures: Vec<(&'static str, u64)>,
    pairing_us: Vec<u32>,
    last_flush: Option<Instant>,
}

/// Long-lived connections report their bytes while they last: once this many are pending, or
/// once a second.
const FLUSH_BYTES: u64 = 16 << 20;
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

impl Pending {
    /// Everything counted and not yet sent.
    fn report(&self) -> UsageReport {
        let by_mode = |counts: &[u64; Mode::ALL.len()]| {
            Mode::ALL
                .iter()
                .filter(|m| counts[m.index()] > 0)
                .map(|m| (m.as_str().to_owned(), counts[m.index()]))
                .collect()
        };
        let labeled = |counts: &[(&'static str, u64)]| {
            counts
                .iter()
                .map(|(label, n)| ((*label).to_owned(), *n))
                .collect()
        };
        UsageReport {
            connections: by_mode(&self.connections),
            bytes: by_mode(&self.bytes),
            fallbacks: labeled(&self.fallbacks),
            handshake_failures: labeled(&self.handshake_failures),
            pairing_latency_us: self.pairing_us.clone(),
        }
    }

    /// Forgets what `report` (from [`report`](Self::report)) delivered; what was counted
    /// since stays.
    fn sent(&mut self, report: &UsageReport) {
        let by_mode = |counts: &mut [u64; Mode::ALL.len()], sent: &[(String, u64)]| {
            for (label, n) in sent {
                if let Some(m) = Mode::ALL.iter().find(|m| m.as_str() == label) {
                    counts[m.index()] -= n;
                }
            }
        };
        let labeled = |counts: &mut Vec<(&'static str, u64)>, sent: &[(String, u64)]| {
            for (label, n) in sent {
                if let Some((_, count)) = counts.iter_mut().find(|(l, _)| l == label) {
                    *count -= n;
                }
            }
            counts.retain(|(_, n)| *n > 0);
        };
        by_mode(&mut self.connections, &report.connections);
        by_mode(&mut self.bytes, &report.bytes);
        labeled(&mut self.fallbacks, &report.fallbacks);
        labeled(&mut self.handshake_failures, &report.handshake_failures);
        self.pairing_us.drain(..report.pairing_latency_us.len());
    }
}

thread_local! {
    static PENDING: RefCell<Pending> = RefCell::new(Pending::default());
}

fn with<T>(f: impl FnOnce(&mut Pending) -> T) -> T {
    PENDING.with(|p| f(&mut p.borrow_mut()))
}

fn count(counts: &mut Vec<(&'static str, u64)>, label: &'static str) {
    match counts.iter_mut().find(|(l, _)| *l == label) {
        Some((_, n)) => *n += 1,
        None => counts.push((label, 1)),
    }
}

pub fn connection(mode: Mode) {
    with(|p| p.connections[mode.index()] += 1);
}

pub fn bytes(mode: Mode, n: usize) {
    if n > 0 {
        with(|p| p.bytes[mode.index()] += n as u64);
    }
}

pub fn fallback(reason: &'static str) {
    debug_assert!(
        FALLBACK_REASONS.contains(&reason),
        "`{reason}` is missing from FALLBACK_REASONS"
    );
    with(|p| count(&mut p.fallbacks, reason));
}

pub fn handshake_failure(reason: &'static str) {
    with(|p| count(&mut p.handshake_failures, reason));
}

pub fn pairing(took: Duration) {
    let us = u32::try_from(took.as_micros()).unwrap_or(u32::MAX);
    with(|p| {
        if p.pairing_us.len() < MAX_LATENCIES {
            p.pairing_us.push(us);
        }
    });
}

/// [`flush`]es if enough bytes are pending, or enough time passed since the last report.
pub fn flush_if_due(config: &SocketConfig) {
    let due = with(|p| {
        let pending: u64 = p.bytes.iter().sum();
        pending >= FLUSH_BYTES
            || (pending > 0 && p.last_flush.is_none_or(|t| t.elapsed() >= FLUSH_INTERVAL))
    });
    if due {
        flush(config);
    }
}

/// Sends what this thread counted to shuntd, attaching if needed (and not given up on).
pub fn flush(config: &SocketConfig) {
    let Some(worker) = attach::worker_for(config) else {
        return;
    };
    let report = with(|p| {
        p.last_flush = Some(Instant::now());
        p.report()
    });
    if report.is_empty() {
        return;
    }
    if worker.report_usage(report.clone()).is_ok() {
        with(|p| p.sent(&report));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sent_report_is_forgotten_and_later_counts_stay() {
        connection(Mode::Tls);
        connection(Mode::Tls);
        bytes(Mode::CutThrough, 10);
        fallback("shuntd_down");
        fallback("shuntd_down");
        handshake_failure("untrusted_ca");
        pairing(Duration::from_micros(90));
        let report = with(|p| p.report());
        assert_eq!(report.connections, vec![("tls".to_owned(), 2)]);
        assert_eq!(report.bytes, vec![("cut_through".to_owned(), 10)]);
        assert_eq!(report.fallbacks, vec![("shuntd_down".to_owned(), 2)]);
        assert_eq!(report.pairing_latency_us, vec![90]);
        assert_eq!(with(|p| p.report()), report, "unsent counts stay");
        connection(Mode::Tls);
        fallback("pairing_timeout");
        with(|p| p.sent(&report));
        let rest = with(|p| p.report());
        assert_eq!(rest.connections, vec![("tls".to_owned(), 1)]);
        assert_eq!(rest.fallbacks, vec![("pairing_timeout".to_owned(), 1)]);
        assert!(rest.bytes.is_empty() && rest.pairing_latency_us.is_empty());
    }
}
