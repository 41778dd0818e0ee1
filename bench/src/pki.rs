//! A mesh CA and the two workload identities of a sidecar chain, made fresh for each run and
//! written as PEM files, the form sidecars load them in.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

pub(crate) const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
pub(crate) const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";

/// One workload's material, and the identity it expects of its peer.
pub(crate) struct Identity {
    pub(crate) cert_chain: PathBuf,
    pub(crate) private_key: PathBuf,
    pub(crate) trust_bundle: PathBuf,
    pub(crate) peer_id: &'static str,
}

pub(crate) struct Pki {
    pub(crate) client: Identity,
    pub(crate) server: Identity,
    // Holds the files; removed when the run ends.
    _dir: tempfile::TempDir,
}

impl Pki {
    pub(crate) fn generate() -> anyhow::Result<Pki> {
        let dir = tempfile::Builder::new()
            .prefix("shunt-bench-pki")
            .tempdir()?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name.push(DnType::CommonName, "mesh CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate()?;
        let trust_bundle = dir.path().join("ca.pem");
        std::fs::write(&trust_bundle, ca.self_signed(&ca_key)?.pem())?;
        let issuer = Issuer::new(ca, ca_key);

        let client = leaf(dir.path(), "client", CLIENT_ID, &issuer)?;
        let server = leaf(dir.path(), "server", SERVER_ID, &issuer)?;
        Ok(Pki {
            client: Identity {
                cert_chain: client.0,
                private_key: client.1,
                trust_bundle: trust_bundle.clone(),
                peer_id: SERVER_ID,
            },
            server: Identity {
                cert_chain: server.0,
                private_key: server.1,
                trust_bundle,
                peer_id: CLIENT_ID,
            },
            _dir: dir,
        })
    }
}

/// A workload certificate with `id` as its only URI SAN, as SPIFFE requires; returns the
/// paths of the certificate and of its key.
fn leaf(
    dir: &Path,
    name: &str,
    id: &str,
    issuer: &Issuer<'_, KeyPair>,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names = vec![SanType::URI(
        id.try_into().with_context(|| format!("SAN {id}"))?,
    )];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    let cert_path = dir.join(format!("{name}-cert.pem"));
    let key_path = dir.join(format!("{name}-key.pem"));
    std::fs::write(&cert_path, cert.pem())?;
    std::fs::write(&key_path, key.serialize_pem())?;
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_side_trusts_the_ca_and_expects_the_other() {
        let pki = Pki::generate().unwrap();
        assert_eq!(pki.client.peer_id, SERVER_ID);
        assert_eq!(pki.server.peer_id, CLIENT_ID);
        for id in [&pki.client, &pki.server] {
            for f in [&id.cert_chain, &id.private_key, &id.trust_bundle] {
                let pem = std::fs::read_to_string(f).unwrap();
                assert!(pem.starts_with("-----BEGIN "), "{}", f.display());
            }
        }
    }
}
