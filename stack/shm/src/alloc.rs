//! Process-private first-fit allocator of byte ranges inside a segment.
//!
//! # Why it is private
//!
//! VPP keeps its segment freelists *inside* the segment and updates them with CAS from both
//! processes, so a misbehaving app can corrupt the daemon's allocator. Shunt's segments are carved
//! by exactly one process (the one that created the segment), so the allocator's bookkeeping lives
//! in that process's heap, where no peer can reach it. The peer learns offsets through control
//! messages and validates what it finds there (FIFO and ring attach checks), never trusting a
//! shared free list.
//!
//! First fit over an address-ordered free map keeps the code obviously correct; allocations are
//! rare (one FIFO pair per session) compared with the data path, and neighbouring free ranges are
//! coalesced on every free so fragmentation stays bounded by the live allocations.

use std::collections::BTreeMap;

use crate::segment::SEGMENT_HEADER_LEN;

/// First-fit allocator of `[offset, offset + len)` ranges of a segment, starting after the
/// segment header.
#[derive(Debug, Clone)]
pub struct SegmentAllocator {
    segment_len: usize,
    /// Free ranges, keyed by start, never adjacent to each other (always coalesced).
    free: BTreeMap<usize, usize>,
    /// Live allocations: offset -> length.
    live: BTreeMap<usize, usize>,
    free_bytes: usize,
}

impl SegmentAllocator {
    /// An allocator for a segment of `segment_len` bytes; the first [`SEGMENT_HEADER_LEN`] bytes
    /// are never handed out.
    pub fn new(segment_len: usize) -> SegmentAllocator {
        let mut free = BTreeMap::new();
        let usable = segment_len.saturating_sub(SEGMENT_HEADER_LEN);
        if usable > 0 {
            free.insert(SEGMENT_HEADER_LEN, usable);
        }
        SegmentAllocator {
            segment_len,
            free,
            live: BTreeMap::new(),
            free_bytes: usable,
        }
    }

    /// Allocates `len` bytes aligned to `align` (a power of two); returns the offset, or `None`
    /// when `len` is zero, `align` is not a power of two, or no free range is large enough.
    pub fn alloc(&mut self, len: usize, align: usize) -> Option<usize> {
        if len == 0 || !align.is_power_of_two() {
            return None;
        }
        let (start, flen, aligned) = self.free.iter().find_map(|(&start, &flen)| {
            let aligned = start.checked_add(align - 1)? & !(align - 1);
            let end = start + flen;
            (aligned.checked_add(len)? <= end).then_some((start, flen, aligned))
        })?;
        self.free.remove(&start);
        if aligned > start {
            self.free.insert(start, aligned - start);
        }
        let tail_start = aligned + len;
        let end = start + flen;
        if tail_start < end {
            self.free.insert(tail_start, end - tail_start);
        }
        self.live.insert(aligned, len);
        self.free_bytes -= len;
        Some(aligned)
    }

    /// Frees the allocation starting at `offset`. Returns `false` (and changes nothing) when
    /// `offset` is not the start of a live allocation, e.g. on a double free.
    pub fn free(&mut self, offset: usize) -> bool {
        let Some(len) = self.live.remove(&offset) else {
            return false;
        };
        self.free_bytes += len;
        let mut start = offset;
        let mut flen = len;
        if let Some((&pstart, &plen)) = self.free.range(..offset).next_back()
            && pstart + plen == offset
        {
            self.free.remove(&pstart);
            start = pstart;
            flen += plen;
        }
        if let Some(nlen) = self.free.remove(&(offset + len)) {
            flen += nlen;
        }
        self.free.insert(start, flen);
        true
    }

    /// Length of the live allocation at `offset`, if any.
    pub fn allocation_len(&self, offset: usize) -> Option<usize> {
        self.live.get(&offset).copied()
    }

    /// Bytes not currently allocated (alignment gaps included).
    pub fn free_bytes(&self) -> usize {
        self.free_bytes
    }

    /// Bytes in live allocations.
    pub fn used_bytes(&self) -> usize {
        self.segment_len.saturating_sub(SEGMENT_HEADER_LEN) - self.free_bytes
    }

    /// Length of the largest free range (an allocation with alignment 1 of at most this size
    /// succeeds).
    pub fn largest_free(&self) -> usize {
        self.free.values().copied().max().unwrap_or(0)
    }

    /// The segment length this allocator was built for.
    pub fn segment_len(&self) -> usize {
        self.segment_len
    }

    /// Number of free ranges (a measure of fragmentation).
    pub fn free_ranges(&self) -> usize {
        self.free.len()
    }

