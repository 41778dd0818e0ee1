//! Test PKI made with rcgen, and drivers that move bytes between TLS endpoints in memory or over
//! a blocking socket.

#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use shunt_tls::dev_pki::{CertificateParams, DevCa};
use shunt_tls::rustls::pki_types::CertificateDer;
use shunt_tls::{CertSource, ReadOutcome, TlsContext, TlsError, TlsSettings, TlsStream};

pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
pub const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";

/// A certificate authority that issues workload certificates: the crate's dev PKI.
pub struct Ca {
    dev: DevCa,
    pub pem: String,
}

/// A leaf certificate and its key.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let dev = DevCa::new(name).unwrap();
        let pem = dev.pem.clone();
        Self { dev, pem }
    }

    /// A workload certificate, valid now, with these URI SANs (none: no SAN at all).
    pub fn leaf(&self, uris: &[&str]) -> Leaf {
        self.leaf_with(uris, |_| {})
    }

    /// Like [`leaf`](Self::leaf), with the parameters adjusted by `adjust` before signing.
    pub fn leaf_with(&self, uris: &[&str], adjust: impl FnOnce(&mut CertificateParams)) -> Leaf {
        let leaf = self.dev.issue_with(uris, adjust).unwrap();
        Leaf {
            cert_pem: leaf.cert_pem,
            key_pem: leaf.key_pem,
            der: CertificateDer::from(leaf.der),
        }
    }
}

/// The usual cast: a mesh CA, an unrelated CA, and client and server workloads of the mesh.
pub struct Pki {
    pub mesh: Ca,
    pub other: Ca,
    pub client: Leaf,
    pub server: Leaf,
}

impl Pki {
    pub fn new() -> Self {
        let mesh = Ca::new("mesh CA");
        let other = Ca::new("unrelated CA");
        let client = mesh.leaf(&[CLIENT_ID]);
        let server = mesh.leaf(&[SERVER_ID]);
        Self {
            mesh,
            other,
            client,
            server,
        }
    }
}

impl Leaf {
    /// In-memory material for this leaf, trusting `bundle`.
    pub fn source(&self, bundle: &str) -> CertSource {
        CertSource::Pem {
            cert_chain: self.cert_pem.clone(),
            private_key: self.key_pem.clone(),
            trust_bundle: bundle.to_owned(),
        }
    }

    /// A context for this leaf trusting `bundle`, with `adjust` applied to the default settings.
    pub fn context(&self, bundle: &str, adjust: impl FnOnce(&mut TlsSettings)) -> TlsContext {
        let mut settings = TlsSettings::new(self.source(bundle));
        adjust(&mut settings);
        TlsContext::new(settings).unwrap()
    }

    /// Writes `cert.pem` and `key.pem` into `dir`, replacing them atomically (a rename, as a
    /// certificate agent rotating files does); returns their paths.
    pub fn write_to(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        replace_file(&cert, self.cert_pem.as_bytes());
        replace_file(&key, self.key_pem.as_bytes());
        (cert, key)
    }
}

