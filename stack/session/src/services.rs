//! The mesh's services, as config sources (the xDS adapter) describe them: per source, a list
//! of clusters with their endpoints, how their TLS applies and which peer identities they
//! expect. shuntd keeps them for the control API and its metrics; nothing on the data path
//! reads them.
//!
//! A source's list is only ever replaced whole ([`ServicesTable::replace`]), after every
//! service in it has been checked, so readers see the old list or the new one. Sizes are capped
//! (per source and in total) so a runaway source cannot exhaust shuntd's memory.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use crate::identity_match::{IdentityMatch, IdentityMatchError};
use crate::rules::MAX_SOURCE_LEN;

/// Longest name, host, subset, workload label or locality accepted.
pub const MAX_FIELD_LEN: usize = 1024;
/// Most identities one service may expect.
pub const MAX_IDENTITIES_PER_SERVICE: usize = 256;
/// Longest `unix:` path: what fits `sockaddr_un.sun_path` with its terminating NUL.
pub const MAX_UNIX_PATH_LEN: usize = 107;

/// How much the table holds at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceLimits {
    pub services_per_source: usize,
    pub services: usize,
    pub endpoints: usize,
}

impl Default for ServiceLimits {
    fn default() -> Self {
        Self {
            services_per_source: 100_000,
            services: 1_000_000,
            endpoints: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("address `{address}`: {reason}")]
pub struct AddressError {
    pub address: String,
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("source must be 1 to {MAX_SOURCE_LEN} characters of printable ASCII")]
    BadSource,
    #[error("services[{index}].cluster: must not be empty")]
    EmptyCluster { index: usize },
    #[error("services[{index}].cluster: `{cluster}` appears more than once")]
    DuplicateCluster { index: usize, cluster: String },
    #[error("services[{index}].{field}: longer than {MAX_FIELD_LEN} bytes")]
    TooLong { index: usize, field: String },
    #[error("services[{index}].endpoints[{endpoint}].{error}")]
    Endpoint {
        index: usize,
        endpoint: usize,
        error: AddressError,
    },
    #[error("services[{index}].expected_identities: more than {MAX_IDENTITIES_PER_SERVICE}")]
    TooManyIdentities { index: usize },
    #[error("services[{index}].expected_identities[{identity}]: {error}")]
    Identity {
        index: usize,
        identity: usize,
        error: IdentityMatchError,
    },
    #[error("{count} services for one source, at most {max} allowed")]
    TooManyServices { count: usize, max: usize },
    #[error("{count} services in all sources, at most {max} allowed")]
    TooManyServicesInAll { count: usize, max: usize },
    #[error("{count} endpoints in all sources, at most {max} allowed")]
    TooManyEndpoints { count: usize, max: usize },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum TlsMode {
    /// The source did not say.
    #[default]
    Unspecified,
    /// Plain TCP.
    Disabled,
    /// Istio mutual TLS: the peer is expected to prove an identity.
    Istio,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Unspecified => "unspecified",
            TlsMode::Disabled => "disabled",
            TlsMode::Istio => "istio",
        }
    }
}

/// Where an endpoint listens: `ip:port`, or `unix:PATH` for a pipe.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EndpointAddress {
    Socket(SocketAddr),
    Unix(String),
}

impl EndpointAddress {
    fn check_unix(path: &str) -> Result<(), &'static str> {
        if path.is_empty() {
            Err("a unix: address needs a path")
        } else if path.len() > MAX_UNIX_PATH_LEN {
            Err("the unix: path is longer than a socket address holds")
        } else if path.contains('\0') {
            Err("the unix: path contains a NUL byte")
        } else {
            Ok(())
        }
    }

    fn validate(&self) -> Result<(), AddressError> {
        match self {
            EndpointAddress::Socket(_) => Ok(()),
            EndpointAddress::Unix(path) => Self::check_unix(path).map_err(|reason| AddressError {
                address: self.to_string(),
                reason,
            }),
        }
    }
}

impl FromStr for EndpointAddress {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = |reason| AddressError {
            address: s.to_owned(),
            reason,
        };
        match s.strip_prefix("unix:") {
            Some(path) => {
                Self::check_unix(path).map_err(error)?;
                Ok(EndpointAddress::Unix(path.to_owned()))
            }
            None => s
                .parse()
                .map(EndpointAddress::Socket)
                .map_err(|_| error("must be ip:port or unix:PATH")),
        }
    }
}

