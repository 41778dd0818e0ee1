//! Connection setup rate: connect, accept, one byte, close on both sides.
//!
//! The byte proves each connection really carries data. Each connecting thread waits for the
//! acceptor's close before its next connect, so `concurrency` is exactly the number of
//! connections in flight. With one, the rate is the inverse of one full setup and teardown: a
//! latency, bound by wake-ups. With several, as load generators such as `ab -c` and `wrk` (and
//! VPP's own CPS tests) measure it, it is how many connections per second the stack sustains
//! once its own work is the bottleneck. Each connection in flight gets its own pair of threads,
//! listener and workers, as independent apps would have, so no transport pays for threads
//! woken together on one listener.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use shunt_client::AttachOptions;

use crate::Transport;
use crate::conn::{Acceptor, Conn, Mode};
use crate::cpu::cpu_time;
use crate::daemon::Daemon;
use crate::report::{self, RatiosHeader, Reporter};

const TARGET_RATIO: f64 = 2.0;

pub(crate) struct Options {
    pub(crate) duration: Duration,
    pub(crate) max: u64,
    /// Connections in flight in the loaded cases.
    pub(crate) concurrency: usize,
    /// The adaptive mode's polling budget.
    pub(crate) busy_poll: Duration,
}

#[derive(Debug, Serialize)]
struct Rate {
    bench: &'static str,
    transport: Transport,
    mode: Mode,
    /// Connections in flight: one connecting and one accepting thread per connection.
    concurrency: usize,
    /// Standby sessions the connecting worker keeps per remote (cut-through only; see
    /// `AttachOptions::preconnect`). Absent when none.
    #[serde(skip_serializing_if = "is_zero")]
    preconnect: u16,
    /// Bytes each connection carries before closing.
    msg_size: usize,
    cps: f64,
    us_per_conn: f64,
    /// Where each connection's time goes, seen from the connecting side (means, µs): until
    /// connect returns, then writing the byte until end-of-stream, then closing.
    connect_us: f64,
    exchange_us: f64,
    close_us: f64,
    /// CPU time the whole bench process (apps and the in-process shuntd) spent per connection,
    /// user and system, in µs: what decides the rate once the cores are busy.
    cpu_us_per_conn: f64,
    connections: u64,
    secs: f64,
}

fn is_zero(n: &u16) -> bool {
    *n == 0
}

/// Time a connect loop spent in each phase, summed over its connections.
#[derive(Default)]
struct Phases {
    connect: Duration,
    exchange: Duration,
    close: Duration,
}

impl Phases {
    fn add(self, other: &Phases) -> Phases {
        Phases {
            connect: self.connect + other.connect,
            exchange: self.exchange + other.exchange,
            close: self.close + other.close,
        }
    }
}

#[derive(Serialize)]
struct Ratios {
    #[serde(flatten)]
    header: RatiosHeader,
    /// cut-through (event, preconnecting) connections/s over tcp-loopback connections/s, one
    /// connection in flight.
    ratio: f64,
    /// The same with `concurrency` connections in flight.
    loaded_ratio: f64,
    concurrency: usize,
    /// Standby sessions per remote of the preconnecting cut-through worker.
    preconnect: u16,
    /// cut-through (event, preconnecting) connections/s over unix connections/s.
    vs_unix: f64,
    loaded_vs_unix: f64,
    target_ratio: f64,
    /// Whether both `ratio` and `loaded_ratio` reach the target.
    target_met: bool,
    /// The ratios when every connect asks shuntd.
    ratio_without_preconnect: f64,
    loaded_ratio_without_preconnect: f64,
    /// cut-through (preconnecting) over tcp-loopback connections/s, one in flight, when both
    /// poll for the same budget before sleeping, and the budget. The target is judged on
    /// sleeping waits, never on this.
    adaptive_ratio: f64,
    adaptive_busy_poll_us: u128,
}

/// One measured configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Case {
    transport: Transport,
    mode: Mode,
    concurrency: usize,
    preconnect: u16,
}

impl Case {
    const fn new(transport: Transport, mode: Mode, concurrency: usize) -> Case {
        Case {
            transport,
            mode,
            concurrency,
            preconnect: 0,
        }
    }

    const fn preconnecting(self, depth: u16) -> Case {
        Case {
            preconnect: depth,
            ..self
        }
    }

    fn label(&self) -> String {
        let mut l = format!("{} ({}", self.transport.name(), self.mode.name());
        if self.preconnect > 0 {
            l += &format!(", preconnect {}", self.preconnect);
        }
        l + ")"
    }
}

/// Standby sessions per remote in the preconnecting cases. One would do with one connection in
/// flight; under load shuntd answers refills more slowly than connections come, and with one
/// only about half the connects found a session ready.
const PRECONNECT_DEPTH: u16 = 4;

