//! The ways to reach a control plane: TLS verified against a given CA, and Unix sockets; and a
//! separate SDS server whose certificate rotations reach shuntd's store.

mod support;

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use shunt_proto::control as pb;
use shunt_tls::dev_pki::{CertificateParams, DevCa};
use shunt_xds::metrics::Metrics;
use shunt_xds::node::{NodeId, envoy_node};
use shunt_xds::resource::ResourceType;
use shunt_xds::testing::mesh::{self, any};
use shunt_xds::translate::Context;
use shunt_xds::xds::{self, Api, Protocol, State, StreamConfig, Target, TlsFiles};
use support::scripted_ads::{Listen, ScriptedAds};
use support::shuntd::{Adapter, TestShuntd, eventually, write};

const NODE_ID: &str = "sidecar~10.0.0.7~client-1.default~default.svc.cluster.local";

fn config(target: Target, tls: Option<TlsFiles>) -> StreamConfig {
    StreamConfig {
        target,
        tls,
        protocol: Protocol::Delta,
        api: Api::Aggregated,
        node: envoy_node(&NODE_ID.parse::<NodeId>().unwrap(), &Default::default()),
        secrets: vec!["default".into(), "ROOTCA".into()],
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        token_file: None,
        headers: Vec::new(),
    }
}

fn state() -> Arc<State> {
    State::new(
        Context::new("xds/client-1.default", vec!["10.0.0.7".parse().unwrap()]),
        Arc::new(Metrics::default()),
    )
}

#[tokio::test]
async fn tls_to_the_control_plane_is_verified_against_the_given_ca() {
    let mesh_ca = DevCa::new("control plane CA").unwrap();
    let server_cert = mesh_ca
        .issue_with(&[], |p: &mut CertificateParams| {
            p.subject_alt_names
                .push(shunt_tls::dev_pki::SanType::DnsName(
                    "localhost".try_into().unwrap(),
                ));
        })
        .unwrap();
    let mut server = ScriptedAds::start_on(Listen::Tls {
        cert: server_cert.cert_pem.clone(),
        key: server_cert.key_pem.clone(),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("https://localhost:{}", server.address.port());

    // Trusting another CA: the handshake fails, counted as a connect failure, and retried.
    let other = DevCa::new("someone else").unwrap();
    let wrong = state();
    let files = TlsFiles {
        ca: Some(write(dir.path(), "other.pem", &other.pem)),
        ..Default::default()
    };
    let task = tokio::spawn(xds::run(
        config(Target::Tcp(uri.clone()), Some(files)),
        wrong.clone(),
    ));
    let series = "shunt_xds_connection_terminations_total{reason=\"connect\"}";
    let refused = || {
        wrong
            .metrics()
            .render()
            .lines()
            .any(|l| l.starts_with(series))
    };
    for _ in 0..500 {
        if refused() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused(), "an untrusted server was not refused");
    assert!(wrong.tables().services.is_empty());
    task.abort();

    // Trusting the right one: the stream comes up.
    let files = TlsFiles {
        ca: Some(write(dir.path(), "ca.pem", &mesh_ca.pem)),
        ..Default::default()
    };
    tokio::spawn(xds::run(config(Target::Tcp(uri), Some(files)), state()));
    let mut conn = server.next_delta().await;
    let first = conn.next().await;
    assert_eq!(first.node.unwrap().id, NODE_ID);
}

#[test]
fn secrets_from_a_separate_sds_socket_reach_shuntd_and_rotate() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let shuntd = TestShuntd::start();
    let socket = shuntd.dir.path().join("agent.sock");
    let mut server = rt.block_on(ScriptedAds::start_on(Listen::Unix(socket.clone())));
    let address = format!("unix:{}", socket.display());
    let adapter = Adapter::start(
        &shuntd,
        &[
            "--xds-address",
            &address,
            "--sds-address",
            &address,
            "--node-id",
            NODE_ID,
        ],
    );
    // ADS over the Unix socket asks for clusters and listeners only: secrets go to SDS.
    let mut ads = rt.block_on(server.next_delta());
    let asked: Vec<String> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..2 {
            v.push(ads.next().await.type_url);
        }
        v
    });
    assert_eq!(
        asked,
        [
            ResourceType::Cluster.type_url(),
            ResourceType::Listener.type_url()
        ]
    );

    let mut sds = rt.block_on(server.next_sds());
    let request = rt.block_on(sds.next());
    assert_eq!(request.type_url, ResourceType::Secret.type_url());
    assert_eq!(request.resource_names, ["ROOTCA", "default"]);

    let ca = DevCa::new("mesh").unwrap();
    let mut push = |version: &str, identity: &str| {
        let leaf = ca.issue(identity).unwrap();
        let response = DiscoveryResponse {
            version_info: version.into(),
            nonce: version.into(),
            type_url: ResourceType::Secret.type_url().into(),
            resources: vec![
                any(&mesh::cert_secret("default", &leaf.cert_pem, &leaf.key_pem)),
                any(&mesh::root_secret("ROOTCA", &ca.pem)),
            ],
            ..Default::default()
        };
        rt.block_on(async {
            sds.send(response).await;
            let ack = sds.next().await;
            assert_eq!(
                (ack.version_info.as_str(), ack.error_detail),
                (version, None)
            );
        });
    };
    let stored = |identity: &str| {
        let want = identity.to_owned();
        eventually(&format!("shuntd to store {identity}"), || {
            let (_, _, certs) = shuntd.tables("xds/client-1.default");
            certs
                .into_iter()
                .find(|c| c.namespace == "default" && c.name == "default" && c.identity == want)
        })
    };
    push("1", "spiffe://cluster.local/ns/default/sa/client");
    let first = stored("spiffe://cluster.local/ns/default/sa/client");
    push("2", "spiffe://cluster.local/ns/default/sa/client-rotated");
    let second = stored("spiffe://cluster.local/ns/default/sa/client-rotated");
    assert!(second.version > first.version, "{first:?} then {second:?}");
    assert!(
        adapter.log().contains("installed in shuntd"),
        "{}",
        adapter.log()
    );
}

