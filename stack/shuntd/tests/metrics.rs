//! Prometheus metrics of a real shuntd (in-process, so the test learns the bound port) after
//! real traffic, refused attaches and denied connects, and after config sources described
//! services.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;

use common::{block_on, sample, scrape};
use shunt_client::{AttachOptions, Worker};

fn start(dir: &std::path::Path) -> SocketAddr {
    start_with(dir, "")
}

/// shuntd with the test config plus `extra` YAML lines.
fn start_with(dir: &std::path::Path, extra: &str) -> SocketAddr {
    let config = shuntd::config::Config::parse(&format!(
        "{extra}app_socket: {app}\ncontrol_socket: {control}\nmetrics_address: 127.0.0.1:0\n\
         cut_through: {{fifo_size: 65536}}\n\
         namespaces:\n  - {{id: default, secret: '', address: 127.0.0.1}}\n  \
         - {{id: locked, secret: right, address: 10.0.0.2}}\n\
         rules:\n  - {{scope: global, local: 127.0.0.1/32, local_ports: '9', action: deny, tag: discard}}\n",
        app = dir.join("shuntd.sock").display(),
        control = dir.join("control.sock").display(),
    ))
    .unwrap();
    shuntd::background::spawn(config)
        .expect("shuntd starts")
        .metrics_address
        .expect("metrics enabled")
}

#[test]
fn services_and_their_endpoints_are_counted_in_all_sources() {
    use shunt_proto::control as pb;
    let dir = tempfile::tempdir().unwrap();
    let addr = start(dir.path());
    let service = |cluster: &str, endpoints: usize| pb::Service {
        cluster: cluster.into(),
        endpoints: (0..endpoints)
            .map(|i| pb::ServiceEndpoint {
                address: format!("10.0.0.{i}:80"),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    block_on(async {
        let mut c = common::control_client(&dir.path().join("control.sock")).await;
        for (source, services) in [
            ("xds/a", vec![service("a", 2), service("b", 0)]),
            ("xds/b", vec![service("a", 3)]),
        ] {
            c.replace_services(pb::ReplaceServicesRequest {
                source: source.into(),
                services,
            })
            .await
            .unwrap();
        }
    });
    let text = scrape(addr);
    assert_eq!(sample(&text, "shunt_services "), 3.0);
    assert_eq!(sample(&text, "shunt_service_endpoints "), 5.0);
}

#[test]
fn control_calls_refused_for_the_callers_user_are_counted() {
    use shunt_proto::control as pb;
    let dir = tempfile::tempdir().unwrap();
    let stranger = rustix::process::getuid().as_raw().wrapping_add(4242);
    let addr = start_with(
        dir.path(),
        &format!("control_clients: {{uids: [{stranger}]}}\n"),
    );
    assert_eq!(sample(&scrape(addr), "shunt_control_refusals_total "), 0.0);
    block_on(async {
        let mut c = common::control_client(&dir.path().join("control.sock")).await;
        for _ in 0..2 {
            let refused = c
                .list_namespaces(pb::ListNamespacesRequest::default())
                .await
                .unwrap_err();
            assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        }
    });
    assert_eq!(sample(&scrape(addr), "shunt_control_refusals_total "), 2.0);
}

#[test]
fn metrics_count_traffic_refusals_and_rule_hits() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start(dir.path());
    let socket = dir.path().join("shuntd.sock");

    let refused = Worker::attach(AttachOptions::new(&socket).namespace("locked", b"wrong"));
    assert!(refused.is_err());

    let server = Worker::attach(AttachOptions::new(&socket)).unwrap();
    let listener = server.listen("127.0.0.1:7500".parse().unwrap()).unwrap();
    let _discard = server.listen("127.0.0.1:9".parse().unwrap()).unwrap();
    let client = Worker::attach(AttachOptions::new(&socket)).unwrap();
    assert!(client.connect("127.0.0.1:9".parse().unwrap()).is_err());

    // 4 MiB through 64 KiB FIFOs: the writer must find the FIFO full and wait for space.
    const LEN: usize = 4 << 20;
    let reader = std::thread::spawn(move || {
        let mut s = listener.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        (got.len(), s)
    });
    let mut c = client.connect("127.0.0.1:7500".parse().unwrap()).unwrap();
    c.write_all(&vec![3u8; LEN]).unwrap();
    c.shutdown_write().unwrap();
    let (got, _server_side) = reader.join().unwrap();
    assert_eq!(got, LEN);

    let text = scrape(addr);
    assert!(sample(&text, "shunt_cut_through_bytes_total") >= LEN as f64);
    assert!(sample(&text, "shunt_fifo_full_events_total") >= 1.0);
    assert!(sample(&text, "shunt_notifications_sent_total") >= 1.0);
    assert_eq!(sample(&text, "shunt_apps_attached"), 2.0);
    assert_eq!(
        sample(
            &text,
            r#"shunt_attach_failures_total{reason="wrong_secret"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            r#"shunt_rule_hits_total{action="deny",table="global"}"#
        ),
        1.0
    );
    let sessions: f64 = text
        .lines()
        .filter(|l| l.starts_with(r#"shunt_sessions{"#) && l.contains(r#"transport="cut-through""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(sessions, 2.0, "one cut-through session per side\n{text}");
}
