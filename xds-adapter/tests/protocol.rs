//! The xDS client's protocol against a scripted control plane: pushes, updates, removals,
//! NACKs that keep the last good state, resumption after a reconnect, and backoff.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryResponse, DiscoveryResponse, Resource as DeltaResource,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use shunt_xds::metrics::Metrics;
use shunt_xds::node::{NodeId, envoy_node};
use shunt_xds::resource::ResourceType;
use shunt_xds::tables::{Tables, TlsMode};
use shunt_xds::testing::mesh::{self, any};
use shunt_xds::translate::Context;
use shunt_xds::xds::{self, Api, Protocol, State, StreamConfig, Target};
use support::scripted_ads::{ScriptedAds, SotwConnection};

const ECHO: &str = "outbound|8080||echo.default.svc.cluster.local";
const OTHER: &str = "outbound|9090||other.default.svc.cluster.local";
const ECHO_SAN: &str = "spiffe://cluster.local/ns/default/sa/echo";

/// A service-account token, as a projected token file holds it.
fn token_file() -> std::path::PathBuf {
    let dir = tempfile::tempdir().unwrap().keep();
    let path = dir.join("istio-token");
    std::fs::write(&path, "t0k3n\n").unwrap();
    path
}

fn start(server: &ScriptedAds, protocol: Protocol) -> Arc<State> {
    let id = NodeId::sidecar("10.0.0.7".parse().unwrap(), "client-1", "default");
    let state = State::new(
        Context::new(format!("xds/{}", id.id), vec!["10.0.0.7".parse().unwrap()]),
        Arc::new(Metrics::default()),
    );
    let config = StreamConfig {
        target: Target::Tcp(format!("http://{}", server.address)),
        tls: None,
        protocol,
        api: Api::Aggregated,
        node: envoy_node(&id, &Default::default()),
        secrets: vec!["default".into(), "ROOTCA".into()],
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        token_file: Some(token_file()),
        headers: vec![("clusterid".into(), "Kubernetes".into())],
    };
    tokio::spawn(xds::run(config, state.clone()));
    state
}

async fn wait_for(state: &State, what: &str, ok: impl Fn(&Tables) -> bool) -> Arc<Tables> {
    let mut rx = state.subscribe();
    let result = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|t| ok(t))).await;
    match result {
        Ok(Ok(t)) => t.clone(),
        _ => panic!(
            "timed out waiting for {what}; tables: {:#?}",
            state.tables()
        ),
    }
}

