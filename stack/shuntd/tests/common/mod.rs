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
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("shuntd.yaml");
        std::fs::write(
            &config,
            format!(
                "app_socket: {}\ncontrol_socket: {}\nmetrics_address: ''\nworkers: 2\n{extra_config}",
                app_socket(dir.path()).display(),
                dir.path().join("control.sock").display(),
            ),
        )
        .unwrap();
        let child = Self::spawn(&config);
        let d = Daemon { dir, child, config };
        d.wait_ready();
        d
    }

    fn spawn(config: &Path) -> Child {
        Command::new(env!("CARGO_BIN_EXE_shuntd"))
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn shuntd")
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
        self.child = Self::spawn(&self.config);
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
