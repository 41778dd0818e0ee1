//! Translation of real Istio config dumps (the Istio project's own test data) and of dumps
//! captured from Envoy 1.40.

use std::path::PathBuf;

use shunt_xds::offline::{Report, translate_dump};
use shunt_xds::tables::{Direction, Severity, TlsMode};

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
