//! The companion filter's Envoy stats, read from a real Envoy 1.40 server sidecar's admin:
//! connections by mode (cut-through with and without payload, tls, plain), the payload bytes
//! each way, the active gauges back at zero once they closed, and the fallback reasons (a
//! refused connection's too); and the same as labelled Prometheus series through the
//! bootstrap's `stats_tags`.

mod common;

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{
    Backend, CLIENT_ID, COMPANION_FILTER, MeshCerts, SERVER_ID, Shuntd, exchange, free_port,
    http_get, module_socket, module_tls, shuntd_at, start_envoy, tcp_sidecar,
    tcp_sidecar_with_filters,
};

/// Envoy 1.40's prefix for the stats of a dynamic module without `metrics_namespace`.
const PREFIX: &str = "dynamicmodulescustom.";

/// The `stats_tags` of docs/envoy.md: the mode and the reason as labels.
const STATS_TAGS: &str = r#"
stats_config:
  stats_tags:
  - tag_name: mode
    regex: '^dynamicmodulescustom\.shunt\.(mode\.([a-z_]+)\.)'
  - tag_name: reason
    regex: '^dynamicmodulescustom\.shunt\.(reason\.([a-z_]+)\.)'
"#;

/// Every stat of the filter on `admin`'s `/stats` that is not zero, by name.
fn shunt_stats(admin: std::net::SocketAddr) -> BTreeMap<String, u64> {
    http_get(admin, "/stats?filter=shunt")
        .lines()
        .filter_map(|l| {
            let (name, value) = l.split_once(": ")?;
            let value: u64 = value.trim().parse().ok()?;
            (name.starts_with(PREFIX) && value != 0).then(|| (name.to_owned(), value))
        })
        .collect()
}

/// `admin`'s filter stats once they equal `want`, or what they were after 10 s: connections
/// close, and so count, asynchronously.
fn shunt_stats_reaching(
    admin: std::net::SocketAddr,
    want: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = shunt_stats(admin);
        if &stats == want || Instant::now() >= deadline {
            return stats;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stats(expected: &[(&str, u64)]) -> BTreeMap<String, u64> {
    expected
        .iter()
        .map(|(name, value)| (format!("{PREFIX}{name}"), *value))
        .collect()
}

#[test]
fn the_companion_filter_counts_connections_and_bytes_by_mode_as_envoy_stats() {
    let d = Shuntd::start();
    let certs = MeshCerts::new();
    let backend = Backend::start();
    let server = certs.workload("server", SERVER_ID);
    let client = certs.workload("client", CLIENT_ID);
    let shuntd = shuntd_at(&d.socket());
    let b_port = free_port();
    let b = start_envoy(
        "b",
        &(tcp_sidecar_with_filters(
            b_port,
            COMPANION_FILTER,
            &module_socket(&format!("{shuntd}{}", module_tls(&server, CLIENT_ID))),
            backend.port,
            "",
        ) + STATS_TAGS),
    );
    let client_sidecar = |shuntd: &str| {
        let port = free_port();
        let config = format!("{shuntd}{}", module_tls(&client, SERVER_ID));
        let envoy = start_envoy("a", &tcp_sidecar(port, "", b_port, &module_socket(&config)));
        (envoy, port)
    };

    // Cut-through: one connection with payload each way, and one without any whose client
    // sidecar dies once it is paired: the server sidecar resets it, and the filter sees no
    // data, only the close.
    let (mut a, a_port) = client_sidecar(&shuntd);
    let (up, down) = (3 << 20 | 5, 1 << 20 | 3);
    exchange(a_port, up, down).unwrap();
    let idle = TcpStream::connect(("127.0.0.1", a_port)).unwrap();
    let paired = "shunt_pairings_total{result=\"paired\"}";
    assert_eq!(d.metric_reaching(paired, 2.0), 2.0, "{}", a.log_tail(40));
    a.kill();
    drop(idle);
    // Mutual TLS: the client sidecar has no shuntd, so it does not offer Shunt.
    let dir = tempfile::tempdir().unwrap();
    let (_a2, a2_port) = client_sidecar(&shuntd_at(&dir.path().join("absent.sock")));
    let (tls_up, tls_down) = (2 << 20 | 1, 7);
    exchange(a2_port, tls_up, tls_down).unwrap();
    // Plain: a client without any sidecar, served because the listener is permissive.
    let (plain_up, plain_down) = (11, 1 << 20);
    exchange(b_port, plain_up, plain_down).unwrap();
    // Refused: shuntd's rules deny the pair, so the connection closes before it has a mode.
    d.deny_principal("no-client", CLIENT_ID);
    let (_a3, a3_port) = client_sidecar(&shuntd);
    assert!(
        exchange(a3_port, 1, 1).is_err(),
        "a denied pair carried payload"
    );

    // Each request carries its 8-byte length; each reply starts with the 32-byte digest.
    let want = stats(&[
        ("shunt.mode.cut_through.connections_total", 2),
        ("shunt.mode.cut_through.rx_bytes_total", 8 + up),
        ("shunt.mode.cut_through.tx_bytes_total", 32 + down),
        ("shunt.mode.tls.connections_total", 1),
        ("shunt.mode.tls.rx_bytes_total", 8 + tls_up),
        ("shunt.mode.tls.tx_bytes_total", 32 + tls_down),
        ("shunt.mode.plain.connections_total", 1),
        ("shunt.mode.plain.rx_bytes_total", 8 + plain_up),
        ("shunt.mode.plain.tx_bytes_total", 32 + plain_down),
        ("shunt.reason.peer_without_shunt.fallbacks_total", 2),
        ("shunt.reason.pairing_denied.fallbacks_total", 1),
    ]);
    let got = shunt_stats_reaching(b.admin(), &want);
    assert_eq!(got, want, "\n{}", b.log_tail(40));
    // The active gauges exist, and are back at zero.
    for mode in ["cut_through", "tls", "plain"] {
        let gauge = format!("{PREFIX}shunt.mode.{mode}.connections_active");
        let line = format!("{gauge}: 0");
        let all = http_get(b.admin(), "/stats?filter=shunt");
        assert!(all.lines().any(|l| l == line), "no `{line}` in:\n{all}");
    }

    // Prometheus, with the stats tags: the mode and the reason are labels. (Envoy 1.40 does
    // not register the prefix of network-filter modules as a custom namespace, so it keeps
    // it, behind its own `envoy_`.)
    let prometheus = http_get(b.admin(), "/stats/prometheus");
    let series = |name: &str, label: &str, value: u64| {
        format!("envoy_dynamicmodulescustom_shunt_{name}{{{label}}} {value}")
    };
    for series in [
        series("connections_total", "mode=\"cut_through\"", 2),
        series("connections_total", "mode=\"tls\"", 1),
        series("connections_total", "mode=\"plain\"", 1),
        series("rx_bytes_total", "mode=\"cut_through\"", 8 + up),
        series("tx_bytes_total", "mode=\"tls\"", 32 + tls_down),
        series("connections_active", "mode=\"cut_through\"", 0),
        series("fallbacks_total", "reason=\"peer_without_shunt\"", 2),
        series("fallbacks_total", "reason=\"shuntd_down\"", 0),
    ] {
        assert!(
            prometheus.lines().any(|l| l == series),
            "no `{series}` in:\n{}",
            prometheus
                .lines()
                .filter(|l| l.contains("shunt"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
