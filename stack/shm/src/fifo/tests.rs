//! Unit tests of the FIFO: behaviour, validation and hostile headers. They use heap regions
//! only, so they run under Miri.

use super::*;
use crate::sync::AtomicU32;

const CAP: u32 = 4096;
/// Guard bytes around the FIFO, checked after hostile operations.
const GUARD: usize = 256;
const CANARY: u8 = 0xA5;

/// A region `[guard][fifo][guard]` with canaries, FIFO initialised at `position`.
fn setup(capacity: u32, position: u32) -> (Arc<Region>, usize) {
    let len = GUARD + fifo_footprint(capacity) + GUARD;
    let region = Region::heap(len);
    region.fill(0, GUARD, CANARY).unwrap();
    region.fill(len - GUARD, GUARD, CANARY).unwrap();
    init_fifo_at(&region, GUARD, capacity, position).unwrap();
    (Arc::new(region), GUARD)
}

fn pair(capacity: u32, position: u32) -> (Arc<Region>, Producer, Consumer) {
    let (r, off) = setup(capacity, position);
    let p = Producer::attach(r.clone(), off).unwrap();
    let c = Consumer::attach(r.clone(), off).unwrap();
    (r, p, c)
}

fn assert_canaries(r: &Region) {
    let mut buf = vec![0u8; GUARD];
    r.copy_out(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == CANARY), "front guard overwritten");
    r.copy_out(r.len() - GUARD, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == CANARY), "back guard overwritten");
}

