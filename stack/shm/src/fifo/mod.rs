//! Single-producer / single-consumer byte FIFO living in a [`Region`].
//!
//! # Layout
//!
//! A FIFO occupies [`fifo_footprint`]`(capacity)` bytes at a 64-byte-aligned offset: a header of
//! four cache lines, then `capacity` data bytes.
//!
//! ```text
//! line 0  (shared, written once) magic | capacity | reserved
//! line 1  (consumer-owned)       head  | reader_closed
//! line 2  (producer-owned)       tail  | writer_shutdown | bytes_written | full_events | notifications
//! line 3  (signals, both)        has_event | want_tx_space | reset
//! data    capacity bytes (power of two, 4 KiB ..= 1 GiB)
//! ```
//!
//! `head` and `tail` live on separate cache lines so that the producer's stores and the
//! consumer's stores never false-share; the signal words, which both sides touch only on
//! transitions, get a line of their own.
//!
//! `head` and `tail` are *free-running* `u32` byte positions: they are never reduced modulo the
//! capacity and simply wrap at 2^32. The number of readable bytes is `tail.wrapping_sub(head)`,
//! which is correct across the wrap as long as it never exceeds 2^31; the capacity is at most
//! 2^30. A data offset is `position & (capacity - 1)`.
//!
//! # Hostile peer rules
//!
//! * On attach the capacity is read once, validated (power of two, in range, the FIFO fits the
//!   region) and copied into private memory together with the mask; it is never re-read, so a
//!   peer changing it later has no effect.
//! * Each side keeps a private copy of its own index and only publishes it: the producer never
//!   reads the shared `tail` after attaching, nor the consumer the shared `head`.
//! * The foreign index is loaded with `Acquire` and validated on every use: if
//!   `tail - head > capacity` the endpoint becomes [`FifoError::Corrupt`], for good. Values that
//!   pass the check can only make the peer's data look shorter/longer *within* the data area.
//! * Every data offset is masked with the private mask and bounds-checked by the region, so no
//!   value read from shared memory can steer an access outside this FIFO's data area.
//! * Payload bytes are untrusted content.
//!
//! # Orderings
//!
//! The producer copies data into the data area and then stores `tail` with `Release`; the
//! consumer loads `tail` with `Acquire` before reading the data, so it sees the bytes. The
//! consumer stores `head` with `Release` after it finished reading; the producer loads `head`
//! with `Acquire` before overwriting the space, so the consumer's reads happen before the
//! overwrite. `writer_shutdown` is stored with `Release` after the last `tail` store, and
//! [`Consumer::at_eof`] loads the flag (`Acquire`) *before* re-checking emptiness, so a
//! consumer that sees the flag also sees the final tail and cannot report EOF with data left.
//!
//! # Why no wake-up is lost
//!
//! Both notification flags are only ever changed with atomic read-modify-write operations
//! (`swap`, `AcqRel`). All RMWs on one location are totally ordered, and each reads the value
//! written by the one just before it.
//!
//! *`has_event` (data available).* The producer publishes `tail`, then `set_event` swaps
//! `has_event` to 1 and notifies only if it was 0. The consumer calls `clear_event` (swap to 0)
//! *before* reading. Take any producer swap P made after publishing some bytes, and the
//! consumer's last clear C before it goes to sleep:
//! - if P comes after C, then P — or an earlier producer swap between C and P — read the 0
//!   written by C and returned `true`: a notification was sent after the consumer's clear, so the
//!   consumer will be woken;
//! - if P comes before C, then C read P's value (or a later RMW in P's release sequence), so P
//!   *synchronises-with* C: the `tail` store before P happens-before the consumer's `tail` load
//!   after C, and the consumer sees the bytes.
//!
//! *`want_tx_space` (space available).* A producer that found the FIFO full calls
//! `request_tx_space` (swap to 1) and then re-checks the free space (`Acquire` load of `head`);
//! only if it is still full may it sleep. The consumer, after publishing a new `head`, calls
//! `take_tx_space_request` (swap to 0) and notifies if it read 1. If the producer's swap R is
//! before the consumer's swap T, T reads 1 and notifies. If T is before R, R reads T's value and
//! synchronises with it, so the `head` store before T happens-before the producer's re-check,
//! which then sees the freed space. Either way a producer never sleeps on space that was freed.
//! This is why the consumer must swap unconditionally rather than test the flag with a plain
//! load first.
//!
//! A consumer may hold the swap back until a threshold of free space is reached (VPP's
//! dequeue-notification threshold), as long as it keeps reading while data is left. A producer
//! asleep found the FIFO full after its request R, so the consumer still has bytes to read
//! and swaps again, at the latest once it has read everything (all of the capacity free).
//! Take its swap T after the bytes written before R: if T is before R, the producer's
//! re-check would have seen the FIFO empty, so it did not sleep; if after, T (or an earlier
//! consumer swap after R) reads 1 and notifies.
//!
//! These arguments are model-checked in `tests/loom.rs`.

mod ooo;
mod slices;

use std::cell::Cell;
use std::io::{IoSlice, IoSliceMut};
use std::mem::{align_of, offset_of, size_of};
use std::sync::Arc;

