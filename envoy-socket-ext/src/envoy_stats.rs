//! The Envoy stats of the companion network filter ([`crate::abi::network_filter`]): what it
//! counts of each connection it sees, from what the transport socket recorded
//! ([`crate::identity`]). Safe code behind the [`Sink`] trait, so it runs in tests without
//! Envoy.
//!
//! Envoy 1.40 gives network filters counters and gauges without labels, so the mode or reason
//! is part of each name (`shunt.mode.tls.connections_total`); Envoy's `stats_tags` can turn it
//! back into a label (docs/envoy.md shows how). Envoy shows the names under the module
//! config's `metrics_namespace` (by default `dynamicmodulescustom.`).
//!
//! Each connection counts once in `connections_total` of its mode, and is in
//! `connections_active` of its mode from then until it closes. Bytes are the payload the filter
//! sees (`rx` read from the downstream peer, `tx` written to it), counted under the
//! connection's mode, including bytes seen before the mode was known. Fallbacks count the
//! connections that fell back (their mode says to what) and those refused before any mode
//! (`pairing_denied`, `refused_by_strict_policy`).

use crate::identity::PeerRecord;
use crate::stats::{FALLBACK_REASONS, Mode};

/// An Envoy stat id, as `define_*` returns it.
pub type StatId = usize;

/// The fallback reason that stands for any not in [`FALLBACK_REASONS`].
pub const OTHER_REASON: &str = "other";

/// A counter or a gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// The name of one of a mode's stats (`what`: `connections_total`, `connections_active`,
/// `rx_bytes_total`, `tx_bytes_total`).
pub fn mode_stat(mode: Mode, what: &str) -> String {
    format!("shunt.mode.{}.{what}", mode.as_str())
}

/// The name of a fallback reason's counter.
pub fn fallback_stat(reason: &str) -> String {
    format!("shunt.reason.{reason}.fallbacks_total")
}

/// The ids of every stat the filter defines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatIds {
    connections: [StatId; Mode::ALL.len()],
    active: [StatId; Mode::ALL.len()],
    rx_bytes: [StatId; Mode::ALL.len()],
    tx_bytes: [StatId; Mode::ALL.len()],
    /// By [`FALLBACK_REASONS`], then [`OTHER_REASON`].
    fallbacks: [StatId; FALLBACK_REASONS.len() + 1],
}

impl StatIds {
    /// Defines every stat with `define` (its kind and name; Envoy's id, or why not).
    pub fn define(
        mut define: impl FnMut(Kind, &str) -> Result<StatId, String>,
    ) -> Result<StatIds, String> {
        let mut by_mode = |kind: Kind, what: &str| -> Result<[StatId; Mode::ALL.len()], String> {
            let mut ids = [0; Mode::ALL.len()];
            for mode in Mode::ALL {
                ids[mode.index()] = define(kind, &mode_stat(mode, what))?;
            }
            Ok(ids)
        };
        let connections = by_mode(Kind::Counter, "connections_total")?;
        let active = by_mode(Kind::Gauge, "connections_active")?;
        let rx_bytes = by_mode(Kind::Counter, "rx_bytes_total")?;
        let tx_bytes = by_mode(Kind::Counter, "tx_bytes_total")?;
        let mut fallbacks = [0; FALLBACK_REASONS.len() + 1];
        let reasons = FALLBACK_REASONS.iter().chain([&OTHER_REASON]);
        for (id, reason) in fallbacks.iter_mut().zip(reasons) {
            *id = define(Kind::Counter, &fallback_stat(reason))?;
        }
        Ok(StatIds {
            connections,
            active,
            rx_bytes,
            tx_bytes,
            fallbacks,
        })
    }

    fn fallback(&self, reason: &str) -> StatId {
        let i = FALLBACK_REASONS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(FALLBACK_REASONS.len());
        self.fallbacks[i]
    }
}

/// Where the counts go: Envoy's stats, or a test's.
pub trait Sink {
    fn add(&self, counter: StatId, n: u64);
    fn gauge_up(&self, gauge: StatId);
    fn gauge_down(&self, gauge: StatId);
}

/// Which way payload went, seen from the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the downstream peer (`on_read`).
    Read,
    /// To the downstream peer (`on_write`).
    Written,
}

