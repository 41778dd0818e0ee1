//! Where certificates, the private key and the trust bundle come from, and loading them.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::TlsError;
use crate::identity::{SpiffeId, spiffe_id_from_cert};

/// The source of this workload's certificate chain and key, and of the CA certificates that
/// peers must chain to.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// PEM files, re-read when they change on disk (see
    /// [`TlsSettings::reload_interval`](crate::TlsSettings::reload_interval)).
    Files {
        /// Leaf certificate first, then any intermediates.
        cert_chain: PathBuf,
        /// The leaf's private key (PKCS#8, PKCS#1 or SEC1).
        private_key: PathBuf,
        /// CA certificates that peers' chains must lead to.
        trust_bundle: PathBuf,
    },
    /// PEM text held in memory, e.g. from a certificate store filled over SDS.
    Pem {
        /// Leaf certificate first, then any intermediates.
        cert_chain: String,
        /// The leaf's private key (PKCS#8, PKCS#1 or SEC1).
        private_key: String,
        /// CA certificates that peers' chains must lead to.
        trust_bundle: String,
    },
}

/// Parsed, validated material: what a rustls configuration is built from.
pub(crate) struct Material {
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
    pub(crate) roots: Arc<RootCertStore>,
    /// The SPIFFE id of our own leaf certificate.
    pub(crate) identity: SpiffeId,
    /// Where the key came from, for errors found when the key is put to use.
    pub(crate) key_origin: String,
}

const CHAIN: &str = "certificate chain";
pub(crate) const KEY: &str = "private key";
const BUNDLE: &str = "trust bundle";

impl CertSource {
    /// Checks that the material is usable (the chain and key parse and match, the bundle has a
    /// CA, the leaf has one SPIFFE id) and returns the leaf's identity.
    pub fn check(&self) -> Result<SpiffeId, TlsError> {
        let material = self.load()?;
        let provider = rustls::crypto::ring::default_provider();
        rustls::sign::CertifiedKey::from_der(material.chain, material.key, &provider).map_err(
            |e| TlsError::Material {
                item: KEY,
                origin: material.key_origin,
                problem: e.to_string(),
            },
        )?;
        Ok(material.identity)
    }

    /// Reads and validates the material.
    pub(crate) fn load(&self) -> Result<Material, TlsError> {
        match self {
            Self::Files {
                cert_chain,
                private_key,
                trust_bundle,
            } => {
                let read = |item, path: &Path| {
                    fs::read(path).map_err(|e| material_error(item, origin(path), e.to_string()))
                };
                parse(
                    (&read(CHAIN, cert_chain)?, origin(cert_chain)),
                    (&read(KEY, private_key)?, origin(private_key)),
                    (&read(BUNDLE, trust_bundle)?, origin(trust_bundle)),
                )
            }
            Self::Pem {
                cert_chain,
                private_key,
                trust_bundle,
            } => {
                let memory = || "in-memory PEM".to_owned();
                parse(
                    (cert_chain.as_bytes(), memory()),
                    (private_key.as_bytes(), memory()),
                    (trust_bundle.as_bytes(), memory()),
                )
            }
        }
    }

    /// What identifies the current version of the files: changes whenever a file is rewritten
    /// or replaced. `None` for in-memory material, which never changes.
    pub(crate) fn stamp(&self) -> Option<SourceStamp> {
        match self {
            Self::Files {
                cert_chain,
                private_key,
                trust_bundle,
            } => Some(SourceStamp([
                FileStamp::of(cert_chain),
                FileStamp::of(private_key),
                FileStamp::of(trust_bundle),
            ])),
            Self::Pem { .. } => None,
        }
    }
}

/// The metadata of the three files, compared to notice a rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SourceStamp([FileStamp; 3]);

/// What `stat` says about one file; a missing or unreadable file has its own value, so its
/// reappearance counts as a change.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FileStamp {
    Present {
        modified: Option<SystemTime>,
        /// Inode change time: also moves on rename and chmod.
        changed: (i64, i64),
        len: u64,
        device: u64,
        inode: u64,
    },
    Missing(io::ErrorKind),
}

impl FileStamp {
    fn of(path: &Path) -> Self {
        use std::os::unix::fs::MetadataExt;
        match fs::metadata(path) {
            Ok(meta) => Self::Present {
                modified: meta.modified().ok(),
                changed: (meta.ctime(), meta.ctime_nsec()),
                len: meta.len(),
                device: meta.dev(),
                inode: meta.ino(),
            },
            Err(e) => Self::Missing(e.kind()),
        }
    }
}

fn origin(path: &Path) -> String {
    format!("file {}", path.display())
}

fn material_error(item: &'static str, origin: String, problem: String) -> TlsError {
    TlsError::Material {
        item,
        origin,
        problem,
    }
}

fn parse(
    (chain_pem, chain_origin): (&[u8], String),
    (key_pem, key_origin): (&[u8], String),
    (bundle_pem, bundle_origin): (&[u8], String),
) -> Result<Material, TlsError> {
    let chain =
        certificates(chain_pem).map_err(|p| material_error(CHAIN, chain_origin.clone(), p))?;
    let identity = spiffe_id_from_cert(&chain[0]).map_err(|e| {
        material_error(
            CHAIN,
            chain_origin,
            format!("leaf certificate is not a SPIFFE workload certificate: {e}"),
        )
    })?;

    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| material_error(KEY, key_origin.clone(), pem_problem("private key", &e)))?;

    let bundle =
        certificates(bundle_pem).map_err(|p| material_error(BUNDLE, bundle_origin.clone(), p))?;
    let mut roots = RootCertStore::empty();
    for (index, cert) in bundle.into_iter().enumerate() {
        roots.add(cert).map_err(|e| {
            material_error(
                BUNDLE,
                bundle_origin.clone(),
                format!(
                    "certificate #{} is not a usable trust anchor: {e}",
                    index + 1
                ),
            )
        })?;
    }

    Ok(Material {
        chain,
        key,
        roots: Arc::new(roots),
        identity,
        key_origin,
    })
}

/// Every `CERTIFICATE` block, in order; at least one.
fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_problem("certificate", &e))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block found".into());
    }
    Ok(certs)
}

fn pem_problem(what: &str, error: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    match error {
        Error::NoItemsFound => format!("no {what} PEM block found"),
        other => format!("malformed PEM: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_pem_names_the_item() {
        let source = CertSource::Pem {
            cert_chain: String::new(),
            private_key: String::new(),
            trust_bundle: String::new(),
        };
        let error = source.load().err().unwrap().to_string();
        assert_eq!(
            error,
            "certificate chain from in-memory PEM: no CERTIFICATE block found"
        );
        assert!(source.stamp().is_none());
    }

    #[test]
    fn stamps_change_when_a_file_appears_or_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cert.pem");
        let source = CertSource::Files {
            cert_chain: file.clone(),
            private_key: file.clone(),
            trust_bundle: file.clone(),
        };
        let missing = source.stamp();
        assert_eq!(missing, source.stamp());
        fs::write(&file, "one").unwrap();
        let present = source.stamp();
        assert_ne!(missing, present);
        assert_eq!(present, source.stamp());
        let replacement = dir.path().join("cert.pem.new");
        fs::write(&replacement, "two").unwrap();
        fs::rename(&replacement, &file).unwrap();
        assert_ne!(present, source.stamp());
    }
}
