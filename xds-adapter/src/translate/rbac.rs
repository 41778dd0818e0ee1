//! Envoy RBAC policies as what shuntd can check at a pairing: the peer's verified identity, its
//! address, and the destination address and port.
//!
//! A policy becomes a disjunction of [`Conjunction`]s. Conditions shuntd cannot see (HTTP
//! headers and paths, SNI, metadata) are left to Envoy and noted on the conjunction; conditions
//! that cannot be expressed at all (negations, general regexes) make the policy
//! [`Unsupported`], and the caller decides which way to fail.

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Policy, Principal, permission, principal,
};
use ipnet::IpNet;

use super::matchers::identity_match;
use crate::tables::{IdentityMatch, PortRange};

/// Larger expansions are refused: a policy of nested ORs should not turn into millions of rules.
pub(crate) const MAX_CONJUNCTIONS: usize = 4096;

/// Conditions that must all hold; unset ones hold for everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Conjunction {
    pub principal: Option<IdentityMatch>,
    pub source: Option<IpNet>,
    pub destination: Option<IpNet>,
    pub ports: Option<PortRange>,
    /// What shuntd cannot check and Envoy still must.
    pub envoy_only: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unsupported {
    #[error("{0} cannot be expressed as shuntd rules")]
    Construct(&'static str),
    #[error("principal: {0}")]
    Identity(#[from] super::matchers::Unrepresentable),
    #[error("bad CIDR `{0}`")]
    Cidr(String),
    #[error("bad port range {0}..{1}")]
    Ports(i32, i32),
    #[error("one condition names two different principals ({0} and {1})")]
    TwoPrincipals(IdentityMatch, IdentityMatch),
    #[error("expands to more than {MAX_CONJUNCTIONS} rules")]
    TooLarge,
}

/// Which RBAC filter the policy sits in: the HTTP filter sees requests, so its HTTP conditions
/// are Envoy's to check; the network filter's `remote_ip` is the connection's peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layer {
    Network,
    Http,
}

type Dnf = Result<Vec<Conjunction>, Unsupported>;

fn everything() -> Vec<Conjunction> {
    vec![Conjunction::default()]
}

fn envoy_only(what: &str) -> Vec<Conjunction> {
    vec![Conjunction {
        envoy_only: vec![what.to_owned()],
        ..Default::default()
    }]
}

/// A policy matches when one of its permissions and one of its principals do.
pub(crate) fn policy(p: &Policy, layer: Layer) -> Dnf {
    if p.condition.is_some() || p.checked_condition.is_some() {
        return Err(Unsupported::Construct("a CEL condition"));
    }
    let permissions = any_of(p.permissions.iter().map(permission))?;
    let principals = any_of(p.principals.iter().map(|x| principal_dnf(x, layer)))?;
    and(permissions, principals)
}

fn any_of(items: impl Iterator<Item = Dnf>) -> Dnf {
    let mut out = Vec::new();
    for item in items {
        out.extend(item?);
        if out.len() > MAX_CONJUNCTIONS {
            return Err(Unsupported::TooLarge);
        }
    }
    Ok(out)
}

fn all_of(mut items: impl Iterator<Item = Dnf>) -> Dnf {
    items.try_fold(everything(), |acc, item| and(acc, item?))
}

// Deprecated variants still arrive from older control planes; they must be read, not refused.
#[allow(deprecated)]
fn permission(p: &Permission) -> Dnf {
    use permission::Rule;
    let Some(rule) = &p.rule else {
        return Err(Unsupported::Construct("an empty permission"));
    };
    match rule {
        Rule::Any(true) => Ok(everything()),
        Rule::Any(false) => Ok(Vec::new()),
        Rule::AndRules(set) => all_of(set.rules.iter().map(permission)),
        Rule::OrRules(set) => any_of(set.rules.iter().map(permission)),
        Rule::DestinationPort(port) => {
            let port = u16::try_from(*port).map_err(|_| Unsupported::Ports(*port as i32, 0))?;
            Ok(vec![Conjunction {
                ports: Some(PortRange::single(port)),
                ..Default::default()
            }])
        }
        Rule::DestinationPortRange(r) => {
            // Int32Range is half-open.
            let bad = || Unsupported::Ports(r.start, r.end);
            let first = u16::try_from(r.start).map_err(|_| bad())?;
            let last = r.end.checked_sub(1).ok_or_else(bad)?;
            let last = u16::try_from(last).map_err(|_| bad())?;
            if first > last {
                return Ok(Vec::new());
            }
            Ok(vec![Conjunction {
                ports: Some(PortRange { first, last }),
                ..Default::default()
            }])
        }
        Rule::DestinationIp(cidr) => Ok(vec![Conjunction {
            destination: Some(parse_cidr(cidr)?),
            ..Default::default()
        }]),
        Rule::Header(_) => Ok(envoy_only("header")),
        Rule::UrlPath(_) => Ok(envoy_only("url_path")),
        Rule::UriTemplate(_) => Ok(envoy_only("uri_template")),
        Rule::RequestedServerName(_) => Ok(envoy_only("requested_server_name")),
        Rule::Metadata(_) | Rule::SourcedMetadata(_) => Ok(envoy_only("metadata")),
        Rule::Matcher(_) => Ok(envoy_only("matcher extension")),
        Rule::NotRule(_) => Err(Unsupported::Construct("not_rule")),
    }
}

#[allow(deprecated)]
fn principal_dnf(p: &Principal, layer: Layer) -> Dnf {
    use principal::Identifier;
    let Some(id) = &p.identifier else {
        return Err(Unsupported::Construct("an empty principal"));
    };
    let source = |cidr: &CidrRange| -> Dnf {
        Ok(vec![Conjunction {
            source: Some(parse_cidr(cidr)?),
            ..Default::default()
        }])
    };
    match id {
        Identifier::Any(true) => Ok(everything()),
        Identifier::Any(false) => Ok(Vec::new()),
        Identifier::AndIds(set) => all_of(set.ids.iter().map(|i| principal_dnf(i, layer))),
        Identifier::OrIds(set) => any_of(set.ids.iter().map(|i| principal_dnf(i, layer))),
        Identifier::Authenticated(a) => match &a.principal_name {
            // Any peer with a verified certificate.
            None => Ok(vec![Conjunction {
                principal: Some(IdentityMatch::Prefix(String::new())),
                ..Default::default()
            }]),
            Some(m) => Ok(vec![Conjunction {
                principal: Some(identity_match(m)?),
                ..Default::default()
            }]),
        },
        Identifier::SourceIp(cidr) | Identifier::DirectRemoteIp(cidr) => source(cidr),
        // Behind HTTP, remote_ip may come from X-Forwarded-For, which only Envoy sees.
        Identifier::RemoteIp(cidr) => match layer {
            Layer::Network => source(cidr),
            Layer::Http => Ok(envoy_only("remote_ip")),
        },
        Identifier::Header(_) => Ok(envoy_only("header")),
        Identifier::UrlPath(_) => Ok(envoy_only("url_path")),
        Identifier::Metadata(_) | Identifier::SourcedMetadata(_) => Ok(envoy_only("metadata")),
        Identifier::FilterState(_) => Ok(envoy_only("filter_state")),
        Identifier::Custom(_) => Ok(envoy_only("custom principal")),
        Identifier::NotId(_) => Err(Unsupported::Construct("not_id")),
    }
}

pub(crate) fn parse_cidr(c: &CidrRange) -> Result<IpNet, Unsupported> {
    let bad = || Unsupported::Cidr(c.address_prefix.clone());
    let ip: std::net::IpAddr = c.address_prefix.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = c.prefix_len.map(|l| l.value).unwrap_or(max);
    let len = u8::try_from(len).map_err(|_| bad())?;
    IpNet::new(ip, len).map(|n| n.trunc()).map_err(|_| bad())
}

/// Conjunctions that hold where both inputs do.
pub(crate) fn and(a: Vec<Conjunction>, b: Vec<Conjunction>) -> Dnf {
    let mut out = Vec::new();
    for x in &a {
        for y in &b {
            if let Some(both) = merge(x, y)? {
                out.push(both);
                if out.len() > MAX_CONJUNCTIONS {
                    return Err(Unsupported::TooLarge);
                }
            }
        }
    }
    Ok(out)
}

/// `None` when the two can never hold together.
fn merge(x: &Conjunction, y: &Conjunction) -> Result<Option<Conjunction>, Unsupported> {
    let principal = match (&x.principal, &y.principal) {
        (Some(a), Some(b)) if a == b => Some(a.clone()),
        // "Any verified identity" and a named one: the named one.
        (Some(IdentityMatch::Prefix(p)), Some(b)) | (Some(b), Some(IdentityMatch::Prefix(p)))
            if p.is_empty() =>
        {
            Some(b.clone())
        }
        (Some(a), Some(b)) => return Err(Unsupported::TwoPrincipals(a.clone(), b.clone())),
        (a, b) => a.clone().or_else(|| b.clone()),
    };
    let Some(source) = narrower(x.source, y.source) else {
        return Ok(None);
    };
    let Some(destination) = narrower(x.destination, y.destination) else {
        return Ok(None);
    };
    let ports = match (x.ports, y.ports) {
        (Some(a), Some(b)) => match a.intersect(b) {
            Some(p) => Some(p),
            None => return Ok(None),
        },
        (a, b) => a.or(b),
    };
    let mut envoy_only = x.envoy_only.clone();
    for e in &y.envoy_only {
        if !envoy_only.contains(e) {
            envoy_only.push(e.clone());
        }
    }
    Ok(Some(Conjunction {
        principal,
        source,
        destination,
        ports,
        envoy_only,
    }))
}

/// The intersection of two optional prefixes: `None` when disjoint, `Some(None)` when both
/// are unset.
pub(crate) fn narrower(a: Option<IpNet>, b: Option<IpNet>) -> Option<Option<IpNet>> {
    match (a, b) {
        (Some(a), Some(b)) => {
            if a.contains(&b) {
                Some(Some(b))
            } else if b.contains(&a) {
                Some(Some(a))
            } else {
                None
            }
        }
        (a, b) => Some(a.or(b)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::rbac::v3::principal::Authenticated;
    use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
    use envoy_types::pb::google::protobuf::UInt32Value;

    fn principal_exact(id: &str) -> Principal {
        Principal {
            identifier: Some(principal::Identifier::Authenticated(Authenticated {
                principal_name: Some(StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::Exact(id.into())),
                    ignore_case: false,
                }),
            })),
        }
    }

    fn or_ids(ids: Vec<Principal>) -> Principal {
        Principal {
            identifier: Some(principal::Identifier::OrIds(principal::Set { ids })),
        }
    }

    fn and_ids(ids: Vec<Principal>) -> Principal {
        Principal {
            identifier: Some(principal::Identifier::AndIds(principal::Set { ids })),
        }
    }

    fn source(prefix: &str, len: u32) -> Principal {
        Principal {
            identifier: Some(principal::Identifier::DirectRemoteIp(CidrRange {
                address_prefix: prefix.into(),
                prefix_len: Some(UInt32Value { value: len }),
            })),
        }
    }

    fn port(p: u32) -> Permission {
        Permission {
            rule: Some(permission::Rule::DestinationPort(p)),
        }
    }

    fn path() -> Permission {
        Permission {
            rule: Some(permission::Rule::UrlPath(Default::default())),
        }
    }

    #[test]
    fn istio_shape_expands_to_one_conjunction_per_principal() {
        // Istio: principals [and_ids [or_ids [a, b]]], permissions [and_rules [or_rules [port]]].
        let p = Policy {
            permissions: vec![Permission {
                rule: Some(permission::Rule::AndRules(permission::Set {
                    rules: vec![Permission {
                        rule: Some(permission::Rule::OrRules(permission::Set {
                            rules: vec![port(8080)],
                        })),
                    }],
                })),
            }],
            principals: vec![and_ids(vec![or_ids(vec![
                principal_exact("spiffe://td/ns/a/sa/x"),
                principal_exact("spiffe://td/ns/a/sa/y"),
            ])])],
            ..Default::default()
        };
        let dnf = policy(&p, Layer::Network).unwrap();
        assert_eq!(dnf.len(), 2);
        assert_eq!(
            dnf[1],
            Conjunction {
                principal: Some(IdentityMatch::Exact("spiffe://td/ns/a/sa/y".into())),
                ports: Some(PortRange::single(8080)),
                ..Default::default()
            }
        );
    }

    #[test]
    fn conjunctions_intersect_or_vanish() {
        let both = |a: Principal, b: Principal| {
            policy(
                &Policy {
                    permissions: vec![Permission {
                        rule: Some(permission::Rule::Any(true)),
                    }],
                    principals: vec![and_ids(vec![a, b])],
                    ..Default::default()
                },
                Layer::Network,
            )
        };
        let nested = both(source("10.0.0.0", 8), source("10.1.0.0", 16)).unwrap();
        assert_eq!(nested[0].source, Some("10.1.0.0/16".parse().unwrap()));
        assert_eq!(
            both(source("10.0.0.0", 8), source("11.0.0.0", 8)),
            Ok(vec![])
        );
        assert!(matches!(
            both(principal_exact("a"), principal_exact("b")),
            Err(Unsupported::TwoPrincipals(..))
        ));
        let ranges = policy(
            &Policy {
                permissions: vec![Permission {
                    rule: Some(permission::Rule::AndRules(permission::Set {
                        rules: vec![port(80), port(81)],
                    })),
                }],
                principals: vec![Principal {
                    identifier: Some(principal::Identifier::Any(true)),
                }],
                ..Default::default()
            },
            Layer::Network,
        );
        assert_eq!(ranges, Ok(vec![]), "port 80 and port 81 never both hold");
    }

    #[test]
    fn http_conditions_are_left_to_envoy_and_negations_refused() {
        let p = Policy {
            permissions: vec![path()],
            principals: vec![principal_exact("a")],
            ..Default::default()
        };
        let dnf = policy(&p, Layer::Http).unwrap();
        assert_eq!(dnf[0].envoy_only, vec!["url_path".to_owned()]);
        assert_eq!(dnf[0].principal, Some(IdentityMatch::Exact("a".into())));

        let not = Policy {
            permissions: vec![port(1)],
            principals: vec![Principal {
                identifier: Some(principal::Identifier::NotId(Box::new(principal_exact("a")))),
            }],
            ..Default::default()
        };
        assert_eq!(
            policy(&not, Layer::Network),
            Err(Unsupported::Construct("not_id"))
        );
    }

    #[test]
    fn expansion_is_capped() {
        let many: Vec<Principal> = (0..100).map(|i| principal_exact(&i.to_string())).collect();
        let ports: Vec<Permission> = (1..100).map(port).collect();
        let p = Policy {
            permissions: ports,
            principals: many,
            ..Default::default()
        };
        assert_eq!(policy(&p, Layer::Network), Err(Unsupported::TooLarge));
    }
}
