//! Interop with third-party software: the nebucloud-xds control plane serves one snapshot to a
//! real Envoy 1.40 and to `shunt-xds`. Envoy must accept all of it, and what `shunt-xds`
//! installs in a real shuntd must equal the translation of what Envoy reports in its
//! `/config_dump`.

mod support;

use std::net::SocketAddr;

use shunt_envoy_harness::Envoy;
use shunt_proto::control as pb;
use shunt_tls::dev_pki::DevCa;
use shunt_xds::offline::translate_dump;
use shunt_xds::resource::Resource;
use shunt_xds::testing::mesh;
use support::nebucloud::NebucloudServer;
use support::shuntd::{Adapter, TestShuntd, eventually};

const NODE_ID: &str = "sidecar~127.0.0.1~echo-1.default~default.svc.cluster.local";
const SOURCE: &str = "xds/echo-1.default";
const EDS_CLUSTER: &str = "outbound|9090||eds.default.svc.cluster.local";
const ECHO_SAN: &str = "spiffe://cluster.local/ns/default/sa/echo";
const CLIENT_SAN: &str = "spiffe://cluster.local/ns/default/sa/client";
const EVIL_SAN: &str = "spiffe://cluster.local/ns/evil/sa/x";

fn snapshot(inbound_port: u32, backend_port: u32) -> Vec<Resource> {
    let ca = DevCa::new("interop mesh CA").unwrap();
    let leaf = ca.issue(ECHO_SAN).unwrap();
    vec![
        Resource::Cluster(Box::new(mesh::mesh_cluster(EDS_CLUSTER, ECHO_SAN))),
        Resource::Cluster(Box::new(mesh::static_cluster(
            "outbound|8080||echo.default.svc.cluster.local",
            "127.0.0.1",
            backend_port,
        ))),
        Resource::Cluster(Box::new(mesh::static_cluster(
            "inbound|15123||",
            "127.0.0.1",
            backend_port,
        ))),
        Resource::Endpoints(Box::new(mesh::assignment(
            EDS_CLUSTER,
            &[("127.0.0.2", 9090, true), ("127.0.0.3", 9090, false)],
        ))),
        Resource::Listener(Box::new(mesh::inbound_listener(
            "127.0.0.1_15123",
            "127.0.0.1",
            inbound_port,
            vec![
                mesh::rbac_filter(
                    mesh::RbacAction::Deny,
                    &[(
                        "ns[evil]-policy[deny-evil]-rule[0]",
                        mesh::policy(inbound_port, &[EVIL_SAN]),
                    )],
                ),
                mesh::rbac_filter(
                    mesh::RbacAction::Allow,
                    &[(
                        "ns[default]-policy[allow-client]-rule[0]",
                        mesh::policy(inbound_port, &[CLIENT_SAN]),
                    )],
                ),
            ],
            "inbound|15123||",
        ))),
        Resource::Secret(Box::new(mesh::cert_secret(
            "default",
            &leaf.cert_pem,
            &leaf.key_pem,
        ))),
        Resource::Secret(Box::new(mesh::root_secret("ROOTCA", &ca.pem))),
    ]
}

