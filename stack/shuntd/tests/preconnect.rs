//! Standby sessions (`AttachOptions::preconnect`) between real app workers through a real
//! `shuntd` process: a connect served from standby needs no shuntd, the listening app never
//! sees a standby session nobody opened, and policy changes and dead peers drop them.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use common::{Daemon, control_client, eventually, recv_all, send_pattern};
use shunt_client::{AttachOptions, Error, Listener, Worker};
use shunt_proto::control as pb;
use shunt_sapi::ErrorCode;

const WAIT: Duration = Duration::from_secs(10);

fn ep(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn attach_preconnecting(d: &Daemon, depth: u16) -> Worker {
    Worker::attach(
        AttachOptions::new(d.socket())
            .app_name("preconnecting")
            .preconnect(depth),
    )
    .expect("attach")
}

fn wait_standby(client: &Worker, remote: SocketAddr, n: usize) {
    assert!(
        eventually(WAIT, || client.standby_ready(remote).unwrap() == n),
        "{n} standby sessions to {remote} never became ready"
    );
}

/// Sessions shuntd holds, as its control API lists them.
fn sessions_at_shuntd(rt: &tokio::runtime::Runtime, d: &Daemon) -> usize {
    rt.block_on(async {
        let mut c = control_client(&d.control_socket()).await;
        c.list_sessions(pb::ListSessionsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .sessions
            .len()
    })
}

/// Waits until shuntd holds no session, while `server` dispatches (and so drops the standby
/// sessions it is told to).
fn wait_no_sessions_at_shuntd(
    rt: &tokio::runtime::Runtime,
    d: &Daemon,
    server: &Worker,
    why: &str,
) {
    assert!(
        eventually(WAIT, || {
            server.dispatch().unwrap();
            sessions_at_shuntd(rt, d) == 0
        }),
        "{why}"
    );
}

fn one_exchange(client: &Worker, listener: &Listener, remote: SocketAddr, byte: u8) {
    let mut c = client.connect(remote).unwrap();
    let mut s = listener.accept().unwrap();
    c.write_all(&[byte]).unwrap();
    let mut got = [0u8; 1];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, [byte]);
    s.close();
    assert_eq!(
        c.read(&mut got).unwrap(),
        0,
        "end-of-stream after the close"
    );
}

/// A listening worker, and a preconnecting worker that connected to it once and whose pool of
/// standby sessions to it is full.
struct Warm {
    d: Daemon,
    remote: SocketAddr,
    server: Worker,
    listener: Listener,
    client: Worker,
}

fn warm(remote: &str, depth: u16) -> Warm {
    let d = Daemon::start("");
    let remote = ep(remote);
    let server = d.attach("server");
    let listener = server.listen(remote).unwrap();
    let client = attach_preconnecting(&d, depth);
    // The first connect asks shuntd, and sends for `depth` more in standby.
    one_exchange(&client, &listener, remote, 1);
    wait_standby(&client, remote, depth.into());
    Warm {
        d,
        remote,
        server,
        listener,
        client,
    }
}

/// SIGSTOPs shuntd and waits until it has stopped: the signal takes effect asynchronously, and
/// the parent learns when it has.
fn stop(d: &Daemon) -> rustix::process::Pid {
    let pid = rustix::process::Pid::from_child(&d.child);
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
    let stopped = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::UNTRACED)
        .unwrap()
        .expect("shuntd reported");
    assert!(stopped.1.stopped(), "shuntd did not stop: {stopped:?}");
    pid
}

#[test]
fn a_connect_served_from_standby_needs_no_shuntd_and_carries_bytes_intact() {
    let Warm {
        d,
        remote,
        server: _server,
        listener,
        client,
    } = warm("127.0.0.1:7600", 2);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Two standby sessions, each known to shuntd as a client and a server half, and none of
    // them visible to the listening app.
    assert!(eventually(WAIT, || sessions_at_shuntd(&rt, &d) == 4));
    assert!(listener.try_accept().unwrap().is_none());

    // With shuntd stopped, a connect still completes: it opens a standby session through the
    // ring the two workers share.
    let pid = stop(&d);
    let mut c = client.connect(remote).unwrap();
    let mut s = listener.accept().unwrap();
    let server_side = thread::spawn(move || {
        let (n, crc) = recv_all(&mut s);
        let sent = send_pattern(&mut s, 8, 16 << 20);
        (n, crc, sent)
    });
    let sent = send_pattern(&mut c, 7, 16 << 20);
    c.shutdown_write().unwrap();
    let back = recv_all(&mut c);
    let (n, crc, server_sent) = server_side.join().unwrap();
    assert_eq!((n, crc), (16 << 20, sent), "client -> server bytes differ");
    assert_eq!(
        back,
        (16 << 20, server_sent),
        "server -> client bytes differ"
    );
    assert_eq!(client.standby_ready(remote).unwrap(), 1);
    rustix::process::kill_process(pid, rustix::process::Signal::CONT).unwrap();

    // The one used is replaced once shuntd runs again.
    wait_standby(&client, remote, 2);
    drop(c);
    assert!(listener.try_accept().unwrap().is_none());
}

