//! SPIFFE identities, the policy saying which peers are accepted, and reading a peer's identity
//! out of its certificate.
//!
//! A mesh workload certificate (an X.509-SVID) names its workload with exactly one URI SAN of the
//! form `spiffe://<trust-domain>/<path>`; it carries no DNS name. Authorisation is therefore a
//! match on that URI, not a hostname check.

use std::fmt;
use std::str::FromStr;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

const SCHEME: &str = "spiffe://";
/// Longest SPIFFE id accepted, in bytes (the SPIFFE specification's limit on the URI).
const MAX_ID_LEN: usize = 2048;
/// Longest trust domain accepted, in bytes (a DNS name's limit).
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a SPIFFE id, a policy pattern or a peer's certificate was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The text is not a valid SPIFFE id.
    #[error("invalid SPIFFE id {id:?}: {reason}")]
    InvalidId {
        /// The rejected text.
        id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The text is neither a SPIFFE id nor a `spiffe://<trust-domain>/*` pattern.
    #[error("invalid identity pattern {pattern:?}: {reason}")]
    InvalidPattern {
        /// The rejected pattern.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The certificate could not be parsed as X.509.
    #[error("certificate cannot be parsed: {0}")]
    Certificate(String),
    /// The certificate has no `spiffe://` URI SAN.
    #[error("certificate has no spiffe:// URI SAN")]
    NoSpiffeId,
    /// The certificate has more than one `spiffe://` URI SAN; an X.509-SVID has exactly one.
    #[error("certificate has {0} spiffe:// URI SANs, expected exactly one")]
    SeveralSpiffeIds(usize),
}

/// A validated SPIFFE id: `spiffe://<trust-domain>` followed by an optional path.
///
/// Validation follows the SPIFFE id specification: the scheme and trust domain are lower case;
/// the trust domain uses only `a-z 0-9 . - _` (no port, no user info); the path, if present, is a
/// sequence of `/segment` where each segment is non-empty, is not `.` or `..`, and uses only
/// `a-z A-Z 0-9 . - _`; no query, fragment or trailing slash.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole id, as given (it is already in canonical form once validated).
    id: String,
    /// Byte length of the trust domain, which starts right after the scheme.
    trust_domain_len: usize,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE id.
    pub fn parse(id: &str) -> Result<Self, IdentityError> {
        let invalid = |reason| IdentityError::InvalidId {
            id: id.to_owned(),
            reason,
        };
        if id.len() > MAX_ID_LEN {
            return Err(invalid("longer than 2048 bytes"));
        }
        let rest = id
            .strip_prefix(SCHEME)
            .ok_or_else(|| invalid("does not start with spiffe://"))?;
        let (trust_domain, path) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, ""),
        };
        validate_trust_domain(trust_domain).map_err(invalid)?;
        validate_path(path).map_err(invalid)?;
        Ok(Self {
            id: id.to_owned(),
            trust_domain_len: trust_domain.len(),
        })
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.id[SCHEME.len()..SCHEME.len() + self.trust_domain_len]
    }

    /// The path, e.g. `/ns/default/sa/client`; empty for the id of a trust domain itself.
    pub fn path(&self) -> &str {
        &self.id[SCHEME.len() + self.trust_domain_len..]
    }

    /// The whole id.
    pub fn as_str(&self) -> &str {
        &self.id
    }
}

fn validate_trust_domain(trust_domain: &str) -> Result<(), &'static str> {
    if trust_domain.is_empty() {
        return Err("empty trust domain");
    }
    if trust_domain.len() > MAX_TRUST_DOMAIN_LEN {
        return Err("trust domain longer than 255 bytes");
    }
    if trust_domain.contains(':') {
        return Err("trust domain has a port");
    }
    if trust_domain.contains('@') {
        return Err("trust domain has user info");
    }
    let allowed = |b: u8| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_');
    if !trust_domain.bytes().all(allowed) {
        return Err("trust domain has a character other than a-z 0-9 . - _");
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Ok(());
    }
    // `path` starts with '/', so the first piece of the split is empty.
    for segment in path.split('/').skip(1) {
        match segment {
            "" => return Err("path has an empty segment or a trailing slash"),
            "." | ".." => return Err("path has a . or .. segment"),
            _ => {}
        }
        let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_');
        if !segment.bytes().all(allowed) {
            return Err("path has a character other than a-z A-Z 0-9 . - _");
        }
    }
    Ok(())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

