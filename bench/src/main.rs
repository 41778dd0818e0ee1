//! `shunt-bench`: cut-through sessions measured against the paths they replace: the kernel's,
//! and Envoy sidecars talking TCP or TLS.
//!
//! Every command measures cut-through and its baselines in the same run, on the same machine,
//! so the ratios it prints are comparable even on a noisy host.

mod conn;
mod connect;
mod cpu;
mod daemon;
mod envoy;
mod fifo;
mod http;
mod memcpy;
mod pattern;
mod peer;
mod pingpong;
mod pki;
mod placement;
mod polled;
mod report;
mod sidecar;
mod wake;
mod xds;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::report::Reporter;

#[derive(Parser, Debug)]
#[command(
    name = "shunt-bench",
    version,
    about = "Cut-through sessions against kernel TCP loopback, Unix sockets, memcpy and Envoy's TLS"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// One JSON object per line on stdout; the human table goes to stderr.
    #[arg(long, global = true)]
    json: bool,
    /// Tiny runs, to check that everything works rather than to measure.
    #[arg(long, global = true)]
    quick: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Streaming throughput across two processes, by write size.
    Fifo(FifoArgs),
    /// 64-byte round-trip latency across two processes.
    Pingpong(PingpongArgs),
    /// Connection setup rate: connect, accept, one byte, close.
    Connect(ConnectArgs),
    /// Two Envoy sidecars: no sidecars, plain TCP, Envoy's mTLS and Shunt between them.
    Envoy(EnvoyArgs),
    /// shunt-xds accepting and translating a large mesh: time and peak memory.
    Xds(XdsArgs),
    /// The child side of a two-process measurement.
    #[command(hide = true)]
    Peer(peer::PeerArgs),
    /// The child side of the wake-up floor: echoes the signals on stdin (an eventfd or a pipe)
    /// to stdout.
    #[command(hide = true)]
    WakeEcho,
}

#[derive(Args, Debug)]
struct FifoArgs {
    #[command(flatten)]
    common: Common,
    /// Writes an SVG plot of throughput against write size.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Seconds the writer streams for, per transport and size.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Caps the bytes streamed per transport and size (K, M, G suffixes allowed).
    #[arg(long, value_parser = parse_bytes)]
    bytes: Option<u64>,
    /// Write sizes to measure (K, M suffixes allowed).
    #[arg(long, value_delimiter = ',', value_parser = parse_bytes)]
    sizes: Option<Vec<u64>>,
}

#[derive(Args, Debug)]
struct PingpongArgs {
    #[command(flatten)]
    common: Common,
    /// Measured round trips per transport and mode.
    #[arg(long)]
    iters: Option<usize>,
    /// Unmeasured round trips first, to fault in pages and settle the scheduler.
    #[arg(long)]
    warmup: Option<usize>,
    /// Message size in bytes.
    #[arg(long, default_value_t = 64)]
    msg_size: usize,
    /// Microseconds the adaptive mode polls before it sleeps.
    #[arg(long, default_value_t = 50)]
    busy_poll_us: u64,
}

#[derive(Args, Debug)]
struct ConnectArgs {
    #[command(flatten)]
    common: Common,
    /// Seconds of connecting per transport.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Caps the connections per transport (TIME_WAIT makes kernel TCP run out of ports).
    #[arg(long)]
    max: Option<u64>,
    /// Connections in flight in the loaded cases, each with a connecting and an accepting
    /// thread.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(2..=512))]
    concurrency: u16,
    /// Microseconds the adaptive mode polls before it sleeps.
    #[arg(long, default_value_t = 50)]
    busy_poll_us: u64,
}

#[derive(Args, Debug)]
struct EnvoyArgs {
    #[command(flatten)]
    common: Common,
    /// Bytes of the bulk upload per mode (K, M, G suffixes allowed).
    #[arg(long, value_parser = parse_bytes)]
    bytes: Option<u64>,
    /// Seconds of request/response traffic per mode and connection count.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Body bytes of each request and each response.
    #[arg(long, default_value_t = 100)]
    msg_size: usize,
    /// The modes to measure, comma-separated. `shunt-plain` is the module's mode for meshes
    /// without mTLS; the ratios need `plain`, `envoy-tls` and one of the two shunt modes.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,plain,envoy-tls,shunt,shunt-busy-poll"
    )]
    modes: Vec<envoy::Mode>,
    /// A line added to the module's YAML config in the shunt modes, such as
    /// `--module-setting 'fifo_size: 1048576'`; repeatable.
    #[arg(long = "module-setting", value_name = "YAML")]
    module_settings: Vec<String>,
    /// Measures every mode this many times, the modes interleaved, and reports medians.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=100))]
    rounds: u16,
}

#[derive(Args, Debug)]
struct XdsArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 1000)]
    clusters: usize,
    #[arg(long, default_value_t = 10)]
    endpoints_per_cluster: usize,
    /// Inbound ports, each with an RBAC policy of ten principals.
    #[arg(long, default_value_t = 50)]
    inbound_ports: usize,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Measure once, in this process, and print the one result line.
    #[arg(long, hide = true)]
    single: bool,
}

