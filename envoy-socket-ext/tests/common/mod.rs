//! Real parts for the module's tests: the pinned Envoy (fetched by `ci/envoy.sh`), a shuntd,
//! a backend that checks what it receives, and a TCP relay that counts what crosses the
//! sidecar-to-sidecar hop.
#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use shunt_tls::dev_pki::{DevCa, WorkloadFiles};

/// The pinned Envoy binary. Fails loudly if it cannot be fetched: these tests never skip.
pub fn envoy_binary() -> PathBuf {
    shunt_envoy_harness::envoy_binary().unwrap_or_else(|e| panic!("{e}"))
}

/// The directory holding `libshunt_envoy.so`, built beside this test's executable.
pub fn module_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let find = || {
        [deps, deps.parent().unwrap()]
            .into_iter()
            .find(|dir| dir.join("libshunt_envoy.so").exists())
            .map(Path::to_path_buf)
    };
    if let Some(dir) = find() {
        return dir;
    }
    // Another package's tests (shunt-xds's) run with only their own dependencies built.
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "shunt-envoy", "--lib"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cannot build libshunt_envoy.so");
    });
    find().unwrap_or_else(|| panic!("libshunt_envoy.so not found next to {}", exe.display()))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// shuntd, in this process, on temporary sockets.
pub struct Shuntd {
    pub dir: tempfile::TempDir,
    pub metrics: SocketAddr,
}

impl Shuntd {
    pub fn start() -> Shuntd {
        let dir = tempfile::tempdir().unwrap();
        let config = shuntd::config::Config::private(dir.path());
        let bg = shuntd::background::spawn(config).expect("shuntd starts");
        Shuntd {
            dir,
            metrics: bg.metrics_address.unwrap(),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("shuntd.sock")
    }

    /// Stores `files` in shuntd's certificate store as `name` (namespace `default`), with the
    /// `shunt` CLI.
    pub fn put_certificate(&self, name: &str, files: &WorkloadFiles) {
        let path = |p: &Path| p.to_str().expect("UTF-8 path").to_owned();
        self.shunt(&[
            "certs",
            "put",
            name,
            "--namespace",
            "default",
            "--cert-chain",
            &path(&files.cert_chain),
            "--private-key",
            &path(&files.private_key),
            "--trust-bundle",
            &path(&files.trust_bundle),
        ]);
    }

    /// Runs the `shunt` CLI against this shuntd, asserts it succeeded and returns its output.
    pub fn shunt(&self, args: &[&str]) -> String {
        let out = Command::new(shunt_cli())
            .arg("--control-socket")
            .arg(self.dir.path().join("control.sock"))
            .args(args)
            .output()
            .expect("run shunt");
        assert!(
            out.status.success(),
            "shunt {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Adds a global rule, tagged `tag`, that denies pairings with the peer identity
    /// `principal`.
    pub fn deny_principal(&self, tag: &str, principal: &str) {
        self.shunt(&[
            "rules",
            "add",
            "--scope",
            "global",
            "--tag",
            tag,
            "--action",
            "deny",
            "--principal",
            principal,
            "--priority",
            "1",
        ]);
    }

    /// The value of `series` once it reaches `want`, or after 10 s, whichever comes first:
    /// sidecars report asynchronously.
    pub fn metric_reaching(&self, series: &str, want: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let value = self.metric(series);
            if value >= want || Instant::now() >= deadline {
                return value;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The value of one series on `/metrics`, 0 if absent.
    pub fn metric(&self, series: &str) -> f64 {
        metric(self.metrics, series)
    }
}

/// The `shuntd` binary, built on first use (a no-op when the workspace is built already).
pub fn shuntd_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| workspace_binary("shuntd", "shuntd"))
        .clone()
}

/// The `shunt` CLI, built on first use.
pub fn shunt_cli() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| workspace_binary("shunt-cli", "shunt"))
        .clone()
}

/// A binary of another workspace package. A workspace test run (`cargo nextest run
/// --workspace`, as CI runs it) builds every binary first, with the features of that build;
/// building it again here with other features would rebuild and replace it on every run, so an
/// existing one is used and only a missing one is built.
fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    // Binaries sit in the profile directory, test executables in its `deps`.
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(bin);
    if path.exists() {
        return path;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "-p", package, "--bin", bin])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cannot build {bin}");
    assert!(path.exists(), "{} missing after the build", path.display());
    path
}

/// shuntd as its own process, so that a test can SIGKILL it and start it again.
pub struct ShuntdProcess {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub metrics: SocketAddr,
}

