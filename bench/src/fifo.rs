//! Streaming throughput by write size, across two processes.
//!
//! This process hosts shuntd and reads; a re-executed copy of the binary writes. The reader
//! checks the payload and the byte count against what the writer says it wrote, so only an
//! intact stream produces a number.

use std::io::Read;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::Transport;
use crate::conn::Acceptor;
use crate::daemon::Daemon;
use crate::memcpy;
use crate::pattern::Checker;
use crate::peer::{PeerProcess, Role, Spec};
use crate::report::{self, RatiosHeader, Reporter, size_label};

pub(crate) const DEFAULT_SIZES: [usize; 5] = [64, 1 << 10, 16 << 10, 64 << 10, 1 << 20];

/// The reader's buffer, the same for every transport and write size, so only the writer's
/// pattern varies between rows.
const READ_BUF: usize = 256 << 10;

/// The write size the throughput target is judged at.
const TARGET_SIZE: usize = 64 << 10;
const TARGET_RATIO: f64 = 4.0;

pub(crate) struct Options {
    pub(crate) duration: Duration,
    pub(crate) max_bytes: u64,
    pub(crate) sizes: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Throughput {
    pub(crate) bench: &'static str,
    pub(crate) transport: Transport,
    pub(crate) msg_size: usize,
    pub(crate) gbps: f64,
    pub(crate) bytes: u64,
    pub(crate) secs: f64,
    /// Processes the bytes crossed between: 2 for transports, 1 for memcpy.
    pub(crate) processes: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) read_buf: Option<usize>,
    /// Whether the payload was checked on arrival.
    pub(crate) verified: bool,
}

#[derive(Serialize)]
struct SizeRatio {
    msg_size: usize,
    ratio: f64,
}

#[derive(Serialize)]
struct Ratios {
    #[serde(flatten)]
    header: RatiosHeader,
    /// cut-through Gbit/s over tcp-loopback Gbit/s, by write size.
    vs_tcp: Vec<SizeRatio>,
    /// cut-through Gbit/s over unix Gbit/s, by write size.
    vs_unix: Vec<SizeRatio>,
    /// cut-through Gbit/s over memcpy Gbit/s: how close to one copy's cost it gets.
    vs_memcpy: Vec<SizeRatio>,
    ratio: Option<f64>,
    target_ratio: f64,
    target_met: bool,
}

pub(crate) fn run(opts: &Options, r: &mut Reporter) -> anyhow::Result<Vec<Throughput>> {
    anyhow::ensure!(opts.sizes.iter().all(|&s| s > 0), "sizes must be positive");
    let daemon = Daemon::start()?;
    let worker = daemon.attach("shunt-bench-reader")?;
    let mut results = Vec::new();
    for &size in &opts.sizes {
        results.extend(report::measure_each(
            r,
            Transport::SOCKETS,
            |t| format!("fifo {} {}", t.name(), size_label(size)),
            |&t| stream(t, size, opts, &daemon, &worker),
        )?);
        report::progress(&format!("fifo memcpy {}", size_label(size)));
        let c = memcpy::run(size, opts.duration, opts.max_bytes);
        let m = Throughput {
            bench: "fifo",
            transport: Transport::Memcpy,
            msg_size: size,
            gbps: gbps(c.bytes, c.secs),
            bytes: c.bytes,
            secs: c.secs,
            processes: 1,
            read_buf: None,
            verified: false,
        };
        r.emit(&m)?;
        results.push(m);
    }
    summarize(&results, opts, r)?;
    Ok(results)
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 * 8.0 / secs.max(1e-9) / 1e9
}

