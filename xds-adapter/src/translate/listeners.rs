//! Inbound listeners and their RBAC filters into rules for shuntd's global (ingress) table.
//!
//! Each filter chain is one destination (the workload's addresses and the chain's port) with
//! its own RBAC filters. Rule priorities reproduce Envoy's evaluation within that destination:
//!
//! | priority | rules |
//! |---|---|
//! | band + 3 | DENY policies: any match refuses |
//! | band + 2 | ALLOW policies: a match admits |
//! | band + 1 | the rest: refused when an ALLOW filter exists; otherwise admitted, but only to shield a port-specific chain from a catch-all chain's rules |
//!
//! Chains that name a destination port use band 100, catch-all chains band 0, so a port's own
//! rules always decide before the catch-all's, as Envoy's filter-chain match does.

use std::collections::BTreeMap;
use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::TrafficDirection;
use envoy_types::pb::envoy::config::listener::v3::{FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::rbac::v3::rbac::Action as RbacAction;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::google::protobuf::Any;
use ipnet::IpNet;
use prost::Message;

use super::rbac::{self, Conjunction, Layer, Unsupported};
use super::services::socket_addr;
use crate::config_dump::extension_type_url;
use crate::tables::{Action, Finding, PortRange, Rule, Severity};

const NETWORK_RBAC: &str = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";
const HTTP_RBAC: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const EXT_AUTHZ: [&str; 2] = [
    "type.googleapis.com/envoy.extensions.filters.network.ext_authz.v3.ExtAuthz",
    "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
];
const ORIGINAL_DST: &str = "envoy.filters.listener.original_dst";

const PORT_BAND: u32 = 100;
const CATCH_ALL_BAND: u32 = 0;
const MAX_TAG_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListenerError {
    #[error(
        "filter chain {chain}: DENY policy `{policy}`: {reason}; refusing the listener rather than dropping a deny"
    )]
    Deny {
        chain: String,
        policy: String,
        reason: Unsupported,
    },
    #[error("filter chain {chain}: {filter} does not decode: {reason}")]
    Malformed {
        chain: String,
        filter: String,
        reason: String,
    },
    #[error("binds every address and the workload's own addresses are unknown (INSTANCE_IPS)")]
    NoWorkloadAddress,
    #[error("filter chain {chain}: RBAC `matcher` trees are not supported")]
    Matcher { chain: String },
}

/// What the rules of one listener depend on beyond the listener itself.
pub(crate) struct Scope<'a> {
    /// Prefixes tags so that two adapters' rules never collide in shuntd's one global table.
    pub source: &'a str,
    pub workload_ips: &'a [IpAddr],
}

/// One RBAC filter, translated.
struct Filter {
    action: Action,
    /// Per policy, by name.
    policies: Vec<(String, Vec<Conjunction>)>,
}