impl fmt::Display for EndpointAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointAddress::Socket(a) => write!(f, "{a}"),
            EndpointAddress::Unix(p) => write!(f, "unix:{p}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEndpoint {
    pub address: EndpointAddress,
    /// Istio's workload label, "NAME;NAMESPACE;CANONICAL_SERVICE;REVISION;CLUSTER", if given.
    pub workload: String,
    pub tls_mode: TlsMode,
    /// "region/zone/sub_zone".
    pub locality: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// The cluster it was read from; unique within its source.
    pub cluster: String,
    /// "outbound" or "inbound" for Istio names, empty otherwise.
    pub direction: String,
    pub host: String,
    pub port: u16,
    pub subset: String,
    pub endpoints: Vec<ServiceEndpoint>,
    /// What the cluster's TLS validation accepts; empty when it checks no identity.
    pub expected_identities: Vec<IdentityMatch>,
    pub tls_mode: TlsMode,
}

impl Service {
    /// A service without endpoints, identities or TLS, for building up.
    pub fn new(cluster: &str) -> Self {
        Self {
            cluster: cluster.to_owned(),
            direction: String::new(),
            host: String::new(),
            port: 0,
            subset: String::new(),
            endpoints: Vec::new(),
            expected_identities: Vec::new(),
            tls_mode: TlsMode::Unspecified,
        }
    }

    /// Checks the service as entry `index` of a list.
    pub fn validate(&self, index: usize) -> Result<(), ServiceError> {
        if self.cluster.is_empty() {
            return Err(ServiceError::EmptyCluster { index });
        }
        let too_long = |field: String| ServiceError::TooLong { index, field };
        for (field, value) in [
            ("cluster", &self.cluster),
            ("direction", &self.direction),
            ("host", &self.host),
            ("subset", &self.subset),
        ] {
            if value.len() > MAX_FIELD_LEN {
                return Err(too_long(field.to_owned()));
            }
        }
        for (endpoint, e) in self.endpoints.iter().enumerate() {
            e.address
                .validate()
                .map_err(|error| ServiceError::Endpoint {
                    index,
                    endpoint,
                    error,
                })?;
            for (field, value) in [("workload", &e.workload), ("locality", &e.locality)] {
                if value.len() > MAX_FIELD_LEN {
                    return Err(too_long(format!("endpoints[{endpoint}].{field}")));
                }
            }
        }
        if self.expected_identities.len() > MAX_IDENTITIES_PER_SERVICE {
            return Err(ServiceError::TooManyIdentities { index });
        }
        for (identity, m) in self.expected_identities.iter().enumerate() {
            m.validate().map_err(|error| ServiceError::Identity {
                index,
                identity,
                error,
            })?;
        }
        Ok(())
    }
}

/// Sizes, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceCounts {
    pub sources: usize,
    pub services: usize,
    pub endpoints: usize,
}

#[derive(Debug, Default)]
pub struct ServicesTable {
    /// Each source's services, sorted by cluster.
    by_source: BTreeMap<String, Vec<Service>>,
    limits: ServiceLimits,
    services: usize,
    endpoints: usize,
}

fn endpoints_of(services: &[Service]) -> usize {
    services.iter().map(|s| s.endpoints.len()).sum()
}

