//! What shuntd hands an app while the app is not listening: grants and events wait for it, in
//! order, and nobody else waits with them.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;

use common::{Daemon, assert_no_lost_wakeups, sample};
use shunt_client::{AttachOptions, Session, Worker};

/// More client workers than a full socket of segment grants: each brings the server one.
const CLIENTS: usize = 600;

/// Enough apps and workers for the clients, all of one user.
const ROOM: &str = "limits: {per_uid: {apps: 4096, workers: 8192}, per_namespace: {apps: 4096, workers: 8192}}\n\
                    cut_through: {fifo_size: 4096, segment_size: 1048576}\n";

#[test]
fn grants_to_an_app_that_stopped_reading_its_socket_wait_for_it_and_none_is_lost() {
    // Each client is a worker of its own, so each connect brings the server a segment grant on
    // its socket; the server does not read it while they connect. shuntd used to lose the
    // grant the full socket refused, and every later session between those two workers failed
    // with `session in unknown segment`.
    let d = Daemon::start_with_metrics(ROOM);
    let target: SocketAddr = "127.0.0.1:7700".parse().unwrap();
    let server = Worker::attach(AttachOptions::new(d.socket()).app_name("server")).unwrap();
    let listener = server.listen(target).unwrap();
    let mut clients: Vec<(Worker, Session)> = (0..CLIENTS)
        .map(|i| {
            let w =
                Worker::attach(AttachOptions::new(d.socket()).app_name(&format!("c{i}"))).unwrap();
            let c = w
                .connect(target)
                .expect("a connect to a server that does not read");
            (w, c)
        })
        .collect();
    assert!(
        sample(&d.scrape(), "shunt_app_socket_full_total ") >= 1.0,
        "the server's socket never filled: nothing was tested"
    );
    // The server reads again: every session arrives, and carries bytes both ways.
    for (i, (_, c)) in clients.iter_mut().enumerate() {
        let mut s = listener.accept().unwrap();
        round_trip(c, &mut s, i as u8);
    }
    // The pairs' segments are whole: more sessions between the same workers still work.
    for (i, (w, _)) in clients.iter().enumerate().step_by(50) {
        let mut c = w.connect(target).unwrap();
        let mut s = listener.accept().unwrap();
        round_trip(&mut c, &mut s, i as u8);
    }
    assert_no_lost_wakeups(&[&server]);
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