fn delta_response(
    kind: ResourceType,
    nonce: &str,
    resources: Vec<(&str, &str, Any)>,
    removed: &[&str],
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: kind.type_url().into(),
        nonce: nonce.into(),
        resources: resources
            .into_iter()
            .map(|(name, version, resource)| DeltaResource {
                name: name.into(),
                version: version.into(),
                resource: Some(resource),
                ..Default::default()
            })
            .collect(),
        removed_resources: removed.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn delta_push_update_remove_nack_and_resume() {
    let mut server = ScriptedAds::start().await;
    let state = start(&server, Protocol::Delta);
    let mut conn = server.next_delta().await;
    let header = |name: &str| {
        conn.metadata
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(header("authorization").as_deref(), Some("Bearer t0k3n"));
    assert_eq!(header("clusterid").as_deref(), Some("Kubernetes"));

    // Initial requests: wildcard CDS and LDS, named secrets; the node goes once.
    let mut initial = Vec::new();
    for _ in 0..3 {
        initial.push(conn.next().await);
    }
    assert_eq!(
        initial[0].node.as_ref().map(|n| n.id.as_str()),
        Some("sidecar~10.0.0.7~client-1.default~default.svc.cluster.local")
    );
    assert!(initial[1..].iter().all(|r| r.node.is_none()));
    let urls: Vec<&str> = initial.iter().map(|r| r.type_url.as_str()).collect();
    assert_eq!(
        urls,
        [
            ResourceType::Cluster.type_url(),
            ResourceType::Listener.type_url(),
            ResourceType::Secret.type_url()
        ]
    );
    assert_eq!(initial[2].resource_names_subscribe, ["ROOTCA", "default"]);

    // Push: an EDS cluster and a static one.
    conn.send(delta_response(
        ResourceType::Cluster,
        "n1",
        vec![
            (ECHO, "c1", any(&mesh::mesh_cluster(ECHO, ECHO_SAN))),
            (
                OTHER,
                "c1",
                any(&mesh::static_cluster(OTHER, "10.0.0.9", 9090)),
            ),
        ],
        &[],
    ))
    .await;
    let ack = conn.next().await;
    assert_eq!(
        (ack.response_nonce.as_str(), ack.error_detail.is_none()),
        ("n1", true)
    );
    let eds = conn.next().await;
    assert_eq!(eds.type_url, ResourceType::Endpoints.type_url());
    assert_eq!(eds.resource_names_subscribe, [ECHO]);
    let t = wait_for(&state, "two services", |t| t.services.len() == 2).await;
    let echo = t.services.iter().find(|s| s.cluster == ECHO).unwrap();
    assert_eq!(echo.tls_mode, TlsMode::Istio);
    assert_eq!(echo.expected_identities.len(), 1);

    // Endpoints arrive for the EDS cluster.
    conn.send(delta_response(
        ResourceType::Endpoints,
        "n2",
        vec![(
            ECHO,
            "e1",
            any(&mesh::assignment(
                ECHO,
                &[("10.0.0.5", 8080, true), ("10.0.0.6", 8080, false)],
            )),
        )],
        &[],
    ))
    .await;
    assert!(conn.next().await.error_detail.is_none());
    let t = wait_for(&state, "echo endpoints", |t| {
        t.services
            .iter()
            .any(|s| s.cluster == ECHO && s.endpoints.len() == 2)
    })
    .await;
    let echo = t.services.iter().find(|s| s.cluster == ECHO).unwrap();
    assert_eq!(echo.endpoints[0].tls_mode, TlsMode::Istio);
    assert_eq!(echo.endpoints[1].tls_mode, TlsMode::Disabled);

    // An invalid update is NACKed with its name and reason, and nothing of it is applied.
    let mut broken = mesh::mesh_cluster(ECHO, "spiffe://cluster.local/ns/default/sa/changed");
    if let Some(
        envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(a),
    ) = broken.transport_socket_matches[0]
        .transport_socket
        .as_mut()
        .unwrap()
        .config_type
        .as_mut()
    {
        a.value = vec![0x0a, 0xff]; // a truncated UpstreamTlsContext
    }
    conn.send(delta_response(
        ResourceType::Cluster,
        "n3",
        vec![
            (ECHO, "c2", any(&broken)),
            (
                OTHER,
                "c2",
                any(&mesh::static_cluster(OTHER, "10.0.0.10", 9090)),
            ),
        ],
        &[],
    ))
    .await;
    let nack = conn.next().await;
    assert_eq!(nack.response_nonce, "n3");
    let detail = nack.error_detail.expect("a NACK").message;
    assert!(
        detail.contains(ECHO) && detail.contains("UpstreamTlsContext"),
        "{detail}"
    );
    let t = state.tables();
    let other = t.services.iter().find(|s| s.cluster == OTHER).unwrap();
    assert_eq!(
        other.endpoints[0].address, "10.0.0.9:9090",
        "the last good state stays"
    );

    // A removal.
    conn.send(delta_response(
        ResourceType::Cluster,
        "n4",
        vec![],
        &[OTHER],
    ))
    .await;
    assert!(conn.next().await.error_detail.is_none());
    wait_for(&state, "OTHER removed", |t| {
        t.services.iter().all(|s| s.cluster != OTHER)
    })
    .await;

    // A Delta resource whose body names another resource is refused, and counted.
    conn.send(delta_response(
        ResourceType::Cluster,
        "n5",
        vec![(
            OTHER,
            "c3",
            any(&mesh::static_cluster("impostor", "10.0.0.11", 9090)),
        )],
        &[],
    ))
    .await;
    let detail = conn.next().await.error_detail.expect("a NACK").message;
    assert!(
        detail.contains("carries a resource named `impostor`"),
        "{detail}"
    );
    let metrics = state.metrics().render();
    assert!(
        metrics.contains("shunt_xds_translation_errors_total{reason=\"misnamed\"} 1"),
        "{metrics}"
    );
    assert!(state.tables().services.iter().all(|s| s.cluster != OTHER));

    // The server goes away; the client keeps what it accepted and comes back claiming it.
    drop(conn);
    let mut conn = server.next_delta().await;
    let kept = state.tables();
    assert!(
        kept.services
            .iter()
            .any(|s| s.cluster == ECHO && s.endpoints.len() == 2),
        "the last good state survives the stream: {kept:#?}"
    );
    let first = conn.next().await;
    assert_eq!(first.type_url, ResourceType::Cluster.type_url());
    assert_eq!(
        first
            .initial_resource_versions
            .get(ECHO)
            .map(String::as_str),
        Some("c1"),
        "the NACKed version is not claimed"
    );
    assert!(!first.initial_resource_versions.contains_key(OTHER));
    let mut eds_resumed = None;
    for _ in 0..3 {
        let r = conn.next().await;
        if r.type_url == ResourceType::Endpoints.type_url() {
            eds_resumed = Some(r);
        }
    }
    let eds_resumed = eds_resumed.expect("endpoints resubscribed on reconnect");
    assert_eq!(eds_resumed.resource_names_subscribe, [ECHO]);
    assert_eq!(
        eds_resumed
            .initial_resource_versions
            .get(ECHO)
            .map(String::as_str),
        Some("e1")
    );
}

fn sotw_response(
    kind: ResourceType,
    version: &str,
    nonce: &str,
    resources: Vec<Any>,
) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: version.into(),
        type_url: kind.type_url().into(),
        nonce: nonce.into(),
        resources,
        ..Default::default()
    }
}