fn word(r: &Region, field: usize) -> &AtomicU32 {
    r.atomic_u32(GUARD + field).unwrap()
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn layout_constants() {
    assert_eq!(FIFO_HEADER_LEN, 256);
    assert_eq!(OFF_MAGIC, 0);
    assert_eq!(OFF_CAPACITY, 4);
    assert_eq!(OFF_HEAD, 64);
    assert_eq!(OFF_READER_CLOSED, 68);
    assert_eq!(OFF_TAIL, 128);
    assert_eq!(OFF_WRITER_SHUTDOWN, 132);
    assert_eq!(OFF_HAS_EVENT, 192);
    assert_eq!(OFF_WANT_TX_SPACE, 196);
    assert_eq!(OFF_RESET, 200);
    assert_eq!(fifo_footprint(4096), 4096 + 256);
    assert_eq!(fifo_footprint(1 << 30), (1 << 30) + 256);
}

#[test]
fn init_validates_arguments() {
    let r = Region::heap(GUARD + fifo_footprint(CAP));
    assert_eq!(
        init_fifo(&r, 0, 4095),
        Err(FifoError::InvalidCapacity(4095))
    );
    assert_eq!(
        init_fifo(&r, 0, 2048),
        Err(FifoError::InvalidCapacity(2048))
    );
    assert_eq!(
        init_fifo(&r, 0, 1 << 31),
        Err(FifoError::InvalidCapacity(1 << 31))
    );
    assert_eq!(init_fifo(&r, 0, 0), Err(FifoError::InvalidCapacity(0)));
    assert_eq!(init_fifo(&r, 32, CAP), Err(FifoError::Misaligned(32)));
    assert!(matches!(
        init_fifo(&r, GUARD + 64, CAP),
        Err(FifoError::OutOfBounds(_))
    ));
    assert!(matches!(
        init_fifo(&r, usize::MAX - 63, CAP),
        Err(FifoError::OutOfBounds(_))
    ));
    assert_eq!(init_fifo(&r, GUARD, CAP), Ok(()));
}

#[test]
fn attach_validates_header() {
    let r = Arc::new(Region::heap(2 * GUARD + fifo_footprint(CAP)));
    // Nothing there yet.
    assert_eq!(
        Producer::attach(r.clone(), GUARD).unwrap_err(),
        FifoError::BadMagic(0)
    );
    assert_eq!(
        Consumer::attach(r.clone(), GUARD + 4).unwrap_err(),
        FifoError::Misaligned(GUARD + 4)
    );
    assert!(matches!(
        Consumer::attach(r.clone(), r.len()),
        Err(FifoError::OutOfBounds(_))
    ));
    // Offsets are often learned from the peer: absurd ones are errors, never overflows.
    let huge = usize::MAX & !(FIFO_ALIGN - 1);
    assert!(matches!(
        Producer::attach(r.clone(), huge),
        Err(FifoError::OutOfBounds(_))
    ));
    assert_eq!(
        Consumer::attach(r.clone(), usize::MAX).unwrap_err(),
        FifoError::Misaligned(usize::MAX)
    );
    init_fifo(&r, GUARD, CAP).unwrap();
    let p = Producer::attach(r.clone(), GUARD).unwrap();
    assert_eq!(p.capacity(), CAP);
    assert_eq!(
        Producer::attach(r.clone(), GUARD).unwrap_err(),
        FifoError::AlreadyAttached
    );
    // Re-initialising an attached FIFO is refused.
    assert_eq!(init_fifo(&r, GUARD, CAP), Err(FifoError::AlreadyAttached));
    let c = Consumer::attach(r.clone(), GUARD).unwrap();
    assert_eq!(
        Consumer::attach(r.clone(), GUARD).unwrap_err(),
        FifoError::AlreadyAttached
    );
    drop(p);
    let p = Producer::attach(r.clone(), GUARD).unwrap();
    drop((p, c));
    init_fifo(&r, GUARD, CAP).unwrap();
}

#[test]
fn hostile_capacity_before_attach_is_refused() {
    let (r, off) = setup(CAP, 0);
    for bad in [0u32, 3, 1000, 4097, 1 << 31, u32::MAX] {
        word(&r, OFF_CAPACITY).store(bad, Ordering::Relaxed);
        assert_eq!(
            Producer::attach(r.clone(), off).unwrap_err(),
            FifoError::InvalidCapacity(bad)
        );
        assert_eq!(
            Consumer::attach(r.clone(), off).unwrap_err(),
            FifoError::InvalidCapacity(bad)
        );
    }
    // A valid power of two that does not fit the region.
    word(&r, OFF_CAPACITY).store(1 << 20, Ordering::Relaxed);
    assert!(matches!(
        Consumer::attach(r.clone(), off),
        Err(FifoError::OutOfBounds(_))
    ));
    assert_canaries(&r);
}

#[test]
fn hostile_capacity_after_attach_is_ignored() {
    let (r, p, c) = pair(CAP, 0);
    let (mut p, mut c) = (p, c);
    word(&r, OFF_CAPACITY).store(1 << 30, Ordering::Relaxed);
    word(&r, OFF_MAGIC).store(0xdead_beef, Ordering::Relaxed);
    let data = pattern(CAP as usize + 100, 1);
    assert_eq!(p.enqueue(&data), CAP as usize);
    let mut out = vec![0u8; CAP as usize + 100];
    assert_eq!(c.dequeue(&mut out).unwrap(), CAP as usize);
    assert_eq!(&out[..CAP as usize], &data[..CAP as usize]);
    assert_canaries(&r);
}

#[test]
fn hostile_indices_at_attach_are_refused() {
    let (r, off) = setup(CAP, 0);
    word(&r, OFF_TAIL).store(CAP + 1, Ordering::Relaxed);
    assert_eq!(
        Producer::attach(r.clone(), off).unwrap_err(),
        FifoError::Corrupt
    );
    assert_eq!(
        Consumer::attach(r.clone(), off).unwrap_err(),
        FifoError::Corrupt
    );
    // A claim taken by a failed attach is released.
    word(&r, OFF_TAIL).store(10, Ordering::Relaxed);
    let p = Producer::attach(r.clone(), off).unwrap();
    assert_eq!(p.tail_position(), 10);
    assert_eq!(p.free_space(), CAP - 10);
}

#[test]
fn hostile_head_makes_producer_corrupt_for_good() {
    let (r, mut p, _c) = pair(CAP, u32::MAX - 100);
    assert_eq!(p.enqueue(&pattern(50, 0)), 50);
    // The "consumer" moves head past tail.
    let head = word(&r, OFF_HEAD);
    head.store(p.tail_position().wrapping_add(1), Ordering::Release);
    assert_eq!(p.try_free_space(), Err(FifoError::Corrupt));
    assert_eq!(p.free_space(), 0);
    assert_eq!(p.enqueue(b"x"), 0);
    assert_eq!(p.try_enqueue(b"x"), Err(FifoError::Corrupt));
    assert!(p.reserve(100).is_empty());
    assert_eq!(p.enqueue_at(5, b"x"), Err(FifoError::Corrupt));
    assert!(p.is_corrupt());
    // Restoring a sane value does not un-corrupt the endpoint.
    head.store(p.tail_position(), Ordering::Release);
    assert_eq!(p.try_free_space(), Err(FifoError::Corrupt));
    assert_canaries(&r);
}

#[test]
fn hostile_head_far_behind_is_corrupt() {
    let (r, mut p, _c) = pair(CAP, 0);
    assert_eq!(p.enqueue(&pattern(10, 0)), 10);
    word(&r, OFF_HEAD).store(10u32.wrapping_sub(CAP + 1), Ordering::Release);
    assert_eq!(p.try_free_space(), Err(FifoError::Corrupt));
    assert_canaries(&r);
}

#[test]
fn a_head_moved_back_is_corrupt_not_full() {
    // The attack: the consumer of an empty FIFO stores head = tail - capacity, so the FIFO
    // looks full and the writer would wait for space forever. A head only moves forward.
    let (r, mut p, mut c) = pair(CAP, 7);
    assert_eq!(p.enqueue(&pattern(100, 0)), 100);
    let mut buf = vec![0u8; 100];
    assert_eq!(c.dequeue(&mut buf).unwrap(), 100);
    assert_eq!(p.free_space(), CAP);
    word(&r, OFF_HEAD).store(p.tail_position().wrapping_sub(CAP), Ordering::Release);
    assert_eq!(p.try_free_space(), Err(FifoError::Corrupt));
    assert_eq!(
        p.try_enqueue_vectored(&[IoSlice::new(b"abc")]),
        Err(FifoError::Corrupt)
    );
    assert_eq!(p.enqueue(b"abc"), 0);
    // Moving it back by a single byte is as impossible.
    let (r2, mut p2, _c2) = pair(CAP, 0);
    assert_eq!(p2.enqueue(&pattern(10, 0)), 10);
    word(&r2, OFF_HEAD).store(5, Ordering::Release);
    assert_eq!(p2.free_space(), CAP - 5);
    word(&r2, OFF_HEAD).store(4, Ordering::Release);
    assert_eq!(p2.try_free_space(), Err(FifoError::Corrupt));
    assert_canaries(&r);
    assert_canaries(&r2);
}

#[test]
fn a_head_moved_up_to_the_tail_frees_space_within_the_data_area() {
    let (r, mut p, _c) = pair(CAP, 7);
    assert_eq!(p.enqueue(&pattern(100, 0)), 100);
    // Head moved to the tail, as if everything was read: legal, and writes stay in bounds.
    word(&r, OFF_HEAD).store(p.tail_position(), Ordering::Release);
    let big = vec![0x11u8; CAP as usize * 2];
    assert_eq!(p.enqueue(&big), CAP as usize);
    assert_canaries(&r);
}

#[test]
fn a_tail_moved_back_is_corrupt() {
    // A producer that takes back bytes the consumer already saw would have it read other bytes
    // in their place.
    let (r, mut p, c) = pair(CAP, 0);
    assert_eq!(p.enqueue(&pattern(20, 0)), 20);
    assert_eq!(c.len(), Ok(20));
    word(&r, OFF_TAIL).store(19, Ordering::Release);
    assert_eq!(c.len(), Err(FifoError::Corrupt));
    assert!(c.is_corrupt());
    assert_canaries(&r);
}

#[test]
fn hostile_tail_makes_consumer_corrupt_for_good() {
    let (r, mut p, mut c) = pair(CAP, u32::MAX - 10);
    assert_eq!(p.enqueue(&pattern(20, 0)), 20);
    let tail = word(&r, OFF_TAIL);
    tail.store(c.head_position().wrapping_add(CAP + 1), Ordering::Release);
    let mut buf = [0u8; 64];
    assert_eq!(c.len(), Err(FifoError::Corrupt));
    assert_eq!(c.dequeue(&mut buf), Err(FifoError::Corrupt));
    assert_eq!(c.peek(0, &mut buf), Err(FifoError::Corrupt));
    assert_eq!(c.drop_front(1), Err(FifoError::Corrupt));
    assert!(c.read_slices().is_err());
    assert_eq!(c.release(0), Err(FifoError::Corrupt));
    assert_eq!(c.at_eof(), Ok(false));
    p.shutdown();
    assert_eq!(c.at_eof(), Err(FifoError::Corrupt));
    // Behind the head is corrupt too.
    tail.store(c.head_position().wrapping_sub(1), Ordering::Release);
    assert!(c.is_corrupt());
    assert_eq!(c.len(), Err(FifoError::Corrupt));
    assert_canaries(&r);
}

#[test]
fn hostile_tail_within_window_reads_only_the_data_area() {
    let (r, _p, mut c) = pair(CAP, 3000);
    // The "producer" claims the FIFO is full without writing anything.
    word(&r, OFF_TAIL).store(3000 + CAP, Ordering::Release);
    let slices = c.read_slices().unwrap();
    assert_eq!(slices.len(), CAP as usize);
    let mut all = vec![0u8; CAP as usize * 2];
    assert_eq!(c.peek(CAP - 1, &mut all).unwrap(), 1);
    assert_eq!(c.dequeue(&mut all).unwrap(), CAP as usize);
    assert_canaries(&r);
}

#[test]
fn hostile_flags_are_harmless() {
    let (r, p, c) = pair(CAP, 0);
    for field in [
        OFF_HAS_EVENT,
        OFF_WANT_TX_SPACE,
        OFF_RESET,
        OFF_READER_CLOSED,
        OFF_WRITER_SHUTDOWN,
    ] {
        word(&r, field).store(0xffff_ffff, Ordering::Relaxed);
    }
    assert!(p.is_reset() && c.is_reset());
    assert!(p.is_reader_closed());
    assert!(c.is_writer_shutdown());
    assert!(!p.set_event());
    assert!(c.clear_event());
    assert!(c.take_tx_space_request());
    assert_eq!(c.at_eof(), Ok(true));
}

#[test]
fn enqueue_dequeue_and_partial_writes() {
    let (r, mut p, mut c) = pair(CAP, 0);
    assert_eq!(c.len(), Ok(0));
    assert_eq!(c.is_empty(), Ok(true));
    assert_eq!(p.free_space(), CAP);
    let data = pattern(3000, 9);
    assert_eq!(p.enqueue(&data), 3000);
    assert_eq!(p.enqueue(&data), CAP as usize - 3000);
    assert_eq!(p.enqueue(&data), 0);
    assert_eq!(p.free_space(), 0);
    assert_eq!(c.len(), Ok(CAP));
    let mut out = vec![0u8; 2000];
    assert_eq!(c.dequeue(&mut out).unwrap(), 2000);
    assert_eq!(&out[..], &data[..2000]);
    assert_eq!(p.free_space(), 2000);
    let mut rest = vec![0u8; 10_000];
    let n = c.dequeue(&mut rest).unwrap();
    assert_eq!(n, CAP as usize - 2000);
    assert_eq!(&rest[..1000], &data[2000..]);
    assert_eq!(&rest[1000..n], &data[..n - 1000]);
    assert_eq!(c.dequeue(&mut rest).unwrap(), 0);
    assert_eq!(p.enqueue(&[]), 0);
    assert_canaries(&r);
}

#[test]
fn counters_wrap_around_u32() {
    let (r, mut p, mut c) = pair(CAP, u32::MAX - 1500);
    let mut sent = 0u64;
    let mut received = Vec::new();
    let mut expected = Vec::new();
    let mut seed = 0u8;
    while sent < 3 * CAP as u64 {
        let chunk = pattern(1234, seed);
        seed = seed.wrapping_add(1);
        let n = p.enqueue(&chunk);
        expected.extend_from_slice(&chunk[..n]);
        sent += n as u64;
        let mut buf = vec![0u8; 999];
        let m = c.dequeue(&mut buf).unwrap();
        received.extend_from_slice(&buf[..m]);
    }
    let mut buf = vec![0u8; CAP as usize];
    let m = c.dequeue(&mut buf).unwrap();
    received.extend_from_slice(&buf[..m]);
    assert_eq!(received, expected);
    // The positions really wrapped.
    assert!(p.tail_position() < u32::MAX - 1500);
    assert_eq!(p.tail_position(), c.head_position());
    assert_canaries(&r);
}

#[test]
fn peek_and_drop_front() {
    let (_r, mut p, mut c) = pair(CAP, u32::MAX - 5);
    let data = pattern(100, 3);
    assert_eq!(p.enqueue(&data), 100);
    let mut buf = [0u8; 10];
    assert_eq!(c.peek(0, &mut buf).unwrap(), 10);
    assert_eq!(&buf, &data[..10]);
    assert_eq!(c.peek(95, &mut buf).unwrap(), 5);
    assert_eq!(&buf[..5], &data[95..]);
    assert_eq!(c.peek(100, &mut buf).unwrap(), 0);
    assert_eq!(c.peek(u32::MAX, &mut buf).unwrap(), 0);
    assert_eq!(c.len(), Ok(100));
    assert_eq!(c.drop_front(30).unwrap(), 30);
    assert_eq!(c.peek(0, &mut buf).unwrap(), 10);
    assert_eq!(&buf, &data[30..40]);
    assert_eq!(c.drop_front(1000).unwrap(), 70);
    assert_eq!(c.drop_front(1).unwrap(), 0);
    assert_eq!(p.free_space(), CAP);
}

#[test]
fn reserve_commit_and_read_slices_release() {
    let (r, mut p, mut c) = pair(CAP, 0);
    // Move the positions close to the end of the data area so that the space wraps.
    assert_eq!(p.enqueue(&vec![0u8; 4000]), 4000);
    assert_eq!(c.drop_front(4000).unwrap(), 4000);
    let data = pattern(500, 42);
    {
        let mut w = p.reserve(500);
        assert_eq!(w.len(), 500);
        assert_eq!(w.first.len(), 96);
        assert_eq!(w.second.len(), 404);
        assert_eq!(w.fill_from(&data), 500);
    }
    assert_eq!(
        p.commit(501),
        Err(FifoError::ExceedsReservation {
            requested: 501,
            reserved: 500
        })
    );
    p.commit(500).unwrap();
    // A commit without a fresh reservation is refused.
    assert!(p.commit(1).is_err());
    p.commit(0).unwrap();
    {
        let s = c.read_slices().unwrap();
        assert_eq!(s.len(), 500);
        assert_eq!(s.first, &data[..96]);
        assert_eq!(s.second, &data[96..]);
    }
    assert_eq!(
        c.release(501),
        Err(FifoError::ExceedsAvailable {
            requested: 501,
            available: 500
        })
    );
    c.release(200).unwrap();
    {
        let s = c.read_slices().unwrap();
        let mut out = vec![0u8; 300];
        assert_eq!(s.copy_to(&mut out), 300);
        assert_eq!(&out[..], &data[200..]);
    }
    c.release(300).unwrap();
    assert!(c.read_slices().unwrap().is_empty());
    // Reserve never exceeds the free space.
    assert_eq!(p.reserve(usize::MAX).len(), CAP as usize);
    assert_eq!(p.reserve(10).len(), 10);
    assert_canaries(&r);
}

#[test]
fn vectored_io() {
    let (_r, mut p, mut c) = pair(CAP, 100);
    let a = pattern(3000, 1);
    let b = pattern(3000, 2);
    let n = p.enqueue_vectored(&[IoSlice::new(&a), IoSlice::new(&[]), IoSlice::new(&b)]);
    assert_eq!(n, CAP as usize);
    let mut x = vec![0u8; 1000];
    let mut y = vec![0u8; 5000];
    let m = c
        .dequeue_vectored(&mut [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)])
        .unwrap();
    assert_eq!(m, CAP as usize);
    assert_eq!(&x[..], &a[..1000]);
    assert_eq!(&y[..2000], &a[1000..]);
    assert_eq!(&y[2000..CAP as usize - 1000], &b[..CAP as usize - 3000]);
    assert_eq!(p.enqueue_vectored(&[]), 0);
    assert_eq!(c.dequeue_vectored(&mut []).unwrap(), 0);
}

