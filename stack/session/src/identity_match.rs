//! Matching a peer's identity (a SPIFFE id) against a pattern: exactly, by prefix, by suffix or
//! by a substring, as Envoy's string matchers and Istio's principals do.
//!
//! Patterns are never empty: an empty prefix would match every identity and read like "no
//! identity" to someone skimming a rule, so Envoy refuses it and so do we. Matching is
//! case-sensitive, as SPIFFE ids are.

use std::fmt;
use std::str::FromStr;

/// Longest pattern accepted: no longer than the longest identity a pairing may carry, since a
/// longer one could never match.
pub const MAX_PATTERN_LEN: usize = shunt_sapi::message::MAX_PEER_IDENTITY_LEN;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityMatchError {
    #[error("identity pattern is empty")]
    Empty,
    #[error("identity pattern is longer than {MAX_PATTERN_LEN} bytes")]
    TooLong,
    #[error("identity pattern `{0}` has characters other than printable ASCII")]
    NotPrintable(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdentityMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
}

impl IdentityMatch {
    /// Builds a pattern and checks it (see [`IdentityMatch::validate`]).
    pub fn new(kind: IdentityMatchKind, pattern: &str) -> Result<Self, IdentityMatchError> {
        let pattern = pattern.to_owned();
        let m = match kind {
            IdentityMatchKind::Exact => IdentityMatch::Exact(pattern),
            IdentityMatchKind::Prefix => IdentityMatch::Prefix(pattern),
            IdentityMatchKind::Suffix => IdentityMatch::Suffix(pattern),
            IdentityMatchKind::Contains => IdentityMatch::Contains(pattern),
        };
        m.validate()?;
        Ok(m)
    }

    pub fn kind(&self) -> IdentityMatchKind {
        match self {
            IdentityMatch::Exact(_) => IdentityMatchKind::Exact,
            IdentityMatch::Prefix(_) => IdentityMatchKind::Prefix,
            IdentityMatch::Suffix(_) => IdentityMatchKind::Suffix,
            IdentityMatch::Contains(_) => IdentityMatchKind::Contains,
        }
    }

    pub fn pattern(&self) -> &str {
        match self {
            IdentityMatch::Exact(p)
            | IdentityMatch::Prefix(p)
            | IdentityMatch::Suffix(p)
            | IdentityMatch::Contains(p) => p,
        }
    }

    /// Non-empty, at most [`MAX_PATTERN_LEN`] bytes, printable ASCII: the same alphabet as the
    /// identities pairings carry, so a pattern that could never match is refused up front.
    pub fn validate(&self) -> Result<(), IdentityMatchError> {
        let p = self.pattern();
        if p.is_empty() {
            return Err(IdentityMatchError::Empty);
        }
        if p.len() > MAX_PATTERN_LEN {
            return Err(IdentityMatchError::TooLong);
        }
        if !p.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return Err(IdentityMatchError::NotPrintable(
                p.escape_default().to_string(),
            ));
        }
        Ok(())
    }

    pub fn matches(&self, identity: &str) -> bool {
        match self {
            IdentityMatch::Exact(p) => identity == p,
            IdentityMatch::Prefix(p) => identity.starts_with(p.as_str()),
            IdentityMatch::Suffix(p) => identity.ends_with(p.as_str()),
            IdentityMatch::Contains(p) => identity.contains(p.as_str()),
        }
    }

    /// How narrowly the pattern picks identities, for ordering rules: greater is narrower.
    pub fn specificity(&self) -> u8 {
        match self {
            IdentityMatch::Exact(_) => 3,
            IdentityMatch::Prefix(_) | IdentityMatch::Suffix(_) => 2,
            IdentityMatch::Contains(_) => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentityMatchKind {
    Exact,
    Prefix,
    Suffix,
    Contains,
}

impl IdentityMatchKind {
    pub const ALL: [IdentityMatchKind; 4] = [
        IdentityMatchKind::Exact,
        IdentityMatchKind::Prefix,
        IdentityMatchKind::Suffix,
        IdentityMatchKind::Contains,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            IdentityMatchKind::Exact => "exact",
            IdentityMatchKind::Prefix => "prefix",
            IdentityMatchKind::Suffix => "suffix",
            IdentityMatchKind::Contains => "contains",
        }
    }
}

/// `exact:ID`, `prefix:P`, `suffix:S` or `contains:C`.
impl fmt::Display for IdentityMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind().as_str(), self.pattern())
    }
}

