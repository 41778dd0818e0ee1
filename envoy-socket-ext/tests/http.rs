//! The module under HTTP: `http_connection_manager` on both sidecars, HTTP/1.1 or HTTP/2
//! between them, real curl as the client. Each request uploads a body and downloads one; the
//! backend answers with the upload's sha256 and a patterned body, both checked.
//!
//! curl → Envoy A (HCM → router → cluster with the module) → Envoy B (module → HCM → router)
//! → backend (HTTP/1.1).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::thread;

use common::{
    CLIENT_ID, MeshCerts, SERVER_ID, Shuntd, fill, free_port, module_socket, module_tls, sidecar,
    start_envoy,
};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

/// A sidecar with an HTTP connection manager routing everything to `upstream`; with
/// `upstream_h2`, it speaks HTTP/2 to it.
fn http_sidecar(
    listen: u16,
    listener_socket: &str,
    upstream: u16,
    cluster_socket: &str,
    upstream_h2: bool,
) -> String {
    let protocol = if upstream_h2 {
        r#"
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}"#
    } else {
        ""
    };
    let hcm = r#"
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: in
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: out, timeout: 60s}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"#;
    sidecar(
        listen,
        hcm,
        listener_socket,
        upstream,
        cluster_socket,
        protocol,
    )
}

/// An HTTP/1.1 backend: reads the request body (Content-Length or chunked), answers with its
/// sha256 in `x-upload-sha256` and `x-reply-bytes` bytes of the test pattern.
fn http_backend() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            thread::spawn(move || serve(conn));
        }
    });
    port
}

fn serve(conn: TcpStream) {
    let mut out = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    loop {
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end().to_owned();
            if line.is_empty() {
                break;
            }
            headers.push(line.to_ascii_lowercase());
        }
        let header = |name: &str| {
            headers.iter().find_map(|h| {
                h.strip_prefix(&format!("{name}:"))
                    .map(|v| v.trim().to_owned())
            })
        };
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        if let Some(len) = header("content-length") {
            let mut left: u64 = len.parse().unwrap();
            let cap = buf.len() as u64;
            while left > 0 {
                let n = r.read(&mut buf[..left.min(cap) as usize]).unwrap();
                assert!(n > 0, "request body cut short");
                h.update(&buf[..n]);
                left -= n as u64;
            }
        } else if header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
            loop {
                let mut size = String::new();
                r.read_line(&mut size).unwrap();
                let size = usize::from_str_radix(size.trim(), 16).unwrap();
                let mut chunk = vec![0u8; size + 2];
                r.read_exact(&mut chunk).unwrap();
                if size == 0 {
                    break;
                }
                h.update(&chunk[..size]);
            }
        }
        let reply: u64 = header("x-reply-bytes").map_or(0, |v| v.parse().unwrap());
        let digest: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        write!(
            out,
            "HTTP/1.1 200 OK\r\ncontent-length: {reply}\r\nx-upload-sha256: {digest}\r\n\r\n"
        )
        .unwrap();
        let mut sent = 0;
        while sent < reply {
            let n = (reply - sent).min(buf.len() as u64) as usize;
            fill(2, sent, &mut buf[..n]);
            out.write_all(&buf[..n]).unwrap();
            sent += n as u64;
        }
    }
}

/// Uploads `up` bytes with curl and checks both directions.
fn curl_exchange(dir: &Path, port: u16, http2: bool, up: u64, down: u64) {
    let upload = dir.join("upload.bin");
    let mut body = vec![0u8; up as usize];
    fill(1, 0, &mut body);
    std::fs::write(&upload, &body).unwrap();
    let expected: String = Sha256::digest(&body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let reply = dir.join("reply.bin");
    let out = Command::new("curl")
        .args(["-sS", "--fail", "-X", "POST", "-D", "-"])
        .arg(if http2 {
            "--http2-prior-knowledge"
        } else {
            "--http1.1"
        })
        .arg("--data-binary")
        .arg(format!("@{}", upload.display()))
        .args(["-H", &format!("x-reply-bytes: {down}"), "-o"])
        .arg(&reply)
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .expect("run curl");
    let headers = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(
        out.status.success(),
        "curl failed: {}{headers}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        headers.contains(&format!("x-upload-sha256: {expected}")),
        "the backend received different bytes: {headers}"
    );
    let got = std::fs::read(&reply).unwrap();
    let mut want = vec![0u8; down as usize];
    fill(2, 0, &mut want);
    assert!(got == want, "the reply differs ({} bytes)", got.len());
}

fn run(h2_between_sidecars: bool, client_h2: bool) {
    let d = Shuntd::start();
    let certs = MeshCerts::new();
    let client = certs.workload("client", CLIENT_ID);
    let server = certs.workload("server", SERVER_ID);
    let at = common::shuntd_at(&d.socket());
    let backend = http_backend();
    let (a_port, b_port) = (free_port(), free_port());
    let _b = start_envoy(
        "b",
        &http_sidecar(
            b_port,
            &module_socket(&(at.clone() + &module_tls(&server, CLIENT_ID))),
            backend,
            "",
            false,
        ),
    );
    let _a = start_envoy(
        "a",
        &http_sidecar(
            a_port,
            "",
            b_port,
            &module_socket(&(at + &module_tls(&client, SERVER_ID))),
            h2_between_sidecars,
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    for (up, down) in [(64 * MIB, 64 * MIB), (0, 10), (3, 0), (1000, 1000)] {
        curl_exchange(dir.path(), a_port, client_h2, up, down);
    }
    // Requests share the sidecars' connection, which paired; shuntd's FIFO counters saw the
    // payload go through shared memory.
    assert!(d.metric("shunt_pairings_total{result=\"paired\"}") >= 1.0);
    let through_fifos = d.metric("shunt_cut_through_bytes_total");
    assert!(
        through_fifos >= (128 * MIB) as f64,
        "{through_fifos} bytes went through the FIFOs"
    );
    // The sidecars' connection is still open (pooled), yet its bytes are reported as they
    // flow, in steps of 16 MiB: at least 48 of each 64.
    let reported = d.metric_reaching(
        "shunt_sidecar_bytes_total{mode=\"cut_through\"}",
        (96 * MIB) as f64,
    );
    assert!(reported >= (96 * MIB) as f64, "{reported} bytes reported");
}

#[test]
fn http1_between_sidecars_through_shared_memory() {
    run(false, false);
}

#[test]
fn http2_between_sidecars_through_shared_memory() {
    run(true, true);
}
