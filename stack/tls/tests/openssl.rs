//! Interoperability with OpenSSL's `s_server` and `s_client` over real localhost sockets.
//!
//! These tests need the `openssl` command and fail (they do not skip) without it.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{Blocking, CLIENT_ID, Leaf, Pki, SERVER_ID, alpn};
use shunt_tls::rustls::ProtocolVersion;
use shunt_tls::{ReadOutcome, SHUNT_ALPN, TlsStream};

const DEADLINE: Duration = Duration::from_secs(10);
/// Pause between attempts while waiting for OpenSSL to listen or connect.
const RETRY: Duration = Duration::from_millis(10);

/// Kills the OpenSSL process when the test ends, however it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Reaped {
    fn assert_running(&mut self) {
        if let Some(status) = self.0.try_wait().unwrap() {
            panic!("openssl exited early with {status}");
        }
    }
}

fn openssl(args: &[&str], stdin: Stdio, stdout: Stdio) -> Reaped {
    let child = Command::new("openssl")
        .args(args)
        .stdin(stdin)
        .stdout(stdout)
        .spawn()
        .expect("the `openssl` command is required by these tests; install OpenSSL");
    Reaped(child)
}

/// Writes a leaf's files into `dir/name/` and returns (cert, key) paths as strings.
fn leaf_files(dir: &Path, name: &str, leaf: &Leaf) -> (String, String) {
    let sub = dir.join(name);
    std::fs::create_dir(&sub).unwrap();
    let (cert, key) = leaf.write_to(&sub);
    (path(&cert), path(&key))
}

fn path(p: &Path) -> String {
    p.to_str().expect("UTF-8 temporary path").to_owned()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

#[test]
fn client_against_openssl_s_server() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = leaf_files(dir.path(), "server", &pki.server);
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.mesh.pem).unwrap();
    let ca = path(&ca);

    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let accept = format!("127.0.0.1:{port}");
    #[rustfmt::skip]
    let mut server = openssl(
        &[
            "s_server", "-accept", &accept, "-naccept", "1",
            "-cert", &cert, "-key", &key, "-CAfile", &ca,
            "-Verify", "1", "-verify_return_error",
            "-alpn", "shunt/1,h2",
            // Echoes each line back reversed.
            "-rev",
        ],
        Stdio::null(),
        Stdio::null(),
    );

    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + DEADLINE;
    let sock = loop {
        match TcpStream::connect(addr) {
            Ok(sock) => break sock,
            Err(e) => {
                server.assert_running();
                assert!(Instant::now() < deadline, "s_server never listened: {e}");
                thread::sleep(RETRY);
            }
        }
    };

    let ctx = pki
        .client
        .context(&pki.mesh.pem, |s| s.alpn = alpn(&["h2"]));
    let mut client = Blocking::new(sock, TlsStream::client(&ctx, true).unwrap());
    client.handshake();
    let peer = client.tls.peer().unwrap();
    assert_eq!(peer.identity.as_str(), SERVER_ID);
    assert_eq!(peer.alpn.as_deref(), Some(SHUNT_ALPN));
    assert_eq!(peer.tls_version, ProtocolVersion::TLSv1_3);
    assert!(client.tls.pairing_token().is_ok());

    client.write_all(b"hello shunt\n");
    let (line, _) = client.read_line();
    assert_eq!(String::from_utf8_lossy(&line), "tnuhs olleh\n");
    client.tls.send_close_notify();
    client.flush();
}

/// Runs `openssl s_client` with `extra` arguments against a server `TlsStream`; returns the
/// server's view after a ping/pong exchange, and checks the exporter value OpenSSL printed.
fn server_against_openssl_s_client(extra: &[&str]) -> shunt_tls::PeerInfo {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = leaf_files(dir.path(), "client", &pki.client);
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.mesh.pem).unwrap();
    let ca = path(&ca);

    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let connect = listener.local_addr().unwrap().to_string();
    #[rustfmt::skip]
    let mut args = vec![
        "s_client", "-connect", &connect,
        "-cert", &cert, "-key", &key, "-CAfile", &ca, "-verify_return_error",
        "-alpn", "shunt/1",
        "-keymatexport", "EXPORTER-shunt-pairing-v1", "-keymatexportlen", "32",
        // Lines starting with Q or R are data, not commands.
        "-nocommands",
    ];
    args.extend_from_slice(extra);
    let mut client = openssl(&args, Stdio::piped(), Stdio::piped());
    let mut stdin = client.0.stdin.take().unwrap();
    let stdout = client.0.stdout.take().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + DEADLINE;
    let sock = loop {
        match listener.accept() {
            Ok((sock, _)) => break sock,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                client.assert_running();
                assert!(Instant::now() < deadline, "s_client never connected");
                thread::sleep(RETRY);
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    sock.set_nonblocking(false).unwrap();

    let ctx = pki
        .server
        .context(&pki.mesh.pem, |s| s.alpn = alpn(&["h2"]));
    let mut server = Blocking::new(sock, TlsStream::server(&ctx));
    server.handshake();
    let peer = server.tls.peer().unwrap().clone();
    assert_eq!(peer.identity.as_str(), CLIENT_ID);
    assert!(server.tls.negotiated_shunt());
    let token = hex(&server.tls.pairing_token().unwrap());

    stdin.write_all(b"ping\n").unwrap();
    stdin.flush().unwrap();
    let (line, _) = server.read_line();
    assert_eq!(line, b"ping\n");
    server.write_all(b"pong\n");
    server.tls.send_close_notify();
    server.flush();

    // s_client prints the session (with the exporter value), then the data, and exits when it
    // receives close_notify.
    let (mut exported, mut ponged) = (None, false);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let timeout = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(timeout) {
            Ok(line) => {
                if let Some(value) = line.trim().strip_prefix("Keying material: ") {
                    exported = Some(value.to_owned());
                }
                ponged |= line == "pong";
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("s_client did not finish"),
        }
    }
    assert!(ponged, "s_client did not print the server's reply");
    assert_eq!(
        exported.as_deref(),
        Some(token.as_str()),
        "exporters differ"
    );

    // OpenSSL closes its side too.
    let mut buf = [0; 16];
    let end = server.tls.read_plaintext(&mut buf).unwrap();
    assert!(
        matches!(end, ReadOutcome::WouldBlock | ReadOutcome::Closed),
        "{end:?}"
    );
    drop(stdin);
    peer
}

#[test]
fn server_against_openssl_s_client_tls13() {
    let peer = server_against_openssl_s_client(&[]);
    assert_eq!(peer.tls_version, ProtocolVersion::TLSv1_3);
    assert_eq!(peer.alpn.as_deref(), Some(SHUNT_ALPN));
}

#[test]
fn server_against_openssl_s_client_tls12() {
    let peer = server_against_openssl_s_client(&["-tls1_2"]);
    assert_eq!(peer.tls_version, ProtocolVersion::TLSv1_2);
    assert_eq!(peer.alpn.as_deref(), Some(SHUNT_ALPN));
}
