//! SPSC rings of fixed 64-byte records: the event queues.
//!
//! Layout mirrors the FIFO: a meta line (magic, capacity in records), a consumer line (`head`), a
//! producer line (`tail`), then `capacity` records. Both indices are free-running u32 record
//! counts. The same hostile-peer rules apply: capacity is read once and kept privately, each side
//! trusts only its own private index, and a foreign index implying more than `capacity` records
//! makes the ring `Corrupt` for good.
//!
//! **Waking the consumer.** `push` reports [`Wake::Needed`] when the consumer may have found the
//! ring empty and gone to sleep. Both sides use a store/fence/load (Dekker) pattern: the producer
//! stores `tail`, fences SeqCst and loads `head`; the consumer stores `head`, fences SeqCst and
//! loads `tail` before deciding the ring is empty. With both fences, at least one side sees the
//! other's store: either the consumer sees the new record, or the producer sees the ring as empty
//! after publishing and rings the doorbell. A doorbell is never lost; an extra one is harmless.

use std::sync::Arc;

use crate::region::{OutOfBounds, Region};
use crate::sync::{AtomicU32, Ordering, fence};

/// Bytes per record.
pub const RECORD_LEN: usize = 64;
const HEADER_LEN: usize = 192;
const OFF_MAGIC: usize = 0;
const OFF_CAPACITY: usize = 4;
const OFF_HEAD: usize = 64;
const OFF_TAIL: usize = 128;
const RING_MAGIC: u32 = u32::from_le_bytes(*b"SHR1");
/// Largest ring, in records.
pub const RING_MAX_RECORDS: u32 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("invalid ring capacity {0} (power of two from 2 to 2^20 records)")]
    InvalidCapacity(u32),
    #[error("ring offset {0} is not 64-byte aligned")]
    Misaligned(usize),
    #[error(transparent)]
    OutOfBounds(#[from] OutOfBounds),
    #[error("bad ring magic {0:#010x}")]
    BadMagic(u32),
    #[error("ring indices corrupted by the peer")]
    Corrupt,
    #[error("ring is full")]
    Full,
}

/// Whether the producer must ring the consumer's doorbell after a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    Needed,
    NotNeeded,
}

/// Bytes a ring of `records` records occupies.
pub const fn ring_footprint(records: u32) -> usize {
    HEADER_LEN + records as usize * RECORD_LEN
}

/// Writes a fresh, empty ring at `offset`.
pub fn init_ring(region: &Region, offset: usize, records: u32) -> Result<(), RingError> {
    check(region, offset, records)?;
    region
        .atomic_u32(offset + OFF_HEAD)?
        .store(0, Ordering::Relaxed);
    region
        .atomic_u32(offset + OFF_TAIL)?
        .store(0, Ordering::Relaxed);
    region
        .atomic_u32(offset + OFF_CAPACITY)?
        .store(records, Ordering::Relaxed);
    region
        .atomic_u32(offset + OFF_MAGIC)?
        .store(RING_MAGIC, Ordering::Release);
    Ok(())
}

fn check(region: &Region, offset: usize, records: u32) -> Result<(), RingError> {
    if !records.is_power_of_two() || !(2..=RING_MAX_RECORDS).contains(&records) {
        return Err(RingError::InvalidCapacity(records));
    }
    if !offset.is_multiple_of(64) {
        return Err(RingError::Misaligned(offset));
    }
    let len = ring_footprint(records);
    match offset.checked_add(len) {
        Some(end) if end <= region.len() => Ok(()),
        _ => Err(RingError::OutOfBounds(OutOfBounds {
            offset,
            len,
            region_len: region.len(),
        })),
    }
}

struct Ring {
    region: Arc<dyn AsRef<Region> + Send + Sync>,
    offset: usize,
    capacity: u32,
    corrupt: bool,
}

