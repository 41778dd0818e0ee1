//! Two real processes share a segment.
//!
//! The parent creates a segment holding one FIFO, two wake-up channels ("data available" rung by
//! the child, "space available" rung by the parent) and a seqpacket pair, then re-executes this
//! test binary as the child (with `SHUNT_SHM_CHILD_ROLE` set, which `main` checks before it runs
//! any test; the child is not a test of its own). The child's end of the socket becomes its
//! stdin, so no descriptor has to be inherited by number; the segment and the child's channel
//! ends travel over the socket with `SCM_RIGHTS`.
//!
//! * `stream_more_than_4_gib_between_processes`: the child produces 4.5 GiB of a deterministic
//!   pseudo-random pattern (so the u32 FIFO counters wrap), the parent consumes it; both compute
//!   a CRC-32 and the parent compares. Both sides sleep in `poll` using the has_event /
//!   want_tx_space protocol; every wait has a 10 s bound that fails the test.
//! * `killed_child_is_noticed_within_one_second`: the parent SIGKILLs a streaming child and must
//!   see the seqpacket hang-up (POLLHUP) within 1 s.
//!
//! Run: `cargo test -p shunt-shm --test cross_process -- --nocapture` (prints timings).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Trial};
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use shunt_shm::wake::{self, WakeReceiver, WakeSender};
use shunt_shm::{
    Consumer, Producer, Segment, SegmentAllocator, fifo_footprint, init_fifo, recv_with_fds,
    send_with_fds, seqpacket_pair,
};

const ROLE_ENV: &str = "SHUNT_SHM_CHILD_ROLE";