pub(crate) fn run(opts: &Options, r: &mut Reporter) -> anyhow::Result<()> {
    let daemon = Daemon::start()?;
    let loaded = opts.concurrency;
    let ct_event = |c| Case::new(Transport::CutThrough, Mode::Event, c);
    let tcp = |c| Case::new(Transport::TcpLoopback, Mode::Blocking, c);
    let unix = |c| Case::new(Transport::Unix, Mode::Blocking, c);
    let ct_adaptive = Case::new(Transport::CutThrough, Mode::Adaptive, 1);
    let tcp_adaptive = Case::new(Transport::TcpLoopback, Mode::Adaptive, 1);
    let cases = [
        ct_event(1),
        ct_event(1).preconnecting(PRECONNECT_DEPTH),
        ct_adaptive,
        ct_adaptive.preconnecting(PRECONNECT_DEPTH),
        tcp(1),
        tcp_adaptive,
        unix(1),
        ct_event(loaded),
        ct_event(loaded).preconnecting(PRECONNECT_DEPTH),
        tcp(loaded),
        unix(loaded),
    ];
    let rates = report::measure_each(
        r,
        cases,
        |c| format!("connect {} x{}", c.label(), c.concurrency),
        |&c| measure(c, opts, &daemon),
    )?;
    let results: Vec<(Case, Rate)> = cases.into_iter().zip(rates).collect();
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|(c, m)| {
            vec![
                c.label(),
                m.concurrency.to_string(),
                format!("{:.0}", m.cps),
                format!("{:.2}", m.us_per_conn),
                format!("{:.2}", m.connect_us),
                format!("{:.2}", m.exchange_us),
                format!("{:.2}", m.close_us),
                format!("{:.1}", m.cpu_us_per_conn),
                m.connections.to_string(),
            ]
        })
        .collect();
    r.table(
        "connection setup (connect + accept + 1 byte + close)",
        &[
            "transport",
            "in flight",
            "conn/s",
            "us/conn",
            "connect",
            "byte+eof",
            "close",
            "cpu us/conn",
            "connections",
        ],
        &rows,
    );
    let cps = |case: Case| {
        results
            .iter()
            .find(|(c, _)| *c == case)
            .map(|(_, m)| m.cps)
            .expect("every case ran")
    };
    let preconnect = |c: Case| c.preconnecting(PRECONNECT_DEPTH);
    let serial_ratio = cps(preconnect(ct_event(1))) / cps(tcp(1));
    let loaded_ratio = cps(preconnect(ct_event(loaded))) / cps(tcp(loaded));
    let target_met = serial_ratio >= TARGET_RATIO && loaded_ratio >= TARGET_RATIO;
    r.verdict(
        "cut-through (event, preconnect) / tcp-loopback connections/s, one in flight",
        serial_ratio,
        ">= 2x",
        serial_ratio >= TARGET_RATIO,
    );
    r.verdict(
        &format!(
            "cut-through (event, preconnect) / tcp-loopback connections/s, {loaded} in flight"
        ),
        loaded_ratio,
        ">= 2x",
        loaded_ratio >= TARGET_RATIO,
    );
    let without_preconnect = (
        cps(ct_event(1)) / cps(tcp(1)),
        cps(ct_event(loaded)) / cps(tcp(loaded)),
    );
    r.human(&format!(
        "without preconnect, cut-through (event) / tcp-loopback connections/s: {:.2} one in flight, {:.2} with {loaded}",
        without_preconnect.0, without_preconnect.1
    ));
    let adaptive_ratio = cps(preconnect(ct_adaptive)) / cps(tcp_adaptive);
    r.human(&format!(
        "adaptive ({} us polling) connections/s, cut-through (preconnect) / tcp-loopback: {adaptive_ratio:.2}",
        opts.busy_poll.as_micros()
    ));
    r.emit(&Ratios {
        header: RatiosHeader::cut_through_vs_tcp("connect-ratios", 1),
        ratio: serial_ratio,
        loaded_ratio,
        concurrency: loaded,
        preconnect: PRECONNECT_DEPTH,
        vs_unix: cps(preconnect(ct_event(1))) / cps(unix(1)),
        loaded_vs_unix: cps(preconnect(ct_event(loaded))) / cps(unix(loaded)),
        target_ratio: TARGET_RATIO,
        target_met,
        ratio_without_preconnect: without_preconnect.0,
        loaded_ratio_without_preconnect: without_preconnect.1,
        adaptive_ratio,
        adaptive_busy_poll_us: opts.busy_poll.as_micros(),
    })
}

