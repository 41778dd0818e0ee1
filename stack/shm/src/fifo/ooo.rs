//! Producer-private bookkeeping of bytes written ahead of the tail (out of order).
//!
//! TCP receives segments out of order and writes them straight into the receive FIFO at their
//! stream position; the tail may only move over contiguous bytes. Like smoltcp's `Assembler`,
//! the written ranges are kept in a fixed array, sorted, merged on overlap or adjacency, and a
//! full array is an error ([`super::FifoError::TooManyHoles`]) rather than an allocation. The
//! array lives in the producer's private memory, never in the segment: a peer cannot corrupt it.
//!
//! Invariant (holds between calls): `iv[..n]` is sorted by start; every interval is non-empty;
//! for consecutive intervals `a`, `b`: `a.end < b.start` (disjoint and not adjacent); every
//! `start > 0`, because an interval reaching the tail is collected at once. Positions are byte
//! offsets relative to the current tail.

/// Maximum number of disjoint out-of-order intervals a producer tracks.
pub const MAX_OOO_INTERVALS: usize = 16;

/// An out-of-order interval, relative to the producer's current tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OooInterval {
    /// Distance from the tail to the first byte of the interval (always > 0).
    pub offset: u32,
    /// Number of bytes in the interval.
    pub len: u32,
}

#[derive(Debug, Clone)]
pub(crate) struct Assembler {
    /// `(start, end)` pairs, end exclusive.
    iv: [(u32, u32); MAX_OOO_INTERVALS],
    n: usize,
    /// Start of the most recently inserted range, for SACK's "most recent block first" rule.
    newest: Option<u32>,
}

/// The insertion needs a new interval but all slots are in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooManyHoles;

impl Assembler {
    pub(crate) const fn new() -> Assembler {
        Assembler {
            iv: [(0, 0); MAX_OOO_INTERVALS],
            n: 0,
            newest: None,
        }
    }

    /// Indices `[i, j)` of the intervals that overlap or touch `[start, end)`.
    fn span(&self, start: u32, end: u32) -> (usize, usize) {
        let live = &self.iv[..self.n];
        let i = live.partition_point(|&(_, e)| e < start);
        let j = live.partition_point(|&(s, _)| s <= end);
        (i, j.max(i))
    }

    /// Records `[start, end)` (relative to the tail, `0 < start < end`) as written. Checks
    /// capacity first, so on error nothing changed.
    pub(crate) fn insert(&mut self, start: u32, end: u32) -> Result<(), TooManyHoles> {
        debug_assert!(start > 0 && start < end);
        let (i, j) = self.span(start, end);
        if i == j {
            if self.n == MAX_OOO_INTERVALS {
                return Err(TooManyHoles);
            }
            self.iv.copy_within(i..self.n, i + 1);
            self.iv[i] = (start, end);
            self.n += 1;
        } else {
            let merged = (start.min(self.iv[i].0), end.max(self.iv[j - 1].1));
            self.iv[i] = merged;
            self.iv.copy_within(j..self.n, i + 1);
            self.n -= j - i - 1;
        }
        self.newest = Some(start);
        Ok(())
    }

    /// Whether `insert(start, end)` would succeed.
    pub(crate) fn can_insert(&self, start: u32, end: u32) -> bool {
        let (i, j) = self.span(start, end);
        i < j || self.n < MAX_OOO_INTERVALS
    }

    /// The tail moved forward by `k` bytes written in order. Collects every interval the new
    /// tail reaches and rebases the rest; returns how many bytes *beyond* `k` the tail may
    /// additionally advance.
    pub(crate) fn advance(&mut self, k: u32) -> u32 {
        if self.n == 0 {
            return 0;
        }
        let mut base = k;
        let mut taken = 0;
        while taken < self.n && self.iv[taken].0 <= base {
            base = base.max(self.iv[taken].1);
            taken += 1;
        }
        self.iv.copy_within(taken..self.n, 0);
        self.n -= taken;
        for iv in &mut self.iv[..self.n] {
            iv.0 -= base;
            iv.1 -= base;
        }
        self.newest = self
            .newest
            .and_then(|s| s.checked_sub(base))
            .filter(|&s| s > 0);
        base - k
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = OooInterval> + '_ {
        self.iv[..self.n].iter().map(|&(s, e)| OooInterval {
            offset: s,
            len: e - s,
        })
    }

    /// The interval containing the most recently inserted range, if it is still pending.
    pub(crate) fn newest(&self) -> Option<OooInterval> {
        let s = self.newest?;
        self.iter()
            .find(|iv| iv.offset <= s && s < iv.offset + iv.len)
    }

    pub(crate) fn len(&self) -> usize {
        self.n
    }

    /// End of the furthest interval (0 when empty): the producer must keep this much space.
    #[cfg(test)]
    pub(crate) fn extent(&self) -> u32 {
        if self.n == 0 {
            0
        } else {
            self.iv[self.n - 1].1
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn ivs(a: &Assembler) -> Vec<(u32, u32)> {
        a.iter().map(|i| (i.offset, i.offset + i.len)).collect()
    }

    #[test]
    fn insert_keeps_sorted_disjoint() {
        let mut a = Assembler::new();
        a.insert(10, 20).unwrap();
        a.insert(30, 40).unwrap();
        a.insert(2, 5).unwrap();
        assert_eq!(ivs(&a), vec![(2, 5), (10, 20), (30, 40)]);
        // Adjacent on both sides merges three into one.
        a.insert(20, 30).unwrap();
        assert_eq!(ivs(&a), vec![(2, 5), (10, 40)]);
        // Overlapping a range and extending it.
        a.insert(4, 12).unwrap();
        assert_eq!(ivs(&a), vec![(2, 40)]);
        // Contained: no change.
        a.insert(3, 6).unwrap();
        assert_eq!(ivs(&a), vec![(2, 40)]);
        assert_eq!(a.newest(), Some(OooInterval { offset: 2, len: 38 }));
    }

    #[test]
    fn advance_collects_and_rebases() {
        let mut a = Assembler::new();
        a.insert(5, 10).unwrap();
        a.insert(20, 25).unwrap();
        assert_eq!(a.advance(3), 0);
        assert_eq!(ivs(&a), vec![(2, 7), (17, 22)]);
        // Reaching the start of the first interval collects it.
        assert_eq!(a.advance(2), 5);
        assert_eq!(ivs(&a), vec![(10, 15)]);
        // Overshooting an interval entirely.
        assert_eq!(a.advance(100), 0);
        assert!(ivs(&a).is_empty());
        assert_eq!(a.newest(), None);
    }

    #[test]
    fn too_many_holes() {
        let mut a = Assembler::new();
        for k in 0..MAX_OOO_INTERVALS as u32 {
            a.insert(10 * k + 1, 10 * k + 5).unwrap();
        }
        assert_eq!(a.len(), MAX_OOO_INTERVALS);
        assert!(!a.can_insert(1000, 1001));
        assert_eq!(a.insert(1000, 1001), Err(TooManyHoles));
        assert_eq!(a.len(), MAX_OOO_INTERVALS);
        // Merging into an existing interval still works when full.
        assert!(a.can_insert(5, 11));
        a.insert(5, 11).unwrap();
        assert_eq!(a.len(), MAX_OOO_INTERVALS - 1);
        assert_eq!(a.extent(), 10 * (MAX_OOO_INTERVALS as u32 - 1) + 5);
    }
}