impl TryFrom<&str> for SpiffeId {
    type Error = IdentityError;

    fn try_from(id: &str) -> Result<Self, Self::Error> {
        Self::parse(id)
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(id: &str) -> Result<Self, Self::Err> {
        Self::parse(id)
    }
}

/// One entry of an [`IdentityPolicy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityPattern {
    /// Exactly this SPIFFE id.
    Exact(SpiffeId),
    /// Any workload of this trust domain; written `spiffe://<trust-domain>/*`.
    TrustDomain(String),
}

impl IdentityPattern {
    /// Parses `spiffe://<trust-domain>/*` or an exact SPIFFE id.
    pub fn parse(pattern: &str) -> Result<Self, IdentityError> {
        let invalid = |reason: String| IdentityError::InvalidPattern {
            pattern: pattern.to_owned(),
            reason,
        };
        if let Some(domain) = pattern
            .strip_prefix(SCHEME)
            .and_then(|rest| rest.strip_suffix("/*"))
        {
            validate_trust_domain(domain).map_err(|reason| invalid(reason.to_owned()))?;
            return Ok(Self::TrustDomain(domain.to_owned()));
        }
        if pattern.contains('*') {
            return Err(invalid(
                "only a whole trust domain (spiffe://<trust-domain>/*) may be wildcarded".into(),
            ));
        }
        SpiffeId::parse(pattern)
            .map(Self::Exact)
            .map_err(|e| invalid(e.to_string()))
    }

    /// Whether `id` is allowed by this pattern.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(exact) => exact == id,
            Self::TrustDomain(domain) => id.trust_domain() == domain,
        }
    }
}

impl fmt::Display for IdentityPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(id) => id.fmt(f),
            Self::TrustDomain(domain) => write!(f, "{SCHEME}{domain}/*"),
        }
    }
}

impl FromStr for IdentityPattern {
    type Err = IdentityError;

    fn from_str(pattern: &str) -> Result<Self, Self::Err> {
        Self::parse(pattern)
    }
}

/// Which peer identities are accepted once the peer's chain has been verified against the trust
/// bundle.
///
/// An empty policy accepts any identity the trust bundle vouches for (the mesh CA is the
/// authority); otherwise the peer's SPIFFE id must match at least one pattern.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityPolicy {
    patterns: Vec<IdentityPattern>,
}

impl IdentityPolicy {
    /// The policy that accepts every identity signed by the trust bundle.
    pub fn any() -> Self {
        Self::default()
    }

    /// A policy made of these patterns (empty = [`any`](Self::any)).
    pub fn new(patterns: Vec<IdentityPattern>) -> Self {
        Self { patterns }
    }