/// A fresh client's SotW stream, past its initial requests (CDS, LDS and the secrets).
async fn sotw_subscribed(server: &mut ScriptedAds) -> (Arc<State>, SotwConnection) {
    let state = start(server, Protocol::Sotw);
    let mut conn = server.next_sotw().await;
    for _ in 0..3 {
        conn.next().await;
    }
    (state, conn)
}

#[tokio::test]
async fn sotw_versions_nonces_and_implicit_removal() {
    let mut server = ScriptedAds::start().await;
    let (state, mut conn) = sotw_subscribed(&mut server).await;
    conn.send(sotw_response(
        ResourceType::Cluster,
        "v1",
        "a",
        vec![
            any(&mesh::static_cluster(ECHO, "10.0.0.5", 8080)),
            any(&mesh::static_cluster(OTHER, "10.0.0.9", 9090)),
        ],
    ))
    .await;
    let ack = conn.next().await;
    assert_eq!(
        (ack.version_info.as_str(), ack.response_nonce.as_str()),
        ("v1", "a")
    );
    assert!(ack.error_detail.is_none());
    wait_for(&state, "two services", |t| t.services.len() == 2).await;

    // Unknown type, malformed bytes, an oversized resource: each NACKed, state kept.
    conn.send(sotw_response(
        ResourceType::Cluster,
        "v2",
        "b",
        vec![Any {
            type_url: "type.googleapis.com/istio.workload.Address".into(),
            value: vec![],
        }],
    ))
    .await;
    let nack = conn.next().await;
    assert_eq!(
        (nack.version_info.as_str(), nack.response_nonce.as_str()),
        ("v1", "b")
    );
    assert!(
        nack.error_detail
            .unwrap()
            .message
            .contains("unknown type URL")
    );

    conn.send(sotw_response(
        ResourceType::Cluster,
        "v3",
        "c",
        vec![Any {
            type_url: ResourceType::Cluster.type_url().into(),
            value: vec![0x0a, 0x10, b'x'],
        }],
    ))
    .await;
    let nack = conn.next().await;
    assert_eq!(nack.version_info, "v1");
    assert!(nack.error_detail.unwrap().message.contains("malformed"));

    let mut big = mesh::static_cluster("big", "10.0.0.1", 1);
    big.alt_stat_name = "x".repeat(shunt_xds::resource::MAX_RESOURCE_BYTES);
    conn.send(sotw_response(
        ResourceType::Cluster,
        "v4",
        "d",
        vec![any(&big)],
    ))
    .await;
    let nack = conn.next().await;
    assert!(nack.error_detail.unwrap().message.contains("limit"));

    conn.send(DiscoveryResponse {
        type_url: "type.googleapis.com/envoy.config.route.v3.RouteConfiguration".into(),
        nonce: "e".into(),
        ..Default::default()
    })
    .await;
    let nack = conn.next().await;
    assert_eq!(nack.response_nonce, "e");
    assert!(nack.error_detail.is_some());
    // Each refused resource is counted: three that did not decode as clusters (another type,
    // malformed bytes, too big), then a response of a type the adapter does not handle.
    let metrics = state.metrics().render();
    for series in [
        "shunt_xds_translation_errors_total{reason=\"undecodable\"} 3",
        "shunt_xds_translation_errors_total{reason=\"unknown_type\"} 1",
    ] {
        assert!(metrics.contains(series), "no `{series}` in\n{metrics}");
    }
    assert_eq!(
        state.tables().services.len(),
        2,
        "the last good state stays"
    );

    // SotW: a type's whole set; what is missing is removed.
    conn.send(sotw_response(
        ResourceType::Cluster,
        "v5",
        "f",
        vec![any(&mesh::static_cluster(ECHO, "10.0.0.5", 8080))],
    ))
    .await;
    let ack = conn.next().await;
    assert_eq!(
        (ack.version_info.as_str(), ack.error_detail.is_none()),
        ("v5", true)
    );
    wait_for(&state, "OTHER gone", |t| t.services.len() == 1).await;
}

