//! A client sidecar and a server sidecar, as a mesh puts them between two apps, measured with
//! each way of carrying the bytes between them, in one run:
//!
//! - `direct`: no sidecars; the load talks to the backend itself. The floor.
//! - `plain`: client Envoy (listener → `tcp_proxy` → cluster) → server Envoy (listener →
//!   `tcp_proxy` → backend), kernel TCP between them.
//! - `envoy-tls`: the same with Envoy's own TLS 1.3 between the sidecars, configured as Istio
//!   configures ISTIO_MUTUAL (client certificate, mesh CA, SPIFFE SAN match both ways, Istio's
//!   ALPN lists). What a mesh pays today.
//! - `shunt`: the Shunt module as the transport socket on the client's cluster and the server's
//!   listener, both attached to one shuntd, with the same certificates as `envoy-tls`: a TLS
//!   handshake proves both identities, then payload moves through shared memory. The run fails
//!   unless shuntd paired every connection and carried the bulk bytes.
//! - `shunt-busy-poll`: `shunt` with `busy_poll_us` set, so a sidecar that just moved bytes
//!   looks for the next ones by itself for a while instead of waiting for a doorbell.
//! - `shunt-plain`, on request (`--modes`): the module's mode for meshes without mTLS.
//!
//! Each mode starts fresh sidecars (`--concurrency 1`); the backend and the load are threads of
//! this process on kernel TCP with `TCP_NODELAY`. With `--rounds N` every mode is measured N
//! times, the modes taking turns, and reports the median of each figure.
//!
//! # Output
//!
//! With `--json`, one line per mode, in the order measured, then one ratios line:
//!
//! ```json
//! {"bench":"envoy","mode":"plain","bulk_bytes":4294967296,"bulk_secs":2.1,"gbps":16.3,
//!  "envoy_cpu_s":3.4,"cpu_s_per_gb":0.79,"msg_size":100,
//!  "rr":[{"connections":1,"requests":52000,"secs":3.0,"rps":17300,"p50_us":55.1,"p99_us":80.2,
//!         "envoy_cpu_us_per_request":41.0},
//!        {"connections":16,...}],
//!  "connections":18,"paired_connections":0,"rounds":1,"gbps_each_round":[16.3]}
//! {"bench":"envoy-ratios","shunt_mode":"shunt","gbps_vs_envoy_tls":2.1,"gbps_vs_plain":1.4,
//!  "cpu_s_per_gb_vs_envoy_tls":0.3,"p50_us_1conn_vs_plain":0.8,
//!  "busy_poll_p50_us_1conn_vs_plain":0.4,"busy_poll_cpu_per_request_1conn_vs_plain":1.0}
//! ```
//!
//! [`ModeResult`], [`RrResult`] and [`Ratios`] document each field. GB and Gbit are 10^9.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::daemon::Daemon;
use crate::http::{self, Backend, Exchange, HttpConn};
use crate::pki::Pki;
use crate::report::{self, Reporter};
use crate::sidecar::{self, Side, Sidecar};

/// Connection counts of the request/response runs; the first is what the ratios use.
const CONNECTIONS: [usize; 2] = [1, 16];
const PAIRED: &str = "shunt_pairings_total{result=\"paired\"}";
const CUT_THROUGH_BYTES: &str = "shunt_cut_through_bytes_total";
const FIFO_FULL: &str = "shunt_fifo_full_events_total";
const DATA_WAKEUPS: &str = "shunt_notifications_sent_total";

pub(crate) struct Options {
    /// Bytes of the one bulk upload per mode.
    pub(crate) bulk_bytes: u64,
    /// Request/response traffic before measuring, per connection count.
    pub(crate) warmup: Duration,
    /// Measured request/response traffic, per connection count.
    pub(crate) duration: Duration,
    /// Body bytes of each request and of each response.
    pub(crate) msg_size: usize,
    /// The modes to measure, in this order in every round.
    pub(crate) modes: Vec<Mode>,
    /// Extra lines of the module's YAML config (`fifo_size: 1048576`), for both sidecars.
    pub(crate) module_settings: Vec<String>,
    /// How many times each mode is measured. Rounds interleave the modes, so a slow spell of
    /// a shared host lands on all of them rather than on one; each mode reports its medians.
    pub(crate) rounds: usize,
}

