//! SPSC ring of fixed 64-byte records: event and control queues.
//!
//! # Layout
//!
//! Like a FIFO ([`crate::fifo`]): a header of four cache lines, then `capacity * 64` bytes of
//! records, so every record is cache-line aligned.
//!
//! ```text
//! line 0  (shared, written once) magic | capacity (records, power of two) | reserved
//! line 1  (consumer-owned)       head (free-running record index)
//! line 2  (producer-owned)       tail (free-running record index)
//! line 3  reserved
//! records capacity * RECORD_LEN bytes
//! ```
//!
//! The hostile-peer rules are the FIFO's: the capacity is read once at attach and kept
//! privately, each side keeps its own index privately, the foreign index is validated
//! (`tail - head <= capacity`, else [`RingError::Corrupt`], sticky), and record offsets are
//! masked with the private mask.
//!
//! # Waking the consumer only when it may sleep
//!
//! Like VPP's message queues, a push signals only when the consumer may be asleep, so a busy
//! consumer costs the producer no system calls. Unlike the FIFO's `has_event` flag, the ring
//! uses no extra word: the indices themselves are the signal, with a Dekker-style handshake.
//!
//! * Producer ([`RingProducer::push`]): write the record, store `tail` (`Release`),
//!   `fence(SeqCst)`, load `head`. If our record is the only unconsumed one
//!   (`tail - head == 1`), the ring was empty just before it, so the consumer may have found it
//!   empty and gone to sleep: return [`Wake::Needed`].
//! * Consumer ([`RingConsumer::pop`]): after consuming, store `head` (`Release`). Before
//!   reporting "empty" (after which the caller may sleep), `fence(SeqCst)` and load `tail`
//!   again.
//!
//! The two `SeqCst` fences are totally ordered. If the consumer's fence comes first, the
//! producer's `head` load sees the consumer's last `head` store, i.e. the consumer had consumed
//! everything before our record, and the producer returns `Needed`. If the producer's fence
//! comes first, the consumer's `tail` load sees our record and it does not report empty. So a
//! consumer never sleeps on a record for which no `Needed` was returned. Plain `Acquire`/`Release`
//! would not do: both loads could read stale values (the store-buffering pattern).
//! Model-checked in `tests/loom.rs`.

use std::mem::{offset_of, size_of};
use std::sync::Arc;

use crate::header::{self, Claimed, HeaderError, Kind, SharedRegion};
use crate::region::{OutOfBounds, Region, Role};
use crate::sync::{AtomicU32, Ordering, fence};

/// Size of one record.
pub const RECORD_LEN: usize = 64;
/// Bytes of the ring header.
pub const RING_HEADER_LEN: usize = 256;
/// Required alignment of a ring's offset.
pub const RING_ALIGN: usize = 64;
/// Magic in line 0: `SHR1` as a little-endian `u32`.
pub const RING_MAGIC: u32 = u32::from_le_bytes(*b"SHR1");
/// Smallest capacity in records.
pub const RING_MIN_CAPACITY: u32 = 1;
/// Largest capacity in records (1 GiB of records).
pub const RING_MAX_CAPACITY: u32 = 1 << 24;

#[allow(
    dead_code,
    reason = "layout description; accessed through offset_of! only"
)]
#[repr(C)]
struct RingHeader {
    meta: Line<[u32; 2]>,
    consumer: Line<u32>,
    producer: Line<u32>,
    reserved: Line<u32>,
}

#[allow(dead_code, reason = "layout description")]
#[repr(C, align(64))]
struct Line<T>(T);

const _: () = assert!(size_of::<RingHeader>() == RING_HEADER_LEN);
const OFF_MAGIC: usize = offset_of!(RingHeader, meta);
const OFF_CAPACITY: usize = offset_of!(RingHeader, meta) + 4;
const OFF_HEAD: usize = offset_of!(RingHeader, consumer);
const OFF_TAIL: usize = offset_of!(RingHeader, producer);
const _: () = assert!(OFF_HEAD == 64 && OFF_TAIL == 128);
const _: () = assert!(OFF_MAGIC == header::OFF_MAGIC && OFF_CAPACITY == header::OFF_CAPACITY);

/// Whether the producer must notify the consumer after a push.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The consumer may be asleep: ring its doorbell.
    Needed,
    /// The consumer is awake or has already been notified.
    NotNeeded,
}