fn stream(
    transport: Transport,
    msg_size: usize,
    opts: &Options,
    daemon: &Daemon,
    worker: &shunt_client::Worker,
) -> anyhow::Result<Throughput> {
    let (acceptor, target) = Acceptor::bind(transport, daemon, worker, Duration::ZERO)?;
    let mut peer = PeerProcess::spawn(&Spec {
        role: Role::Writer,
        transport,
        target,
        shuntd: daemon.socket(),
        msg_size,
        duration: opts.duration,
        max_bytes: opts.max_bytes,
        busy_poll: Duration::ZERO,
        spin: false,
        nodelay: false,
    })?;
    let mut conn = acceptor.accept_peer(false)?;
    let start = Instant::now();
    peer.start(&mut conn)?;
    let mut buf = vec![0u8; READ_BUF];
    let mut check = Checker::default();
    loop {
        let n = conn.read(&mut buf).context("read")?;
        if n == 0 {
            break;
        }
        check.feed(&buf[..n])?;
    }
    let secs = start.elapsed().as_secs_f64();
    conn.close();
    let out = peer.finish()?;
    let sent = writer_bytes(&out)?;
    anyhow::ensure!(
        sent == check.bytes(),
        "writer sent {sent} bytes but {} arrived",
        check.bytes()
    );
    anyhow::ensure!(sent > 0, "writer sent nothing");
    Ok(Throughput {
        bench: "fifo",
        transport,
        msg_size,
        gbps: gbps(sent, secs),
        bytes: sent,
        secs,
        processes: 2,
        read_buf: Some(READ_BUF),
        verified: true,
    })
}

fn writer_bytes(out: &str) -> anyhow::Result<u64> {
    let v: serde_json::Value = serde_json::from_str(out.trim())
        .with_context(|| format!("writer's report `{}`", out.trim()))?;
    v["bytes"]
        .as_u64()
        .context("writer's report has no byte count")
}

fn find(results: &[Throughput], t: Transport, size: usize) -> Option<f64> {
    results
        .iter()
        .find(|m| m.transport == t && m.msg_size == size)
        .map(|m| m.gbps)
}

fn summarize(results: &[Throughput], opts: &Options, r: &mut Reporter) -> anyhow::Result<()> {
    let ratio_to = |base: Transport| -> Vec<SizeRatio> {
        opts.sizes
            .iter()
            .filter_map(|&s| {
                let ct = find(results, Transport::CutThrough, s)?;
                let b = find(results, base, s)?;
                Some(SizeRatio {
                    msg_size: s,
                    ratio: ct / b,
                })
            })
            .collect()
    };
    let vs_tcp = ratio_to(Transport::TcpLoopback);
    let ratio = vs_tcp
        .iter()
        .find(|x| x.msg_size == TARGET_SIZE)
        .map(|x| x.ratio);
    let target_met = ratio.is_some_and(|x| x >= TARGET_RATIO);

    let headers = [
        "write size",
        "cut-through",
        "tcp-loopback",
        "unix",
        "memcpy",
        "ct/tcp",
    ];
    let cell = |t, s| find(results, t, s).map_or("-".into(), |g| format!("{g:.2}"));
    let rows: Vec<Vec<String>> = opts
        .sizes
        .iter()
        .map(|&s| {
            let mut row = vec![size_label(s)];
            row.extend(
                [
                    Transport::CutThrough,
                    Transport::TcpLoopback,
                    Transport::Unix,
                    Transport::Memcpy,
                ]
                .map(|t| cell(t, s)),
            );
            row.push(
                vs_tcp
                    .iter()
                    .find(|x| x.msg_size == s)
                    .map_or("-".into(), |x| format!("{:.2}x", x.ratio)),
            );
            row
        })
        .collect();
    r.table("fifo throughput (Gbit/s), two processes", &headers, &rows);
    match ratio {
        Some(x) => r.verdict(
            "cut-through / tcp-loopback at 64 KiB",
            x,
            ">= 4x",
            target_met,
        ),
        None => r.human("cut-through / tcp-loopback at 64 KiB: not measured (size not run)"),
    }

    r.emit(&Ratios {
        header: RatiosHeader::cut_through_vs_tcp("fifo-ratios", TARGET_SIZE),
        vs_tcp,
        vs_unix: ratio_to(Transport::Unix),
        vs_memcpy: ratio_to(Transport::Memcpy),
        ratio,
        target_ratio: TARGET_RATIO,
        target_met,
    })
}
