//! The adversarial suite: hostile apps attack one shuntd while well-behaved apps keep
//! exchanging data through it.
//!
//! Each attacker is a real separate process (this binary run again in a role, see
//! [`hostile`]), running as the unprivileged user `nobody` where an unprivileged app could
//! mount the attack; shuntd is a real process too. Each test asserts that the victim's
//! exchanges went on unaltered with no round trip slower than [`victim::BOUND`], that shuntd
//! still answers its control API and serves a newcomer within it, and that the attacker got a
//! typed error or was disconnected, and was counted.
//!
//! Run: `cargo nextest run -p shuntd --test adversary` (as root; the suite fails without it).

// The suite's modules are its own; `pub` marks what they offer each other.
#![allow(unreachable_pub)]

#[path = "../common/mod.rs"]
mod common;
mod hostile;
mod raw;
mod victim;

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use common::{Daemon, Options, block_on, eventually, sample};
use hostile::{Hostile, Orders};
use shunt_proto::control as pb;
use victim::{BOUND, Victim, assert_shuntd_serves, require_root};

fn main() -> std::process::ExitCode {
    if let Some(role) = hostile::role_from_env() {
        return hostile::run(&role);
    }
    common::run_trials(common::trials![
        poisoned_wake_up_channels_stall_neither_shuntd_nor_the_victim,
        a_peer_flooding_its_ring_and_socket_cannot_monopolize_the_victim,
        a_forged_fifo_head_fails_the_victims_write_instead_of_stalling_it,
        connections_that_never_attach_are_capped_per_user_and_closed_when_idle,
        a_user_out_of_attaches_is_refused_and_others_are_not,
        shuntd_out_of_descriptors_backs_off_and_logs_once_per_interval,
        forged_resumes_hold_no_port_and_claim_no_other_namespace,
        who_may_attach_is_checked_against_the_callers_user,
        malformed_messages_close_their_sender_and_are_counted,
    ])
}

