//! Model-based tests of the FIFO.
//!
//! 1. Random sequences of every in-order operation are checked against a `VecDeque<u8>`, with
//!    the free-running counters starting near `u32::MAX` so that they wrap during the run.
//! 2. Random out-of-order writes (and in-order fills and reads) are checked against an obviously
//!    correct model: the set of written stream positions beyond the tail, whose maximal runs are
//!    exactly the intervals the producer must report.
//!
//! Run: `cargo test -p shunt-shm --test fifo_model`.

use std::collections::{BTreeSet, VecDeque};
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use proptest::prelude::*;
use shunt_shm::fifo::{MAX_OOO_INTERVALS, OooInterval, init_fifo_at};
use shunt_shm::{Consumer, FifoError, Producer, Region, fifo_footprint};

const CAP: u32 = 4096;

fn attach(capacity: u32, position: u32) -> (Producer, Consumer) {
    let region = Region::heap(fifo_footprint(capacity));
    init_fifo_at(&region, 0, capacity, position).unwrap();
    let region = Arc::new(region);
    (
        Producer::attach(region.clone(), 0).unwrap(),
        Consumer::attach(region, 0).unwrap(),
    )
}

/// The byte at absolute stream position `s`: positions never line up with 256-byte periods.
fn stream_byte(seed: u8, s: u64) -> u8 {
    ((s.wrapping_mul(2_654_435_761) >> 13) as u8) ^ seed
}

#[derive(Debug, Clone)]
enum Op {
    Enqueue(usize),
    EnqueueVectored(Vec<usize>),
    Dequeue(usize),
    DequeueVectored(Vec<usize>),
    Peek(u32, usize),
    DropFront(usize),
    ReserveCommit { max: usize, percent: usize },
    ReadRelease { percent: usize },
}

fn op() -> impl Strategy<Value = Op> {
    let len = 0usize..6000;
    prop_oneof![
        4 => len.clone().prop_map(Op::Enqueue),
        1 => proptest::collection::vec(0usize..2500, 0..4).prop_map(Op::EnqueueVectored),
        3 => len.clone().prop_map(Op::Dequeue),
        1 => proptest::collection::vec(0usize..2500, 0..4).prop_map(Op::DequeueVectored),
        2 => (0u32..5000, 0usize..3000).prop_map(|(o, l)| Op::Peek(o, l)),
        1 => len.clone().prop_map(Op::DropFront),
        2 => (len.clone(), 0usize..=100).prop_map(|(max, percent)| Op::ReserveCommit { max, percent }),
        2 => (0usize..=100).prop_map(|percent| Op::ReadRelease { percent }),
    ]
}

struct Source {
    seed: u8,
    next: u64,
}

