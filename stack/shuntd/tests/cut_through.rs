//! Cut-through sessions between real app workers through a real `shuntd` process.
//!
//! One test needs a client it can SIGKILL: this binary, run again with `SHUNT_TEST_ROLE` set,
//! which `main` checks before it runs any test.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use common::{Daemon, assert_no_lost_wakeups, recv_all, send_pattern};
use shunt_client::{AttachOptions, Error, Worker};
use shunt_sapi::ErrorCode;

const ROLE: &str = "SHUNT_TEST_ROLE";

fn main() -> std::process::ExitCode {
    if std::env::var_os(ROLE).is_some() {
        client_role_writes_forever();
        return std::process::ExitCode::SUCCESS;
    }
    common::run_trials(common::trials![
        transfers_64_mib_each_way_intact,
        half_close_works_in_both_directions,
        wrong_secret_and_unknown_namespace_are_refused,
        denied_connect_is_refused_and_allowed_one_flows,
        session_survives_shuntd_sigkill_and_apps_reattach,
        peer_killed_mid_transfer_gives_reset_within_a_second,
        attach_errors_are_typed_when_shuntd_is_absent,
        data_written_before_a_clean_close_survives_the_writer_leaving,
        zero_copy_reads_hand_over_bytes_in_order_up_to_the_limit,
        an_accept_racing_its_segment_grant_still_finds_the_segment,
        polling_workers_connect_accept_and_move_bytes_intact,
        reads_that_outlast_their_polling_budget_sleep_and_wake,
        threads_blocking_on_sessions_of_one_worker_each_wake_for_their_data,
        a_dispatch_that_takes_another_threads_notification_wakes_it,
        small_writes_through_a_small_fifo_lose_no_wake_up,
    ])
}

fn ep(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn transfers_64_mib_each_way_intact() {
    let d = Daemon::start("");
    let server = d.attach("server");
    let listener = server.listen(ep("127.0.0.1:7000")).unwrap();
    let client = d.attach("client");
    let server_thread = thread::spawn(move || {
        let mut s = listener.accept().unwrap();
        let (n, crc) = recv_all(&mut s);
        let back = send_pattern(&mut s, 2, 64 << 20);
        (n, crc, back)
    });
    let mut c = client.connect(ep("127.0.0.1:7000")).unwrap();
    let sent = send_pattern(&mut c, 1, 64 << 20);
    c.shutdown_write().unwrap();
    let (back_n, back_crc) = recv_all(&mut c);
    let (n, crc, server_sent) = server_thread.join().unwrap();
    assert_eq!((n, crc), (64 << 20, sent), "client -> server bytes differ");
    assert_eq!(
        (back_n, back_crc),
        (64 << 20, server_sent),
        "server -> client bytes differ"
    );
}

/// Small writes and reads through a 4 KiB FIFO: the reader empties it and sleeps tens of
/// thousands of times, so the wake-ups to it, and the records they announce, outnumber what a
/// wake-up pipe holds, while the pipe is read only now and then (see
/// `shunt_shm::wake::polling`). A ring swallowed or skipped would leave the reader asleep.
fn small_writes_through_a_small_fifo_lose_no_wake_up() {
    let d = Daemon::start("cut_through: {fifo_size: 4096}\n");
    let server = d.attach("server");
    let listener = server.listen(ep("127.0.0.1:7009")).unwrap();
    let client = d.attach("client");
    const LEN: usize = 128 << 20;
    let reader = thread::spawn(move || {
        let mut s = listener.accept().unwrap();
        let mut crc = crc32fast::Hasher::new();
        let mut buf = [0u8; 1000];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                return (total, crc.finalize());
            }
            crc.update(&buf[..n]);
            total += n;
        }
    });
    let mut c = client.connect(ep("127.0.0.1:7009")).unwrap();
    let mut crc = crc32fast::Hasher::new();
    let mut buf = [0u8; 1024];
    for sent in (0..LEN).step_by(buf.len()) {
        common::pattern(7, sent as u64, &mut buf);
        c.write_all(&buf).unwrap();
        crc.update(&buf);
    }
    c.shutdown_write().unwrap();
    assert_eq!(reader.join().unwrap(), (LEN, crc.finalize()));
    // More notifications of data, each announced by a wake-up or found without one, than the
    // reader's wake-up pipe holds.
    let records = server.stats().peer_records;
    assert!(
        records > 65_536,
        "the reader took {records} notifications only"
    );
    assert_no_lost_wakeups(&[&server, &client]);
}

