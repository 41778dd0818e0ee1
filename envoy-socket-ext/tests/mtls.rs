//! The module with mutual TLS, between two real Envoy 1.40 sidecars, and against Envoy's own
//! TLS configured as Istio configures ISTIO_MUTUAL. Every transfer is checked by sha256 both
//! ways, with the request half-closed before the backend answers.

mod common;

use std::net::TcpStream;
use std::sync::atomic::AtomicU64;
use std::thread;

use common::{
    Backend, CLIENT_ID, COMPANION_FILTER, MeshCerts, SERVER_ID, Shuntd, chain, envoy_tls_socket,
    exchange, exchange_over, free_port, http_get, module_socket, module_tls, mtls_chain, shuntd_at,
    start_envoy, tcp_sidecar, tcp_sidecar_with_filters,
};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn shuntd_socket(d: &Shuntd) -> String {
    shuntd_at(&d.socket())
}

fn absent_shuntd(dir: &tempfile::TempDir) -> String {
    shuntd_at(&dir.path().join("absent.sock"))
}

#[test]
fn authenticated_co_located_sidecars_move_payload_through_shared_memory() {
    let d = Shuntd::start();
    let c = mtls_chain(&MeshCerts::new(), &shuntd_socket(&d), &shuntd_socket(&d));
    for (up, down) in [(64 * MIB, 64 * MIB), (GIB, GIB), (0, 3), (5, 0)] {
        c.exchange(up, down);
    }
    let payload = 128 * MIB + 2 * GIB + 8;
    let wire = c.relay.bytes();
    assert!(
        (wire as f64) < payload as f64 * 0.001,
        "{wire} bytes crossed the sidecar-to-sidecar TCP connection for {payload} of payload"
    );
    assert_eq!(d.metric("shunt_pairings_total{result=\"paired\"}"), 4.0);
    // Each sidecar reports its end of each connection.
    let series = "shunt_sidecar_connections_total{mode=\"cut_through\"}";
    assert_eq!(d.metric_reaching(series, 8.0), 8.0);
    let histogram = "shunt_sidecar_pairing_seconds_count";
    assert_eq!(d.metric_reaching(histogram, 8.0), 8.0);
    // Each exchange also carries its 8-byte length and the backend's 32-byte digest.
    let received = payload + 4 * (8 + 32);
    let series = "shunt_sidecar_bytes_total{mode=\"cut_through\"}";
    assert_eq!(d.metric_reaching(series, received as f64), received as f64);
}

#[test]
fn without_shuntd_the_sidecars_fall_back_to_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let c = mtls_chain(
        &MeshCerts::new(),
        &absent_shuntd(&dir),
        &absent_shuntd(&dir),
    );
    c.exchange(16 * MIB, 16 * MIB);
    c.exchange(0, 0);
    assert!(c.relay.bytes() >= 32 * MIB);
}

#[test]
fn one_side_without_shuntd_falls_back_to_mutual_tls_for_both() {
    let d = Shuntd::start();
    let certs = MeshCerts::new();
    let dir = tempfile::tempdir().unwrap();
    for (a, b) in [
        (shuntd_socket(&d), absent_shuntd(&dir)),
        (absent_shuntd(&dir), shuntd_socket(&d)),
    ] {
        let c = mtls_chain(&certs, &a, &b);
        c.exchange(4 * MIB, 4 * MIB);
        assert!(c.relay.bytes() >= 8 * MIB);
    }
    assert_eq!(d.metric("shunt_pairings_total{result=\"paired\"}"), 0.0);
}

#[test]
fn the_module_and_envoys_own_tls_interoperate_in_both_directions() {
    let d = Shuntd::start();
    let certs = MeshCerts::new();
    let client = certs.workload("client", CLIENT_ID);
    let server = certs.workload("server", SERVER_ID);
    // The module upstream, Envoy's TLS downstream.
    let c = chain(
        &module_socket(&(shuntd_socket(&d) + &module_tls(&client, SERVER_ID))),
        &envoy_tls_socket(false, &server, CLIENT_ID),
    );
    c.exchange(8 * MIB, 8 * MIB);
    c.exchange(0, 1);
    // Envoy's TLS upstream, the module downstream.
    let c = chain(
        &envoy_tls_socket(true, &client, SERVER_ID),
        &module_socket(&(shuntd_socket(&d) + &module_tls(&server, CLIENT_ID))),
    );
    c.exchange(8 * MIB, 8 * MIB);
    c.exchange(1, 0);
    assert_eq!(d.metric("shunt_pairings_total{result=\"paired\"}"), 0.0);
    // Only the module's end of each connection reports.
    let series = "shunt_sidecar_connections_total{mode=\"tls\"}";
    assert_eq!(d.metric_reaching(series, 4.0), 4.0);
    let series = "shunt_sidecar_fallbacks_total{reason=\"peer_without_shunt\"}";
    assert_eq!(d.metric_reaching(series, 4.0), 4.0);
}

