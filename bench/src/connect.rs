//! Connection setup rate: connect, accept, one byte, close on both sides.
//!
//! The byte proves each connection really carries data, and waiting for the acceptor's close
//! before the next connect keeps exactly one connection in flight, so the rate is the inverse
//! of one full setup-and-teardown rather than of how deep a backlog can be filled.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::Transport;
use crate::conn::{Acceptor, Conn, Mode};
use crate::daemon::Daemon;
use crate::report::{self, RatiosHeader, Reporter};

const TARGET_RATIO: f64 = 2.0;

pub(crate) struct Options {
    pub(crate) duration: Duration,
    pub(crate) max: u64,
    /// The adaptive mode's polling budget.
    pub(crate) busy_poll: Duration,
}

#[derive(Debug, Serialize)]
struct Rate {
    bench: &'static str,
    transport: Transport,
    mode: Mode,
    /// Bytes each connection carries before closing.
    msg_size: usize,
    cps: f64,
    us_per_conn: f64,
    /// Where each connection's time goes, seen from the connecting side (means, µs): until
    /// connect returns, then writing the byte until end-of-stream, then closing.
    connect_us: f64,
    exchange_us: f64,
    close_us: f64,
    connections: u64,
    secs: f64,
}

/// Time a connect loop spent in each phase, summed over its connections.
#[derive(Default)]
struct Phases {
    connect: Duration,
    exchange: Duration,
    close: Duration,
}

#[derive(Serialize)]
struct Ratios {
    #[serde(flatten)]
    header: RatiosHeader,
    /// cut-through (event) connections/s over tcp-loopback connections/s.
    ratio: f64,
    /// cut-through (event) connections/s over unix connections/s.
    vs_unix: f64,
    target_ratio: f64,
    target_met: bool,
    /// cut-through over tcp-loopback connections/s when both poll for the same budget before
    /// sleeping, and the budget. The target is judged on sleeping waits (`ratio`), never on
    /// this.
    adaptive_ratio: f64,
    adaptive_busy_poll_us: u128,
}

pub(crate) fn run(opts: &Options, r: &mut Reporter) -> anyhow::Result<()> {
    let daemon = Daemon::start()?;
    let cases = [
        (Transport::CutThrough, Mode::Event),
        (Transport::CutThrough, Mode::Adaptive),
        (Transport::TcpLoopback, Mode::Blocking),
        (Transport::TcpLoopback, Mode::Adaptive),
        (Transport::Unix, Mode::Blocking),
    ];
    let results = report::measure_each(
        r,
        cases,
        |(t, mode)| format!("connect {} {}", t.name(), mode.name()),
        |&(t, mode)| measure(t, mode, opts, &daemon),
    )?;
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|m| {
            vec![
                format!("{} ({})", m.transport.name(), m.mode.name()),
                format!("{:.0}", m.cps),
                format!("{:.2}", m.us_per_conn),
                format!("{:.2}", m.connect_us),
                format!("{:.2}", m.exchange_us),
                format!("{:.2}", m.close_us),
                m.connections.to_string(),
            ]
        })
        .collect();
    r.table(
        "connection setup (connect + accept + 1 byte + close)",
        &[
            "transport",
            "conn/s",
            "us/conn",
            "connect",
            "byte+eof",
            "close",
            "connections",
        ],
        &rows,
    );
    let cps = |t, mode| {
        results
            .iter()
            .find(|m| m.transport == t && m.mode == mode)
            .map(|m| m.cps)
            .expect("every case ran")
    };
    let tcp = cps(Transport::TcpLoopback, Mode::Blocking);
    let ratio = cps(Transport::CutThrough, Mode::Event) / tcp;
    let target_met = ratio >= TARGET_RATIO;
    r.verdict(
        "cut-through (event) / tcp-loopback connections/s",
        ratio,
        ">= 2x",
        target_met,
    );
    let adaptive_ratio =
        cps(Transport::CutThrough, Mode::Adaptive) / cps(Transport::TcpLoopback, Mode::Adaptive);
    r.human(&format!(
        "adaptive ({} us polling) connections/s, cut-through / tcp-loopback: {adaptive_ratio:.2}",
        opts.busy_poll.as_micros()
    ));
    r.emit(&Ratios {
        header: RatiosHeader::cut_through_vs_tcp("connect-ratios", 1),
        ratio,
        vs_unix: cps(Transport::CutThrough, Mode::Event) / cps(Transport::Unix, Mode::Blocking),
        target_ratio: TARGET_RATIO,
        target_met,
        adaptive_ratio,
        adaptive_busy_poll_us: opts.busy_poll.as_micros(),
    })
}

fn measure(
    transport: Transport,
    mode: Mode,
    opts: &Options,
    daemon: &Daemon,
) -> anyhow::Result<Rate> {
    // Two workers, as two apps would have: a worker connecting to its own listener is not the
    // case that matters.
    let busy_poll = mode.busy_poll(opts.busy_poll);
    let server = daemon.attach_polling("shunt-bench-acceptor", busy_poll)?;
    let client = daemon.attach_polling("shunt-bench-connector", busy_poll)?;
    let (acceptor, target) = Acceptor::bind(transport, daemon, &server, busy_poll)?;
    let stop = Arc::new(AtomicBool::new(false));
    let acceptor_thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("acceptor".into())
            .spawn(move || serve(&acceptor, &stop))?
    };

    let result = connect_loop(transport, &target, &client, busy_poll, opts);
    stop.store(true, Ordering::Relaxed);
    let accepted = acceptor_thread
        .join()
        .map_err(|_| anyhow::anyhow!("acceptor thread panicked"))??;
    let (n, secs, phases) = result?;
    anyhow::ensure!(
        accepted == n,
        "{n} connections made but {accepted} accepted"
    );
    let mean_us = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    Ok(Rate {
        bench: "connect",
        transport,
        mode,
        msg_size: 1,
        cps: n as f64 / secs,
        us_per_conn: secs * 1e6 / n as f64,
        connect_us: mean_us(phases.connect),
        exchange_us: mean_us(phases.exchange),
        close_us: mean_us(phases.close),
        connections: n,
        secs,
    })
}

fn connect_loop(
    transport: Transport,
    target: &str,
    client: &shunt_client::Worker,
    busy_poll: Duration,
    opts: &Options,
) -> anyhow::Result<(u64, f64, Phases)> {
    let start = Instant::now();
    let mut n = 0u64;
    let mut phases = Phases::default();
    while n < opts.max && (n == 0 || start.elapsed() < opts.duration) {
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
    Ok((n, start.elapsed().as_secs_f64(), phases))
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
