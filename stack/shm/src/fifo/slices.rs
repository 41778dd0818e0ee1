//! Zero-copy views of a FIFO's data area: the only place the FIFO creates references into shared
//! memory.
//!
//! # Why this is sound
//!
//! A FIFO's data area of `capacity` bytes is split, at every instant, into the readable range
//! `[head, tail)` and the writable range `[tail, head + capacity)` (positions taken modulo the
//! capacity). The producer only ever writes inside the writable range *as it sees it*: its own
//! private `tail` and a `head` it loaded, validated, and which can only be older (smaller) than the
//! consumer's real head, so its range is a subset of the real writable range. Symmetrically the
//! consumer reads only inside `[head, tail_seen)`, a subset of the real readable range. The two
//! subsets are disjoint, so a `&[u8]` handed to the consumer and a `&mut [u8]` handed to the
//! producer never overlap.
//!
//! Within this process, there is at most one producer and one consumer per FIFO and region: the
//! endpoint types are neither `Clone` nor `Sync` and attach claims `(offset, role)` in the
//! [`Region`] (see `region`'s docs). The slices borrow the endpoint (`&self` for reads, `&mut self`
//! for writes), so `release`/`commit` — the calls that move the index and hand the range to the
//! other side — cannot run while a slice is alive.
//!
//! Across processes, the peer's writes are outside the Rust abstract machine: a hostile peer can
//! change bytes under a `ReadSlices`, which is why payload bytes are documented as untrusted
//! content. What no peer can do is make these slices point outside the FIFO's data area: the
//! ranges are computed from private capacity/mask and a validated length `<= capacity`.
//!
//! The residual assumption is that the shared `head`/`tail` words are written only by the two
//! endpoints. If *both* endpoints live in this process and a third process that also maps the
//! segment forges an index, the subsets above are no longer guaranteed disjoint; use the copying
//! API (`enqueue`/`dequeue`) for FIFOs whose both ends are local and whose segment is shared with
//! an untrusted third party.

#![allow(unsafe_code)]

use std::io::{IoSlice, IoSliceMut};

use crate::region::{OutOfBounds, Region};

/// Up to two readable byte ranges (two when the data wraps around the end of the data area).
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadSlices<'a> {
    /// Bytes at the head.
    pub first: &'a [u8],
    /// Bytes following `first` after the wrap-around (empty if none).
    pub second: &'a [u8],
}

impl<'a> ReadSlices<'a> {
    /// Total number of readable bytes.
    pub fn len(&self) -> usize {
        self.first.len() + self.second.len()
    }

    /// Whether there is nothing to read.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The two ranges as `IoSlice`s, e.g. for `write_vectored`.
    pub fn as_io_slices(&self) -> [IoSlice<'a>; 2] {
        [IoSlice::new(self.first), IoSlice::new(self.second)]
    }

    /// Copies up to `dst.len()` bytes (in stream order) into `dst`; returns how many.
    pub fn copy_to(&self, dst: &mut [u8]) -> usize {
        let a = self.first.len().min(dst.len());
        dst[..a].copy_from_slice(&self.first[..a]);
        let b = self.second.len().min(dst.len() - a);
        dst[a..a + b].copy_from_slice(&self.second[..b]);
        a + b
    }
}

/// Up to two writable byte ranges at the tail (two when the free space wraps around).
#[derive(Debug, Default)]
pub struct WriteSlices<'a> {
    /// Space at the tail.
    pub first: &'a mut [u8],
    /// Space following `first` after the wrap-around (empty if none).
    pub second: &'a mut [u8],
}

impl WriteSlices<'_> {
    /// Total number of writable bytes.
    pub fn len(&self) -> usize {
        self.first.len() + self.second.len()
    }

    /// Whether there is no space.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The two ranges as `IoSliceMut`s, e.g. for `read_vectored`.
    pub fn as_io_slices_mut(&mut self) -> [IoSliceMut<'_>; 2] {
        [IoSliceMut::new(self.first), IoSliceMut::new(self.second)]
    }

    /// Copies up to `self.len()` bytes of `src` into the space, in stream order; returns how
    /// many. Call `Producer::commit` with the result to publish them.
    pub fn fill_from(&mut self, src: &[u8]) -> usize {
        let a = self.first.len().min(src.len());
        self.first[..a].copy_from_slice(&src[..a]);
        let b = self.second.len().min(src.len() - a);
        self.second[..b].copy_from_slice(&src[a..a + b]);
        a + b
    }
}

