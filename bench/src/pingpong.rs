//! Small-message round-trip latency, across two processes.
//!
//! This process pings; a re-executed copy of the binary echoes. Cut-through runs three ways:
//! spinning on the FIFOs (the floor of what shared memory can do), sleeping on the wake-up
//! pipes at once (what an ordinary blocking app gets), and adaptive: blocking calls that
//! poll for a short budget before they sleep (`AttachOptions::busy_poll`).
//!
//! Sleeping transports are also measured against the wake-up floors (two pipes, as
//! cut-through wakes, or two eventfds, the cheapest there is; no payload)
//! and a second time with both processes on one CPU, which shows how much of their latency is
//! waking a peer on another CPU rather than moving bytes.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::Transport;
use crate::conn::{Acceptor, Conn, Mode};
use crate::daemon::Daemon;
use crate::peer::{PeerProcess, Role, Spec};
use crate::placement::Placement;
use crate::report::{self, RatiosHeader, Reporter};
use crate::wake;

const BUSY_POLL_TARGET: f64 = 0.1;
const EVENT_TARGET: f64 = 0.5;

pub(crate) struct Options {
    pub(crate) iters: usize,
    pub(crate) warmup: usize,
    pub(crate) msg_size: usize,
    /// The adaptive mode's polling budget.
    pub(crate) busy_poll: Duration,
}

#[derive(Debug, Serialize)]
struct Latency {
    bench: &'static str,
    transport: Transport,
    mode: Mode,
    placement: Placement,
    msg_size: usize,
    /// The numbers are full round trips, not halves.
    latency: &'static str,
    p50_us: f64,
    p99_us: f64,
    min_us: f64,
    mean_us: f64,
    samples: usize,
    warmup: usize,
}

#[derive(Serialize)]
struct Ratios {
    #[serde(flatten)]
    header: RatiosHeader,
    tcp_p50_us: f64,
    /// cut-through busy-poll p50 over tcp-loopback p50; the target is at most 0.1.
    busy_poll_ratio: f64,
    busy_poll_target: f64,
    busy_poll_target_met: bool,
    /// cut-through event-driven p50 over tcp-loopback p50; the target is at most 0.5.
    event_ratio: f64,
    event_target: f64,
    event_target_met: bool,
    /// cut-through event-driven p50 over unix p50.
    event_vs_unix: f64,
    /// cut-through adaptive p50 over tcp-loopback adaptive p50 (both poll for the same budget
    /// before sleeping), and the budget. The event target is judged on pure sleeping
    /// (`event_ratio`), never on this.
    adaptive_ratio: f64,
    adaptive_busy_poll_us: u128,
    /// The pipe ping-pong's p50: sleeping cut-through, which wakes through pipes, cannot go
    /// below it.
    wake_floor_p50_us: f64,
    /// cut-through event-driven p50 over the wake-up floor's.
    event_over_wake_floor: f64,
    /// The eventfd ping-pong's p50: no sleeping transport can go below it.
    eventfd_floor_p50_us: f64,
    /// cut-through event-driven p50 over tcp-loopback p50, both pairs of processes on one
    /// CPU. Informational: the target is judged where the scheduler places them.
    one_cpu_event_ratio: f64,
    one_cpu_tcp_p50_us: f64,
    targets_met: bool,
}