/// How the two sidecars talk, if there are any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Mode {
    Direct,
    Plain,
    EnvoyTls,
    Shunt,
    ShuntBusyPoll,
    ShuntPlain,
}

/// `busy_poll_us` of the `shunt-busy-poll` mode: long enough to span the other sidecar's
/// turnaround of a small request on this kind of machine.
const BUSY_POLL_US: u32 = 100;

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Plain => "plain",
            Mode::EnvoyTls => "envoy-tls",
            Mode::Shunt => "shunt",
            Mode::ShuntBusyPoll => "shunt-busy-poll",
            Mode::ShuntPlain => "shunt-plain",
        }
    }

    fn uses_module(self) -> bool {
        matches!(self, Mode::Shunt | Mode::ShuntBusyPoll | Mode::ShuntPlain)
    }
}

/// One mode's results (`"bench": "envoy"`).
#[derive(Debug, Serialize)]
pub(crate) struct ModeResult {
    bench: &'static str,
    mode: Mode,
    /// Bytes of the bulk upload, one connection, client to backend; the backend checked the
    /// pattern and confirmed the count before the clock stopped.
    bulk_bytes: u64,
    /// From the first byte written to the backend's confirmation.
    bulk_secs: f64,
    /// Bulk throughput, Gbit/s (10^9 bits).
    gbps: f64,
    /// CPU seconds (user + system) both Envoy processes spent during the bulk upload; 0 for
    /// `direct`.
    envoy_cpu_s: f64,
    /// `envoy_cpu_s` per 10^9 bytes uploaded; 0 for `direct`.
    cpu_s_per_gb: f64,
    /// In the shunt modes, per MiB of the bulk upload: how often a sidecar found its FIFO full
    /// and had to wait to be woken for space, and how often one woke the other for data. Each
    /// wake-up is a doorbell on the sidecars' TCP connection, the cost cut-through keeps.
    #[serde(skip_serializing_if = "Option::is_none")]
    bulk_wakeups: Option<BulkWakeups>,
    /// Body bytes of each small request and of each answer.
    msg_size: usize,
    /// Keep-alive request/response traffic, one entry per connection count (1, then 16).
    rr: Vec<RrResult>,
    /// Connections the load opened through the chain in this mode, per round.
    connections: u64,
    /// Of those, how many shuntd paired for cut-through (all of them for `shunt`, else 0).
    paired_connections: u64,
    /// Rounds measured. With more than one, every figure above is the median over them.
    rounds: usize,
    /// `gbps` of each round, in order: how much the host let the figures wander.
    gbps_each_round: Vec<f64>,
}