/// Errors of ring operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RingError {
    /// Capacity not a power of two in range.
    #[error("invalid ring capacity {0} records")]
    InvalidCapacity(u32),
    /// The ring offset is not [`RING_ALIGN`]-aligned.
    #[error("ring offset {0} is not 64-byte aligned")]
    Misaligned(usize),
    /// The ring does not fit in the region.
    #[error(transparent)]
    OutOfBounds(#[from] OutOfBounds),
    /// No ring header at this offset.
    #[error("bad ring magic {0:#010x}")]
    BadMagic(u32),
    /// The peer published an impossible index; sticky.
    #[error("ring indices corrupted by the peer")]
    Corrupt,
    /// The ring is full; nothing was written.
    #[error("ring is full")]
    Full,
    /// An endpoint of the same role is already attached through this region.
    #[error("an endpoint is already attached to this ring")]
    AlreadyAttached,
}

/// Bytes a ring of `capacity_records` occupies.
pub const fn ring_footprint(capacity_records: u32) -> usize {
    RING_HEADER_LEN + capacity_records as usize * RECORD_LEN
}

/// The ring's kind of shared header.
static KIND: Kind = Kind {
    magic: RING_MAGIC,
    align: RING_ALIGN,
    header_len: RING_HEADER_LEN,
    min_capacity: RING_MIN_CAPACITY,
    max_capacity: RING_MAX_CAPACITY,
    footprint: ring_footprint,
};

impl From<HeaderError> for RingError {
    fn from(e: HeaderError) -> Self {
        match e {
            HeaderError::InvalidCapacity(c) => RingError::InvalidCapacity(c),
            HeaderError::Misaligned(o) => RingError::Misaligned(o),
            HeaderError::OutOfBounds(e) => RingError::OutOfBounds(e),
            HeaderError::BadMagic(m) => RingError::BadMagic(m),
            HeaderError::AlreadyAttached => RingError::AlreadyAttached,
        }
    }
}

/// Writes a fresh ring header at `offset`.
pub fn init_ring(region: &Region, offset: usize, capacity_records: u32) -> Result<(), RingError> {
    init_ring_at(region, offset, capacity_records, 0)
}

/// Like [`init_ring`] with both indices starting at `position` (to test the wrap-around).
pub fn init_ring_at(
    region: &Region,
    offset: usize,
    capacity_records: u32,
    position: u32,
) -> Result<(), RingError> {
    KIND.check_capacity(capacity_records)?;
    KIND.check_placement(region, offset, capacity_records)?;
    if region.is_claimed(offset) {
        return Err(RingError::AlreadyAttached);
    }
    let word = |f: usize| region.atomic_u32(offset + f);
    word(OFF_MAGIC)?.store(0, Ordering::Relaxed);
    word(OFF_CAPACITY)?.store(capacity_records, Ordering::Relaxed);
    word(OFF_HEAD)?.store(position, Ordering::Relaxed);
    word(OFF_TAIL)?.store(position, Ordering::Relaxed);
    word(OFF_MAGIC)?.store(RING_MAGIC, Ordering::Release);
    Ok(())
}

/// Private, validated view of one ring, shared by both endpoint types.
struct Ring(Claimed);

impl std::ops::Deref for Ring {
    type Target = Claimed;

    fn deref(&self) -> &Claimed {
        &self.0
    }
}

impl Ring {
    fn attach(region: SharedRegion, offset: usize, role: Role) -> Result<Ring, RingError> {
        Ok(Ring(Claimed::attach(&KIND, region, offset, role)?))
    }

    /// A header word (see [`Claimed::word`]).
    fn word(&self, field: usize) -> Result<&AtomicU32, RingError> {
        self.0.word(field).ok_or(RingError::Corrupt)
    }

    /// Validated `tail - head`.
    fn used(&self, head: u32, tail: u32) -> Result<u32, RingError> {
        self.0.used(head, tail).ok_or(RingError::Corrupt)
    }

    fn record_offset(&self, index: u32) -> usize {
        self.data + (index & self.mask) as usize * RECORD_LEN
    }
}

/// The producing end of a ring. `Send`, not `Sync`, not `Clone`.
///
/// ```compile_fail
/// fn assert_sync<T: Sync>() {}
/// assert_sync::<shunt_shm::RingProducer>();
/// ```
pub struct RingProducer {
    ring: Ring,
    tail: u32,
}

