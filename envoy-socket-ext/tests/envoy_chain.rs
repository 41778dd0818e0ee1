//! Two real Envoy 1.40 sidecars with the module between a client and a backend:
//! client → Envoy A (listener → tcp_proxy → cluster with the module) → relay → Envoy B
//! (listener with the module → tcp_proxy) → backend. The relay counts what crosses the
//! sidecar-to-sidecar TCP connection. Every transfer is checked by sha256, both ways, with
//! the request half-closed before the backend answers.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::{
    Backend, Shuntd, chain, exchange, free_port, module_socket, shuntd_at, start_envoy, tcp_sidecar,
};

const MIB: u64 = 1 << 20;

fn shunt_config(d: &Shuntd) -> String {
    shuntd_at(&d.socket())
}

#[test]
fn co_located_sidecars_move_payload_through_shared_memory() {
    let d = Shuntd::start();
    let c = chain(
        &module_socket(&shunt_config(&d)),
        &module_socket(&shunt_config(&d)),
    );
    for (up, down) in [(64 * MIB, 64 * MIB), (0, 3), (5, 0)] {
        c.exchange(up, down);
    }
    let payload = 128 * MIB + 8;
    let wire = c.relay.bytes();
    assert!(
        (wire as f64) < payload as f64 * 0.001,
        "{wire} bytes crossed the sidecar-to-sidecar TCP connection for {payload} of payload"
    );
    assert_eq!(d.metric("shunt_pairings_total{result=\"paired\"}"), 3.0);
    assert!(d.metric("shunt_cut_through_bytes_total") >= payload as f64);
}

/// CPU clock ticks (user + system) process `pid` has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the parenthesised name; utime and stime are the 14th and 15th.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn busy_polling_sidecars_move_payload_intact_and_rest_when_idle() {
    let d = Shuntd::start();
    let cfg = format!("{}busy_poll_us: 200\n", shunt_config(&d));
    let c = chain(&module_socket(&cfg), &module_socket(&cfg));
    for (up, down) in [(16 * MIB, 16 * MIB), (0, 3), (5, 0), (1, 1)] {
        c.exchange(up, down);
    }
    assert_eq!(d.metric("shunt_pairings_total{result=\"paired\"}"), 4.0);

    // A connection that moved bytes and then went quiet: each worker polls for 200 µs after
    // the bytes, then must sleep. Over a second of quiet, a worker still polling would use
    // the whole second; sleeping ones use next to nothing.
    let mut quiet = TcpStream::connect(("127.0.0.1", c.entry)).unwrap();
    quiet.write_all(&[7; 1000]).unwrap();
    std::thread::sleep(Duration::from_millis(300)); // the measurement starts after the windows
    let ticks = || cpu_ticks(c.a.pid()) + cpu_ticks(c.b.pid());
    let before = ticks();
    std::thread::sleep(Duration::from_secs(1)); // the measured second of quiet
    let spent = ticks() - before;
    assert!(
        spent < 25,
        "the sidecars used {spent} ticks of CPU in a quiet second: still polling"
    );
    drop(quiet);
}

#[test]
fn without_shuntd_the_connection_carries_payload_itself() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "shuntd_socket: {}\n",
        dir.path().join("absent.sock").display()
    );
    let c = chain(&module_socket(&cfg), &module_socket(&cfg));
    c.exchange(8 * MIB, 8 * MIB);
    assert!(c.relay.bytes() >= 16 * MIB);
}

#[test]
fn one_side_without_shuntd_falls_back_for_both() {
    let d = Shuntd::start();
    let dir = tempfile::tempdir().unwrap();
    let absent = format!(
        "shuntd_socket: {}\n",
        dir.path().join("absent.sock").display()
    );
    let c = chain(&module_socket(&shunt_config(&d)), &module_socket(&absent));
    c.exchange(4 * MIB, 4 * MIB);
    assert!(c.relay.bytes() >= 8 * MIB);
    assert_eq!(d.metric("shunt_pairings_total{result=\"paired\"}"), 0.0);
}

#[test]
fn a_peer_without_the_module_is_served_when_permissive_and_refused_when_strict() {
    let d = Shuntd::start();
    let backend = Backend::start();
    for (policy, served) in [("permissive", true), ("strict", false)] {
        let port = free_port();
        let _b = start_envoy(
            "b",
            &tcp_sidecar(
                port,
                &module_socket(&format!("{}peers: {policy}\n", shunt_config(&d))),
                backend.port,
                "",
            ),
        );
        let result = exchange(port, 2 * MIB, 2 * MIB);
        assert_eq!(result.is_ok(), served, "{policy}: {result:?}");
    }
}