/// The rules for `listener`, or why it is refused.
pub(crate) fn rules(
    listener: &Listener,
    scope: &Scope<'_>,
    findings: &mut Vec<Finding>,
) -> Result<Vec<Rule>, ListenerError> {
    let subject = format!("listener/{}", listener.name);
    if listener.traffic_direction == TrafficDirection::Outbound as i32 {
        return Ok(Vec::new());
    }
    let bound = listener.address.as_ref().and_then(socket_addr);
    let virtual_listener = listener
        .listener_filters
        .iter()
        .any(|f| f.name == ORIGINAL_DST)
        || listener.use_original_dst.is_some_and(|v| v.value);

    let mut read = Vec::new();
    for (index, chain) in listener.filter_chains.iter().enumerate() {
        let name = if chain.name.is_empty() {
            index.to_string()
        } else {
            chain.name.clone()
        };
        let filters = chain_filters(chain, &name, &subject, findings)?;
        read.push((chain, name, filters));
    }
    // A chain without RBAC matters only when a catch-all chain's rules could reach its port.
    let catch_all_rbac = virtual_listener
        && read.iter().any(|(chain, _, filters)| {
            !filters.is_empty()
                && chain
                    .filter_chain_match
                    .as_ref()
                    .is_none_or(|m| m.destination_port.is_none())
        });

    let mut chains = Vec::new();
    for (chain, name, filters) in read {
        if filters.is_empty() && !catch_all_rbac {
            continue;
        }
        let m = chain.filter_chain_match.clone().unwrap_or_default();
        let (ports, band) = match (m.destination_port, bound, virtual_listener) {
            (Some(p), _, _) => {
                let p = u16::try_from(p.value).unwrap_or(0);
                (PortRange::single(p), PORT_BAND)
            }
            (None, Some(b), false) => (PortRange::single(b.port()), PORT_BAND),
            (None, _, _) => (PortRange::ANY, CATCH_ALL_BAND),
        };
        let mut destinations = Vec::new();
        for cidr in &m.prefix_ranges {
            let c = rbac::parse_cidr(cidr).map_err(|reason| ListenerError::Malformed {
                chain: name.clone(),
                filter: "filter_chain_match.prefix_ranges".into(),
                reason: reason.to_string(),
            })?;
            destinations.push(c);
        }
        if destinations.is_empty() {
            match bound {
                Some(b) if !b.ip().is_unspecified() && !virtual_listener => {
                    destinations.push(IpNet::from(b.ip()))
                }
                _ if scope.workload_ips.is_empty() => return Err(ListenerError::NoWorkloadAddress),
                _ => destinations.extend(scope.workload_ips.iter().map(|ip| IpNet::from(*ip))),
            }
        }
        let mut sources = Vec::new();
        for cidr in &m.source_prefix_ranges {
            sources.push(
                rbac::parse_cidr(cidr).map_err(|reason| ListenerError::Malformed {
                    chain: name.clone(),
                    filter: "filter_chain_match.source_prefix_ranges".into(),
                    reason: reason.to_string(),
                })?,
            );
        }
        chains.push(ChainRules {
            name,
            tls: m.transport_protocol == "tls",
            destinations,
            sources,
            ports,
            band,
            filters,
        });
    }

    // Chains that differ only in transport protocol (Istio's mTLS and plaintext chains of one
    // port) decide for the same destination; pairings are always mutual TLS, so the TLS
    // chain's policy is the one that applies to them.
    let mut by_destination: BTreeMap<(Vec<IpNet>, Vec<IpNet>, u16, u16), ChainRules> =
        BTreeMap::new();
    for chain in chains {
        let key = (
            chain.destinations.clone(),
            chain.sources.clone(),
            chain.ports.first,
            chain.ports.last,
        );
        match by_destination.get(&key) {
            Some(existing) if existing.tls || !chain.tls => {
                note_divergence(existing, &chain, &subject, findings)
            }
            Some(existing) => {
                note_divergence(&chain, existing, &subject, findings);
                by_destination.insert(key, chain);
            }
            None => {
                by_destination.insert(key, chain);
            }
        }
    }
    let has_catch_all = by_destination
        .values()
        .any(|c| c.band == CATCH_ALL_BAND && !c.filters.is_empty());

    let mut out = Vec::new();
    for chain in by_destination.values() {
        chain.emit(listener, scope, has_catch_all, &subject, findings, &mut out);
    }
    Ok(out)
}

fn note_divergence(
    kept: &ChainRules,
    other: &ChainRules,
    subject: &str,
    findings: &mut Vec<Finding>,
) {
    if kept.signature() != other.signature() {
        findings.push(Finding {
            severity: Severity::EnforcedByEnvoy,
            subject: format!("{subject}/chain/{}", other.name),
            detail: format!(
                "its RBAC differs from chain {} for the same destination; shuntd applies chain {}'s to pairings",
                kept.name, kept.name
            ),
        });
    }
}

fn typed_config(config: Option<&filter::ConfigType>) -> Option<&Any> {
    match config? {
        filter::ConfigType::TypedConfig(any) => Some(any),
        filter::ConfigType::ConfigDiscovery(_) => None,
    }
}