fn measure(case: Case, opts: &Options, daemon: &Daemon) -> anyhow::Result<Rate> {
    let Case {
        transport,
        mode,
        concurrency,
        preconnect,
    } = case;
    // Connecting and accepting happen in two workers, as two apps would have them: a worker
    // connecting to its own listener is not the case that matters.
    let busy_poll = mode.busy_poll(opts.busy_poll);
    let stop = Arc::new(AtomicBool::new(false));
    let mut targets = Vec::with_capacity(concurrency);
    let mut acceptors = Vec::with_capacity(concurrency);
    let mut clients = Vec::with_capacity(concurrency);
    for i in 0..concurrency {
        let server = daemon.attach_polling("shunt-bench-acceptor", busy_poll)?;
        let (acceptor, target) = Acceptor::bind(transport, daemon, &server, busy_poll)?;
        let stop = stop.clone();
        acceptors.push(
            std::thread::Builder::new()
                .name(format!("acceptor-{i}"))
                .spawn(move || serve(&acceptor, &stop))?,
        );
        targets.push(target);
        let options = AttachOptions::new(daemon.socket())
            .busy_poll(busy_poll)
            .preconnect(preconnect);
        clients.push(daemon.attach_with(options, "shunt-bench-connector")?);
    }

    let claimed = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu_time(std::process::id())?;
    let start = Instant::now();
    let connectors = clients
        .into_iter()
        .zip(targets)
        .enumerate()
        .map(|(i, (client, target))| {
            let claimed = claimed.clone();
            let limits = (opts.max, opts.duration);
            std::thread::Builder::new()
                .name(format!("connector-{i}"))
                .spawn(move || {
                    connect_loop(
                        transport, &target, &client, busy_poll, start, limits, &claimed,
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut made: anyhow::Result<(u64, Phases)> = Ok((0, Phases::default()));
    for c in connectors {
        let result = c
            .join()
            .map_err(|_| anyhow::anyhow!("connecting thread panicked"))
            .and_then(|r| r);
        made = made.and_then(|(n, sum)| {
            let (m, p) = result?;
            Ok((n + m, sum.add(&p)))
        });
    }
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut accepted = 0;
    for a in acceptors {
        accepted += a
            .join()
            .map_err(|_| anyhow::anyhow!("acceptor thread panicked"))??;
    }
    let cpu = cpu_time(std::process::id())?.saturating_sub(cpu_before);
    let (n, phases) = made?;
    anyhow::ensure!(n > 0, "no connection made");
    anyhow::ensure!(
        accepted == n,
        "{n} connections made but {accepted} accepted"
    );
    let mean_us = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    Ok(Rate {
        bench: "connect",
        transport,
        mode,
        concurrency,
        preconnect,
        msg_size: 1,
        cps: n as f64 / secs,
        us_per_conn: secs * 1e6 / n as f64,
        connect_us: mean_us(phases.connect),
        exchange_us: mean_us(phases.exchange),
        close_us: mean_us(phases.close),
        cpu_us_per_conn: mean_us(cpu),
        connections: n,
        secs,
    })
}

/// Connects one at a time until `max` connections are claimed across all connecting threads or
/// `duration` has passed since `start`.
fn connect_loop(
    transport: Transport,
    target: &str,
    client: &shunt_client::Worker,
    busy_poll: Duration,
    start: Instant,
    (max, duration): (u64, Duration),
    claimed: &AtomicU64,
) -> anyhow::Result<(u64, Phases)> {
    let mut n = 0u64;
    let mut phases = Phases::default();
    while (n == 0 || start.elapsed() < duration) && claimed.fetch_add(1, Ordering::Relaxed) < max {
        let t0 = Instant::now();
        let mut c = Conn::connect(transport, target, Some(client), false, busy_poll)?;
        let t1 = Instant::now();
        c.write_all(b"x")?;
        let mut b = [0u8; 1];
        // End-of-stream here means the acceptor took the byte and closed.
        anyhow::ensure!(c.read(&mut b)? == 0, "acceptor sent data");
        let t2 = Instant::now();
        c.close();
        phases.connect += t1 - t0;
        phases.exchange += t2 - t1;
        phases.close += t2.elapsed();
        n += 1;
    }
    Ok((n, phases))
}
/// Accepts until told to stop; returns how many connections it served.
fn serve(acceptor: &Acceptor, stop: &AtomicBool) -> anyhow::Result<u64> {
    let mut n = 0;
    loop {
        // A short wait, so the stop flag is seen soon after the last connect.
        match acceptor.accept_within(Duration::from_millis(20), false)? {
            Some(mut c) => {
                let mut b = [0u8; 1];
                c.read_exact(&mut b).context("read the connector's byte")?;
                anyhow::ensure!(b == *b"x", "wrong byte from the connector");
                c.close();
                n += 1;
            }
            None if stop.load(Ordering::Relaxed) => return Ok(n),
            None => {}
        }
    }
}
