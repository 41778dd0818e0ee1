//! Loom models of the FIFO and ring protocols.
//!
//! Run (from the workspace root):
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p shunt-shm --release --test loom
//! ```
//!
//! Under `cfg(loom)` the crate's atomics and fences are loom's, every payload byte copy is
//! reported to a loom cell (so a read not ordered after its write fails the model), and the FIFO
//! minimum capacity drops to 4 bytes. The models are small enough to be explored exhaustively
//! (no preemption bound) in a few seconds; `LOOM_MAX_PREEMPTIONS` bounds them if ever needed.
//!
//! Doorbells are modelled by a loom atomic counter: "ring" increments it, "drain" swaps it to 0,
//! and a side that found nothing to do and a zero counter is considered asleep.

#![cfg(loom)]

use std::sync::Arc;

use loom::sync::atomic::{AtomicU32, Ordering};
use loom::thread;
use shunt_shm::fifo::init_fifo_at;
use shunt_shm::ring::init_ring_at;
use shunt_shm::{
    Consumer, Producer, RECORD_LEN, Region, RingConsumer, RingError, RingProducer, Wake,
    fifo_footprint, ring_footprint,
};

fn model<F: Fn() + Sync + Send + 'static>(f: F) {
    loom::model::Builder::new().check(f);
}

/// A FIFO of `cap` bytes whose counters start at `position`.
fn fifo(cap: u32, position: u32) -> (Producer, Consumer) {
    let region = Region::heap(fifo_footprint(cap));
    init_fifo_at(&region, 0, cap, position).unwrap();
    let region = Arc::new(region);
    (
        Producer::attach(region.clone(), 0).unwrap(),
        Consumer::attach(region, 0).unwrap(),
    )
}

/// (a) Bytes cross a 4-byte FIFO whose counters wrap, losslessly and in order.
#[test]
fn fifo_transfer_is_lossless_across_wraparound() {
    model(|| {
        let (mut p, mut c) = fifo(4, u32::MAX - 2);
        let t = thread::spawn(move || {
            let data = [1u8, 2, 3, 4, 5, 6];
            let mut sent = 0;
            while sent < data.len() {
                let end = (sent + 3).min(data.len());
                let n = p.enqueue(&data[sent..end]);
                if n == 0 {
                    thread::yield_now();
                }
                sent += n;
            }
        });
        let mut got = Vec::new();
        while got.len() < 6 {
            let mut buf = [0u8; 4];
            let n = c.dequeue(&mut buf).unwrap();
            if n == 0 {
                thread::yield_now();
            }
            got.extend_from_slice(&buf[..n]);
        }
        t.join().unwrap();
        assert_eq!(got, [1, 2, 3, 4, 5, 6]);
        assert_eq!(c.len(), Ok(0));
    });
}

/// (a') The zero-copy paths publish and observe the same bytes.
#[test]
fn fifo_zero_copy_transfer() {
    model(|| {
        let (mut p, mut c) = fifo(4, u32::MAX - 1);
        let t = thread::spawn(move || {
            let data = [7u8, 8, 9, 10, 11];
            let mut sent = 0;
            while sent < data.len() {
                let mut w = p.reserve(data.len() - sent);
                let n = w.fill_from(&data[sent..]);
                p.commit(n).unwrap();
                if n == 0 {
                    thread::yield_now();
                }
                sent += n;
            }
        });
        let mut got: Vec<u8> = Vec::new();
        while got.len() < 5 {
            let s = c.read_slices().unwrap();
            got.extend(s.first.iter().chain(s.second.iter()));
            let n = s.len();
            c.release(n).unwrap();
            if n == 0 {
                thread::yield_now();
            }
        }
        t.join().unwrap();
        assert_eq!(got, [7, 8, 9, 10, 11]);
    });
}

