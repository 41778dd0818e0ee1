//! Client and server `TlsStream`s handshaking in memory: identities, ALPN choices, the pairing
//! token, verification failures and their labels, application data and closing.

mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;

use common::{CLIENT_ID, Pki, SERVER_ID, alpn, connect, handshake, transfer};
use shunt_tls::rustls::pki_types::{PrivateKeyDer, ServerName, pem::PemObject};
use shunt_tls::rustls::{self, ClientConfig, ProtocolVersion, RootCertStore, ServerConfig};
use shunt_tls::verify::SpiffeServerVerifier;
use shunt_tls::{
    CertSource, HandshakeFailure, IdentityPolicy, ReadOutcome, SHUNT_ALPN, TlsContext, TlsSettings,
    TlsStream,
};

#[test]
fn mutual_handshake_shows_identities_negotiates_shunt_and_pairs() {
    let pki = Pki::new();
    let client_ctx = pki
        .client
        .context(&pki.mesh.pem, |s| s.alpn = alpn(&["h2"]));
    let server_ctx = pki
        .server
        .context(&pki.mesh.pem, |s| s.alpn = alpn(&["h2"]));
    assert_eq!(client_ctx.local_identity().as_str(), CLIENT_ID);

    let mut client = TlsStream::client(&client_ctx, true).unwrap();
    let mut server = TlsStream::server(&server_ctx);
    assert!(client.is_handshaking() && client.peer().is_none());
    assert!(client.pairing_token().is_err());
    handshake(&mut client, &mut server).assert_ok();

    let (c, s) = (client.peer().unwrap(), server.peer().unwrap());
    assert_eq!(c.identity.as_str(), SERVER_ID);
    assert_eq!(s.identity.as_str(), CLIENT_ID);
    assert_eq!(c.alpn.as_deref(), Some(SHUNT_ALPN));
    assert_eq!(s.alpn.as_deref(), Some(SHUNT_ALPN));
    assert_eq!(c.tls_version, ProtocolVersion::TLSv1_3);
    assert_eq!(s.tls_version, ProtocolVersion::TLSv1_3);
    assert!(client.negotiated_shunt() && server.negotiated_shunt());

    let token = client.pairing_token().unwrap();
    assert_eq!(token, server.pairing_token().unwrap());
    assert_ne!(token, [0; 32]);

    let (again_client, again_server) = connect(&client_ctx, &server_ctx);
    let again = again_client.pairing_token().unwrap();
    assert_eq!(again, again_server.pairing_token().unwrap());
    assert_ne!(again, token, "two connections share a pairing token");
}

/// The ALPN both ends see for a client offering `client_alpn` (plus Shunt's, if `offer_shunt`)
/// to a server whose ordinary protocols are `server_alpn`.
fn negotiated(client_alpn: &[&str], offer_shunt: bool, server_alpn: &[&str]) -> Option<String> {
    let pki = Pki::new();
    let client_ctx = pki
        .client
        .context(&pki.mesh.pem, |s| s.alpn = alpn(client_alpn));
    let server_ctx = pki
        .server
        .context(&pki.mesh.pem, |s| s.alpn = alpn(server_alpn));
    let mut client = TlsStream::client(&client_ctx, offer_shunt).unwrap();
    let mut server = TlsStream::server(&server_ctx);
    handshake(&mut client, &mut server).assert_ok();
    let (c, s) = (client.peer().unwrap(), server.peer().unwrap());
    assert_eq!(c.alpn, s.alpn);
    assert_eq!(client.negotiated_shunt(), server.negotiated_shunt());
    c.alpn.clone().map(|p| String::from_utf8(p).unwrap())
}

#[test]
fn server_picks_shunt_then_its_own_preference_then_nothing() {
    // Shunt wins over any ordinary protocol, and needs none configured.
    assert_eq!(
        negotiated(&["h2"], true, &["h2"]).as_deref(),
        Some("shunt/1")
    );
    assert_eq!(negotiated(&[], true, &[]).as_deref(), Some("shunt/1"));
    // Without Shunt: the first of the server's protocols that the client offers.
    assert_eq!(
        negotiated(&["http/1.1", "h2"], false, &["h2", "http/1.1"]).as_deref(),
        Some("h2")
    );
    assert_eq!(
        negotiated(&["http/1.1"], false, &["h2", "http/1.1"]).as_deref(),
        Some("http/1.1")
    );
    // A client like Envoy's ISTIO_MUTUAL: no overlap, and no ALPN rather than an abort.
    let istio = ["istio-peer-exchange", "istio", "istio-http/1.1"];
    assert_eq!(negotiated(&istio, false, &["h2"]), None);
    // No ALPN extension at all.
    assert_eq!(negotiated(&[], false, &["h2"]), None);
    // A client offering only ordinary protocols to a server that has none.
    assert_eq!(negotiated(&["h2"], false, &[]), None);
}

