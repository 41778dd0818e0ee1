//! Translation of real Istio config dumps (the Istio project's own test data) and of dumps
//! captured from Envoy 1.40.

use std::path::PathBuf;

use shunt_xds::offline::{Report, translate_dump};
use shunt_xds::tables::{Action, Direction, IdentityMatch, Severity, TlsMode};

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn translate(name: &str) -> Report {
    translate_dump(&fixture(name), &[]).unwrap()
}

#[test]
fn istio_sidecar_endpoints() {
    let report = translate("istio/sidecar-eds-configdump.json");
    let reviews = report
        .tables
        .services
        .iter()
        .find(|s| s.cluster == "outbound|9080||reviews.default.svc.cluster.local")
        .expect("reviews is a service");
    assert_eq!(reviews.direction, Some(Direction::Outbound));
    assert_eq!(reviews.host, "reviews.default.svc.cluster.local");
    assert_eq!(reviews.port, 9080);
    assert_eq!(reviews.endpoints.len(), 3, "{reviews:#?}");
    for e in &reviews.endpoints {
        assert_eq!(e.tls_mode, TlsMode::Istio, "{e:?}");
        let workload = e.workload.as_deref().unwrap();
        assert!(workload.starts_with("reviews-v"), "{workload}");
        assert!(workload.contains(";default;reviews;"), "{workload}");
    }
    // The EDS dump has no clusters, so services come from static assignments only when their
    // clusters are known; infrastructure ones are listed as ignored instead.
    assert!(
        report
            .tables
            .services
            .iter()
            .all(|s| !["xds-grpc", "sds-grpc", "agent"].contains(&s.cluster.as_str()))
    );
}

#[test]
fn istio_sidecar_secrets() {
    let report = translate("istio/sidecar-secrets-configdump.json");
    assert_eq!(report.tables.certificates.len(), 1, "{:#?}", report.tables);
    let cert = &report.tables.certificates[0];
    assert_eq!(
        cert.identity,
        "spiffe://cluster.local/ns/ambient/sa/namespace-istio-waypoint"
    );
    assert!(cert.redacted, "config dumps redact private keys");
    assert_eq!(cert.from_secrets, ["default", "ROOTCA"]);
}

#[test]
fn what_is_not_a_service_is_listed_not_dropped() {
    let report = translate("istio/sidecar-eds-configdump.json");
    for infrastructure in ["sds-grpc", "xds-grpc", "agent", "BlackHoleCluster"] {
        assert!(
            report
                .tables
                .findings
                .iter()
                .any(|f| f.severity == Severity::Ignored
                    && f.subject == format!("endpoints/{infrastructure}")),
            "{infrastructure} is listed: {:#?}",
            report.tables.findings
        );
    }
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(
        json["findings"].as_array().unwrap().len(),
        report.tables.findings.len()
    );
    // Endpoints without their clusters: the identities they expect are unknown, and say so.
    assert!(
        report
            .tables
            .services
            .iter()
            .all(|s| s.expected_identities.is_empty())
    );
}

/// Dumps captured from Envoy 1.40 fed by nebucloud-xds (see interop_nebucloud.rs), over Delta
/// and over state of the world.
#[test]
fn envoy_1_40_dumps() {
    for dump in [
        "envoy-1.40/delta-configdump.json",
        "envoy-1.40/sotw-configdump.json",
    ] {
        let report = translate(dump);
        assert_eq!(
            report.node_id.as_deref(),
            Some("sidecar~127.0.0.1~echo-1.default~default.svc.cluster.local")
        );
        assert_eq!(report.source, "xds/echo-1.default");
        assert_eq!(
            report.workload_ips,
            ["127.0.0.1".parse::<std::net::IpAddr>().unwrap()]
        );
        let t = &report.tables;
        assert!(
            t.findings.iter().all(|f| f.severity != Severity::Rejected),
            "{dump}: {:#?}",
            t.findings
        );

        let eds = t
            .services
            .iter()
            .find(|s| s.cluster == "outbound|9090||eds.default.svc.cluster.local")
            .expect("the EDS service");
        assert_eq!(eds.tls_mode, TlsMode::Istio);
        assert_eq!(
            eds.expected_identities,
            [IdentityMatch::Exact(
                "spiffe://cluster.local/ns/default/sa/echo".into()
            )]
        );
        let endpoints: Vec<(&str, TlsMode, &str)> = eds
            .endpoints
            .iter()
            .map(|e| (e.address.as_str(), e.tls_mode, e.locality.as_str()))
            .collect();
        assert_eq!(
            endpoints,
            [
                ("127.0.0.2:9090", TlsMode::Istio, "r1/z1/"),
                ("127.0.0.3:9090", TlsMode::Disabled, "r1/z1/")
            ]
        );
        let names: Vec<&str> = t.services.iter().map(|s| s.cluster.as_str()).collect();
        assert_eq!(
            names,
            [
                "inbound|15123||",
                "outbound|8080||echo.default.svc.cluster.local",
                "outbound|9090||eds.default.svc.cluster.local"
            ],
            "xds-grpc is infrastructure"
        );
        let inbound = &t.services[0];
        assert_eq!(
            (inbound.direction, inbound.port, inbound.tls_mode),
            (Some(Direction::Inbound), 15123, TlsMode::Disabled)
        );

        // DENY evil (103), ALLOW the client (102), refuse the rest (101), on the listener.
        let mut rules: Vec<(u32, Action, Option<IdentityMatch>)> = t
            .rules
            .iter()
            .map(|r| (r.priority, r.action, r.principal.clone()))
            .collect();
        rules.sort_by_key(|r| r.0);
        assert_eq!(
            rules,
            [
                (101, Action::Deny, None),
                (
                    102,
                    Action::Allow,
                    Some(IdentityMatch::Exact(
                        "spiffe://cluster.local/ns/default/sa/client".into()
                    ))
                ),
                (
                    103,
                    Action::Deny,
                    Some(IdentityMatch::Exact(
                        "spiffe://cluster.local/ns/evil/sa/x".into()
                    ))
                ),
            ]
        );
        assert!(t.rules.iter().all(|r| {
            r.local_prefix.to_string() == "127.0.0.1/32"
                && r.local_ports.first == r.local_ports.last
                && r.origin
                    .starts_with("listener/127.0.0.1_15123/chain/inbound")
        }));

        let [cert] = t.certificates.as_slice() else {
            panic!("{dump}: {:?}", t.certificates)
        };
        assert_eq!(cert.identity, "spiffe://cluster.local/ns/default/sa/echo");
        assert!(cert.redacted, "Envoy redacts private keys in its dumps");
    }
}

#[test]
fn istio_golden_bootstrap_names_a_sidecar_node() {
    let text = fixture("istio/bootstrap-default-golden.json");
    let bootstrap: serde_json::Value = serde_json::from_str(&text).unwrap();
    let id: shunt_xds::node::NodeId = bootstrap["node"]["id"].as_str().unwrap().parse().unwrap();
    assert_eq!((id.kind.as_str(), id.id.as_str()), ("sidecar", "foo"));
    // Istio's default, and so the adapter's.
    assert_eq!(
        bootstrap["dynamic_resources"]["ads_config"]["api_type"],
        "DELTA_GRPC"
    );
}
