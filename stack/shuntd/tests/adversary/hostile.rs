//! The attackers: this test binary run again in a role, as a separate process, and as the
//! unprivileged user `nobody` where the attack is one an unprivileged app could make.
//!
//! A role reads its parameters from the environment, reports on stdout one line per step
//! (`ready ...`), and keeps its attack in place until its stdin closes, so the test looks at
//! the victim and shuntd while the attack lasts.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use shunt_sapi::event::Event;
use shunt_sapi::layout;
use shunt_sapi::message::{DaemonReply, Request, ResumedSession};
use shunt_shm::fifo::init_fifo;
use shunt_shm::ring::RingProducer;
use shunt_shm::segment::Segment;

use super::common::Daemon;
use super::raw::{self, RawApp};

const ROLE: &str = "SHUNT_HOSTILE_ROLE";
const SOCKET: &str = "SHUNT_HOSTILE_SOCKET";
const TARGET: &str = "SHUNT_HOSTILE_TARGET";
const COUNT: &str = "SHUNT_HOSTILE_COUNT";
const PID: &str = "SHUNT_HOSTILE_PID";
const NAMESPACE: &str = "SHUNT_HOSTILE_NAMESPACE";
const AS_USER: &str = "SHUNT_HOSTILE_AS";

/// The unprivileged user the attackers run as.
pub const NOBODY: u32 = 65534;

/// How long a role waits for what it needs before it gives up and says so.
const STEP: Duration = Duration::from_secs(10);

/// An attacker process, as the test sees it.
pub struct Hostile {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

/// What a role is told besides its name.
#[derive(Default)]
pub struct Orders {
    pub target: Option<SocketAddr>,
    pub count: Option<usize>,
    pub pid: Option<u32>,
    pub namespace: Option<String>,
    /// Run as root instead of `nobody` (for attacks that need no unprivileged user).
    pub as_root: bool,
}

impl Hostile {
    pub fn spawn(role: &str, d: &Daemon, orders: Orders) -> Hostile {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.env(ROLE, role)
            .env(SOCKET, d.socket())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(t) = orders.target {
            cmd.env(TARGET, t.to_string());
        }
        if let Some(n) = orders.count {
            cmd.env(COUNT, n.to_string());
        }
        if let Some(p) = orders.pid {
            cmd.env(PID, p.to_string());
        }
        if let Some(ns) = &orders.namespace {
            cmd.env(NAMESPACE, ns);
        }
        if !orders.as_root {
            cmd.env(AS_USER, NOBODY.to_string());
        }
        let mut child = cmd.spawn().expect("spawn the attacker");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Hostile {
            stdin: child.stdin.take(),
            child,
            lines,
        }
    }

    /// The attacker's next line, which must start with `prefix`; returns the rest.
    pub fn expect(&mut self, prefix: &str) -> String {
        match self.lines.recv_timeout(STEP * 3) {
            Ok(line) => match line.strip_prefix(prefix) {
                Some(rest) => rest.trim().to_owned(),
                None => panic!("the attacker said `{line}`, expected `{prefix} ...`"),
            },
            Err(_) => panic!("the attacker said nothing (expected `{prefix} ...`)"),
        }
    }

    /// Tells the attacker to go on (a line on its stdin).
    pub fn tell(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("attacker still running");
        writeln!(stdin, "{line}").unwrap();
    }