impl ModeResult {
    /// One result of several rounds of one mode: the median of each figure.
    fn median_of(rounds: Vec<ModeResult>) -> ModeResult {
        let median =
            |f: &dyn Fn(&ModeResult) -> f64| report::median(rounds.iter().map(f).collect());
        let rr = (0..rounds[0].rr.len())
            .map(|i| {
                let median = |f: &dyn Fn(&RrResult) -> f64| {
                    report::median(rounds.iter().map(|m| f(&m.rr[i])).collect())
                };
                RrResult {
                    connections: rounds[0].rr[i].connections,
                    requests: median(&|r| r.requests as f64) as usize,
                    secs: median(&|r| r.secs),
                    rps: median(&|r| r.rps),
                    p50_us: median(&|r| r.p50_us),
                    p99_us: median(&|r| r.p99_us),
                    envoy_cpu_us_per_request: median(&|r| r.envoy_cpu_us_per_request),
                }
            })
            .collect();
        let first = &rounds[0];
        ModeResult {
            bench: first.bench,
            mode: first.mode,
            bulk_bytes: first.bulk_bytes,
            bulk_secs: median(&|m| m.bulk_secs),
            gbps: median(&|m| m.gbps),
            envoy_cpu_s: median(&|m| m.envoy_cpu_s),
            cpu_s_per_gb: median(&|m| m.cpu_s_per_gb),
            bulk_wakeups: first.bulk_wakeups.map(|_| {
                let wakeups = |m: &ModeResult| m.bulk_wakeups.expect("every round of a mode");
                BulkWakeups {
                    fifo_full_per_mib: median(&|m| wakeups(m).fifo_full_per_mib),
                    data_wakeups_per_mib: median(&|m| wakeups(m).data_wakeups_per_mib),
                }
            }),
            msg_size: first.msg_size,
            rr,
            connections: first.connections,
            paired_connections: first.paired_connections,
            rounds: rounds.len(),
            gbps_each_round: rounds.iter().map(|m| m.gbps).collect(),
        }
    }
}

/// shuntd's FIFO counters over one bulk upload, per MiB uploaded.
#[derive(Debug, Serialize, Clone, Copy)]
pub(crate) struct BulkWakeups {
    /// Writes that found a FIFO full (`shunt_fifo_full_events_total`).
    fifo_full_per_mib: f64,
    /// Data wake-ups one sidecar sent the other (`shunt_notifications_sent_total`).
    data_wakeups_per_mib: f64,
}

/// Closed-loop HTTP/1.1 requests: each connection waits for an answer before its next request.
#[derive(Debug, Serialize)]
pub(crate) struct RrResult {
    connections: usize,
    /// Requests that started and finished inside the measured window.
    requests: usize,
    /// Length of the measured window.
    secs: f64,
    /// Requests per second, all connections together.
    rps: f64,
    /// Median request-to-answer time, microseconds.
    p50_us: f64,
    /// 99th percentile request-to-answer time, microseconds.
    p99_us: f64,
    /// CPU time (user + system) of both Envoys per request, microseconds, warm-up included;
    /// 0 for `direct`. Shows what `busy_poll_us` spends for its latency.
    envoy_cpu_us_per_request: f64,
}

/// What Shunt changes (`"bench": "envoy-ratios"`), printed last.
#[derive(Debug, Serialize)]
pub(crate) struct Ratios {
    bench: &'static str,
    /// The mode the ratios are about: the first shunt mode measured, `shunt` by default.
    shunt_mode: Mode,
    /// Shunt's bulk Gbit/s over envoy-tls's; above 1 is faster.
    gbps_vs_envoy_tls: f64,
    /// Shunt's bulk Gbit/s over plain's.
    gbps_vs_plain: f64,
    /// Shunt's Envoy CPU seconds per GB over envoy-tls's; below 1 is cheaper. CPU time is
    /// counted in clock ticks (usually 10 ms), so `--quick` runs give rough values, or null
    /// when envoy-tls registered none.
    cpu_s_per_gb_vs_envoy_tls: f64,
    /// Shunt's p50 at one connection over plain's; below 1 is faster.
    p50_us_1conn_vs_plain: f64,
    /// The same for `shunt-busy-poll`, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    busy_poll_p50_us_1conn_vs_plain: Option<f64>,
    /// `shunt-busy-poll`'s Envoy CPU per request at one connection over plain's: what the
    /// polling costs for its latency.
    #[serde(skip_serializing_if = "Option::is_none")]
    busy_poll_cpu_per_request_1conn_vs_plain: Option<f64>,
}

/// What every mode shares.
struct Parts {
    module_dir: PathBuf,
    /// YAML appended to each sidecar's module config.
    module_settings: String,
    daemon: Daemon,
    pki: Pki,
    backend: Backend,
    exchange: Exchange,
}

