//! Certificate rotation: a context built from files picks up new files for new connections,
//! ignores unusable ones, and checks no more often than its reload interval.

mod common;

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{CLIENT_ID, Pki, SERVER_ID, connect};
use shunt_tls::{CertSource, TlsContext, TlsSettings};

const ROTATED_ID: &str = "spiffe://cluster.local/ns/default/sa/server-v2";

fn files_context(dir: &Path, reload_interval: Duration) -> TlsContext {
    let mut settings = TlsSettings::new(CertSource::Files {
        cert_chain: dir.join("cert.pem"),
        private_key: dir.join("key.pem"),
        trust_bundle: dir.join("bundle.pem"),
    });
    settings.reload_interval = reload_interval;
    TlsContext::new(settings).unwrap()
}

/// The server identity a new client connection sees.
fn presented(client: &TlsContext, server: &TlsContext) -> String {
    let (client, _) = connect(client, server);
    client.peer().unwrap().identity.to_string()
}

#[test]
fn rotated_files_are_used_by_the_next_connection() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    pki.server.write_to(dir.path());
    std::fs::write(dir.path().join("bundle.pem"), &pki.mesh.pem).unwrap();
    let server = files_context(dir.path(), Duration::ZERO);
    let client = pki.client.context(&pki.mesh.pem, |_| {});
    assert_eq!(presented(&client, &server), SERVER_ID);
    assert_eq!(server.generation(), 0);

    // Unchanged files are not reloaded.
    assert_eq!(presented(&client, &server), SERVER_ID);
    assert_eq!(server.generation(), 0);

    // Rotation to a new leaf, with a new identity to tell them apart.
    let (established, _) = connect(&client, &server);
    let rotated = pki.mesh.leaf(&[ROTATED_ID]);
    rotated.write_to(dir.path());
    assert_eq!(presented(&client, &server), ROTATED_ID);
    assert_eq!(server.generation(), 1);
    assert_eq!(server.local_identity().as_str(), ROTATED_ID);
    // A connection made before the rotation keeps its peer.
    assert_eq!(established.peer().unwrap().identity.as_str(), SERVER_ID);

    // A half-written rotation: the key file holds garbage. The last good material stays.
    std::fs::write(
        dir.path().join("key.pem"),
        "-----BEGIN PRIVATE KEY-----\ngarb",
    )
    .unwrap();
    assert_eq!(presented(&client, &server), ROTATED_ID);
    assert_eq!(presented(&client, &server), ROTATED_ID);
    assert_eq!(server.generation(), 1);

    // A key from another certificate (cert and key rotated out of step) is not usable either.
    let stray_key = pki.mesh.leaf(&[SERVER_ID]).key_pem;
    common::replace_file(&dir.path().join("key.pem"), stray_key.as_bytes());
    assert_eq!(presented(&client, &server), ROTATED_ID);
    assert_eq!(server.generation(), 1);

    // Once the rotation completes, the new material is used.
    let again = pki.mesh.leaf(&[SERVER_ID]);
    again.write_to(dir.path());
    assert_eq!(presented(&client, &server), SERVER_ID);
    assert_eq!(server.generation(), 2);
}

#[test]
fn a_rotated_trust_bundle_applies_to_new_connections() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    pki.client.write_to(dir.path());
    std::fs::write(dir.path().join("bundle.pem"), &pki.mesh.pem).unwrap();
    let client = files_context(dir.path(), Duration::ZERO);
    let server = pki.server.context(&pki.mesh.pem, |_| {});
    assert_eq!(presented(&client, &server), SERVER_ID);

    // The mesh moves to a new CA: both CAs are trusted during the migration.
    let new_ca = common::Ca::new("new mesh CA");
    let moved = new_ca.leaf(&[SERVER_ID]);
    let moved_server = moved.context(&format!("{}{}", pki.mesh.pem, new_ca.pem), |_| {});
    let mut client_stream = shunt_tls::TlsStream::client(&client, true).unwrap();
    let mut server_stream = shunt_tls::TlsStream::server(&moved_server);
    let outcome = common::handshake(&mut client_stream, &mut server_stream);
    assert_eq!(outcome.labels().0, "untrusted_ca");

    common::replace_file(
        &dir.path().join("bundle.pem"),
        format!("{}{}", pki.mesh.pem, new_ca.pem).as_bytes(),
    );
    assert_eq!(presented(&client, &moved_server), SERVER_ID);
    assert_eq!(client.generation(), 1);
    assert_eq!(client.local_identity().as_str(), CLIENT_ID);
}

#[test]
fn files_are_not_checked_before_the_reload_interval() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    pki.server.write_to(dir.path());
    std::fs::write(dir.path().join("bundle.pem"), &pki.mesh.pem).unwrap();
    let server = files_context(dir.path(), Duration::from_secs(3600));
    let client = pki.client.context(&pki.mesh.pem, |_| {});

    pki.mesh.leaf(&[ROTATED_ID]).write_to(dir.path());
    assert_eq!(presented(&client, &server), SERVER_ID);
    assert_eq!(server.generation(), 0);
}

#[test]
fn in_memory_material_never_reloads() {
    let pki = Pki::new();
    let server = pki.server.context(&pki.mesh.pem, |s| {
        s.reload_interval = Duration::ZERO;
    });
    let client = pki.client.context(&pki.mesh.pem, |_| {});
    assert_eq!(presented(&client, &server), SERVER_ID);
    assert_eq!(presented(&client, &server), SERVER_ID);
    assert_eq!(server.generation(), 0);
}

/// Log output collected in memory.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn warnings(&self) -> usize {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines().filter(|line| line.contains("WARN")).count()
    }
}

#[test]
fn unusable_files_are_warned_about_once_per_change() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    pki.server.write_to(dir.path());
    std::fs::write(dir.path().join("bundle.pem"), &pki.mesh.pem).unwrap();
    let server = files_context(dir.path(), Duration::ZERO);
    let client = pki.client.context(&pki.mesh.pem, |_| {});

    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "garbage").unwrap();
        presented(&client, &server);
        presented(&client, &server);
        assert_eq!(capture.warnings(), 1);
        common::replace_file(&key, b"other garbage");
        presented(&client, &server);
        presented(&client, &server);
        assert_eq!(capture.warnings(), 2);
    });
    assert_eq!(server.generation(), 0);
}
