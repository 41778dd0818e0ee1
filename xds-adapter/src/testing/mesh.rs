//! Builders of the resources istiod sends a sidecar, as envoy-types values.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, TransportSocketMatch,
};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ConfigSource, DataSource, Metadata, SocketAddress,
    TrafficDirection, TransportSocket, address, config_source, data_source, socket_address,
    transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter,
};
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Policy, Principal, Rbac, permission, principal, rbac::Action,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SdsSecretConfig, Secret, SubjectAltNameMatcher,
    TlsCertificate, UpstreamTlsContext, common_tls_context, secret, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{Any, Struct, UInt32Value, Value, value};
use prost::{Message, Name};

pub fn any<T: Message + Name>(m: &T) -> Any {
    Any {
        type_url: T::type_url(),
        value: m.encode_to_vec(),
    }
}

fn strukt(pairs: &[(&str, &str)]) -> Struct {
    Struct {
        fields: pairs
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    Value {
                        kind: Some(value::Kind::StringValue((*v).to_owned())),
                    },
                )
            })
            .collect(),
    }
}

pub fn socket(ip: &str, port: u32) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.into(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        resource_api_version: 2,
        ..Default::default()
    }
}

/// An outbound EDS cluster as Istio makes it: `tlsMode-istio` mutual TLS expecting `san`, and
/// plaintext for endpoints without a sidecar.
pub fn mesh_cluster(name: &str, san: &str) -> Cluster {
    let tls = UpstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            alpn_protocols: vec!["istio-peer-exchange".into(), "istio".into()],
            validation_context_type: Some(
                common_tls_context::ValidationContextType::CombinedValidationContext(
                    common_tls_context::CombinedCertificateValidationContext {
                        default_validation_context: Some(CertificateValidationContext {
                            match_typed_subject_alt_names: vec![SubjectAltNameMatcher {
                                san_type: subject_alt_name_matcher::SanType::Uri as i32,
                                matcher: Some(StringMatcher {
                                    match_pattern: Some(string_matcher::MatchPattern::Exact(
                                        san.into(),
                                    )),
                                    ignore_case: false,
                                }),
                                oid: String::new(),
                            }],
                            ..Default::default()
                        }),
                        validation_context_sds_secret_config: Some(SdsSecretConfig {
                            name: "ROOTCA".into(),
                            sds_config: Some(ads()),
                        }),
                        ..Default::default()
                    },
                ),
            ),
            tls_certificate_sds_secret_configs: vec![SdsSecretConfig {
                name: "default".into(),
                sds_config: Some(ads()),
            }],
            ..Default::default()
        }),
        sni: format!("outbound_.{name}"),
        ..Default::default()
    };
    Cluster {
        name: name.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig { eds_config: Some(ads()), service_name: name.into() }),
        connect_timeout: Some(envoy_types::pb::google::protobuf::Duration { seconds: 1, nanos: 0 }),
        transport_socket_matches: vec![
            TransportSocketMatch {
                name: "tlsMode-istio".into(),
                r#match: Some(strukt(&[("tlsMode", "istio")])),
                transport_socket: Some(TransportSocket {
                    name: "envoy.transport_sockets.tls".into(),
                    config_type: Some(transport_socket::ConfigType::TypedConfig(any(&tls))),
                }),
            },
            TransportSocketMatch {
                name: "tlsMode-disabled".into(),
                r#match: Some(Struct::default()),
                transport_socket: Some(TransportSocket {
                    name: "envoy.transport_sockets.raw_buffer".into(),
                    config_type: Some(transport_socket::ConfigType::TypedConfig(Any {
                        type_url: "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer".into(),
                        value: vec![],
                    })),
                }),
            },
        ],
        ..Default::default()
    }
}

/// A STATIC cluster without TLS.
pub fn static_cluster(name: &str, ip: &str, port: u32) -> Cluster {
    Cluster {
        name: name.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
            seconds: 1,
            nanos: 0,
        }),
        load_assignment: Some(assignment(name, &[(ip, port, false)])),
        ..Default::default()
    }
}