    /// Ends the attack: the attacker's stdin closes and it exits.
    pub fn stop(mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + STEP;
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the attacker did not stop");
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The role this process was started in, if any.
pub fn role_from_env() -> Option<String> {
    std::env::var(ROLE).ok()
}

/// Runs a role to its end; a failure is reported as `error ...` and a failed exit.
pub fn run(role: &str) -> ExitCode {
    if let Some(uid) = std::env::var(AS_USER)
        .ok()
        .and_then(|u| u.parse::<u32>().ok())
        && let Err(e) = become_user(uid)
    {
        println!("error cannot become uid {uid}: {e}");
        return ExitCode::FAILURE;
    }
    let result = match role {
        "poison" => poison(),
        "flood" => flood(),
        "forge_head" => forge_head(),
        "hold_unattached" => hold_unattached(),
        "attach_many" => attach_many(),
        "forge_resumes" => forge_resumes(),
        "hold_connections" => hold_connections(),
        "malformed" => malformed(),
        "open_segments" => open_segments(),
        "attach_to" => attach_to(),
        other => Err(format!("no role {other}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("error {e}");
            ExitCode::FAILURE
        }
    }
}

fn become_user(uid: u32) -> std::io::Result<()> {
    use rustix::process::{Gid, Uid};
    use rustix::thread::{set_thread_groups, set_thread_res_gid, set_thread_res_uid};
    // Only this thread exists yet, so its credentials are the process's.
    let (gid, uid) = (Gid::from_raw(uid), Uid::from_raw(uid));
    set_thread_groups(&[])?;
    set_thread_res_gid(gid, gid, gid)?;
    set_thread_res_uid(uid, uid, uid)?;
    Ok(())
}

fn socket_path() -> PathBuf {
    std::env::var_os(SOCKET)
        .expect("the test names shuntd's socket")
        .into()
}

fn target() -> SocketAddr {
    std::env::var(TARGET)
        .expect("the test names a target")
        .parse()
        .unwrap()
}

fn count() -> usize {
    std::env::var(COUNT)
        .expect("the test gives a count")
        .parse()
        .unwrap()
}

fn say(line: &str) {
    println!("{line}");
    std::io::stdout().flush().unwrap();
}

/// Blocks until the test closes our stdin.
fn hold() {
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line).unwrap_or(0) > 0 {
        line.clear();
    }
}

/// A flag that turns true when the test closes our stdin.
fn stop_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        hold();
        flag.store(true, Ordering::Relaxed);
    });
    stop
}

fn attached() -> Result<RawApp, String> {
    let mut app = RawApp::connect(&socket_path()).map_err(|e| e.to_string())?;
    let namespace = std::env::var(NAMESPACE).unwrap_or_else(|_| "default".into());
    app.attach(&namespace, b"")
        .map_err(|e| e.to_string())?
        .map_err(|code| format!("attach refused: {code}"))?;
    Ok(app)
}

/// Every fd shuntd gave, made blocking and full; then a listener the victim connects to, whose
/// session's wake-up pipe ends get the same; then connects to nowhere, never reading the
/// answers.
fn poison() -> Result<(), String> {
    let mut app = attached()?;
    // Its wake-up pipe, the only descriptor shuntd writes to for it (the memfd beside it is
    // the app's own queue).
    for fd in &app.received {
        if is_pipe(fd) {
            raw::make_blocking_and_full(fd.as_fd());
        }
    }
    let id = app
        .send(&Request::Listen { endpoint: target() }, &[])
        .map_err(|e| e.to_string())?;
    match app.reply(id).map_err(|e| e.to_string())? {
        DaemonReply::Listening { .. } => say("listening"),
        other => return Err(format!("listen: {other:?}")),
    }
    let deadline = Instant::now() + STEP;
    while app.grants.is_empty() && Instant::now() < deadline {
        app.recv(Duration::from_millis(50))
            .map_err(|e| e.to_string())?;
    }
    // Every wake-up end of the session's pair: the pipe it writes to the victim (filled), its
    // anchor and the pipe it reads from (made blocking, never read).
    let grant = app.grants.first().ok_or("no victim connected")?;
    for end in &grant.wake_ends {
        raw::make_blocking_and_full(end.as_fd());
    }
    // Until its own socket refuses more: shuntd stops reading from an app whose answers it
    // cannot deliver, and that stalls only this app.
    let nowhere = Request::Connect {
        remote: "127.0.0.1:9".parse().unwrap(),
        standby: false,
    };
    for id in 1..100_000 {
        let sent = rustix::net::send(
            &app.sock,
            &nowhere.encode(id),
            rustix::net::SendFlags::DONTWAIT,
        );
        if sent.is_err() {
            break;
        }
    }
    say("ready");
    hold();
    Ok(())
}