#[tokio::test]
async fn reconnects_after_a_mid_stream_close_with_growing_backoff() {
    let mut server = ScriptedAds::start().await;
    let _state = start(&server, Protocol::Delta);
    let mut accepted = Vec::new();
    for _ in 0..4 {
        let conn = server.next_delta().await;
        accepted.push(Instant::now());
        // Fails the stream mid-way, before any response: no progress, so the backoff grows.
        conn.responses
            .send(Err(tonic::Status::unavailable("going away")))
            .await
            .ok();
    }
    let gaps: Vec<Duration> = accepted.windows(2).map(|w| w[1] - w[0]).collect();
    // Full jitter draws from [ceiling/2, ceiling]: ceilings 50, 100, 200 ms.
    for (gap, floor_ms) in gaps.iter().zip([25u64, 50, 100]) {
        assert!(*gap >= Duration::from_millis(floor_ms), "gaps {gaps:?}");
    }
}

#[test]
fn nack_detail_is_bounded() {
    use shunt_xds::xds::state::{Rejection, error_detail};
    let many: Vec<Rejection> = (0..10_000)
        .map(|i| Rejection {
            name: format!("r{i}"),
            reason: "bad".into(),
        })
        .collect();
    let detail = error_detail(&many);
    assert!(detail.len() <= 4096 + 5 && detail.ends_with("..."));
    let _ = Message::encode_to_vec(&Any::default());
}

#[tokio::test]
async fn sotw_forgets_the_endpoints_of_a_removed_cluster() {
    let mut server = ScriptedAds::start().await;
    let (state, mut conn) = sotw_subscribed(&mut server).await;
    conn.send(sotw_response(
        ResourceType::Cluster,
        "c1",
        "a",
        vec![any(&mesh::mesh_cluster(ECHO, ECHO_SAN))],
    ))
    .await;
    assert!(conn.next().await.error_detail.is_none());
    let eds = conn.next().await;
    assert_eq!(eds.resource_names, [ECHO]);
    conn.send(sotw_response(
        ResourceType::Endpoints,
        "e1",
        "b",
        vec![any(&mesh::assignment(ECHO, &[("10.0.0.5", 8080, true)]))],
    ))
    .await;
    assert!(conn.next().await.error_detail.is_none());
    wait_for(&state, "echo's endpoint", |t| {
        t.services.iter().any(|s| s.endpoints.len() == 1)
    })
    .await;

    // The cluster goes; its endpoints must not linger as a service of their own.
    conn.send(sotw_response(ResourceType::Cluster, "c2", "c", vec![]))
        .await;
    assert!(conn.next().await.error_detail.is_none());
    let eds = conn.next().await;
    assert_eq!(eds.type_url, ResourceType::Endpoints.type_url());
    assert!(eds.resource_names.is_empty());
    wait_for(&state, "no services", |t| t.services.is_empty()).await;
}