#[test]
fn invalid_alpn_settings_are_refused() {
    let pki = Pki::new();
    for bad in [vec![Vec::new()], alpn(&["shunt/1"]), alpn(&["h2", "h2"])] {
        let mut settings = TlsSettings::new(pki.client.source(&pki.mesh.pem));
        settings.alpn = bad;
        let error = TlsContext::new(settings).unwrap_err();
        assert_eq!(error.failure(), HandshakeFailure::Config, "{error}");
    }
}

#[test]
fn untrusted_server_ca_fails_on_both_ends() {
    let pki = Pki::new();
    let rogue = pki.other.leaf(&[SERVER_ID]);
    let client_ctx = pki.client.context(&pki.mesh.pem, |_| {});
    let server_ctx = rogue.context(&pki.mesh.pem, |_| {});
    let mut client = TlsStream::client(&client_ctx, true).unwrap();
    let mut server = TlsStream::server(&server_ctx);
    let outcome = handshake(&mut client, &mut server);
    assert_eq!(outcome.labels(), ("untrusted_ca", "untrusted_ca"));
    assert!(client.peer().is_none() && server.peer().is_none());
}

#[test]
fn untrusted_client_ca_fails_on_both_ends() {
    let pki = Pki::new();
    let rogue = pki.other.leaf(&[CLIENT_ID]);
    let client_ctx = rogue.context(&pki.mesh.pem, |_| {});
    let server_ctx = pki.server.context(&pki.mesh.pem, |_| {});
    let mut client = TlsStream::client(&client_ctx, true).unwrap();
    let mut server = TlsStream::server(&server_ctx);
    let outcome = handshake(&mut client, &mut server);
    assert_eq!(outcome.labels(), ("untrusted_ca", "untrusted_ca"));
    assert!(server.peer().is_none());
}

#[test]
fn identities_outside_the_policy_are_refused() {
    let pki = Pki::new();
    let only_other = IdentityPolicy::parse(["spiffe://cluster.local/ns/default/sa/other"]).unwrap();

    // The client refuses the server.
    let client_ctx = pki
        .client
        .context(&pki.mesh.pem, |s| s.policy = only_other.clone());
    let server_ctx = pki.server.context(&pki.mesh.pem, |_| {});
    let mut client = TlsStream::client(&client_ctx, true).unwrap();
    let mut server = TlsStream::server(&server_ctx);
    let outcome = handshake(&mut client, &mut server);
    assert_eq!(outcome.labels(), ("identity_mismatch", "identity_mismatch"));

    // The server refuses the client.
    let client_ctx = pki.client.context(&pki.mesh.pem, |_| {});
    let server_ctx = pki
        .server
        .context(&pki.mesh.pem, |s| s.policy = only_other.clone());
    let mut client = TlsStream::client(&client_ctx, true).unwrap();
    let mut server = TlsStream::server(&server_ctx);
    let outcome = handshake(&mut client, &mut server);
    assert_eq!(outcome.labels(), ("identity_mismatch", "identity_mismatch"));
    assert!(server.peer().is_none());
}

#[test]
fn policies_accept_exact_ids_and_trust_domains() {
    let pki = Pki::new();
    let client_ctx = pki.client.context(&pki.mesh.pem, |s| {
        s.policy = IdentityPolicy::parse([SERVER_ID]).unwrap();
    });
    let server_ctx = pki.server.context(&pki.mesh.pem, |s| {
        s.policy =
            IdentityPolicy::parse(["spiffe://other.mesh/*", "spiffe://cluster.local/*"]).unwrap();
    });
    connect(&client_ctx, &server_ctx);
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(pem: &str) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    Arc::new(roots)
}