/// Connects to the victim and writes events into its ring, and bytes into its wake-up pipe, as
/// fast as it can, until told to stop.
fn flood() -> Result<(), String> {
    let mut app = attached()?;
    let (fifos, segment) = app.connect_session(target()).map_err(|e| e.to_string())?;
    let grant = app
        .grants
        .iter()
        .find(|g| g.segment_id == fifos.segment_id)
        .ok_or("no grant")?;
    let to_victim: OwnedFd = grant
        .to_peer()
        .try_clone_to_owned()
        .map_err(|e| e.to_string())?;
    let mut ring = RingProducer::attach(segment.clone(), raw::outbound_ring(true))
        .map_err(|e| e.to_string())?;
    let stop = stop_flag();
    let junk = [7u8; 4096];
    let mut pushed = 0u64;
    let mut said = false;
    while !stop.load(Ordering::Relaxed) {
        for slot in 0..layout::CT_MAX_SLOTS {
            if ring.push(&Event::RxData { slot }.encode()).is_ok() {
                pushed += 1;
            }
        }
        let _ = rustix::io::write(&to_victim, &junk);
        if !said && pushed > 10_000 {
            say("ready");
            said = true;
        }
    }
    Ok(())
}

/// Connects to the victim, then (when told) forges the head of the FIFO the victim writes to:
/// as if the empty FIFO were full.
fn forge_head() -> Result<(), String> {
    let mut app = attached()?;
    let (fifos, segment) = app.connect_session(target()).map_err(|e| e.to_string())?;
    say("connected");
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let region = segment.region();
    let at = |field: usize| region.atomic_u32(fifos.rx_offset as usize + field).unwrap();
    let capacity = at(raw::FIFO_CAPACITY).load(Ordering::Acquire);
    let tail = at(raw::FIFO_TAIL).load(Ordering::Acquire);
    at(raw::FIFO_HEAD).store(tail.wrapping_sub(capacity), Ordering::Release);
    say("forged");
    hold();
    Ok(())
}