impl ShuntdProcess {
    pub fn start() -> ShuntdProcess {
        let mut d = ShuntdProcess {
            child: None,
            dir: tempfile::tempdir().unwrap(),
            metrics: SocketAddr::from(([127, 0, 0, 1], free_port())),
        };
        d.restart();
        d
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("shuntd.sock")
    }

    /// Starts shuntd (again) on the same sockets, and waits until it serves metrics.
    pub fn restart(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("shuntd.log")).unwrap();
        let child = Command::new(shuntd_binary())
            .arg("--app-socket")
            .arg(self.socket())
            .arg("--control-socket")
            .arg(self.dir.path().join("control.sock"))
            .args(["--metrics-address", &self.metrics.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn shuntd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(self.metrics).is_err() {
            assert!(Instant::now() < deadline, "shuntd did not start");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL: no cleanup, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn metric(&self, series: &str) -> f64 {
        metric(self.metrics, series)
    }
}

impl Drop for ShuntdProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The value of one series on a Prometheus endpoint, 0 if absent.
pub fn metric(addr: SocketAddr, series: &str) -> f64 {
    http_get(addr, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The body of `GET path`, or empty if the server is not (yet) answering: callers poll.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    shunt_envoy_harness::http_get(addr, path).unwrap_or_default()
}

/// The module's `transport_socket` block.
pub fn module_socket(config_yaml: &str) -> String {
    let escaped = config_yaml
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!(
        r#"
      transport_socket:
        name: envoy.transport_sockets.dynamic_modules
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.dynamic_modules.v3.DynamicModuleTransportSocket
          dynamic_module_config: {{name: shunt_envoy}}
          transport_socket_name: shunt
          transport_socket_config:
            "@type": type.googleapis.com/google.protobuf.StringValue
            value: "{escaped}""#
    )
}

pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
pub const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";

/// Certificates for a test mesh: workloads issued by the mesh CA, and by an unrelated one.
pub struct MeshCerts {
    pub dir: tempfile::TempDir,
    mesh: DevCa,
    other: DevCa,
}

impl MeshCerts {
    pub fn new() -> MeshCerts {
        MeshCerts {
            dir: tempfile::tempdir().unwrap(),
            mesh: DevCa::new("mesh CA").unwrap(),
            other: DevCa::new("unrelated CA").unwrap(),
        }
    }

    /// Files of a workload with this SPIFFE id, issued by the mesh CA.
    pub fn workload(&self, name: &str, id: &str) -> WorkloadFiles {
        self.mesh
            .write_workload(id, &self.dir.path().join(name))
            .unwrap()
    }

    /// Files of a workload issued by an unrelated CA (its trust bundle is that CA, too).
    pub fn outsider(&self, name: &str, id: &str) -> WorkloadFiles {
        self.other
            .write_workload(id, &self.dir.path().join(name))
            .unwrap()
    }
}

/// The start of a module config that attaches to the shuntd at `socket`.
pub fn shuntd_at(socket: &Path) -> String {
    // The default 200 ms budget for pairing is for production; a test suite running many
    // Envoys on two cores can exceed it, and the tests count pairings exactly.
    format!(
        "shuntd_socket: {}\npairing_timeout_ms: 5000\n",
        socket.display()
    )
}

/// Two sidecars with the module in mutual-TLS mode, with the `client` and `server` workloads
/// of `certs`; each side's module config starts with its prefix (say, its [`shuntd_at`]).
pub fn mtls_chain(certs: &MeshCerts, client_prefix: &str, server_prefix: &str) -> Chain {
    let client = certs.workload("client", CLIENT_ID);
    let server = certs.workload("server", SERVER_ID);
    chain(
        &module_socket(&format!(
            "{client_prefix}{}",
            module_tls(&client, SERVER_ID)
        )),
        &module_socket(&format!(
            "{server_prefix}{}",
            module_tls(&server, CLIENT_ID)
        )),
    )
}

/// The module's `tls` block for `files`, accepting only `peer`.
pub fn module_tls(files: &WorkloadFiles, peer: &str) -> String {
    format!(
        "tls:\n  cert_chain: {}\n  private_key: {}\n  trust_bundle: {}\n  peer_identities: [\"{peer}\"]\n",
        files.cert_chain.display(),
        files.private_key.display(),
        files.trust_bundle.display()
    )
}

/// Envoy's own TLS transport socket as Istio configures ISTIO_MUTUAL: a client certificate
/// both ways, the mesh CA, and the peer's SPIFFE id as the only accepted name.
pub fn envoy_tls_socket(upstream: bool, files: &WorkloadFiles, peer: &str) -> String {
    let (kind, extra, alpn) = if upstream {
        ("UpstreamTlsContext", "", "[istio-peer-exchange, istio]")
    } else {
        (
            "DownstreamTlsContext",
            "\n          require_client_certificate: true",
            "[istio-peer-exchange, h2, http/1.1]",
        )
    };
    format!(
        r#"
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{kind}{extra}
          common_tls_context:
            alpn_protocols: {alpn}
            tls_params: {{tls_minimum_protocol_version: TLSv1_2, tls_maximum_protocol_version: TLSv1_3}}
            tls_certificates:
            - certificate_chain: {{filename: {chain}}}
              private_key: {{filename: {key}}}
            validation_context:
              trusted_ca: {{filename: {ca}}}
              match_typed_subject_alt_names:
              - san_type: URI
                matcher: {{exact: "{peer}"}}"#,
        chain = files.cert_chain.display(),
        key = files.private_key.display(),
        ca = files.trust_bundle.display(),
    )
}

/// The module's companion network filter (`peer_identity`), as a filter-list item for
/// [`tcp_sidecar_with_filters`].
pub const COMPANION_FILTER: &str = r#"
      - name: envoy.filters.network.dynamic_modules
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.dynamic_modules.v3.DynamicModuleNetworkFilter
          dynamic_module_config: {name: shunt_envoy}
          filter_name: peer_identity"#;

/// A TCP sidecar: listener on `listen` → tcp_proxy → `upstream`, with optional module sockets
/// on either side (strings from [`module_socket`], or empty).
pub fn tcp_sidecar(
    listen: u16,
    listener_socket: &str,
    upstream: u16,
    cluster_socket: &str,
) -> String {
    tcp_sidecar_with_filters(listen, "", listener_socket, upstream, cluster_socket)
}

/// [`tcp_sidecar`] with network filters (YAML list items at the filters' indentation) before
/// `tcp_proxy`.
pub fn tcp_sidecar_with_filters(
    listen: u16,
    filters: &str,
    listener_socket: &str,
    upstream: u16,
    cluster_socket: &str,
) -> String {
    let filters = format!(
        r#"{filters}
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: in
          cluster: out"#
    );
    sidecar(
        listen,
        &filters,
        listener_socket,
        upstream,
        cluster_socket,
        "",
    )
}

/// A sidecar: a listener on `listen` whose filter chain runs `filters` (YAML list items at
/// the filters' indentation) and a cluster `out` to `upstream`. The sockets are
/// `transport_socket` blocks, or empty; `cluster_options` adds cluster fields.
pub fn sidecar(
    listen: u16,
    filters: &str,
    listener_socket: &str,
    upstream: u16,
    cluster_socket: &str,
    cluster_options: &str,
) -> String {
    // Cluster fields sit two columns left of filter-chain fields.
    let cluster_socket = cluster_socket.replace("\n  ", "\n");
    format!(
        r#"
static_resources:
  listeners:
  - name: in
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:{filters}{listener_socket}
  clusters:
  - name: out
    connect_timeout: 10s
    type: STATIC{cluster_options}
    load_assignment:
      cluster_name: out
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream}}}}}}}{cluster_socket}
"#
    )
}

