//! A raw view of memory that may be shared with a hostile process.
//!
//! This is the only module that dereferences raw pointers. Everything above it works with byte
//! offsets and goes through the bounds-checked primitives here, so an offset or length that came
//! from shared memory can at worst produce an [`OutOfBounds`] error.
//!
//! # The memory model we rely on
//!
//! A [`Region`] never hands out a reference to a *plain* byte that another party may write while
//! the reference is alive, except through the crate-private zero-copy accessors whose callers
//! prove exclusivity with the SPSC protocol (see `fifo::slices`). Header words are accessed as
//! atomics (`&AtomicU32` / `&AtomicU64`) placed directly in the mapping; atomics tolerate
//! concurrent access by definition. Payload bytes are moved with `ptr::copy` through raw
//! pointers, never through references, so the compiler never assumes they are immutable.
//!
//! Bytes written concurrently by *another process* are outside the Rust abstract machine; the
//! copies may observe torn or changing data, which the higher layers treat as untrusted content
//! (they never derive an index from payload bytes).
//!
//! # Claims
//!
//! The SPSC contract (one producer and one consumer per FIFO or ring) is what makes the
//! zero-copy slices sound *within this process*. The types enforce it for one endpoint handle
//! (`Producer` is neither `Clone` nor `Sync`), and the region enforces it across handles: each
//! endpoint claims `(offset, role)` when it attaches and releases the claim on drop, so a second
//! `Producer` on the same FIFO through the same `Region` is refused.
//!
//! # Loom
//!
//! Under `cfg(loom)` the atomics returned by [`Region::atomic_u32`]/[`Region::atomic_u64`] are
//! loom atomics kept in a side table indexed by offset (loom cannot place its atomics in raw
//! memory), and every payload copy is reported to a per-byte `loom::cell::UnsafeCell<()>` so that
//! loom flags a payload read that is not ordered after the corresponding write. Under loom,
//! header words must therefore only be accessed through the atomic accessors (which is what the
//! FIFO and ring modules do).

#![allow(unsafe_code)]

use std::alloc::{Layout, alloc_zeroed, dealloc, handle_alloc_error};
use std::collections::HashSet;
use std::fmt;
use std::io;
use std::os::fd::BorrowedFd;
use std::ptr::{self, NonNull};
use std::sync::{Mutex, PoisonError};

use crate::sync::{AtomicU32, AtomicU64};

/// Alignment of the allocation behind [`Region::heap`]: one cache line, so that header lines laid
/// out at 64-byte offsets really sit on separate cache lines.
pub const HEAP_ALIGN: usize = 64;

/// An access that does not fit in the region, or an atomic access that is misaligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "access of {len} bytes at offset {offset} does not fit a {region_len}-byte region or is misaligned"
)]
pub struct OutOfBounds {
    /// Requested start offset.
    pub offset: usize,
    /// Requested length in bytes.
    pub len: usize,
    /// Length of the region.
    pub region_len: usize,
}

/// Which end of a FIFO or ring an endpoint is; used for claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Role {
    Producer,
    Consumer,
}

#[derive(Debug)]
enum Backing {
    /// Owned allocation made with this layout.
    Heap(Layout),
    /// A shared mapping of `Region::len` bytes, unmapped on drop.
    Mapped,
}

/// A raw `(ptr, len)` view of memory that may be shared with a hostile process.
///
/// All accessors are bounds-checked; none of them panics.
pub struct Region {
    base: NonNull<u8>,
    len: usize,
    backing: Backing,
    /// Attached endpoints, `(offset, role)`; process-private.
    claims: Mutex<HashSet<(usize, Role)>>,
    #[cfg(loom)]
    shadow: shadow::Shadow,
}