#[test]
fn a_policy_change_revokes_standby_sessions_before_the_next_connect() {
    let Warm {
        d,
        remote,
        server,
        listener,
        client,
    } = warm("127.0.0.1:7601", 3);
    let rt = tokio::runtime::Runtime::new().unwrap();

    let deny = pb::Rule {
        scope: pb::RuleScope::Local as i32,
        namespace: "default".into(),
        remote_prefix: "127.0.0.1/32".into(),
        remote_ports: Some(pb::PortRange {
            first: 7601,
            last: 7601,
        }),
        action: pb::RuleAction::Deny as i32,
        tag: "no-7601".into(),
        ..Default::default()
    };
    rt.block_on(async {
        let mut c = control_client(&d.control_socket()).await;
        c.add_rule(pb::AddRuleRequest { rule: Some(deny) })
            .await
            .unwrap();
    });
    // The rule change returned, so the next connect obeys it: no standby session serves it.
    match client.connect(remote) {
        Err(Error::Refused {
            code: ErrorCode::Denied,
            ..
        }) => {}
        other => panic!("connect after the deny rule: {other:?}"),
    }
    assert_eq!(client.standby_ready(remote).unwrap(), 0);
    // Both halves of every standby session are gone at shuntd, and none reached the listener.
    wait_no_sessions_at_shuntd(&rt, &d, &server, "standby sessions left at shuntd");
    assert!(listener.try_accept().unwrap().is_none());

    rt.block_on(async {
        let mut c = control_client(&d.control_socket()).await;
        c.delete_rule(pb::DeleteRuleRequest {
            scope: pb::RuleScope::Local as i32,
            namespace: "default".into(),
            tag: "no-7601".into(),
        })
        .await
        .unwrap();
    });
    one_exchange(&client, &listener, remote, 2);
    wait_standby(&client, remote, 3);
}

#[test]
fn standby_sessions_go_with_the_worker_that_held_them() {
    let Warm {
        d,
        remote,
        server,
        listener,
        client,
    } = warm("127.0.0.1:7602", 2);
    let rt = tokio::runtime::Runtime::new().unwrap();

    // The connecting app goes: the listener's held halves are dropped, never accepted.
    drop(client);
    wait_no_sessions_at_shuntd(
        &rt,
        &d,
        &server,
        "standby sessions outlived their connecting worker",
    );
    assert!(listener.try_accept().unwrap().is_none());

    // The listening app goes: the connector's pooled sessions are not handed out.
    let client = attach_preconnecting(&d, 2);
    one_exchange(&client, &listener, remote, 2);
    wait_standby(&client, remote, 2);
    drop(listener);
    drop(server);
    assert!(
        eventually(WAIT, || client.standby_ready(remote).unwrap() == 0),
        "pooled sessions to a worker that went still count as ready"
    );
    match client.connect(remote) {
        Err(Error::Refused {
            code: ErrorCode::NoListener,
            ..
        }) => {}
        other => panic!("connect after the listening worker went: {other:?}"),
    }
}

#[test]
fn standby_pools_fill_up_again_after_shuntd_restarts() {
    let Warm {
        mut d,
        remote,
        server,
        listener,
        client,
    } = warm("127.0.0.1:7603", 2);

    // A connect served while shuntd is stopped sends a refill that shuntd never answers: it
    // is killed before it runs again.
    stop(&d);
    let c = client.connect(remote).unwrap();
    let s = listener.accept().unwrap();
    assert_eq!(client.standby_ready(remote).unwrap(), 1);
    drop((c, s));
    d.kill();
    d.restart();

    // The lost refill does not count against the pool at the new shuntd.
    assert!(eventually(WAIT, || {
        server.dispatch().unwrap();
        !server.is_attached()
    }));
    server.reattach().unwrap();
    one_exchange(&client, &listener, remote, 2);
    wait_standby(&client, remote, 2);
}
