//! A throwaway mesh CA and workload certificates, for demos, tests and benchmarks: never for
//! production, where the mesh's CA (Istio's istiod, SPIRE) issues them.
//!
//! Workload files are laid out as Istio writes them for proxies: `cert-chain.pem`, `key.pem`
//! and `root-cert.pem`.

use std::io;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

pub use rcgen::{CertificateParams, Error, SanType};

/// A certificate authority that issues workload certificates.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate: what peers put in their trust bundle.
    pub pem: String,
}

/// A workload certificate and its key.
pub struct DevLeaf {
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate, DER-encoded.
    pub der: Vec<u8>,
}

/// Where [`DevCa::write_workload`] put a workload's files.
#[derive(Debug, Clone)]
pub struct WorkloadFiles {
    pub cert_chain: PathBuf,
    pub private_key: PathBuf,
    pub trust_bundle: PathBuf,
}

impl DevCa {
    pub fn new(name: &str) -> Result<Self, Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let pem = params.self_signed(&key)?.pem();
        Ok(Self {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// A certificate whose only name is `spiffe_id` (a URI SAN), usable as client and server.
    pub fn issue(&self, spiffe_id: &str) -> Result<DevLeaf, Error> {
        self.issue_with(&[spiffe_id], |_| {})
    }

    /// A certificate with these URI SANs (none, or several, to test what peers make of that),
    /// its parameters adjusted by `adjust` before signing.
    pub fn issue_with(
        &self,
        uris: &[&str],
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> Result<DevLeaf, Error> {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "workload");
        params.subject_alt_names = uris
            .iter()
            .map(|uri| Ok(SanType::URI((*uri).try_into()?)))
            .collect::<Result<_, Error>>()?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        adjust(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(DevLeaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        })
    }

    /// Issues a certificate for `spiffe_id` and writes it, its key and this CA into `dir`.
    pub fn write_workload(&self, spiffe_id: &str, dir: &Path) -> io::Result<WorkloadFiles> {
        let leaf = self.issue(spiffe_id).map_err(io::Error::other)?;
        std::fs::create_dir_all(dir)?;
        let files = WorkloadFiles {
            cert_chain: dir.join("cert-chain.pem"),
            private_key: dir.join("key.pem"),
            trust_bundle: dir.join("root-cert.pem"),
        };
        std::fs::write(&files.cert_chain, &leaf.cert_pem)?;
        std::fs::write(&files.private_key, &leaf.key_pem)?;
        std::fs::write(&files.trust_bundle, &self.pem)?;
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CertSource, TlsContext, TlsSettings};

    #[test]
    fn written_workload_loads_with_its_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::new("dev mesh CA").unwrap();
        let files = ca
            .write_workload("spiffe://cluster.local/ns/demo/sa/web", dir.path())
            .unwrap();
        let context = TlsContext::new(TlsSettings::new(CertSource::Files {
            cert_chain: files.cert_chain,
            private_key: files.private_key,
            trust_bundle: files.trust_bundle,
        }))
        .unwrap();
        assert_eq!(
            context.local_identity().as_str(),
            "spiffe://cluster.local/ns/demo/sa/web"
        );
    }
}
