//! What sidecars' transports report about their connections (Envoy's module cannot export
//! metrics itself), kept for `/metrics`.
//!
//! Labels come from apps; the session API already restricts their shape, and this caps how
//! many distinct ones each family keeps, so no app can grow the metrics without bound.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};
use shunt_sapi::UsageReport;

/// Distinct labels kept per family; later ones are counted as `other`.
const MAX_DISTINCT_LABELS: usize = 64;

#[derive(Debug)]
pub struct SidecarUsage {
    connections: IntCounterVec,
    bytes: IntCounterVec,
    fallbacks: IntCounterVec,
    handshake_failures: IntCounterVec,
    pairing_seconds: Histogram,
    seen: Mutex<HashMap<&'static str, HashSet<String>>>,
}

impl Default for SidecarUsage {
    fn default() -> Self {
        let vec = |name: &str, help: &str, label: &str| {
            IntCounterVec::new(Opts::new(name, help), &[label]).expect("constant metric options")
        };
        Self {
            connections: vec(
                "sidecar_connections_total",
                "Sidecar connections by the mode that carried their payload.",
                "mode",
            ),
            bytes: vec(
                "sidecar_bytes_total",
                "Payload bytes sidecar connections received, by mode.",
                "mode",
            ),
            fallbacks: vec(
                "sidecar_fallbacks_total",
                "Sidecar connections that did not go cut-through, by reason.",
                "reason",
            ),
            handshake_failures: vec(
                "sidecar_handshake_failures_total",
                "Failed TLS handshakes of sidecar connections, by reason.",
                "reason",
            ),
            pairing_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "sidecar_pairing_seconds",
                    "Time from a sidecar's pairing offer to its FIFO pair.",
                )
                .buckets(vec![
                    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 25e-3, 100e-3,
                ]),
            )
            .expect("constant metric options"),
            seen: Mutex::default(),
        }
    }
}

impl SidecarUsage {
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        for family in [
            &self.connections,
            &self.bytes,
            &self.fallbacks,
            &self.handshake_failures,
        ] {
            registry.register(Box::new(family.clone()))?;
        }
        registry.register(Box::new(self.pairing_seconds.clone()))
    }

    pub fn record(&self, report: &UsageReport) {
        for (family, name, counts) in [
            (&self.connections, "connections", &report.connections),
            (&self.bytes, "bytes", &report.bytes),
            (&self.fallbacks, "fallbacks", &report.fallbacks),
            (
                &self.handshake_failures,
                "handshake_failures",
                &report.handshake_failures,
            ),
        ] {
            for (label, n) in counts {
                let label = self.admit(name, label);
                family.with_label_values(&[label]).inc_by(*n);
            }
        }
        for us in &report.pairing_latency_us {
            self.pairing_seconds.observe(f64::from(*us) / 1e6);
        }
    }

    /// `label`, or `other` once the family holds as many distinct labels as it may.
    fn admit<'a>(&self, family: &'static str, label: &'a str) -> &'a str {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let labels = seen.entry(family).or_default();
        if labels.contains(label) {
            return label;
        }
        if labels.len() < MAX_DISTINCT_LABELS {
            labels.insert(label.to_owned());
            return label;
        }
        "other"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_label_and_caps_distinct_labels() {
        let usage = SidecarUsage::default();
        let registry = Registry::new();
        usage.register(&registry).unwrap();
        usage.record(&UsageReport {
            connections: vec![("tls".into(), 2), ("cut_through".into(), 5)],
            pairing_latency_us: vec![70, 400],
            ..UsageReport::default()
        });
        usage.record(&UsageReport {
            connections: vec![("tls".into(), 1)],
            fallbacks: (0..MAX_DISTINCT_LABELS + 3)
                .map(|i| (format!("reason_{i}"), 1))
                .collect(),
            ..UsageReport::default()
        });
        assert_eq!(usage.connections.with_label_values(&["tls"]).get(), 3);
        assert_eq!(
            usage.connections.with_label_values(&["cut_through"]).get(),
            5
        );
        assert_eq!(usage.fallbacks.with_label_values(&["other"]).get(), 3);
        assert_eq!(usage.pairing_seconds.get_sample_count(), 2);
    }
}