impl Source {
    fn take(&mut self, n: usize) -> Vec<u8> {
        (0..n as u64)
            .map(|i| stream_byte(self.seed, self.next + i))
            .collect()
    }
    fn advance(&mut self, n: usize) {
        self.next += n as u64;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn in_order_ops_match_vecdeque(
        start_back in 0u32..20_000,
        seed in any::<u8>(),
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let (mut p, mut c) = attach(CAP, u32::MAX - start_back);
        let mut model: VecDeque<u8> = VecDeque::new();
        let mut src = Source { seed, next: 0 };
        let cap = CAP as usize;
        for op in ops {
            match op {
                Op::Enqueue(len) => {
                    let data = src.take(len);
                    let n = p.enqueue(&data);
                    prop_assert_eq!(n, len.min(cap - model.len()));
                    model.extend(&data[..n]);
                    src.advance(n);
                }
                Op::EnqueueVectored(lens) => {
                    let total: usize = lens.iter().sum();
                    let data = src.take(total);
                    let mut bufs = Vec::new();
                    let mut at = 0;
                    for l in &lens {
                        bufs.push(IoSlice::new(&data[at..at + l]));
                        at += l;
                    }
                    let n = p.enqueue_vectored(&bufs);
                    prop_assert_eq!(n, total.min(cap - model.len()));
                    model.extend(&data[..n]);
                    src.advance(n);
                }
                Op::Dequeue(len) => {
                    let mut buf = vec![0u8; len];
                    let n = c.dequeue(&mut buf).unwrap();
                    prop_assert_eq!(n, len.min(model.len()));
                    let expect: Vec<u8> = model.drain(..n).collect();
                    prop_assert_eq!(&buf[..n], &expect[..]);
                }
                Op::DequeueVectored(lens) => {
                    let mut storage: Vec<Vec<u8>> = lens.iter().map(|&l| vec![0u8; l]).collect();
                    let mut bufs: Vec<IoSliceMut<'_>> =
                        storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                    let n = c.dequeue_vectored(&mut bufs).unwrap();
                    let total: usize = lens.iter().sum();
                    prop_assert_eq!(n, total.min(model.len()));
                    let got: Vec<u8> = storage.concat();
                    let expect: Vec<u8> = model.drain(..n).collect();
                    prop_assert_eq!(&got[..n], &expect[..]);
                }
                Op::Peek(offset, len) => {
                    let mut buf = vec![0u8; len];
                    let n = c.peek(offset, &mut buf).unwrap();
                    let avail = model.len().saturating_sub(offset as usize);
                    prop_assert_eq!(n, len.min(avail));
                    let expect: Vec<u8> =
                        model.iter().skip(offset as usize).take(n).copied().collect();
                    prop_assert_eq!(&buf[..n], &expect[..]);
                }
                Op::DropFront(len) => {
                    let n = c.drop_front(len).unwrap();
                    prop_assert_eq!(n, len.min(model.len()));
                    model.drain(..n);
                }
                Op::ReserveCommit { max, percent } => {
                    let free = cap - model.len();
                    let data = src.take(max.min(free));
                    let mut w = p.reserve(max);
                    prop_assert_eq!(w.len(), max.min(free));
                    let k = w.len() * percent / 100;
                    prop_assert_eq!(w.fill_from(&data[..k]), k);
                    prop_assert_eq!(
                        p.commit(free + 1),
                        Err(FifoError::ExceedsReservation { requested: free + 1, reserved: max.min(free) })
                    );
                    p.commit(k).unwrap();
                    model.extend(&data[..k]);
                    src.advance(k);
                }
                Op::ReadRelease { percent } => {
                    let s = c.read_slices().unwrap();
                    prop_assert_eq!(s.len(), model.len());
                    let got: Vec<u8> = s.first.iter().chain(s.second.iter()).copied().collect();
                    let expect: Vec<u8> = model.iter().copied().collect();
                    prop_assert_eq!(got, expect);
                    prop_assert!(s.second.is_empty() || s.first.len() + s.second.len() <= cap);
                    let k = model.len() * percent / 100;
                    c.release(k).unwrap();
                    model.drain(..k);
                }
            }
            prop_assert_eq!(c.len().unwrap() as usize, model.len());
            prop_assert_eq!(p.free_space() as usize, cap - model.len());
            prop_assert_eq!(p.tail_position().wrapping_sub(c.head_position()) as usize, model.len());
        }
    }
}

/// Model of the out-of-order producer state: absolute stream positions.
struct OooModel {
    head: u64,
    tail: u64,
    /// Written positions at or beyond `tail` (never containing `tail` itself).
    written: BTreeSet<u64>,
}

impl OooModel {
    /// Maximal runs of `set` as `(offset from tail, len)`.
    fn runs(tail: u64, set: &BTreeSet<u64>) -> Vec<OooInterval> {
        let mut out: Vec<OooInterval> = Vec::new();
        for &s in set {
            let off = (s - tail) as u32;
            match out.last_mut() {
                Some(last) if last.offset + last.len == off => last.len += 1,
                _ => out.push(OooInterval {
                    offset: off,
                    len: 1,
                }),
            }
        }
        out
    }

    fn free(&self) -> u64 {
        CAP as u64 - (self.tail - self.head)
    }