pub use ooo::{MAX_OOO_INTERVALS, OooInterval};
pub use slices::{ReadSlices, WriteSlices};

use crate::header::{self, Claimed, HeaderError, Kind, SharedRegion};
use crate::region::{OutOfBounds, Region, Role};
use crate::sync::Ordering;
use ooo::Assembler;

/// Bytes of the shared header in front of the data area.
pub const FIFO_HEADER_LEN: usize = 256;
/// Required alignment of a FIFO's offset in its region.
pub const FIFO_ALIGN: usize = 64;
/// Magic in line 0: `SHF1` as a little-endian `u32` (the digit is the layout version).
pub const FIFO_MAGIC: u32 = u32::from_le_bytes(*b"SHF1");
/// Smallest capacity (4 KiB; 4 bytes under `cfg(loom)`, whose models need tiny FIFOs).
pub const FIFO_MIN_CAPACITY: u32 = if cfg!(loom) { 4 } else { 4096 };
/// Largest capacity (1 GiB), far below the 2^31 limit of wrap-safe comparisons.
pub const FIFO_MAX_CAPACITY: u32 = 1 << 30;

/// Shared header layout. Never instantiated: it documents the layout and provides the field
/// offsets (`offset_of!`); the words are accessed as atomics through the region.
#[allow(
    dead_code,
    reason = "layout description; accessed through offset_of! only"
)]
#[repr(C)]
struct FifoHeader {
    meta: MetaLine,
    consumer: ConsumerLine,
    producer: ProducerLine,
    signals: SignalLine,
}

#[allow(dead_code, reason = "layout description")]
#[repr(C, align(64))]
struct MetaLine {
    magic: u32,
    capacity: u32,
    reserved: [u32; 14],
}

#[allow(dead_code, reason = "layout description")]
#[repr(C, align(64))]
struct ConsumerLine {
    head: u32,
    reader_closed: u32,
    pad: [u32; 14],
}

#[allow(dead_code, reason = "layout description")]
#[repr(C, align(64))]
struct ProducerLine {
    tail: u32,
    writer_shutdown: u32,
    /// Statistics, published by the producer for observers (e.g. the node service's metrics).
    /// Never read back by either endpoint, so a hostile value only skews a metric.
    bytes_written: u64,
    full_events: u64,
    notifications: u64,
    pad: [u32; 8],
}

#[allow(dead_code, reason = "layout description")]
#[repr(C, align(64))]
struct SignalLine {
    has_event: u32,
    want_tx_space: u32,
    reset: u32,
    pad: [u32; 13],
}

const _: () = assert!(size_of::<FifoHeader>() == FIFO_HEADER_LEN);
const _: () = assert!(align_of::<FifoHeader>() == FIFO_ALIGN);
const _: () = assert!(size_of::<MetaLine>() == 64 && size_of::<SignalLine>() == 64);
const _: () = assert!(FIFO_MAX_CAPACITY <= 1 << 31);

const OFF_MAGIC: usize = offset_of!(FifoHeader, meta) + offset_of!(MetaLine, magic);
const OFF_CAPACITY: usize = offset_of!(FifoHeader, meta) + offset_of!(MetaLine, capacity);
const OFF_HEAD: usize = offset_of!(FifoHeader, consumer) + offset_of!(ConsumerLine, head);
const OFF_READER_CLOSED: usize =
    offset_of!(FifoHeader, consumer) + offset_of!(ConsumerLine, reader_closed);
const OFF_TAIL: usize = offset_of!(FifoHeader, producer) + offset_of!(ProducerLine, tail);
const OFF_WRITER_SHUTDOWN: usize =
    offset_of!(FifoHeader, producer) + offset_of!(ProducerLine, writer_shutdown);
const OFF_BYTES_WRITTEN: usize =
    offset_of!(FifoHeader, producer) + offset_of!(ProducerLine, bytes_written);
const OFF_FULL_EVENTS: usize =
    offset_of!(FifoHeader, producer) + offset_of!(ProducerLine, full_events);
const OFF_NOTIFICATIONS: usize =
    offset_of!(FifoHeader, producer) + offset_of!(ProducerLine, notifications);
const OFF_HAS_EVENT: usize = offset_of!(FifoHeader, signals) + offset_of!(SignalLine, has_event);
const OFF_WANT_TX_SPACE: usize =
    offset_of!(FifoHeader, signals) + offset_of!(SignalLine, want_tx_space);
const OFF_RESET: usize = offset_of!(FifoHeader, signals) + offset_of!(SignalLine, reset);

const _: () = assert!(OFF_HEAD == 64 && OFF_TAIL == 128 && OFF_HAS_EVENT == 192);
const _: () = assert!(OFF_MAGIC == header::OFF_MAGIC && OFF_CAPACITY == header::OFF_CAPACITY);