pub(crate) fn run(opts: &Options, r: &mut Reporter) -> anyhow::Result<()> {
    let daemon = Daemon::start()?;
    let any = Placement::AnyCpu;
    let one = Placement::OneCpu;
    let cases = [
        (Transport::CutThrough, Mode::BusyPoll, any),
        (Transport::CutThrough, Mode::Event, any),
        (Transport::CutThrough, Mode::Adaptive, any),
        (Transport::TcpLoopback, Mode::Blocking, any),
        (Transport::TcpLoopback, Mode::Adaptive, any),
        (Transport::Unix, Mode::Blocking, any),
        (Transport::Unix, Mode::Adaptive, any),
        (Transport::Eventfd, Mode::Blocking, any),
        (Transport::Pipe, Mode::Blocking, any),
        // Only sleeping modes share a CPU: two spinners on one CPU measure the time slice.
        (Transport::CutThrough, Mode::Event, one),
        (Transport::TcpLoopback, Mode::Blocking, one),
        (Transport::Unix, Mode::Blocking, one),
        (Transport::Eventfd, Mode::Blocking, one),
        (Transport::Pipe, Mode::Blocking, one),
    ];
    let worker = daemon.attach("shunt-bench-pinger")?;
    let polling_worker = daemon.attach_polling("shunt-bench-pinger-adaptive", opts.busy_poll)?;
    let results = report::measure_each(
        r,
        cases,
        |(t, mode, placement)| {
            format!(
                "pingpong {} {} on {}",
                t.name(),
                mode.name(),
                placement.name()
            )
        },
        |&(t, mode, placement)| {
            let _placed = placement.apply()?;
            let floor = match t {
                // The wake-up floors move an eventfd's 8-byte count or a byte, not a message.
                Transport::Eventfd => Some((wake::Channel::Eventfd, size_of::<u64>())),
                Transport::Pipe => Some((wake::Channel::Pipe, 1)),
                _ => None,
            };
            let (samples, msg_size) = if let Some((channel, signal_len)) = floor {
                let samples = wake::round_trips(channel, opts.iters, opts.warmup)?;
                (samples, signal_len)
            } else {
                let worker = if mode == Mode::Adaptive {
                    &polling_worker
                } else {
                    &worker
                };
                let samples = round_trips(t, mode, opts, &daemon, worker)?;
                (samples, opts.msg_size)
            };
            Ok(Latency::new(t, mode, placement, msg_size, opts, samples))
        },
    )?;

    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|m| {
            vec![
                format!(
                    "{} ({}, {})",
                    m.transport.name(),
                    m.mode.name(),
                    m.placement.name()
                ),
                format!("{:.2}", m.p50_us),
                format!("{:.2}", m.p99_us),
                format!("{:.2}", m.min_us),
                format!("{:.2}", m.mean_us),
            ]
        })
        .collect();
    r.table(
        &format!(
            "pingpong {} B round trip (us), two processes",
            opts.msg_size
        ),
        &["transport", "p50", "p99", "min", "mean"],
        &rows,
    );

    let p50_on = |t, mode, placement| {
        results
            .iter()
            .find(|m| m.transport == t && m.mode == mode && m.placement == placement)
            .map(|m| m.p50_us)
            .expect("every case ran")
    };
    let p50 = |t, mode| p50_on(t, mode, any);
    let tcp = p50(Transport::TcpLoopback, Mode::Blocking);
    let busy = p50(Transport::CutThrough, Mode::BusyPoll) / tcp;
    let event = p50(Transport::CutThrough, Mode::Event) / tcp;
    let ratios = Ratios {
        header: RatiosHeader::cut_through_vs_tcp("pingpong-ratios", opts.msg_size),
        tcp_p50_us: tcp,
        busy_poll_ratio: busy,
        busy_poll_target: BUSY_POLL_TARGET,
        busy_poll_target_met: busy <= BUSY_POLL_TARGET,
        event_ratio: event,
        event_target: EVENT_TARGET,
        event_target_met: event <= EVENT_TARGET,
        event_vs_unix: p50(Transport::CutThrough, Mode::Event)
            / p50(Transport::Unix, Mode::Blocking),
        adaptive_ratio: p50(Transport::CutThrough, Mode::Adaptive)
            / p50(Transport::TcpLoopback, Mode::Adaptive),
        adaptive_busy_poll_us: opts.busy_poll.as_micros(),
        wake_floor_p50_us: p50(Transport::Pipe, Mode::Blocking),
        event_over_wake_floor: p50(Transport::CutThrough, Mode::Event)
            / p50(Transport::Pipe, Mode::Blocking),
        eventfd_floor_p50_us: p50(Transport::Eventfd, Mode::Blocking),
        one_cpu_event_ratio: p50_on(Transport::CutThrough, Mode::Event, one)
            / p50_on(Transport::TcpLoopback, Mode::Blocking, one),
        one_cpu_tcp_p50_us: p50_on(Transport::TcpLoopback, Mode::Blocking, one),
        targets_met: busy <= BUSY_POLL_TARGET && event <= EVENT_TARGET,
    };
    r.verdict(
        "busy-poll p50 / tcp-loopback p50",
        busy,
        "<= 0.10",
        ratios.busy_poll_target_met,
    );
    r.verdict(
        "event p50 / tcp-loopback p50",
        event,
        "<= 0.50",
        ratios.event_target_met,
    );
    r.human(&format!(
        "adaptive ({} us polling) p50, cut-through / tcp-loopback: {:.2}",
        opts.busy_poll.as_micros(),
        ratios.adaptive_ratio
    ));
    r.human(&format!(
        "event p50 / wake-up floor p50: {:.2}; on one CPU, event p50 / tcp-loopback p50: {:.2}",
        ratios.event_over_wake_floor, ratios.one_cpu_event_ratio
    ));
    r.emit(&ratios)
}

