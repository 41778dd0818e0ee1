//! App namespaces: who may attach where, and with which address their connects leave.
//!
//! A secret is checked in constant time on every path, including for namespaces that do not
//! exist, so timing tells an attacker neither the secret nor which namespace ids are real.

use std::collections::BTreeMap;
use std::net::IpAddr;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::access::AccessList;
use crate::certificates::Certificates;
use crate::rules::RulesTable;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamespaceError {
    #[error("unknown namespace `{0}`")]
    Unknown(String),
    #[error("wrong secret for namespace `{0}`")]
    WrongSecret(String),
    #[error("namespace `{0}` already exists")]
    Exists(String),
    #[error("namespace id must be 1 to 128 characters of [A-Za-z0-9._-], got `{0}`")]
    BadId(String),
    #[error("uid {uid} (gid {gid}) may not attach to namespace `{namespace}`")]
    NotPermitted {
        namespace: String,
        uid: u32,
        gid: u32,
    },
}

/// Digest of a secret; comparing equal-length digests keeps the comparison constant-time even
/// when the presented secret's length differs.
#[derive(Clone)]
struct SecretDigest([u8; 32]);

impl SecretDigest {
    fn of(secret: &[u8]) -> Self {
        Self(Sha256::digest(secret).into())
    }
    fn matches(&self, presented: &SecretDigest) -> bool {
        self.0.ct_eq(&presented.0).into()
    }
}

pub struct Namespace {
    pub id: String,
    secret: SecretDigest,
    /// Local address of connects made from this namespace.
    pub address: IpAddr,
    /// Who may attach, beside knowing the secret.
    pub access: AccessList,
    /// Egress rules for connects made from this namespace.
    pub local_rules: RulesTable,
    /// Workload certificates its apps may fetch.
    pub certificates: Certificates,
}

impl std::fmt::Debug for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Namespace")
            .field("id", &self.id)
            .field("address", &self.address)
            .field("local_rules", &self.local_rules.len())
            .finish_non_exhaustive()
    }
}

impl Namespace {
    pub fn new(id: &str, secret: &[u8], address: IpAddr) -> Result<Self, NamespaceError> {
        let valid = !id.is_empty()
            && id.len() <= 128
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid {
            return Err(NamespaceError::BadId(id.to_owned()));
        }
        Ok(Self {
            id: id.to_owned(),
            secret: SecretDigest::of(secret),
            address,
            access: AccessList::default(),
            local_rules: RulesTable::default(),
            certificates: Certificates::default(),
        })
    }

    pub fn set_secret(&mut self, secret: &[u8]) {
        self.secret = SecretDigest::of(secret);
    }

    /// Sets who may attach (see [`AccessList`]).
    pub fn with_access(mut self, access: AccessList) -> Self {
        self.access = access;
        self
    }
}

#[derive(Debug, Default)]
pub struct Namespaces {
    by_id: BTreeMap<String, Namespace>,
}

impl Namespaces {
    pub fn insert(&mut self, ns: Namespace, replace: bool) -> Result<(), NamespaceError> {
        match self.by_id.get_mut(&ns.id) {
            Some(existing) if replace => {
                // Keep the namespace's rules and certificates: replacing a secret must not drop
                // its policy.
                existing.secret = ns.secret;
                existing.address = ns.address;
                existing.access = ns.access;
                Ok(())
            }
            Some(_) => Err(NamespaceError::Exists(ns.id)),
            None => {
                self.by_id.insert(ns.id.clone(), ns);
                Ok(())
            }
        }
    }

    pub fn remove(&mut self, id: &str) -> Result<Namespace, NamespaceError> {
        self.by_id
            .remove(id)
            .ok_or_else(|| NamespaceError::Unknown(id.to_owned()))
    }

    pub fn get(&self, id: &str) -> Option<&Namespace> {
        self.by_id.get(id)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut Namespace> {
        self.by_id.get_mut(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Namespace> {
        self.by_id.values()
    }

    /// In id order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Namespace> {
        self.by_id.values_mut()
    }

    /// Checks `secret` against namespace `id`, spending the same work whether or not it exists.
    pub fn authenticate(&self, id: &str, secret: &[u8]) -> Result<&Namespace, NamespaceError> {
        let presented = SecretDigest::of(secret);
        // An unknown id is compared against a fixed digest so both paths do the same work.
        let unknown = SecretDigest([0xa5; 32]);
        let ns = self.by_id.get(id);
        let ok = ns.map_or(&unknown, |ns| &ns.secret).matches(&presented);
        match ns {
            None => Err(NamespaceError::Unknown(id.to_owned())),
            Some(ns) if ok => Ok(ns),
            Some(_) => Err(NamespaceError::WrongSecret(id.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Namespaces {
        let mut t = Namespaces::default();
        t.insert(
            Namespace::new("default", b"", "127.0.0.1".parse().unwrap()).unwrap(),
            false,
        )
        .unwrap();
        t.insert(
            Namespace::new("blue", b"1234", "10.0.0.1".parse().unwrap()).unwrap(),
            false,
        )
        .unwrap();
        t
    }

    #[test]
    fn right_secret_attaches_wrong_one_does_not() {
        let t = table();
        assert_eq!(t.authenticate("blue", b"1234").unwrap().id, "blue");
        assert_eq!(
            t.authenticate("blue", b"12345").unwrap_err(),
            NamespaceError::WrongSecret("blue".into())
        );
        assert_eq!(
            t.authenticate("blue", b"").unwrap_err(),
            NamespaceError::WrongSecret("blue".into())
        );
        assert_eq!(
            t.authenticate("green", b"1234").unwrap_err(),
            NamespaceError::Unknown("green".into())
        );
        assert!(t.authenticate("default", b"").is_ok());
    }

    #[test]
    fn replace_keeps_rules_and_changes_secret() {
        let mut t = table();
        let err = t
            .insert(
                Namespace::new("blue", b"x", "10.0.0.2".parse().unwrap()).unwrap(),
                false,
            )
            .unwrap_err();
        assert_eq!(err, NamespaceError::Exists("blue".into()));
        t.insert(
            Namespace::new("blue", b"new", "10.0.0.2".parse().unwrap()).unwrap(),
            true,
        )
        .unwrap();
        assert!(t.authenticate("blue", b"1234").is_err());
        assert_eq!(
            t.authenticate("blue", b"new").unwrap().address.to_string(),
            "10.0.0.2"
        );
    }

    #[test]
    fn ids_are_validated() {
        for bad in ["", "a b", "x/y", &"n".repeat(129)] {
            assert!(
                Namespace::new(bad, b"", "::1".parse().unwrap()).is_err(),
                "{bad}"
            );
        }
    }
}