/// (b) has_event never loses a notification: whenever the consumer would go to sleep (nothing
/// read and no pending ring), it has in fact seen every byte.
#[test]
fn has_event_never_loses_a_notification() {
    model(|| {
        let (mut p, mut c) = fifo(4, u32::MAX);
        let bell = Arc::new(AtomicU32::new(0));
        let bell2 = bell.clone();
        let t = thread::spawn(move || {
            for byte in [1u8, 2, 3] {
                assert_eq!(p.enqueue(&[byte]), 1);
                if p.set_event() {
                    bell2.fetch_add(1, Ordering::AcqRel);
                }
            }
        });
        fn read(c: &mut Consumer, got: &mut Vec<u8>) {
            c.clear_event();
            let mut buf = [0u8; 4];
            let n = c.dequeue(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        let mut got = Vec::new();
        // Concurrent with the producer: one pass, then keep going only while woken.
        read(&mut c, &mut got);
        while got.len() < 3 && bell.swap(0, Ordering::AcqRel) > 0 {
            read(&mut c, &mut got);
        }
        t.join().unwrap();
        // Asleep from here on: only a pending ring can wake the consumer.
        while bell.swap(0, Ordering::AcqRel) > 0 {
            read(&mut c, &mut got);
        }
        assert_eq!(
            got,
            [1, 2, 3],
            "consumer asleep with unread data and no pending ring"
        );
    });
}

/// A producer with 2 bytes for a full 4-byte FIFO, against a consumer thread running `consume`
/// (which rings the producer through the closure it is handed): a producer that went to sleep
/// must have a ring pending, and the space it waited for.
fn producer_never_sleeps_on_freed_space(threshold: u32, consume: fn(&mut Consumer, &dyn Fn())) {
    model(move || {
        let (mut p, mut c) = fifo(4, u32::MAX - 1);
        c.set_tx_space_threshold(threshold);
        assert_eq!(p.enqueue(&[0u8; 4]), 4);
        let bell = Arc::new(AtomicU32::new(0));
        let bell2 = bell.clone();
        let t = thread::spawn(move || {
            consume(&mut c, &|| {
                bell2.fetch_add(1, Ordering::AcqRel);
            })
        });
        let mut sent = 0;
        let mut slept = false;
        while sent < 2 {
            let n = p.enqueue(&[9u8; 2][sent..]);
            sent += n;
            if n > 0 {
                continue;
            }
            p.request_tx_space();
            if p.free_space() > 0 {
                continue;
            }
            if bell.swap(0, Ordering::AcqRel) > 0 {
                continue;
            }
            slept = true;
            break;
        }
        t.join().unwrap();
        if slept {
            assert!(
                bell.load(Ordering::Acquire) > 0,
                "producer asleep on freed space with no pending ring"
            );
            assert_eq!(p.enqueue(&[9u8; 2][sent..]), 2 - sent);
        }
    });
}

/// (c) want_tx_space: a producer never sleeps on space that was freed.
#[test]
fn want_tx_space_never_loses_a_wakeup() {
    producer_never_sleeps_on_freed_space(0, |c, ring| {
        let mut buf = [0u8; 2];
        assert_eq!(c.dequeue(&mut buf).unwrap(), 2);
        if c.take_tx_space_request() {
            ring();
        }
    });
}

/// (c') want_tx_space with a threshold: a consumer that rings only once 3 of 4 bytes are free,
/// and reads on while data is left, still never leaves a producer asleep on freed space.
#[test]
fn tx_space_threshold_never_loses_a_wakeup() {
    producer_never_sleeps_on_freed_space(3, |c, ring| {
        let mut buf = [0u8; 2];
        while c.dequeue(&mut buf).unwrap() > 0 {
            if c.take_tx_space_request() {
                ring();
            }
        }
    });
}

/// (e) at_eof is never reported while data is still unread.
#[test]
fn eof_is_never_premature() {
    model(|| {
        let (mut p, mut c) = fifo(4, 0);
        let t = thread::spawn(move || {
            assert_eq!(p.enqueue(&[5, 6]), 2);
            p.shutdown();
        });
        let mut got = Vec::new();
        loop {
            let mut buf = [0u8; 4];
            let n = c.dequeue(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
            if n == 0 {
                if c.at_eof().unwrap() {
                    break;
                }
                thread::yield_now();
            }
        }
        t.join().unwrap();
        assert_eq!(got, [5, 6]);
    });
}

fn record(tag: u8) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[0] = tag;
    r[RECORD_LEN - 1] = tag;
    r
}

/// (d) The ring's Wake protocol never loses a wake-up, and records arrive in order.
#[test]
fn ring_wake_is_never_lost() {
    model(|| {
        let region = Region::heap(ring_footprint(2));
        init_ring_at(&region, 0, 2, u32::MAX).unwrap();
        let region = Arc::new(region);
        let mut p = RingProducer::attach(region.clone(), 0).unwrap();
        let mut c = RingConsumer::attach(region, 0).unwrap();
        let bell = Arc::new(AtomicU32::new(0));
        let bell2 = bell.clone();
        let t = thread::spawn(move || {
            for tag in [1u8, 2] {
                match p.push(&record(tag)) {
                    Ok(Wake::Needed) => {
                        bell2.fetch_add(1, Ordering::AcqRel);
                    }
                    Ok(Wake::NotNeeded) => {}
                    Err(RingError::Full) => unreachable!("two records fit"),
                    Err(e) => panic!("{e}"),
                }
            }
        });
        fn drain(c: &mut RingConsumer, got: &mut Vec<u8>) {
            while let Some(r) = c.pop().unwrap() {
                assert_eq!(r[0], r[RECORD_LEN - 1]);
                got.push(r[0]);
            }
        }
        let mut got = Vec::new();
        drain(&mut c, &mut got);
        while got.len() < 2 && bell.swap(0, Ordering::AcqRel) > 0 {
            drain(&mut c, &mut got);
        }
        t.join().unwrap();
        while bell.swap(0, Ordering::AcqRel) > 0 {
            drain(&mut c, &mut got);
        }
        assert_eq!(
            got,
            [1, 2],
            "consumer asleep with pending records and no wake-up"
        );
    });
}