#[test]
fn out_of_order_writes_become_contiguous() {
    let (r, mut p, mut c) = pair(CAP, u32::MAX - 20);
    let data = pattern(300, 5);
    assert_eq!(p.enqueue_at(100, &data[100..200]), Ok(0));
    assert_eq!(p.enqueue_at(250, &data[250..300]), Ok(0));
    assert_eq!(
        p.ooo_intervals().collect::<Vec<_>>(),
        vec![
            OooInterval {
                offset: 100,
                len: 100
            },
            OooInterval {
                offset: 250,
                len: 50
            }
        ]
    );
    assert_eq!(
        p.ooo_newest(),
        Some(OooInterval {
            offset: 250,
            len: 50
        })
    );
    // Nothing is readable yet.
    assert_eq!(c.len(), Ok(0));
    // Filling [0, 100) joins the first interval.
    assert_eq!(p.enqueue_at(0, &data[..100]), Ok(200));
    assert_eq!(c.len(), Ok(200));
    assert_eq!(
        p.ooo_intervals().collect::<Vec<_>>(),
        vec![OooInterval {
            offset: 50,
            len: 50
        }]
    );
    // An in-order enqueue that overlaps the remaining interval also joins it.
    assert_eq!(p.enqueue(&data[200..260]), 60);
    assert_eq!(p.ooo_intervals().count(), 0);
    assert_eq!(c.len(), Ok(300));
    let mut out = vec![0u8; 300];
    assert_eq!(c.dequeue(&mut out).unwrap(), 300);
    assert_eq!(out, data);
    assert_canaries(&r);
}