    /// Parses each pattern (see [`IdentityPattern::parse`]).
    pub fn parse<I>(patterns: I) -> Result<Self, IdentityError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let patterns = patterns
            .into_iter()
            .map(|p| IdentityPattern::parse(p.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(Self { patterns })
    }

    /// Whether a peer with this id is accepted.
    pub fn allows(&self, id: &SpiffeId) -> bool {
        self.patterns.is_empty() || self.patterns.iter().any(|p| p.matches(id))
    }

    /// Whether this policy accepts every identity.
    pub fn is_any(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The patterns, in the order given.
    pub fn patterns(&self) -> &[IdentityPattern] {
        &self.patterns
    }
}

/// Reads the SPIFFE id of a DER-encoded end-entity certificate: its one `spiffe://` URI SAN.
///
/// URI SANs of other schemes are ignored. No `spiffe://` URI SAN, or more than one, is an error,
/// as is a `spiffe://` URI that is not a valid SPIFFE id.
pub fn spiffe_id_from_cert(der: &[u8]) -> Result<SpiffeId, IdentityError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::Certificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Certificate(e.to_string()))?;
    let mut spiffe_uris = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) if has_spiffe_scheme(uri) => Some(*uri),
            _ => None,
        });
    let first = spiffe_uris.next().ok_or(IdentityError::NoSpiffeId)?;
    let others = spiffe_uris.count();
    if others > 0 {
        return Err(IdentityError::SeveralSpiffeIds(others + 1));
    }
    SpiffeId::parse(first)
}

/// The scheme test is case-insensitive so that `SPIFFE://...` is counted (and then rejected by
/// [`SpiffeId::parse`]) rather than silently ignored.
fn has_spiffe_scheme(uri: &str) -> bool {
    uri.get(..SCHEME.len())
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case(SCHEME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_workload_ids() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/client").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.path(), "/ns/default/sa/client");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/client"
        );
        let domain = SpiffeId::try_from("spiffe://example.org").unwrap();
        assert_eq!(domain.trust_domain(), "example.org");
        assert_eq!(domain.path(), "");
        let id: SpiffeId = "spiffe://a_b-c.d/X.y-z_0".parse().unwrap();
        assert_eq!(id.path(), "/X.y-z_0");
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "",
            "spiffe://",
            "spiffe:///path",
            "SPIFFE://cluster.local/a",
            "https://cluster.local/a",
            "spiffe://Cluster.local/a",
            "spiffe://cluster.local:8080/a",
            "spiffe://user@cluster.local/a",
            "spiffe://cluster.local/",
            "spiffe://cluster.local/a/",
            "spiffe://cluster.local//a",
            "spiffe://cluster.local/a/./b",
            "spiffe://cluster.local/a/../b",
            "spiffe://cluster.local/a?q=1",
            "spiffe://cluster.local/a#f",
            "spiffe://cluster.local/a b",
            "spiffe://cluster.local/%41",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let long = format!("spiffe://cluster.local/{}", "a".repeat(MAX_ID_LEN));
        assert!(SpiffeId::parse(&long).is_err());
    }

    #[test]
    fn policy_matches_exact_ids_and_trust_domains() {
        let client = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/client").unwrap();
        let other = SpiffeId::parse("spiffe://other.mesh/ns/default/sa/client").unwrap();
        assert!(IdentityPolicy::any().allows(&client));
        assert!(IdentityPolicy::any().is_any());

        let exact = IdentityPolicy::parse(["spiffe://cluster.local/ns/default/sa/client"]).unwrap();
        assert!(exact.allows(&client));
        assert!(!exact.allows(&other));
        let server = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/server").unwrap();
        assert!(!exact.allows(&server));

        let domain = IdentityPolicy::parse(["spiffe://cluster.local/*"]).unwrap();
        assert!(domain.allows(&client) && domain.allows(&server));
        assert!(!domain.allows(&other));
        assert_eq!(domain.patterns()[0].to_string(), "spiffe://cluster.local/*");

        let both =
            IdentityPolicy::parse(["spiffe://cluster.local/*", "spiffe://other.mesh/x"]).unwrap();
        assert!(both.allows(&client) && !both.allows(&other));
    }

    #[test]
    fn rejects_malformed_patterns() {
        for bad in [
            "spiffe://*/x",
            "spiffe://cluster.local/ns/*",
            "spiffe://cluster.local/*/x",
            "spiffe://Bad/*",
            "cluster.local",
        ] {
            assert!(IdentityPattern::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(matches!(
            spiffe_id_from_cert(b"not a certificate"),
            Err(IdentityError::Certificate(_))
        ));
    }
}
