//! What the adapter installs in shuntd: its services, its rules and its certificates, as plain
//! domain types (printable as JSON by `shunt-xds translate`) with their control-API forms.

use std::fmt;

use ipnet::IpNet;
use serde::Serialize;
use shunt_proto::control as pb;

/// How an identity (SPIFFE id or SAN) is matched.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
}

impl fmt::Display for IdentityMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityMatch::Exact(s) => f.write_str(s),
            IdentityMatch::Prefix(s) => write!(f, "{s}*"),
            IdentityMatch::Suffix(s) => write!(f, "*{s}"),
            IdentityMatch::Contains(s) => write!(f, "*{s}*"),
        }
    }
}

impl From<&IdentityMatch> for pb::IdentityMatch {
    fn from(m: &IdentityMatch) -> Self {
        use pb::identity_match::Kind;
        let kind = match m {
            IdentityMatch::Exact(s) => Kind::Exact(s.clone()),
            IdentityMatch::Prefix(s) => Kind::Prefix(s.clone()),
            IdentityMatch::Suffix(s) => Kind::Suffix(s.clone()),
            IdentityMatch::Contains(s) => Kind::Contains(s.clone()),
        };
        pb::IdentityMatch { kind: Some(kind) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// Plain TCP.
    Disabled,
    /// Istio mutual TLS.
    Istio,
}

impl From<TlsMode> for pb::TlsMode {
    fn from(m: TlsMode) -> Self {
        match m {
            TlsMode::Disabled => pb::TlsMode::Disabled,
            TlsMode::Istio => pb::TlsMode::Istio,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Inbound,
    Outbound,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// `ip:port` or `unix:PATH`.
    pub address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    pub tls_mode: TlsMode,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub locality: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    pub cluster: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub host: String,
    pub port: u16,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub subset: String,
    pub endpoints: Vec<Endpoint>,
    pub expected_identities: Vec<IdentityMatch>,
    pub tls_mode: TlsMode,
}

impl From<&Service> for pb::Service {
    fn from(s: &Service) -> Self {
        pb::Service {
            cluster: s.cluster.clone(),
            direction: match s.direction {
                Some(Direction::Inbound) => "inbound".into(),
                Some(Direction::Outbound) => "outbound".into(),
                None => String::new(),
            },
            host: s.host.clone(),
            port: s.port.into(),
            subset: s.subset.clone(),
            endpoints: s
                .endpoints
                .iter()
                .map(|e| pb::ServiceEndpoint {
                    address: e.address.clone(),
                    workload: e.workload.clone().unwrap_or_default(),
                    tls_mode: pb::TlsMode::from(e.tls_mode) as i32,
                    locality: e.locality.clone(),
                })
                .collect(),
            expected_identities: s.expected_identities.iter().map(Into::into).collect(),
            tls_mode: pb::TlsMode::from(s.tls_mode) as i32,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const ANY: PortRange = PortRange {
        first: 0,
        last: u16::MAX,
    };

    pub fn single(port: u16) -> Self {
        PortRange {
            first: port,
            last: port,
        }
    }

    /// The ports in both, if any.
    pub fn intersect(self, other: PortRange) -> Option<PortRange> {
        let first = self.first.max(other.first);
        let last = self.last.min(other.last);
        (first <= last).then_some(PortRange { first, last })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Deny,
}

/// One rule for shuntd's global (ingress) table: who may reach the workload's inbound ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub tag: String,
    pub priority: u32,
    /// The workload's address the connection arrives at.
    pub local_prefix: IpNet,
    pub local_ports: PortRange,
    /// Where the connection comes from.
    pub remote_prefix: IpNet,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal: Option<IdentityMatch>,
    pub action: Action,
    /// The listener, filter chain and policy the rule came from.
    pub origin: String,
}

impl Rule {
    pub fn to_proto(&self, source: &str) -> pb::Rule {
        let ports = |r: PortRange| pb::PortRange {
            first: r.first.into(),
            last: r.last.into(),
        };
        pb::Rule {
            scope: pb::RuleScope::Global as i32,
            namespace: String::new(),
            local_prefix: self.local_prefix.to_string(),
            local_ports: Some(ports(self.local_ports)),
            remote_prefix: self.remote_prefix.to_string(),
            remote_ports: Some(ports(PortRange::ANY)),
            action: match self.action {
                Action::Allow => pb::RuleAction::Allow,
                Action::Deny => pb::RuleAction::Deny,
            } as i32,
            redirect_to: String::new(),
            tag: self.tag.clone(),
            principal: self.principal.as_ref().map(Into::into),
            priority: self.priority,
            source: source.to_owned(),
        }
    }
}

/// A workload certificate assembled from SDS secrets.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct Certificate {
    /// The name apps fetch it by (the Envoy module's `tls.certificate`).
    pub name: String,
    /// The leaf's SPIFFE id.
    pub identity: String,
    /// The secrets it was made of (`default`, `ROOTCA`).
    pub from_secrets: Vec<String>,
    /// The private key was redacted (config dumps do this), so it cannot be installed.
    pub redacted: bool,
    #[serde(skip)]
    pub cert_chain: String,
    #[serde(skip)]
    pub private_key: String,
    #[serde(skip)]
    pub trust_bundle: String,
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .field("from_secrets", &self.from_secrets)
            .field("redacted", &self.redacted)
            .finish_non_exhaustive()
    }
}

/// Something in the config that was not translated as Envoy would apply it, or not at all.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// `cluster/NAME`, `listener/NAME/...`, `secret/NAME`, `type/URL`.
    pub subject: String,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// The resource was refused: over xDS it is NACKed and the last good state kept.
    Rejected,
    /// Applied more narrowly than Envoy would (access refused that Envoy grants).
    Narrowed,
    /// Left to Envoy: shuntd cannot see what it depends on (HTTP paths, headers, SNI).
    EnforcedByEnvoy,
    /// Not relevant to shuntd and skipped.
    Ignored,
    /// A config part whose schema this build does not know.
    Unknown,
}

/// Everything the adapter would install for one source.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Tables {
    pub services: Vec<Service>,
    pub rules: Vec<Rule>,
    pub certificates: Vec<Certificate>,
    pub findings: Vec<Finding>,
}