/// Errors of FIFO operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FifoError {
    /// Capacity not a power of two in [`FIFO_MIN_CAPACITY`]`..=`[`FIFO_MAX_CAPACITY`].
    #[error("invalid FIFO capacity {0} (power of two between the minimum and 1 GiB required)")]
    InvalidCapacity(u32),
    /// The FIFO offset is not [`FIFO_ALIGN`]-aligned.
    #[error("FIFO offset {0} is not 64-byte aligned")]
    Misaligned(usize),
    /// The FIFO does not fit in the region.
    #[error(transparent)]
    OutOfBounds(#[from] OutOfBounds),
    /// No FIFO header (wrong magic) at this offset.
    #[error("bad FIFO magic {0:#010x}")]
    BadMagic(u32),
    /// The peer published an impossible index (`tail - head > capacity`); the endpoint stays in
    /// this state.
    #[error("FIFO indices corrupted by the peer")]
    Corrupt,
    /// Not enough free space for an all-or-nothing write.
    #[error("not enough free space in the FIFO")]
    Full,
    /// The out-of-order write would need more than [`MAX_OOO_INTERVALS`] intervals.
    #[error("too many out-of-order intervals")]
    TooManyHoles,
    /// `commit` of more bytes than the last `reserve` provided.
    #[error("commit of {requested} bytes exceeds the {reserved} reserved")]
    ExceedsReservation {
        /// Bytes the caller tried to commit.
        requested: usize,
        /// Bytes reserved by the last `reserve`.
        reserved: usize,
    },
    /// `release` of more bytes than are readable.
    #[error("release of {requested} bytes exceeds the {available} readable")]
    ExceedsAvailable {
        /// Bytes the caller tried to release.
        requested: usize,
        /// Bytes readable.
        available: usize,
    },
    /// An endpoint of the same role is already attached to this FIFO through this region (or
    /// `init_fifo` was called on an attached FIFO).
    #[error("an endpoint is already attached to this FIFO")]
    AlreadyAttached,
}

/// Bytes a FIFO of `capacity` occupies in a region (header plus data, rounded up to
/// [`FIFO_ALIGN`] so that the next FIFO can follow directly).
pub const fn fifo_footprint(capacity: u32) -> usize {
    (FIFO_HEADER_LEN + capacity as usize).next_multiple_of(FIFO_ALIGN)
}

/// The FIFO's kind of shared header.
static KIND: Kind = Kind {
    magic: FIFO_MAGIC,
    align: FIFO_ALIGN,
    header_len: FIFO_HEADER_LEN,
    min_capacity: FIFO_MIN_CAPACITY,
    max_capacity: FIFO_MAX_CAPACITY,
    footprint: fifo_footprint,
};

impl From<HeaderError> for FifoError {
    fn from(e: HeaderError) -> Self {
        match e {
            HeaderError::InvalidCapacity(c) => FifoError::InvalidCapacity(c),
            HeaderError::Misaligned(o) => FifoError::Misaligned(o),
            HeaderError::OutOfBounds(e) => FifoError::OutOfBounds(e),
            HeaderError::BadMagic(m) => FifoError::BadMagic(m),
            HeaderError::AlreadyAttached => FifoError::AlreadyAttached,
        }
    }
}

/// Writes a fresh FIFO header (zero counters, no flags) at `offset`.
pub fn init_fifo(region: &Region, offset: usize, capacity: u32) -> Result<(), FifoError> {
    init_fifo_at(region, offset, capacity, 0)
}

/// Like [`init_fifo`], but both counters start at `position` instead of 0 (tests use values
/// near `u32::MAX` to exercise the wrap-around).
pub fn init_fifo_at(
    region: &Region,
    offset: usize,
    capacity: u32,
    position: u32,
) -> Result<(), FifoError> {
    KIND.check_capacity(capacity)?;
    KIND.check_placement(region, offset, capacity)?;
    if region.is_claimed(offset) {
        return Err(FifoError::AlreadyAttached);
    }
    let word = |field: usize| region.atomic_u32(offset + field);
    // Invalidate first, publish the magic last.
    word(OFF_MAGIC)?.store(0, Ordering::Relaxed);
    word(OFF_CAPACITY)?.store(capacity, Ordering::Relaxed);
    word(OFF_HEAD)?.store(position, Ordering::Relaxed);
    word(OFF_READER_CLOSED)?.store(0, Ordering::Relaxed);
    word(OFF_TAIL)?.store(position, Ordering::Relaxed);
    word(OFF_WRITER_SHUTDOWN)?.store(0, Ordering::Relaxed);
    for field in [OFF_BYTES_WRITTEN, OFF_FULL_EVENTS, OFF_NOTIFICATIONS] {
        region
            .atomic_u64(offset + field)?
            .store(0, Ordering::Relaxed);
    }
    word(OFF_HAS_EVENT)?.store(0, Ordering::Relaxed);
    word(OFF_WANT_TX_SPACE)?.store(0, Ordering::Relaxed);
    word(OFF_RESET)?.store(0, Ordering::Relaxed);
    word(OFF_MAGIC)?.store(FIFO_MAGIC, Ordering::Release);
    Ok(())
}

/// Private, validated view of one FIFO, shared by both endpoint types.
struct Fifo(Claimed);

impl std::ops::Deref for Fifo {
    type Target = Claimed;

    fn deref(&self) -> &Claimed {
        &self.0
    }
}

impl Fifo {
    fn attach(region: SharedRegion, offset: usize, role: Role) -> Result<Fifo, FifoError> {
        Ok(Fifo(Claimed::attach(&KIND, region, offset, role)?))
    }