pub(crate) fn run(opts: &Options, r: &mut Reporter) -> anyhow::Result<()> {
    anyhow::ensure!(opts.msg_size > 0, "--msg-size must be positive");
    anyhow::ensure!(opts.rounds > 0, "--rounds must be positive");
    anyhow::ensure!(!opts.modes.is_empty(), "--modes names no mode");
    for (i, mode) in opts.modes.iter().enumerate() {
        anyhow::ensure!(
            !opts.modes[..i].contains(mode),
            "--modes names {} twice",
            mode.name()
        );
    }
    report::progress("envoy: fetching Envoy and building libshunt_envoy.so");
    // Fail now, before anything is measured, if Envoy cannot be had.
    sidecar::envoy_binary()?;
    let parts = Parts {
        module_dir: sidecar::build_module()?,
        module_settings: opts
            .module_settings
            .iter()
            .map(|l| format!("{l}\n"))
            .collect(),
        daemon: Daemon::start()?,
        pki: Pki::generate()?,
        backend: Backend::start(opts.msg_size)?,
        exchange: Exchange::new(opts.msg_size),
    };
    // A module config Envoy rejects fails now rather than after the other modes ran.
    for &mode in opts.modes.iter().filter(|m| m.uses_module()) {
        drop(Chain::start(mode, &parts).with_context(|| format!("envoy {}", mode.name()))?);
    }

    let mut by_mode: Vec<Vec<ModeResult>> = opts.modes.iter().map(|_| Vec::new()).collect();
    for round in 1..=opts.rounds {
        for (&mode, results) in opts.modes.iter().zip(&mut by_mode) {
            let mut label = format!("envoy {}", mode.name());
            if opts.rounds > 1 {
                label += &format!(" (round {round} of {})", opts.rounds);
            }
            report::progress(&label);
            results.push(measure(mode, &parts, opts).context(label)?);
        }
    }
    let results: Vec<ModeResult> = by_mode.into_iter().map(ModeResult::median_of).collect();
    for m in &results {
        r.emit(m)?;
    }
    table(r, &results);

    let of = |mode| results.iter().find(|m| m.mode == mode);
    let shunt = results.iter().find(|m| m.mode.uses_module());
    let (Some(s), Some(tls), Some(plain)) = (shunt, of(Mode::EnvoyTls), of(Mode::Plain)) else {
        r.human("\n(no ratios: they need plain, envoy-tls and a shunt mode)");
        return Ok(());
    };
    let p50_1 = |m: &ModeResult| m.rr[0].p50_us;
    let cpu_1 = |m: &ModeResult| m.rr[0].envoy_cpu_us_per_request;
    let polled = of(Mode::ShuntBusyPoll);
    let ratios = Ratios {
        bench: "envoy-ratios",
        shunt_mode: s.mode,
        gbps_vs_envoy_tls: s.gbps / tls.gbps,
        gbps_vs_plain: s.gbps / plain.gbps,
        cpu_s_per_gb_vs_envoy_tls: s.cpu_s_per_gb / tls.cpu_s_per_gb,
        p50_us_1conn_vs_plain: p50_1(s) / p50_1(plain),
        busy_poll_p50_us_1conn_vs_plain: polled.map(|p| p50_1(p) / p50_1(plain)),
        busy_poll_cpu_per_request_1conn_vs_plain: polled.map(|p| cpu_1(p) / cpu_1(plain)),
    };
    let name = s.mode.name();
    let mut text = format!(
        "\n{name} / envoy-tls throughput: {:.2}x\n{name} / plain throughput: {:.2}x\n\
         {name} / envoy-tls Envoy CPU per GB: {:.2}\n{name} / plain p50 at 1 connection: {:.2}",
        ratios.gbps_vs_envoy_tls,
        ratios.gbps_vs_plain,
        ratios.cpu_s_per_gb_vs_envoy_tls,
        ratios.p50_us_1conn_vs_plain
    );
    if let (Some(p50), Some(cpu)) = (
        ratios.busy_poll_p50_us_1conn_vs_plain,
        ratios.busy_poll_cpu_per_request_1conn_vs_plain,
    ) {
        text += &format!(
            "\nshunt-busy-poll / plain p50 at 1 connection: {p50:.2}, Envoy CPU per request: {cpu:.2}"
        );
    }
    r.human(&text);
    r.emit(&ratios)
}

