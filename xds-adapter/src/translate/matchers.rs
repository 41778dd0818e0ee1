//! Envoy string matchers as identity matches.
//!
//! shuntd matches identities exactly, by prefix, suffix or substring. Envoy's regexes are
//! accepted only in the literal shapes Istio generates (`.*/ns/NAMESPACE/.*` for a namespace,
//! `spiffe://TRUST_DOMAIN/.*` and the like); anything else is refused rather than guessed.

use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};

use crate::tables::IdentityMatch;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unrepresentable {
    #[error("case-insensitive string match")]
    IgnoreCase,
    #[error("regex `{0}` is not a literal prefix, suffix, substring or exact match")]
    Regex(String),
    #[error("string matcher without a pattern")]
    Empty,
    #[error("custom string matcher")]
    Custom,
}

pub(crate) fn identity_match(m: &StringMatcher) -> Result<IdentityMatch, Unrepresentable> {
    if m.ignore_case {
        return Err(Unrepresentable::IgnoreCase);
    }
    match m.match_pattern.as_ref().ok_or(Unrepresentable::Empty)? {
        MatchPattern::Exact(s) => Ok(IdentityMatch::Exact(s.clone())),
        MatchPattern::Prefix(s) => Ok(IdentityMatch::Prefix(s.clone())),
        MatchPattern::Suffix(s) => Ok(IdentityMatch::Suffix(s.clone())),
        MatchPattern::Contains(s) => Ok(IdentityMatch::Contains(s.clone())),
        MatchPattern::SafeRegex(r) => literal_regex(&r.regex),
        MatchPattern::Custom(_) => Err(Unrepresentable::Custom),
    }
}

/// Envoy's regexes (RE2) match the whole input, so `a.*` is a prefix match.
fn literal_regex(regex: &str) -> Result<IdentityMatch, Unrepresentable> {
    let refuse = || Unrepresentable::Regex(regex.to_owned());
    let body = regex.strip_prefix('^').unwrap_or(regex);
    let body = body.strip_suffix('$').unwrap_or(body);
    let (leading, body) = match body.strip_prefix(".*") {
        Some(rest) => (true, rest),
        None => (false, body),
    };
    let (trailing, body) = match body.strip_suffix(".*") {
        Some(rest) => (true, rest),
        None => (false, body),
    };
    let literal = unescape(body).ok_or_else(refuse)?;
    if literal.is_empty() {
        return Err(refuse());
    }
    Ok(match (leading, trailing) {
        (false, false) => IdentityMatch::Exact(literal),
        (false, true) => IdentityMatch::Prefix(literal),
        (true, false) => IdentityMatch::Suffix(literal),
        (true, true) => IdentityMatch::Contains(literal),
    })
}

/// The literal a regex body stands for, if it has no operators (escaped ones are literal).
fn unescape(body: &str) -> Option<String> {
    let mut out = String::with_capacity(body.len());
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let next = chars.next()?;
                if next.is_ascii_alphanumeric() {
                    return None; // \d, \w, \b ...: classes, not literals
                }
                out.push(next);
            }
            '.' | '*' | '+' | '?' | '(' | ')' | '[' | ']' | '{' | '}' | '|' | '^' | '$' => {
                return None;
            }
            c => out.push(c),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;

    fn regex(r: &str) -> Result<IdentityMatch, Unrepresentable> {
        identity_match(&StringMatcher {
            match_pattern: Some(MatchPattern::SafeRegex(RegexMatcher {
                regex: r.into(),
                ..Default::default()
            })),
            ignore_case: false,
        })
    }

    #[test]
    fn istio_regex_shapes() {
        assert_eq!(
            regex(".*/ns/foo/.*"),
            Ok(IdentityMatch::Contains("/ns/foo/".into()))
        );
        assert_eq!(
            regex("spiffe://cluster\\.local/.*"),
            Ok(IdentityMatch::Prefix("spiffe://cluster.local/".into()))
        );
        assert_eq!(
            regex(".*/sa/bar"),
            Ok(IdentityMatch::Suffix("/sa/bar".into()))
        );
        assert_eq!(regex("^a-b$"), Ok(IdentityMatch::Exact("a-b".into())));
    }

    #[test]
    fn real_regexes_are_refused() {
        for r in [".*", "a.b", "a|b", "[a-z]+", "\\d+", "(x).*", ""] {
            assert!(regex(r).is_err(), "{r}");
        }
        let m = StringMatcher {
            match_pattern: Some(MatchPattern::Exact("x".into())),
            ignore_case: true,
        };
        assert_eq!(identity_match(&m), Err(Unrepresentable::IgnoreCase));
        assert_eq!(
            identity_match(&StringMatcher::default()),
            Err(Unrepresentable::Empty)
        );
    }
}