fn ep(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The `default` namespace admits `nobody` too, so attackers reach the victim's listeners.
const OPEN_DEFAULT: &str =
    "namespaces: [{id: default, secret: '', address: 127.0.0.1, uids: [0, 65534]}]\n";

/// A shuntd the attackers can reach, serving metrics.
fn daemon(extra_config: &str) -> Daemon {
    require_root();
    Daemon::start_with(Options {
        extra_config,
        metrics: true,
        open_to_all_users: true,
        ..Options::default()
    })
}

fn sessions_by_app(d: &Daemon) -> Vec<pb::Session> {
    block_on(async {
        let mut c = common::control_client(&d.control_socket()).await;
        c.list_sessions(pb::ListSessionsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .sessions
    })
}

fn poisoned_wake_up_channels_stall_neither_shuntd_nor_the_victim() {
    // Against eventfds this attack froze shuntd (it rang the poisoned doorbell under its
    // registry lock) and the victim's writes. The attacker poisons every socket it holds:
    // its wake-up pipe from shuntd, and the pipe ends of a session a second victim opens
    // to it; then it floods shuntd with connects and never reads an answer.
    let d = daemon(OPEN_DEFAULT);
    let victim = Victim::start(&d, ep("127.0.0.1:7900"));
    let trap = ep("127.0.0.1:7901");
    let mut attacker = Hostile::spawn(
        "poison",
        &d,
        Orders {
            target: Some(trap),
            ..Orders::default()
        },
    );
    attacker.expect("listening");
    let second = d.attach("victim-2");
    let mut s = second.connect(trap).unwrap();
    attacker.expect("ready");
    // Writing into the poisoned session rings the attacker through our own end, never
    // blocking: the write returns at once.
    let started = Instant::now();
    std::io::Write::write_all(&mut s, &[1; 1024]).unwrap();
    assert!(
        started.elapsed() <= BOUND,
        "a write into the session stalled"
    );
    assert_shuntd_serves(&d, victim.target);
    attacker.stop();
    // The attacker's death resets its session, and nothing else.
    let err = std::io::Read::read(&mut s, &mut [0u8; 16]).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    victim.assert_served();
    assert_shuntd_serves(&d, ep("127.0.0.1:7900"));
}

fn a_peer_flooding_its_ring_and_socket_cannot_monopolize_the_victim() {
    // The attacker connects to the victim's server and writes events into their ring, and
    // bytes into their socket, as fast as it can. The server's worker takes a bounded share of
    // each per dispatch and goes on serving its other client.
    let d = daemon(OPEN_DEFAULT);
    let victim = Victim::start(&d, ep("127.0.0.1:7910"));
    let mut attacker = Hostile::spawn(
        "flood",
        &d,
        Orders {
            target: Some(victim.target),
            ..Orders::default()
        },
    );
    attacker.expect("ready");
    victim.wait_for_exchanges(200);
    assert_shuntd_serves(&d, victim.target);
    attacker.stop();
    victim.assert_served();
}

fn a_forged_fifo_head_fails_the_victims_write_instead_of_stalling_it() {
    // The attacker reads a FIFO the victim writes, and stores an impossible head into it while
    // it is empty (as if full). The victim's write fails as corrupt, at once; it used to wait
    // for space forever.
    let d = daemon(OPEN_DEFAULT);
    let victim = Victim::start(&d, ep("127.0.0.1:7920"));
    let listener = victim.server.listen(ep("127.0.0.1:7921")).unwrap();
    let mut attacker = Hostile::spawn(
        "forge_head",
        &d,
        Orders {
            target: Some(ep("127.0.0.1:7921")),
            ..Orders::default()
        },
    );
    attacker.expect("connected");
    let mut s = listener.accept().unwrap();
    attacker.tell("forge");
    attacker.expect("forged");
    let started = Instant::now();
    let err = std::io::Write::write(&mut s, &[1; 100]).unwrap_err();
    assert!(started.elapsed() <= BOUND);
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    assert!(err.to_string().contains("corrupt"), "{err}");
    attacker.stop();
    victim.assert_served();
}

fn connections_that_never_attach_are_capped_per_user_and_closed_when_idle() {
    let d = daemon(&format!(
        "{OPEN_DEFAULT}limits: {{unattached: {{total: 1024, per_uid: 64, timeout_ms: 2000}}}}\n"
    ));
    let victim = Victim::start(&d, ep("127.0.0.1:7930"));
    let rss_before = rss_kib(d.child.id());
    let mut attacker = Hostile::spawn(
        "hold_unattached",
        &d,
        Orders {
            count: Some(2000),
            ..Orders::default()
        },
    );
    assert_eq!(attacker.expect("opened"), "2000 refused 1936");
    // Other users still attach while the attacker holds its 64.
    assert_shuntd_serves(&d, victim.target);
    let grew = rss_kib(d.child.id()).saturating_sub(rss_before);
    assert!(grew < 16 << 10, "shuntd grew by {grew} KiB");
    assert_eq!(
        attacker.expect("closed"),
        "64",
        "idle connections are closed"
    );
    let text = d.scrape();
    assert_eq!(
        sample(
            &text,
            "shunt_app_connections_refused_total{reason=\"unattached_per_uid\"}"
        ),
        1936.0
    );
    assert_eq!(
        sample(
            &text,
            "shunt_app_connections_refused_total{reason=\"attach_timeout\"}"
        ),
        64.0
    );
    attacker.stop();
    victim.assert_served();
}

fn a_user_out_of_attaches_is_refused_and_others_are_not() {
    let d = daemon(&format!(
        "{OPEN_DEFAULT}limits: {{per_uid: {{apps: 16}}}}\n"
    ));
    let victim = Victim::start(&d, ep("127.0.0.1:7940"));
    let mut attacker = Hostile::spawn(
        "attach_many",
        &d,
        Orders {
            count: Some(40),
            ..Orders::default()
        },
    );
    assert_eq!(
        attacker.expect("attached"),
        "16 refused [(\"limit_exceeded\", 24)]"
    );
    assert_shuntd_serves(&d, victim.target);
    assert_eq!(
        sample(
            &d.scrape(),
            "shunt_limit_refusals_total{holder=\"uid\",resource=\"apps\"}"
        ),
        24.0
    );
    attacker.stop();
    victim.assert_served();
}

fn shuntd_out_of_descriptors_backs_off_and_logs_once_per_interval() {
    // Before: at its descriptor limit shuntd retried accept at once, at 100% CPU, logging
    // every failure (millions of lines).
    require_root();
    let d = Daemon::start_with(Options {
        extra_config: &format!("{OPEN_DEFAULT}limits: {{unattached: {{per_uid: 1024}}}}\n"),
        metrics: true,
        log_to_file: true,
        open_to_all_users: true,
    });
    let victim = Victim::start(&d, ep("127.0.0.1:7950"));
    let pid = rustix::process::Pid::from_raw(d.child.id() as i32).unwrap();
    let open = std::fs::read_dir(format!("/proc/{}/fd", d.child.id()))
        .unwrap()
        .count() as u64;
    let set_limit = |current: Option<u64>, maximum: Option<u64>| {
        rustix::process::prlimit(
            Some(pid),
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit { current, maximum },
        )
        .unwrap()
    };
    // prlimit sets as it reads: read the limits by setting them to what they are.
    let hard = nofile_hard_limit(d.child.id());
    let before = set_limit(Some(open + 16), hard);
    let mut attacker = Hostile::spawn(
        "hold_connections",
        &d,
        Orders {
            count: Some(300),
            ..Orders::default()
        },
    );
    attacker.expect("holding");
    // shuntd now fails to accept what waits in its backlog. Over a window of 2 s it spends
    // a fraction of a core (it spun at a whole one), and writes one line.
    let cpu_before = cpu_seconds(d.child.id());
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let cpu = cpu_seconds(d.child.id()) - cpu_before;
    assert!(
        cpu < 0.5,
        "shuntd used {cpu:.2} s of CPU in 2 s at its fd limit"
    );
    let lines = d
        .log_text()
        .lines()
        .filter(|l| l.contains("accept on the app socket failed"))
        .count();
    assert!(
        (1..=2).contains(&lines),
        "{lines} log lines about failed accepts"
    );
    attacker.stop();
    set_limit(before.current, before.maximum);
    assert!(
        sample(
            &d.scrape(),
            "shunt_app_socket_accept_errors_total{reason=\"process_fd_limit\"}"
        ) >= 1.0
    );
    assert_shuntd_serves(&d, victim.target);
    victim.assert_served();
}

fn forged_resumes_hold_no_port_and_claim_no_other_namespace() {
    // Before: resumed sessions were believed. An app claimed every port of 127.0.0.1 toward a
    // service, and legitimate connects failed with `address already in use`.
    let d = daemon(
        "namespaces: [{id: default, secret: '', address: 127.0.0.1, uids: [0, 65534]}, \
         {id: tenant, secret: '', address: 10.9.0.1}]\n\
         limits: {per_uid: {sessions: 300}}\n\
         cut_through: {fifo_size: 4096, segment_size: 4194304}\n",
    );
    let victim = Victim::start(&d, ep("127.0.0.1:7960"));
    let mut attacker = Hostile::spawn(
        "forge_resumes",
        &d,
        Orders {
            target: Some(victim.target),
            ..Orders::default()
        },
    );
    assert_eq!(attacker.expect("own-address"), "[(\"listed\", 256)]");
    assert_eq!(
        attacker.expect("past-the-cap"),
        "[(\"limit_exceeded\", 212), (\"listed\", 44)]"
    );
    assert_eq!(
        attacker.expect("other-namespace"),
        "[(\"not_permitted\", 8)]"
    );
    assert_eq!(
        attacker.expect("not-a-segment"),
        "[(\"invalid_request\", 1)]"
    );
    let forged: Vec<_> = sessions_by_app(&d)
        .into_iter()
        .filter(|s| s.app_name == "hostile")
        .collect();
    assert_eq!(forged.len(), 300);
    assert!(forged.iter().all(|s| s.state == "unconfirmed"));
    // The victim's connects take the ports the forgeries named, one after another.
    let connects: Vec<_> = (0..250)
        .map(|_| victim.client.connect(victim.target).unwrap())
        .collect();
    drop(connects);
    attacker.stop();
    assert!(eventually(BOUND, || sessions_by_app(&d)
        .iter()
        .all(|s| s.app_name != "hostile")));
    victim.assert_served();
}

fn who_may_attach_is_checked_against_the_callers_user() {
    // Before: the app socket was open to every user, and `default` had an empty secret.
    let d = daemon(
        "namespaces: [{id: default, secret: '', address: 127.0.0.1}, \
         {id: tenant, secret: '', address: 10.9.0.1, uids: [65534]}]\n",
    );
    let victim = Victim::start(&d, ep("127.0.0.1:7970"));
    let attach_to = |namespace: &str| {
        let mut a = Hostile::spawn(
            "attach_to",
            &d,
            Orders {
                namespace: Some(namespace.into()),
                ..Orders::default()
            },
        );
        a.expect("attach")
    };
    assert_eq!(attach_to("default"), "not_permitted");
    assert_eq!(attach_to("tenant"), "ok");
    assert_eq!(
        sample(
            &d.scrape(),
            "shunt_attach_failures_total{reason=\"not_permitted\"}"
        ),
        1.0
    );
    // Another user cannot reach the victim's segments, and they are its owner's only.
    let mut a = Hostile::spawn(
        "open_segments",
        &d,
        Orders {
            pid: Some(std::process::id()),
            ..Orders::default()
        },
    );
    assert_eq!(a.expect("listed"), "false opened 0 denied 0");
    let modes: Vec<u32> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|t| t.to_string_lossy().contains("memfd:shunt-ct"))
        })
        .filter_map(|e| std::fs::File::open(e.path()).ok())
        .map(|f| rustix::fs::fstat(f.as_fd()).unwrap().st_mode & 0o777)
        .collect();
    assert!(!modes.is_empty());
    assert!(modes.iter().all(|m| *m == 0o600), "{modes:?}");
    victim.assert_served();
}

fn malformed_messages_close_their_sender_and_are_counted() {
    let d = daemon(OPEN_DEFAULT);
    let victim = Victim::start(&d, ep("127.0.0.1:7980"));
    let mut a = Hostile::spawn("malformed", &d, Orders::default());
    assert_eq!(a.expect("garbage"), "failure:invalid_request+closed");
    assert_eq!(a.expect("truncated"), "failure:invalid_request+closed");
    assert_eq!(
        a.expect("attach-with-an-fd"),
        "failure:invalid_request+closed"
    );
    assert_eq!(a.expect("oversized"), "closed");
    assert_eq!(
        a.expect("resume-before-attach"),
        "failure:not_attached+closed"
    );
    assert!(sample(&d.scrape(), "shunt_sapi_decode_errors_total ") >= 2.0);
    assert_shuntd_serves(&d, victim.target);
    victim.assert_served();
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// User and system CPU time of process `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which ends with the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / rustix::param::clock_ticks_per_second() as f64
}

/// The hard limit on descriptors of process `pid` (`None`: unlimited).
fn nofile_hard_limit(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(4).and_then(|v| v.parse().ok())
}