fn main() -> std::process::ExitCode {
    if std::env::var_os(ROLE_ENV).is_some() {
        return match run_child() {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("child failed: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let args = Arguments::from_args();
    let trial = |name: &str, test: fn()| {
        Trial::test(name, move || {
            test();
            Ok(())
        })
    };
    let trials = vec![
        trial(
            "stream_more_than_4_gib_between_processes",
            stream_more_than_4_gib_between_processes,
        ),
        trial(
            "killed_child_is_noticed_within_one_second",
            killed_child_is_noticed_within_one_second,
        ),
    ];
    libtest_mimic::run(&args, trials).exit_code()
}
/// Bound on every single wait; exceeding it fails the test instead of hanging.
const WAIT: Duration = Duration::from_secs(10);
const FIFO_CAPACITY: u32 = 1 << 20;
const CHUNK: usize = 256 * 1024;
const STREAM_BYTES: u64 = 4 * (1 << 30) + (1 << 29); // 4.5 GiB
const SEED: u64 = 0x5eed_1234_abcd_0001;
/// A child told to stream this much runs until killed.
const FOREVER: u64 = u64::MAX;

/// Setup message parent -> child, sent with [segment, data sender's write end and anchor, space
/// receiver].
struct Setup {
    offset: u64,
    total: u64,
    seed: u64,
}

impl Setup {
    fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&self.offset.to_le_bytes());
        b[8..16].copy_from_slice(&self.total.to_le_bytes());
        b[16..].copy_from_slice(&self.seed.to_le_bytes());
        b
    }
    fn decode(b: &[u8]) -> Setup {
        assert_eq!(b.len(), 24, "bad setup message");
        let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        Setup {
            offset: word(0),
            total: word(8),
            seed: word(16),
        }
    }
}

/// xorshift64*: a deterministic pseudo-random word stream.
struct Pattern(u64);

impl Pattern {
    fn next_word(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Fills `buf` (a multiple of 8 bytes) with the next words.
    fn fill(&mut self, buf: &mut [u8]) {
        for w in buf.chunks_exact_mut(8) {
            w.copy_from_slice(&self.next_word().to_le_bytes());
        }
    }
}

/// Kills and reaps the child if the test fails half-way.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child already reaped")
    }
    /// Waits (bounded) for the child to exit: its pidfd becomes readable when it does.
    fn wait(mut self) -> std::process::ExitStatus {
        let mut child = self.0.take().expect("child already reaped");
        let pidfd = rustix::process::pidfd_open(
            rustix::process::Pid::from_child(&child),
            rustix::process::PidfdFlags::empty(),
        )
        .unwrap();
        let ready = wait_any([pidfd.as_fd()], WAIT);
        assert!(!ready[0].is_empty());
        child.wait().unwrap()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn timespec(d: Duration) -> Timespec {
    Timespec {
        tv_sec: d.as_secs() as i64,
        tv_nsec: i64::from(d.subsec_nanos()),
    }
}

/// Spawns this test binary as the child, with `sock` as its stdin.
fn spawn_child(sock: OwnedFd) -> ChildGuard {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.env(ROLE_ENV, "producer")
        .stdin(Stdio::from(sock))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let child = cmd.spawn().unwrap();
    // Dropping the command closes our copy of the child's socket end, so the child's death is
    // visible as a hang-up on ours.
    drop(cmd);
    ChildGuard(Some(child))
}

struct Parent {
    sock: OwnedFd,
    /// Readable when the child rang for data.
    data: WakeReceiver,
    /// We ring the child for space.
    space: WakeSender,
    consumer: Consumer,
    child: ChildGuard,
}

/// Creates the segment, FIFO, wake-up pair and socket pair, spawns the child and hands it the
/// fds.
fn start(total: u64) -> Parent {
    let seg_len = (fifo_footprint(FIFO_CAPACITY) + 64 * 1024).next_multiple_of(1 << 20);
    let segment = Segment::create("shunt-xproc", seg_len).unwrap();
    let mut alloc = SegmentAllocator::new(segment.len());
    let offset = alloc.alloc(fifo_footprint(FIFO_CAPACITY), 64).unwrap();
    init_fifo(segment.region(), offset, FIFO_CAPACITY).unwrap();
    let (child_data, data) = wake::channel().unwrap();
    let (space, child_space) = wake::channel().unwrap();
    let (sock, child_sock) = seqpacket_pair().unwrap();
    let child = spawn_child(child_sock);
    let setup = Setup {
        offset: offset as u64,
        total,
        seed: SEED,
    };
    send_with_fds(
        sock.as_fd(),
        &setup.encode(),
        &[
            segment.as_fd(),
            child_data.fds()[0],
            child_data.fds()[1],
            child_space.as_fd(),
        ],
    )
    .unwrap();
    let consumer = Consumer::attach(Arc::new(segment), offset).unwrap();
    Parent {
        sock,
        data,
        space,
        consumer,
        child,
    }
}

/// Polls `fds` for readability; returns the revents, or panics after `timeout`.
fn wait_any<const N: usize>(fds: [BorrowedFd<'_>; N], timeout: Duration) -> [PollFlags; N] {
    let deadline = Instant::now() + timeout;
    loop {
        let mut pfds = fds.map(|fd| PollFd::from_borrowed_fd(fd, PollFlags::IN));
        let left = deadline.saturating_duration_since(Instant::now());
        match poll(&mut pfds, Some(&timespec(left))) {
            Ok(0) => assert!(Instant::now() < deadline, "timed out after {timeout:?}"),
            Ok(_) => return pfds.map(|p| p.revents()),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => panic!("poll: {e}"),
        }
    }
}

/// Consumes everything readable; returns the number of bytes. Notifies the producer if it asked
/// for space.
fn consume(parent: &mut Parent, crc: &mut crc32fast::Hasher) -> usize {
    // Clear before reading, so that any write after this point sets the flag and rings again.
    parent.consumer.clear_event();
    let s = parent.consumer.read_slices().unwrap();
    crc.update(s.first);
    crc.update(s.second);
    let n = s.len();
    parent.consumer.release(n).unwrap();
    if n > 0 && parent.consumer.take_tx_space_request() {
        parent.space.ring().unwrap();
    }
    n
}

fn stream_more_than_4_gib_between_processes() {
    let started = Instant::now();
    let mut parent = start(STREAM_BYTES);
    let start_head = parent.consumer.head_position();
    let mut crc = crc32fast::Hasher::new();
    let mut received: u64 = 0;
    let mut sleeps: u64 = 0;
    loop {
        let n = consume(&mut parent, &mut crc);
        received += n as u64;
        if n > 0 {
            continue;
        }
        if parent.consumer.at_eof().unwrap() {
            break;
        }
        // Empty and not finished: sleep until the producer rings (has_event was cleared above,
        // so a write after our read rings).
        let _ = wait_any([parent.data.as_fd()], WAIT);
        parent.data.drain().unwrap();
        sleeps += 1;
    }
    let mut msg = [0u8; 16];
    assert!(wait_any([parent.sock.as_fd()], WAIT)[0].contains(PollFlags::IN));
    let (n, fds) = recv_with_fds(parent.sock.as_fd(), &mut msg, 0).unwrap();
    assert_eq!(n, 12, "final message from the child");
    assert!(fds.is_empty());
    let child_sent = u64::from_le_bytes(msg[..8].try_into().unwrap());
    let child_crc = u32::from_le_bytes(msg[8..12].try_into().unwrap());
    let parent_crc = crc.finalize();
    let status = parent.child.wait();
    assert!(status.success(), "child failed: {status}");
    assert_eq!(received, STREAM_BYTES);
    assert_eq!(child_sent, STREAM_BYTES);
    assert_eq!(parent_crc, child_crc, "CRC mismatch");
    // The free-running counters wrapped (at least once).
    assert!(received > u64::from(u32::MAX));
    assert_eq!(
        parent.consumer.head_position(),
        start_head.wrapping_add(STREAM_BYTES as u32)
    );
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "cross-process: {:.2} GiB in {secs:.2} s ({:.2} GiB/s), crc {parent_crc:#010x}, consumer slept {sleeps} times",
        received as f64 / (1u64 << 30) as f64,
        received as f64 / (1u64 << 30) as f64 / secs
    );
}

fn killed_child_is_noticed_within_one_second() {
    let mut parent = start(FOREVER);
    let mut crc = crc32fast::Hasher::new();
    let mut received = 0usize;
    // Make sure the transfer is under way.
    while received < 8 << 20 {
        let n = consume(&mut parent, &mut crc);
        received += n;
        if n == 0 {
            let _ = wait_any([parent.data.as_fd()], WAIT);
            parent.data.drain().unwrap();
        }
    }
    parent.child.child().kill().unwrap();
    let killed = Instant::now();
    let limit = Duration::from_secs(1);
    loop {
        let left = limit.saturating_sub(killed.elapsed());
        assert!(!left.is_zero(), "peer death not noticed within {limit:?}");
        let [data, sock] = wait_any([parent.data.as_fd(), parent.sock.as_fd()], left);
        if sock.contains(PollFlags::HUP) {
            break;
        }
        if !data.is_empty() {
            parent.data.drain().unwrap();
        }
        // Whatever the child managed to publish before dying is still readable.
        consume(&mut parent, &mut crc);
    }
    let noticed = killed.elapsed();
    assert!(noticed < limit);
    // The hang-up reads as end-of-stream on the socket.
    let mut buf = [0u8; 16];
    assert_eq!(
        recv_with_fds(parent.sock.as_fd(), &mut buf, 0).unwrap().0,
        0
    );
    // The shared memory stays valid after the peer is gone.
    consume(&mut parent, &mut crc);
    assert!(parent.consumer.len().unwrap() <= FIFO_CAPACITY);
    let status = parent.child.wait();
    assert!(!status.success());
    eprintln!("cross-process: SIGKILLed producer noticed after {noticed:?}");
}

/// The child's side, run by `main` when this binary was started by one of the tests above.
fn run_child() -> io::Result<()> {
    let stdin = io::stdin();
    let sock = stdin.as_fd();
    let mut buf = [0u8; 64];
    let (n, mut fds) = recv_with_fds(sock, &mut buf, 4)?;
    assert_eq!(fds.len(), 4, "expected the segment and three wake-up ends");
    let setup = Setup::decode(&buf[..n]);
    let space = WakeReceiver::from_fd(fds.pop().unwrap())?;
    let anchor = fds.pop().unwrap();
    let data = WakeSender::from_fds(fds.pop().unwrap(), anchor)?;
    let segment = Segment::open(fds.pop().unwrap()).map_err(io::Error::other)?;
    let mut producer =
        Producer::attach(Arc::new(segment), setup.offset as usize).map_err(io::Error::other)?;

    let mut pattern = Pattern(setup.seed);
    let mut crc = crc32fast::Hasher::new();
    let mut sent: u64 = 0;
    while sent < setup.total {
        if producer.is_reader_closed() || producer.is_reset() {
            return Err(io::Error::other("reader went away"));
        }
        let want = (setup.total - sent).min(CHUNK as u64) as usize;
        let w = producer.reserve(want);
        // Both sides move in multiples of 8 bytes, so positions stay word-aligned.
        let n = w.len() & !7;
        if n == 0 {
            // Full: ask for a wake-up, then re-check before sleeping (lost-wakeup rule).
            producer.request_tx_space();
            if producer.free_space() >= 8 {
                continue;
            }
            if !space.wait(Some(WAIT))? {
                return Err(io::Error::other("timed out waiting for space"));
            }
            space.drain()?;
            continue;
        }
        let a = w.first.len().min(n);
        pattern.fill(&mut w.first[..a]);
        pattern.fill(&mut w.second[..n - a]);
        crc.update(&w.first[..a]);
        crc.update(&w.second[..n - a]);
        producer.commit(n).map_err(io::Error::other)?;
        sent += n as u64;
        if producer.set_event() {
            data.ring().map_err(io::Error::other)?;
        }
    }
    producer.shutdown();
    if producer.set_event() {
        data.ring().map_err(io::Error::other)?;
    }
    let mut msg = [0u8; 12];
    msg[..8].copy_from_slice(&sent.to_le_bytes());
    msg[8..].copy_from_slice(&crc.finalize().to_le_bytes());
    send_with_fds(sock, &msg, &[])?;
    Ok(())
}