/// client → Envoy A (listener → tcp_proxy → cluster with `a_socket`) → relay → Envoy B
/// (listener with `b_socket` → tcp_proxy) → backend.
pub struct Chain {
    pub b: Envoy,
    pub a: Envoy,
    pub relay: Relay,
    pub entry: u16,
    /// The server sidecar's listener: the local end of what its pairings replace.
    pub b_port: u16,
}

impl Chain {
    /// Runs one exchange; on failure, panics with both sidecars' logs.
    pub fn exchange(&self, up: u64, down: u64) {
        if let Err(e) = exchange(self.entry, up, down) {
            panic!(
                "{up} up / {down} down: {e}\n--- envoy a ---\n{}\n--- envoy b ---\n{}",
                tail(&self.a.log()),
                tail(&self.b.log())
            );
        }
    }
}

pub fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// Two sidecars whose sockets are `transport_socket` blocks (from [`module_socket`] or
/// [`envoy_tls_socket`]; empty for raw TCP).
pub fn chain(a_socket: &str, b_socket: &str) -> Chain {
    let backend = Backend::start();
    let (a_port, b_port) = (free_port(), free_port());
    let b = start_envoy("b", &tcp_sidecar(b_port, b_socket, backend.port, ""));
    let relay = Relay::start(b_port);
    let a = start_envoy("a", &tcp_sidecar(a_port, "", relay.port, a_socket));
    Chain {
        b,
        a,
        relay,
        entry: a_port,
        b_port,
    }
}

pub use shunt_envoy_harness::Envoy;