// SAFETY: `Region` owns its memory (a heap allocation or a mapping); the raw pointer is never
// used to create references to plain bytes that could be aliased across threads except through
// the `unsafe fn` slice accessors, whose callers must guarantee exclusivity. Concurrent access
// to header words goes through atomics, and payload copies go through raw pointers.
unsafe impl Send for Region {}
// SAFETY: see the `Send` impl; every `&self` method is safe to call from several threads.
unsafe impl Sync for Region {}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region")
            .field("base", &self.base)
            .field("len", &self.len)
            .field("backing", &self.backing)
            .finish()
    }
}

impl AsRef<Region> for Region {
    fn as_ref(&self) -> &Region {
        self
    }
}

impl Region {
    /// An owned, zeroed, [`HEAP_ALIGN`]-aligned heap region of `len` bytes, for tests, Miri and
    /// loom models (and for FIFOs that are never shared with another process).
    ///
    /// # Panics
    ///
    /// If `len` is so large that no allocation layout exists for it (more than `isize::MAX`).
    /// Aborts through [`handle_alloc_error`] when the allocation fails, like `Vec`.
    pub fn heap(len: usize) -> Region {
        // A zero-sized allocation is not allowed; keep at least one cache line.
        let layout = Layout::from_size_align(len.max(HEAP_ALIGN), HEAP_ALIGN)
            .expect("Region::heap: length exceeds isize::MAX");
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(base) = NonNull::new(raw) else {
            handle_alloc_error(layout)
        };
        Region::from_parts(base, len, Backing::Heap(layout))
    }

