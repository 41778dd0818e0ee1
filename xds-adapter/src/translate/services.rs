//! Clusters and their endpoints into the services table: service → endpoints → expected
//! identities and TLS mode.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::core::v3::{
    Address, Metadata, TransportSocket, address, socket_address, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, UpstreamTlsContext, common_tls_context,
};
use envoy_types::pb::google::protobuf::{Struct, value};
use prost::Message;

use super::matchers::{Unrepresentable, identity_match};
use crate::cluster_name::IstioClusterName;
use crate::tables::{Endpoint, Finding, Service, Severity, TlsMode};

const UPSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

/// Clusters that are Istio's plumbing, not services.
const INFRASTRUCTURE: [&str; 7] = [
    "BlackHoleCluster",
    "PassthroughCluster",
    "InboundPassthroughCluster",
    "xds-grpc",
    "sds-grpc",
    "agent",
    "prometheus_stats",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    #[error("transport socket `{0}`: UpstreamTlsContext does not decode: {1}")]
    BadTlsContext(String, String),
    #[error("expected identity: {0}")]
    Identity(#[from] Unrepresentable),
}

/// Reads one cluster, with its endpoints from `endpoints` when it uses EDS. `None` for clusters
/// that are not services (listed in `findings`).
pub(crate) fn service(
    cluster: &Cluster,
    endpoints: &BTreeMap<&str, &ClusterLoadAssignment>,
    findings: &mut Vec<Finding>,
) -> Result<Option<Service>, ClusterError> {
    let subject = format!("cluster/{}", cluster.name);
    let ignore = |findings: &mut Vec<Finding>, detail: &str| {
        findings.push(Finding {
            severity: Severity::Ignored,
            subject: subject.clone(),
            detail: detail.to_owned(),
        });
    };
    if is_infrastructure(&cluster.name) {
        ignore(findings, "Istio infrastructure cluster");
        return Ok(None);
    }
    let discovery = match cluster.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) => DiscoveryType::try_from(t).ok(),
        Some(ClusterDiscoveryType::ClusterType(_)) => None,
        None => Some(DiscoveryType::Static),
    };
    if discovery == Some(DiscoveryType::OriginalDst) {
        ignore(
            findings,
            "original-destination cluster: no endpoints to list",
        );
        return Ok(None);
    }

    let (tls_mode, expected_identities) = tls(cluster)?;
    let assignment = match eds_service_name(cluster) {
        Some(name) => endpoints.get(name).copied(),
        None => cluster.load_assignment.as_ref(),
    };
    let service = Service {
        cluster: cluster.name.clone(),
        direction: None,
        host: String::new(),
        port: 0,
        subset: String::new(),
        endpoints: assignment
            .map(|a| read_endpoints(a, &subject, findings))
            .unwrap_or_default(),
        expected_identities,
        tls_mode,
    };
    Ok(Some(with_istio_name(service)))
}

/// The name of the assignment `cluster` takes its endpoints from, if it uses EDS.
pub fn eds_service_name(cluster: &Cluster) -> Option<&str> {
    let eds = matches!(
        cluster.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32
    );
    eds.then(|| {
        cluster
            .eds_cluster_config
            .as_ref()
            .map(|c| c.service_name.as_str())
            .filter(|n| !n.is_empty())
            .unwrap_or(&cluster.name)
    })
}

fn is_infrastructure(name: &str) -> bool {
    INFRASTRUCTURE.contains(&name) || name.starts_with("InboundPassthroughCluster")
}

fn with_istio_name(mut service: Service) -> Service {
    if let Ok(name) = IstioClusterName::try_from(service.cluster.as_str()) {
        service.direction = Some(name.direction);
        service.host = name.host;
        service.port = name.port;
        service.subset = name.subset;
    }
    service
}

/// A service from endpoints whose cluster is not known (config dumps of endpoints alone): its
/// TLS mode comes from the endpoints, and the identities it expects are unknown.
pub(crate) fn orphan_service(
    assignment: &ClusterLoadAssignment,
    findings: &mut Vec<Finding>,
) -> Option<Service> {
    let subject = format!("endpoints/{}", assignment.cluster_name);
    if is_infrastructure(&assignment.cluster_name) {
        findings.push(Finding {
            severity: Severity::Ignored,
            subject,
            detail: "Istio infrastructure cluster".into(),
        });
        return None;
    }
    let endpoints = read_endpoints(assignment, &subject, findings);
    findings.push(Finding {
        severity: Severity::Ignored,
        subject,
        detail: "no cluster for these endpoints: the identities it expects are unknown".into(),
    });
    let tls_mode = if endpoints.iter().any(|e| e.tls_mode == TlsMode::Istio) {
        TlsMode::Istio
    } else {
        TlsMode::Disabled
    };
    Some(with_istio_name(Service {
        cluster: assignment.cluster_name.clone(),
        direction: None,
        host: String::new(),
        port: 0,
        subset: String::new(),
        endpoints,
        expected_identities: Vec::new(),
        tls_mode,
    }))
}