/// Parses what [`Display`](fmt::Display) prints. Text without one of the four kinds before its
/// first colon is an exact identity, so a bare `spiffe://...` id means itself.
impl FromStr for IdentityMatch {
    type Err = IdentityMatchError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parsed = s.split_once(':').and_then(|(kind, pattern)| {
            IdentityMatchKind::ALL
                .into_iter()
                .find(|k| k.as_str() == kind)
                .map(|k| (k, pattern))
        });
        match parsed {
            Some((kind, pattern)) => IdentityMatch::new(kind, pattern),
            None => IdentityMatch::new(IdentityMatchKind::Exact, s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";

    fn m(s: &str) -> IdentityMatch {
        s.parse().unwrap()
    }

    #[test]
    fn each_kind_matches_as_named() {
        assert!(m(&format!("exact:{CLIENT}")).matches(CLIENT));
        assert!(!m(&format!("exact:{CLIENT}")).matches(&format!("{CLIENT}2")));
        assert!(m("prefix:spiffe://cluster.local/ns/default/").matches(CLIENT));
        assert!(!m("prefix:spiffe://cluster.local/ns/other/").matches(CLIENT));
        assert!(m("suffix:/sa/client").matches(CLIENT));
        assert!(!m("suffix:/sa/server").matches(CLIENT));
        assert!(m("contains:/ns/default/").matches(CLIENT));
        assert!(!m("contains:/ns/prod/").matches(CLIENT));
        assert!(
            !m("contains:/NS/default/").matches(CLIENT),
            "case-sensitive"
        );
    }

    #[test]
    fn bare_text_is_exact_even_with_colons() {
        assert_eq!(m(CLIENT), IdentityMatch::Exact(CLIENT.into()));
        assert_eq!(m("spiffe:x"), IdentityMatch::Exact("spiffe:x".into()));
        // Only the first colon separates the kind.
        assert_eq!(
            m("prefix:spiffe://a/"),
            IdentityMatch::Prefix("spiffe://a/".into())
        );
        assert_eq!(m("exact:exact:x"), IdentityMatch::Exact("exact:x".into()));
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "exact:spiffe://a/b",
            "prefix:spiffe://a/",
            "suffix:/sa/b",
            "contains:ns",
        ] {
            assert_eq!(m(text).to_string(), text);
            assert_eq!(m(&m(text).to_string()), m(text));
        }
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert_eq!(
            "prefix:".parse::<IdentityMatch>(),
            Err(IdentityMatchError::Empty)
        );
        assert_eq!("".parse::<IdentityMatch>(), Err(IdentityMatchError::Empty));
        assert_eq!(
            "x".repeat(MAX_PATTERN_LEN + 1).parse::<IdentityMatch>(),
            Err(IdentityMatchError::TooLong)
        );
        assert!("x".repeat(MAX_PATTERN_LEN).parse::<IdentityMatch>().is_ok());
        for bad in ["exact:a\nb", "suffix:\u{7f}", "contains:é"] {
            assert!(
                matches!(
                    bad.parse::<IdentityMatch>(),
                    Err(IdentityMatchError::NotPrintable(_))
                ),
                "{bad:?}"
            );
        }
        assert_eq!(
            IdentityMatch::Contains(String::new()).validate(),
            Err(IdentityMatchError::Empty)
        );
    }

    #[test]
    fn exact_is_narrowest_then_prefix_and_suffix_then_contains() {
        let s = |t: &str| m(t).specificity();
        assert!(s("exact:a") > s("prefix:a"));
        assert_eq!(s("prefix:a"), s("suffix:a"));
        assert!(s("suffix:a") > s("contains:a"));
    }
}