#[test]
fn a_wrong_identity_or_an_untrusted_ca_is_refused() {
    let d = Shuntd::start();
    let certs = MeshCerts::new();
    let client = certs.workload("client", CLIENT_ID);
    let impostor = certs.workload("impostor", "spiffe://cluster.local/ns/default/sa/impostor");
    let outsider = certs.outsider("outsider", SERVER_ID);
    let upstream = module_socket(&(shuntd_socket(&d) + &module_tls(&client, SERVER_ID)));
    for (what, b) in [("wrong identity", &impostor), ("untrusted CA", &outsider)] {
        let c = chain(
            &upstream,
            &module_socket(&(shuntd_socket(&d) + &module_tls(b, CLIENT_ID))),
        );
        let result = exchange(c.entry, MIB, MIB);
        assert!(result.is_err(), "{what}: the exchange went through");
    }
    assert_eq!(d.metric("shunt_pairings_total{result=\"paired\"}"), 0.0);
    for reason in ["identity_mismatch", "untrusted_ca"] {
        let series = format!("shunt_sidecar_handshake_failures_total{{reason=\"{reason}\"}}");
        assert!(
            d.metric_reaching(&series, 1.0) >= 1.0,
            "{reason} not counted"
        );
    }
}

#[test]
fn a_plaintext_peer_is_served_when_permissive_and_refused_when_strict() {
    let d = Shuntd::start();
    let certs = MeshCerts::new();
    let server = certs.workload("server", SERVER_ID);
    let backend = Backend::start();
    for (policy, served) in [("permissive", true), ("strict", false)] {
        let port = free_port();
        let config = format!(
            "{}peers: {policy}\n{}",
            shuntd_socket(&d),
            module_tls(&server, CLIENT_ID)
        );
        let _b = start_envoy(
            "b",
            &tcp_sidecar(port, &module_socket(&config), backend.port, ""),
        );
        let result = exchange(port, 2 * MIB, 2 * MIB);
        assert_eq!(result.is_ok(), served, "{policy}: {result:?}");
    }
}

#[test]
fn a_thousand_concurrent_connections_of_random_sizes_arrive_intact() {
    const CONNECTIONS: usize = 1000;
    let d = Shuntd::start();
    let c = mtls_chain(&MeshCerts::new(), &shuntd_socket(&d), &shuntd_socket(&d));
    // All open at once before any payload moves.
    let streams: Vec<TcpStream> = (0..CONNECTIONS)
        .map(|_| TcpStream::connect(("127.0.0.1", c.entry)).unwrap())
        .collect();
    let mut sizes = 0x9E37_79B9_7F4A_7C15_u64;
    let transfers: Vec<_> = streams
        .into_iter()
        .map(|s| {
            let (up, down) = (next_size(&mut sizes), next_size(&mut sizes));
            thread::spawn(move || exchange_over(s, up, down, &AtomicU64::new(0)))
        })
        .collect();
    let failures: Vec<String> = transfers
        .into_iter()
        .filter_map(|t| t.join().unwrap().err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} failed, first: {}\n--- envoy a ---\n{}\n--- envoy b ---\n{}\n--- shuntd ---\n{}",
        failures.len(),
        failures[0],
        closings(&c.a.log()) + &cx_stats(&c.a),
        closings(&c.b.log()) + &cx_stats(&c.b),
        http_get(d.metrics, "/metrics")
            .lines()
            .filter(|l| !l.starts_with('#') && (l.contains("fail") || l.contains("pair")))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        d.metric("shunt_pairings_total{result=\"paired\"}"),
        CONNECTIONS as f64
    );
}

/// The module's log lines about connections it closed, and Envoy's warnings and errors.
fn closings(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("closing") || l.contains("][warning]") || l.contains("][error]"))
        .collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn cx_stats(e: &common::Envoy) -> String {
    http_get(
        e.admin(),
        "/stats?filter=(cx|overflow|flow_control|none_healthy)",
    )
    .lines()
    .filter(|l| !l.ends_with(": 0"))
    .collect::<Vec<_>>()
    .join("\n")
}

/// Sizes from 0 to 256 KiB, from a xorshift sequence (repeatable, no dependency).
fn next_size(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state % (256 * 1024 + 1)
}

