//! `shunt-xds`: run the adapter for one workload, or translate a config dump offline.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use shunt_xds::apply::{ShuntdTarget, keep_in_step};
use shunt_xds::metrics::Metrics;
use shunt_xds::node::{NodeId, envoy_node};
use shunt_xds::translate::Context;
use shunt_xds::xds::{self, Api, Protocol, StreamConfig, Target, TlsFiles};

#[derive(Parser)]
#[command(
    version,
    about = "Keeps shuntd's rules, services and certificates in step with the mesh's xDS"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Follow an xDS server (ADS) and an optional SDS socket for one workload, installing the
    /// translation in shuntd.
    Run(Box<RunArgs>),
    /// Print, as JSON, what would be installed for an Envoy /config_dump (JSON or YAML), with
    /// everything not translated listed under "findings".
    Translate {
        /// The config dump; `-` for standard input.
        file: PathBuf,
        /// The workload's addresses, when the dump's node metadata has no INSTANCE_IPS.
        #[arg(long = "workload-ip")]
        workload_ips: Vec<IpAddr>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The ADS server: unix:PATH (pilot-agent's XDS socket), http://HOST:PORT or https://HOST:PORT.
    #[arg(long, env = "SHUNT_XDS_ADDRESS")]
    xds_address: Target,
    /// A separate SDS server for the secrets (pilot-agent's workload-spiffe-uds socket); without
    /// it, secrets come over ADS.
    #[arg(long, env = "SHUNT_XDS_SDS_ADDRESS")]
    sds_address: Option<Target>,
    #[arg(long, value_enum, default_value = "delta", env = "SHUNT_XDS_PROTOCOL")]
    protocol: Protocol,
    /// The protocol of the separate SDS stream: pilot-agent's SDS server implements state of
    /// the world only in many Istio releases.
    #[arg(long, value_enum, default_value = "sotw")]
    sds_protocol: Protocol,
    /// The node id to present, Istio's TYPE~IP~POD.NAMESPACE~DOMAIN.
    #[arg(long, env = "SHUNT_XDS_NODE_ID")]
    node_id: NodeId,
    /// Node metadata as KEY=VALUE (ISTIO_VERSION, CLUSTER_ID, LABELS, INSTANCE_IPS, ...).
    #[arg(long = "metadata", value_parser = parse_key_value)]
    metadata: Vec<(String, String)>,
    /// The workload's addresses; defaults to INSTANCE_IPS, then the node id's IP.
    #[arg(long = "workload-ip")]
    workload_ips: Vec<IpAddr>,
    /// SDS secret names: the workload certificate, then the trust bundle.
    #[arg(long, default_value = "default")]
    certificate_secret: String,
    #[arg(long, default_value = "ROOTCA")]
    root_secret: String,
    /// The name the certificate is stored under in shuntd (the module's `tls.certificate`).
    #[arg(long, default_value = "default")]
    certificate_name: String,
    /// TLS towards an https:// xDS server.
    #[arg(long)]
    xds_ca: Option<PathBuf>,
    #[arg(long)]
    xds_cert: Option<PathBuf>,
    #[arg(long)]
    xds_key: Option<PathBuf>,
    #[arg(long)]
    xds_server_name: Option<String>,
    /// A token file sent as `authorization: Bearer` (istiod on 15012 takes the pod's projected
    /// service-account token, `/var/run/secrets/tokens/istio-token`); read on every connect.
    #[arg(long, env = "SHUNT_XDS_TOKEN_FILE")]
    xds_token_file: Option<PathBuf>,
    /// Extra request headers as KEY=VALUE (istiod wants `clusterid=Kubernetes` or your
    /// cluster's id).
    #[arg(long = "xds-header", value_parser = parse_key_value)]
    xds_headers: Vec<(String, String)>,
    /// shuntd's control socket.
    #[arg(
        long,
        default_value = "/run/shunt/control.sock",
        env = "SHUNT_CONTROL_SOCKET"
    )]
    control_socket: PathBuf,
    /// The shuntd namespace the workload's apps attach to (certificates are stored there);
    /// defaults to the node id's Kubernetes namespace.
    #[arg(long)]
    shunt_namespace: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, default_value = "127.0.0.1:15091")]
    metrics_address: std::net::SocketAddr,
    /// How often the tables are installed in shuntd again even without a change, so that a
    /// shuntd that restarted gets them back.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    resync_interval: Duration,
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    backoff_initial: Duration,
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    backoff_max: Duration,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .ok_or_else(|| format!("`{s}` has no unit (ms or s)"))?;
    let n: u64 = number.parse().map_err(|_| format!("bad duration `{s}`"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        _ => Err(format!("bad unit in `{s}` (ms or s)")),
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Translate { file, workload_ips } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading standard input")?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            let report = shunt_xds::offline::translate_dump(&text, &workload_ips)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Run(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(run(*args)),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let metadata: BTreeMap<String, String> = args.metadata.into_iter().collect();
    let node = envoy_node(&args.node_id, &metadata);
    let workload_ips = if args.workload_ips.is_empty() {
        shunt_xds::node::workload_ips(&node)
    } else {
        args.workload_ips
    };
    let source = format!("xds/{}", args.node_id.id);
    let mut context = Context::new(source.clone(), workload_ips);
    context.certificate_name = args.certificate_name;
    context.certificate_secret = args.certificate_secret.clone();
    context.root_secret = args.root_secret.clone();
    let metrics = Arc::new(Metrics::default());
    let state = xds::State::new(context, metrics.clone());

    let namespace = args
        .shunt_namespace
        .or_else(|| args.node_id.namespace().map(str::to_owned))
        .context("--shunt-namespace is needed when the node id names no namespace")?;
    let target = ShuntdTarget {
        control_socket: args.control_socket,
        source,
        namespace,
    };
    let listener = tokio::net::TcpListener::bind(args.metrics_address)
        .await
        .with_context(|| format!("binding the metrics address {}", args.metrics_address))?;
    tracing::info!(address = %listener.local_addr()?, "metrics at /metrics");

    let https = matches!(&args.xds_address, Target::Tcp(uri) if uri.starts_with("https://"));
    let tls = https.then_some(TlsFiles {
        ca: args.xds_ca,
        cert: args.xds_cert,
        key: args.xds_key,
        server_name: args.xds_server_name,
    });
    let secrets = vec![args.certificate_secret, args.root_secret];
    let ads = StreamConfig {
        target: args.xds_address,
        tls,
        protocol: args.protocol,
        api: Api::Aggregated,
        node: node.clone(),
        secrets: if args.sds_address.is_some() {
            Vec::new()
        } else {
            secrets.clone()
        },
        backoff_initial: args.backoff_initial,
        backoff_max: args.backoff_max,
        token_file: args.xds_token_file,
        headers: args.xds_headers,
    };
    // pilot-agent's SDS socket is local and takes no credentials.
    let sds = args.sds_address.map(|target| StreamConfig {
        target,
        tls: None,
        protocol: args.sds_protocol,
        api: Api::Secrets,
        secrets,
        token_file: None,
        headers: Vec::new(),
        ..ads.clone()
    });

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(xds::run(ads, state.clone()));
    if let Some(sds) = sds {
        tasks.spawn(xds::run(sds, state.clone()));
    }
    tasks.spawn(keep_in_step(
        target,
        state.subscribe(),
        metrics.clone(),
        args.resync_interval,
    ));
    let serve = shunt_xds::metrics::serve(listener, metrics);
    tokio::select! {
        r = serve => r.context("metrics server")?,
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
        _ = tasks.join_next() => anyhow::bail!("a stream task ended"),
    }
    Ok(())
}