/// How bytes travel between the two ends of a measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Transport {
    CutThrough,
    TcpLoopback,
    Unix,
    Memcpy,
    /// Two eventfds and no payload: the cheapest wake-up between two processes.
    Eventfd,
    /// Two pipes and no payload: the wake-up floor of cut-through, which wakes a peer through
    /// a pipe (eventfds can be poisoned by whoever holds them; see docs/security.md).
    Pipe,
}

impl Transport {
    pub(crate) const SOCKETS: [Transport; 3] = [
        Transport::CutThrough,
        Transport::TcpLoopback,
        Transport::Unix,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Transport::CutThrough => "cut-through",
            Transport::TcpLoopback => "tcp-loopback",
            Transport::Unix => "unix",
            Transport::Memcpy => "memcpy",
            Transport::Eventfd => "eventfd",
            Transport::Pipe => "pipe",
        }
    }
}

/// Accepts 4096, 4K, 4KiB, 1M, 2G.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(digits);
    let n: u64 = n.parse().map_err(|_| format!("`{s}` is not a size"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("unknown unit in `{s}`")),
    };
    n.checked_mul(1 << shift)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("`{s}` is out of range"))
}

fn secs(v: Option<f64>, quick: bool, normal: f64, tiny: f64) -> anyhow::Result<Duration> {
    let s = v.unwrap_or(if quick { tiny } else { normal });
    anyhow::ensure!(s.is_finite() && s > 0.0, "durations must be positive");
    Ok(Duration::from_secs_f64(s))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Peer(args) => peer::run(args),
        Command::WakeEcho => wake::echo(),
        Command::Fifo(a) => {
            let mut r = Reporter::new(a.common.json);
            let opts = fifo::Options {
                duration: secs(a.duration, a.common.quick, 1.0, 0.05)?,
                max_bytes: a
                    .bytes
                    .unwrap_or(if a.common.quick { 4 << 20 } else { 64 << 30 }),
                sizes: a.sizes.map_or_else(
                    || fifo::DEFAULT_SIZES.to_vec(),
                    |v| v.into_iter().map(|s| s as usize).collect(),
                ),
            };
            let results = fifo::run(&opts, &mut r)?;
            if let Some(path) = a.plot {
                report::plot_throughput(&path, &results)?;
                eprintln!("plot written to {}", path.display());
            }
            Ok(())
        }
        Command::Pingpong(a) => {
            let mut r = Reporter::new(a.common.json);
            anyhow::ensure!(a.msg_size > 0, "--msg-size must be positive");
            let opts = pingpong::Options {
                iters: a
                    .iters
                    .unwrap_or(if a.common.quick { 300 } else { 20_000 })
                    .max(1),
                warmup: a.warmup.unwrap_or(if a.common.quick { 50 } else { 2_000 }),
                msg_size: a.msg_size,
                busy_poll: Duration::from_micros(a.busy_poll_us),
            };
            pingpong::run(&opts, &mut r)
        }
        Command::Connect(a) => {
            let mut r = Reporter::new(a.common.json);
            let opts = connect::Options {
                duration: secs(a.duration, a.common.quick, 1.0, 0.05)?,
                max: a
                    .max
                    .unwrap_or(if a.common.quick { 200 } else { 20_000 })
                    .max(1),
                concurrency: a.concurrency.into(),
                busy_poll: Duration::from_micros(a.busy_poll_us),
            };
            connect::run(&opts, &mut r)
        }
        Command::Envoy(a) => {
            let mut r = Reporter::new(a.common.json);
            let quick = a.common.quick;
            let opts = envoy::Options {
                bulk_bytes: a.bytes.unwrap_or(if quick { 64 << 20 } else { 4 << 30 }),
                warmup: Duration::from_millis(if quick { 50 } else { 500 }),
                duration: secs(a.duration, quick, 3.0, 0.2)?,
                msg_size: a.msg_size,
                modes: a.modes,
                module_settings: a.module_settings,
                rounds: a.rounds.into(),
            };
            envoy::run(&opts, &mut r)
        }
        Command::Xds(a) => {
            let mut r = Reporter::new(a.common.json);
            let quick = a.common.quick;
            let opts = xds::Options {
                clusters: if quick { 50 } else { a.clusters },
                endpoints_per_cluster: a.endpoints_per_cluster,
                inbound_ports: if quick { 5 } else { a.inbound_ports },
                runs: if quick { 1 } else { a.runs },
            };
            if a.single {
                return xds::single(&opts);
            }
            xds::run(&opts, &mut r)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_bytes("64"), Ok(64));
        assert_eq!(parse_bytes("16K"), Ok(16 << 10));
        assert_eq!(parse_bytes("1MiB"), Ok(1 << 20));
        assert_eq!(parse_bytes("2g"), Ok(2 << 30));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("3x").is_err());
    }
}
