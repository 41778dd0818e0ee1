//! A real `shuntd` process on temporary paths, and helpers to wait for conditions.

#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shunt_client::{AttachOptions, Session, Worker};

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub child: Child,
    pub config: PathBuf,
    /// Where `/metrics` is served, when started with [`Daemon::start_with_metrics`].
    pub metrics: Option<std::net::SocketAddr>,
    /// Where shuntd's log goes, when not to the test's own output.
    pub log: Option<PathBuf>,
}

/// How to start a [`Daemon`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Options<'a> {
    /// YAML lines added to the test configuration.
    pub extra_config: &'a str,
    /// Serve `/metrics` on a free loopback port.
    pub metrics: bool,
    /// Write shuntd's log to a file in its directory, for the test to read.
    pub log_to_file: bool,
    /// Let every user reach the app socket (its directory is otherwise the test's alone).
    pub open_to_all_users: bool,
}

pub fn app_socket(dir: &Path) -> PathBuf {
    dir.join("shuntd.sock")
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::yield_now();
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Daemon {
    pub fn start(extra_config: &str) -> Daemon {
        Self::start_with(Options {
            extra_config,
            ..Options::default()
        })
    }

    /// Like [`Daemon::start`], with `/metrics` on a free loopback port.
    pub fn start_with_metrics(extra_config: &str) -> Daemon {
        Self::start_with(Options {
            extra_config,
            metrics: true,
            ..Options::default()
        })
    }

    pub fn start_with(options: Options<'_>) -> Daemon {
        let metrics = options.metrics.then(|| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .unwrap()
        });
        let extra_config = options.extra_config;
        let dir = tempfile::tempdir().unwrap();
        if options.open_to_all_users {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let log = options.log_to_file.then(|| dir.path().join("shuntd.log"));
        let config = dir.path().join("shuntd.yaml");
        let metrics_address = metrics.map(|a| a.to_string()).unwrap_or_default();
        std::fs::write(
            &config,
            format!(
                "app_socket: {}\ncontrol_socket: {}\nmetrics_address: '{metrics_address}'\nworkers: 2\n{extra_config}",
                app_socket(dir.path()).display(),
                dir.path().join("control.sock").display(),
            ),
        )
        .unwrap();
        let child = Self::spawn(&config, log.as_deref());
        let d = Daemon {
            dir,
            child,
            config,
            metrics,
            log,
        };
        d.wait_ready();
        d
    }

    /// shuntd's metrics in the text format (see [`Daemon::start_with_metrics`]).
    pub fn scrape(&self) -> String {
        scrape(self.metrics.expect("started with metrics"))
    }

    fn spawn(config: &Path, log: Option<&Path>) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shuntd"));
        cmd.arg("--config")
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        if let Some(log) = log {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap();
            cmd.stderr(file);
        }
        cmd.spawn().expect("spawn shuntd")
    }

    /// shuntd's log so far (see [`Options::log_to_file`]).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.as_ref().expect("logging to a file")).unwrap()
    }

    pub fn wait_ready(&self) {
        let sock = app_socket(self.dir.path());
        assert!(
            eventually(
                Duration::from_secs(10),
                || std::os::unix::net::UnixStream::connect(&sock).is_ok()
                    || seqpacket_connects(&sock)
            ),
            "shuntd did not come up"
        );
    }

    pub fn socket(&self) -> PathBuf {
        app_socket(self.dir.path())
    }

    /// SIGKILLs shuntd, as a crash would.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn restart(&mut self) {
        self.child = Self::spawn(&self.config, self.log.as_deref());
        self.wait_ready();
    }

    pub fn attach(&self, name: &str) -> Worker {
        Worker::attach(AttachOptions::new(self.socket()).app_name(name)).expect("attach")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn seqpacket_connects(path: &Path) -> bool {
    use rustix::net::{
        AddressFamily, SocketAddrUnix, SocketFlags, SocketType, connect, socket_with,
    };
    let Ok(fd) = socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    ) else {
        return false;
    };
    SocketAddrUnix::new(path)
        .and_then(|a| connect(&fd, &a))
        .is_ok()
}

/// Fails if any of `workers` went on after a blocked read or write only because its safety
/// re-check ran out: each such time a wake-up was lost.
pub fn assert_no_lost_wakeups(workers: &[&Worker]) {
    for w in workers {
        assert_eq!(w.stats().fallback_wakeups, 0, "a wake-up was lost");
    }
}

/// One test per named function, for test binaries with a `main` of their own (they also run
/// child roles, which must not be tests).
#[macro_export]
macro_rules! trials {
    ($($test:ident),* $(,)?) => {
        vec![$(libtest_mimic::Trial::test(stringify!($test), || {
            $test();
            Ok(())
        })),*]
    };
}
#[allow(
    unused_imports,
    reason = "used by the test binaries with a main of their own"
)]
pub use trials;

/// Runs `trials` as the test binary's tests, with the usual command line.
pub fn run_trials(trials: Vec<libtest_mimic::Trial>) -> std::process::ExitCode {
    libtest_mimic::run(&libtest_mimic::Arguments::from_args(), trials).exit_code()
}

/// A deterministic byte stream: the byte at position `i` of stream `seed`.
pub fn pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = (offset + i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
        *b = (x >> 29) as u8;
    }
}

/// Writes `len` pattern bytes and returns their crc32.
pub fn send_pattern(s: &mut Session, seed: u64, len: u64) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    while sent < len {
        let n = (len - sent).min(buf.len() as u64) as usize;
        pattern(seed, sent, &mut buf[..n]);
        s.write_all(&buf[..n]).unwrap();
        crc.update(&buf[..n]);
        sent += n as u64;
    }
    crc.finalize()
}

/// Reads to end-of-stream and returns (bytes, crc32).
pub fn recv_all(s: &mut Session) -> (u64, u32) {
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            return (total, crc.finalize());
        }
        crc.update(&buf[..n]);
        total += n as u64;
    }
}

/// A client of shuntd's gRPC control API over its Unix socket, as `shunt` reaches it. Waits
/// for the socket: shuntd binds it just after the app socket.
pub async fn control_client(
    socket: &Path,
) -> shunt_proto::control::control_client::ControlClient<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let connected = shunt_proto::control_client(socket).await;
        match connected {
            Ok(client) => return client,
            Err(e) if Instant::now() >= deadline => panic!("control socket: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

impl Daemon {
    pub fn control_socket(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }
}

/// Runs a control-API exchange from a synchronous test.
pub fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// `/metrics` of the shuntd serving it at `addr`, retried while it starts.
pub fn scrape(addr: std::net::SocketAddr) -> String {
    use std::net::TcpStream;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => panic!("metrics at {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: shuntd\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    response
}

/// The value of the sample whose name-and-labels line starts with `series`.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
}

/// The value of `series`, or 0 when no sample of it was recorded yet.
pub fn sample_or_zero(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}