fn half_close_works_in_both_directions() {
    let d = Daemon::start("");
    let server = d.attach("server");
    let listener = server.listen(ep("127.0.0.1:7001")).unwrap();
    let client = d.attach("client");
    let mut c = client.connect(ep("127.0.0.1:7001")).unwrap();
    let mut s = listener.accept().unwrap();

    // Server closes its write side first; the client still writes afterwards.
    s.write_all(b"bye").unwrap();
    s.shutdown_write().unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"bye");
    c.write_all(b"still talking").unwrap();
    c.shutdown_write().unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"still talking");
}

fn wrong_secret_and_unknown_namespace_are_refused() {
    let d = Daemon::start("namespaces: [{id: blue, secret: '1234', address: 10.0.0.1}]\n");
    let wrong =
        Worker::attach(AttachOptions::new(d.socket()).namespace("blue", b"4321")).unwrap_err();
    assert_eq!(wrong.code(), Some(ErrorCode::WrongSecret), "{wrong}");
    let unknown =
        Worker::attach(AttachOptions::new(d.socket()).namespace("green", b"1234")).unwrap_err();
    assert_eq!(
        unknown.code(),
        Some(ErrorCode::UnknownNamespace),
        "{unknown}"
    );
    let ok = Worker::attach(AttachOptions::new(d.socket()).namespace("blue", b"1234")).unwrap();
    assert_eq!(ok.local_address().ip().to_string(), "10.0.0.1");
}

fn denied_connect_is_refused_and_allowed_one_flows() {
    let d = Daemon::start(
        "rules:\n  - {scope: local, namespace: default, remote: 127.0.0.1/32, remote_ports: '7100-7199', action: deny, tag: no-71xx}\n",
    );
    let server = d.attach("server");
    let _denied = server.listen(ep("127.0.0.1:7150")).unwrap();
    let allowed = server.listen(ep("127.0.0.1:7250")).unwrap();
    let client = d.attach("client");
    let err = client.connect(ep("127.0.0.1:7150")).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Denied), "{err}");
    let err = client.connect(ep("127.0.0.1:7999")).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NoListener), "{err}");
    let mut c = client.connect(ep("127.0.0.1:7250")).unwrap();
    c.write_all(b"hi").unwrap();
    let mut s = allowed.accept().unwrap();
    let mut buf = [0u8; 2];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hi");
}

fn session_survives_shuntd_sigkill_and_apps_reattach() {
    let mut d = Daemon::start("");
    let server = d.attach("server");
    let listener = server.listen(ep("127.0.0.1:7300")).unwrap();
    let client = d.attach("client");
    let mut c = client.connect(ep("127.0.0.1:7300")).unwrap();
    let mut s = listener.accept().unwrap();

    let reader = thread::spawn(move || recv_all(&mut s));
    let first = send_pattern(&mut c, 9, 8 << 20);
    let _ = first;
    d.kill();
    // The session keeps flowing with shuntd dead.
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 8u64 << 20;
    // Re-send the first part's bytes into the hasher so it covers the whole stream.
    {
        let mut off = 0u64;
        while off < sent {
            let n = (sent - off).min(buf.len() as u64) as usize;
            common::pattern(9, off, &mut buf[..n]);
            crc.update(&buf[..n]);
            off += n as u64;
        }
    }
    let total = 48u64 << 20;
    while sent < total {
        let n = (total - sent).min(buf.len() as u64) as usize;
        common::pattern(9, sent, &mut buf[..n]);
        c.write_all(&buf[..n]).unwrap();
        crc.update(&buf[..n]);
        sent += n as u64;
        if sent == 24 << 20 {
            d.restart();
        }
    }
    c.shutdown_write().unwrap();
    let (n, got) = reader.join().unwrap();
    assert_eq!(
        (n, got),
        (total, crc.finalize()),
        "bytes lost or corrupted across the restart"
    );

    // Both apps notice and re-attach; new sessions work through the new shuntd.
    assert!(common::eventually(Duration::from_secs(5), || {
        let _ = client.dispatch();
        !client.is_attached()
    }));
    client.reattach().unwrap();
    let _ = server.dispatch();
    server.reattach().unwrap();
    let mut c2 = client.connect(ep("127.0.0.1:7300")).unwrap();
    c2.write_all(b"again").unwrap();
    let mut s2 = listener.accept().unwrap();
    let mut buf = [0u8; 5];
    s2.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"again");
}

