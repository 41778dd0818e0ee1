//! SDS secrets into a workload certificate for shuntd's store: the certificate and key from
//! one secret (Istio's `default`), the trust bundle from another (`ROOTCA`).

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};

use crate::tables::Certificate;

/// What config dumps put where a private key was.
const REDACTED: &[u8] = b"[redacted]";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("holds neither a TLS certificate nor a validation context")]
    Empty,
    #[error("{field}: {reason}")]
    Source { field: &'static str, reason: String },
    #[error("{field}: no PEM certificate")]
    NoCertificate { field: &'static str },
    #[error("{field}: {reason}")]
    BadCertificate { field: &'static str, reason: String },
    #[error("the leaf certificate has no SPIFFE URI SAN")]
    NoIdentity,
}

/// The parts of one secret the store needs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct SecretParts {
    pub cert_chain: Option<String>,
    pub private_key: Option<String>,
    pub redacted: bool,
    pub trust_bundle: Option<String>,
    /// The leaf's SPIFFE id, when the secret holds a certificate.
    pub identity: Option<String>,
}

fn read(field: &'static str, source: Option<&DataSource>) -> Result<Option<Vec<u8>>, SecretError> {
    let Some(specifier) = source.and_then(|s| s.specifier.as_ref()) else {
        return Ok(None);
    };
    match specifier {
        data_source::Specifier::InlineBytes(b) => Ok(Some(b.clone())),
        data_source::Specifier::InlineString(s) => Ok(Some(s.clone().into_bytes())),
        // The files and variables are the sender's, not ours: reading our own would be wrong.
        data_source::Specifier::Filename(_) | data_source::Specifier::EnvironmentVariable(_) => {
            Err(SecretError::Source {
                field,
                reason: "only inline data can be forwarded (files and environment variables name the sender's)".into(),
            })
        }
    }
}

fn pem_text(field: &'static str, bytes: Vec<u8>) -> Result<String, SecretError> {
    String::from_utf8(bytes).map_err(|_| SecretError::Source {
        field,
        reason: "not UTF-8 PEM".into(),
    })
}

/// Every certificate in a PEM bundle, checked to parse as X.509.
fn certificates(field: &'static str, pem: &str) -> Result<Vec<Vec<u8>>, SecretError> {
    let mut out = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| SecretError::BadCertificate {
            field,
            reason: e.to_string(),
        })?;
        if block.label != "CERTIFICATE" {
            continue;
        }
        block
            .parse_x509()
            .map_err(|e| SecretError::BadCertificate {
                field,
                reason: e.to_string(),
            })?;
        out.push(block.contents);
    }
    if out.is_empty() {
        return Err(SecretError::NoCertificate { field });
    }
    Ok(out)
}

fn spiffe_id(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
            Some((*uri).to_owned())
        }
        _ => None,
    })
}

/// Checks a secret and takes out what the store needs.
pub(crate) fn parts(s: &Secret) -> Result<SecretParts, SecretError> {
    let mut out = SecretParts::default();
    match &s.r#type {
        Some(secret::Type::TlsCertificate(t)) => {
            let chain = read(
                "tls_certificate.certificate_chain",
                t.certificate_chain.as_ref(),
            )?
            .ok_or(SecretError::NoCertificate {
                field: "tls_certificate.certificate_chain",
            })?;
            let chain = pem_text("tls_certificate.certificate_chain", chain)?;
            let ders = certificates("tls_certificate.certificate_chain", &chain)?;
            out.identity = Some(spiffe_id(&ders[0]).ok_or(SecretError::NoIdentity)?);
            let key = read("tls_certificate.private_key", t.private_key.as_ref())?.ok_or(
                SecretError::Source {
                    field: "tls_certificate.private_key",
                    reason: "missing".into(),
                },
            )?;
            if key == REDACTED {
                out.redacted = true;
            } else {
                let key = pem_text("tls_certificate.private_key", key)?;
                if !key.contains("PRIVATE KEY-----") {
                    return Err(SecretError::Source {
                        field: "tls_certificate.private_key",
                        reason: "no PEM private key".into(),
                    });
                }
                out.private_key = Some(key);
            }
            out.cert_chain = Some(chain);
        }
        Some(secret::Type::ValidationContext(v)) => {
            let ca = read("validation_context.trusted_ca", v.trusted_ca.as_ref())?.ok_or(
                SecretError::NoCertificate {
                    field: "validation_context.trusted_ca",
                },
            )?;
            let ca = pem_text("validation_context.trusted_ca", ca)?;
            certificates("validation_context.trusted_ca", &ca)?;
            out.trust_bundle = Some(ca);
        }
        _ => return Err(SecretError::Empty),
    }
    Ok(out)
}

/// The workload certificate named `name`, once both of its secrets are known.
pub(crate) fn certificate(
    name: &str,
    certificate_secret: (&str, &SecretParts),
    root_secret: (&str, &SecretParts),
) -> Option<Certificate> {
    let (cert_name, cert) = certificate_secret;
    let (root_name, root) = root_secret;
    Some(Certificate {
        name: name.to_owned(),
        identity: cert.identity.clone()?,
        from_secrets: vec![cert_name.to_owned(), root_name.to_owned()],
        redacted: cert.redacted,
        cert_chain: cert.cert_chain.clone()?,
        private_key: cert.private_key.clone().unwrap_or_default(),
        trust_bundle: root.trust_bundle.clone()?,
    })
}