#[test]
fn out_of_order_limits() {
    let (r, mut p, c) = pair(CAP, 0);
    assert_eq!(p.enqueue(&vec![1u8; 1000]), 1000);
    // Free space is CAP - 1000.
    let free = CAP - 1000;
    assert_eq!(p.enqueue_at(free, b"x"), Err(FifoError::Full));
    assert_eq!(p.enqueue_at(free - 1, b"xy"), Err(FifoError::Full));
    assert_eq!(p.enqueue_at(u32::MAX, b"xy"), Err(FifoError::Full));
    assert_eq!(
        p.enqueue_at(0, &vec![0u8; free as usize + 1]),
        Err(FifoError::Full)
    );
    assert_eq!(p.enqueue_at(free - 1, b"x"), Ok(0));
    assert_eq!(p.enqueue_at(5, &[]), Ok(0));
    for k in 1..MAX_OOO_INTERVALS as u32 {
        assert_eq!(p.enqueue_at(10 * k, b"ab"), Ok(0));
    }
    assert_eq!(p.ooo_intervals().count(), MAX_OOO_INTERVALS);
    assert_eq!(p.enqueue_at(500, b"z"), Err(FifoError::TooManyHoles));
    // Merging into an existing interval still works; so does in-order data.
    assert_eq!(p.enqueue_at(12, b"cd"), Ok(0));
    assert_eq!(p.ooo_intervals().count(), MAX_OOO_INTERVALS);
    assert_eq!(p.enqueue_at(0, &[7u8; 10]), Ok(14));
    assert_eq!(p.ooo_intervals().count(), MAX_OOO_INTERVALS - 1);
    assert_eq!(c.len(), Ok(1014));
    assert_canaries(&r);
}