/// The companion filter publishes the identity the module verified; Envoy's own RBAC then
/// allows one client identity and denies another, both trusted by the module.
#[test]
fn envoys_rbac_sees_the_peer_identity_through_the_companion_filter() {
    let d = Shuntd::start();
    let certs = MeshCerts::new();
    let server = certs.workload("server", SERVER_ID);
    let backend = Backend::start();
    let filters = format!(
        r#"{COMPANION_FILTER}
      - name: envoy.filters.network.rbac
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC
          stat_prefix: shunt
          rules:
            action: ALLOW
            policies:
              client-only:
                permissions: [{{any: true}}]
                principals:
                - filter_state:
                    key: shunt.peer_identity
                    string_match: {{exact: "{CLIENT_ID}"}}"#
    );
    let b_port = free_port();
    let b = start_envoy(
        "b",
        &tcp_sidecar_with_filters(
            b_port,
            &filters,
            &module_socket(&(shuntd_socket(&d) + &module_tls(&server, "spiffe://cluster.local/*"))),
            backend.port,
            "",
        ),
    );
    let intruder_id = "spiffe://cluster.local/ns/default/sa/intruder";
    for (name, id, allowed) in [
        ("client", CLIENT_ID, true),
        ("intruder", intruder_id, false),
    ] {
        let files = certs.workload(name, id);
        let a_port = free_port();
        let _a = start_envoy(
            "a",
            &tcp_sidecar(
                a_port,
                "",
                b_port,
                &module_socket(&(shuntd_socket(&d) + &module_tls(&files, SERVER_ID))),
            ),
        );
        let result = exchange(a_port, MIB, MIB);
        assert_eq!(result.is_ok(), allowed, "{id}: {result:?}\n{}", b.log());
    }
    assert_eq!(b.stat("shunt.rbac.allowed"), 1);
    assert_eq!(b.stat("shunt.rbac.denied"), 1);
}

/// Certificates from shuntd's store instead of files: the sidecars fetch them by name, pair,
/// and pick up a rotation within about a second.
#[test]
fn certificates_from_shuntds_store_are_used_and_rotated() {
    let d = Shuntd::start();
    let certs = MeshCerts::new();
    d.put_certificate("client", &certs.workload("client", CLIENT_ID));
    d.put_certificate("server", &certs.workload("server", SERVER_ID));
    let store = |name: &str, peer: &str| {
        module_socket(&format!(
            "{}tls: {{certificate: {name}, peer_identities: [\"{peer}\"]}}\n",
            shuntd_socket(&d)
        ))
    };
    let c = chain(&store("client", SERVER_ID), &store("server", CLIENT_ID));
    c.exchange(8 * MIB, 8 * MIB);
    assert_eq!(d.metric("shunt_pairings_total{result=\"paired\"}"), 1.0);

    // Rotate the server to an identity the client does not accept: once the server sidecar
    // has checked the store again, new connections are refused.
    let stranger = certs.workload("stranger", "spiffe://cluster.local/ns/default/sa/stranger");
    d.put_certificate("server", &stranger);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while exchange(c.entry, 1, 1).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the rotated certificate was never used"
        );
    }
    let series = "shunt_sidecar_handshake_failures_total{reason=\"identity_mismatch\"}";
    assert!(d.metric_reaching(series, 1.0) >= 1.0);
}

/// Each sidecar's pairing offer carries the SPIFFE id it verified, and shuntd's rules may name
/// it: a global rule denying the client's identity refuses the pairing, which closes the
/// connection rather than fall back to TLS; a rule naming another identity lets it pair.
#[test]
fn a_rule_naming_the_clients_identity_refuses_the_pairing() {
    let d = Shuntd::start();
    let certs = MeshCerts::new();
    d.deny_principal("no-client", CLIENT_ID);
    let c = mtls_chain(&certs, &shuntd_socket(&d), &shuntd_socket(&d));
    let result = exchange(c.entry, MIB, MIB);
    assert!(result.is_err(), "the denied pair carried payload");
    assert!(d.metric("shunt_pairings_total{result=\"denied\"}") >= 1.0);
    assert_eq!(d.metric("shunt_pairings_total{result=\"paired\"}"), 0.0);
    let series = "shunt_sidecar_fallbacks_total{reason=\"pairing_denied\"}";
    assert!(d.metric_reaching(series, 2.0) >= 1.0, "denial not counted");
    // The responder's sidecar says why it closed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !c.b.log().contains("pairing refused") {
        assert!(
            std::time::Instant::now() < deadline,
            "the denial was not logged:\n{}",
            common::tail(&c.b.log())
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    // A rule naming another identity does not concern this pair.
    d.shunt(&["rules", "del", "--scope", "global", "no-client"]);
    d.deny_principal(
        "no-intruder",
        "prefix:spiffe://cluster.local/ns/default/sa/intruder",
    );
    c.exchange(4 * MIB, 4 * MIB);
    assert_eq!(d.metric("shunt_pairings_total{result=\"paired\"}"), 1.0);
    assert!(
        c.relay.bytes() < MIB,
        "{} bytes crossed the sidecars' TCP connection: no cut-through",
        c.relay.bytes()
    );
}