pub fn replace_file(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

pub fn alpn(protocols: &[&str]) -> Vec<Vec<u8>> {
    protocols.iter().map(|p| p.as_bytes().to_vec()).collect()
}

/// One end of a TLS connection that the in-memory pump can drive: a [`TlsStream`] or a plain
/// rustls connection standing in for a peer this crate would not build.
pub trait Endpoint {
    fn output(&mut self, out: &mut Vec<u8>);
    fn input(&mut self, data: &[u8]) -> Result<usize, TlsError>;
}

impl Endpoint for TlsStream {
    fn output(&mut self, out: &mut Vec<u8>) {
        self.pending_output(out);
    }

    fn input(&mut self, data: &[u8]) -> Result<usize, TlsError> {
        self.feed(data)
    }
}

impl Endpoint for shunt_tls::rustls::Connection {
    fn output(&mut self, out: &mut Vec<u8>) {
        while self.wants_write() {
            self.write_tls(out).unwrap();
        }
    }

    fn input(&mut self, mut data: &[u8]) -> Result<usize, TlsError> {
        let len = data.len();
        while !data.is_empty() {
            self.read_tls(&mut data).unwrap();
            self.process_new_packets()?;
        }
        Ok(len)
    }
}

/// What each end of a handshake run by [`handshake`] ended with.
#[derive(Debug)]
pub struct Outcome {
    pub client: Option<TlsError>,
    pub server: Option<TlsError>,
}

impl Outcome {
    pub fn assert_ok(&self) {
        assert!(
            self.client.is_none() && self.server.is_none(),
            "handshake failed: {self:?}"
        );
    }

    /// The failure labels seen by the client and by the server.
    pub fn labels(&self) -> (&'static str, &'static str) {
        let label = |e: &Option<TlsError>| e.as_ref().map_or("none", |e| e.failure().as_str());
        (label(&self.client), label(&self.server))
    }
}

/// Moves bytes between the two ends until neither has anything more to say. An end that fails
/// stops receiving, but what it still sends (its alert) is delivered.
pub fn handshake(client: &mut impl Endpoint, server: &mut impl Endpoint) -> Outcome {
    let mut outcome = Outcome {
        client: None,
        server: None,
    };
    let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
    for _ in 0..100 {
        let queued = to_server.len() + to_client.len();
        client.output(&mut to_server);
        server.output(&mut to_client);
        let mut moved = to_server.len() + to_client.len() > queued;
        moved |= deliver(&mut to_server, server, &mut outcome.server);
        moved |= deliver(&mut to_client, client, &mut outcome.client);
        if !moved {
            return outcome;
        }
    }
    panic!("handshake did not settle: {outcome:?}");
}

fn deliver(queue: &mut Vec<u8>, to: &mut impl Endpoint, error: &mut Option<TlsError>) -> bool {
    if queue.is_empty() {
        return false;
    }
    if error.is_some() {
        queue.clear();
        return false;
    }
    match to.input(queue) {
        Ok(taken) => {
            queue.drain(..taken);
            taken > 0
        }
        Err(e) => {
            *error = Some(e);
            queue.clear();
            true
        }
    }
}

/// Handshakes a new client (offering Shunt) and server from these contexts; panics on failure.
pub fn connect(client: &TlsContext, server: &TlsContext) -> (TlsStream, TlsStream) {
    let mut c = TlsStream::client(client, true).unwrap();
    let mut s = TlsStream::server(server);
    handshake(&mut c, &mut s).assert_ok();
    assert!(!c.is_handshaking() && !s.is_handshaking());
    (c, s)
}

/// Sends `data` from one connected end to the other in memory and returns what arrived.
pub fn transfer(from: &mut TlsStream, to: &mut TlsStream, data: &[u8]) -> Vec<u8> {
    let (mut written, mut wire, mut received) = (0, Vec::new(), Vec::new());
    let mut buf = vec![0; 16 * 1024];
    while received.len() < data.len() {
        let progress = (written, wire.len(), received.len());
        written += from.write_plaintext(&data[written..]);
        from.pending_output(&mut wire);
        let taken = to.feed(&wire).unwrap();
        wire.drain(..taken);
        loop {
            match to.read_plaintext(&mut buf).unwrap() {
                ReadOutcome::Data(n) => received.extend_from_slice(&buf[..n]),
                ReadOutcome::WouldBlock => break,
                other => panic!("unexpected {other:?} during transfer"),
            }
        }
        assert_ne!(
            progress,
            (written, wire.len(), received.len()),
            "transfer stalled"
        );
    }
    received
}

/// A [`TlsStream`] over a blocking TCP socket.
pub struct Blocking {
    pub sock: TcpStream,
    pub tls: TlsStream,
    /// Received ciphertext not yet taken by the stream.
    input: Vec<u8>,
}

impl Blocking {
    /// Reads time out, so that a silent peer fails the test instead of hanging it.
    pub fn new(sock: TcpStream, tls: TlsStream) -> Self {
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Self {
            sock,
            tls,
            input: Vec::new(),
        }
    }

    pub fn flush(&mut self) {
        let mut out = Vec::new();
        self.tls.pending_output(&mut out);
        self.sock.write_all(&out).unwrap();
    }

    /// Reads from the socket once and feeds the stream; false at end of file.
    fn receive(&mut self) -> bool {
        let mut buf = [0; 16 * 1024];
        let n = self.sock.read(&mut buf).expect("reading from the peer");
        if n == 0 {
            self.tls.feed_eof();
            return false;
        }
        self.input.extend_from_slice(&buf[..n]);
        self.feed_buffered();
        true
    }

    fn feed_buffered(&mut self) {
        let taken = match self.tls.feed(&self.input) {
            Ok(taken) => taken,
            Err(e) => {
                // Send the alert before reporting.
                self.flush();
                panic!("TLS error: {e} ({})", e.failure());
            }
        };
        self.input.drain(..taken);
    }

    pub fn handshake(&mut self) {
        loop {
            self.flush();
            if !self.tls.is_handshaking() {
                return;
            }
            assert!(self.receive(), "peer closed during the handshake");
        }
    }

    pub fn write_all(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let n = self.tls.write_plaintext(data);
            data = &data[n..];
            self.flush();
        }
    }

    /// Reads plaintext until a newline, a close, or end of file.
    pub fn read_line(&mut self) -> (Vec<u8>, ReadOutcome) {
        let mut line = Vec::new();
        let mut buf = [0; 1024];
        loop {
            match self.tls.read_plaintext(&mut buf).unwrap() {
                ReadOutcome::Data(n) => {
                    line.extend_from_slice(&buf[..n]);
                    if line.ends_with(b"\n") {
                        return (line, ReadOutcome::Data(n));
                    }
                }
                ReadOutcome::WouldBlock => {
                    self.feed_buffered();
                    if self.input.is_empty() {
                        self.receive();
                    }
                }
                end => return (line, end),
            }
        }
    }
}