#[test]
fn event_flag_transitions() {
    let (_r, mut p, mut c) = pair(CAP, 0);
    assert!(!c.clear_event());
    assert_eq!(p.enqueue(b"a"), 1);
    assert!(p.set_event());
    assert_eq!(p.enqueue(b"b"), 1);
    assert!(!p.set_event(), "second event is coalesced");
    assert!(c.clear_event());
    assert!(!c.clear_event());
    let mut buf = [0u8; 2];
    assert_eq!(c.dequeue(&mut buf).unwrap(), 2);
    assert!(p.set_event());
}

#[test]
fn tx_space_request_protocol() {
    let (_r, mut p, mut c) = pair(CAP, 0);
    assert_eq!(p.enqueue(&vec![0u8; CAP as usize]), CAP as usize);
    assert!(!c.take_tx_space_request());
    p.request_tx_space();
    assert_eq!(p.free_space(), 0);
    let mut buf = [0u8; 100];
    assert_eq!(c.dequeue(&mut buf).unwrap(), 100);
    assert!(c.take_tx_space_request());
    assert!(!c.take_tx_space_request(), "request is one-shot");
    assert_eq!(p.free_space(), 100);
}

#[test]
fn tx_space_threshold_holds_the_request_until_enough_is_free() {
    let (_r, mut p, mut c) = pair(CAP, 0);
    c.set_tx_space_threshold(1024);
    assert_eq!(p.enqueue(&vec![0u8; CAP as usize]), CAP as usize);
    p.request_tx_space();
    let mut buf = [0u8; 1000];
    assert_eq!(c.dequeue(&mut buf).unwrap(), 1000);
    assert!(!c.take_tx_space_request(), "1000 free, below the threshold");
    assert_eq!(c.dequeue(&mut buf[..24]).unwrap(), 24);
    assert!(c.take_tx_space_request(), "1024 free reaches it");
    assert!(!c.take_tx_space_request(), "request is one-shot");

    // Space the producer takes back counts: the threshold is on what is free now.
    p.request_tx_space();
    assert_eq!(p.enqueue(&[1u8; 500]), 500);
    assert!(!c.take_tx_space_request(), "524 free");

    // Larger than the FIFO means "all of it".
    c.set_tx_space_threshold(u32::MAX);
    let mut rest = vec![0u8; 3571];
    assert_eq!(c.dequeue(&mut rest).unwrap(), 3571);
    assert!(!c.take_tx_space_request(), "one byte still unread");
    assert_eq!(c.dequeue(&mut rest).unwrap(), 1);
    assert!(c.take_tx_space_request(), "empty");
}

