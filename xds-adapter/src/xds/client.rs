//! One xDS stream (ADS, or SDS on its own socket), SotW or Delta, kept up across failures.
//!
//! Every response is checked whole before anything of it is accepted: one invalid resource
//! NACKs the response, with every `name: reason` in the error detail, and the last good state
//! stays. Reconnects claim what was accepted (`initial_resource_versions` for Delta, the last
//! version for SotW), so a server can resume instead of resending.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::backoff::Backoff;
use super::state::{Change, Rejection, State, error_detail};
use super::transport::{Target, TlsFiles, TransportError, connect};
use crate::metrics::Metrics;
use crate::resource::{Resource, ResourceType};

/// Istio pushes whole meshes in one response; ztunnel allows 200 MiB.
const MAX_MESSAGE_BYTES: usize = 200 << 20;
/// gRPC INVALID_ARGUMENT, what Envoy puts in a NACK's error detail.
const INVALID_ARGUMENT: i32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// State of the world: every response carries a type's whole set.
    Sotw,
    /// Incremental: responses carry changes and removals.
    Delta,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `AggregatedDiscoveryService`: all types on one stream.
    Aggregated,
    /// `SecretDiscoveryService`: secrets only (pilot-agent's SDS socket).
    Secrets,
}

#[derive(Debug, Clone)]
pub struct StreamConfig {
    pub target: Target,
    pub tls: Option<TlsFiles>,
    pub protocol: Protocol,
    pub api: Api,
    pub node: Node,
    /// Secret names to ask for (Istio: `default` and `ROOTCA`).
    pub secrets: Vec<String>,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Sent as `authorization: Bearer TOKEN`, read again on every connect because projected
    /// service-account tokens rotate (istiod authenticates sidecars this way on port 15012).
    pub token_file: Option<PathBuf>,
    /// Extra request headers, such as Istio's `clusterid`.
    pub headers: Vec<(String, String)>,
}

impl StreamConfig {
    /// `body` as a request carrying the configured credentials and headers.
    fn request<T>(&self, body: T) -> Result<tonic::Request<T>, StreamError> {
        let mut request = tonic::Request::new(body);
        let metadata = request.metadata_mut();
        let bad = |name: &str| StreamError::Header(name.to_owned());
        for (name, value) in &self.headers {
            let key =
                tonic::metadata::MetadataKey::from_bytes(name.to_ascii_lowercase().as_bytes())
                    .map_err(|_| bad(name))?;
            metadata.insert(key, value.parse().map_err(|_| bad(name))?);
        }
        if let Some(path) = &self.token_file {
            let token =
                std::fs::read_to_string(path).map_err(|e| StreamError::Token(path.clone(), e))?;
            let value = format!("Bearer {}", token.trim())
                .parse()
                .map_err(|_| bad("authorization"))?;
            metadata.insert("authorization", value);
        }
        Ok(request)
    }