impl std::fmt::Debug for RingProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingProducer")
            .field("offset", &self.ring.offset)
            .field("capacity", &self.ring.capacity)
            .field("tail", &self.tail)
            .finish()
    }
}

impl RingProducer {
    /// Attaches the producer end of the ring at `offset`; validates like
    /// [`crate::fifo::Producer::attach`].
    pub fn attach<R>(region: Arc<R>, offset: usize) -> Result<RingProducer, RingError>
    where
        R: AsRef<Region> + Send + Sync + 'static,
    {
        let ring = Ring::attach(region, offset, Role::Producer)?;
        let tail = ring.word(OFF_TAIL)?.load(Ordering::Acquire);
        let head = ring.word(OFF_HEAD)?.load(Ordering::Acquire);
        ring.used(head, tail)?;
        Ok(RingProducer { ring, tail })
    }

    /// Capacity in records.
    pub fn capacity(&self) -> u32 {
        self.ring.capacity
    }

    /// Whether a corrupt peer index has been observed (sticky).
    pub fn is_corrupt(&self) -> bool {
        self.ring.corrupt.get()
    }

    /// Appends one record. [`RingError::Full`] when full (nothing written). Returns whether the
    /// consumer must be woken (see the module docs).
    pub fn push(&mut self, rec: &[u8; RECORD_LEN]) -> Result<Wake, RingError> {
        let head = self.ring.word(OFF_HEAD)?.load(Ordering::Acquire);
        if self.ring.used(head, self.tail)? == self.ring.capacity {
            return Err(RingError::Full);
        }
        self.ring
            .region()
            .copy_in(self.ring.record_offset(self.tail), rec)?;
        self.tail = self.tail.wrapping_add(1);
        self.ring
            .word(OFF_TAIL)?
            .store(self.tail, Ordering::Release);
        // Dekker: order the tail store before the head load (module docs).
        fence(Ordering::SeqCst);
        let head = self.ring.word(OFF_HEAD)?.load(Ordering::Acquire);
        Ok(if self.ring.used(head, self.tail)? == 1 {
            Wake::Needed
        } else {
            Wake::NotNeeded
        })
    }

    /// Free record slots (0 when corrupt).
    pub fn free_slots(&self) -> u32 {
        let Ok(w) = self.ring.word(OFF_HEAD) else {
            return 0;
        };
        let head = w.load(Ordering::Acquire);
        self.ring
            .used(head, self.tail)
            .map_or(0, |u| self.ring.capacity - u)
    }
}

/// The consuming end of a ring. `Send`, not `Sync`, not `Clone`.
pub struct RingConsumer {
    ring: Ring,
    head: u32,
}

impl std::fmt::Debug for RingConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingConsumer")
            .field("offset", &self.ring.offset)
            .field("capacity", &self.ring.capacity)
            .field("head", &self.head)
            .finish()
    }
}

impl RingConsumer {
    /// Attaches the consumer end of the ring at `offset`.
    pub fn attach<R>(region: Arc<R>, offset: usize) -> Result<RingConsumer, RingError>
    where
        R: AsRef<Region> + Send + Sync + 'static,
    {
        let ring = Ring::attach(region, offset, Role::Consumer)?;
        let head = ring.word(OFF_HEAD)?.load(Ordering::Acquire);
        let tail = ring.word(OFF_TAIL)?.load(Ordering::Acquire);
        ring.used(head, tail)?;
        Ok(RingConsumer { ring, head })
    }

    /// Capacity in records.
    pub fn capacity(&self) -> u32 {
        self.ring.capacity
    }

    /// Whether a corrupt peer index has been observed (sticky).
    pub fn is_corrupt(&self) -> bool {
        self.ring.corrupt.get()
    }

    /// Number of pending records, validated; with the "empty" handshake when 0.
    fn pending(&self) -> Result<u32, RingError> {
        let tail = self.ring.word(OFF_TAIL)?.load(Ordering::Acquire);
        let used = self.ring.used(self.head, tail)?;
        if used > 0 {
            return Ok(used);
        }
        // About to report empty, after which the caller may sleep: order our last head store
        // before this re-read of tail (module docs).
        fence(Ordering::SeqCst);
        let tail = self.ring.word(OFF_TAIL)?.load(Ordering::Acquire);
        self.ring.used(self.head, tail)
    }

