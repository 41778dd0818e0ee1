//! Sealed memfd segments: the unit of memory shared between two processes.
//!
//! # Why memfd and seals
//!
//! A segment is an anonymous memfd, sized once and mapped `MAP_SHARED` by both sides; its file
//! descriptor travels over a Unix socket ([`crate::fdpass`]). Because the peer holds the same file,
//! it could `ftruncate` it: every page of our mapping past the new end would then fault with
//! `SIGBUS` on the next access — a remote kill switch. The creator therefore adds
//! `F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL` before handing the fd out, and [`Segment::open`]
//! refuses any file that lacks `F_SEAL_SHRINK` ([`SegmentError::NotSealed`]). `F_SEAL_SEAL` stops
//! the peer from adding seals later; `F_SEAL_GROW` keeps the size what the header says.
//!
//! # Header
//!
//! The first [`SEGMENT_HEADER_LEN`] bytes hold a small header, written by the creator before the
//! fd is shared and validated by the opener:
//!
//! ```text
//! offset  size  field
//!      0     8  magic   "SHUNTSEG" (little-endian u64)
//!      8     4  layout version (currently 1)
//!     12     4  reserved (0)
//!     16     8  segment length in bytes (must equal the file size)
//!     24    40  reserved
//! ```
//!
//! Everything inside a segment is addressed by offsets from its start, so each process may map it
//! at any address. Carving the rest of the segment into FIFOs and rings is the job of the
//! process-private [`crate::alloc::SegmentAllocator`].

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use rustix::fs::SealFlags;

use crate::region::Region;
use crate::sync::Ordering;

/// Bytes reserved for the segment header at offset 0.
pub const SEGMENT_HEADER_LEN: usize = 64;
/// Magic at offset 0: the bytes `SHUNTSEG` read as a little-endian `u64`.
pub const SEGMENT_MAGIC: u64 = u64::from_le_bytes(*b"SHUNTSEG");
/// Layout version written at offset 8.
pub const SEGMENT_LAYOUT_VERSION: u32 = 1;
/// Smallest segment accepted by [`Segment::create`] and [`Segment::open`] (it must also be at
/// least one page).
pub const MIN_SEGMENT_LEN: usize = 4096;

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_LEN: usize = 16;