#[test]
fn a_client_without_a_certificate_is_refused() {
    let pki = Pki::new();
    let verifier = SpiffeServerVerifier::new(roots(&pki.mesh.pem), IdentityPolicy::any(), &ring());
    let config = ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
    let mut anonymous: rustls::Connection = rustls::ClientConnection::new(Arc::new(config), name)
        .unwrap()
        .into();
    let server_ctx = pki.server.context(&pki.mesh.pem, |_| {});
    let mut server = TlsStream::server(&server_ctx);
    let outcome = handshake(&mut anonymous, &mut server);
    assert_eq!(
        outcome.labels(),
        ("no_client_certificate", "no_client_certificate")
    );
    assert!(server.peer().is_none());
}

#[test]
fn expired_certificates_are_refused() {
    let pki = Pki::new();
    let expired = |id| {
        pki.mesh.leaf_with(&[id], |params| {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        })
    };

    let client_ctx = pki.client.context(&pki.mesh.pem, |_| {});
    let server_ctx = expired(SERVER_ID).context(&pki.mesh.pem, |_| {});
    let mut client = TlsStream::client(&client_ctx, true).unwrap();
    let mut server = TlsStream::server(&server_ctx);
    let outcome = handshake(&mut client, &mut server);
    assert_eq!(outcome.labels(), ("expired", "expired"));

    let client_ctx = expired(CLIENT_ID).context(&pki.mesh.pem, |_| {});
    let server_ctx = pki.server.context(&pki.mesh.pem, |_| {});
    let mut client = TlsStream::client(&client_ctx, true).unwrap();
    let mut server = TlsStream::server(&server_ctx);
    let outcome = handshake(&mut client, &mut server);
    assert_eq!(outcome.labels(), ("expired", "expired"));
}

#[test]
fn a_peer_without_a_spiffe_id_is_refused() {
    let pki = Pki::new();
    // This crate refuses to present such a certificate, so the peer is plain rustls.
    let anonymous = pki.mesh.leaf(&[]);
    let key = PrivateKeyDer::from_pem_slice(anonymous.key_pem.as_bytes()).unwrap();
    let config = ServerConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![anonymous.der.clone()], key)
        .unwrap();
    let mut server: rustls::Connection = rustls::ServerConnection::new(Arc::new(config))
        .unwrap()
        .into();
    let client_ctx = pki.client.context(&pki.mesh.pem, |_| {});
    let mut client = TlsStream::client(&client_ctx, true).unwrap();
    let outcome = handshake(&mut client, &mut server);
    assert_eq!(outcome.labels(), ("no_spiffe_id", "bad_certificate"));

    // Two SPIFFE ids are as bad as none.
    let twice = pki.mesh.leaf(&[SERVER_ID, CLIENT_ID]);
    let key = PrivateKeyDer::from_pem_slice(twice.key_pem.as_bytes()).unwrap();
    let config = ServerConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![twice.der.clone()], key)
        .unwrap();
    let mut server: rustls::Connection = rustls::ServerConnection::new(Arc::new(config))
        .unwrap()
        .into();
    let mut client = TlsStream::client(&client_ctx, true).unwrap();
    let outcome = handshake(&mut client, &mut server);
    assert_eq!(outcome.labels().0, "no_spiffe_id");
}

#[test]
fn material_errors_name_the_item_and_the_file() {
    let pki = Pki::new();
    // Our own certificate must carry a SPIFFE id.
    let anonymous = pki.mesh.leaf(&[]);
    let error = TlsContext::new(TlsSettings::new(anonymous.source(&pki.mesh.pem))).unwrap_err();
    assert_eq!(error.failure(), HandshakeFailure::Config);
    assert!(error.to_string().contains("certificate chain"), "{error}");

    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = pki.client.write_to(dir.path());
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, &pki.mesh.pem).unwrap();
    let files = |cert: &std::path::Path, key: &std::path::Path, bundle: &std::path::Path| {
        TlsContext::new(TlsSettings::new(CertSource::Files {
            cert_chain: cert.to_owned(),
            private_key: key.to_owned(),
            trust_bundle: bundle.to_owned(),
        }))
    };
    files(&cert, &key, &bundle).unwrap();

    let missing = dir.path().join("missing.pem");
    let error = files(&cert, &key, &missing).unwrap_err().to_string();
    assert!(error.starts_with("trust bundle from file "), "{error}");
    assert!(error.contains("missing.pem"), "{error}");

    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not PEM at all\n").unwrap();
    let error = files(&cert, &garbage, &bundle).unwrap_err().to_string();
    assert!(error.starts_with("private key from file "), "{error}");
    assert!(
        error.contains("garbage.pem") && error.contains("no private key"),
        "{error}"
    );
    let error = files(&garbage, &key, &bundle).unwrap_err().to_string();
    assert!(error.starts_with("certificate chain from file "), "{error}");

    // A key that belongs to another certificate.
    let other_dir = dir.path().join("other");
    std::fs::create_dir(&other_dir).unwrap();
    let (_, other_key) = pki.server.write_to(&other_dir);
    let error = files(&cert, &other_key, &bundle).unwrap_err().to_string();
    assert!(error.starts_with("private key from file "), "{error}");
}