impl Ring {
    fn attach<R: AsRef<Region> + Send + Sync + 'static>(
        region: Arc<R>,
        offset: usize,
    ) -> Result<Ring, RingError> {
        let r: &Region = (*region).as_ref();
        if !offset.is_multiple_of(64) {
            return Err(RingError::Misaligned(offset));
        }
        let magic = r.atomic_u32(offset + OFF_MAGIC)?.load(Ordering::Acquire);
        if magic != RING_MAGIC {
            return Err(RingError::BadMagic(magic));
        }
        let capacity = r.atomic_u32(offset + OFF_CAPACITY)?.load(Ordering::Relaxed);
        check(r, offset, capacity)?;
        Ok(Ring {
            region,
            offset,
            capacity,
            corrupt: false,
        })
    }

    fn region(&self) -> &Region {
        (*self.region).as_ref()
    }

    fn word(&self, off: usize) -> &AtomicU32 {
        // In bounds: checked against the private capacity at attach.
        self.region()
            .atomic_u32(self.offset + off)
            .expect("ring header checked at attach")
    }

    fn record_offset(&self, index: u32) -> usize {
        self.offset + HEADER_LEN + (index & (self.capacity - 1)) as usize * RECORD_LEN
    }

    /// Records between `head` and `tail`, or Corrupt if impossible.
    fn used(&mut self, head: u32, tail: u32) -> Result<u32, RingError> {
        let used = tail.wrapping_sub(head);
        if used > self.capacity {
            self.corrupt = true;
            return Err(RingError::Corrupt);
        }
        Ok(used)
    }
}

/// The writing end of a ring. `Send`, not `Sync` or `Clone`: one writer.
pub struct RingProducer {
    ring: Ring,
    tail: u32,
}

impl RingProducer {
    pub fn attach<R: AsRef<Region> + Send + Sync + 'static>(
        region: Arc<R>,
        offset: usize,
    ) -> Result<Self, RingError> {
        let mut ring = Ring::attach(region, offset)?;
        let tail = ring.word(OFF_TAIL).load(Ordering::Relaxed);
        let head = ring.word(OFF_HEAD).load(Ordering::Acquire);
        ring.used(head, tail)?;
        Ok(Self { ring, tail })
    }

    /// Free records, as seen now.
    pub fn free_records(&mut self) -> Result<u32, RingError> {
        if self.ring.corrupt {
            return Err(RingError::Corrupt);
        }
        let head = self.ring.word(OFF_HEAD).load(Ordering::Acquire);
        let used = self.ring.used(head, self.tail)?;
        Ok(self.ring.capacity - used)
    }

    /// Appends one record; nothing is written when the ring is full.
    pub fn push(&mut self, record: &[u8; RECORD_LEN]) -> Result<Wake, RingError> {
        if self.free_records()? == 0 {
            return Err(RingError::Full);
        }
        let at = self.ring.record_offset(self.tail);
        self.ring.region().copy_in(at, record)?;
        self.tail = self.tail.wrapping_add(1);
        self.ring.word(OFF_TAIL).store(self.tail, Ordering::Release);
        fence(Ordering::SeqCst);
        let head = self.ring.word(OFF_HEAD).load(Ordering::Acquire);
        // Empty apart from what we just published: the consumer may be asleep.
        let used = self.ring.used(head, self.tail)?;
        Ok(if used == 1 {
            Wake::Needed
        } else {
            Wake::NotNeeded
        })
    }
}

/// The reading end of a ring. `Send`, not `Sync` or `Clone`: one reader.
pub struct RingConsumer {
    ring: Ring,
    head: u32,
}

