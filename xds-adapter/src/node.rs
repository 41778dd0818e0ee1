//! The proxy identity the adapter presents: Istio's `TYPE~IP~POD.NAMESPACE~DOMAIN` node id and
//! the node metadata istiod reads.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, Value, value};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeId {
    /// `sidecar`, `router`, `waypoint` or `ztunnel`.
    pub kind: String,
    pub ip: IpAddr,
    /// `POD.NAMESPACE`.
    pub id: String,
    /// `NAMESPACE.svc.cluster.local`.
    pub domain: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeIdError {
    #[error("node id `{0}` is not TYPE~IP~ID~DOMAIN")]
    Shape(String),
    #[error("node type `{0}` is not sidecar, router, waypoint or ztunnel")]
    Kind(String),
    #[error("`{0}` is not an IP address")]
    Ip(String),
}

impl FromStr for NodeId {
    type Err = NodeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('~').collect();
        let [kind, ip, id, domain] = parts.as_slice() else {
            return Err(NodeIdError::Shape(s.to_owned()));
        };
        if !matches!(*kind, "sidecar" | "router" | "waypoint" | "ztunnel") {
            return Err(NodeIdError::Kind((*kind).to_owned()));
        }
        if id.is_empty() {
            return Err(NodeIdError::Shape(s.to_owned()));
        }
        Ok(NodeId {
            kind: (*kind).to_owned(),
            ip: ip.parse().map_err(|_| NodeIdError::Ip((*ip).to_owned()))?,
            id: (*id).to_owned(),
            domain: (*domain).to_owned(),
        })
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}~{}~{}~{}", self.kind, self.ip, self.id, self.domain)
    }
}

impl NodeId {
    /// A sidecar's id, as pilot-agent builds it.
    pub fn sidecar(ip: IpAddr, pod: &str, namespace: &str) -> Self {
        NodeId {
            kind: "sidecar".into(),
            ip,
            id: format!("{pod}.{namespace}"),
            domain: format!("{namespace}.svc.cluster.local"),
        }
    }

    pub fn namespace(&self) -> Option<&str> {
        self.id.split_once('.').map(|(_, ns)| ns)
    }
}

/// The Envoy `Node` for `id`, with string metadata (`NAMESPACE`, `INSTANCE_IPS`, `CLUSTER_ID`,
/// ...), as Istio's agent sends.
pub fn envoy_node(id: &NodeId, metadata: &BTreeMap<String, String>) -> Node {
    let mut fields: BTreeMap<String, String> = metadata.clone();
    fields
        .entry("INSTANCE_IPS".into())
        .or_insert_with(|| id.ip.to_string());
    if let Some(ns) = id.namespace() {
        fields
            .entry("NAMESPACE".into())
            .or_insert_with(|| ns.to_owned());
    }
    Node {
        id: id.to_string(),
        cluster: metadata.get("CLUSTER_ID").cloned().unwrap_or_default(),
        metadata: Some(Struct {
            fields: fields
                .into_iter()
                .map(|(k, v)| {
                    (
                        k,
                        Value {
                            kind: Some(value::Kind::StringValue(v)),
                        },
                    )
                })
                .collect(),
        }),
        user_agent_name: "shunt-xds".into(),
        ..Default::default()
    }
}

/// The workload's addresses: metadata `INSTANCE_IPS` (comma separated), else the node id's IP.
pub fn workload_ips(node: &Node) -> Vec<IpAddr> {
    let from_metadata = node
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get("INSTANCE_IPS"))
        .and_then(|v| match &v.kind {
            Some(value::Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        });
    if let Some(ips) = from_metadata {
        let ips: Vec<IpAddr> = ips
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        if !ips.is_empty() {
            return ips;
        }
    }
    node.id
        .parse::<NodeId>()
        .map(|n| vec![n.ip])
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_node_ids() {
        let id: NodeId = "sidecar~10.1.2.3~reviews-v1-abc.default~default.svc.cluster.local"
            .parse()
            .unwrap();
        assert_eq!(id.namespace(), Some("default"));
        assert_eq!(
            id,
            NodeId::sidecar("10.1.2.3".parse().unwrap(), "reviews-v1-abc", "default")
        );
        assert_eq!(
            id.to_string(),
            "sidecar~10.1.2.3~reviews-v1-abc.default~default.svc.cluster.local"
        );
        assert!(matches!(
            "sidecar~1.2.3.4~x".parse::<NodeId>(),
            Err(NodeIdError::Shape(_))
        ));
        assert!(matches!(
            "gateway~1.2.3.4~x.y~d".parse::<NodeId>(),
            Err(NodeIdError::Kind(_))
        ));
        assert!(matches!(
            "sidecar~nope~x.y~d".parse::<NodeId>(),
            Err(NodeIdError::Ip(_))
        ));
    }

    #[test]
    fn workload_ips_prefer_metadata() {
        let id = NodeId::sidecar("10.0.0.1".parse().unwrap(), "p", "ns");
        let node = envoy_node(&id, &BTreeMap::new());
        assert_eq!(
            workload_ips(&node),
            vec!["10.0.0.1".parse::<IpAddr>().unwrap()]
        );
        let meta = BTreeMap::from([("INSTANCE_IPS".to_owned(), "10.0.0.2,fd00::2".to_owned())]);
        let node = envoy_node(&id, &meta);
        assert_eq!(workload_ips(&node).len(), 2);
    }
}