    /// Removes the oldest record, or `None` when empty. After `Ok(None)` the caller may sleep
    /// until the producer rings: any later push returns [`Wake::Needed`].
    pub fn pop(&mut self) -> Result<Option<[u8; RECORD_LEN]>, RingError> {
        if self.pending()? == 0 {
            return Ok(None);
        }
        let mut rec = [0u8; RECORD_LEN];
        self.ring
            .region()
            .copy_out(self.ring.record_offset(self.head), &mut rec)?;
        self.head = self.head.wrapping_add(1);
        self.ring
            .word(OFF_HEAD)?
            .store(self.head, Ordering::Release);
        Ok(Some(rec))
    }

    /// Whether no record is pending (with the same handshake as [`RingConsumer::pop`]).
    pub fn is_empty(&self) -> Result<bool, RingError> {
        Ok(self.pending()? == 0)
    }

    /// Number of pending records.
    pub fn len(&self) -> Result<u32, RingError> {
        self.pending()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn rec(tag: u8) -> [u8; RECORD_LEN] {
        let mut r = [0u8; RECORD_LEN];
        for (i, b) in r.iter_mut().enumerate() {
            *b = tag.wrapping_add(i as u8);
        }
        r
    }

    const GUARD: usize = 128;

    fn setup(cap: u32, position: u32) -> (Arc<Region>, RingProducer, RingConsumer) {
        let len = 2 * GUARD + ring_footprint(cap);
        let r = Region::heap(len);
        r.fill(0, GUARD, 0xEE).unwrap();
        r.fill(len - GUARD, GUARD, 0xEE).unwrap();
        init_ring_at(&r, GUARD, cap, position).unwrap();
        let r = Arc::new(r);
        let p = RingProducer::attach(r.clone(), GUARD).unwrap();
        let c = RingConsumer::attach(r.clone(), GUARD).unwrap();
        (r, p, c)
    }

    fn assert_guards(r: &Region) {
        let mut b = [0u8; GUARD];
        r.copy_out(0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0xEE));
        r.copy_out(r.len() - GUARD, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0xEE));
    }

    #[test]
    fn validation() {
        let r = Region::heap(ring_footprint(4));
        assert_eq!(init_ring(&r, 0, 3), Err(RingError::InvalidCapacity(3)));
        assert_eq!(init_ring(&r, 0, 0), Err(RingError::InvalidCapacity(0)));
        assert_eq!(
            init_ring(&r, 0, 1 << 25),
            Err(RingError::InvalidCapacity(1 << 25))
        );
        assert_eq!(init_ring(&r, 8, 1), Err(RingError::Misaligned(8)));
        assert!(matches!(
            init_ring(&r, 0, 8),
            Err(RingError::OutOfBounds(_))
        ));
        let r = Arc::new(r);
        assert_eq!(
            RingConsumer::attach(r.clone(), 0).unwrap_err(),
            RingError::BadMagic(0)
        );
        assert!(matches!(
            RingProducer::attach(r.clone(), usize::MAX & !(RING_ALIGN - 1)),
            Err(RingError::OutOfBounds(_))
        ));
        assert!(matches!(
            init_ring(&r, usize::MAX & !(RING_ALIGN - 1), 1),
            Err(RingError::OutOfBounds(_))
        ));
        init_ring(&r, 0, 4).unwrap();
        let p = RingProducer::attach(r.clone(), 0).unwrap();
        assert_eq!(p.capacity(), 4);
        assert_eq!(
            RingProducer::attach(r.clone(), 0).unwrap_err(),
            RingError::AlreadyAttached
        );
        assert_eq!(init_ring(&r, 0, 4), Err(RingError::AlreadyAttached));
    }

    #[test]
    fn push_pop_full_and_wake() {
        let (r, mut p, mut c) = setup(4, 0);
        assert_eq!(c.pop(), Ok(None));
        assert_eq!(c.is_empty(), Ok(true));
        assert_eq!(p.push(&rec(0)), Ok(Wake::Needed));
        assert_eq!(p.push(&rec(1)), Ok(Wake::NotNeeded));
        assert_eq!(p.push(&rec(2)), Ok(Wake::NotNeeded));
        assert_eq!(p.push(&rec(3)), Ok(Wake::NotNeeded));
        assert_eq!(p.free_slots(), 0);
        assert_eq!(p.push(&rec(4)), Err(RingError::Full));
        assert_eq!(c.len(), Ok(4));
        for t in 0..4 {
            assert_eq!(c.pop(), Ok(Some(rec(t))));
        }
        assert_eq!(c.pop(), Ok(None));
        // Consumer drained everything: the next push must wake it.
        assert_eq!(p.push(&rec(9)), Ok(Wake::Needed));
        assert_guards(&r);
    }

    #[test]
    fn wraps_around_u32() {
        let (r, mut p, mut c) = setup(2, u32::MAX - 3);
        for t in 0..20u8 {
            assert!(p.push(&rec(t)).is_ok());
            assert_eq!(c.pop(), Ok(Some(rec(t))));
        }
        assert_eq!(c.pop(), Ok(None));
        assert_guards(&r);
    }

    #[test]
    fn hostile_indices_are_corrupt_and_sticky() {
        let (r, mut p, mut c) = setup(4, 10);
        let head = r.atomic_u32(GUARD + OFF_HEAD).unwrap();
        let tail = r.atomic_u32(GUARD + OFF_TAIL).unwrap();
        assert!(p.push(&rec(1)).is_ok());
        // Consumer side scribbles head past tail.
        head.store(12, Ordering::Release);
        assert_eq!(p.push(&rec(2)), Err(RingError::Corrupt));
        assert!(p.is_corrupt());
        head.store(10, Ordering::Release);
        assert_eq!(p.push(&rec(2)), Err(RingError::Corrupt));
        assert_eq!(p.free_slots(), 0);
        // Producer side scribbles tail far ahead.
        tail.store(10 + 5, Ordering::Release);
        assert_eq!(c.pop(), Err(RingError::Corrupt));
        tail.store(11, Ordering::Release);
        assert_eq!(c.pop(), Err(RingError::Corrupt));
        assert!(c.is_corrupt());
        assert_guards(&r);
    }

    #[test]
    fn hostile_capacity_is_read_once() {
        let (r, mut p, c) = setup(2, 0);
        r.atomic_u32(GUARD + OFF_CAPACITY)
            .unwrap()
            .store(1 << 24, Ordering::Relaxed);
        assert!(p.push(&rec(1)).is_ok());
        assert!(p.push(&rec(2)).is_ok());
        assert_eq!(p.push(&rec(3)), Err(RingError::Full));
        // Tail claims the ring holds its real capacity: fine; more is corrupt.
        r.atomic_u32(GUARD + OFF_TAIL)
            .unwrap()
            .store(2, Ordering::Release);
        assert_eq!(c.len(), Ok(2));
        r.atomic_u32(GUARD + OFF_TAIL)
            .unwrap()
            .store(3, Ordering::Release);
        assert_eq!(c.len(), Err(RingError::Corrupt));
        assert_guards(&r);
    }

    #[test]
    fn attach_refuses_corrupt_indices() {
        let r = Arc::new(Region::heap(ring_footprint(4)));
        init_ring(&r, 0, 4).unwrap();
        r.atomic_u32(OFF_TAIL).unwrap().store(5, Ordering::Relaxed);
        assert_eq!(
            RingProducer::attach(r.clone(), 0).unwrap_err(),
            RingError::Corrupt
        );
        assert_eq!(
            RingConsumer::attach(r.clone(), 0).unwrap_err(),
            RingError::Corrupt
        );
        r.atomic_u32(OFF_TAIL).unwrap().store(4, Ordering::Relaxed);
        assert!(RingConsumer::attach(r.clone(), 0).is_ok());
    }

    #[test]
    fn threads_transfer_all_records_in_order() {
        let n: u32 = if cfg!(miri) { 200 } else { 100_000 };
        let (_r, mut p, mut c) = setup(8, u32::MAX - 50);
        let t = std::thread::spawn(move || {
            let mut i = 0u32;
            while i < n {
                let mut r = [0u8; RECORD_LEN];
                r[..4].copy_from_slice(&i.to_le_bytes());
                match p.push(&r) {
                    Ok(_) => i += 1,
                    Err(RingError::Full) => std::thread::yield_now(),
                    Err(e) => panic!("{e}"),
                }
            }
        });
        let mut expect = 0u32;
        while expect < n {
            match c.pop().unwrap() {
                Some(r) => {
                    assert_eq!(u32::from_le_bytes(r[..4].try_into().unwrap()), expect);
                    expect += 1;
                }
                None => std::thread::yield_now(),
            }
        }
        t.join().unwrap();
        assert_eq!(c.pop(), Ok(None));
    }
}