/// Starts the pinned Envoy on `bootstrap` with this build's module and its trace log, or
/// panics with Envoy's log.
pub fn start_envoy(name: &str, bootstrap: &str) -> Envoy {
    Envoy::start(
        name,
        bootstrap,
        &module_dir(),
        &["--component-log-level", "dynamic_modules:trace"],
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Deterministic payload, so both ends can check bytes without storing them.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = (offset + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
        *b = (x >> 29) as u8;
    }
}

/// A backend that reads a request (8-byte reply length, then payload until EOF), then answers
/// with the sha256 of the payload followed by the reply. It answers only after EOF, so a
/// half-close must cross every hop.
pub struct Backend {
    pub port: u16,
}

impl Backend {
    pub fn start() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                thread::spawn(move || {
                    let mut len = [0u8; 8];
                    if conn.read_exact(&mut len).is_err() {
                        return;
                    }
                    let reply_len = u64::from_le_bytes(len);
                    let mut h = Sha256::new();
                    let mut buf = vec![0u8; 256 * 1024];
                    loop {
                        match conn.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => h.update(&buf[..n]),
                            Err(_) => return,
                        }
                    }
                    if conn.write_all(&h.finalize()).is_err() {
                        return;
                    }
                    let mut sent = 0u64;
                    while sent < reply_len {
                        let n = (reply_len - sent).min(buf.len() as u64) as usize;
                        fill(2, sent, &mut buf[..n]);
                        if conn.write_all(&buf[..n]).is_err() {
                            return;
                        }
                        sent += n as u64;
                    }
                    let _ = conn.shutdown(Shutdown::Write);
                });
            }
        });
        Backend { port }
    }
}

/// Sends `up` bytes through `port`, half-closes, and checks the backend's answer: the sha256 of
/// what it received and `down` bytes of its pattern. Returns an error naming what differed.
pub fn exchange(port: u16, up: u64, down: u64) -> Result<(), String> {
    exchange_counting(port, up, down, &AtomicU64::new(0))
}

/// [`exchange`], adding the bytes sent so far to `sent_so_far` as they go.
pub fn exchange_counting(
    port: u16,
    up: u64,
    down: u64,
    sent_so_far: &AtomicU64,
) -> Result<(), String> {
    let s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    exchange_over(s, up, down, sent_so_far)
}

/// [`exchange`] over a connection opened already.
pub fn exchange_over(
    mut s: TcpStream,
    up: u64,
    down: u64,
    sent_so_far: &AtomicU64,
) -> Result<(), String> {
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut reader = s.try_clone().unwrap();
    let receiver = thread::spawn(move || -> Result<([u8; 32], u64), String> {
        let mut digest = [0u8; 32];
        reader
            .read_exact(&mut digest)
            .map_err(|e| format!("reading the backend's digest: {e}"))?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut expect = vec![0u8; 256 * 1024];
        let mut got = 0u64;
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| format!("after {got} reply bytes: {e}"))?;
            if n == 0 {
                break;
            }
            fill(2, got, &mut expect[..n]);
            if buf[..n] != expect[..n] {
                return Err(format!("reply differs near offset {got}"));
            }
            got += n as u64;
        }
        Ok((digest, got))
    });
    s.write_all(&down.to_le_bytes())
        .map_err(|e| e.to_string())?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut sent = 0u64;
    while sent < up {
        let n = (up - sent).min(buf.len() as u64) as usize;
        fill(1, sent, &mut buf[..n]);
        s.write_all(&buf[..n])
            .map_err(|e| format!("after {sent} request bytes: {e}"))?;
        h.update(&buf[..n]);
        sent += n as u64;
        sent_so_far.fetch_add(n as u64, Ordering::Relaxed);
    }
    s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    let (digest, got) = receiver.join().unwrap()?;
    if digest[..] != h.finalize()[..] {
        return Err("the backend received different bytes (sha256 mismatch)".into());
    }
    if got != down {
        return Err(format!("reply was {got} bytes, expected {down}"));
    }
    Ok(())
}

/// A TCP relay between two sidecars that counts the bytes crossing it each way.
pub struct Relay {
    pub port: u16,
    pub bytes: Arc<AtomicU64>,
}

impl Relay {
    pub fn start(to: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let bytes = Arc::new(AtomicU64::new(0));
        let counter = bytes.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(a) = conn else { continue };
                let Ok(b) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                // Doorbells are single bytes; Nagle would hold each one for an ACK.
                let _ = a.set_nodelay(true);
                let _ = b.set_nodelay(true);
                for (mut from, mut into) in
                    [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)]
                {
                    let counter = counter.clone();
                    thread::spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    counter.fetch_add(n as u64, Ordering::Relaxed);
                                    if into.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = into.shutdown(Shutdown::Write);
                    });
                }
            }
        });
        Relay { port, bytes }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}