/// Splits `len` bytes starting at free-running `pos` into at most two ranges of the data area
/// (offsets relative to `data`).
fn split(mask: u32, pos: u32, len: u32) -> ((usize, usize), (usize, usize)) {
    let cap = mask as usize + 1;
    let len = (len as usize).min(cap);
    let start = (pos & mask) as usize;
    let first = len.min(cap - start);
    ((start, first), (0, len - first))
}

/// The readable range `[pos, pos + len)` of the FIFO whose data area starts at `data`.
///
/// The caller is the FIFO's unique consumer in this process (claimed), `pos` is its private head
/// and `len <= capacity` the validated readable length.
pub(super) fn read_slices(
    region: &Region,
    data: usize,
    mask: u32,
    pos: u32,
    len: u32,
) -> Result<ReadSlices<'_>, OutOfBounds> {
    let ((s1, l1), (s2, l2)) = split(mask, pos, len);
    // SAFETY: the ranges lie in the FIFO's data area (bounds-checked again by `slice`) and inside
    // the readable range `[head, tail)`, which no in-process writer touches while the consumer
    // holds this borrow (module docs: SPSC disjointness + claims).
    let first = unsafe { region.slice(data + s1, l1) }?;
    // SAFETY: as above; the second range is the wrapped continuation, disjoint from the first.
    let second = unsafe { region.slice(data + s2, l2) }?;
    Ok(ReadSlices { first, second })
}

/// The writable range `[pos, pos + len)` of the FIFO whose data area starts at `data`.
///
/// The caller is the FIFO's unique producer in this process (claimed), `pos` is its private
/// tail and `len` at most the validated free space.
pub(super) fn write_slices(
    region: &Region,
    data: usize,
    mask: u32,
    pos: u32,
    len: u32,
) -> Result<WriteSlices<'_>, OutOfBounds> {
    let ((s1, l1), (s2, l2)) = split(mask, pos, len);
    // SAFETY: the range lies in the FIFO's data area and inside the writable range
    // `[tail, head + capacity)`, which no in-process reader or other writer touches while the
    // producer holds this exclusive borrow (module docs). `split` never returns overlapping
    // ranges (`l1 + l2 <= capacity`, the second starts at 0 and ends before the first starts).
    let first = unsafe { region.slice_mut(data + s1, l1) }?;
    // SAFETY: as above, and disjoint from `first`.
    let second = unsafe { region.slice_mut(data + s2, l2) }?;
    Ok(WriteSlices { first, second })
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn split_wraps() {
        assert_eq!(split(15, 0, 10), ((0, 10), (0, 0)));
        assert_eq!(split(15, 12, 10), ((12, 4), (0, 6)));
        assert_eq!(split(15, u32::MAX, 3), ((15, 1), (0, 2)));
        assert_eq!(split(15, 16, 16), ((0, 16), (0, 0)));
        // Never more than the capacity.
        assert_eq!(split(15, 3, 100), ((3, 13), (0, 3)));
    }

    #[test]
    fn read_and_write_slices_helpers() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 4];
        let mut w = WriteSlices {
            first: &mut a,
            second: &mut b,
        };
        assert_eq!(w.len(), 7);
        assert_eq!(w.fill_from(b"abcdefghij"), 7);
        assert_eq!(w.as_io_slices_mut().len(), 2);
        let r = ReadSlices {
            first: &a,
            second: &b,
        };
        let mut out = [0u8; 5];
        assert_eq!(r.copy_to(&mut out), 5);
        assert_eq!(&out, b"abcde");
        assert_eq!(r.len(), 7);
        assert!(!r.is_empty());
        assert!(ReadSlices::default().is_empty());
        assert_eq!(r.as_io_slices()[1].len(), 4);
    }
}