    fn flag(&self, field: usize) -> bool {
        self.word(field)
            .is_some_and(|w| w.load(Ordering::Acquire) != 0)
    }

    fn set_flag(&self, field: usize) {
        if let Some(w) = self.word(field) {
            w.store(1, Ordering::Release);
        }
    }

    fn swap_flag(&self, field: usize, value: u32) -> Option<u32> {
        self.word(field).map(|w| w.swap(value, Ordering::AcqRel))
    }

    /// Loads the foreign index (`Acquire`) and returns `tail - head`, validated.
    fn used(&self, head: Option<u32>, tail: Option<u32>) -> Result<u32, FifoError> {
        let load = |field| {
            self.word(field)
                .map(|w| w.load(Ordering::Acquire))
                .ok_or(FifoError::Corrupt)
        };
        let head = match head {
            Some(h) => h,
            None => load(OFF_HEAD)?,
        };
        let tail = match tail {
            Some(t) => t,
            None => load(OFF_TAIL)?,
        };
        self.0.used(head, tail).ok_or(FifoError::Corrupt)
    }

    /// Loads the peer's index (`Acquire`).
    fn load_index(&self, field: usize) -> Result<u32, FifoError> {
        self.word(field)
            .map(|w| w.load(Ordering::Acquire))
            .ok_or(FifoError::Corrupt)
    }

    /// Checks that the peer's index moved forward from `seen` by at most `room`, the most it
    /// could have moved by the protocol, and marks the endpoint corrupt (for good) otherwise.
    /// A peer that moves its index backwards could otherwise make a writer wait forever for
    /// space that is free, or a reader take bytes it already had for new ones.
    fn check_advance(&self, seen: u32, now: u32, room: u32) -> Result<(), FifoError> {
        if self.corrupt.get() || now.wrapping_sub(seen) > room {
            self.corrupt.set(true);
            return Err(FifoError::Corrupt);
        }
        Ok(())
    }

    /// Stores a statistics counter; `Relaxed` because nothing is ordered by it.
    fn publish_stat(&self, field: usize, value: u64) {
        if let Ok(w) = self.region().atomic_u64(self.offset + field) {
            w.store(value, Ordering::Relaxed);
        }
    }

    fn publish(&self, field: usize, value: u32) {
        if let Some(w) = self.word(field) {
            w.store(value, Ordering::Release);
        }
    }

    /// Copies `src` (at most `capacity` bytes) into the data area at position `pos`.
    fn write_at(&self, pos: u32, src: &[u8]) -> Result<(), FifoError> {
        let cap = self.capacity as usize;
        let src = &src[..src.len().min(cap)];
        let start = (pos & self.mask) as usize;
        let first = src.len().min(cap - start);
        self.region().copy_in(self.data + start, &src[..first])?;
        if first < src.len() {
            self.region().copy_in(self.data, &src[first..])?;
        }
        Ok(())
    }

    /// Copies `dst.len()` (at most `capacity`) bytes from position `pos` into `dst`.
    fn read_at(&self, pos: u32, dst: &mut [u8]) -> Result<(), FifoError> {
        let cap = self.capacity as usize;
        let len = dst.len().min(cap);
        let dst = &mut dst[..len];
        let start = (pos & self.mask) as usize;
        let first = len.min(cap - start);
        self.region()
            .copy_out(self.data + start, &mut dst[..first])?;
        if first < len {
            self.region().copy_out(self.data, &mut dst[first..])?;
        }
        Ok(())
    }
}

/// The writing end of a FIFO. `Send`, not `Sync`, not `Clone`: there is exactly one.
///
/// ```compile_fail
/// fn assert_sync<T: Sync>() {}
/// assert_sync::<shunt_shm::Producer>();
/// ```
///
/// ```compile_fail
/// fn assert_clone<T: Clone>() {}
/// assert_clone::<shunt_shm::Producer>();
/// ```
pub struct Producer {
    fifo: Fifo,
    /// Private tail; the shared one is only ever stored to.
    tail: u32,
    /// The consumer's head as last loaded: the next one may lie between it and the tail.
    head_seen: Cell<u32>,
    /// Bytes handed out by the last `reserve`.
    reserved: u32,
    ooo: Assembler,
    /// Private copies of the published statistics (see [`FifoStats`]).
    bytes_written: u64,
    full_events: Cell<u64>,
    notifications: Cell<u64>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("offset", &self.fifo.offset)
            .field("capacity", &self.fifo.capacity)
            .field("tail", &self.tail)
            .field("corrupt", &self.fifo.corrupt.get())
            .field("ooo_intervals", &self.ooo.len())
            .finish()
    }
}