fn table(r: &mut Reporter, results: &[ModeResult]) {
    let mut headers = vec!["mode", "Gbit/s", "CPU s/GB"];
    let labels: Vec<String> = CONNECTIONS
        .iter()
        .flat_map(|c| {
            [
                format!("rps@{c}"),
                format!("p50@{c}"),
                format!("p99@{c}"),
                format!("cpu@{c}"),
            ]
        })
        .collect();
    headers.extend(labels.iter().map(String::as_str));
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|m| {
            let mut row = vec![
                m.mode.name().to_owned(),
                format!("{:.2}", m.gbps),
                format!("{:.3}", m.cpu_s_per_gb),
            ];
            for rr in &m.rr {
                row.push(format!("{:.0}", rr.rps));
                row.push(format!("{:.1}", rr.p50_us));
                row.push(format!("{:.1}", rr.p99_us));
                row.push(format!("{:.1}", rr.envoy_cpu_us_per_request));
            }
            row
        })
        .collect();
    let bulk = results.first().map_or(0, |m| m.bulk_bytes);
    let size = results.first().map_or(0, |m| m.msg_size);
    r.table(
        &format!(
            "envoy: bulk upload of {}, HTTP/1.1 {size} B request/response (latency and Envoy CPU per request in us)",
            report::size_label(bulk as usize)
        ),
        &headers,
        &rows,
    );
}

/// The sidecars of one mode (none for `direct`) and where the load connects.
struct Chain {
    sidecars: Vec<Sidecar>,
    entry: SocketAddr,
}

impl Chain {
    fn start(mode: Mode, parts: &Parts) -> anyhow::Result<Chain> {
        let (listener_socket, cluster_socket) = match mode {
            Mode::Direct => {
                return Ok(Chain {
                    sidecars: Vec::new(),
                    entry: parts.backend.addr,
                });
            }
            Mode::Plain => (None, None),
            Mode::EnvoyTls => (
                Some(sidecar::istio_tls(Side::Downstream, &parts.pki.server)),
                Some(sidecar::istio_tls(Side::Upstream, &parts.pki.client)),
            ),
            Mode::Shunt | Mode::ShuntBusyPoll | Mode::ShuntPlain => {
                let mtls = mode != Mode::ShuntPlain;
                let socket = parts.daemon.socket();
                let mut settings = parts.module_settings.clone();
                if mode == Mode::ShuntBusyPoll {
                    settings += &format!("busy_poll_us: {BUSY_POLL_US}\n");
                }
                let config = |id| sidecar::shunt_module_config(&socket, id, mtls) + &settings;
                (
                    Some(sidecar::shunt_socket(config(&parts.pki.server))),
                    Some(sidecar::shunt_socket(config(&parts.pki.client))),
                )
            }
        };
        let start = |name, resources| Sidecar::start(name, &parts.module_dir, resources);
        let server = start(
            "server",
            sidecar::tcp_proxy(listener_socket, parts.backend.addr, None),
        )?;
        let upstream = server.listener("in")?;
        let client = start("client", sidecar::tcp_proxy(None, upstream, cluster_socket))?;
        let entry = client.listener("in")?;
        Ok(Chain {
            sidecars: vec![client, server],
            entry,
        })
    }

    fn cpu(&self) -> anyhow::Result<Duration> {
        self.sidecars.iter().map(Sidecar::cpu).sum()
    }

