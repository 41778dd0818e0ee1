//! `xds-snapshot-server`: serves fixed xDS snapshots, read from a JSON file, with the
//! third-party nebucloud-xds server (crates `xds-server`, `xds-cache`, `xds-core`), so that
//! tests of an xDS client can talk to a control plane they did not write.
//!
//! It holds no Envoy protos of its own: each resource in the file is a type URL, a name and the
//! base64 of its serialized proto, handed to nebucloud-xds as an opaque `Any`. The services
//! (ADS and the per-type ones, SotW and Delta, plus gRPC health) are nebucloud-xds's own, built
//! by its `XdsServerBuilder` with its defaults; only the listener is ours, because its `serve`
//! takes a fixed socket address and cannot report the port it got for port 0, nor listen on a
//! Unix socket.

use std::any::Any as StdAny;
use std::collections::{BTreeMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use base64::Engine as _;
use clap::Parser;
use serde::Deserialize;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;
use tonic::transport::server::{Router, TcpIncoming};
use xds_cache::{Cache as _, ShardedCache, Snapshot};
use xds_core::{BoxResource, NodeHash, Resource, TypeUrl};
use xds_server::{HealthService, XdsServer, XdsServerBuilder};

/// Serves the xDS snapshots in a JSON file with the nebucloud-xds server (ADS and per-type
/// services, SotW and Delta) until SIGTERM or SIGINT.
#[derive(Debug, Parser)]
#[command(name = "xds-snapshot-server", version)]
struct Args {
    /// Where to listen: `HOST:PORT` (port 0 picks a free port) or `unix:PATH`. The address
    /// actually bound is printed on stdout as `listening on <addr>`.
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// The snapshot file (JSON): `{"node_id", "version", "resources": [{"type_url", "name",
    /// "value"}]}`, or `{"snapshots": [...]}` of those for several nodes.
    #[arg(long, value_name = "FILE")]
    snapshot: PathBuf,
}

/// One node's snapshot as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeSnapshot {
    /// Matched exactly against the `node.id` the client sends.
    node_id: String,
    /// The version of every resource type in the snapshot.
    version: String,
    resources: Vec<FileResource>,
    /// Type URLs to answer with no resources (SotW only: nebucloud-xds sends a Delta client no
    /// response at all for a type without resources).
    #[serde(default)]
    empty_types: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileResource {
    type_url: String,
    name: String,
    /// Standard base64 (with padding) of the serialized proto message.
    value: String,
}

/// The form with several nodes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManyNodes {
    snapshots: Vec<NodeSnapshot>,
}

/// A resource that nebucloud-xds serves as the bytes it was given. (xds-core has an
/// `AnyResource` that does this, but does not export it.)
#[derive(Debug)]
struct RawResource {
    name: String,
    any: prost_types::Any,
}

impl Resource for RawResource {
    fn type_url(&self) -> &str {
        &self.any.type_url
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn encode(&self) -> Result<prost_types::Any, Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.any.clone())
    }

    fn as_any(&self) -> &dyn StdAny {
        self
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    // nebucloud-xds logs through `tracing`; stderr only, since stdout carries the one line that
    // tests wait for. Warnings by default, which include the NACKs it receives.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xds-snapshot-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    // Everything that can be wrong with the file is found before listening, so a test sees the
    // error instead of a server that answers nothing.
    let snapshots = load_snapshots(&args.snapshot)
        .with_context(|| format!("snapshot file {}", args.snapshot.display()))?;
    let cache = Arc::new(ShardedCache::new());
    for (node_id, snapshot) in snapshots {
        cache.set_snapshot(NodeHash::from_id(&node_id), snapshot);
    }
    let server = XdsServerBuilder::new()
        .cache(cache)
        .enable_sotw()
        .enable_delta()
        .disable_metrics()
        .build()
        .context("building the nebucloud-xds server")?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(serve(server, &args.listen))
}

async fn serve(server: XdsServer, listen: &str) -> Result<()> {
    // Handlers first, so that a signal sent as soon as the address is printed is not lost.
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let router = router(&server).await;

    // On a signal the server stops at once rather than drain: clients keep their ADS streams
    // open for good, so a graceful shutdown would wait for them (nebucloud-xds's own `serve`
    // waits a 30 s grace period).
    if let Some(path) = listen.strip_prefix("unix:") {
        if path.is_empty() {
            bail!("--listen unix: needs a path");
        }
        let listener =
            UnixListener::bind(path).with_context(|| format!("binding the Unix socket {path}"))?;
        announce(&format!("unix:{path}"))?;
        let result = tokio::select! {
            r = router.serve_with_incoming(UnixListenerStream::new(listener)) => {
                r.context("serving")
            }
            _ = sigterm.recv() => Ok(()),
            _ = sigint.recv() => Ok(()),
        };
        // Leave no socket file behind, so the same path can be used again.
        let _ = std::fs::remove_file(path);
        result
    } else {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen} (expected HOST:PORT or unix:PATH)"))?;
        let addr = listener.local_addr().context("reading the bound address")?;
        // TCP_NODELAY as tonic's own listener sets it: xDS messages are small and a reply held
        // back by Nagle would wait for the peer's delayed ACK.
        let incoming = TcpIncoming::from_listener(listener, true, None)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("setting up the TCP listener")?;
        announce(&addr.to_string())?;
        tokio::select! {
            r = router.serve_with_incoming(incoming) => r.context("serving"),
            _ = sigterm.recv() => Ok(()),
            _ = sigint.recv() => Ok(()),
        }
    }
}

