//! Faults around two real Envoy 1.40 sidecars with the module in mutual-TLS mode: shuntd
//! crashing and coming back, and a server sidecar dying mid-transfer.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{MeshCerts, Shuntd, ShuntdProcess, exchange_counting, mtls_chain, shuntd_at};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Runs an exchange in the background; `sent` tells how far the upload got.
fn start_exchange(
    port: u16,
    up: u64,
    down: u64,
) -> (Arc<AtomicU64>, thread::JoinHandle<Result<(), String>>) {
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let handle = thread::spawn(move || exchange_counting(port, up, down, &counter));
    (sent, handle)
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_transfer_survives_shuntd_being_killed_and_new_connections_use_tls_until_it_is_back() {
    let mut d = ShuntdProcess::start();
    let certs = MeshCerts::new();
    let c = mtls_chain(&certs, &shuntd_at(&d.socket()), &shuntd_at(&d.socket()));

    let (sent, transfer) = start_exchange(c.entry, GIB, 16 * MIB);
    wait_until("a quarter of the upload went", || {
        sent.load(Ordering::Relaxed) >= GIB / 4
    });
    assert_eq!(d.metric("shunt_pairings_total{result=\"paired\"}"), 1.0);
    d.kill();
    if let Err(e) = transfer.join().unwrap() {
        panic!("the transfer broke when shuntd died: {e}");
    }
    let relay_before = c.relay.bytes();
    assert!(relay_before < MIB, "payload crossed TCP: {relay_before}");

    // With shuntd gone, a new connection carries its payload in TLS records.
    c.exchange(4 * MIB, 4 * MIB);
    assert!(c.relay.bytes() - relay_before >= 8 * MIB);

    // Once shuntd is back, sidecars attach again and pair new connections.
    d.restart();
    wait_until("a new connection pairs", || {
        c.exchange(MIB, MIB);
        d.metric("shunt_pairings_total{result=\"paired\"}") >= 1.0
    });
}

#[test]
fn a_server_sidecar_killed_mid_transfer_resets_the_client_within_a_second() {
    let d = Shuntd::start();
    let certs = MeshCerts::new();
    let mut c = mtls_chain(&certs, &shuntd_at(&d.socket()), &shuntd_at(&d.socket()));
    let (sent, transfer) = start_exchange(c.entry, GIB, 0);
    wait_until("the upload is under way", || {
        sent.load(Ordering::Relaxed) >= 32 * MIB
    });
    c.b.kill();
    let killed = Instant::now();
    let result = transfer.join().unwrap();
    let took = killed.elapsed();
    assert!(result.is_err(), "the client saw a complete exchange");
    assert!(
        took < Duration::from_secs(1),
        "the client learnt of the failure after {took:?}"
    );
}