impl RingConsumer {
    pub fn attach<R: AsRef<Region> + Send + Sync + 'static>(
        region: Arc<R>,
        offset: usize,
    ) -> Result<Self, RingError> {
        let mut ring = Ring::attach(region, offset)?;
        let head = ring.word(OFF_HEAD).load(Ordering::Relaxed);
        let tail = ring.word(OFF_TAIL).load(Ordering::Acquire);
        ring.used(head, tail)?;
        Ok(Self { ring, head })
    }

    /// Takes the oldest record, if any.
    pub fn pop(&mut self) -> Result<Option<[u8; RECORD_LEN]>, RingError> {
        if self.ring.corrupt {
            return Err(RingError::Corrupt);
        }
        let mut tail = self.ring.word(OFF_TAIL).load(Ordering::Acquire);
        if self.ring.used(self.head, tail)? == 0 {
            // Publish our head and look again after the fence: see the module docs.
            fence(Ordering::SeqCst);
            tail = self.ring.word(OFF_TAIL).load(Ordering::Acquire);
            if self.ring.used(self.head, tail)? == 0 {
                return Ok(None);
            }
        }
        let mut rec = [0u8; RECORD_LEN];
        let at = self.ring.record_offset(self.head);
        self.ring.region().copy_out(at, &mut rec)?;
        self.head = self.head.wrapping_add(1);
        self.ring.word(OFF_HEAD).store(self.head, Ordering::Release);
        Ok(Some(rec))
    }

    pub fn is_empty(&mut self) -> Result<bool, RingError> {
        let tail = self.ring.word(OFF_TAIL).load(Ordering::Acquire);
        Ok(self.ring.used(self.head, tail)? == 0)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn ring(records: u32) -> (RingProducer, RingConsumer, Arc<Region>) {
        let r = Arc::new(Region::heap(4096 + ring_footprint(records)));
        init_ring(&r, 64, records).unwrap();
        let p = RingProducer::attach(r.clone(), 64).unwrap();
        let c = RingConsumer::attach(r.clone(), 64).unwrap();
        (p, c, r)
    }

    fn rec(n: u8) -> [u8; RECORD_LEN] {
        [n; RECORD_LEN]
    }

    #[test]
    fn fifo_order_full_and_wake_on_empty_only() {
        let (mut p, mut c, _r) = ring(4);
        assert_eq!(p.push(&rec(1)).unwrap(), Wake::Needed);
        assert_eq!(p.push(&rec(2)).unwrap(), Wake::NotNeeded);
        p.push(&rec(3)).unwrap();
        p.push(&rec(4)).unwrap();
        assert_eq!(p.push(&rec(5)), Err(RingError::Full));
        for n in 1..=4 {
            assert_eq!(c.pop().unwrap(), Some(rec(n)));
        }
        assert_eq!(c.pop().unwrap(), None);
        assert_eq!(p.push(&rec(6)).unwrap(), Wake::Needed);
    }

    #[test]
    fn wraps_around_u32() {
        let (_, _, r) = ring(2);
        for w in [OFF_HEAD, OFF_TAIL] {
            r.atomic_u32(64 + w)
                .unwrap()
                .store(u32::MAX - 1, Ordering::Relaxed);
        }
        let (mut p2, mut c2) = (
            RingProducer::attach(r.clone(), 64).unwrap(),
            RingConsumer::attach(r.clone(), 64).unwrap(),
        );
        for n in 0..10u8 {
            p2.push(&rec(n)).unwrap();
            assert_eq!(c2.pop().unwrap(), Some(rec(n)));
        }
    }

    #[test]
    fn hostile_indices_are_corrupt_not_out_of_bounds() {
        let (mut p, mut c, r) = ring(4);
        p.push(&rec(1)).unwrap();
        // The "consumer" claims to be far behind: more records than capacity.
        r.atomic_u32(64 + OFF_HEAD)
            .unwrap()
            .store(1_000_000, Ordering::Relaxed);
        assert_eq!(p.push(&rec(2)), Err(RingError::Corrupt));
        assert_eq!(p.push(&rec(2)), Err(RingError::Corrupt), "stays corrupt");
        r.atomic_u32(64 + OFF_TAIL)
            .unwrap()
            .store(0xdead_beef, Ordering::Relaxed);
        assert_eq!(c.pop(), Err(RingError::Corrupt));
    }

    #[test]
    fn attach_validates_header() {
        let r = Arc::new(Region::heap(4096));
        assert!(matches!(
            RingConsumer::attach(r.clone(), 64),
            Err(RingError::BadMagic(_))
        ));
        assert_eq!(init_ring(&r, 64, 3), Err(RingError::InvalidCapacity(3)));
        assert_eq!(init_ring(&r, 65, 4), Err(RingError::Misaligned(65)));
        assert!(matches!(
            init_ring(&r, 64, 1024),
            Err(RingError::OutOfBounds(_))
        ));
        init_ring(&r, 64, 4).unwrap();
        r.atomic_u32(64 + OFF_CAPACITY)
            .unwrap()
            .store(1 << 30, Ordering::Relaxed);
        assert!(
            RingProducer::attach(r, 64).is_err(),
            "hostile capacity must not pass attach"
        );
    }
}
