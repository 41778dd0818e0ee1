//! A restart of shuntd under running apps: they attach again by themselves, from whatever call
//! they happen to be in, and the sessions that kept flowing are reported, checked and listed.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use common::{Daemon, block_on, eventually};
use shunt_client::{AttachOptions, Session, Worker};
use shunt_proto::control as pb;

fn ep(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn round_trip(c: &mut Session, s: &mut Session, byte: u8) {
    let mut b = [0u8; 1];
    c.write_all(&[byte]).unwrap();
    s.read_exact(&mut b).unwrap();
    assert_eq!(b[0], byte);
    s.write_all(&[!byte]).unwrap();
    c.read_exact(&mut b).unwrap();
    assert_eq!(b[0], !byte);
}

fn sessions_by_state(d: &Daemon) -> HashMap<String, usize> {
    let sessions = block_on(async {
        let mut c = common::control_client(&d.control_socket()).await;
        c.list_sessions(pb::ListSessionsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .sessions
    });
    let mut by_state = HashMap::new();
    for s in sessions {
        *by_state.entry(s.state).or_default() += 1;
    }
    by_state
}

fn app_names(d: &Daemon) -> Vec<String> {
    block_on(async {
        let mut c = common::control_client(&d.control_socket()).await;
        c.list_apps(pb::ListAppsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .apps
            .into_iter()
            .map(|a| a.name)
            .collect()
    })
}

#[test]
fn a_server_that_only_accepts_attaches_again_and_takes_new_connects() {
    let mut d = Daemon::start("");
    let target = ep("127.0.0.1:7800");
    let server = d.attach("server");
    let listener = server.listen(target).unwrap();
    // The server's thread does nothing but accept and answer: it never calls anything else
    // that would notice shuntd left and came back.
    let acceptor = thread::spawn(move || {
        for round in 0..2u8 {
            let mut s = listener.accept().unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).unwrap();
            assert_eq!(b[0], round);
            s.write_all(&[!round]).unwrap();
        }
    });
    let client = d.attach("client");
    let mut c = client.connect(target).unwrap();
    let mut b = [0u8; 1];
    c.write_all(&[0]).unwrap();
    c.read_exact(&mut b).unwrap();
    d.kill();
    d.restart();
    // A worker that only ever dispatches, never blocking, attaches again as well.
    let poller = d.attach("poller");
    d.kill();
    d.restart();
    assert!(
        eventually(Duration::from_secs(10), || {
            poller.dispatch().unwrap();
            app_names(&d).contains(&"poller".to_owned())
        }),
        "a dispatching worker did not attach again"
    );
    // The accepting server is back too once a new app can reach its listener.
    let newcomer = d.attach("newcomer");
    let mut c2 = None;
    assert!(
        eventually(Duration::from_secs(10), || {
            c2 = newcomer.connect(target).ok();
            c2.is_some()
        }),
        "the accept-only server never attached again"
    );
    let mut c2 = c2.unwrap();
    c2.write_all(&[1]).unwrap();
    c2.read_exact(&mut b).unwrap();
    assert_eq!(b[0], !1);
    acceptor.join().unwrap();
}

#[test]
fn twenty_thousand_sessions_are_resumed_confirmed_and_keep_flowing() {
    const SESSIONS: usize = 20_000;
    // Small FIFOs, so 20,000 pairs fit in memory; segments full of slots.
    let mut d = Daemon::start("cut_through: {fifo_size: 4096, segment_size: 4194304}\n");
    let target = ep("127.0.0.1:7801");
    let server = d.attach("server");
    let listener = server.listen(target).unwrap();
    let client = Worker::attach(AttachOptions::new(d.socket()).app_name("client")).unwrap();
    let mut pairs: Vec<(Session, Session)> = (0..SESSIONS)
        .map(|_| {
            let c = client.connect(target).unwrap();
            (c, listener.accept().unwrap())
        })
        .collect();
    d.kill();
    d.restart();
    // Both apps attach again at their next call, and report their sessions, many messages'
    // worth each; each half is believed once the other half came from the same segment.
    for w in [&client, &server] {
        assert!(eventually(Duration::from_secs(20), || {
            w.dispatch().unwrap();
            w.is_attached()
        }));
    }
    let by_state = sessions_by_state(&d);
    assert_eq!(
        by_state.get("resumed"),
        Some(&(2 * SESSIONS)),
        "{by_state:?}"
    );
    assert_eq!(by_state.get("unconfirmed"), None, "{by_state:?}");
    // They flow, and closing one is reported under its new id: both halves leave the table.
    for (i, (c, s)) in pairs.iter_mut().enumerate().step_by(997) {
        round_trip(c, s, i as u8);
    }
    let (c, s) = pairs.pop().unwrap();
    drop((c, s));
    assert!(eventually(Duration::from_secs(10), || {
        client.dispatch().unwrap();
        server.dispatch().unwrap();
        sessions_by_state(&d).get("resumed") == Some(&(2 * SESSIONS - 2))
    }));
    // A new session between the same two apps takes a free port, and flows.
    let mut c = client.connect(target).unwrap();
    let mut s = listener.accept().unwrap();
    round_trip(&mut c, &mut s, 7);
}