/// Errors from creating or opening a segment.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SegmentError {
    /// The length is not a multiple of the page size, or does not fit the address space.
    #[error("segment length {len} is not a multiple of the page size {page_size}")]
    BadLength {
        /// Requested or observed length.
        len: u64,
        /// The system page size.
        page_size: usize,
    },
    /// The length is below [`MIN_SEGMENT_LEN`] or one page.
    #[error("segment length {len} is below the minimum of {min} bytes")]
    TooSmall {
        /// Requested or observed length.
        len: u64,
        /// The minimum accepted.
        min: usize,
    },
    /// The file descriptor is not a memfd carrying `F_SEAL_SHRINK`; mapping it would let the
    /// owner kill us with `SIGBUS` by truncating it.
    #[error("segment file is not sealed against shrinking (F_SEAL_SHRINK missing)")]
    NotSealed,
    /// The header does not start with [`SEGMENT_MAGIC`].
    #[error("bad segment magic {0:#018x}")]
    BadMagic(u64),
    /// The header carries an unknown layout version.
    #[error("unsupported segment layout version {0}")]
    BadVersion(u32),
    /// The length recorded in the header disagrees with the file size.
    #[error("segment header records {header} bytes but the file has {file}")]
    LengthMismatch {
        /// Length found in the header.
        header: u64,
        /// Size of the file.
        file: u64,
    },
    /// memfd creation or sealing failed.
    #[error("memfd: {0}")]
    Memfd(#[source] memfd::Error),
    /// A system call failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A sealed memfd and its shared read/write mapping.
///
/// Dropping it unmaps the memory and closes the descriptor; the peer's mapping is unaffected.
#[derive(Debug)]
pub struct Segment {
    // Field order matters: the mapping is dropped before the descriptor.
    region: Region,
    fd: OwnedFd,
}

fn check_len(len: u64) -> Result<usize, SegmentError> {
    let page_size = rustix::param::page_size();
    let min = MIN_SEGMENT_LEN.max(page_size);
    let bad_length = SegmentError::BadLength { len, page_size };
    let Ok(ulen) = usize::try_from(len) else {
        return Err(bad_length);
    };
    if ulen > isize::MAX as usize {
        return Err(bad_length);
    }
    if ulen < min {
        return Err(SegmentError::TooSmall { len, min });
    }
    if !ulen.is_multiple_of(page_size) {
        return Err(bad_length);
    }
    Ok(ulen)
}

impl Segment {
    /// Creates a sealed memfd of `len` bytes (a multiple of the page size, at least
    /// [`MIN_SEGMENT_LEN`]), maps it and writes the segment header.
    ///
    /// `name` only shows up in `/proc/<pid>/fd` and `/proc/<pid>/maps` (as `memfd:<name>`).
    pub fn create(name: &str, len: usize) -> Result<Segment, SegmentError> {
        let len = check_len(len as u64)?;
        let memfd = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .close_on_exec(true)
            .create(name)
            .map_err(SegmentError::Memfd)?;
        // memfds are born mode 0777. Only the holders of the fd map it anyway, but a process
        // of another user that can reach it through /proc (see docs/security.md) must not open
        // it by path: owner only.
        rustix::fs::fchmod(memfd.as_file(), rustix::fs::Mode::from_raw_mode(0o600))
            .map_err(std::io::Error::from)?;
        memfd.as_file().set_len(len as u64)?;
        memfd
            .add_seals(&[
                memfd::FileSeal::SealShrink,
                memfd::FileSeal::SealGrow,
                memfd::FileSeal::SealSeal,
            ])
            .map_err(SegmentError::Memfd)?;
        let fd: OwnedFd = memfd.into_file().into();
        let region = Region::map_shared(fd.as_fd(), len)?;
        write_header(&region, len);
        Ok(Segment { region, fd })
    }

    /// Opens a segment received from a peer.
    ///
    /// Refuses a file without `F_SEAL_SHRINK` ([`SegmentError::NotSealed`], also for anything
    /// that is not a memfd), a size that is not page-aligned or too small, and a header whose
    /// magic, version or length is wrong. The header is validated once here; nothing later
    /// depends on it.
    pub fn open(fd: OwnedFd) -> Result<Segment, SegmentError> {
        let seals = match rustix::fs::fcntl_get_seals(&fd) {
            Ok(seals) => seals,
            // EINVAL: the file does not support sealing (not a memfd / shmem file).
            Err(rustix::io::Errno::INVAL) => return Err(SegmentError::NotSealed),
            Err(e) => return Err(SegmentError::Io(e.into())),
        };
        if !seals.contains(SealFlags::SHRINK) {
            return Err(SegmentError::NotSealed);
        }
        let st = rustix::fs::fstat(&fd).map_err(io::Error::from)?;
        let file_len = u64::try_from(st.st_size).map_err(|_| SegmentError::BadLength {
            len: 0,
            page_size: rustix::param::page_size(),
        })?;
        let len = check_len(file_len)?;
        let region = Region::map_shared(fd.as_fd(), len)?;
        validate_header(&region, file_len)?;
        Ok(Segment { region, fd })
    }

    /// The mapped memory.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Length of the segment in bytes.
    pub fn len(&self) -> usize {
        self.region.len()
    }

    /// Always `false`: a segment is at least [`MIN_SEGMENT_LEN`] bytes.
    pub fn is_empty(&self) -> bool {
        self.region.is_empty()
    }

    /// The memfd, e.g. to send it to a peer with [`crate::fdpass::send_with_fds`].
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A duplicate (close-on-exec) of the memfd.
    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// Unmaps the segment and returns its memfd.
    pub fn into_fd(self) -> OwnedFd {
        let Segment { region, fd } = self;
        drop(region);
        fd
    }
}

fn write_header(region: &Region, len: usize) {
    // The header lies inside every valid segment (len >= MIN_SEGMENT_LEN > SEGMENT_HEADER_LEN),
    // so these accesses cannot fail; ignore the impossible error rather than panic.
    if let (Ok(version), Ok(hlen), Ok(magic)) = (
        region.atomic_u32(OFF_VERSION),
        region.atomic_u64(OFF_LEN),
        region.atomic_u64(OFF_MAGIC),
    ) {
        version.store(SEGMENT_LAYOUT_VERSION, Ordering::Relaxed);
        hlen.store(len as u64, Ordering::Relaxed);
        // Magic last, with Release, for in-process openers; across processes the fd transfer
        // (a system call) orders the writes anyway.
        magic.store(SEGMENT_MAGIC, Ordering::Release);
    }
}

fn validate_header(region: &Region, file_len: u64) -> Result<(), SegmentError> {
    let word = |off| {
        region
            .atomic_u64(off)
            .map_err(|e| io::Error::other(e.to_string()))
    };
    let magic = word(OFF_MAGIC)?.load(Ordering::Acquire);
    if magic != SEGMENT_MAGIC {
        return Err(SegmentError::BadMagic(magic));
    }
    let version = region
        .atomic_u32(OFF_VERSION)
        .map_err(|e| io::Error::other(e.to_string()))?
        .load(Ordering::Relaxed);
    if version != SEGMENT_LAYOUT_VERSION {
        return Err(SegmentError::BadVersion(version));
    }
    let header = word(OFF_LEN)?.load(Ordering::Relaxed);
    if header != file_len {
        return Err(SegmentError::LengthMismatch {
            header,
            file: file_len,
        });
    }
    Ok(())
}

impl AsRef<Region> for Segment {
    fn as_ref(&self) -> &Region {
        &self.region
    }
}

impl AsFd for Segment {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Segment {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn page() -> usize {
        rustix::param::page_size()
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd/mmap syscalls")]
    fn create_then_open_shares_memory() {
        let seg = Segment::create("shunt-test", 4 * page()).unwrap();
        assert_eq!(seg.len(), 4 * page());
        assert!(!seg.is_empty());
        seg.region().copy_in(SEGMENT_HEADER_LEN, b"ping").unwrap();
        let other = Segment::open(seg.try_clone_fd().unwrap()).unwrap();
        assert_eq!(other.len(), seg.len());
        let mut buf = [0u8; 4];
        other
            .region()
            .copy_out(SEGMENT_HEADER_LEN, &mut buf)
            .unwrap();
        assert_eq!(&buf, b"ping");
        other.region().copy_in(seg.len() - 4, b"pong").unwrap();
        seg.region().copy_out(seg.len() - 4, &mut buf).unwrap();
        assert_eq!(&buf, b"pong");
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd/mmap syscalls")]
    fn created_segment_cannot_be_resized() {
        let seg = Segment::create("shunt-test", page()).unwrap();
        let seals = rustix::fs::fcntl_get_seals(seg.as_fd()).unwrap();
        assert!(seals.contains(SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL));
        assert!(rustix::fs::ftruncate(seg.as_fd(), 0).is_err());
        assert!(rustix::fs::ftruncate(seg.as_fd(), 8 * page() as u64).is_err());
        assert!(rustix::fs::fcntl_add_seals(seg.as_fd(), SealFlags::WRITE).is_err());
        // The fd is close-on-exec.
        let flags = rustix::io::fcntl_getfd(seg.as_fd()).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd/mmap syscalls")]
    fn created_segment_is_owner_only() {
        let seg = Segment::create("shunt-test", page()).unwrap();
        let mode = rustix::fs::fstat(seg.as_fd()).unwrap().st_mode & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd/mmap syscalls")]
    fn create_rejects_bad_lengths() {
        assert!(matches!(
            Segment::create("x", page() + 1),
            Err(SegmentError::BadLength { .. })
        ));
        assert!(matches!(
            Segment::create("x", 0),
            Err(SegmentError::TooSmall { .. })
        ));
        assert!(matches!(
            Segment::create("x", usize::MAX),
            Err(SegmentError::BadLength { .. })
        ));
    }

    fn raw_memfd(len: u64, seals: SealFlags) -> OwnedFd {
        use rustix::fs::{MemfdFlags, memfd_create};
        let fd = memfd_create("raw", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&fd, len).unwrap();
        if !seals.is_empty() {
            rustix::fs::fcntl_add_seals(&fd, seals).unwrap();
        }
        fd
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd/mmap syscalls")]
    fn open_refuses_unsealed_files() {
        let fd = raw_memfd(page() as u64, SealFlags::empty());
        assert!(matches!(Segment::open(fd), Err(SegmentError::NotSealed)));
        let fd = raw_memfd(page() as u64, SealFlags::GROW | SealFlags::SEAL);
        assert!(matches!(Segment::open(fd), Err(SegmentError::NotSealed)));
        // A memfd created without MFD_ALLOW_SEALING carries only F_SEAL_SEAL.
        let fd = rustix::fs::memfd_create("nosealing", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, page() as u64).unwrap();
        assert!(matches!(Segment::open(fd), Err(SegmentError::NotSealed)));
        // Not a memfd at all.
        let (r, _w) = rustix::pipe::pipe().unwrap();
        assert!(matches!(Segment::open(r), Err(SegmentError::NotSealed)));
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd/mmap syscalls")]
    fn open_refuses_bad_headers() {
        // Sealed, right size, but no header.
        let fd = raw_memfd(page() as u64, SealFlags::SHRINK);
        assert!(matches!(Segment::open(fd), Err(SegmentError::BadMagic(0))));

        let seg = Segment::create("hdr", 2 * page()).unwrap();
        seg.region()
            .atomic_u32(OFF_VERSION)
            .unwrap()
            .store(99, Ordering::Relaxed);
        assert!(matches!(
            Segment::open(seg.try_clone_fd().unwrap()),
            Err(SegmentError::BadVersion(99))
        ));
        seg.region()
            .atomic_u32(OFF_VERSION)
            .unwrap()
            .store(SEGMENT_LAYOUT_VERSION, Ordering::Relaxed);
        seg.region()
            .atomic_u64(OFF_LEN)
            .unwrap()
            .store(64 * page() as u64, Ordering::Relaxed);
        match Segment::open(seg.try_clone_fd().unwrap()) {
            Err(SegmentError::LengthMismatch { header, file }) => {
                assert_eq!(header, 64 * page() as u64);
                assert_eq!(file, 2 * page() as u64);
            }
            other => panic!("expected LengthMismatch, got {other:?}"),
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd/mmap syscalls")]
    fn open_refuses_bad_sizes() {
        let fd = raw_memfd(page() as u64 + 8, SealFlags::SHRINK);
        assert!(matches!(
            Segment::open(fd),
            Err(SegmentError::BadLength { .. })
        ));
        let fd = raw_memfd(0, SealFlags::SHRINK);
        assert!(matches!(
            Segment::open(fd),
            Err(SegmentError::TooSmall { .. })
        ));
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd/mmap syscalls")]
    fn into_fd_keeps_the_file() {
        let seg = Segment::create("into", page()).unwrap();
        seg.region().copy_in(100, b"kept").unwrap();
        let fd = seg.into_fd();
        let again = Segment::open(fd).unwrap();
        let mut b = [0u8; 4];
        again.region().copy_out(100, &mut b).unwrap();
        assert_eq!(&b, b"kept");
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd/mmap syscalls")]
    fn fifo_across_two_mappings() {
        use crate::fifo::{Consumer, Producer, fifo_footprint, init_fifo};
        use std::sync::Arc;
        let len = (SEGMENT_HEADER_LEN + fifo_footprint(4096)).next_multiple_of(page());
        let a = Segment::create("fifo", len).unwrap();
        init_fifo(a.region(), 64, 4096).unwrap();
        let b = Arc::new(Segment::open(a.try_clone_fd().unwrap()).unwrap());
        let a = Arc::new(a);
        // Two mappings of the same memory, as two processes would have.
        let mut p = Producer::attach(a, 64).unwrap();
        let mut c = Consumer::attach(b, 64).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut got = Vec::new();
        let mut sent = 0;
        while got.len() < data.len() {
            sent += p.enqueue(&data[sent..]);
            let mut buf = [0u8; 3000];
            let n = c.dequeue(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, data);
    }

    #[test]
    fn segment_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Segment>();
    }
}