/// The RBAC filters of a chain, in order, including those inside its HTTP connection manager.
fn chain_filters(
    chain: &FilterChain,
    name: &str,
    subject: &str,
    findings: &mut Vec<Finding>,
) -> Result<Vec<Filter>, ListenerError> {
    let malformed = |filter: &str, e: prost::DecodeError| ListenerError::Malformed {
        chain: name.to_owned(),
        filter: filter.to_owned(),
        reason: e.to_string(),
    };
    let mut out = Vec::new();
    for f in &chain.filters {
        let Some(any) = typed_config(f.config_type.as_ref()) else {
            continue;
        };
        let type_url = extension_type_url(any);
        if type_url == NETWORK_RBAC {
            let config =
                NetworkRbac::decode(any.value.as_slice()).map_err(|e| malformed(&f.name, e))?;
            if config.matcher.is_some() {
                return Err(ListenerError::Matcher {
                    chain: name.to_owned(),
                });
            }
            if let Some(rules) = &config.rules {
                out.extend(filter(rules, Layer::Network, name, subject, findings)?);
            }
        } else if type_url == HCM {
            let hcm = HttpConnectionManager::decode(any.value.as_slice())
                .map_err(|e| malformed(&f.name, e))?;
            for h in &hcm.http_filters {
                let Some(http_filter::ConfigType::TypedConfig(any)) = &h.config_type else {
                    continue;
                };
                let type_url = extension_type_url(any);
                if type_url == HTTP_RBAC {
                    let config = HttpRbac::decode(any.value.as_slice())
                        .map_err(|e| malformed(&h.name, e))?;
                    if config.matcher.is_some() {
                        return Err(ListenerError::Matcher {
                            chain: name.to_owned(),
                        });
                    }
                    if let Some(rules) = &config.rules {
                        out.extend(filter(rules, Layer::Http, name, subject, findings)?);
                    }
                } else if EXT_AUTHZ.contains(&type_url.as_str()) {
                    external(subject, name, &h.name, findings);
                }
            }
        } else if EXT_AUTHZ.contains(&type_url.as_str()) {
            external(subject, name, &f.name, findings);
        }
    }
    Ok(out)
}

fn external(subject: &str, chain: &str, filter: &str, findings: &mut Vec<Finding>) {
    findings.push(Finding {
        severity: Severity::EnforcedByEnvoy,
        subject: format!("{subject}/chain/{chain}"),
        detail: format!("{filter}: external authorization (Istio CUSTOM) is Envoy's alone"),
    });
}

fn filter(
    rules: &envoy_types::pb::envoy::config::rbac::v3::Rbac,
    layer: Layer,
    chain: &str,
    subject: &str,
    findings: &mut Vec<Finding>,
) -> Result<Option<Filter>, ListenerError> {
    let action = match RbacAction::try_from(rules.action) {
        Ok(RbacAction::Allow) => Action::Allow,
        Ok(RbacAction::Deny) => Action::Deny,
        // LOG only records; unknown actions cannot be enforced either way.
        _ => {
            findings.push(Finding {
                severity: Severity::Ignored,
                subject: format!("{subject}/chain/{chain}"),
                detail: format!("RBAC action {} does not decide access", rules.action),
            });
            return Ok(None);
        }
    };
    // Sorted, so that rule tags are stable across pushes.
    let mut names: Vec<&String> = rules.policies.keys().collect();
    names.sort();
    let mut policies = Vec::new();
    for name in names {
        match rbac::policy(&rules.policies[name], layer) {
            Ok(conjunctions) => policies.push((name.clone(), conjunctions)),
            Err(reason) if action == Action::Deny => {
                return Err(ListenerError::Deny {
                    chain: chain.to_owned(),
                    policy: name.clone(),
                    reason,
                });
            }
            Err(reason) => findings.push(Finding {
                severity: Severity::Narrowed,
                subject: format!("{subject}/chain/{chain}/policy/{name}"),
                detail: format!(
                    "{reason}: the access this ALLOW policy grants is refused at pairing"
                ),
            }),
        }
    }
    Ok(Some(Filter { action, policies }))
}

struct ChainRules {
    name: String,
    tls: bool,
    destinations: Vec<IpNet>,
    sources: Vec<IpNet>,
    ports: PortRange,
    band: u32,
    filters: Vec<Filter>,
}

impl ChainRules {
    /// What the chain's rules depend on, to tell whether two chains agree.
    fn signature(&self) -> Vec<(Action, &str, &[Conjunction])> {
        self.filters
            .iter()
            .flat_map(|f| {
                f.policies
                    .iter()
                    .map(move |(n, c)| (f.action, n.as_str(), c.as_slice()))
            })
            .collect()
    }