/// The cluster's TLS mode and the identities its validation context accepts. Istio's mesh
/// clusters carry TLS in the `tlsMode-istio` transport socket match; others in the cluster's
/// own transport socket.
fn tls(cluster: &Cluster) -> Result<(TlsMode, Vec<crate::tables::IdentityMatch>), ClusterError> {
    let mut sockets: Vec<&TransportSocket> = cluster
        .transport_socket_matches
        .iter()
        .filter(|m| {
            m.r#match
                .as_ref()
                .is_some_and(|s| string_field(s, "tlsMode") == Some("istio"))
        })
        .filter_map(|m| m.transport_socket.as_ref())
        .collect();
    sockets.extend(cluster.transport_socket.as_ref());
    for socket in sockets {
        let Some(transport_socket::ConfigType::TypedConfig(any)) = &socket.config_type else {
            continue;
        };
        if any.type_url != UPSTREAM_TLS {
            continue;
        }
        let context = UpstreamTlsContext::decode(any.value.as_slice())
            .map_err(|e| ClusterError::BadTlsContext(socket.name.clone(), e.to_string()))?;
        let mut identities = Vec::new();
        if let Some(validation) = context
            .common_tls_context
            .as_ref()
            .and_then(|c| c.validation_context_type.as_ref())
            .and_then(validation_context)
        {
            #[allow(deprecated)]
            for m in &validation.match_subject_alt_names {
                identities.push(identity_match(m)?);
            }
            for m in &validation.match_typed_subject_alt_names {
                if let Some(m) = &m.matcher {
                    identities.push(identity_match(m)?);
                }
            }
        }
        identities.sort();
        identities.dedup();
        return Ok((TlsMode::Istio, identities));
    }
    Ok((TlsMode::Disabled, Vec::new()))
}

fn validation_context(
    v: &common_tls_context::ValidationContextType,
) -> Option<&CertificateValidationContext> {
    match v {
        common_tls_context::ValidationContextType::ValidationContext(c) => Some(c),
        common_tls_context::ValidationContextType::CombinedValidationContext(c) => {
            c.default_validation_context.as_ref()
        }
        // From SDS or a provider: the SANs are wherever the CA is, not in the cluster.
        _ => None,
    }
}

fn string_field<'a>(s: &'a Struct, key: &str) -> Option<&'a str> {
    match s.fields.get(key)?.kind.as_ref()? {
        value::Kind::StringValue(v) => Some(v),
        _ => None,
    }
}

fn filter_string<'a>(m: Option<&'a Metadata>, filter: &str, key: &str) -> Option<&'a str> {
    string_field(m?.filter_metadata.get(filter)?, key)
}

fn read_endpoints(
    assignment: &ClusterLoadAssignment,
    subject: &str,
    findings: &mut Vec<Finding>,
) -> Vec<Endpoint> {
    let mut out = Vec::new();
    let mut unaddressable = 0usize;
    for group in &assignment.endpoints {
        let locality = group
            .locality
            .as_ref()
            .map(|l| format!("{}/{}/{}", l.region, l.zone, l.sub_zone))
            .filter(|l| l != "//")
            .unwrap_or_default();
        for lb in &group.lb_endpoints {
            let Some(lb_endpoint::HostIdentifier::Endpoint(endpoint)) = &lb.host_identifier else {
                unaddressable += 1;
                continue;
            };
            let Some(address) = endpoint.address.as_ref().and_then(render_address) else {
                unaddressable += 1;
                continue;
            };
            let metadata = lb.metadata.as_ref();
            out.push(Endpoint {
                address,
                workload: filter_string(metadata, "istio", "workload").map(str::to_owned),
                tls_mode: match filter_string(metadata, "envoy.transport_socket_match", "tlsMode") {
                    Some("istio") => TlsMode::Istio,
                    _ => TlsMode::Disabled,
                },
                locality: locality.clone(),
            });
        }
    }
    if unaddressable > 0 {
        findings.push(Finding {
            severity: Severity::Ignored,
            subject: subject.to_owned(),
            detail: format!(
                "{unaddressable} endpoint(s) without an IP address or pipe (named endpoints, DNS names or internal addresses)"
            ),
        });
    }
    out
}

/// `ip:port` or `unix:PATH`; `None` for DNS names, named ports and internal addresses, which
/// shuntd cannot match connections against.
fn render_address(address: &Address) -> Option<String> {
    match address.address.as_ref()? {
        address::Address::SocketAddress(_) => socket_addr(address).map(|a| a.to_string()),
        address::Address::Pipe(p) => Some(format!("unix:{}", p.path)),
        address::Address::EnvoyInternalAddress(_) => None,
    }
}

/// The IP address and port, if `address` is one.
pub(crate) fn socket_addr(address: &Address) -> Option<std::net::SocketAddr> {
    let Some(address::Address::SocketAddress(s)) = address.address.as_ref() else {
        return None;
    };
    let ip: std::net::IpAddr = s.address.parse().ok()?;
    let Some(socket_address::PortSpecifier::PortValue(port)) = s.port_specifier else {
        return None;
    };
    Some(std::net::SocketAddr::new(ip, u16::try_from(port).ok()?))
}
