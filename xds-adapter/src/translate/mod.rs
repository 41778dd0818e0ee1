//! Mesh config (clusters, endpoints, listeners, secrets) into shuntd's tables.
//!
//! Translation is a pure function of the whole accepted resource set, so an update or a
//! removal of any resource is applied by translating again and swapping the result in whole.

mod listeners;
mod matchers;
mod rbac;
mod secrets;
mod services;

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::resource::{Resource, ResourceType};
use crate::tables::{Finding, Severity, Tables};

pub use listeners::ListenerError;
pub use matchers::Unrepresentable;
pub use rbac::Unsupported;
pub use secrets::SecretError;
pub use services::{ClusterError, eds_service_name};

/// Where the translated tables go and what they depend on besides the resources.
#[derive(Debug, Clone)]
pub struct Context {
    /// Names this adapter's rules and services in shuntd, e.g. `xds/POD.NAMESPACE`.
    pub source: String,
    /// The workload's own addresses: inbound listeners that bind every address accept on these.
    pub workload_ips: Vec<IpAddr>,
    /// Name under which the workload certificate is stored (the module's `tls.certificate`).
    pub certificate_name: String,
    /// The SDS secret with the workload's certificate and key (Istio: `default`).
    pub certificate_secret: String,
    /// The SDS secret with the trust bundle (Istio: `ROOTCA`).
    pub root_secret: String,
}

impl Context {
    pub fn new(source: impl Into<String>, workload_ips: Vec<IpAddr>) -> Self {
        Self {
            source: source.into(),
            workload_ips,
            certificate_name: "default".into(),
            certificate_secret: "default".into(),
            root_secret: "ROOTCA".into(),
        }
    }
}

/// Every accepted resource, by type and name.
pub type ResourceSet = BTreeMap<ResourceType, BTreeMap<String, Resource>>;

/// Why a resource is refused (and NACKed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Listener(#[from] ListenerError),
    #[error(transparent)]
    Secret(#[from] SecretError),
}

/// Checks one resource on its own, before it is accepted.
pub fn check(resource: &Resource, context: &Context) -> Result<(), Invalid> {
    let mut findings = Vec::new();
    match resource {
        Resource::Cluster(c) => {
            services::service(c, &BTreeMap::new(), &mut findings)?;
        }
        Resource::Endpoints(_) => {}
        Resource::Listener(l) => {
            listeners::rules(l, &scope(context), &mut findings)?;
        }
        Resource::Secret(s) => {
            secrets::parts(s)?;
        }
    }
    Ok(())
}

fn scope(context: &Context) -> listeners::Scope<'_> {
    listeners::Scope {
        source: &context.source,
        workload_ips: &context.workload_ips,
    }
}

fn rejected(findings: &mut Vec<Finding>, kind: &str, name: &str, error: impl std::fmt::Display) {
    findings.push(Finding {
        severity: Severity::Rejected,
        subject: format!("{kind}/{name}"),
        detail: error.to_string(),
    });
}

/// The tables for a whole resource set. Resources that [`check`] refuses are left out and
/// listed as rejected.
pub fn translate(resources: &ResourceSet, context: &Context) -> Tables {
    let mut tables = Tables::default();
    let findings = &mut tables.findings;
    let of = |kind| resources.get(&kind).into_iter().flat_map(|m| m.values());

    let endpoints: BTreeMap<&str, _> = of(ResourceType::Endpoints)
        .filter_map(|r| match r {
            Resource::Endpoints(e) => Some((e.cluster_name.as_str(), &**e)),
            _ => None,
        })
        .collect();
    let mut used = std::collections::BTreeSet::new();
    for r in of(ResourceType::Cluster) {
        let Resource::Cluster(c) = r else { continue };
        used.insert(services::eds_service_name(c).unwrap_or(&c.name));
        match services::service(c, &endpoints, findings) {
            Ok(Some(s)) => tables.services.push(s),
            Ok(None) => {}
            Err(e) => rejected(findings, "cluster", &c.name, e),
        }
    }
    for (name, assignment) in &endpoints {
        if !used.contains(name) {
            tables
                .services
                .extend(services::orphan_service(assignment, findings));
        }
    }
    let scope = scope(context);
    for r in of(ResourceType::Listener) {
        let Resource::Listener(l) = r else { continue };
        match listeners::rules(l, &scope, findings) {
            Ok(rules) => tables.rules.extend(rules),
            Err(e) => rejected(findings, "listener", &l.name, e),
        }
    }
    let mut parts = BTreeMap::new();
    for r in of(ResourceType::Secret) {
        let Resource::Secret(s) = r else { continue };
        match secrets::parts(s) {
            Ok(p) => {
                parts.insert(s.name.clone(), p);
            }
            Err(e) => rejected(findings, "secret", &s.name, e),
        }
    }
    if let (Some(cert), Some(root)) = (
        parts.get(&context.certificate_secret),
        parts.get(&context.root_secret),
    ) && let Some(c) = secrets::certificate(
        &context.certificate_name,
        (&context.certificate_secret, cert),
        (&context.root_secret, root),
    ) {
        tables.certificates.push(c);
    }
    tables.services.sort_by(|a, b| a.cluster.cmp(&b.cluster));
    tables.rules.sort_by(|a, b| a.tag.cmp(&b.tag));
    tables.findings.sort();
    tables.findings.dedup();
    tables
}
