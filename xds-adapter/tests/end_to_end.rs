//! End to end with the Envoy module: an inbound policy pushed over xDS to `shunt-xds` makes
//! shuntd refuse the pairing of two real Envoy 1.40 sidecars, and pushing the policy away again
//! restores cut-through, with neither Envoy nor shuntd restarted.

#[path = "../../envoy-socket-ext/tests/common/mod.rs"]
mod sidecars;
mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource as Wire};
use shunt_xds::resource::ResourceType;
use shunt_xds::testing::mesh::{self, RbacAction, any};
use sidecars::{CLIENT_ID, MeshCerts, Shuntd, mtls_chain, shuntd_at};
use support::scripted_ads::{DeltaConnection, ScriptedAds};

const MIB: u64 = 1 << 20;
const NODE_ID: &str = "sidecar~127.0.0.1~server-1.default~default.svc.cluster.local";

struct Adapter(Child);

impl Drop for Adapter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The server sidecar's inbound listener, with a DENY policy naming `denied` (or none).
fn inbound(port: u16, denied: Option<&str>) -> Wire {
    let rbac = denied
        .map(|id| {
            mesh::rbac_filter(
                RbacAction::Deny,
                &[(
                    "ns[default]-policy[deny-client]-rule[0]",
                    mesh::policy(port.into(), &[id]),
                )],
            )
        })
        .into_iter()
        .collect();
    let listener = mesh::inbound_listener(
        "127.0.0.1_inbound",
        "127.0.0.1",
        port.into(),
        rbac,
        "inbound|backend||",
    );
    Wire {
        name: listener.name.clone(),
        version: if denied.is_some() { "deny" } else { "open" }.into(),
        resource: Some(any(&listener)),
        ..Default::default()
    }
}

async fn push(conn: &mut DeltaConnection, nonce: &str, resource: Wire) {
    conn.send(DeltaDiscoveryResponse {
        type_url: ResourceType::Listener.type_url().into(),
        nonce: nonce.into(),
        resources: vec![resource],
        ..Default::default()
    })
    .await;
    loop {
        let ack = conn.next().await;
        if ack.response_nonce == nonce {
            assert!(ack.error_detail.is_none(), "NACK: {:?}", ack.error_detail);
            return;
        }
    }
}

/// Waits until `shunt rules list` does (or does not) show a rule naming `principal`.
fn wait_for_rule(d: &Shuntd, principal: &str, present: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listing = d.shunt(&["rules", "list", "--scope", "global"]);
        if listing.contains(principal) == present {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "rules never became as expected:\n{listing}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_policy_pushed_over_xds_refuses_a_pairing_and_its_removal_restores_it() {
    let d = Shuntd::start();
    let certs = MeshCerts::new();
    let c = mtls_chain(&certs, &shuntd_at(&d.socket()), &shuntd_at(&d.socket()));
    c.exchange(MIB, MIB);
    assert_eq!(d.metric("shunt_pairings_total{result=\"paired\"}"), 1.0);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut server = rt.block_on(ScriptedAds::start());
    let log = std::fs::File::create(d.dir.path().join("shunt-xds.log")).unwrap();
    let _adapter = Adapter(
        Command::new(env!("CARGO_BIN_EXE_shunt-xds"))
            .args([
                "run",
                "--xds-address",
                &format!("http://{}", server.address),
            ])
            .args(["--node-id", NODE_ID, "--metrics-address", "127.0.0.1:0"])
            .arg("--control-socket")
            .arg(d.dir.path().join("control.sock"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn shunt-xds"),
    );
    let mut conn = rt.block_on(server.next_delta());
    rt.block_on(async {
        for _ in 0..3 {
            conn.next().await;
        }
    });

    // Deny the client's identity on the server sidecar's inbound port.
    rt.block_on(push(&mut conn, "1", inbound(c.b_port, Some(CLIENT_ID))));
    wait_for_rule(&d, CLIENT_ID, true);
    assert!(
        sidecars::exchange(c.entry, MIB, MIB).is_err(),
        "the denied pair carried payload"
    );
    assert!(d.metric("shunt_pairings_total{result=\"denied\"}") >= 1.0);
    assert_eq!(d.metric("shunt_pairings_total{result=\"paired\"}"), 1.0);

    // The policy goes away over xDS: the next connection pairs again.
    rt.block_on(push(&mut conn, "2", inbound(c.b_port, None)));
    wait_for_rule(&d, CLIENT_ID, false);
    let relayed = c.relay.bytes();
    c.exchange(4 * MIB, 4 * MIB);
    assert_eq!(d.metric("shunt_pairings_total{result=\"paired\"}"), 2.0);
    assert!(
        c.relay.bytes() - relayed < MIB,
        "{} bytes crossed the sidecars' TCP connection: no cut-through",
        c.relay.bytes() - relayed
    );
}