/// Endpoints with Istio's metadata: `(ip, port, has a sidecar)`.
pub fn assignment(cluster: &str, endpoints: &[(&str, u32, bool)]) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: cluster.into(),
        endpoints: vec![LocalityLbEndpoints {
            locality: Some(envoy_types::pb::envoy::config::core::v3::Locality {
                region: "r1".into(),
                zone: "z1".into(),
                sub_zone: String::new(),
            }),
            lb_endpoints: endpoints
                .iter()
                .map(|(ip, port, sidecar)| {
                    let mut filter_metadata = HashMap::new();
                    if *sidecar {
                        filter_metadata.insert(
                            "envoy.transport_socket_match".to_owned(),
                            strukt(&[("tlsMode", "istio")]),
                        );
                    }
                    filter_metadata.insert(
                        "istio".to_owned(),
                        strukt(&[("workload", "echo-v1;default;echo;v1;Kubernetes")]),
                    );
                    LbEndpoint {
                        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                            address: Some(socket(ip, *port)),
                            ..Default::default()
                        })),
                        metadata: Some(Metadata {
                            filter_metadata,
                            ..Default::default()
                        }),
                        load_balancing_weight: Some(UInt32Value { value: 1 }),
                        ..Default::default()
                    }
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn exact_principal(id: &str) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Authenticated(
            principal::Authenticated {
                principal_name: Some(StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::Exact(id.into())),
                    ignore_case: false,
                }),
            },
        )),
    }
}

/// An RBAC policy for `port` and these principals, shaped as Istio generates it.
pub fn policy(port: u32, principals: &[&str]) -> Policy {
    Policy {
        permissions: vec![Permission {
            rule: Some(permission::Rule::AndRules(permission::Set {
                rules: vec![Permission {
                    rule: Some(permission::Rule::OrRules(permission::Set {
                        rules: vec![Permission {
                            rule: Some(permission::Rule::DestinationPort(port)),
                        }],
                    })),
                }],
            })),
        }],
        principals: vec![Principal {
            identifier: Some(principal::Identifier::AndIds(principal::Set {
                ids: vec![Principal {
                    identifier: Some(principal::Identifier::OrIds(principal::Set {
                        ids: principals.iter().map(|p| exact_principal(p)).collect(),
                    })),
                }],
            })),
        }],
        ..Default::default()
    }
}

pub fn rbac_filter(action: Action, policies: &[(&str, Policy)]) -> Filter {
    let config = NetworkRbac {
        stat_prefix: "tcp.".into(),
        rules: Some(Rbac {
            action: action as i32,
            policies: policies
                .iter()
                .map(|(n, p)| ((*n).to_owned(), p.clone()))
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.rbac".into(),
        config_type: Some(filter::ConfigType::TypedConfig(any(&config))),
    }
}

pub fn tcp_proxy_filter(cluster: &str) -> Filter {
    let config = TcpProxy {
        stat_prefix: "inbound".into(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.tcp_proxy".into(),
        config_type: Some(filter::ConfigType::TypedConfig(any(&config))),
    }
}

/// An inbound listener on `ip:port` whose one chain runs `rbac` then a tcp_proxy to `cluster`.
pub fn inbound_listener(
    name: &str,
    ip: &str,
    port: u32,
    rbac: Vec<Filter>,
    cluster: &str,
) -> Listener {
    let mut filters = rbac;
    filters.push(tcp_proxy_filter(cluster));
    Listener {
        name: name.into(),
        address: Some(socket(ip, port)),
        traffic_direction: TrafficDirection::Inbound as i32,
        filter_chains: vec![FilterChain {
            filter_chain_match: Some(FilterChainMatch::default()),
            filters,
            name: "inbound".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Istio's inbound listener: every address on 15006, the original destination restored, one
/// filter chain per port and perhaps a catch-all.
pub fn virtual_inbound(chains: Vec<FilterChain>) -> Listener {
    Listener {
        name: "virtualInbound".into(),
        address: Some(socket("0.0.0.0", 15006)),
        traffic_direction: TrafficDirection::Inbound as i32,
        listener_filters: vec![ListenerFilter {
            name: "envoy.filters.listener.original_dst".into(),
            ..Default::default()
        }],
        filter_chains: chains,
        ..Default::default()
    }
}

pub fn cert_secret(name: &str, chain: &str, key: &str) -> Secret {
    let inline = |s: &str| {
        Some(DataSource {
            specifier: Some(data_source::Specifier::InlineString(s.into())),
            ..Default::default()
        })
    };
    Secret {
        name: name.into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain),
            private_key: inline(key),
            ..Default::default()
        })),
    }
}

pub fn root_secret(name: &str, ca: &str) -> Secret {
    Secret {
        name: name.into(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: Some(DataSource {
                    specifier: Some(data_source::Specifier::InlineString(ca.into())),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )),
    }
}

pub use envoy_types::pb::envoy::config::rbac::v3::rbac::Action as RbacAction;