    /// Number of live allocations.
    pub fn live_allocations(&self) -> usize {
        self.live.len()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const H: usize = SEGMENT_HEADER_LEN;

    #[test]
    fn starts_after_header() {
        let mut a = SegmentAllocator::new(4096);
        assert_eq!(a.free_bytes(), 4096 - H);
        assert_eq!(a.used_bytes(), 0);
        assert_eq!(a.alloc(16, 1), Some(H));
        assert_eq!(a.used_bytes(), 16);
        assert_eq!(a.allocation_len(H), Some(16));
    }

    #[test]
    fn tiny_segment_has_nothing_to_give() {
        let mut a = SegmentAllocator::new(H);
        assert_eq!(a.free_bytes(), 0);
        assert_eq!(a.alloc(1, 1), None);
        let mut a = SegmentAllocator::new(0);
        assert_eq!(a.used_bytes(), 0);
        assert_eq!(a.alloc(1, 1), None);
    }

    #[test]
    fn rejects_zero_len_and_bad_align() {
        let mut a = SegmentAllocator::new(4096);
        assert_eq!(a.alloc(0, 8), None);
        assert_eq!(a.alloc(8, 3), None);
        assert_eq!(a.alloc(8, 0), None);
        assert_eq!(a.alloc(usize::MAX, 1), None);
        assert_eq!(a.alloc(8, 1 << 62), None);
    }

    #[test]
    fn alignment_leaves_reusable_gap() {
        let mut a = SegmentAllocator::new(8192);
        let x = a.alloc(10, 1).unwrap();
        assert_eq!(x, H);
        let y = a.alloc(100, 4096).unwrap();
        assert_eq!(y, 4096);
        // The gap between x and y is still usable.
        let z = a.alloc(64, 64).unwrap();
        assert_eq!(z, 128);
        assert_eq!(a.used_bytes(), 174);
        assert_eq!(a.free_bytes(), 8192 - H - 174);
    }

    #[test]
    fn free_coalesces_neighbours() {
        let mut a = SegmentAllocator::new(4096);
        let x = a.alloc(100, 1).unwrap();
        let y = a.alloc(100, 1).unwrap();
        let z = a.alloc(100, 1).unwrap();
        assert!(a.free(x));
        assert!(a.free(z));
        assert_eq!(a.free_ranges(), 2);
        assert!(a.free(y));
        assert_eq!(a.free_ranges(), 1);
        assert_eq!(a.largest_free(), 4096 - H);
        assert_eq!(a.alloc(4096 - H, 1), Some(H));
    }

    #[test]
    fn double_free_and_unknown_offsets_are_ignored() {
        let mut a = SegmentAllocator::new(4096);
        let x = a.alloc(100, 1).unwrap();
        assert!(!a.free(x + 1));
        assert!(a.free(x));
        assert!(!a.free(x));
        assert!(!a.free(usize::MAX));
        assert_eq!(a.used_bytes(), 0);
        assert_eq!(a.live_allocations(), 0);
    }

    #[test]
    fn first_fit_reuses_lowest_hole() {
        let mut a = SegmentAllocator::new(4096);
        let v: Vec<_> = (0..5).map(|_| a.alloc(64, 64).unwrap()).collect();
        assert!(a.free(v[1]));
        assert!(a.free(v[3]));
        assert_eq!(a.alloc(64, 64), Some(v[1]));
        assert_eq!(a.alloc(64, 64), Some(v[3]));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc { len: usize, align_log2: u32 },
        Free { pick: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (1usize..3000, 0u32..13).prop_map(|(len, align_log2)| Op::Alloc { len, align_log2 }),
            2 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        ]
    }

    proptest! {
        #[test]
        #[cfg_attr(miri, ignore = "slow under Miri; no unsafe involved")]
        fn live_allocations_never_overlap(
            seg_pages in 1usize..8,
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let seg_len = seg_pages * 4096;
            let mut a = SegmentAllocator::new(seg_len);
            let mut live: Vec<(usize, usize)> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc { len, align_log2 } => {
                        let align = 1usize << align_log2;
                        if let Some(off) = a.alloc(len, align) {
                            prop_assert_eq!(off % align, 0);
                            prop_assert!(off >= H);
                            prop_assert!(off + len <= seg_len);
                            for &(o, l) in &live {
                                prop_assert!(off + len <= o || o + l <= off,
                                    "overlap: [{}, {}) vs [{}, {})", off, off + len, o, o + l);
                            }
                            live.push((off, len));
                        } else {
                            // First fit must not fail when an aligned fit obviously exists in an
                            // empty allocator.
                            if live.is_empty() {
                                let first = H.next_multiple_of(align);
                                prop_assert!(first + len > seg_len);
                            }
                        }
                    }
                    Op::Free { pick } => {
                        if !live.is_empty() {
                            let (off, _) = live.swap_remove(pick % live.len());
                            prop_assert!(a.free(off));
                            prop_assert!(!a.free(off));
                        }
                    }
                }
                let used: usize = live.iter().map(|&(_, l)| l).sum();
                prop_assert_eq!(a.used_bytes(), used);
                prop_assert_eq!(a.free_bytes() + a.used_bytes(), seg_len - H);
                prop_assert_eq!(a.live_allocations(), live.len());
            }
            for (off, _) in live.drain(..) {
                prop_assert!(a.free(off));
            }
            prop_assert_eq!(a.free_ranges(), 1);
            prop_assert_eq!(a.largest_free(), seg_len - H);
        }
    }
}