#[test]
fn application_data_round_trips_and_close_notify_is_clean() {
    let pki = Pki::new();
    let client_ctx = pki.client.context(&pki.mesh.pem, |_| {});
    let server_ctx = pki.server.context(&pki.mesh.pem, |_| {});
    let (mut client, mut server) = connect(&client_ctx, &server_ctx);

    let request: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(transfer(&mut client, &mut server, &request), request);
    let response: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
    assert_eq!(transfer(&mut server, &mut client, &response), response);

    client.send_close_notify();
    assert!(client.wants_write());
    let mut wire = Vec::new();
    client.pending_output(&mut wire);
    server.feed(&wire).unwrap();
    let mut buf = [0; 64];
    assert_eq!(
        server.read_plaintext(&mut buf).unwrap(),
        ReadOutcome::Closed
    );

    // The server may still answer before closing its half.
    let last = transfer(&mut server, &mut client, b"bye");
    assert_eq!(last, b"bye");
    server.send_close_notify();
    let mut wire = Vec::new();
    server.pending_output(&mut wire);
    client.feed(&wire).unwrap();
    assert_eq!(
        client.read_plaintext(&mut buf).unwrap(),
        ReadOutcome::Closed
    );
}

#[test]
fn plaintext_written_during_the_handshake_is_delivered() {
    let pki = Pki::new();
    let client_ctx = pki.client.context(&pki.mesh.pem, |_| {});
    let server_ctx = pki.server.context(&pki.mesh.pem, |_| {});
    let mut client = TlsStream::client(&client_ctx, true).unwrap();
    let mut server = TlsStream::server(&server_ctx);
    assert_eq!(
        server.write_plaintext(b"early"),
        0,
        "nothing before the ClientHello"
    );
    assert_eq!(client.write_plaintext(b"hello"), 5);
    handshake(&mut client, &mut server).assert_ok();
    let mut buf = [0; 16];
    assert_eq!(
        server.read_plaintext(&mut buf).unwrap(),
        ReadOutcome::Data(5)
    );
    assert_eq!(&buf[..5], b"hello");
    assert_eq!(
        server.read_plaintext(&mut buf).unwrap(),
        ReadOutcome::WouldBlock
    );
}

#[test]
fn end_of_file_without_close_notify_is_unclean() {
    let pki = Pki::new();
    let client_ctx = pki.client.context(&pki.mesh.pem, |_| {});
    let server_ctx = pki.server.context(&pki.mesh.pem, |_| {});
    let (mut client, mut server) = connect(&client_ctx, &server_ctx);
    transfer(&mut client, &mut server, b"partial");
    server.feed_eof();
    let mut buf = [0; 16];
    assert_eq!(
        server.read_plaintext(&mut buf).unwrap(),
        ReadOutcome::UncleanEof
    );

    // Also before the ClientHello.
    let mut idle = TlsStream::server(&server_ctx);
    assert_eq!(
        idle.read_plaintext(&mut buf).unwrap(),
        ReadOutcome::WouldBlock
    );
    idle.feed_eof();
    assert_eq!(
        idle.read_plaintext(&mut buf).unwrap(),
        ReadOutcome::UncleanEof
    );
}

#[test]
fn garbage_instead_of_a_client_hello_is_a_protocol_failure() {
    let pki = Pki::new();
    let server_ctx = pki.server.context(&pki.mesh.pem, |_| {});
    let mut server = TlsStream::server(&server_ctx);
    let error = server
        .feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap_err();
    assert_eq!(error.failure(), HandshakeFailure::Protocol, "{error}");
    // The error sticks.
    assert!(server.feed(b"more").is_err());
}