    /// Marks `[tail + off, tail + off + len)` written and advances the tail over contiguous
    /// bytes; returns the advance.
    fn write(&mut self, off: u64, len: u64) -> u64 {
        for s in self.tail + off..self.tail + off + len {
            self.written.insert(s);
        }
        let start = self.tail;
        while self.written.remove(&self.tail) {
            self.tail += 1;
        }
        self.tail - start
    }
}

#[derive(Debug, Clone)]
enum OooOp {
    At { off: u32, len: u32 },
    InOrder(usize),
    Read(usize),
}

fn ooo_op() -> impl Strategy<Value = OooOp> {
    prop_oneof![
        6 => (0u32..4200, 0u32..300).prop_map(|(off, len)| OooOp::At { off, len }),
        // Small offsets exercise merging and filling more often.
        3 => (0u32..200, 1u32..40).prop_map(|(off, len)| OooOp::At { off, len }),
        2 => (0usize..400).prop_map(OooOp::InOrder),
        2 => (0usize..3000).prop_map(OooOp::Read),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn out_of_order_writes_match_bitmap_model(
        start_back in 0u32..10_000,
        seed in any::<u8>(),
        ops in proptest::collection::vec(ooo_op(), 1..150),
    ) {
        let (mut p, mut c) = attach(CAP, u32::MAX - start_back);
        let mut m = OooModel { head: 0, tail: 0, written: BTreeSet::new() };
        for op in ops {
            match op {
                OooOp::At { off, len } => {
                    let data: Vec<u8> =
                        (0..len as u64).map(|i| stream_byte(seed, m.tail + off as u64 + i)).collect();
                    let res = p.enqueue_at(off, &data);
                    if off as u64 + len as u64 > m.free() {
                        prop_assert_eq!(res, Err(FifoError::Full));
                    } else if len == 0 {
                        prop_assert_eq!(res, Ok(0));
                    } else if off > 0 {
                        let mut after = m.written.clone();
                        for s in m.tail + off as u64..m.tail + off as u64 + len as u64 {
                            after.insert(s);
                        }
                        if OooModel::runs(m.tail, &after).len() > MAX_OOO_INTERVALS {
                            prop_assert_eq!(res, Err(FifoError::TooManyHoles));
                        } else {
                            prop_assert_eq!(res, Ok(0));
                            m.write(off as u64, len as u64);
                        }
                    } else {
                        let adv = m.write(0, len as u64);
                        prop_assert_eq!(res, Ok(adv as u32));
                    }
                }
                OooOp::InOrder(len) => {
                    let data: Vec<u8> =
                        (0..len as u64).map(|i| stream_byte(seed, m.tail + i)).collect();
                    let n = p.enqueue(&data);
                    prop_assert_eq!(n as u64, (len as u64).min(m.free()));
                    m.write(0, n as u64);
                }
                OooOp::Read(len) => {
                    let mut buf = vec![0u8; len];
                    let n = c.dequeue(&mut buf).unwrap();
                    prop_assert_eq!(n as u64, (len as u64).min(m.tail - m.head));
                    for (i, &b) in buf[..n].iter().enumerate() {
                        prop_assert_eq!(b, stream_byte(seed, m.head + i as u64));
                    }
                    m.head += n as u64;
                }
            }
            prop_assert_eq!(p.ooo_intervals().collect::<Vec<_>>(), OooModel::runs(m.tail, &m.written));
            prop_assert_eq!(c.len().unwrap() as u64, m.tail - m.head);
            prop_assert_eq!(p.tail_position(), (u32::MAX - start_back).wrapping_add(m.tail as u32));
        }
        // Fill every hole in order, then read everything back.
        let end = m.written.iter().next_back().map_or(m.tail, |&s| s + 1);
        while m.tail < end {
            let mut buf = vec![0u8; 4096];
            let n = c.dequeue(&mut buf).unwrap();
            for (i, &b) in buf[..n].iter().enumerate() {
                prop_assert_eq!(b, stream_byte(seed, m.head + i as u64));
            }
            m.head += n as u64;
            let gap = OooModel::runs(m.tail, &m.written).first().map_or(end - m.tail, |r| r.offset as u64);
            let len = gap.min(m.free());
            let data: Vec<u8> = (0..len).map(|i| stream_byte(seed, m.tail + i)).collect();
            let adv = p.enqueue_at(0, &data).unwrap();
            prop_assert_eq!(adv as u64, m.write(0, len));
        }
        prop_assert_eq!(p.ooo_intervals().count(), 0);
        let mut rest = vec![0u8; CAP as usize];
        let n = c.dequeue(&mut rest).unwrap();
        prop_assert_eq!(n as u64, m.tail - m.head);
        for (i, &b) in rest[..n].iter().enumerate() {
            prop_assert_eq!(b, stream_byte(seed, m.head + i as u64));
        }
    }
}

/// A hand-written pattern: segments arrive in reverse order, then the first one.
#[test]
fn reverse_arrival_then_first_segment() {
    let (mut p, mut c) = attach(CAP, u32::MAX - 7);
    let data: Vec<u8> = (0..1000u64).map(|s| stream_byte(3, s)).collect();
    for k in (1..10).rev() {
        let off = k * 100;
        assert_eq!(p.enqueue_at(off as u32, &data[off..off + 100]), Ok(0));
        assert_eq!(p.ooo_intervals().count(), 1, "adjacent segments merge");
    }
    assert_eq!(
        p.ooo_newest(),
        Some(OooInterval {
            offset: 100,
            len: 900
        })
    );
    assert_eq!(c.len(), Ok(0));
    assert_eq!(p.enqueue_at(0, &data[..100]), Ok(1000));
    let mut out = vec![0u8; 1000];
    assert_eq!(c.dequeue(&mut out).unwrap(), 1000);
    assert_eq!(out, data);
}