fn peer_killed_mid_transfer_gives_reset_within_a_second() {
    let d = Daemon::start("");
    let server = d.attach("server");
    let listener = server.listen(ep("127.0.0.1:7400")).unwrap();
    // The client is a separate process we can SIGKILL: this test binary, run in a role.
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .env(ROLE, "client")
        .env("SHUNT_TEST_SOCKET", d.socket())
        .spawn()
        .unwrap();
    let mut s = listener.accept().unwrap();
    let mut buf = [0u8; 4096];
    s.read_exact(&mut buf).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at = Instant::now();
    let err = loop {
        match s.read(&mut buf) {
            Ok(0) => break None,
            Ok(_) => continue,
            Err(e) => break Some(e),
        }
    };
    let elapsed = killed_at.elapsed();
    assert!(
        elapsed < Duration::from_secs(1),
        "noticed after {elapsed:?}"
    );
    assert_eq!(
        err.map(|e| e.kind()),
        Some(std::io::ErrorKind::ConnectionReset)
    );
    assert_no_lost_wakeups(&[&server]);
}

/// The SIGKILLed client of the test above.
fn client_role_writes_forever() {
    let sock = std::env::var_os("SHUNT_TEST_SOCKET").expect("the test passes shuntd's socket");
    let w = Worker::attach(AttachOptions::new(sock)).unwrap();
    let mut c = w.connect(ep("127.0.0.1:7400")).unwrap();
    let buf = vec![7u8; 64 * 1024];
    loop {
        if c.write_all(&buf).is_err() {
            return;
        }
    }
}

fn attach_errors_are_typed_when_shuntd_is_absent() {
    let dir = tempfile::tempdir().unwrap();
    let err = Worker::attach(AttachOptions::new(dir.path().join("none.sock"))).unwrap_err();
    assert!(matches!(err, Error::DaemonUnavailable(_)), "{err}");
}

fn data_written_before_a_clean_close_survives_the_writer_leaving() {
    let d = Daemon::start("");
    let server = d.attach("server");
    let listener = server.listen(ep("127.0.0.1:7160")).unwrap();
    for round in 0..20u64 {
        let client = d.attach("client");
        let mut c = client.connect(ep("127.0.0.1:7160")).unwrap();
        // Less than a FIFO, so the writer never waits for the reader.
        let sent = send_pattern(&mut c, round, 512 << 10);
        c.close();
        // The writer's worker detaches at once: shuntd sees it go before the reader has read.
        drop(client);
        let mut s = listener.accept().unwrap();
        let (n, crc) = recv_all(&mut s);
        assert_eq!(
            (n, crc),
            (512 << 10, sent),
            "round {round}: data lost after a clean close"
        );
    }
}