    fn types(&self) -> &'static [ResourceType] {
        match self.api {
            Api::Aggregated => &ResourceType::ALL,
            Api::Secrets => &[ResourceType::Secret],
        }
    }

    fn label(&self) -> &'static str {
        match self.api {
            Api::Aggregated => "ads",
            Api::Secrets => "sds",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Connect(#[from] TransportError),
    #[error("server: {0}")]
    Status(#[from] tonic::Status),
    #[error("server closed the stream")]
    Closed,
    #[error("reading the token {0}: {1}")]
    Token(PathBuf, std::io::Error),
    #[error("header `{0}` is not a valid gRPC metadata entry")]
    Header(String),
}

impl StreamError {
    fn reason(&self) -> &'static str {
        match self {
            StreamError::Connect(_) => "connect",
            StreamError::Status(s) => match s.code() {
                tonic::Code::Unavailable => "unavailable",
                tonic::Code::Cancelled => "cancelled",
                tonic::Code::DeadlineExceeded => "deadline",
                tonic::Code::Unknown => "unknown",
                _ => "status",
            },
            StreamError::Closed => "closed",
            StreamError::Token(..) | StreamError::Header(_) => "credentials",
        }
    }
}

/// Runs the stream until the process ends, reconnecting with backoff.
pub async fn run(config: StreamConfig, state: Arc<State>) {
    let mut backoff = Backoff::new(config.backoff_initial, config.backoff_max);
    loop {
        let mut progressed = false;
        let result = session(&config, &state, &mut progressed).await;
        state.metrics().connected(config.label(), false);
        let error = match result {
            Ok(()) => StreamError::Closed,
            Err(e) => e,
        };
        state.metrics().terminated(error.reason());
        if progressed {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        tracing::warn!(stream = config.label(), target = %config.target, %error, ?delay, "xDS stream ended; reconnecting");
        tokio::time::sleep(delay).await;
    }
}

async fn session(
    config: &StreamConfig,
    state: &State,
    progressed: &mut bool,
) -> Result<(), StreamError> {
    let channel = connect(&config.target, config.tls.as_ref()).await?;
    match config.protocol {
        Protocol::Sotw => sotw(channel, config, state, progressed).await,
        Protocol::Delta => delta(channel, config, state, progressed).await,
    }
}

/// What the adapter wants of a type: every resource, or these names.
fn wanted(kind: ResourceType, config: &StreamConfig, state: &State) -> Option<BTreeSet<String>> {
    match kind {
        ResourceType::Cluster | ResourceType::Listener => None,
        ResourceType::Endpoints => Some(state.eds_names()),
        ResourceType::Secret => Some(config.secrets.iter().cloned().collect()),
    }
}

/// The first request of each type a stream sends, with the names it asks for (empty: every
/// resource of a wildcard type), recorded in `asked`. A named type with no names yet is left
/// out: an empty name list would mean "everything" to a SotW server, and Delta waits alike
/// until names exist.
fn initial_subscriptions(
    config: &StreamConfig,
    state: &State,
    asked: &mut HashMap<ResourceType, BTreeSet<String>>,
) -> Vec<(ResourceType, BTreeSet<String>)> {
    let mut out = Vec::new();
    for &kind in config.types() {
        let names = wanted(kind, config, state);
        if names.as_ref().is_some_and(BTreeSet::is_empty) {
            continue;
        }
        let names = names.unwrap_or_default();
        asked.insert(kind, names.clone());
        out.push((kind, names));
    }
    out
}

/// Decodes a response's resources, or says why each bad one is refused (counted in
/// `shunt_xds_translation_errors_total` as `undecodable` or `misnamed`).
fn decode_all(
    kind: ResourceType,
    metrics: &Metrics,
    items: impl Iterator<
        Item = (
            String,
            Option<envoy_types::pb::google::protobuf::Any>,
            String,
        ),
    >,
) -> Result<Vec<(Resource, String)>, Vec<Rejection>> {
    let mut ok = Vec::new();
    let mut rejections = Vec::new();
    for (name, any, version) in items {
        let decoded = any
            .ok_or_else(|| "no resource body".to_owned())
            .and_then(|any| Resource::from_any(kind, &any).map_err(|e| e.to_string()));
        match decoded {
            Ok(r) if name.is_empty() || r.name() == name => ok.push((r, version)),
            Ok(r) => {
                metrics.translation_error("misnamed");
                rejections.push(Rejection {
                    name,
                    reason: format!("carries a resource named `{}`", r.name()),
                });
            }
            Err(reason) => {
                metrics.translation_error("undecodable");
                rejections.push(Rejection { name, reason });
            }
        }
    }
    if rejections.is_empty() {
        Ok(ok)
    } else {
        Err(rejections)
    }
}

/// How the endpoint assignments asked for changed after an update of the clusters.
struct EndpointChange {
    now: BTreeSet<String>,
    added: Vec<String>,
    dropped: Vec<String>,
}

/// New clusters may need other endpoint assignments: what to ask for now, or `None` when it is
/// what was asked for already. Assignments no longer asked for are gone for us at once, even if
/// the server says nothing more about them.
fn resubscribe_endpoints(
    config: &StreamConfig,
    state: &State,
    asked: &mut HashMap<ResourceType, BTreeSet<String>>,
) -> Option<EndpointChange> {
    if !config.types().contains(&ResourceType::Endpoints) {
        return None;
    }
    let now = state.eds_names();
    let before = asked
        .get(&ResourceType::Endpoints)
        .cloned()
        .unwrap_or_default();
    let added: Vec<String> = now.difference(&before).cloned().collect();
    let dropped: Vec<String> = before.difference(&now).cloned().collect();
    if added.is_empty() && dropped.is_empty() {
        return None;
    }
    asked.insert(ResourceType::Endpoints, now.clone());
    if !dropped.is_empty() {
        let removal = Change {
            removals: dropped.clone(),
            ..Default::default()
        };
        // Removals alone are never refused: there is nothing to check.
        let _ = state.apply(ResourceType::Endpoints, removal);
    }
    Some(EndpointChange {
        now,
        added,
        dropped,
    })
}

/// The response's type, or the NACK for a type nobody asked for.
fn subscribed(
    config: &StreamConfig,
    state: &State,
    type_url: &str,
) -> Result<ResourceType, RpcStatus> {
    ResourceType::from_type_url(type_url)
        .filter(|k| config.types().contains(k))
        .ok_or_else(|| {
            state.metrics().translation_error("unknown_type");
            tracing::warn!(%type_url, "NACK: a type this adapter did not ask for");
            RpcStatus {
                code: INVALID_ARGUMENT,
                message: "type not subscribed".into(),
                details: Vec::new(),
            }
        })
}

/// Logs and counts the outcome of a response; the error detail its reply carries.
fn verdict(
    state: &State,
    kind: ResourceType,
    version: &str,
    outcome: Result<(), Vec<Rejection>>,
) -> Option<RpcStatus> {
    match outcome {
        Ok(()) => {
            tracing::info!(%kind, %version, "ACK");
            None
        }
        Err(rejections) => {
            state.metrics().update(kind, false);
            tracing::warn!(%kind, %version, detail = %error_detail(&rejections), "NACK");
            Some(nack_status(&rejections))
        }
    }
}

fn nack_status(rejections: &[Rejection]) -> RpcStatus {
    RpcStatus {
        code: INVALID_ARGUMENT,
        message: error_detail(rejections),
        details: Vec::new(),
    }
}

async fn sotw(
    channel: Channel,
    config: &StreamConfig,
    state: &State,
    progressed: &mut bool,
) -> Result<(), StreamError> {
    let (tx, rx) = mpsc::channel::<DiscoveryRequest>(64);
    let requests = ReceiverStream::new(rx);
    let mut responses = match config.api {
        Api::Aggregated => AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .stream_aggregated_resources(config.request(requests)?)
            .await?
            .into_inner(),
        Api::Secrets => SecretDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .stream_secrets(config.request(requests)?)
            .await?
            .into_inner(),
    };
    state.metrics().connected(config.label(), true);

    // Per type: the last accepted version and nonce, and the names asked for.
    let mut versions: HashMap<ResourceType, String> = HashMap::new();
    let mut nonces: HashMap<ResourceType, String> = HashMap::new();
    let mut asked: HashMap<ResourceType, BTreeSet<String>> = HashMap::new();
    let mut node = Some(config.node.clone());
    let send = |req: DiscoveryRequest| {
        let tx = tx.clone();
        async move { tx.send(req).await.map_err(|_| StreamError::Closed) }
    };
    for (kind, names) in initial_subscriptions(config, state, &mut asked) {
        send(DiscoveryRequest {
            node: node.take(),
            type_url: kind.type_url().into(),
            resource_names: names.into_iter().collect(),
            ..Default::default()
        })
        .await?;
    }

    while let Some(response) = responses.message().await? {
        *progressed = true;
        let DiscoveryResponse {
            version_info,
            resources,
            type_url,
            nonce,
            ..
        } = response;
        let kind = match subscribed(config, state, &type_url) {
            Ok(kind) => kind,
            Err(nack) => {
                send(DiscoveryRequest {
                    type_url,
                    response_nonce: nonce,
                    error_detail: Some(nack),
                    ..Default::default()
                })
                .await?;
                continue;
            }
        };
        let names = asked.get(&kind).cloned().unwrap_or_default();
        let decoded = decode_all(
            kind,
            state.metrics(),
            resources
                .into_iter()
                .map(|any| (String::new(), Some(any), String::new())),
        );
        let outcome = decoded.and_then(|upserts| {
            let removals = if kind.is_wildcard() {
                Vec::new()
            } else {
                // Named types: only what is still asked for stays.
                let present: BTreeSet<&str> = upserts.iter().map(|(r, _)| r.name()).collect();
                state
                    .versions(kind)
                    .into_keys()
                    .filter(|n| !names.contains(n) && !present.contains(n.as_str()))
                    .collect()
            };
            state.apply(
                kind,
                Change {
                    upserts,
                    removals,
                    replace_all: kind.is_wildcard(),
                },
            )
        });
        if outcome.is_ok() {
            versions.insert(kind, version_info.clone());
        }
        let error_detail = verdict(state, kind, &version_info, outcome);
        nonces.insert(kind, nonce.clone());
        send(DiscoveryRequest {
            version_info: versions.get(&kind).cloned().unwrap_or_default(),
            type_url: kind.type_url().into(),
            resource_names: names.iter().cloned().collect(),
            response_nonce: nonce,
            error_detail,
            ..Default::default()
        })
        .await?;

        if kind == ResourceType::Cluster
            && let Some(change) = resubscribe_endpoints(config, state, &mut asked)
        {
            send(DiscoveryRequest {
                node: node.take(),
                version_info: versions
                    .get(&ResourceType::Endpoints)
                    .cloned()
                    .unwrap_or_default(),
                type_url: ResourceType::Endpoints.type_url().into(),
                resource_names: change.now.into_iter().collect(),
                response_nonce: nonces
                    .get(&ResourceType::Endpoints)
                    .cloned()
                    .unwrap_or_default(),
                ..Default::default()
            })
            .await?;
        }
    }
    Ok(())
}

async fn delta(
    channel: Channel,
    config: &StreamConfig,
    state: &State,
    progressed: &mut bool,
) -> Result<(), StreamError> {
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(64);
    let requests = ReceiverStream::new(rx);
    let mut responses = match config.api {
        Api::Aggregated => AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .delta_aggregated_resources(config.request(requests)?)
            .await?
            .into_inner(),
        Api::Secrets => SecretDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .delta_secrets(config.request(requests)?)
            .await?
            .into_inner(),
    };
    state.metrics().connected(config.label(), true);

    let mut asked: HashMap<ResourceType, BTreeSet<String>> = HashMap::new();
    let mut node = Some(config.node.clone());
    let send = |req: DeltaDiscoveryRequest| {
        let tx = tx.clone();
        async move { tx.send(req).await.map_err(|_| StreamError::Closed) }
    };
    for (kind, names) in initial_subscriptions(config, state, &mut asked) {
        // What was accepted before a reconnect: the server sends only what changed since.
        let initial_resource_versions: HashMap<String, String> =
            state.versions(kind).into_iter().collect();
        send(DeltaDiscoveryRequest {
            node: node.take(),
            type_url: kind.type_url().into(),
            resource_names_subscribe: names.into_iter().collect(),
            initial_resource_versions,
            ..Default::default()
        })
        .await?;
    }

    while let Some(response) = responses.message().await? {
        *progressed = true;
        let DeltaDiscoveryResponse {
            system_version_info,
            resources,
            type_url,
            removed_resources,
            nonce,
            ..
        } = response;
        let kind = match subscribed(config, state, &type_url) {
            Ok(kind) => kind,
            Err(nack) => {
                send(DeltaDiscoveryRequest {
                    type_url,
                    response_nonce: nonce,
                    error_detail: Some(nack),
                    ..Default::default()
                })
                .await?;
                continue;
            }
        };
        let decoded = decode_all(
            kind,
            state.metrics(),
            resources
                .into_iter()
                .map(|r| (r.name, r.resource, r.version)),
        );
        let outcome = decoded.and_then(|upserts| {
            state.apply(
                kind,
                Change {
                    upserts,
                    removals: removed_resources,
                    replace_all: false,
                },
            )
        });
        let error_detail = verdict(state, kind, &system_version_info, outcome);
        send(DeltaDiscoveryRequest {
            type_url: kind.type_url().into(),
            response_nonce: nonce,
            error_detail,
            ..Default::default()
        })
        .await?;

        if kind == ResourceType::Cluster
            && let Some(change) = resubscribe_endpoints(config, state, &mut asked)
        {
            send(DeltaDiscoveryRequest {
                node: node.take(),
                type_url: ResourceType::Endpoints.type_url().into(),
                resource_names_subscribe: change.added,
                resource_names_unsubscribe: change.dropped,
                ..Default::default()
            })
            .await?;
        }
    }
    Ok(())
}
