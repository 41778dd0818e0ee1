//! Pairing against a real `shuntd`: two workers that present the same token get one
//! cut-through session, whatever order they come in; a wrong token, a third party, a deny rule
//! and an absent other end each get a refusal. Data then moves with wake-ups the callers carry
//! themselves, as Envoy's transport sockets do over their TCP connection.

mod common;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Daemon, pattern};
use shunt_client::{Error, PendingConnect, Session, Worker};
use shunt_sapi::ErrorCode;
use shunt_sapi::message::{PairOffer, PairRole};

const CLIENT: &str = "10.1.0.1:40000";
const SERVER: &str = "10.1.0.2:15006";

fn offer(token: u8, role: PairRole) -> PairOffer {
    let (local, remote): (SocketAddr, SocketAddr) = match role {
        PairRole::Initiator => (CLIENT.parse().unwrap(), SERVER.parse().unwrap()),
        PairRole::Responder => (SERVER.parse().unwrap(), CLIENT.parse().unwrap()),
    };
    PairOffer {
        token: [token; 32],
        role,
        local,
        remote,
        fifo_size: None,
        peer_identity: None,
    }
}

fn finish(w: &Worker, p: &PendingConnect) -> Result<Session, Error> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(s) = w.poll_connect(p)? {
            return Ok(s);
        }
        assert!(Instant::now() < deadline, "no answer to a pairing offer");
        w.wait(Some(Duration::from_millis(50))).unwrap();
    }
}

