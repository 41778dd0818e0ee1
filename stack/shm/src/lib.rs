//! Shared-memory foundation of Shunt: memfd segments, SPSC byte FIFOs, fixed-record event rings,
//! wake-up channels, eventfd doorbells and file-descriptor passing.
//!
//! # Why it looks like this
//!
//! Shunt moves bytes between co-located processes (the daemon and its applications, or two
//! applications in cut-through) without copying them through a kernel socket. The bytes live in a
//! *segment*: a sealed memfd that both processes map. Inside a segment sit single-producer /
//! single-consumer byte [`fifo`]s (one per direction of a session) and [`ring`]s of 64-byte
//! records (control and IO events). A process that has just made data available wakes the peer
//! through a [`wake`] channel (a pipe whose write end only it holds) — but only when the peer
//! may be asleep, so a busy stream costs no system calls at all. File descriptors for segments and
//! wake-up channels travel over a Unix socket with [`fdpass`]. A [`doorbell`] (an eventfd) wakes
//! the threads of one process; it is never shared with another, because any holder of an
//! eventfd can make every writer of it block.
//!
//! # The peer is not trusted
//!
//! Everything a peer can write — every byte of a segment, including the FIFO and ring headers —
//! is treated as hostile input. The rules, applied in every module:
//!
//! * geometry (capacity, offsets) is read **once** at attach time, validated and copied into
//!   private memory; it is never re-read;
//! * each side keeps a private copy of its own index and only *publishes* it; the peer's index is
//!   validated on every load (`tail - head <= capacity`), and a violation turns the endpoint into a
//!   sticky `Corrupt` state instead of an out-of-bounds access;
//! * every data offset is masked with the private mask, so no value read from shared memory can
//!   steer an access outside the FIFO's own data area;
//! * segments are refused unless they carry `F_SEAL_SHRINK`, so the peer cannot truncate the file
//!   and make our accesses fault with `SIGBUS`;
//! * bookkeeping that must stay consistent (the segment allocator, the out-of-order interval
//!   list) lives in process-private memory only.
//!
//! A hostile peer can therefore make us read garbage *data*, or make an endpoint report
//! `Corrupt`, but it cannot make this process touch memory outside the region or panic.
//!
//! # Unsafe code
//!
//! The crate denies `unsafe_code`; only [`region`] (mapping, raw pointers, atomics placed in
//! shared memory) and the small `fifo::slices` module (building zero-copy slices under the SPSC
//! ownership argument) opt back in. [`fdpass`], [`wake`] and [`doorbell`] are safe wrappers over
//! `rustix`.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use shunt_shm::{Consumer, Producer, Region, fifo_footprint, init_fifo};
//!
//! // A heap region stands in for a segment (`Segment::create` for real sharing).
//! let region = Arc::new(Region::heap(fifo_footprint(4096)));
//! init_fifo(&region, 0, 4096).unwrap();
//! let mut tx = Producer::attach(region.clone(), 0).unwrap();
//! let mut rx = Consumer::attach(region, 0).unwrap();
//!
//! assert_eq!(tx.enqueue(b"hello"), 5);
//! if tx.set_event() {
//!     // 0 -> 1 transition: ring the consumer's doorbell here.
//! }
//! rx.clear_event(); // before reading, so that later writes signal again
//! let mut buf = [0u8; 16];
//! assert_eq!(rx.dequeue(&mut buf).unwrap(), 5);
//! assert_eq!(&buf[..5], b"hello");
//! ```
//!
//! # Testing
//!
//! Unit tests sit at the bottom of each module and run under Miri (`cargo +nightly miri test -p
//! shunt-shm --lib`); the FIFO, has-event, want-tx-space and ring wake-up protocols are
//! model-checked with loom (`tests/loom.rs`); `tests/cross_process.rs` streams more than 4 GiB
//! between two real processes. See the crate README for the exact commands.

pub mod alloc;
pub mod doorbell;
pub mod fdpass;
pub mod fifo;
mod header;
pub mod region;
pub mod ring;
pub mod segment;
mod sync;
pub mod wake;

pub use alloc::SegmentAllocator;
pub use doorbell::{Doorbell, wait_readable, wait_writable};
pub use fdpass::{recv_with_fds, send_with_fds, seqpacket_pair, try_send_with_fds};
pub use fifo::{
    Consumer, FIFO_HEADER_LEN, FifoError, OooInterval, Producer, ReadSlices, WriteSlices,
    fifo_footprint, init_fifo,
};
pub use region::{OutOfBounds, Region};
pub use ring::{
    RECORD_LEN, RingConsumer, RingError, RingProducer, Wake, init_ring, ring_footprint,
};
pub use segment::{SEGMENT_HEADER_LEN, Segment, SegmentError};
pub use wake::{Drained, Rung, WakeError, WakeReceiver, WakeSender};