    /// Maps `len` bytes of `fd` shared and read/write.
    ///
    /// The caller must have made sure the file cannot shrink below `len` (memfd seals); otherwise
    /// an access could fault with `SIGBUS`. That is a liveness, not an aliasing, requirement, so
    /// this function is safe: `segment` checks `F_SEAL_SHRINK` before calling it.
    pub(crate) fn map_shared(fd: BorrowedFd<'_>, len: usize) -> io::Result<Region> {
        use rustix::mm::{MapFlags, ProtFlags, mmap};
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cannot map 0 bytes",
            ));
        }
        // SAFETY: we ask the kernel for a fresh mapping at an address of its choosing (null
        // hint, no MAP_FIXED), so no existing memory is replaced or aliased by Rust references.
        let raw = unsafe {
            mmap(
                ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )
        }?;
        let base = NonNull::new(raw.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(Region::from_parts(base, len, Backing::Mapped))
    }

    fn from_parts(base: NonNull<u8>, len: usize, backing: Backing) -> Region {
        Region {
            base,
            len,
            backing,
            claims: Mutex::new(HashSet::new()),
            #[cfg(loom)]
            shadow: shadow::Shadow::new(len),
        }
    }

    /// Length of the region in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region has zero length.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Checks that `[offset, offset + len)` lies inside the region.
    fn check(&self, offset: usize, len: usize) -> Result<(), OutOfBounds> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(self.oob(offset, len)),
        }
    }

    fn oob(&self, offset: usize, len: usize) -> OutOfBounds {
        OutOfBounds {
            offset,
            len,
            region_len: self.len,
        }
    }

    /// The 4-byte-aligned word at `offset`, as an atomic.
    pub fn atomic_u32(&self, offset: usize) -> Result<&AtomicU32, OutOfBounds> {
        if !offset.is_multiple_of(4) {
            return Err(self.oob(offset, 4));
        }
        self.check(offset, 4)?;
        #[cfg(loom)]
        {
            Ok(self.shadow.u32_at(offset))
        }
        #[cfg(not(loom))]
        {
            // SAFETY: `offset + 4 <= len`, the base is at least 64-byte aligned (heap layout or
            // page-aligned mapping) and `offset` is 4-aligned, so the pointer is in bounds and
            // aligned for `AtomicU32`, which has the size and alignment of `u32`. The memory is
            // valid for the lifetime of `&self`. Creating a shared reference to an atomic is
            // fine even when other threads or processes access the word concurrently, as long as
            // nobody holds a plain reference to it; the only plain references this crate creates
            // cover FIFO data areas, never header words.
            Ok(unsafe { &*self.base.as_ptr().add(offset).cast::<AtomicU32>() })
        }
    }

    /// The 8-byte-aligned word at `offset`, as an atomic.
    pub fn atomic_u64(&self, offset: usize) -> Result<&AtomicU64, OutOfBounds> {
        if !offset.is_multiple_of(8) {
            return Err(self.oob(offset, 8));
        }
        self.check(offset, 8)?;
        #[cfg(loom)]
        {
            Ok(self.shadow.u64_at(offset))
        }
        #[cfg(not(loom))]
        {
            // SAFETY: as in `atomic_u32`, with 8-byte size and alignment.
            Ok(unsafe { &*self.base.as_ptr().add(offset).cast::<AtomicU64>() })
        }
    }

    /// Copies `src` into the region at `offset`.
    pub fn copy_in(&self, offset: usize, src: &[u8]) -> Result<(), OutOfBounds> {
        self.check(offset, src.len())?;
        #[cfg(loom)]
        self.shadow.track_write(offset, src.len());
        // SAFETY: the destination range is in bounds (checked above) and valid for writes for
        // the lifetime of `self`. We write through a raw pointer, creating no reference to the
        // destination. `ptr::copy` (memmove) tolerates `src` pointing into the region itself.
        unsafe { ptr::copy(src.as_ptr(), self.base.as_ptr().add(offset), src.len()) };
        Ok(())
    }

    /// Copies bytes from the region at `offset` into `dst`.
    pub fn copy_out(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        self.check(offset, dst.len())?;
        #[cfg(loom)]
        self.shadow.track_read(offset, dst.len());
        // SAFETY: the source range is in bounds (checked above) and valid for reads; `dst` is an
        // exclusive borrow, so it cannot overlap a range we read through the raw pointer unless
        // it *is* region memory handed out exclusively, in which case memmove is still defined.
        unsafe { ptr::copy(self.base.as_ptr().add(offset), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Sets `len` bytes at `offset` to `byte`.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<(), OutOfBounds> {
        self.check(offset, len)?;
        #[cfg(loom)]
        self.shadow.track_write(offset, len);
        // SAFETY: the range is in bounds (checked above) and written through a raw pointer.
        unsafe { ptr::write_bytes(self.base.as_ptr().add(offset), byte, len) };
        Ok(())
    }

    /// A shared slice of `len` bytes at `offset`, for zero-copy reads.
    ///
    /// # Safety
    ///
    /// For the lifetime of the returned slice, no thread of this process may write the range
    /// (through this region or otherwise). Writes by another process are outside the Rust
    /// abstract machine; the caller must treat the bytes as untrusted content that may change.
    pub(crate) unsafe fn slice(&self, offset: usize, len: usize) -> Result<&[u8], OutOfBounds> {
        self.check(offset, len)?;
        #[cfg(loom)]
        self.shadow.track_read(offset, len);
        // SAFETY: in bounds (checked above), valid and initialised (allocated zeroed or mapped),
        // aligned for `u8`; the caller guarantees no in-process writer for the slice's lifetime.
        Ok(unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(offset), len) })
    }

    /// An exclusive slice of `len` bytes at `offset`, for zero-copy writes.
    ///
    /// # Safety
    ///
    /// For the lifetime of the returned slice, no other thread of this process may read or write
    /// the range, and no other reference to it may exist.
    #[allow(
        clippy::mut_from_ref,
        reason = "interior mutability of shared memory; exclusivity is the caller's proof obligation"
    )]
    pub(crate) unsafe fn slice_mut(
        &self,
        offset: usize,
        len: usize,
    ) -> Result<&mut [u8], OutOfBounds> {
        self.check(offset, len)?;
        #[cfg(loom)]
        self.shadow.track_write(offset, len);
        // SAFETY: in bounds (checked above), valid, initialised and aligned; the caller
        // guarantees that this is the only live reference to the range.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr().add(offset), len) })
    }

    /// Claims `(offset, role)` for an attaching endpoint; `false` if it is already claimed.
    pub(crate) fn claim(&self, offset: usize, role: Role) -> bool {
        let mut claims = self.claims.lock().unwrap_or_else(PoisonError::into_inner);
        claims.insert((offset, role))
    }

    /// Releases a claim taken with [`Region::claim`].
    pub(crate) fn release_claim(&self, offset: usize, role: Role) {
        let mut claims = self.claims.lock().unwrap_or_else(PoisonError::into_inner);
        claims.remove(&(offset, role));
    }

    /// Whether any endpoint is attached at `offset`.
    pub(crate) fn is_claimed(&self, offset: usize) -> bool {
        let claims = self.claims.lock().unwrap_or_else(PoisonError::into_inner);
        claims.contains(&(offset, Role::Producer)) || claims.contains(&(offset, Role::Consumer))
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        match self.backing {
            // SAFETY: `base` was returned by `alloc_zeroed(layout)` with this very layout and has
            // not been freed; no reference into it outlives `self`.
            Backing::Heap(layout) => unsafe { dealloc(self.base.as_ptr(), layout) },
            Backing::Mapped => {
                // SAFETY: `base`/`len` describe a mapping created by `map_shared` and owned by
                // `self`; no reference into it outlives `self`.
                let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
            }
        }
    }
}