fn refused_with(r: Result<Session, Error>) -> ErrorCode {
    match r {
        Err(Error::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn both_orders_pair_and_carry_data_with_external_wakeups() {
    let d = Daemon::start("");
    let (a, b) = (d.attach("envoy-a"), d.attach("envoy-b"));
    for (n, first) in [PairRole::Initiator, PairRole::Responder]
        .into_iter()
        .enumerate()
    {
        let token = n as u8 + 1;
        let (w1, w2) = match first {
            PairRole::Initiator => (&a, &b),
            PairRole::Responder => (&b, &a),
        };
        let p1 = w1.start_pair(offer(token, first)).unwrap();
        let p2 = w2.start_pair(offer(token, first.opposite())).unwrap();
        let s2 = finish(w2, &p2).unwrap();
        let s1 = finish(w1, &p1).unwrap();
        let (mut init, mut resp) = match first {
            PairRole::Initiator => (s1, s2),
            PairRole::Responder => (s2, s1),
        };
        assert!(init.info().is_client);
        assert!(!resp.info().is_client);
        assert_eq!(init.info().remote, SERVER.parse::<SocketAddr>().unwrap());
        stream_with_external_wakeups(&mut init, &mut resp, 3 << 20);
        stream_with_external_wakeups(&mut resp, &mut init, 1 << 20);
    }
}

/// With external wake-ups, what the callers must carry is only what a sleeping side needs: a
/// reader is asked for again only once a read found nothing, and a writer blocked on a full
/// FIFO only once a quarter of it is free.
#[test]
fn external_wakeups_are_due_only_for_a_sleeping_side() {
    const FIFO: usize = 64 << 10;
    let d = Daemon::start("");
    let (a, b) = (d.attach("envoy-a"), d.attach("envoy-b"));
    let sized = |role| PairOffer {
        fifo_size: Some(FIFO as u32),
        ..offer(7, role)
    };
    let p1 = a.start_pair(sized(PairRole::Initiator)).unwrap();
    let p2 = b.start_pair(sized(PairRole::Responder)).unwrap();
    let mut rx = finish(&b, &p2).unwrap();
    let mut tx = finish(&a, &p1).unwrap();
    tx.use_external_wakeups();
    rx.use_external_wakeups();
    let mut buf = vec![0u8; FIFO];

    // Data: the reader starts armed; it stays busy, and so unrung, until a read finds nothing.
    assert_eq!(tx.try_write(&[1; 1000]).unwrap(), 1000);
    assert!(tx.take_peer_wakeup(), "the first bytes wake an idle reader");
    assert_eq!(tx.try_write(&[2; 1000]).unwrap(), 1000);
    assert!(!tx.take_peer_wakeup(), "already rung");
    rx.on_peer_wakeup();
    assert_eq!(rx.try_read(&mut buf[..1500]).unwrap(), 1500);
    assert_eq!(tx.try_write(&[3; 1000]).unwrap(), 1000);
    assert!(!tx.take_peer_wakeup(), "the reader has not run dry");
    assert_eq!(rx.try_read(&mut buf).unwrap(), 1500);
    let err = rx.try_read(&mut buf).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WouldBlock);
    assert_eq!(tx.try_write(&[4; 1000]).unwrap(), 1000);
    assert!(
        tx.take_peer_wakeup(),
        "a read found nothing: the reader sleeps"
    );
    assert_eq!(rx.try_read(&mut buf).unwrap(), 1000);

    // Space: fill the FIFO, then read less than a quarter of it, then the rest of that quarter.
    let mut filled = 0;
    loop {
        match tx.try_write(&buf) {
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("write: {e}"),
        }
    }
    assert_eq!(filled, FIFO);
    tx.take_peer_wakeup();
    assert_eq!(rx.try_read(&mut buf[..FIFO / 8]).unwrap(), FIFO / 8);
    assert!(
        !rx.take_peer_wakeup(),
        "an eighth free is not worth waking the writer"
    );
    assert_eq!(rx.try_read(&mut buf[..FIFO / 8]).unwrap(), FIFO / 8);
    assert!(rx.take_peer_wakeup(), "a quarter free wakes it");
    tx.on_peer_wakeup();
    assert_eq!(tx.try_write(&buf).unwrap(), FIFO / 4);
}

/// A reader that polls takes no data wake-ups; when it stops, it learns whether bytes came
/// that no wake-up will announce, and from then on an empty read arms the wake-up again.
#[test]
fn a_polling_reader_is_not_rung_and_rearms_when_it_stops() {
    let d = Daemon::start("");
    let (a, b) = (d.attach("envoy-a"), d.attach("envoy-b"));
    let p1 = a.start_pair(offer(9, PairRole::Initiator)).unwrap();
    let p2 = b.start_pair(offer(9, PairRole::Responder)).unwrap();
    let mut rx = finish(&b, &p2).unwrap();
    let mut tx = finish(&a, &p1).unwrap();
    tx.use_external_wakeups();
    rx.use_external_wakeups();
    let mut buf = [0u8; 100];

    assert!(!rx.set_rx_polling(true));
    assert_eq!(
        rx.try_read(&mut buf).unwrap_err().kind(),
        ErrorKind::WouldBlock
    );
    assert_eq!(tx.try_write(&[1; 10]).unwrap(), 10);
    // The reader starts armed, so the first bytes ring once; polling does not re-arm it.
    assert!(tx.take_peer_wakeup());
    assert_eq!(rx.try_read(&mut buf).unwrap(), 10);
    assert_eq!(
        rx.try_read(&mut buf).unwrap_err().kind(),
        ErrorKind::WouldBlock
    );
    assert_eq!(tx.try_write(&[2; 10]).unwrap(), 10);
    assert!(!tx.take_peer_wakeup(), "a polling reader is not rung");

    // Stopping with bytes waiting says so; they must be read.
    assert!(rx.set_rx_polling(false), "bytes came while polling");
    assert_eq!(rx.try_read(&mut buf).unwrap(), 10);
    assert!(!rx.set_rx_polling(false), "not polling any more");
    assert_eq!(
        rx.try_read(&mut buf).unwrap_err().kind(),
        ErrorKind::WouldBlock
    );
    assert_eq!(tx.try_write(&[3; 10]).unwrap(), 10);
    assert!(tx.take_peer_wakeup(), "a sleeping reader is rung again");

    // Stopping with nothing waiting arms at once.
    assert_eq!(rx.try_read(&mut buf).unwrap(), 10);
    rx.set_rx_polling(true);
    assert_eq!(
        rx.try_read(&mut buf).unwrap_err().kind(),
        ErrorKind::WouldBlock
    );
    assert!(!rx.set_rx_polling(false));
    assert_eq!(tx.try_write(&[4; 10]).unwrap(), 10);
    assert!(tx.take_peer_wakeup());
}

/// Moves `len` bytes through FIFOs smaller than `len`, waking the other side only when the
/// session says a wake-up is due, as a caller with its own channel would.
fn stream_with_external_wakeups(tx: &mut Session, rx: &mut Session, len: u64) {
    tx.use_external_wakeups();
    rx.use_external_wakeups();
    let (mut sent, mut got) = (0u64, 0u64);
    let (mut wake_rx, mut wake_tx) = (false, false);
    let mut out = vec![0u8; 100_000];
    let mut inp = vec![0u8; 70_000];
    let mut expect = vec![0u8; 70_000];
    while got < len {
        if sent < len {
            let n = (len - sent).min(out.len() as u64) as usize;
            pattern(9, sent, &mut out[..n]);
            match tx.try_write(&out[..n]) {
                Ok(k) => sent += k as u64,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    // A full FIFO: the writer may only continue once woken for space.
                    assert!(wake_tx || wake_rx || tx.take_peer_wakeup() || got < sent);
                }
                Err(e) => panic!("write: {e}"),
            }
            wake_rx |= tx.take_peer_wakeup();
        }
        if wake_rx || sent > got {
            if std::mem::take(&mut wake_rx) {
                rx.on_peer_wakeup();
            }
            match rx.try_read(&mut inp) {
                Ok(k) => {
                    pattern(9, got, &mut expect[..k]);
                    assert_eq!(inp[..k], expect[..k], "bytes differ at offset {got}");
                    got += k as u64;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("read: {e}"),
            }
            wake_tx |= rx.take_peer_wakeup();
        }
        if std::mem::take(&mut wake_tx) {
            tx.on_peer_wakeup();
        }
    }
    assert_eq!(got, len);
}

#[test]
fn refusals_name_their_reason() {
    let d = Daemon::start("pair_timeout_ms: 300\n");
    let (a, b, c) = (d.attach("a"), d.attach("b"), d.attach("intruder"));

    // Same role twice (from one worker, so shuntd sees them in order): the second is a
    // conflict, and the first still pairs with the right end.
    let first = a.start_pair(offer(1, PairRole::Initiator)).unwrap();
    let dup = a.start_pair(offer(1, PairRole::Initiator)).unwrap();
    assert_eq!(refused_with(finish(&a, &dup)), ErrorCode::PairConflict);
    let resp = b.start_pair(offer(1, PairRole::Responder)).unwrap();
    finish(&b, &resp).unwrap();
    finish(&a, &first).unwrap();

    // The token is spent: presenting it again only waits, and then times out.
    let late = c.start_pair(offer(1, PairRole::Responder)).unwrap();
    assert_eq!(refused_with(finish(&c, &late)), ErrorCode::PairTimeout);

    // Different tokens never meet.
    let x = a.start_pair(offer(2, PairRole::Initiator)).unwrap();
    let y = b.start_pair(offer(3, PairRole::Responder)).unwrap();
    assert_eq!(refused_with(finish(&a, &x)), ErrorCode::PairTimeout);
    assert_eq!(refused_with(finish(&b, &y)), ErrorCode::PairTimeout);
}

#[test]
fn a_deny_rule_refuses_both_ends() {
    let d = Daemon::start(
        r#"
rules:
  - scope: global
    local: 10.1.0.2/32
    local_ports: "15006"
    action: deny
    tag: no-15006
"#,
    );
    let (a, b) = (d.attach("a"), d.attach("b"));
    let p1 = a.start_pair(offer(4, PairRole::Initiator)).unwrap();
    let p2 = b.start_pair(offer(4, PairRole::Responder)).unwrap();
    assert_eq!(refused_with(finish(&b, &p2)), ErrorCode::Denied);
    assert_eq!(refused_with(finish(&a, &p1)), ErrorCode::Denied);
}

#[test]
fn the_larger_fifo_size_either_side_asks_for_applies() {
    let d = Daemon::start("");
    let (a, b) = (d.attach("a"), d.attach("b"));
    for (asked_by_initiator, asked_by_responder, expect) in [
        (Some(8192), None, 8192usize),
        (Some(8192), Some(16384), 16384),
        // Within a quarter of the (default, 64 MiB) segment.
        (Some(1 << 30), None, 16 << 20),
    ] {
        let token = expect.trailing_zeros() as u8;
        let mut i = offer(token, PairRole::Initiator);
        i.fifo_size = asked_by_initiator;
        let mut r = offer(token, PairRole::Responder);
        r.fifo_size = asked_by_responder;
        let pi = a.start_pair(i).unwrap();
        let pr = b.start_pair(r).unwrap();
        let mut client = finish(&a, &pi).unwrap();
        let _server = finish(&b, &pr).unwrap();
        // Nobody reads: the writer can queue exactly one FIFO's worth.
        let queued = client.try_write(&vec![7u8; 64 << 20]).unwrap();
        assert_eq!(
            queued, expect,
            "{asked_by_initiator:?} / {asked_by_responder:?}"
        );
    }
}

#[test]
fn a_principal_rule_sees_the_identity_the_other_end_verified() {
    const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
    const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
    let d = Daemon::start(&format!(
        r#"
rules:
  - scope: global
    principal: {CLIENT_ID}
    priority: 1
    action: deny
    tag: no-client
"#
    ));
    let (a, b) = (d.attach("a"), d.attach("b"));
    let pair = |token: u8, initiator_saw: Option<&str>, responder_saw: Option<&str>| {
        let mut i = offer(token, PairRole::Initiator);
        let mut r = offer(token, PairRole::Responder);
        // Each pairing replaces a connection of its own.
        i.local.set_port(40000 + u16::from(token));
        r.remote = i.local;
        i.peer_identity = initiator_saw.map(str::to_owned);
        r.peer_identity = responder_saw.map(str::to_owned);
        let pi = a.start_pair(i).unwrap();
        let pr = b.start_pair(r).unwrap();
        (finish(&b, &pr), finish(&a, &pi))
    };
    // The global table sees the initiator as the responder verified it.
    let (r, i) = pair(5, Some(SERVER_ID), Some(CLIENT_ID));
    assert_eq!(refused_with(r), ErrorCode::Denied);
    assert_eq!(refused_with(i), ErrorCode::Denied);
    // What the initiator verified is not the ingress table's concern.
    let (r, i) = pair(6, Some(CLIENT_ID), Some(SERVER_ID));
    r.unwrap();
    i.unwrap();
    // Without identities (plain mode) a rule naming one never matches.
    let (r, i) = pair(7, None, None);
    r.unwrap();
    i.unwrap();
}