impl Producer {
    /// Attaches the producer end of the FIFO at `offset` in `region` (a [`Region`] or a
    /// [`crate::Segment`], or anything that derefs to a region).
    ///
    /// Validates the header (alignment, magic, capacity, size) and the current indices; fails
    /// with [`FifoError::AlreadyAttached`] if a producer is already attached through the same
    /// region.
    pub fn attach<R>(region: Arc<R>, offset: usize) -> Result<Producer, FifoError>
    where
        R: AsRef<Region> + Send + Sync + 'static,
    {
        let fifo = Fifo::attach(region, offset, Role::Producer)?;
        // The shared tail is read exactly once, here, and validated against head.
        let tail = fifo.load_index(OFF_TAIL)?;
        let head = fifo.load_index(OFF_HEAD)?;
        fifo.used(Some(head), Some(tail))?;
        // Statistics continue from what a previous producer published (they are never trusted
        // for anything but reporting).
        let stat = |field| {
            fifo.region()
                .atomic_u64(offset + field)
                .map_or(0, |w| w.load(Ordering::Relaxed))
        };
        Ok(Producer {
            bytes_written: stat(OFF_BYTES_WRITTEN),
            full_events: Cell::new(stat(OFF_FULL_EVENTS)),
            notifications: Cell::new(stat(OFF_NOTIFICATIONS)),
            fifo,
            tail,
            head_seen: Cell::new(head),
            reserved: 0,
            ooo: Assembler::new(),
        })
    }

    /// Capacity in bytes (the private copy).
    pub fn capacity(&self) -> u32 {
        self.fifo.capacity
    }

    /// The private free-running tail position.
    pub fn tail_position(&self) -> u32 {
        self.tail
    }

    /// Whether a corrupt peer index has been observed (sticky).
    pub fn is_corrupt(&self) -> bool {
        self.fifo.corrupt.get()
    }

    /// Free space in bytes; 0 when full or corrupt (see [`Producer::try_free_space`]).
    pub fn free_space(&self) -> u32 {
        self.try_free_space().unwrap_or(0)
    }

    /// Free space in bytes, or [`FifoError::Corrupt`].
    pub fn try_free_space(&self) -> Result<u32, FifoError> {
        let head = self.fifo.load_index(OFF_HEAD)?;
        // The consumer only moves its head forward, and never past our tail.
        let seen = self.head_seen.get();
        self.fifo
            .check_advance(seen, head, self.tail.wrapping_sub(seen))?;
        self.head_seen.set(head);
        Ok(self.fifo.capacity - self.fifo.used(Some(head), Some(self.tail))?)
    }

    /// Moves the tail over `n` newly written in-order bytes, collects out-of-order bytes that
    /// became contiguous, and publishes the tail (`Release`). Returns the total advance.
    fn advance_tail(&mut self, n: u32) -> u32 {
        let advance = n + self.ooo.advance(n);
        self.tail = self.tail.wrapping_add(advance);
        self.reserved = 0;
        self.fifo.publish(OFF_TAIL, self.tail);
        self.bytes_written += u64::from(advance);
        self.fifo
            .publish_stat(OFF_BYTES_WRITTEN, self.bytes_written);
        advance
    }

    /// Writes as much of `data` as fits; returns the number of bytes written (0 when full or
    /// corrupt).
    pub fn enqueue(&mut self, data: &[u8]) -> usize {
        self.try_enqueue(data).unwrap_or(0)
    }

    /// Like [`Producer::enqueue`] but reports corruption.
    pub fn try_enqueue(&mut self, data: &[u8]) -> Result<usize, FifoError> {
        let free = self.try_free_space()?;
        let n = data.len().min(free as usize);
        if n == 0 {
            return Ok(0);
        }
        self.fifo.write_at(self.tail, &data[..n])?;
        self.advance_tail(n as u32);
        Ok(n)
    }