fn zero_copy_reads_hand_over_bytes_in_order_up_to_the_limit() {
    let d = Daemon::start("");
    let server = d.attach("server");
    let listener = server.listen(ep("127.0.0.1:7002")).unwrap();
    let client = d.attach("client");
    let mut c = client.connect(ep("127.0.0.1:7002")).unwrap();
    let mut s = listener.accept().unwrap();
    assert_eq!(
        s.try_read_with(1024, |_| panic!("nothing was written"))
            .unwrap_err()
            .kind(),
        std::io::ErrorKind::WouldBlock
    );
    // More than one FIFO's worth in all, so reads wrap around the ring.
    let sent: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
    let writer = thread::spawn(move || {
        c.write_all(&sent).unwrap();
        c.shutdown_write().unwrap();
        sent
    });
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match s.try_read_with(100_000, |bytes| got.extend_from_slice(bytes)) {
            Ok(0) => break,
            Ok(n) => assert!(n <= 100_000, "read {n}, more than the limit"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "stalled after {}", got.len());
                s.worker().wait(Some(Duration::from_millis(100))).unwrap();
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(got == writer.join().unwrap(), "bytes differ");
}

fn an_accept_racing_its_segment_grant_still_finds_the_segment() {
    // shuntd grants a new segment's fds over the worker's socket, then posts the accept into
    // its event queue. A listener spinning on try_accept drains the queue on every call, so it
    // keeps finding accepts whose grant arrived after it last looked at the socket.
    const CLIENTS: usize = 48;
    let d = Daemon::start("");
    let server = d.attach("server");
    let listener = server.listen(ep("127.0.0.1:7003")).unwrap();
    let acceptor = thread::spawn(move || {
        let mut accepted = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while accepted.len() < CLIENTS {
            assert!(Instant::now() < deadline, "accepted {}", accepted.len());
            if let Some(s) = listener.try_accept().expect("accept") {
                accepted.push(s);
            }
        }
        accepted.len()
    });
    // Each client is its own worker, so each connect brings the listener a new segment.
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let w = d.attach(&format!("client-{i}"));
            let c = w.connect(ep("127.0.0.1:7003")).unwrap();
            (w, c)
        })
        .collect();
    assert_eq!(acceptor.join().unwrap(), CLIENTS);
    drop(clients);
}

fn attach_polling(d: &Daemon, name: &str, budget: Duration) -> Worker {
    Worker::attach(
        AttachOptions::new(d.socket())
            .app_name(name)
            .busy_poll(budget),
    )
    .expect("attach")
}

fn polling_workers_connect_accept_and_move_bytes_intact() {
    let d = Daemon::start("");
    let budget = Duration::from_micros(50);
    let server = attach_polling(&d, "server", budget);
    let listener = server.listen(ep("127.0.0.1:7500")).unwrap();
    let client = attach_polling(&d, "client", budget);
    let server_thread = thread::spawn(move || {
        let mut s = listener.accept().unwrap();
        // Echo 1000 numbered messages, then take a bulk stream and send one back.
        let mut msg = [0u8; 8];
        for _ in 0..1000 {
            s.read_exact(&mut msg).unwrap();
            s.write_all(&msg).unwrap();
        }
        let (n, crc) = recv_all(&mut s);
        let back = send_pattern(&mut s, 4, 16 << 20);
        s.shutdown_write().unwrap();
        (n, crc, back)
    });
    let mut c = client.connect(ep("127.0.0.1:7500")).unwrap();
    for i in 0..1000u64 {
        c.write_all(&i.to_le_bytes()).unwrap();
        let mut echo = [0u8; 8];
        c.read_exact(&mut echo).unwrap();
        assert_eq!(u64::from_le_bytes(echo), i, "echo out of order");
    }
    let sent = send_pattern(&mut c, 3, 16 << 20);
    c.shutdown_write().unwrap();
    let (back_n, back_crc) = recv_all(&mut c);
    let (n, crc, server_sent) = server_thread.join().unwrap();
    assert_eq!((n, crc), (16 << 20, sent), "client -> server bytes differ");
    assert_eq!((back_n, back_crc), (16 << 20, server_sent));
}

