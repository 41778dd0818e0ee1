//! Workload certificates kept per namespace, for apps that do mutual TLS (the Envoy module) to
//! fetch instead of reading files: the xDS adapter puts what SDS delivers, an app of the
//! namespace gets it by name. Material is opaque PEM here; whoever puts it checks it.

use std::collections::BTreeMap;

/// One named certificate of a namespace.
#[derive(Clone, PartialEq, Eq)]
pub struct Certificate {
    /// PEM: leaf first, then intermediates.
    pub cert_chain: String,
    /// PEM: the leaf's private key.
    pub private_key: String,
    /// PEM: the CA certificates peers must chain to.
    pub trust_bundle: String,
    /// The leaf's SPIFFE id, as the putter found it.
    pub identity: String,
    /// Rises with every put in the node, so a holder can tell that its copy is stale.
    pub version: u64,
}

impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificate")
            .field("identity", &self.identity)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// Longest certificate name.
pub const MAX_NAME_LEN: usize = 128;
/// Most PEM bytes of one certificate, all three parts together: it travels in one session-API
/// message.
pub const MAX_PEM_LEN: usize = 48 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertificateError {
    #[error("certificate name must be 1 to {MAX_NAME_LEN} characters of [A-Za-z0-9._-], got `{0}`")]
    BadName(String),
    #[error("certificate material is larger than {MAX_PEM_LEN} bytes")]
    TooLarge,
    #[error("no certificate `{name}` in namespace `{namespace}`")]
    Unknown { namespace: String, name: String },
}

pub fn check_name(name: &str) -> Result<(), CertificateError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(CertificateError::BadName(name.to_owned()))
    }
}

/// The certificates of one namespace, by name.
#[derive(Debug, Default)]
pub struct Certificates {
    by_name: BTreeMap<String, Certificate>,
}

impl Certificates {
    pub fn put(&mut self, name: &str, certificate: Certificate) -> Result<(), CertificateError> {
        check_name(name)?;
        let len = certificate.cert_chain.len()
            + certificate.private_key.len()
            + certificate.trust_bundle.len();
        if len > MAX_PEM_LEN {
            return Err(CertificateError::TooLarge);
        }
        self.by_name.insert(name.to_owned(), certificate);
        Ok(())
    }

    pub fn remove(&mut self, name: &str) -> Option<Certificate> {
        self.by_name.remove(name)
    }

    pub fn get(&self, name: &str) -> Option<&Certificate> {
        self.by_name.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Certificate)> {
        self.by_name.iter().map(|(n, c)| (n.as_str(), c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(version: u64) -> Certificate {
        Certificate {
            cert_chain: "chain".into(),
            private_key: "key".into(),
            trust_bundle: "bundle".into(),
            identity: "spiffe://cluster.local/ns/a/sa/b".into(),
            version,
        }
    }

    #[test]
    fn put_replaces_and_refuses_bad_names_and_oversized_material() {
        let mut c = Certificates::default();
        c.put("default", cert(1)).unwrap();
        c.put("default", cert(2)).unwrap();
        assert_eq!(c.get("default").unwrap().version, 2);
        assert!(matches!(
            c.put("a/b", cert(3)),
            Err(CertificateError::BadName(_))
        ));
        let mut big = cert(4);
        big.private_key = "k".repeat(MAX_PEM_LEN);
        assert_eq!(c.put("big", big), Err(CertificateError::TooLarge));
        assert!(
            format!("{:?}", cert(5)).find("key").is_none(),
            "Debug leaks the key"
        );
        assert_eq!(c.remove("default").map(|c| c.version), Some(2));
        assert!(c.get("default").is_none());
    }
}