    /// Gathers from `bufs` in order as far as space allows; publishes the tail once.
    pub fn enqueue_vectored(&mut self, bufs: &[IoSlice<'_>]) -> usize {
        self.try_enqueue_vectored(bufs).unwrap_or(0)
    }

    /// Like [`Producer::enqueue_vectored`] but reports corruption, so that a writer facing a
    /// forged head fails instead of waiting for space that never comes.
    pub fn try_enqueue_vectored(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, FifoError> {
        let free = self.try_free_space()?;
        let mut left = free as usize;
        let mut written = 0usize;
        for buf in bufs {
            if left == 0 {
                break;
            }
            let n = buf.len().min(left);
            if self
                .fifo
                .write_at(self.tail.wrapping_add(written as u32), &buf[..n])
                .is_err()
            {
                break;
            }
            written += n;
            left -= n;
        }
        if written > 0 {
            self.advance_tail(written as u32);
        }
        Ok(written)
    }

    /// Zero-copy write: up to `max` bytes of free space at the tail, as at most two slices.
    /// Write into them, then call [`Producer::commit`] with the number of bytes written. Empty
    /// when full or corrupt.
    ///
    /// The space may include bytes already written out of order ([`Producer::enqueue_at`]);
    /// writing there overwrites them with what should be the same stream bytes.
    pub fn reserve(&mut self, max: usize) -> WriteSlices<'_> {
        let free = self.free_space();
        let n = max.min(free as usize) as u32;
        self.reserved = 0;
        match slices::write_slices(
            self.fifo.region(),
            self.fifo.data,
            self.fifo.mask,
            self.tail,
            n,
        ) {
            Ok(w) => {
                self.reserved = n;
                w
            }
            Err(_) => WriteSlices::default(),
        }
    }

    /// Publishes `n` bytes written into the slices of the last [`Producer::reserve`].
    pub fn commit(&mut self, n: usize) -> Result<(), FifoError> {
        if n > self.reserved as usize {
            return Err(FifoError::ExceedsReservation {
                requested: n,
                reserved: self.reserved as usize,
            });
        }
        if self.fifo.corrupt.get() {
            return Err(FifoError::Corrupt);
        }
        if n > 0 {
            self.advance_tail(n as u32);
        }
        self.reserved = 0;
        Ok(())
    }

    /// Writes `data` at stream position `tail + offset`, all or nothing, without moving the
    /// tail unless the bytes at the tail become contiguous. Returns by how much the tail
    /// advanced (always 0 when `offset > 0`; `data.len()` plus any out-of-order bytes it joined
    /// when `offset == 0`).
    ///
    /// Bytes that overlap earlier out-of-order writes are simply written again (a TCP
    /// retransmission carries the same bytes). The interval bookkeeping is producer-private and
    /// fixed-size ([`MAX_OOO_INTERVALS`]); nothing is allocated.
    ///
    /// Errors: [`FifoError::Full`] if `offset + data.len()` exceeds the free space,
    /// [`FifoError::TooManyHoles`] if the out-of-order interval table is full (nothing written
    /// in either case), [`FifoError::Corrupt`].
    pub fn enqueue_at(&mut self, offset: u32, data: &[u8]) -> Result<u32, FifoError> {
        let free = self.try_free_space()?;
        let len = u32::try_from(data.len()).map_err(|_| FifoError::Full)?;
        let end = offset.checked_add(len).ok_or(FifoError::Full)?;
        if end > free {
            return Err(FifoError::Full);
        }
        if len == 0 {
            return Ok(0);
        }
        if offset == 0 {
            self.fifo.write_at(self.tail, data)?;
            return Ok(self.advance_tail(len));
        }
        if !self.ooo.can_insert(offset, end) {
            return Err(FifoError::TooManyHoles);
        }
        self.fifo.write_at(self.tail.wrapping_add(offset), data)?;
        self.ooo
            .insert(offset, end)
            .map_err(|_| FifoError::TooManyHoles)?;
        Ok(0)
    }

    /// The out-of-order intervals, in stream order, relative to the current tail.
    pub fn ooo_intervals(&self) -> impl Iterator<Item = OooInterval> + '_ {
        self.ooo.iter()
    }

    /// The interval that contains the most recent out-of-order write, if still pending (TCP
    /// reports it first in SACK, RFC 2018).
    pub fn ooo_newest(&self) -> Option<OooInterval> {
        self.ooo.newest()
    }

    /// Half-closes the stream: no more data will follow (`Release`, after every tail store).
    pub fn shutdown(&self) {
        self.fifo.set_flag(OFF_WRITER_SHUTDOWN);
    }

    /// Marks that data is available. Returns `true` only on the 0 -> 1 transition; the caller
    /// then notifies the consumer (e.g. rings its doorbell). Call after publishing data.
    pub fn set_event(&self) -> bool {
        let notify = self.fifo.swap_flag(OFF_HAS_EVENT, 1) == Some(0);
        if notify {
            self.notifications.set(self.notifications.get() + 1);
            self.fifo
                .publish_stat(OFF_NOTIFICATIONS, self.notifications.get());
        }
        notify
    }

    /// Asks the consumer to notify when it frees space. The caller must re-check
    /// [`Producer::free_space`] afterwards and only sleep if it is still insufficient; otherwise
    /// a wake-up can be lost (see the module docs).
    pub fn request_tx_space(&self) {
        let _ = self.fifo.swap_flag(OFF_WANT_TX_SPACE, 1);
        self.full_events.set(self.full_events.get() + 1);
        self.fifo
            .publish_stat(OFF_FULL_EVENTS, self.full_events.get());
    }

    /// Whether the consumer has closed its end.
    pub fn is_reader_closed(&self) -> bool {
        self.fifo.flag(OFF_READER_CLOSED)
    }

    /// Whether either side has reset the FIFO.
    pub fn is_reset(&self) -> bool {
        self.fifo.flag(OFF_RESET)
    }

    /// Signals an abortive close to the consumer.
    pub fn reset(&self) {
        self.fifo.set_flag(OFF_RESET);
    }
}

/// The reading end of a FIFO. `Send`, not `Sync`, not `Clone`: there is exactly one.
///
/// ```compile_fail
/// fn assert_sync<T: Sync>() {}
/// assert_sync::<shunt_shm::Consumer>();
/// ```
///
/// ```compile_fail
/// fn assert_clone<T: Clone>() {}
/// assert_clone::<shunt_shm::Consumer>();
/// ```
pub struct Consumer {
    fifo: Fifo,
    /// Private head; the shared one is only ever stored to.
    head: u32,
    /// The producer's tail as last loaded: the next one may lie between it and a full FIFO.
    tail_seen: Cell<u32>,
    /// Free bytes below which a space request is left for a later release.
    tx_space_threshold: u32,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("offset", &self.fifo.offset)
            .field("capacity", &self.fifo.capacity)
            .field("head", &self.head)
            .field("corrupt", &self.fifo.corrupt.get())
            .finish()
    }
}

