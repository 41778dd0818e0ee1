//! The xDS resource types the adapter understands, decoded from `Any`.

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

/// Larger resources are refused before decoding: a whole Istio mesh's cluster fits in far less,
/// and a hostile or broken server must not make the adapter allocate without bound.
pub const MAX_RESOURCE_BYTES: usize = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceType {
    Cluster,
    Endpoints,
    Listener,
    Secret,
}

impl ResourceType {
    /// In the order Envoy and istiod push them: clusters before their endpoints, listeners
    /// after clusters, secrets last.
    pub const ALL: [ResourceType; 4] = [
        ResourceType::Cluster,
        ResourceType::Endpoints,
        ResourceType::Listener,
        ResourceType::Secret,
    ];

    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            ResourceType::Endpoints => {
                "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
            }
            ResourceType::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            ResourceType::Secret => {
                "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
            }
        }
    }

    pub fn from_type_url(url: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.type_url() == url)
    }

    /// Short name for metrics labels and logs (Envoy's xDS names).
    pub fn short_name(self) -> &'static str {
        match self {
            ResourceType::Cluster => "cds",
            ResourceType::Endpoints => "eds",
            ResourceType::Listener => "lds",
            ResourceType::Secret => "sds",
        }
    }

    /// Whether the adapter subscribes to every resource of this type (a wildcard), or only to
    /// names it learned from other resources, as Envoy does.
    pub fn is_wildcard(self) -> bool {
        matches!(self, ResourceType::Cluster | ResourceType::Listener)
    }
}

impl std::fmt::Display for ResourceType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.short_name())
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown type URL `{0}`")]
    UnknownType(String),
    #[error("type URL `{found}` in a {expected} response")]
    WrongType {
        expected: ResourceType,
        found: String,
    },
    #[error("resource of {0} bytes is larger than the {MAX_RESOURCE_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("malformed {kind}: {reason}")]
    Malformed { kind: ResourceType, reason: String },
    #[error("resource has no name")]
    Unnamed,
}

/// One decoded resource.
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    Cluster(Box<Cluster>),
    Endpoints(Box<ClusterLoadAssignment>),
    Listener(Box<Listener>),
    Secret(Box<Secret>),
}

impl Resource {
    pub fn kind(&self) -> ResourceType {
        match self {
            Resource::Cluster(_) => ResourceType::Cluster,
            Resource::Endpoints(_) => ResourceType::Endpoints,
            Resource::Listener(_) => ResourceType::Listener,
            Resource::Secret(_) => ResourceType::Secret,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Resource::Cluster(c) => &c.name,
            Resource::Endpoints(e) => &e.cluster_name,
            Resource::Listener(l) => &l.name,
            Resource::Secret(s) => &s.name,
        }
    }

    /// Decodes `bytes` as a resource of `kind`.
    pub fn decode(kind: ResourceType, bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_RESOURCE_BYTES {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        let malformed = |e: prost::DecodeError| DecodeError::Malformed {
            kind,
            reason: e.to_string(),
        };
        let resource = match kind {
            ResourceType::Cluster => {
                Resource::Cluster(Box::new(Cluster::decode(bytes).map_err(malformed)?))
            }
            ResourceType::Endpoints => Resource::Endpoints(Box::new(
                ClusterLoadAssignment::decode(bytes).map_err(malformed)?,
            )),
            ResourceType::Listener => {
                Resource::Listener(Box::new(Listener::decode(bytes).map_err(malformed)?))
            }
            ResourceType::Secret => {
                Resource::Secret(Box::new(Secret::decode(bytes).map_err(malformed)?))
            }
        };
        if resource.name().is_empty() {
            return Err(DecodeError::Unnamed);
        }
        Ok(resource)
    }

    /// Decodes an `Any` that must hold a resource of `expected`.
    pub fn from_any(expected: ResourceType, any: &Any) -> Result<Self, DecodeError> {
        match ResourceType::from_type_url(&any.type_url) {
            Some(kind) if kind == expected => Self::decode(kind, &any.value),
            Some(_) => Err(DecodeError::WrongType {
                expected,
                found: any.type_url.clone(),
            }),
            None => Err(DecodeError::UnknownType(any.type_url.clone())),
        }
    }

    pub fn encode_to_vec(&self) -> Vec<u8> {
        match self {
            Resource::Cluster(c) => c.encode_to_vec(),
            Resource::Endpoints(e) => e.encode_to_vec(),
            Resource::Listener(l) => l.encode_to_vec(),
            Resource::Secret(s) => s.encode_to_vec(),
        }
    }

    pub fn to_any(&self) -> Any {
        Any {
            type_url: self.kind().type_url().to_owned(),
            value: self.encode_to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_urls_round_trip() {
        for kind in ResourceType::ALL {
            assert_eq!(ResourceType::from_type_url(kind.type_url()), Some(kind));
        }
        assert_eq!(ResourceType::from_type_url("type.googleapis.com/x.Y"), None);
    }

    #[test]
    fn decodes_and_refuses() {
        let cluster = Resource::Cluster(Box::new(Cluster {
            name: "outbound|80||a.b.svc.cluster.local".into(),
            ..Default::default()
        }));
        let any = cluster.to_any();
        assert_eq!(Resource::from_any(ResourceType::Cluster, &any), Ok(cluster));
        assert!(matches!(
            Resource::from_any(ResourceType::Listener, &any),
            Err(DecodeError::WrongType { .. })
        ));
        let unknown = Any {
            type_url: "type.googleapis.com/istio.workload.Address".into(),
            value: vec![],
        };
        assert!(matches!(
            Resource::from_any(ResourceType::Cluster, &unknown),
            Err(DecodeError::UnknownType(_))
        ));
        // Field 1 (name) as a varint is a wire-type mismatch.
        assert!(matches!(
            Resource::decode(ResourceType::Cluster, &[0x08, 0x01]),
            Err(DecodeError::Malformed { .. })
        ));
        assert_eq!(
            Resource::decode(ResourceType::Cluster, &[]),
            Err(DecodeError::Unnamed)
        );
        assert_eq!(
            Resource::decode(ResourceType::Cluster, &vec![0; MAX_RESOURCE_BYTES + 1]),
            Err(DecodeError::TooLarge(MAX_RESOURCE_BYTES + 1))
        );
    }
}