    fn logs(&self) -> String {
        let mut text = String::new();
        for (s, name) in self.sidecars.iter().zip(["client", "server"]) {
            text += &format!("\n--- envoy {name} ---\n{}", s.log_tail());
        }
        text
    }
}

fn measure(mode: Mode, parts: &Parts, opts: &Options) -> anyhow::Result<ModeResult> {
    let chain = Chain::start(mode, parts)?;
    measure_chain(mode, &chain, parts, opts).with_context(|| chain.logs())
}

fn measure_chain(
    mode: Mode,
    chain: &Chain,
    parts: &Parts,
    opts: &Options,
) -> anyhow::Result<ModeResult> {
    let daemon = &parts.daemon;
    let paired_before = daemon.metric(PAIRED)?;
    let cut_through_before = daemon.metric(CUT_THROUGH_BYTES)?;

    let wakeup_counts = || -> anyhow::Result<[f64; 2]> {
        Ok([daemon.metric(FIFO_FULL)?, daemon.metric(DATA_WAKEUPS)?])
    };

    let mut conn = HttpConn::connect(chain.entry).context("bulk connection")?;
    let wakeups_before = wakeup_counts()?;
    let cpu_before = chain.cpu()?;
    let t0 = Instant::now();
    conn.upload(opts.bulk_bytes).context("bulk upload")?;
    let bulk = t0.elapsed();
    let cpu = chain.cpu()? - cpu_before;
    let wakeups_after = wakeup_counts()?;
    drop(conn);
    let mib = opts.bulk_bytes as f64 / (1 << 20) as f64;
    let bulk_wakeups = mode.uses_module().then(|| BulkWakeups {
        fifo_full_per_mib: (wakeups_after[0] - wakeups_before[0]) / mib,
        data_wakeups_per_mib: (wakeups_after[1] - wakeups_before[1]) / mib,
    });

    let mut rr = Vec::new();
    for connections in CONNECTIONS {
        let cpu_before = chain.cpu()?;
        let run = http::request_response(
            chain.entry,
            &parts.exchange,
            connections,
            opts.warmup,
            opts.duration,
        )
        .with_context(|| format!("request/response on {connections} connections"))?;
        let cpu = chain.cpu()? - cpu_before;
        let mut samples = run.samples;
        samples.sort_unstable();
        rr.push(RrResult {
            connections,
            requests: samples.len(),
            secs: run.secs,
            rps: samples.len() as f64 / run.secs,
            p50_us: report::percentile_us(&samples, 50),
            p99_us: report::percentile_us(&samples, 99),
            envoy_cpu_us_per_request: cpu.as_secs_f64() * 1e6 / run.requests_made as f64,
        });
    }

    let connections = 1 + CONNECTIONS.iter().sum::<usize>() as u64;
    let paired = (daemon.metric(PAIRED)? - paired_before) as u64;
    if mode.uses_module() {
        anyhow::ensure!(
            paired >= connections,
            "shuntd paired {paired} of {connections} connections: cut-through did not apply"
        );
        let carried = daemon.metric(CUT_THROUGH_BYTES)? - cut_through_before;
        anyhow::ensure!(
            carried >= opts.bulk_bytes as f64,
            "only {carried} bytes went through cut-through FIFOs for a {} byte upload",
            opts.bulk_bytes
        );
    }

    let secs = bulk.as_secs_f64();
    let gb = opts.bulk_bytes as f64 / 1e9;
    let gbps = gb * 8.0 / secs;
    Ok(ModeResult {
        bench: "envoy",
        mode,
        bulk_bytes: opts.bulk_bytes,
        bulk_secs: secs,
        gbps,
        envoy_cpu_s: cpu.as_secs_f64(),
        cpu_s_per_gb: cpu.as_secs_f64() / gb,
        bulk_wakeups,
        msg_size: opts.msg_size,
        rr,
        connections,
        paired_connections: paired,
        rounds: 1,
        gbps_each_round: vec![gbps],
    })
}