impl Consumer {
    /// Attaches the consumer end of the FIFO at `offset` in `region`; see
    /// [`Producer::attach`].
    pub fn attach<R>(region: Arc<R>, offset: usize) -> Result<Consumer, FifoError>
    where
        R: AsRef<Region> + Send + Sync + 'static,
    {
        let fifo = Fifo::attach(region, offset, Role::Consumer)?;
        // The shared head is read exactly once, here, and validated against tail.
        let head = fifo.load_index(OFF_HEAD)?;
        let tail = fifo.load_index(OFF_TAIL)?;
        fifo.used(Some(head), Some(tail))?;
        Ok(Consumer {
            fifo,
            head,
            tail_seen: Cell::new(tail),
            tx_space_threshold: 0,
        })
    }

    /// Capacity in bytes (the private copy).
    pub fn capacity(&self) -> u32 {
        self.fifo.capacity
    }

    /// The private free-running head position.
    pub fn head_position(&self) -> u32 {
        self.head
    }

    /// Whether a corrupt peer index has been observed (sticky).
    pub fn is_corrupt(&self) -> bool {
        self.fifo.corrupt.get()
    }

    /// Readable bytes (validated).
    pub fn len(&self) -> Result<u32, FifoError> {
        let tail = self.fifo.load_index(OFF_TAIL)?;
        // The producer only moves its tail forward, and never past a full FIFO.
        let seen = self.tail_seen.get();
        let room = self.fifo.capacity - seen.wrapping_sub(self.head);
        self.fifo.check_advance(seen, tail, room)?;
        self.tail_seen.set(tail);
        self.fifo.used(Some(self.head), Some(tail))
    }

    /// Whether nothing is readable.
    pub fn is_empty(&self) -> Result<bool, FifoError> {
        Ok(self.len()? == 0)
    }

    fn advance_head(&mut self, n: u32) {
        self.head = self.head.wrapping_add(n);
        self.fifo.publish(OFF_HEAD, self.head);
    }

    /// Reads up to `buf.len()` bytes; returns how many (0 when empty).
    pub fn dequeue(&mut self, buf: &mut [u8]) -> Result<usize, FifoError> {
        let avail = self.len()?;
        let n = buf.len().min(avail as usize);
        if n == 0 {
            return Ok(0);
        }
        self.fifo.read_at(self.head, &mut buf[..n])?;
        self.advance_head(n as u32);
        Ok(n)
    }

    /// Scatters readable bytes into `bufs` in order; publishes the head once.
    pub fn dequeue_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> Result<usize, FifoError> {
        let mut left = self.len()? as usize;
        let mut read = 0usize;
        for buf in bufs.iter_mut() {
            if left == 0 {
                break;
            }
            let n = buf.len().min(left);
            self.fifo
                .read_at(self.head.wrapping_add(read as u32), &mut buf[..n])?;
            read += n;
            left -= n;
        }
        if read > 0 {
            self.advance_head(read as u32);
        }
        Ok(read)
    }

    /// Copies readable bytes starting `offset` bytes past the head into `buf`, without
    /// consuming them; returns how many (0 if `offset` is at or past the end of the data).
    pub fn peek(&self, offset: u32, buf: &mut [u8]) -> Result<usize, FifoError> {
        let avail = self.len()?;
        if offset >= avail {
            return Ok(0);
        }
        let n = buf.len().min((avail - offset) as usize);
        self.fifo
            .read_at(self.head.wrapping_add(offset), &mut buf[..n])?;
        Ok(n)
    }

    /// Discards up to `n` bytes at the head; returns how many were discarded.
    pub fn drop_front(&mut self, n: usize) -> Result<usize, FifoError> {
        let avail = self.len()?;
        let k = n.min(avail as usize);
        if k > 0 {
            self.advance_head(k as u32);
        }
        Ok(k)
    }