fn reads_that_outlast_their_polling_budget_sleep_and_wake() {
    // A budget far shorter than a thread wake-up: nearly every read below polls in vain and
    // then sleeps, so each write must wake it through the peer's socket. A read that went on
    // only after the library's re-check found its data unannounced is a lost wake-up; the
    // workers count them.
    let d = Daemon::start("");
    let server = attach_polling(&d, "server", Duration::from_nanos(100));
    let listener = server.listen(ep("127.0.0.1:7501")).unwrap();
    let client = attach_polling(&d, "client", Duration::from_nanos(100));
    let mut c = client.connect(ep("127.0.0.1:7501")).unwrap();
    let mut s = listener.accept().unwrap();
    let echo = thread::spawn(move || {
        let mut b = [0u8; 1];
        while s.read(&mut b).unwrap() == 1 {
            s.write_all(&b).unwrap();
        }
    });
    for i in 0..50u8 {
        c.write_all(&[i]).unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
        assert_eq!(b[0], i);
    }
    c.shutdown_write().unwrap();
    echo.join().unwrap();
    assert_no_lost_wakeups(&[&server, &client]);
}

fn threads_blocking_on_sessions_of_one_worker_each_wake_for_their_data() {
    // Two threads block in reads on two sessions of one worker. Whichever thread is woken
    // dispatches both sessions' notifications, so the other must learn of its data from that
    // dispatch, not from the library's re-check (which the workers count as a lost wake-up).
    // Sleeping at once, and polling first.
    let d = Daemon::start("");
    for (port, budget) in [(7502, Duration::ZERO), (7503, Duration::from_micros(50))] {
        exchange_from_two_threads(&d, port, budget);
    }
}

fn exchange_from_two_threads(d: &Daemon, port: u16, budget: Duration) {
    let target = SocketAddr::from(([127, 0, 0, 1], port));
    let server = d.attach("server");
    let listener = server.listen(target).unwrap();
    let client = attach_polling(d, "client", budget);
    let mut sessions: Vec<_> = (0..2).map(|_| client.connect(target).unwrap()).collect();
    let mut peers: Vec<_> = (0..2).map(|_| listener.accept().unwrap()).collect();
    let readers: Vec<_> = sessions
        .drain(..)
        .map(|mut s| {
            thread::spawn(move || {
                let mut b = [0u8; 1];
                let mut got = Vec::new();
                while s.read(&mut b).unwrap() == 1 {
                    got.push(b[0]);
                    s.write_all(&b).unwrap();
                }
                got
            })
        })
        .collect();
    for i in 0..40u8 {
        for p in &mut peers {
            p.write_all(&[i]).unwrap();
            let mut b = [0u8; 1];
            p.read_exact(&mut b).unwrap();
            assert_eq!(b[0], i);
        }
    }
    for p in &mut peers {
        p.shutdown_write().unwrap();
    }
    for r in readers {
        assert_eq!(r.join().unwrap(), (0..40u8).collect::<Vec<_>>());
    }
    assert_no_lost_wakeups(&[&server, &client]);
}

fn a_dispatch_that_takes_another_threads_notification_wakes_it() {
    // A server worker with an accepting thread and an echoing thread. The accepting thread
    // dispatches whenever it wakes, and now and then takes the echo thread's data notification
    // before that notification's wake-up reached anyone; the writer, finding its record taken,
    // sends no wake-up of its own. A dispatch that took records must then wake the sleepers,
    // or the echo thread sleeps until its re-check (counted as a lost wake-up).
    let d = Daemon::start("");
    let target = ep("127.0.0.1:7504");
    let server = d.attach("server");
    let listener = server.listen(target).unwrap();
    thread::spawn(move || {
        while let Ok(mut s) = listener.accept() {
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let client = d.attach("client");
    let mut c = client.connect(target).unwrap();
    // Busy cores preempt threads between their steps, which widens the window.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hogs: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let mut back = [0u8; 4096];
    for i in 0..40_000u32 {
        let message = [(i % 251) as u8; 4096];
        c.write_all(&message).unwrap();
        c.read_exact(&mut back).unwrap();
        assert_eq!(back, message);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in hogs {
        h.join().unwrap();
    }
    assert_no_lost_wakeups(&[&server, &client]);
}