#[test]
fn shutdown_and_eof() {
    let (_r, mut p, mut c) = pair(CAP, 0);
    assert_eq!(p.enqueue(b"last"), 4);
    assert!(!c.is_writer_shutdown());
    assert_eq!(c.at_eof(), Ok(false));
    p.shutdown();
    assert!(c.is_writer_shutdown());
    assert_eq!(c.at_eof(), Ok(false), "data still readable");
    let mut buf = [0u8; 8];
    assert_eq!(c.dequeue(&mut buf).unwrap(), 4);
    assert_eq!(c.at_eof(), Ok(true));
}

#[test]
fn reader_close_and_reset() {
    let (_r, p, c) = pair(CAP, 0);
    assert!(!p.is_reader_closed());
    c.close_reader();
    assert!(p.is_reader_closed());
    assert!(!p.is_reset() && !c.is_reset());
    c.reset();
    assert!(p.is_reset() && c.is_reset());
    let (_r, p, c) = pair(CAP, 0);
    p.reset();
    assert!(c.is_reset());
}

#[test]
fn endpoints_are_send_and_debug() {
    fn assert_send<T: Send>() {}
    assert_send::<Producer>();
    assert_send::<Consumer>();
    let (_r, p, c) = pair(CAP, 0);
    assert!(format!("{p:?}").contains("Producer"));
    assert!(format!("{c:?}").contains("Consumer"));
}