    /// Zero-copy read: all readable bytes as at most two slices. Consume them, then call
    /// [`Consumer::release`]. The bytes are untrusted content written by the peer.
    pub fn read_slices(&self) -> Result<ReadSlices<'_>, FifoError> {
        let avail = self.len()?;
        Ok(slices::read_slices(
            self.fifo.region(),
            self.fifo.data,
            self.fifo.mask,
            self.head,
            avail,
        )?)
    }

    /// Consumes `n` bytes at the head (typically after [`Consumer::read_slices`]); `n` larger
    /// than the readable length is an error and consumes nothing.
    pub fn release(&mut self, n: usize) -> Result<(), FifoError> {
        let avail = self.len()? as usize;
        if n > avail {
            return Err(FifoError::ExceedsAvailable {
                requested: n,
                available: avail,
            });
        }
        if n > 0 {
            self.advance_head(n as u32);
        }
        Ok(())
    }

    /// Whether the producer has half-closed the stream.
    pub fn is_writer_shutdown(&self) -> bool {
        self.fifo.flag(OFF_WRITER_SHUTDOWN)
    }

    /// End of stream: the producer shut down *and* everything has been read. The flag is
    /// loaded (`Acquire`) before emptiness is re-checked, so a `true` is never premature.
    pub fn at_eof(&self) -> Result<bool, FifoError> {
        if !self.is_writer_shutdown() {
            return Ok(false);
        }
        Ok(self.len()? == 0)
    }

    /// Clears the data-available flag; returns whether it was set. Call *before* reading, so
    /// that any later write sets it again and notifies.
    pub fn clear_event(&self) -> bool {
        self.fifo
            .swap_flag(OFF_HAS_EVENT, 0)
            .is_some_and(|v| v != 0)
    }

    /// After a dequeue that freed space: if the producer asked for space, clears the request
    /// and returns `true`; the caller then notifies the producer. Below the threshold (see
    /// [`Consumer::set_tx_space_threshold`]) the request stays for a later release.
    pub fn take_tx_space_request(&self) -> bool {
        if self.tx_space_threshold > 0 {
            match self.len() {
                Ok(used) if self.fifo.capacity - used < self.tx_space_threshold => return false,
                // A corrupt FIFO wakes the producer, which then finds out itself.
                _ => {}
            }
        }
        self.fifo
            .swap_flag(OFF_WANT_TX_SPACE, 0)
            .is_some_and(|v| v != 0)
    }

    /// Wakes a producer that asked for space only once at least `bytes` are free (clamped to
    /// the capacity), so that it wakes to write a worthwhile amount rather than after every
    /// small read. 0, the default, wakes it as soon as any byte is freed.
    pub fn set_tx_space_threshold(&mut self, bytes: u32) {
        self.tx_space_threshold = bytes.min(self.fifo.capacity);
    }

    /// Tells the producer that nothing will be read any more.
    pub fn close_reader(&self) {
        self.fifo.set_flag(OFF_READER_CLOSED);
    }

    /// Whether either side has reset the FIFO.
    pub fn is_reset(&self) -> bool {
        self.fifo.flag(OFF_RESET)
    }

    /// Signals an abortive close to the producer.
    pub fn reset(&self) {
        self.fifo.set_flag(OFF_RESET);
    }
}

/// Producer-side statistics of one FIFO, as last published by its producer. Counters are
/// monotonic while one producer is attached and survive re-attachment; a hostile producer can
/// make them say anything, so they are for reporting only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FifoStats {
    /// Bytes made readable to the consumer (in-order plus reassembled out-of-order bytes).
    pub bytes_written: u64,
    /// Times the producer found the FIFO full and asked to be woken when space frees.
    pub full_events: u64,
    /// Data notifications sent (has_event 0 -> 1 transitions).
    pub notifications: u64,
}

/// A read-only view of a FIFO for a third party (the node service, which allocated the FIFO but
/// is neither endpoint). Claims no role, so it never conflicts with the endpoints.
pub struct FifoObserver {
    region: SharedRegion,
    offset: usize,
    capacity: u32,
}

impl std::fmt::Debug for FifoObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FifoObserver")
            .field("offset", &self.offset)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl FifoObserver {
    /// Validates the FIFO header at `offset` (alignment, magic, capacity, size).
    pub fn attach<R>(region: Arc<R>, offset: usize) -> Result<FifoObserver, FifoError>
    where
        R: AsRef<Region> + Send + Sync + 'static,
    {
        let capacity = KIND.validated_capacity((*region).as_ref(), offset)?;
        Ok(FifoObserver {
            region,
            offset,
            capacity,
        })
    }

    fn region(&self) -> &Region {
        (*self.region).as_ref()
    }

    /// Capacity in bytes, as validated at attach.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// The producer's published statistics.
    pub fn stats(&self) -> FifoStats {
        let load = |field| {
            self.region()
                .atomic_u64(self.offset + field)
                .map_or(0, |w| w.load(Ordering::Relaxed))
        };
        FifoStats {
            bytes_written: load(OFF_BYTES_WRITTEN),
            full_events: load(OFF_FULL_EVENTS),
            notifications: load(OFF_NOTIFICATIONS),
        }
    }

    /// Bytes readable right now, or `None` if the indices are inconsistent.
    pub fn readable(&self) -> Option<u32> {
        let load = |field| {
            self.region()
                .atomic_u32(self.offset + field)
                .map(|w| w.load(Ordering::Acquire))
                .ok()
        };
        let used = load(OFF_TAIL)?.wrapping_sub(load(OFF_HEAD)?);
        (used <= self.capacity).then_some(used)
    }

    /// Whether the producer half-closed the stream (everything it wrote stays readable).
    pub fn is_writer_shutdown(&self) -> bool {
        self.flag(OFF_WRITER_SHUTDOWN)
    }

    /// Whether the consumer closed its end.
    pub fn is_reader_closed(&self) -> bool {
        self.flag(OFF_READER_CLOSED)
    }

    fn flag(&self, field: usize) -> bool {
        self.region()
            .atomic_u32(self.offset + field)
            .is_ok_and(|w| w.load(Ordering::Acquire) != 0)
    }

    /// Aborts the stream for both endpoints (they see [`Producer::is_reset`] /
    /// [`Consumer::is_reset`]); used when one endpoint's process is gone.
    pub fn reset(&self) {
        if let Ok(w) = self.region().atomic_u32(self.offset + OFF_RESET) {
            w.store(1, Ordering::Release);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