/// The services and settings of nebucloud-xds's own `XdsServer::serve`, on a listener of ours.
async fn router(server: &XdsServer) -> Router {
    let config = server.config();
    let (ads, cds, lds, rds, eds, sds) = server.service_state().create_services();
    let mut builder = Server::builder()
        .http2_keepalive_interval(config.keepalive_interval)
        .http2_keepalive_timeout(config.keepalive_timeout);
    if let Some(max) = config.max_concurrent_streams {
        builder = builder.concurrency_limit_per_connection(max as usize);
    }
    let (health, health_svc) = HealthService::new();
    health.set_all_serving().await;
    builder
        .add_service(ads.into_service())
        .add_service(cds.into_service())
        .add_service(lds.into_service())
        .add_service(rds.into_service())
        .add_service(eds.into_service())
        .add_service(sds.into_service())
        .add_service(health_svc)
}

/// The one line on stdout, flushed: tests read it to learn the address (and that it is ready).
fn announce(addr: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on {addr}")
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

/// Reads and checks the file; returns each node id with its snapshot.
fn load_snapshots(path: &Path) -> Result<Vec<(String, Snapshot)>> {
    let text = std::fs::read_to_string(path).context("reading")?;
    let value: serde_json::Value = serde_json::from_str(&text).context("parsing JSON")?;
    // Parsed again as the chosen form (from the text, so errors carry line and column).
    let nodes = if value.get("snapshots").is_some() {
        serde_json::from_str::<ManyNodes>(&text)
            .context("parsing {\"snapshots\": [...]}")?
            .snapshots
    } else {
        vec![serde_json::from_str::<NodeSnapshot>(&text).context("parsing the snapshot")?]
    };
    if nodes.is_empty() {
        bail!("\"snapshots\" is empty");
    }
    let mut seen_nodes = HashSet::new();
    let mut out = Vec::with_capacity(nodes.len());
    for node in nodes {
        if !seen_nodes.insert(node.node_id.clone()) {
            bail!("node_id {:?} appears twice", node.node_id);
        }
        let node_id = node.node_id.clone();
        let snapshot = build_snapshot(node).with_context(|| format!("node_id {node_id:?}"))?;
        out.push((node_id, snapshot));
    }
    Ok(out)
}

fn build_snapshot(node: NodeSnapshot) -> Result<Snapshot> {
    if node.node_id.is_empty() {
        bail!("node_id is empty");
    }
    // nebucloud-xds takes a request whose version equals the snapshot's as "up to date", and
    // a client's first request carries an empty version: an empty snapshot version would be
    // sent again after every ACK.
    if node.version.is_empty() {
        bail!("version is empty");
    }
    let mut by_type: BTreeMap<String, Vec<BoxResource>> = BTreeMap::new();
    let mut seen = HashSet::new();
    for (i, r) in node.resources.into_iter().enumerate() {
        let at = || format!("resources[{i}] ({:?})", r.name);
        if r.type_url.is_empty() {
            bail!("{}: type_url is empty", at());
        }
        if r.name.is_empty() {
            bail!("{}: name is empty", at());
        }
        if !seen.insert((r.type_url.clone(), r.name.clone())) {
            bail!(
                "{}: a second resource of {} with this name",
                at(),
                r.type_url
            );
        }
        let value = base64::engine::general_purpose::STANDARD
            .decode(r.value.as_bytes())
            .with_context(|| format!("{}: value is not valid base64", at()))?;
        let resource = RawResource {
            name: r.name,
            any: prost_types::Any {
                type_url: r.type_url.clone(),
                value,
            },
        };
        by_type
            .entry(r.type_url)
            .or_default()
            .push(Arc::new(resource) as BoxResource);
    }
    for t in node.empty_types {
        if t.is_empty() {
            bail!("empty_types: a type_url is empty");
        }
        if by_type.contains_key(&t) {
            bail!("empty_types: {t} also has resources");
        }
        by_type.insert(t, Vec::new());
    }
    // One call per type: the builder replaces, not merges, a type given twice.
    let mut builder = Snapshot::builder().version(node.version);
    for (type_url, resources) in by_type {
        builder = builder.resources(TypeUrl::new(type_url), resources);
    }
    Ok(builder.build())
}