#[test]
fn two_fifos_in_one_region_do_not_interfere() {
    let len = 2 * fifo_footprint(CAP);
    let r = Arc::new(Region::heap(len));
    init_fifo(&r, 0, CAP).unwrap();
    init_fifo(&r, fifo_footprint(CAP), CAP).unwrap();
    let mut p1 = Producer::attach(r.clone(), 0).unwrap();
    let mut p2 = Producer::attach(r.clone(), fifo_footprint(CAP)).unwrap();
    let mut c1 = Consumer::attach(r.clone(), 0).unwrap();
    let mut c2 = Consumer::attach(r.clone(), fifo_footprint(CAP)).unwrap();
    assert_eq!(p1.enqueue(&[1u8; 5000]), CAP as usize);
    assert_eq!(p2.enqueue(&[2u8; 5000]), CAP as usize);
    let mut buf = vec![0u8; CAP as usize];
    assert_eq!(c1.dequeue(&mut buf).unwrap(), CAP as usize);
    assert!(buf.iter().all(|&b| b == 1));
    assert_eq!(c2.dequeue(&mut buf).unwrap(), CAP as usize);
    assert!(buf.iter().all(|&b| b == 2));
}

/// A real two-thread transfer; small under Miri, where it checks for data races.
#[test]
fn spsc_threads_transfer_in_order() {
    let total: usize = if cfg!(miri) { 20_000 } else { 2_000_000 };
    let (_r, mut p, mut c) = pair(CAP, u32::MAX - 4000);
    let producer = std::thread::spawn(move || {
        let mut sent = 0usize;
        let mut i = 0u8;
        let mut chunk = [0u8; 700];
        while sent < total {
            let n = chunk.len().min(total - sent);
            for b in &mut chunk[..n] {
                *b = i;
                i = i.wrapping_add(1);
            }
            let mut off = 0;
            while off < n {
                let w = if sent.is_multiple_of(3) {
                    p.enqueue(&chunk[off..n])
                } else {
                    let mut slots = p.reserve(n - off);
                    let k = slots.fill_from(&chunk[off..n]);
                    p.commit(k).unwrap();
                    k
                };
                if w == 0 {
                    std::thread::yield_now();
                }
                off += w;
            }
            sent += n;
        }
        p.shutdown();
    });
    let mut expect = 0u8;
    let mut got = 0usize;
    let mut buf = [0u8; 512];
    loop {
        let n = if got.is_multiple_of(2) {
            c.dequeue(&mut buf).unwrap()
        } else {
            let s = c.read_slices().unwrap();
            let k = s.copy_to(&mut buf);
            c.release(k).unwrap();
            k
        };
        for &b in &buf[..n] {
            assert_eq!(b, expect);
            expect = expect.wrapping_add(1);
        }
        got += n;
        if n == 0 {
            if c.at_eof().unwrap() {
                break;
            }
            std::thread::yield_now();
        }
    }
    producer.join().unwrap();
    assert_eq!(got, total);
}

