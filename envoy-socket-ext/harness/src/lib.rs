//! The pinned Envoy as a child process, for Shunt's tests and benchmarks: fetch it (through
//! `ci/envoy.sh`, which caches and hash-checks it), start it on a bootstrap with its admin on a
//! free port, wait until it is live, read its admin endpoint and log, and kill it when done.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("ci/envoy.sh could not provide Envoy: {0}")]
    Fetch(String),
    #[error("cannot start envoy {name}: {source}")]
    Spawn {
        name: String,
        source: std::io::Error,
    },
    #[error("envoy {name} exited ({status}):\n{log}")]
    Exited {
        name: String,
        status: ExitStatus,
        log: String,
    },
    #[error("envoy {name} not ready within {READY_TIMEOUT:?}:\n{log}")]
    NotReady { name: String, log: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The pinned Envoy binary, fetched and cached by the repository's `ci/envoy.sh` (asked once
/// per process).
pub fn envoy_binary() -> Result<PathBuf, HarnessError> {
    static FOUND: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if let Some(path) = FOUND.get() {
        return Ok(path.clone());
    }
    let path = fetch_envoy()?;
    Ok(FOUND.get_or_init(|| path).clone())
}

fn fetch_envoy() -> Result<PathBuf, HarnessError> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ci/envoy.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| HarnessError::Fetch(format!("run {}: {e}", script.display())))?;
    if !out.status.success() {
        return Err(HarnessError::Fetch(format!("exit {}", out.status)));
    }
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !path.is_file() {
        return Err(HarnessError::Fetch(format!(
            "it printed `{}`, which is not a file",
            path.display()
        )));
    }
    Ok(path)
}

/// A running Envoy, killed when dropped.
pub struct Envoy {
    name: String,
    child: Child,
    admin: SocketAddr,
    // Holds the bootstrap and the log.
    dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts the pinned Envoy on `bootstrap` (YAML or JSON, without `admin`: an admin on a
    /// free loopback port is added) with one worker, dynamic modules looked up in
    /// `module_dir`, and `extra_args`; returns once its admin reports LIVE.
    pub fn start(
        name: &str,
        bootstrap: &str,
        module_dir: &Path,
        extra_args: &[&str],
    ) -> Result<Envoy, HarnessError> {
        let envoy = envoy_binary()?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("envoy-{name}"))
            .tempdir()?;
        // JSON is YAML, so one file name serves both.
        let config = dir.path().join("envoy.yaml");
        std::fs::write(&config, bootstrap)?;
        let admin_path = dir.path().join("admin.address");
        let log = std::fs::File::create(dir.path().join("envoy.log"))?;
        let spawn_error = |source| HarnessError::Spawn {
            name: name.to_owned(),
            source,
        };
        let child = Command::new(envoy)
            .arg("--config-path")
            .arg(&config)
            .args([
                "--config-yaml",
                "admin: {address: {socket_address: {address: 127.0.0.1, port_value: 0}}}",
            ])
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "-l",
                "warning",
            ])
            .arg("--admin-address-path")
            .arg(&admin_path)
            // Several Envoys run side by side, also from parallel test processes.
            .args(["--base-id", &unique_base_id().to_string()])
            .args(extra_args)
            .env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", module_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(spawn_error)?;
        let mut envoy = Envoy {
            name: name.to_owned(),
            child,
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
        };
        envoy.wait_ready(&admin_path)?;
        Ok(envoy)
    }

    fn wait_ready(&mut self, admin_path: &Path) -> Result<(), HarnessError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(HarnessError::Exited {
                    name: self.name.clone(),
                    status,
                    log: self.log_tail(60),
                });
            }
            if self.admin.port() == 0
                && let Some(addr) = std::fs::read_to_string(admin_path)
                    .ok()
                    .and_then(|t| t.trim().parse().ok())
            {
                self.admin = addr;
            }
            if self.admin.port() != 0
                && http_get(self.admin, "/ready").is_ok_and(|b| b.trim() == "LIVE")
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::NotReady {
                    name: self.name.clone(),
                    log: self.log_tail(60),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The body of `GET path` on the admin endpoint.
    pub fn admin_get(&self, path: &str) -> Result<String, HarnessError> {
        Ok(http_get(self.admin, path)?)
    }

    /// The value of the counter or gauge `name`, 0 if absent.
    pub fn stat(&self, name: &str) -> u64 {
        self.admin_get(&format!("/stats?filter=^{name}$"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: "))?.parse().ok())
            .unwrap_or(0)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.kill();
    }
}

fn unique_base_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    u64::from(std::process::id()) * 64 + NEXT.fetch_add(1, Ordering::Relaxed) % 64
}

/// The body of `GET path` over HTTP/1.1 (as Envoy's admin answers: possibly chunked).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let Some((head, body)) = out.split_once("\r\n\r\n") else {
        return Err(std::io::Error::other(format!("GET {path}: no HTTP answer")));
    };
    let status_ok = head.split_whitespace().nth(1) == Some("200");
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    if status_ok {
        Ok(body)
    } else {
        Err(std::io::Error::other(format!(
            "GET {path}: {}",
            head.lines().next().unwrap_or_default()
        )))
    }
}

/// Chunked transfer coding: size line, data, CRLF, until a zero size.
fn dechunk(mut rest: &str) -> String {
    let mut decoded = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        decoded.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    decoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk("4\r\nLIVE\r\n3\r\n ok\r\n0\r\n\r\n"), "LIVE ok");
        assert_eq!(dechunk("zz\r\n"), "");
    }
}