#[test]
fn a_shuntd_that_lost_its_tables_gets_them_back_and_unchanged_certificates_are_not_stored_again() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let shuntd = TestShuntd::start();
    let mut server = rt.block_on(ScriptedAds::start());
    let address = format!("http://{}", server.address);
    let adapter = Adapter::start(
        &shuntd,
        &[
            "--xds-address",
            &address,
            "--node-id",
            NODE_ID,
            "--resync-interval",
            "100ms",
        ],
    );
    let mut ads = rt.block_on(server.next_delta());
    rt.block_on(async {
        for _ in 0..3 {
            ads.next().await;
        }
    });
    let ca = DevCa::new("mesh").unwrap();
    let leaf = ca
        .issue("spiffe://cluster.local/ns/default/sa/client")
        .unwrap();
    let listener = mesh::inbound_listener(
        "127.0.0.1_9080",
        "127.0.0.1",
        9080,
        vec![mesh::rbac_filter(
            mesh::RbacAction::Deny,
            &[(
                "deny",
                mesh::policy(9080, &["spiffe://cluster.local/ns/evil/sa/x"]),
            )],
        )],
        "inbound|9080||",
    );
    let resource = |r: envoy_types::pb::google::protobuf::Any, name: &str| {
        envoy_types::pb::envoy::service::discovery::v3::Resource {
            name: name.into(),
            version: "1".into(),
            resource: Some(r),
            ..Default::default()
        }
    };
    rt.block_on(async {
        for (kind, resources) in [
            (
                ResourceType::Listener,
                vec![resource(any(&listener), "127.0.0.1_9080")],
            ),
            (
                ResourceType::Secret,
                vec![
                    resource(
                        any(&mesh::cert_secret("default", &leaf.cert_pem, &leaf.key_pem)),
                        "default",
                    ),
                    resource(any(&mesh::root_secret("ROOTCA", &ca.pem)), "ROOTCA"),
                ],
            ),
        ] {
            ads.send(
                envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse {
                    type_url: kind.type_url().into(),
                    nonce: kind.short_name().into(),
                    resources,
                    ..Default::default()
                },
            )
            .await;
            assert!(ads.next().await.error_detail.is_none());
        }
    });
    let source = "xds/client-1.default";
    let (rule, version) = eventually("the rule and the certificate in shuntd", || {
        let (_, rules, certs) = shuntd.tables(source);
        Some((rules.first()?.tag.clone(), certs.first()?.version))
    });

    // Resyncs keep coming; the unchanged certificate is not stored again.
    let applied = |floor: f64| {
        eventually("two more resyncs", || {
            adapter
                .metric("shunt_xds_shuntd_applies_total{result=\"ok\"}")
                .filter(|v| *v >= floor)
        })
    };
    let before = applied(1.0);
    applied(before + 2.0);
    assert_eq!(shuntd.tables(source).2[0].version, version);

    // shuntd loses them (as a restart would): the next resync puts them back.
    shuntd.control(async |c| {
        c.delete_rule(pb::DeleteRuleRequest {
            scope: pb::RuleScope::Global as i32,
            namespace: String::new(),
            tag: rule.clone(),
        })
        .await
        .unwrap();
        c.delete_certificate(pb::DeleteCertificateRequest {
            namespace: "default".into(),
            name: "default".into(),
        })
        .await
        .unwrap();
    });
    let (_, rules, certs) = shuntd.tables(source);
    assert!(rules.iter().all(|r| r.tag != rule) && certs.is_empty());
    eventually("shuntd to have the rule and the certificate back", || {
        let (_, rules, certs) = shuntd.tables(source);
        (rules.iter().any(|r| r.tag == rule) && !certs.is_empty()).then_some(())
    });
}