#[test]
fn observer_sees_producer_statistics() {
    let (r, mut p, mut c) = pair(CAP, 0);
    let obs = FifoObserver::attach(r.clone(), GUARD).unwrap();
    assert_eq!(obs.stats(), FifoStats::default());

    assert_eq!(p.enqueue(&[7u8; 1000]), 1000);
    assert!(p.set_event());
    assert!(
        !p.set_event(),
        "a pending event is coalesced, not counted twice"
    );
    assert_eq!(p.enqueue(&vec![1u8; CAP as usize]), CAP as usize - 1000);
    p.request_tx_space();
    assert_eq!(obs.readable(), Some(CAP));
    assert_eq!(
        obs.stats(),
        FifoStats {
            bytes_written: u64::from(CAP),
            full_events: 1,
            notifications: 1,
        }
    );

    let mut buf = vec![0u8; CAP as usize];
    assert_eq!(c.dequeue(&mut buf).unwrap(), CAP as usize);
    assert!(c.clear_event());
    assert_eq!(obs.readable(), Some(0));
    assert!(p.set_event());
    assert_eq!(obs.stats().notifications, 2);
}

#[test]
fn statistics_survive_producer_reattach() {
    let (r, mut p, _c) = pair(CAP, 0);
    p.enqueue(&[0u8; 100]);
    drop(p);
    let mut p = Producer::attach(r.clone(), GUARD).unwrap();
    p.enqueue(&[0u8; 50]);
    let obs = FifoObserver::attach(r, GUARD).unwrap();
    assert_eq!(obs.stats().bytes_written, 150);
}

#[test]
fn observer_claims_no_role_and_validates_the_header() {
    let (r, _p, _c) = pair(CAP, 0);
    let a = FifoObserver::attach(r.clone(), GUARD).unwrap();
    let b = FifoObserver::attach(r.clone(), GUARD).unwrap();
    assert_eq!(a.capacity(), b.capacity());
    assert!(matches!(
        FifoObserver::attach(r.clone(), GUARD + 8),
        Err(FifoError::Misaligned(_))
    ));
    assert!(matches!(
        FifoObserver::attach(r, 0),
        Err(FifoError::BadMagic(_))
    ));
}

#[test]
fn observer_reset_reaches_both_endpoints() {
    let (r, p, c) = pair(CAP, 0);
    FifoObserver::attach(r, GUARD).unwrap().reset();
    assert!(p.is_reset());
    assert!(c.is_reset());
}

#[test]
fn observer_sees_half_close_flags() {
    let (r, p, c) = pair(CAP, 0);
    let obs = FifoObserver::attach(r, GUARD).unwrap();
    assert!(!obs.is_writer_shutdown() && !obs.is_reader_closed());
    p.shutdown();
    c.close_reader();
    assert!(obs.is_writer_shutdown() && obs.is_reader_closed());
}
