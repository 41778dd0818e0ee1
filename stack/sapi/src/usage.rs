//! Usage reports: what an app's connections did, sent to shuntd for its metrics.
//!
//! The labels come from an app, so they are checked: a handful of short snake_case words per
//! family, so that no app can blow up the cardinality of shuntd's metrics.

use shunt_proto::sapi as pb;

use crate::message::DecodeError;

/// Most labels per family in one report.
pub const MAX_LABELS: usize = 32;
/// Longest label.
pub const MAX_LABEL_LEN: usize = 48;
/// Most pairing latencies in one report.
pub const MAX_LATENCIES: usize = 1024;

/// Counts since the app's previous report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageReport {
    /// Connections by mode (`cut_through`, `tls`, `plain`).
    pub connections: Vec<(String, u64)>,
    /// Payload bytes received, by mode.
    pub bytes: Vec<(String, u64)>,
    /// Connections that did not go cut-through, by reason.
    pub fallbacks: Vec<(String, u64)>,
    /// Failed TLS handshakes, by reason.
    pub handshake_failures: Vec<(String, u64)>,
    /// Microseconds from offer to FIFO pair, one per pairing.
    pub pairing_latency_us: Vec<u32>,
}

impl UsageReport {
    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
            && self.bytes.is_empty()
            && self.fallbacks.is_empty()
            && self.handshake_failures.is_empty()
            && self.pairing_latency_us.is_empty()
    }
}

fn is_label(label: &str) -> bool {
    (1..=MAX_LABEL_LEN).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn counts(
    field: &'static str,
    wire: Vec<pb::LabeledCount>,
) -> Result<Vec<(String, u64)>, DecodeError> {
    if wire.len() > MAX_LABELS {
        return Err(DecodeError::TooMany(field));
    }
    wire.into_iter()
        .map(|c| {
            if is_label(&c.label) {
                Ok((c.label, c.count))
            } else {
                Err(DecodeError::Invalid(field))
            }
        })
        .collect()
}

impl TryFrom<pb::UsageReport> for UsageReport {
    type Error = DecodeError;

    fn try_from(r: pb::UsageReport) -> Result<Self, DecodeError> {
        if r.pairing_latency_us.len() > MAX_LATENCIES {
            return Err(DecodeError::TooMany("pairing_latency_us"));
        }
        Ok(Self {
            connections: counts("connections", r.connections)?,
            bytes: counts("bytes", r.bytes)?,
            fallbacks: counts("fallbacks", r.fallbacks)?,
            handshake_failures: counts("handshake_failures", r.handshake_failures)?,
            pairing_latency_us: r.pairing_latency_us,
        })
    }
}

impl From<&UsageReport> for pb::UsageReport {
    fn from(r: &UsageReport) -> Self {
        let wire = |counts: &[(String, u64)]| {
            counts
                .iter()
                .map(|(label, count)| pb::LabeledCount {
                    label: label.clone(),
                    count: *count,
                })
                .collect()
        };
        Self {
            connections: wire(&r.connections),
            bytes: wire(&r.bytes),
            fallbacks: wire(&r.fallbacks),
            handshake_failures: wire(&r.handshake_failures),
            pairing_latency_us: r.pairing_latency_us.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> UsageReport {
        UsageReport {
            connections: vec![("cut_through".into(), 3), ("tls".into(), 1)],
            bytes: vec![("cut_through".into(), 1 << 30)],
            fallbacks: vec![("shuntd_down".into(), 1)],
            handshake_failures: vec![("untrusted_ca".into(), 2)],
            pairing_latency_us: vec![80, 120],
        }
    }

    #[test]
    fn round_trips() {
        let r = report();
        assert_eq!(UsageReport::try_from(pb::UsageReport::from(&r)), Ok(r));
    }

    #[test]
    fn refuses_labels_that_would_pollute_metrics() {
        for bad in [
            "",
            "Upper",
            "with space",
            "quote\"",
            &"x".repeat(MAX_LABEL_LEN + 1),
        ] {
            let mut r = report();
            r.fallbacks = vec![(bad.to_owned(), 1)];
            assert_eq!(
                UsageReport::try_from(pb::UsageReport::from(&r)),
                Err(DecodeError::Invalid("fallbacks")),
                "{bad:?}"
            );
        }
        let mut r = report();
        r.connections = (0..=MAX_LABELS).map(|i| (format!("m{i}"), 1)).collect();
        assert_eq!(
            UsageReport::try_from(pb::UsageReport::from(&r)),
            Err(DecodeError::TooMany("connections"))
        );
        let mut r = report();
        r.pairing_latency_us = vec![1; MAX_LATENCIES + 1];
        assert_eq!(
            UsageReport::try_from(pb::UsageReport::from(&r)),
            Err(DecodeError::TooMany("pairing_latency_us"))
        );
    }
}
