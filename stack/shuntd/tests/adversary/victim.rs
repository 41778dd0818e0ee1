//! The well-behaved apps an attack must not disturb, and the checks that they, and shuntd,
//! still serve within the stated bound.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shunt_client::{AttachOptions, Session, Worker};

use super::common::{self, Daemon};

/// The bound every check states: a round trip, a control call, an attach-connect-exchange.
/// Far above what any takes on a quiet machine, so a failure is a stall, not a slow CI runner.
pub const BOUND: Duration = Duration::from_secs(5);

/// Bytes per round trip.
const MESSAGE: usize = 4096;

/// What the exchanging client saw.
#[derive(Debug, Default)]
struct Exchanges {
    count: u64,
    slowest: Duration,
    error: Option<String>,
}

/// A server echoing every session on its listener, and a client exchanging round trips with it
/// without pause, each in threads of its own, all in the test's process (as root).
pub struct Victim {
    pub server: Worker,
    pub client: Worker,
    pub target: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Round trips so far.
    done: Arc<AtomicU64>,
    exchanger: Option<JoinHandle<Exchanges>>,
}

/// Echoes `s` until end of stream or error.
fn echo(mut s: Session) {
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 || s.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

impl Victim {
    pub fn start(d: &Daemon, target: SocketAddr) -> Victim {
        let server =
            Worker::attach(AttachOptions::new(d.socket()).app_name("victim-server")).unwrap();
        let listener = server.listen(target).unwrap();
        std::thread::spawn(move || {
            while let Ok(s) = listener.accept() {
                std::thread::spawn(move || echo(s));
            }
        });
        let client =
            Worker::attach(AttachOptions::new(d.socket()).app_name("victim-client")).unwrap();
        let mut session = client.connect(target).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let done = Arc::new(AtomicU64::new(0));
        let counter = done.clone();
        let exchanger = std::thread::spawn(move || {
            let mut seen = Exchanges::default();
            let mut back = vec![0u8; MESSAGE];
            while !flag.load(Ordering::Relaxed) {
                let message = vec![(seen.count % 251) as u8; MESSAGE];
                let started = Instant::now();
                let done = session
                    .write_all(&message)
                    .and_then(|()| session.read_exact(&mut back));
                if let Err(e) = done {
                    seen.error = Some(e.to_string());
                    break;
                }
                if back != message {
                    seen.error = Some(format!("round trip {} came back altered", seen.count));
                    break;
                }
                seen.slowest = seen.slowest.max(started.elapsed());
                seen.count += 1;
                counter.store(seen.count, Ordering::Relaxed);
            }
            seen
        });
        let v = Victim {
            server,
            client,
            target,
            stop,
            done,
            exchanger: Some(exchanger),
        };
        v.wait_for_traffic();
        v
    }

    /// Returns once the exchanges run (a round trip or two), so attacks start mid-stream.
    fn wait_for_traffic(&self) {
        let mut s = self.client.connect(self.target).unwrap();
        let mut b = [0u8; 1];
        s.write_all(b"x").unwrap();
        s.read_exact(&mut b).unwrap();
    }

    /// Waits until `n` more round trips completed, within [`BOUND`] each.
    pub fn wait_for_exchanges(&self, n: u64) {
        let goal = self.done.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + BOUND * n as u32;
        while self.done.load(Ordering::Relaxed) < goal {
            assert!(Instant::now() < deadline, "the victim's exchanges stalled");
            std::thread::yield_now();
        }
    }

    /// Stops the exchanges and checks them: none failed or came back altered, they went on
    /// during the attack, and none took longer than [`BOUND`].
    pub fn assert_served(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let seen = self.exchanger.take().unwrap().join().unwrap();
        assert_eq!(seen.error, None, "the victim's exchanges failed");
        assert!(
            seen.count > 0,
            "the victim exchanged nothing during the attack"
        );
        assert!(
            seen.slowest <= BOUND,
            "a round trip of the victim took {:?} (bound {BOUND:?})",
            seen.slowest
        );
        common::assert_no_lost_wakeups(&[&self.server, &self.client]);
    }
}

/// shuntd still serves: its control API answers within [`BOUND`], and a new app attaches,
/// connects to the victim's server and exchanges bytes within it too.
pub fn assert_shuntd_serves(d: &Daemon, target: SocketAddr) {
    let started = Instant::now();
    let stats = common::block_on(async {
        let mut c = common::control_client(&d.control_socket()).await;
        tokio::time::timeout(
            BOUND,
            c.get_stats(shunt_proto::control::GetStatsRequest::default()),
        )
        .await
    });
    assert!(
        matches!(stats, Ok(Ok(_))),
        "the control API did not answer within {BOUND:?}"
    );
    let w = Worker::attach(AttachOptions::new(d.socket()).app_name("newcomer")).unwrap();
    let mut s = w.connect(target).unwrap();
    let mut b = [0u8; 3];
    s.write_all(b"new").unwrap();
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"new");
    let took = started.elapsed();
    assert!(
        took <= 2 * BOUND,
        "shuntd took {took:?} to serve a newcomer"
    );
}

/// The suite runs attackers as another user, which needs root; without it, it fails rather
/// than skip.
pub fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the adversarial suite runs its attackers as `nobody` and needs root (CI runs as root)"
    );
}