#[cfg(loom)]
mod shadow {
    //! Loom side tables: loom atomics and per-byte access trackers, created lazily.

    use std::sync::OnceLock;

    use loom::cell::UnsafeCell;
    use loom::sync::atomic::{AtomicU32, AtomicU64};

    pub(super) struct Shadow {
        u32s: Box<[OnceLock<AtomicU32>]>,
        u64s: Box<[OnceLock<AtomicU64>]>,
        bytes: Box<[OnceLock<UnsafeCell<()>>]>,
    }

    impl Shadow {
        pub(super) fn new(len: usize) -> Shadow {
            Shadow {
                u32s: (0..len / 4).map(|_| OnceLock::new()).collect(),
                u64s: (0..len / 8).map(|_| OnceLock::new()).collect(),
                bytes: (0..len).map(|_| OnceLock::new()).collect(),
            }
        }

        pub(super) fn u32_at(&self, offset: usize) -> &AtomicU32 {
            self.u32s[offset / 4].get_or_init(|| AtomicU32::new(0))
        }

        pub(super) fn u64_at(&self, offset: usize) -> &AtomicU64 {
            self.u64s[offset / 8].get_or_init(|| AtomicU64::new(0))
        }

        fn cell(&self, i: usize) -> &UnsafeCell<()> {
            self.bytes[i].get_or_init(|| UnsafeCell::new(()))
        }

        pub(super) fn track_write(&self, offset: usize, len: usize) {
            for i in offset..offset + len {
                self.cell(i).with_mut(|_| ());
            }
        }

