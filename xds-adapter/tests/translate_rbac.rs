//! Inbound listeners and RBAC into rules: priorities that reproduce Envoy's evaluation, what is
//! left to Envoy, and what is refused rather than widened.

mod support;

use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::TrafficDirection;
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, filter,
};
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Policy, Principal, Rbac, permission, principal,
};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_filter,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    PathMatcher, RegexMatcher, StringMatcher, path_matcher, string_matcher,
};
use envoy_types::pb::google::protobuf::UInt32Value;
use shunt_xds::resource::Resource;
use shunt_xds::tables::{Action, IdentityMatch, Severity, Tables};
use shunt_xds::testing::mesh::{self, RbacAction, any};
use shunt_xds::translate::{Context, ResourceSet, check, translate};

const WORKLOAD: &str = "10.0.0.7";
const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
const EVIL: &str = "spiffe://cluster.local/ns/evil/sa/x";

fn context(ips: &[&str]) -> Context {
    Context::new(
        "xds/echo-1.default",
        ips.iter().map(|s| s.parse::<IpAddr>().unwrap()).collect(),
    )
}

fn run(listener: Listener, ctx: &Context) -> Tables {
    let mut set = ResourceSet::new();
    let r = Resource::Listener(Box::new(listener));
    set.entry(r.kind())
        .or_default()
        .insert(r.name().to_owned(), r);
    translate(&set, ctx)
}

fn chain(port: Option<u32>, transport: &str, filters: Vec<Filter>) -> FilterChain {
    FilterChain {
        filter_chain_match: Some(FilterChainMatch {
            destination_port: port.map(|value| UInt32Value { value }),
            transport_protocol: transport.into(),
            ..Default::default()
        }),
        filters,
        name: format!(
            "{}-{transport}",
            port.map_or("catchall".into(), |p| p.to_string())
        ),
        ..Default::default()
    }
}

fn summary(t: &Tables) -> Vec<(u32, Action, String, String, Option<IdentityMatch>)> {
    let mut v: Vec<_> = t
        .rules
        .iter()
        .map(|r| {
            let ports = if r.local_ports.first == r.local_ports.last {
                r.local_ports.first.to_string()
            } else {
                "*".into()
            };
            (
                r.priority,
                r.action,
                r.local_prefix.to_string(),
                ports,
                r.principal.clone(),
            )
        })
        .collect();
    v.sort_by_key(|(priority, action, _, ports, _)| {
        (*priority, ports.clone(), format!("{action:?}"))
    });
    v
}

#[test]
fn istio_virtual_inbound_keeps_each_port_to_its_own_policy() {
    let allow_client = || {
        mesh::rbac_filter(
            RbacAction::Allow,
            &[("allow", mesh::policy(8080, &[CLIENT]))],
        )
    };
    let listener = mesh::virtual_inbound(vec![
        chain(
            Some(8080),
            "tls",
            vec![allow_client(), mesh::tcp_proxy_filter("inbound|8080||")],
        ),
        chain(
            Some(8080),
            "raw_buffer",
            vec![allow_client(), mesh::tcp_proxy_filter("inbound|8080||")],
        ),
        chain(
            Some(9090),
            "tls",
            vec![mesh::tcp_proxy_filter("inbound|9090||")],
        ),
        chain(
            None,
            "tls",
            vec![
                mesh::rbac_filter(
                    RbacAction::Deny,
                    &[("deny-evil", {
                        let mut p = mesh::policy(1, &[EVIL]);
                        p.permissions = vec![Permission {
                            rule: Some(permission::Rule::Any(true)),
                        }];
                        p
                    })],
                ),
                mesh::tcp_proxy_filter("InboundPassthroughCluster"),
            ],
        ),
    ]);
    let t = run(listener, &context(&[WORKLOAD]));
    let w = format!("{WORKLOAD}/32");
    assert_eq!(
        summary(&t),
        [
            (
                3,
                Action::Deny,
                w.clone(),
                "*".into(),
                Some(IdentityMatch::Exact(EVIL.into()))
            ),
            // 8080: the client, then nobody else; the catch-all's rules never reach it.
            (101, Action::Deny, w.clone(), "8080".into(), None),
            // 9090 has no policy of its own: admitted, shielded from the catch-all.
            (101, Action::Allow, w.clone(), "9090".into(), None),
            (
                102,
                Action::Allow,
                w,
                "8080".into(),
                Some(IdentityMatch::Exact(CLIENT.into()))
            ),
        ]
    );
    assert!(
        t.findings.is_empty(),
        "identical tls/plaintext chains: {:#?}",
        t.findings
    );
}