/// What one connection's filter knows and has counted.
#[derive(Debug, Default)]
pub struct Tally {
    /// The transport socket's record was counted, or found absent: nothing left to look up.
    settled: bool,
    mode: Option<Mode>,
    /// Payload bytes read and written before the record was found.
    early: [u64; 2],
    /// Whether this connection is in its mode's `connections_active`.
    active: bool,
}

impl Tally {
    /// Whether the record is still to be looked up.
    pub fn unsettled(&self) -> bool {
        !self.settled
    }

    /// Counts the connection from its transport socket's record (`None`: there is none, as on a
    /// listener without the module's transport socket), once: its mode, the bytes seen so
    /// far, and why it is not cut-through.
    pub fn settle(&mut self, peer: Option<&PeerRecord>, ids: &StatIds, sink: &dyn Sink) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let early = std::mem::take(&mut self.early);
        let Some(peer) = peer else {
            return;
        };
        if let Some(reason) = peer.fallback {
            sink.add(ids.fallback(reason), 1);
        }
        if let Some(mode) = peer.mode {
            let m = mode.index();
            self.mode = Some(mode);
            sink.add(ids.connections[m], 1);
            sink.gauge_up(ids.active[m]);
            self.active = true;
            let [read, written] = early;
            if read > 0 {
                sink.add(ids.rx_bytes[m], read);
            }
            if written > 0 {
                sink.add(ids.tx_bytes[m], written);
            }
        }
    }

    /// Counts `n` payload bytes under the connection's mode, or keeps them until it is known.
    pub fn data(&mut self, direction: Direction, n: u64, ids: &StatIds, sink: &dyn Sink) {
        if n == 0 {
            return;
        }
        let (early, by_mode) = match direction {
            Direction::Read => (&mut self.early[0], &ids.rx_bytes),
            Direction::Written => (&mut self.early[1], &ids.tx_bytes),
        };
        match self.mode {
            Some(mode) => sink.add(by_mode[mode.index()], n),
            None if !self.settled => *early += n,
            None => {}
        }
    }

    /// The connection closed (or its filter is going): it leaves `connections_active`, once.
    pub fn closed(&mut self, ids: &StatIds, sink: &dyn Sink) {
        if let Some(mode) = self.mode
            && std::mem::take(&mut self.active)
        {
            sink.gauge_down(ids.active[mode.index()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use super::*;

    /// Stats by name, as Envoy would hold them.
    #[derive(Default)]
    struct Recorded {
        names: Vec<(Kind, String)>,
        values: RefCell<HashMap<StatId, i64>>,
    }

    impl Recorded {
        fn ids(&mut self) -> StatIds {
            StatIds::define(|kind, name| {
                self.names.push((kind, name.to_owned()));
                Ok(self.names.len())
            })
            .unwrap()
        }

        fn get(&self, name: &str) -> i64 {
            let id = 1 + self.names.iter().position(|(_, n)| n == name).unwrap();
            self.values.borrow().get(&id).copied().unwrap_or(0)
        }

        /// Every stat that is not zero, by name.
        fn nonzero(&self) -> Vec<(String, i64)> {
            let mut all: Vec<_> = self
                .values
                .borrow()
                .iter()
                .filter(|(_, v)| **v != 0)
                .map(|(id, v)| (self.names[id - 1].1.clone(), *v))
                .collect();
            all.sort();
            all
        }
    }

    impl Sink for Recorded {
        fn add(&self, counter: StatId, n: u64) {
            assert_eq!(self.names[counter - 1].0, Kind::Counter);
            *self.values.borrow_mut().entry(counter).or_default() += n as i64;
        }
        fn gauge_up(&self, gauge: StatId) {
            assert_eq!(self.names[gauge - 1].0, Kind::Gauge);
            *self.values.borrow_mut().entry(gauge).or_default() += 1;
        }
        fn gauge_down(&self, gauge: StatId) {
            assert_eq!(self.names[gauge - 1].0, Kind::Gauge);
            *self.values.borrow_mut().entry(gauge).or_default() -= 1;
        }
    }

    fn record(mode: Option<Mode>, fallback: Option<&'static str>) -> PeerRecord {
        PeerRecord {
            identity: None,
            mode,
            fallback,
        }
    }

    fn pairs(expected: &[(&str, i64)]) -> Vec<(String, i64)> {
        let mut v: Vec<_> = expected.iter().map(|(n, v)| (n.to_string(), *v)).collect();
        v.sort();
        v
    }

    #[test]
    fn every_mode_and_reason_has_its_own_stats() {
        let mut r = Recorded::default();
        r.ids();
        let mut names: Vec<&str> = r.names.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(
            names.len(),
            4 * Mode::ALL.len() + FALLBACK_REASONS.len() + 1
        );
        for name in [
            "shunt.mode.cut_through.connections_total",
            "shunt.mode.tls.connections_active",
            "shunt.mode.plain.rx_bytes_total",
            "shunt.mode.plain.tx_bytes_total",
            "shunt.reason.peer_without_shunt.fallbacks_total",
            "shunt.reason.other.fallbacks_total",
        ] {
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
        let gauges = r.names.iter().filter(|(k, _)| *k == Kind::Gauge).count();
        assert_eq!(gauges, Mode::ALL.len(), "one active gauge per mode");
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), r.names.len(), "names are unique");
    }

    #[test]
    fn a_connection_counts_once_with_the_bytes_seen_before_its_mode_was_known() {
        let mut r = Recorded::default();
        let ids = r.ids();
        let mut t = Tally::default();
        // A server that speaks first: Envoy writes before the transport socket decided.
        t.data(Direction::Written, 7, &ids, &r);
        assert!(r.nonzero().is_empty());
        let peer = record(Some(Mode::Tls), Some("peer_without_shunt"));
        t.settle(Some(&peer), &ids, &r);
        t.settle(Some(&peer), &ids, &r);
        t.data(Direction::Read, 100, &ids, &r);
        t.data(Direction::Written, 3, &ids, &r);
        t.data(Direction::Read, 0, &ids, &r);
        assert_eq!(
            r.nonzero(),
            pairs(&[
                ("shunt.mode.tls.connections_total", 1),
                ("shunt.mode.tls.connections_active", 1),
                ("shunt.mode.tls.rx_bytes_total", 100),
                ("shunt.mode.tls.tx_bytes_total", 10),
                ("shunt.reason.peer_without_shunt.fallbacks_total", 1),
            ])
        );
        // The close event, then the filter's destruction: the gauge goes down once.
        t.closed(&ids, &r);
        t.closed(&ids, &r);
        assert_eq!(r.get("shunt.mode.tls.connections_active"), 0);
        assert_eq!(r.get("shunt.mode.tls.connections_total"), 1);
    }

    #[test]
    fn a_connection_without_a_record_counts_nothing() {
        let mut r = Recorded::default();
        let ids = r.ids();
        let mut t = Tally::default();
        t.data(Direction::Written, 5, &ids, &r);
        t.settle(None, &ids, &r);
        assert!(!t.unsettled());
        t.data(Direction::Read, 5, &ids, &r);
        t.closed(&ids, &r);
        assert!(r.nonzero().is_empty(), "{:?}", r.nonzero());
    }

    #[test]
    fn a_refused_connection_counts_its_reason_and_no_mode() {
        let mut r = Recorded::default();
        let ids = r.ids();
        let mut t = Tally::default();
        t.settle(Some(&record(None, Some("pairing_denied"))), &ids, &r);
        t.closed(&ids, &r);
        assert_eq!(
            r.nonzero(),
            pairs(&[("shunt.reason.pairing_denied.fallbacks_total", 1)])
        );
    }

    #[test]
    fn an_unlisted_reason_counts_as_other_and_cut_through_counts_none() {
        let mut r = Recorded::default();
        let ids = r.ids();
        let mut t = Tally::default();
        t.settle(Some(&record(None, Some("new_reason"))), &ids, &r);
        let mut t = Tally::default();
        t.settle(Some(&record(Some(Mode::CutThrough), None)), &ids, &r);
        t.data(Direction::Read, 1, &ids, &r);
        assert_eq!(
            r.nonzero(),
            pairs(&[
                ("shunt.reason.other.fallbacks_total", 1),
                ("shunt.mode.cut_through.connections_total", 1),
                ("shunt.mode.cut_through.connections_active", 1),
                ("shunt.mode.cut_through.rx_bytes_total", 1),
            ])
        );
    }
}