impl ServicesTable {
    pub fn with_limits(limits: ServiceLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Replaces `source`'s whole list with `services` (an empty list removes the source) and
    /// returns how many it now has. On error nothing changes.
    pub fn replace(&mut self, source: &str, services: Vec<Service>) -> Result<usize, ServiceError> {
        if source.is_empty() || crate::rules::validate_source(source).is_err() {
            return Err(ServiceError::BadSource);
        }
        let max = self.limits.services_per_source;
        if services.len() > max {
            return Err(ServiceError::TooManyServices {
                count: services.len(),
                max,
            });
        }
        let mut clusters = HashMap::with_capacity(services.len());
        for (index, s) in services.iter().enumerate() {
            s.validate(index)?;
            if clusters.insert(s.cluster.as_str(), index).is_some() {
                return Err(ServiceError::DuplicateCluster {
                    index,
                    cluster: s.cluster.clone(),
                });
            }
        }
        let old = self.by_source.get(source).map_or(&[][..], Vec::as_slice);
        let services_after = self.services - old.len() + services.len();
        if services_after > self.limits.services {
            return Err(ServiceError::TooManyServicesInAll {
                count: services_after,
                max: self.limits.services,
            });
        }
        let endpoints_after = self.endpoints - endpoints_of(old) + endpoints_of(&services);
        if endpoints_after > self.limits.endpoints {
            return Err(ServiceError::TooManyEndpoints {
                count: endpoints_after,
                max: self.limits.endpoints,
            });
        }
        let count = services.len();
        if services.is_empty() {
            self.by_source.remove(source);
        } else {
            let mut services = services;
            services.sort_by(|a, b| a.cluster.cmp(&b.cluster));
            self.by_source.insert(source.to_owned(), services);
        }
        self.services = services_after;
        self.endpoints = endpoints_after;
        Ok(count)
    }

    /// Every service as (source, service), sorted by source, then cluster.
    pub fn list(&self) -> Vec<(String, Service)> {
        self.by_source
            .iter()
            .flat_map(|(source, services)| services.iter().map(|s| (source.clone(), s.clone())))
            .collect()
    }

    pub fn of_source(&self, source: &str) -> &[Service] {
        self.by_source.get(source).map_or(&[], Vec::as_slice)
    }

    pub fn counts(&self) -> ServiceCounts {
        ServiceCounts {
            sources: self.by_source.len(),
            services: self.services,
            endpoints: self.endpoints,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(address: &str) -> ServiceEndpoint {
        ServiceEndpoint {
            address: address.parse().unwrap(),
            workload: "reviews-v1;default;reviews;v1;Kubernetes".into(),
            tls_mode: TlsMode::Istio,
            locality: "eu/west-1a/".into(),
        }
    }

    fn service(cluster: &str, endpoints: &[&str]) -> Service {
        Service {
            direction: "outbound".into(),
            host: "reviews.default.svc.cluster.local".into(),
            port: 9080,
            endpoints: endpoints.iter().map(|a| endpoint(a)).collect(),
            expected_identities: vec![
                "spiffe://cluster.local/ns/default/sa/reviews"
                    .parse()
                    .unwrap(),
            ],
            tls_mode: TlsMode::Istio,
            ..Service::new(cluster)
        }
    }

    fn listing(t: &ServicesTable) -> Vec<(String, String)> {
        t.list()
            .into_iter()
            .map(|(source, s)| (source, s.cluster))
            .collect()
    }

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    #[test]
    fn addresses_parse_as_ip_port_or_unix_path() {
        for ok in ["10.0.0.1:9080", "[fd00::1]:443", "unix:/run/app.sock"] {
            let a: EndpointAddress = ok.parse().unwrap();
            assert_eq!(a.to_string(), ok);
        }
        for bad in [
            "10.0.0.1",
            "reviews:9080",
            "",
            "unix:",
            "10.0.0.1:99999",
            &format!("unix:/{}", "x".repeat(MAX_UNIX_PATH_LEN)),
            "unix:/a\0b",
        ] {
            assert!(bad.parse::<EndpointAddress>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lists_are_sorted_by_source_then_cluster_and_replaced_whole() {
        let mut t = ServicesTable::default();
        let a = |c| service(c, &["10.0.0.1:9080"]);
        assert_eq!(
            t.replace("xds/b", vec![a("outbound|9080||z"), a("outbound|9080||a")])
                .unwrap(),
            2
        );
        t.replace("xds/a", vec![a("inbound|9080||")]).unwrap();
        assert_eq!(
            listing(&t),
            pairs(&[
                ("xds/a", "inbound|9080||"),
                ("xds/b", "outbound|9080||a"),
                ("xds/b", "outbound|9080||z"),
            ])
        );
        // A replacement drops what the source no longer lists and leaves other sources alone.
        t.replace("xds/b", vec![a("outbound|80||m")]).unwrap();
        assert_eq!(
            listing(&t),
            pairs(&[("xds/a", "inbound|9080||"), ("xds/b", "outbound|80||m")])
        );
        assert_eq!(
            t.counts(),
            ServiceCounts {
                sources: 2,
                services: 2,
                endpoints: 2
            }
        );
        assert_eq!(t.replace("xds/b", Vec::new()).unwrap(), 0);
        assert_eq!(listing(&t), pairs(&[("xds/a", "inbound|9080||")]));
        assert_eq!(t.counts().sources, 1);
        assert_eq!(t.of_source("xds/a")[0], a("inbound|9080||"));
        assert!(t.of_source("xds/b").is_empty());
    }

    #[test]
    fn bad_services_are_refused_naming_the_field_and_change_nothing() {
        let mut t = ServicesTable::default();
        t.replace("xds/a", vec![service("kept", &["10.0.0.1:1"])])
            .unwrap();
        let before = t.list();
        let mut unix = service("u", &[]);
        unix.endpoints.push(ServiceEndpoint {
            address: EndpointAddress::Unix(String::new()),
            ..endpoint("10.0.0.1:1")
        });
        let mut long_workload = service("w", &["10.0.0.1:1"]);
        long_workload.endpoints[0].workload = "w".repeat(MAX_FIELD_LEN + 1);
        let mut bad_identity = service("i", &[]);
        bad_identity
            .expected_identities
            .push(IdentityMatch::Prefix(String::new()));
        let mut many_identities = service("m", &[]);
        many_identities.expected_identities =
            vec![IdentityMatch::Exact("spiffe://a/b".into()); MAX_IDENTITIES_PER_SERVICE + 1];
        let cases = [
            (
                vec![service("ok", &[]), service("", &[])],
                "services[1].cluster",
            ),
            (
                vec![service("same", &[]), service("same", &[])],
                "services[1].cluster: `same` appears more than once",
            ),
            (vec![unix], "services[0].endpoints[0].address `unix:`"),
            (vec![long_workload], "services[0].endpoints[0].workload"),
            (vec![bad_identity], "services[0].expected_identities[1]"),
            (vec![many_identities], "services[0].expected_identities"),
            (
                vec![Service {
                    host: "h".repeat(MAX_FIELD_LEN + 1),
                    ..service("h", &[])
                }],
                "services[0].host",
            ),
        ];
        for (services, field) in cases {
            let err = t.replace("xds/a", services).unwrap_err();
            assert!(err.to_string().starts_with(field), "{err}");
            assert_eq!(t.list(), before);
        }
        for source in ["", "x\ny", &"s".repeat(MAX_SOURCE_LEN + 1)] {
            assert_eq!(
                t.replace(source, Vec::new()).unwrap_err(),
                ServiceError::BadSource
            );
        }
        assert_eq!(t.list(), before);
    }

    #[test]
    fn caps_hold_per_source_and_in_total() {
        let mut t = ServicesTable::with_limits(ServiceLimits {
            services_per_source: 3,
            services: 4,
            endpoints: 5,
        });
        let many = |n: usize, endpoints: &[&str]| -> Vec<Service> {
            (0..n)
                .map(|i| service(&format!("c{i}"), endpoints))
                .collect()
        };
        assert_eq!(
            t.replace("a", many(4, &[])).unwrap_err(),
            ServiceError::TooManyServices { count: 4, max: 3 }
        );
        t.replace("a", many(3, &["10.0.0.1:1"])).unwrap();
        assert_eq!(
            t.replace("b", many(2, &[])).unwrap_err(),
            ServiceError::TooManyServicesInAll { count: 5, max: 4 }
        );
        assert_eq!(
            t.replace("b", many(1, &["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]))
                .unwrap_err(),
            ServiceError::TooManyEndpoints { count: 6, max: 5 }
        );
        // What a source replaces does not count against it.
        t.replace("a", many(1, &["10.0.0.1:1"])).unwrap();
        t.replace("b", many(3, &["10.0.0.1:1", "10.0.0.2:1"]))
            .unwrap_err();
        t.replace("b", many(2, &["10.0.0.1:1", "10.0.0.2:1"]))
            .unwrap();
        assert_eq!(
            t.counts(),
            ServiceCounts {
                sources: 2,
                services: 3,
                endpoints: 5
            }
        );
        assert_eq!(ServiceLimits::default().services_per_source, 100_000);
        assert_eq!(ServiceLimits::default().endpoints, 1_000_000);
    }
}