fn http_chain(action: RbacAction, policy: Policy) -> FilterChain {
    let rbac = HttpRbac {
        rules: Some(Rbac {
            action: action as i32,
            policies: [("p".to_owned(), policy)].into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let hcm = HttpConnectionManager {
        stat_prefix: "inbound_0.0.0.0_8080".into(),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.rbac".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(any(&rbac))),
            ..Default::default()
        }],
        ..Default::default()
    };
    chain(
        Some(8080),
        "tls",
        vec![Filter {
            name: "envoy.filters.network.http_connection_manager".into(),
            config_type: Some(filter::ConfigType::TypedConfig(any(&hcm))),
        }],
    )
}

fn path_policy(principal_id: &str) -> Policy {
    let mut p = mesh::policy(8080, &[principal_id]);
    p.permissions = vec![Permission {
        rule: Some(permission::Rule::UrlPath(PathMatcher {
            rule: Some(path_matcher::Rule::Path(StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Prefix("/admin".into())),
                ignore_case: false,
            })),
        })),
    }];
    p
}

#[test]
fn http_conditions_are_left_to_envoy_without_widening_a_deny() {
    let allow = run(
        mesh::virtual_inbound(vec![http_chain(RbacAction::Allow, path_policy(CLIENT))]),
        &context(&[WORKLOAD]),
    );
    let rules = summary(&allow);
    assert_eq!(rules.len(), 2, "{rules:?}");
    assert_eq!(
        rules[1].4,
        Some(IdentityMatch::Exact(CLIENT.into())),
        "the principal still holds"
    );
    assert!(
        allow
            .findings
            .iter()
            .any(|f| f.severity == Severity::EnforcedByEnvoy && f.detail.contains("url_path"))
    );

    // A DENY on a path cannot be checked at pairing: it must not become a deny of everything.
    let deny = run(
        mesh::virtual_inbound(vec![http_chain(RbacAction::Deny, path_policy(EVIL))]),
        &context(&[WORKLOAD]),
    );
    assert!(deny.rules.is_empty(), "{:?}", summary(&deny));
    assert!(
        deny.findings
            .iter()
            .any(|f| f.severity == Severity::EnforcedByEnvoy)
    );
}

fn not_evil() -> Policy {
    Policy {
        permissions: vec![Permission {
            rule: Some(permission::Rule::Any(true)),
        }],
        principals: vec![Principal {
            identifier: Some(principal::Identifier::NotId(Box::new(Principal {
                identifier: Some(principal::Identifier::Any(true)),
            }))),
        }],
        ..Default::default()
    }
}

#[test]
fn an_unrepresentable_deny_refuses_the_listener() {
    let listener = mesh::inbound_listener(
        "127.0.0.1_15123",
        "127.0.0.1",
        15123,
        vec![mesh::rbac_filter(RbacAction::Deny, &[("not", not_evil())])],
        "inbound|15123||",
    );
    let ctx = context(&[]);
    let error = check(&Resource::Listener(Box::new(listener.clone())), &ctx).unwrap_err();
    assert!(error.to_string().contains("not_id"), "{error}");
    let t = run(listener, &ctx);
    assert!(t.rules.is_empty());
    assert_eq!(t.findings[0].severity, Severity::Rejected);
}

#[test]
fn an_unrepresentable_allow_narrows() {
    let mut regex = mesh::policy(15123, &[CLIENT]);
    regex.principals = vec![Principal {
        identifier: Some(principal::Identifier::Authenticated(
            principal::Authenticated {
                principal_name: Some(StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
                        regex: "spiffe://[a-z]+/.*".into(),
                        ..Default::default()
                    })),
                    ignore_case: false,
                }),
            },
        )),
    }];
    let listener = mesh::inbound_listener(
        "127.0.0.1_15123",
        "127.0.0.1",
        15123,
        vec![mesh::rbac_filter(RbacAction::Allow, &[("regex", regex)])],
        "inbound|15123||",
    );
    let t = run(listener, &context(&[]));
    assert_eq!(
        summary(&t),
        [(
            101,
            Action::Deny,
            "127.0.0.1/32".into(),
            "15123".into(),
            None
        )]
    );
    assert!(t.findings.iter().any(|f| f.severity == Severity::Narrowed));
}

#[test]
fn addresses_come_from_the_workload_and_outbound_is_skipped() {
    let allow = mesh::rbac_filter(RbacAction::Allow, &[("a", mesh::policy(8080, &[CLIENT]))]);
    let inbound = mesh::virtual_inbound(vec![chain(Some(8080), "tls", vec![allow.clone()])]);
    let t = run(inbound.clone(), &context(&[]));
    assert_eq!(
        t.findings[0].severity,
        Severity::Rejected,
        "no address to scope the rules to"
    );
    let t = run(inbound, &context(&[WORKLOAD, "fd00::7"]));
    assert!(
        t.rules
            .iter()
            .any(|r| r.local_prefix.to_string() == "fd00::7/128"
                && r.remote_prefix.to_string() == "::/0")
    );

    let mut outbound = mesh::virtual_inbound(vec![chain(Some(8080), "tls", vec![allow])]);
    outbound.traffic_direction = TrafficDirection::Outbound as i32;
    assert!(run(outbound, &context(&[WORKLOAD])).rules.is_empty());
}