        pub(super) fn track_read(&self, offset: usize, len: usize) {
            for i in offset..offset + len {
                self.cell(i).with(|_| ());
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::Ordering;

    #[test]
    fn heap_region_is_zeroed_and_aligned() {
        let r = Region::heap(300);
        assert_eq!(r.len(), 300);
        assert!(!r.is_empty());
        let mut buf = [0xffu8; 300];
        r.copy_out(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(r.base.as_ptr() as usize % HEAP_ALIGN, 0);
    }

    #[test]
    fn zero_length_heap_region() {
        let r = Region::heap(0);
        assert!(r.is_empty());
        assert!(r.copy_in(0, &[]).is_ok());
        assert!(r.copy_in(0, &[1]).is_err());
        assert!(r.atomic_u32(0).is_err());
    }

    #[test]
    fn copy_round_trip_and_bounds() {
        let r = Region::heap(64);
        r.copy_in(60, &[1, 2, 3, 4]).unwrap();
        let mut out = [0u8; 4];
        r.copy_out(60, &mut out).unwrap();
        assert_eq!(out, [1, 2, 3, 4]);
        assert_eq!(
            r.copy_in(61, &[0; 4]),
            Err(OutOfBounds {
                offset: 61,
                len: 4,
                region_len: 64
            })
        );
        assert!(r.copy_out(64, &mut [0u8; 1]).is_err());
        assert!(r.copy_out(64, &mut []).is_ok());
        assert!(r.copy_in(usize::MAX, &[0]).is_err());
        assert!(r.copy_out(usize::MAX - 1, &mut [0u8; 4]).is_err());
        assert!(r.fill(0, 65, 0).is_err());
        r.fill(0, 64, 7).unwrap();
        r.copy_out(60, &mut out).unwrap();
        assert_eq!(out, [7; 4]);
    }

    #[test]
    fn atomics_are_bounds_and_alignment_checked() {
        let r = Region::heap(64);
        assert!(r.atomic_u32(60).is_ok());
        assert!(r.atomic_u32(62).is_err());
        assert!(r.atomic_u32(64).is_err());
        assert!(r.atomic_u32(usize::MAX - 3).is_err());
        assert!(r.atomic_u64(56).is_ok());
        assert!(r.atomic_u64(60).is_err());
        assert!(r.atomic_u64(64).is_err());
        r.atomic_u32(8)
            .unwrap()
            .store(0x0403_0201, Ordering::Relaxed);
        let mut b = [0u8; 4];
        r.copy_out(8, &mut b).unwrap();
        assert_eq!(u32::from_ne_bytes(b), 0x0403_0201);
        r.atomic_u64(16).unwrap().store(u64::MAX, Ordering::Relaxed);
        assert_eq!(r.atomic_u32(20).unwrap().load(Ordering::Relaxed), u32::MAX);
    }

    #[test]
    fn slices_are_bounds_checked() {
        let r = Region::heap(128);
        r.copy_in(10, b"hello").unwrap();
        // SAFETY: single-threaded test; no writer while the slice lives.
        let s = unsafe { r.slice(10, 5) }.unwrap();
        assert_eq!(s, b"hello");
        // SAFETY: as above.
        assert!(unsafe { r.slice(100, 29) }.is_err());
        {
            // SAFETY: single-threaded test; this is the only reference to the range.
            let m = unsafe { r.slice_mut(120, 8) }.unwrap();
            m.copy_from_slice(b"abcdefgh");
        }
        let mut out = [0u8; 8];
        r.copy_out(120, &mut out).unwrap();
        assert_eq!(&out, b"abcdefgh");
        // SAFETY: as above.
        assert!(unsafe { r.slice_mut(121, 8) }.is_err());
    }

    #[test]
    fn claims_are_exclusive_per_role() {
        let r = Region::heap(64);
        assert!(!r.is_claimed(0));
        assert!(r.claim(0, Role::Producer));
        assert!(!r.claim(0, Role::Producer));
        assert!(r.claim(0, Role::Consumer));
        assert!(r.is_claimed(0));
        r.release_claim(0, Role::Producer);
        assert!(r.claim(0, Role::Producer));
        r.release_claim(0, Role::Producer);
        r.release_claim(0, Role::Consumer);
        assert!(!r.is_claimed(0));
    }

    #[test]
    fn concurrent_atomic_access_from_threads() {
        let r = std::sync::Arc::new(Region::heap(64));
        let r2 = r.clone();
        let t = std::thread::spawn(move || {
            for _ in 0..100 {
                r2.atomic_u32(0).unwrap().fetch_add(1, Ordering::Relaxed);
            }
        });
        for _ in 0..100 {
            r.atomic_u32(0).unwrap().fetch_add(1, Ordering::Relaxed);
        }
        t.join().unwrap();
        assert_eq!(r.atomic_u32(0).unwrap().load(Ordering::Relaxed), 200);
    }
}
