//! `shuntd`, Shunt's node service.
//!
//! - [`config`]: the YAML configuration and its built-in default.
//! - [`app_server`]: the attach socket and the worker threads apps are pinned to.
//! - [`link`]: how the session layer reaches an attached app worker, never blocking on it.
//! - [`control`]: the gRPC control API, and [`control_access`]: who may call it.
//! - [`metrics`]: Prometheus metrics, and [`log_throttle`]: log lines an app can provoke,
//!   written once per interval.
//! - [`background`]: shuntd on a thread of its own, for programs that embed it.
//!
//! [`build`] assembles them and returns what it bound, so tests can run a whole daemon
//! in-process on temporary paths.

pub mod app_server;
pub mod background;
pub mod config;
pub mod control;
pub mod control_access;
pub mod link;
pub mod log_throttle;
pub mod metrics;
mod reactor;
pub mod sidecar_usage;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context;
use shunt_proto::control::control_server::ControlServer;
use shunt_session::namespace::Namespace;
use shunt_session::{SessionLayer, SessionLayerConfig};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::interceptor::InterceptedService;

use crate::app_server::{AppServer, AppServerConfig, ServerCounters};
use crate::config::{Config, RuleScopeSection};
use crate::control_access::ControlAccess;

/// A running daemon.
pub struct Bound {
    pub layer: Arc<SessionLayer>,
    pub metrics: Arc<metrics::Metrics>,
    /// Where `/metrics` is served, if enabled.
    pub metrics_address: Option<SocketAddr>,
    tasks: tokio::task::JoinSet<()>,
}

impl Bound {
    /// Runs until one of the daemon's services stops, which only an error does.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        if let Some(done) = self.tasks.join_next().await {
            done.context("a shuntd service stopped")?;
        }
        anyhow::bail!("a shuntd service stopped")
    }
}

/// Builds the session layer from `config` and starts every service. Must run inside a tokio
/// runtime, which will host the control plane (gRPC, metrics, accept loop).
pub async fn build(config: &Config) -> anyhow::Result<Bound> {
    raise_fd_limit();
    let layer = Arc::new(SessionLayer::new(SessionLayerConfig {
        cut_through: config.cut_through(),
        pair_timeout: std::time::Duration::from_millis(config.pair_timeout_ms),
        limits: config.limits(),
        daemon_uid: rustix::process::geteuid().as_raw(),
    }));
    for ns in &config.namespaces {
        let n = Namespace::new(&ns.id, ns.secret.as_bytes(), ns.address)
            .with_context(|| format!("namespace `{}`", ns.id))?
            .with_access(ns.access());
        layer.add_namespace(n, false)?;
    }
    for (i, r) in config.rules.iter().enumerate() {
        let rule = r
            .to_rule()
            .map_err(|(f, e)| anyhow::anyhow!("rules[{i}].{f}: {e}"))?;
        let ns = match r.scope {
            RuleScopeSection::Global => None,
            RuleScopeSection::Local => r.namespace.as_deref(),
        };
        layer
            .add_rule(ns, rule)
            .with_context(|| format!("rules[{i}]"))?;
    }

    let counters = Arc::new(ServerCounters::default());
    let workers = config.worker_count();
    let server = Arc::new(AppServer::start(
        workers,
        layer.clone(),
        counters.clone(),
        AppServerConfig {
            event_queue_len: config.event_queue_len,
            unattached: config.unattached(),
        },
    )?);
    let app_listener = app_server::bind_seqpacket(&config.app_socket)
        .with_context(|| format!("app socket {}", config.app_socket.display()))?;
    set_mode(&config.app_socket, APP_SOCKET_MODE)?;

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(async move {
        if let Err(e) = server.accept_loop(app_listener).await {
            tracing::error!(error = %e, "app socket failed");
        }
    });

    if let Some(dir) = config.control_socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(&config.control_socket);
    let control_listener = tokio::net::UnixListener::bind(&config.control_socket)
        .with_context(|| format!("control socket {}", config.control_socket.display()))?;
    let access = ControlAccess::new(&config.control_clients, rustix::process::geteuid().as_raw());
    set_mode(&config.control_socket, access.socket_mode())?;
    let control = control::ControlService::new(layer.clone(), workers);
    let refusals = counters.clone();
    let access = access.interceptor(move |reason| {
        refusals.control_refusals.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(reason, "control call refused");
    });
    tasks.spawn(async move {
        let r = tonic::transport::Server::builder()
            .add_service(InterceptedService::new(
                ControlServer::new(control).max_decoding_message_size(CONTROL_MESSAGE_LIMIT),
                access,
            ))
            .serve_with_incoming(UnixListenerStream::new(control_listener))
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "control API failed");
        }
    });

    // A pairing offer whose other end never comes is answered when it expires.
    let expiring = layer.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(PAIR_EXPIRY_TICK);
        loop {
            tick.tick().await;
            expiring.expire_pair_offers();
        }
    });

    let metrics = Arc::new(metrics::Metrics::new(layer.clone(), counters)?);
    let mut metrics_address = None;
    if !config.metrics_address.is_empty() {
        let listener = tokio::net::TcpListener::bind(&config.metrics_address)
            .await
            .with_context(|| format!("metrics address {}", config.metrics_address))?;
        metrics_address = Some(listener.local_addr()?);
        let m = metrics.clone();
        tasks.spawn(async move {
            if let Err(e) = metrics::serve(m, listener).await {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        });
    }
    tracing::info!(
        app_socket = %config.app_socket.display(),
        control_socket = %config.control_socket.display(),
        metrics = ?metrics_address,
        workers,
        "shuntd ready"
    );
    Ok(Bound {
        layer,
        metrics,
        metrics_address,
        tasks,
    })
}

pub use shunt_proto::CONTROL_MESSAGE_LIMIT;

/// How often waiting pairing offers are checked for expiry.
const PAIR_EXPIRY_TICK: std::time::Duration = std::time::Duration::from_millis(250);

/// Apps in other containers attach as other users; namespaces (their secrets, and the users
/// they admit, checked against each caller's kernel credentials), not file modes, decide who
/// gets in.
const APP_SOCKET_MODE: u32 = 0o777;

/// Every attached worker and segment holds descriptors; the soft limit is often far below
/// what the system allows a service (the hard limit). Raising it is what service managers do
/// for daemons; failing to is only logged, and the limits in the configuration still hold.
fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    // `None` is unlimited.
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(error = %e, "cannot raise the file descriptor limit");
        }
    }
}

fn set_mode(path: &std::path::Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}