/// Opens connections to the app socket and never attaches; reports how many shuntd closed at
/// once (over the cap) and, later, how many it closed for idling.
fn hold_unattached() -> Result<(), String> {
    let n = count();
    let mut open = Vec::new();
    for _ in 0..n {
        match RawApp::connect(&socket_path()) {
            Ok(app) => open.push(app.sock),
            Err(e) => return Err(format!("connect: {e}")),
        }
    }
    // A connection shuntd refused reads end-of-file.
    let closed = |socks: &[OwnedFd], wait: Duration| -> usize {
        socks
            .iter()
            .filter(|s| {
                shunt_shm::wait_readable(s.as_fd(), Some(wait)).unwrap_or(false)
                    && matches!(
                        rustix::net::recv(s, &mut [0u8; 1], rustix::net::RecvFlags::DONTWAIT),
                        Ok((_, 0))
                    )
            })
            .count()
    };
    std::thread::sleep(Duration::from_millis(500));
    let refused = closed(&open, Duration::ZERO);
    say(&format!("opened {n} refused {refused}"));
    // Those left wait for the attach timeout.
    let deadline = Instant::now() + STEP;
    let mut timed_out = 0;
    while Instant::now() < deadline {
        timed_out = closed(&open, Duration::ZERO) - refused;
        if refused + timed_out == n {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    say(&format!("closed {timed_out}"));
    hold();
    Ok(())
}

/// Attaches again and again, keeping every attach; reports how many were refused, and why.
fn attach_many() -> Result<(), String> {
    let mut kept = Vec::new();
    let mut refusals: HashMap<String, usize> = HashMap::new();
    for _ in 0..count() {
        let mut app = RawApp::connect(&socket_path()).map_err(|e| e.to_string())?;
        match app.attach("default", b"").map_err(|e| e.to_string())? {
            Ok(()) => kept.push(app),
            Err(code) => *refusals.entry(code.as_str().to_owned()).or_default() += 1,
        }
    }
    let mut refused: Vec<_> = refusals.into_iter().collect();
    refused.sort();
    say(&format!("attached {} refused {refused:?}", kept.len()));
    hold();
    Ok(())
}

/// Claims sessions it never had: from its own memfd, with FIFO headers it wrote itself, on
/// the victim's listener, and with another namespace's address; then with no segment at all.
fn forge_resumes() -> Result<(), String> {
    let mut app = attached()?;
    let victim = target();
    let area = layout::ct_fifo_area();
    let len = (area + 4 * 4352).next_multiple_of(4096);
    let seg = Segment::create("forged", len).map_err(|e| e.to_string())?;
    let (rx, tx) = (area as u32, (area + 8192) as u32);
    for off in [rx, tx] {
        init_fifo(seg.region(), off as usize, 4096).map_err(|e| e.to_string())?;
    }
    let claim = |local: SocketAddr, slot: u32| ResumedSession {
        local,
        remote: victim,
        is_client: true,
        slot,
        rx_offset: rx,
        tx_offset: tx,
    };
    let outcome = |app: &mut RawApp, claims: Vec<ResumedSession>, fd: &OwnedFd| {
        let id = app
            .send(&Request::ResumeSessions(claims), &[fd.as_fd()])
            .map_err(|e| e.to_string())?;
        match app.reply(id).map_err(|e| e.to_string())? {
            DaemonReply::Resumed(outcomes) => {
                let mut by: HashMap<String, usize> = HashMap::new();
                for o in outcomes {
                    let key = match o {
                        Ok(_) => "listed".to_owned(),
                        Err(code) => code.as_str().to_owned(),
                    };
                    *by.entry(key).or_default() += 1;
                }
                let mut by: Vec<_> = by.into_iter().collect();
                by.sort();
                Ok::<_, String>(format!("{by:?}"))
            }
            DaemonReply::Failure { code, .. } => Ok(format!("failure {code}")),
            other => Err(format!("{other:?}")),
        }
    };
    let fd = seg.try_clone_fd().map_err(|e| e.to_string())?;
    // Every slot of its own segment, on ports the victim's connects would take first; then
    // as many again from a second one, past its allowance.
    let own = |first_port: u16| -> Vec<ResumedSession> {
        (0..layout::CT_MAX_SLOTS)
            .map(|slot| {
                claim(
                    SocketAddr::new([127, 0, 0, 1].into(), first_port + slot as u16),
                    slot,
                )
            })
            .collect()
    };
    say(&format!(
        "own-address {}",
        outcome(&mut app, own(1024), &fd)?
    ));
    let second = Segment::create("forged", len).map_err(|e| e.to_string())?;
    for off in [rx, tx] {
        init_fifo(second.region(), off as usize, 4096).map_err(|e| e.to_string())?;
    }
    let fd2 = second.try_clone_fd().map_err(|e| e.to_string())?;
    say(&format!(
        "past-the-cap {}",
        outcome(&mut app, own(2048), &fd2)?
    ));
    let elsewhere: Vec<_> = (0..8)
        .map(|slot| {
            claim(
                SocketAddr::new([10, 9, 0, 1].into(), 4000 + slot as u16),
                slot,
            )
        })
        .collect();
    say(&format!(
        "other-namespace {}",
        outcome(&mut app, elsewhere, &fd)?
    ));
    let (pipe, _w) = rustix::pipe::pipe().map_err(|e| e.to_string())?;
    let one = vec![claim(SocketAddr::new([127, 0, 0, 1].into(), 9000), 0)];
    say(&format!("not-a-segment {}", outcome(&mut app, one, &pipe)?));
    hold();
    Ok(())
}

/// Opens connections to the app socket until told to stop, to take shuntd's descriptors.
fn hold_connections() -> Result<(), String> {
    let stop = stop_flag();
    let mut held = Vec::new();
    let mut said = false;
    while !stop.load(Ordering::Relaxed) {
        if held.len() < count()
            && let Ok(app) = RawApp::connect(&socket_path())
        {
            held.push(app.sock);
        }
        if !said && held.len() >= count() {
            say(&format!("holding {}", held.len()));
            said = true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Sends malformed messages, each on a connection of its own, and reports what shuntd did.
fn malformed() -> Result<(), String> {
    let attach = Request::Attach {
        namespace_id: "default".into(),
        namespace_secret: Vec::new(),
        app_name: "x".into(),
        scope: shunt_sapi::message::Scope::Local,
        event_queue_len: 0,
        resume: Default::default(),
    };
    let encoded = attach.encode(1);
    let (pipe, _w) = rustix::pipe::pipe().map_err(|e| e.to_string())?;
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("garbage", vec![0xff; 100], false),
        ("truncated", encoded[..encoded.len() / 2].to_vec(), false),
        ("attach-with-an-fd", encoded.clone(), true),
        ("oversized", vec![0; 70 << 10], false),
        (
            "resume-before-attach",
            Request::ResumeSessions(Vec::new()).encode(1),
            false,
        ),
    ];
    for (name, bytes, with_fd) in cases {
        let mut app = RawApp::connect(&socket_path()).map_err(|e| e.to_string())?;
        let fds = if with_fd { vec![pipe.as_fd()] } else { vec![] };
        let sent = shunt_shm::fdpass::send_with_fds(app.sock.as_fd(), &bytes, &fds);
        let answer = match sent {
            Err(e) => format!("send-refused:{}", e.kind()),
            Ok(_) => match app.recv(STEP) {
                Ok(Some((_, DaemonReply::Failure { code, .. }))) => {
                    // Then the connection closes.
                    match app.recv(STEP) {
                        Ok(None) => format!("failure:{}+closed", code.as_str()),
                        other => format!("failure:{}+{other:?}", code.as_str()),
                    }
                }
                Ok(None) => "closed".to_owned(),
                other => format!("{other:?}"),
            },
        };
        say(&format!("{name} {answer}"));
    }
    Ok(())
}

/// Tries to open, through /proc, the shared segments of the process the test names.
fn open_segments() -> Result<(), String> {
    let pid = std::env::var(PID).map_err(|e| e.to_string())?;
    let dir = format!("/proc/{pid}/fd");
    let (mut opened, mut denied, mut listed) = (0, 0, true);
    match std::fs::read_dir(&dir) {
        Err(_) => listed = false,
        Ok(entries) => {
            for e in entries.flatten() {
                let target = std::fs::read_link(e.path()).unwrap_or_default();
                if !target.to_string_lossy().contains("memfd:shunt-ct") {
                    continue;
                }
                match std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(e.path())
                {
                    Ok(_) => opened += 1,
                    Err(_) => denied += 1,
                }
            }
        }
    }
    say(&format!("listed {listed} opened {opened} denied {denied}"));
    Ok(())
}

/// Attaches to the namespace it is told, and says how it went.
fn attach_to() -> Result<(), String> {
    let mut app = RawApp::connect(&socket_path()).map_err(|e| e.to_string())?;
    let namespace = std::env::var(NAMESPACE).unwrap_or_else(|_| "default".into());
    match app.attach(&namespace, b"").map_err(|e| e.to_string())? {
        Ok(()) => say("attach ok"),
        Err(code) => say(&format!("attach {}", code.as_str())),
    }
    Ok(())
}

fn is_pipe(fd: &OwnedFd) -> bool {
    rustix::fs::fstat(fd)
        .is_ok_and(|s| rustix::fs::FileType::from_raw_mode(s.st_mode) == rustix::fs::FileType::Fifo)
}
