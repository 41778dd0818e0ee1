//! Log lines that a hostile app can trigger at will, kept to one per interval per kind.
//!
//! A refusal is worth a log line, but an app retrying in a loop (or a node out of file
//! descriptors, where every accept fails) must not turn shuntd's log into the attack: once a
//! kind of line was written, the next one waits for the interval, and says how many were held
//! back. Metrics count every occurrence.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often one kind of line may be written.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct LogThrottle {
    kinds: Mutex<HashMap<&'static str, Kind>>,
}

#[derive(Debug)]
struct Kind {
    last: Instant,
    held_back: u64,
}

impl LogThrottle {
    /// Whether a line of `kind` may be written now: `Some(n)` with the number held back since
    /// the last one, or `None` to skip this one.
    pub fn admit(&self, kind: &'static str) -> Option<u64> {
        self.admit_at(kind, Instant::now())
    }

    fn admit_at(&self, kind: &'static str, now: Instant) -> Option<u64> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        match kinds.get_mut(kind) {
            Some(k) if now.duration_since(k.last) < LOG_INTERVAL => {
                k.held_back += 1;
                None
            }
            Some(k) => {
                k.last = now;
                Some(std::mem::take(&mut k.held_back))
            }
            None => {
                kinds.insert(
                    kind,
                    Kind {
                        last: now,
                        held_back: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_per_kind_with_the_count_held_back() {
        let t = LogThrottle::default();
        let start = Instant::now();
        assert_eq!(t.admit_at("accept", start), Some(0));
        for _ in 0..1000 {
            assert_eq!(t.admit_at("accept", start + Duration::from_secs(1)), None);
        }
        assert_eq!(t.admit_at("limit", start), Some(0), "kinds are apart");
        assert_eq!(t.admit_at("accept", start + LOG_INTERVAL), Some(1000));
        assert_eq!(t.admit_at("accept", start + LOG_INTERVAL), None);
    }
}