fn round_trips(
    transport: Transport,
    mode: Mode,
    opts: &Options,
    daemon: &Daemon,
    worker: &shunt_client::Worker,
) -> anyhow::Result<Vec<Duration>> {
    let spin = mode == Mode::BusyPoll;
    let busy_poll = mode.busy_poll(opts.busy_poll);
    let (acceptor, target) = Acceptor::bind(transport, daemon, worker, busy_poll)?;
    let mut peer = PeerProcess::spawn(&Spec {
        role: Role::Echo,
        transport,
        target,
        shuntd: daemon.socket(),
        msg_size: opts.msg_size,
        duration: Duration::from_secs(3600),
        max_bytes: u64::MAX,
        spin,
        busy_poll,
        nodelay: true,
    })?;
    let mut conn = acceptor.accept_peer(true)?;
    peer.start(&mut conn)?;
    let mut ping = vec![0u8; opts.msg_size];
    let mut pong = vec![0u8; opts.msg_size];
    let mut samples = Vec::with_capacity(opts.iters);
    for i in 0..opts.warmup + opts.iters {
        // A sequence number in every ping, so a stale or lost echo cannot pass as a reply.
        let seq = (i as u64).to_le_bytes();
        let n = seq.len().min(ping.len());
        ping[..n].copy_from_slice(&seq[..n]);
        let t0 = Instant::now();
        round_trip(&mut conn, spin, &ping, &mut pong)?;
        let dt = t0.elapsed();
        anyhow::ensure!(pong == ping, "echo {i} does not match its ping");
        if i >= opts.warmup {
            samples.push(dt);
        }
    }
    conn.shutdown_write()?;
    conn.close();
    peer.finish()?;

    Ok(samples)
}

fn round_trip(conn: &mut Conn, spin: bool, ping: &[u8], pong: &mut [u8]) -> std::io::Result<()> {
    use std::io::{Read, Write};
    if spin {
        conn.write_all_spin(ping)?;
        conn.read_exact_spin(pong)
    } else {
        conn.write_all(ping)?;
        conn.read_exact(pong)
    }
}

impl Latency {
    fn new(
        transport: Transport,
        mode: Mode,
        placement: Placement,
        msg_size: usize,
        opts: &Options,
        mut samples: Vec<Duration>,
    ) -> Latency {
        samples.sort_unstable();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
        Latency {
            bench: "pingpong",
            transport,
            mode,
            placement,
            msg_size,
            latency: "rtt",
            p50_us: report::percentile_us(&samples, 50),
            p99_us: report::percentile_us(&samples, 99),
            min_us: us(samples[0]),
            mean_us: us(mean),
            samples: samples.len(),
            warmup: opts.warmup,
        }
    }
}