fn bootstrap(api_type: &str, xds: SocketAddr) -> String {
    format!(
        r#"
node:
  id: "{NODE_ID}"
  cluster: echo.default
  metadata: {{INSTANCE_IPS: "127.0.0.1", NAMESPACE: default, ISTIO_VERSION: "1.28.0", CLUSTER_ID: Kubernetes}}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    set_node_on_first_message_only: true
    grpc_services: [{{envoy_grpc: {{cluster_name: xds-grpc}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds-grpc
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]
"#,
        port = xds.port()
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn envoy_and_adapter_agree(api_type: &str, protocol: &str) {
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let inbound_port = free_port();
    let resources = snapshot(
        inbound_port.into(),
        backend.local_addr().unwrap().port().into(),
    );
    let server = NebucloudServer::start(NODE_ID, "v1", &resources);

    let modules = tempfile::tempdir().unwrap();
    let envoy = Envoy::start(
        "xds-interop",
        &bootstrap(api_type, server.address),
        modules.path(),
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // Envoy accepted everything.
    eventually("Envoy to accept CDS, LDS, EDS and SDS", || {
        let ok = envoy.stat("cluster_manager.cds.update_success") >= 1
            && envoy.stat("listener_manager.lds.update_success") >= 1
            && envoy.stat(&format!("cluster.{EDS_CLUSTER}.update_success")) >= 1
            && envoy.stat("sds.default.update_success") >= 1
            && envoy.stat("sds.ROOTCA.update_success") >= 1;
        ok.then_some(())
    });
    for stat in [
        "cluster_manager.cds.update_rejected",
        "listener_manager.lds.update_rejected",
        "sds.default.update_rejected",
        "sds.ROOTCA.update_rejected",
    ] {
        assert_eq!(envoy.stat(stat), 0, "{stat}\n{}", envoy.log_tail(40));
    }
    let dump = eventually("a config dump with endpoints", || {
        envoy
            .admin_get("/config_dump?include_eds")
            .ok()
            .filter(|d| d.contains("127.0.0.2"))
    });
    let expected = translate_dump(&dump, &[]).expect("Envoy's own dump translates");
    assert!(
        expected
            .tables
            .findings
            .iter()
            .all(|f| f.severity != shunt_xds::tables::Severity::Rejected),
        "{:#?}",
        expected.tables.findings
    );

    // shunt-xds against the same server, installing in a real shuntd.
    let shuntd = TestShuntd::start();
    let xds = format!("http://{}", server.address);
    let adapter = Adapter::start(
        &shuntd,
        &[
            "--xds-address",
            &xds,
            "--protocol",
            protocol,
            "--node-id",
            NODE_ID,
            "--metadata",
            "INSTANCE_IPS=127.0.0.1",
        ],
    );
    let want_services: Vec<pb::Service> = expected.tables.services.iter().map(Into::into).collect();
    let want_rules: Vec<pb::Rule> = expected
        .tables
        .rules
        .iter()
        .map(|r| r.to_proto(SOURCE))
        .collect();
    // Endpoints come in a later EDS update than their clusters: wait for those too, then
    // compare everything.
    let endpoints =
        |services: &[pb::Service]| -> usize { services.iter().map(|s| s.endpoints.len()).sum() };
    let (services, rules, certs) = eventually("shuntd to hold the adapter's tables", || {
        let got = shuntd.tables(SOURCE);
        (got.0.len() == want_services.len()
            && endpoints(&got.0) == endpoints(&want_services)
            && got.1.len() == want_rules.len()
            && !got.2.is_empty())
        .then_some(got)
    });
    assert_eq!(services, want_services, "{}", adapter.log());
    assert_eq!(rules, want_rules, "{}", adapter.log());
    assert_eq!(certs.len(), 1);
    assert_eq!(
        (
            certs[0].namespace.as_str(),
            certs[0].name.as_str(),
            certs[0].identity.as_str()
        ),
        ("default", "default", ECHO_SAN)
    );

    // What was served, spelled out: the EDS service with its endpoints and identity, and rules
    // that deny evil, admit the client, and refuse the rest on the inbound port.
    let eds = services
        .iter()
        .find(|s| s.cluster == EDS_CLUSTER)
        .expect("the EDS service");
    assert_eq!(eds.endpoints.len(), 2);
    assert_eq!(eds.tls_mode, pb::TlsMode::Istio as i32);
    assert_eq!(eds.expected_identities.len(), 1);
    let principal = |r: &pb::Rule| match r.principal.as_ref().and_then(|p| p.kind.as_ref()) {
        Some(pb::identity_match::Kind::Exact(s)) => s.clone(),
        _ => String::new(),
    };
    let mut summary: Vec<(u32, i32, String)> = rules
        .iter()
        .map(|r| (r.priority, r.action, principal(r)))
        .collect();
    summary.sort();
    assert_eq!(
        summary,
        [
            (101, pb::RuleAction::Deny as i32, String::new()),
            (102, pb::RuleAction::Allow as i32, CLIENT_SAN.to_owned()),
            (103, pb::RuleAction::Deny as i32, EVIL_SAN.to_owned()),
        ]
    );
    assert!(rules.iter().all(|r| r.local_prefix == "127.0.0.1/32"
        && r.local_ports.as_ref().map(|p| p.first) == Some(inbound_port.into())));

    // The adapter's own metrics tell the same story.
    let metric = |series: &str| adapter.metric(series);
    eventually("the adapter's metrics", || {
        metric("shunt_xds_connected{stream=\"ads\"}").filter(|v| *v == 1.0)
    });
    for (series, want) in [
        ("shunt_xds_resources{type=\"cds\"}", 3.0),
        ("shunt_xds_resources{type=\"eds\"}", 1.0),
        ("shunt_xds_resources{type=\"lds\"}", 1.0),
        ("shunt_xds_resources{type=\"sds\"}", 2.0),
    ] {
        assert_eq!(metric(series), Some(want), "{series}");
    }
    let accepted = metric("shunt_xds_updates_total{result=\"accepted\",type=\"cds\"}");
    assert!(accepted.is_some_and(|v| v >= 1.0), "{accepted:?}");
    assert_eq!(
        metric("shunt_xds_updates_total{result=\"rejected\",type=\"cds\"}"),
        None
    );
    assert!(metric("shunt_xds_shuntd_applies_total{result=\"ok\"}").is_some_and(|v| v >= 1.0));
    assert!(metric("shunt_xds_last_update_age_seconds").is_some_and(|v| v >= 0.0));

    // Regenerates the committed Envoy 1.40 dumps that translate_fixtures.rs reads.
    if let Ok(dir) = std::env::var("SHUNT_XDS_CAPTURE_DIR") {
        let path = format!("{dir}/{protocol}-configdump.json");
        std::fs::write(path, &dump).unwrap();
    }
}

#[test]
fn delta_envoy_and_adapter_agree() {
    envoy_and_adapter_agree("DELTA_GRPC", "delta");
}

#[test]
fn sotw_envoy_and_adapter_agree() {
    envoy_and_adapter_agree("GRPC", "sotw");
}