    fn emit(
        &self,
        listener: &Listener,
        scope: &Scope<'_>,
        shield: bool,
        subject: &str,
        findings: &mut Vec<Finding>,
        out: &mut Vec<Rule>,
    ) {
        let origin = format!("listener/{}/chain/{}", listener.name, self.name);
        let mut serial = 0usize;
        let mut push =
            |c: &Conjunction, action: Action, priority: u32, policy: &str, out: &mut Vec<Rule>| {
                for destination in &self.destinations {
                    let Some(Some(local)) = rbac::narrower(Some(*destination), c.destination)
                    else {
                        continue;
                    };
                    let Some(ports) = c
                        .ports
                        .map_or(Some(self.ports), |p| p.intersect(self.ports))
                    else {
                        continue;
                    };
                    let chain_sources: Vec<Option<IpNet>> = if self.sources.is_empty() {
                        vec![None]
                    } else {
                        self.sources.iter().copied().map(Some).collect()
                    };
                    for chain_source in chain_sources {
                        let Some(remote) = rbac::narrower(chain_source, c.source) else {
                            continue;
                        };
                        let remote = remote.unwrap_or_else(|| match local {
                            IpNet::V4(_) => "0.0.0.0/0".parse().expect("valid"),
                            IpNet::V6(_) => "::/0".parse().expect("valid"),
                        });
                        if matches!(remote, IpNet::V4(_)) != matches!(local, IpNet::V4(_)) {
                            continue;
                        }
                        serial += 1;
                        out.push(Rule {
                            tag: tag(scope.source, &listener.name, &self.name, serial),
                            priority: self.band + priority,
                            local_prefix: local,
                            local_ports: ports,
                            remote_prefix: remote,
                            principal: c.principal.clone(),
                            action,
                            origin: if policy.is_empty() {
                                origin.clone()
                            } else {
                                format!("{origin}/policy/{policy}")
                            },
                        });
                    }
                }
            };

        let mut allow_filters = Vec::new();
        for f in &self.filters {
            match f.action {
                Action::Deny => {
                    for (policy, conjunctions) in &f.policies {
                        for c in conjunctions {
                            if c.envoy_only.is_empty() {
                                push(c, Action::Deny, 3, policy, out);
                            } else {
                                findings.push(Finding {
                                    severity: Severity::EnforcedByEnvoy,
                                    subject: format!(
                                        "{subject}/chain/{}/policy/{policy}",
                                        self.name
                                    ),
                                    detail: format!(
                                        "DENY depends on {}, which shuntd cannot see",
                                        c.envoy_only.join(", ")
                                    ),
                                });
                            }
                        }
                    }
                }
                Action::Allow => allow_filters.push(f),
            }
        }
        if allow_filters.is_empty() {
            if shield && self.band == PORT_BAND {
                push(&Conjunction::default(), Action::Allow, 1, "", out);
            }
            return;
        }
        // Every ALLOW filter must admit: the intersection of their policies.
        let mut admitted: Vec<(String, Conjunction)> =
            vec![(String::new(), Conjunction::default())];
        for f in allow_filters {
            let mut next = Vec::new();
            for (names, a) in &admitted {
                for (policy, conjunctions) in &f.policies {
                    match rbac::and(vec![a.clone()], conjunctions.clone()) {
                        Ok(both) => {
                            let name = if names.is_empty() {
                                policy.clone()
                            } else {
                                format!("{names}+{policy}")
                            };
                            next.extend(both.into_iter().map(|c| (name.clone(), c)));
                        }
                        Err(reason) => findings.push(Finding {
                            severity: Severity::Narrowed,
                            subject: format!("{subject}/chain/{}/policy/{policy}", self.name),
                            detail: format!(
                                "{reason}: combined with another ALLOW filter, refused at pairing"
                            ),
                        }),
                    }
                }
            }
            admitted = next;
        }
        for (policy, c) in &admitted {
            if !c.envoy_only.is_empty() {
                findings.push(Finding {
                    severity: Severity::EnforcedByEnvoy,
                    subject: format!("{subject}/chain/{}/policy/{policy}", self.name),
                    detail: format!(
                        "ALLOW also depends on {}; shuntd admits on the rest, Envoy checks these",
                        c.envoy_only.join(", ")
                    ),
                });
            }
            push(c, Action::Allow, 2, policy, out);
        }
        push(&Conjunction::default(), Action::Deny, 1, "", out);
    }
}

/// Unique within shuntd's global table: the source, then where in the listener.
fn tag(source: &str, listener: &str, chain: &str, serial: usize) -> String {
    let long = format!("{source}/{listener}/{chain}/{serial}");
    if long.len() <= MAX_TAG_LEN {
        return long;
    }
    // FNV-1a: stable across runs and builds, unlike std's hasher.
    let hash = long.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let keep = MAX_TAG_LEN - 40;
    let mut cut = keep.min(source.len());
    while !source.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}/{hash:016x}/{serial}", &source[..cut])
}
