//! What a FIFO's and a ring's shared header have in common, and what attaching to one means.
//!
//! Both structures start with a meta line holding a magic and a capacity, sit at an aligned
//! offset, and must fit their region. Attaching reads the capacity once and keeps it privately
//! (a hostile peer may rewrite the shared copy at any time), and claims the endpoint role so that
//! one region never hands out two producers or two consumers of the same structure. The foreign
//! index is then always judged against the private capacity: `tail - head` beyond it means the
//! peer is corrupt, for good.

use std::cell::Cell;
use std::sync::Arc;

use crate::region::{OutOfBounds, Region, Role};
use crate::sync::{AtomicU32, Ordering};

/// Offset of the magic in the meta line.
pub(crate) const OFF_MAGIC: usize = 0;
/// Offset of the capacity in the meta line.
pub(crate) const OFF_CAPACITY: usize = 4;

pub(crate) type SharedRegion = Arc<dyn AsRef<Region> + Send + Sync>;

/// What sets one kind of structure apart.
pub(crate) struct Kind {
    pub(crate) magic: u32,
    pub(crate) align: usize,
    pub(crate) header_len: usize,
    pub(crate) min_capacity: u32,
    pub(crate) max_capacity: u32,
    /// Bytes a structure of a given capacity occupies, header included.
    pub(crate) footprint: fn(u32) -> usize,
}

/// Why a header cannot be attached to or initialised; each kind's error type takes these in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeaderError {
    InvalidCapacity(u32),
    Misaligned(usize),
    OutOfBounds(OutOfBounds),
    BadMagic(u32),
    AlreadyAttached,
}

impl From<OutOfBounds> for HeaderError {
    fn from(e: OutOfBounds) -> Self {
        HeaderError::OutOfBounds(e)
    }
}

impl Kind {
    /// A power of two within the kind's bounds.
    pub(crate) fn check_capacity(&self, capacity: u32) -> Result<(), HeaderError> {
        if capacity.is_power_of_two() && (self.min_capacity..=self.max_capacity).contains(&capacity)
        {
            Ok(())
        } else {
            Err(HeaderError::InvalidCapacity(capacity))
        }
    }

    /// Aligned, and the whole structure fits the region.
    pub(crate) fn check_placement(
        &self,
        region: &Region,
        offset: usize,
        capacity: u32,
    ) -> Result<(), HeaderError> {
        if !offset.is_multiple_of(self.align) {
            return Err(HeaderError::Misaligned(offset));
        }
        let len = (self.footprint)(capacity);
        match offset.checked_add(len) {
            Some(end) if end <= region.len() => Ok(()),
            _ => Err(HeaderError::OutOfBounds(OutOfBounds {
                offset,
                len,
                region_len: region.len(),
            })),
        }
    }

    /// Checks alignment and magic, then reads the capacity (once; callers keep the private
    /// copy) and checks it and that the whole structure fits the region.
    pub(crate) fn validated_capacity(
        &self,
        region: &Region,
        offset: usize,
    ) -> Result<u32, HeaderError> {
        if !offset.is_multiple_of(self.align) {
            return Err(HeaderError::Misaligned(offset));
        }
        let magic = region
            .atomic_u32(offset + OFF_MAGIC)?
            .load(Ordering::Acquire);
        if magic != self.magic {
            return Err(HeaderError::BadMagic(magic));
        }
        let capacity = region
            .atomic_u32(offset + OFF_CAPACITY)?
            .load(Ordering::Relaxed);
        self.check_capacity(capacity)?;
        self.check_placement(region, offset, capacity)?;
        Ok(capacity)
    }
}

/// One endpoint's private, validated view of a structure's geometry, holding its role's claim
/// until dropped.
pub(crate) struct Claimed {
    region: SharedRegion,
    /// Offset of the header.
    pub(crate) offset: usize,
    /// Offset of the data area.
    pub(crate) data: usize,
    pub(crate) capacity: u32,
    pub(crate) mask: u32,
    role: Role,
    /// Set once the peer has published an impossible index.
    pub(crate) corrupt: Cell<bool>,
}

impl Claimed {
    /// Validates the header at `offset`, copies the geometry and claims `role`.
    pub(crate) fn attach(
        kind: &Kind,
        region: SharedRegion,
        offset: usize,
        role: Role,
    ) -> Result<Claimed, HeaderError> {
        let r: &Region = (*region).as_ref();
        let capacity = kind.validated_capacity(r, offset)?;
        if !r.claim(offset, role) {
            return Err(HeaderError::AlreadyAttached);
        }
        Ok(Claimed {
            data: offset + kind.header_len,
            region,
            offset,
            capacity,
            mask: capacity - 1,
            role,
            corrupt: Cell::new(false),
        })
    }

    pub(crate) fn region(&self) -> &Region {
        (*self.region).as_ref()
    }

    /// A header word. The header was bounds- and alignment-checked at attach and the region
    /// never shrinks, so this cannot fail; callers still handle `None` instead of panicking.
    pub(crate) fn word(&self, field: usize) -> Option<&AtomicU32> {
        self.region().atomic_u32(self.offset + field).ok()
    }

    /// `tail - head`, or `None` once the indices have been impossible (more than the
    /// capacity apart): from then on the endpoint stays corrupt.
    pub(crate) fn used(&self, head: u32, tail: u32) -> Option<u32> {
        if self.corrupt.get() {
            return None;
        }
        let used = tail.wrapping_sub(head);
        if used > self.capacity {
            self.corrupt.set(true);
            return None;
        }
        Some(used)
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        let (offset, role) = (self.offset, self.role);
        self.region().release_claim(offset, role);
    }
}
