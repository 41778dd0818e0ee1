//! The gRPC control API: namespaces, rules, services, sessions, apps, stats and certificates.
//!
//! Messages are turned into the session layer's checked types here; anything malformed is
//! refused with `invalid_argument` naming the field (`rules[2].principal: ...`).

use std::net::IpAddr;
use std::sync::Arc;

use shunt_proto::control as pb;
use shunt_proto::control::control_server::Control;
use shunt_session::SessionLayer;
use shunt_session::certificates::{Certificate, CertificateError};
use shunt_session::identity_match::IdentityMatch;
use shunt_session::layer::SessionError;
use shunt_session::namespace::Namespace;
use shunt_session::namespace::NamespaceError;
use shunt_session::rules::{PortRange, Rule, RuleAction};
use shunt_session::services::{EndpointAddress, Service, ServiceEndpoint, ServiceError, TlsMode};
use shunt_tls::CertSource;
use tonic::{Request, Response, Status};

use crate::config::{RuleActionSection, build_rule, finish_rule};

pub struct ControlService {
    layer: Arc<SessionLayer>,
    workers: usize,
}

impl ControlService {
    pub fn new(layer: Arc<SessionLayer>, workers: usize) -> Self {
        Self { layer, workers }
    }
}

fn scope_namespace(scope: i32, namespace: &str) -> Result<Option<&str>, Status> {
    match pb::RuleScope::try_from(scope) {
        Ok(pb::RuleScope::Global) => Ok(None),
        Ok(pb::RuleScope::Local) if !namespace.is_empty() => Ok(Some(namespace)),
        Ok(pb::RuleScope::Local) => Err(Status::invalid_argument(
            "namespace: local rules name a namespace",
        )),
        _ => Err(Status::invalid_argument("scope: must be local or global")),
    }
}

fn ports_to_proto(p: PortRange) -> pb::PortRange {
    pb::PortRange {
        first: u32::from(p.first),
        last: u32::from(p.last),
    }
}

fn ports_from_proto(
    field: &'static str,
    p: Option<&pb::PortRange>,
) -> Result<Option<String>, Status> {
    let Some(p) = p else { return Ok(None) };
    let port = |v: u32| {
        u16::try_from(v)
            .map_err(|_| Status::invalid_argument(format!("{field}: {v} is not a port")))
    };
    Ok(Some(format!("{}-{}", port(p.first)?, port(p.last)?)))
}

pub fn rule_to_proto(rule: &Rule, scope: pb::RuleScope, namespace: &str) -> pb::Rule {
    let (action, redirect_to) = match rule.action {
        RuleAction::Allow => (pb::RuleAction::Allow, String::new()),
        RuleAction::Deny => (pb::RuleAction::Deny, String::new()),
        RuleAction::Redirect(to) => (pb::RuleAction::Redirect, to.to_string()),
    };
    pb::Rule {
        scope: scope as i32,
        namespace: namespace.to_owned(),
        local_prefix: rule.local.to_string(),
        local_ports: Some(ports_to_proto(rule.local_ports)),
        remote_prefix: rule.remote.to_string(),
        remote_ports: Some(ports_to_proto(rule.remote_ports)),
        action: action as i32,
        redirect_to,
        tag: rule.tag.clone(),
        principal: rule.principal.as_ref().map(identity_match_to_proto),
        priority: rule.priority,
        source: rule.source.clone(),
    }
}

pub fn identity_match_to_proto(m: &IdentityMatch) -> pb::IdentityMatch {
    use pb::identity_match::Kind;
    let kind = match m {
        IdentityMatch::Exact(p) => Kind::Exact(p.clone()),
        IdentityMatch::Prefix(p) => Kind::Prefix(p.clone()),
        IdentityMatch::Suffix(p) => Kind::Suffix(p.clone()),
        IdentityMatch::Contains(p) => Kind::Contains(p.clone()),
    };
    pb::IdentityMatch { kind: Some(kind) }
}

fn identity_match_from_proto(field: &str, m: &pb::IdentityMatch) -> Result<IdentityMatch, Status> {
    use pb::identity_match::Kind;
    let m = match &m.kind {
        Some(Kind::Exact(p)) => IdentityMatch::Exact(p.clone()),
        Some(Kind::Prefix(p)) => IdentityMatch::Prefix(p.clone()),
        Some(Kind::Suffix(p)) => IdentityMatch::Suffix(p.clone()),
        Some(Kind::Contains(p)) => IdentityMatch::Contains(p.clone()),
        None => {
            return Err(Status::invalid_argument(format!(
                "{field}: set one of exact, prefix, suffix or contains"
            )));
        }
    };
    m.validate()
        .map_err(|e| Status::invalid_argument(format!("{field}: {e}")))?;
    Ok(m)
}

fn rule_from_proto(r: &pb::Rule) -> Result<Rule, Status> {
    let action = match pb::RuleAction::try_from(r.action) {
        Ok(pb::RuleAction::Allow) => RuleActionSection::Allow,
        Ok(pb::RuleAction::Deny) => RuleActionSection::Deny,
        Ok(pb::RuleAction::Redirect) => RuleActionSection::Redirect,
        _ => {
            return Err(Status::invalid_argument(
                "action: must be allow, deny or redirect",
            ));
        }
    };
    let redirect_to = if r.redirect_to.is_empty() {
        None
    } else {
        Some(
            r.redirect_to
                .parse()
                .map_err(|_| Status::invalid_argument("redirect_to: must be ip:port"))?,
        )
    };
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let rule = build_rule(
        opt(&r.local_prefix).as_deref(),
        ports_from_proto("local_ports", r.local_ports.as_ref())?.as_deref(),
        opt(&r.remote_prefix).as_deref(),
        ports_from_proto("remote_ports", r.remote_ports.as_ref())?.as_deref(),
        action,
        redirect_to,
        &r.tag,
    )
    .map_err(|(field, e)| Status::invalid_argument(format!("{field}: {e}")))?;
    let principal = r
        .principal
        .as_ref()
        .map(|m| identity_match_from_proto("principal", m))
        .transpose()?;
    finish_rule(rule, principal, r.priority, &r.source)
        .map_err(|(field, e)| Status::invalid_argument(format!("{field}: {e}")))
}

/// Prefixes a conversion error with where the item sits in its request (`rules[2].`).
fn at(prefix: impl std::fmt::Display) -> impl Fn(Status) -> Status {
    move |s| Status::new(s.code(), format!("{prefix}.{}", s.message()))
}

fn tls_mode_to_proto(m: TlsMode) -> pb::TlsMode {
    match m {
        TlsMode::Unspecified => pb::TlsMode::Unspecified,
        TlsMode::Disabled => pb::TlsMode::Disabled,
        TlsMode::Istio => pb::TlsMode::Istio,
    }
}

fn tls_mode_from_proto(field: &str, v: i32) -> Result<TlsMode, Status> {
    match pb::TlsMode::try_from(v) {
        Ok(pb::TlsMode::Unspecified) => Ok(TlsMode::Unspecified),
        Ok(pb::TlsMode::Disabled) => Ok(TlsMode::Disabled),
        Ok(pb::TlsMode::Istio) => Ok(TlsMode::Istio),
        Err(_) => Err(Status::invalid_argument(format!(
            "{field}: {v} is not a TLS mode"
        ))),
    }
}

pub fn service_to_proto(s: &Service) -> pb::Service {
    pb::Service {
        cluster: s.cluster.clone(),
        direction: s.direction.clone(),
        host: s.host.clone(),
        port: u32::from(s.port),
        subset: s.subset.clone(),
        endpoints: s
            .endpoints
            .iter()
            .map(|e| pb::ServiceEndpoint {
                address: e.address.to_string(),
                workload: e.workload.clone(),
                tls_mode: tls_mode_to_proto(e.tls_mode) as i32,
                locality: e.locality.clone(),
            })
            .collect(),
        expected_identities: s
            .expected_identities
            .iter()
            .map(identity_match_to_proto)
            .collect(),
        tls_mode: tls_mode_to_proto(s.tls_mode) as i32,
    }
}

/// Converts entry `index` of a ReplaceServices request. Only what the domain types cannot hold
/// is refused here (addresses, ports, enum values, empty matchers); the services table checks
/// the rest.
fn service_from_proto(index: usize, s: &pb::Service) -> Result<Service, Status> {
    let field = |name: &str| format!("services[{index}].{name}");
    let port = u16::try_from(s.port).map_err(|_| {
        Status::invalid_argument(format!("{}: {} is not a port", field("port"), s.port))
    })?;
    let endpoints = s
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let address: EndpointAddress = e.address.parse().map_err(|err| {
                Status::invalid_argument(format!("{}.{err}", field(&format!("endpoints[{i}]"))))
            })?;
            Ok(ServiceEndpoint {
                address,
                workload: e.workload.clone(),
                tls_mode: tls_mode_from_proto(
                    &field(&format!("endpoints[{i}].tls_mode")),
                    e.tls_mode,
                )?,
                locality: e.locality.clone(),
            })
        })
        .collect::<Result<_, Status>>()?;
    let expected_identities = s
        .expected_identities
        .iter()
        .enumerate()
        .map(|(i, m)| identity_match_from_proto(&field(&format!("expected_identities[{i}]")), m))
        .collect::<Result<_, Status>>()?;
    Ok(Service {
        cluster: s.cluster.clone(),
        direction: s.direction.clone(),
        host: s.host.clone(),
        port,
        subset: s.subset.clone(),
        endpoints,
        expected_identities,
        tls_mode: tls_mode_from_proto(&field("tls_mode"), s.tls_mode)?,
    })
}

fn service_status(e: ServiceError) -> Status {
    let message = match e {
        ServiceError::BadSource => format!("source: {e}"),
        ServiceError::TooManyServices { .. }
        | ServiceError::TooManyServicesInAll { .. }
        | ServiceError::TooManyEndpoints { .. } => format!("services: {e}"),
        // These name their entry already.
        _ => e.to_string(),
    };
    Status::invalid_argument(message)
}

fn status(e: impl std::fmt::Display) -> Status {
    Status::failed_precondition(e.to_string())
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn list_namespaces(
        &self,
        _: Request<pb::ListNamespacesRequest>,
    ) -> Result<Response<pb::ListNamespacesResponse>, Status> {
        let apps = self.layer.apps();
        let namespaces = self.layer.with_namespaces(|nss| {
            nss.iter()
                .map(|ns| pb::NamespaceInfo {
                    id: ns.id.clone(),
                    address: ns.address.to_string(),
                    attached_apps: apps.iter().filter(|a| a.2 == ns.id).count() as u32,
                    local_rules: ns.local_rules.len() as u32,
                    uids: ns.access.uids.clone(),
                    gids: ns.access.gids.clone(),
                })
                .collect()
        });
        Ok(Response::new(pb::ListNamespacesResponse { namespaces }))
    }

    async fn add_namespace(
        &self,
        req: Request<pb::AddNamespaceRequest>,
    ) -> Result<Response<pb::AddNamespaceResponse>, Status> {
        let req = req.into_inner();
        let ns = req
            .namespace
            .ok_or_else(|| Status::invalid_argument("namespace: missing"))?;
        let address: IpAddr = ns
            .address
            .parse()
            .map_err(|_| Status::invalid_argument("address: must be an IP address"))?;
        let access = shunt_session::access::AccessList {
            uids: ns.uids,
            gids: ns.gids,
        };
        let ns = Namespace::new(&ns.id, &ns.secret, address)
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .with_access(access);
        tracing::info!(namespace = %ns.id, "namespace added through the control API");
        self.layer
            .add_namespace(ns, req.replace)
            .map_err(|e| Status::already_exists(e.to_string()))?;
        Ok(Response::new(pb::AddNamespaceResponse {}))
    }

    async fn delete_namespace(
        &self,
        req: Request<pb::DeleteNamespaceRequest>,
    ) -> Result<Response<pb::DeleteNamespaceResponse>, Status> {
        let id = req.into_inner().id;
        self.layer
            .delete_namespace(&id)
            .map_err(|e| Status::not_found(e.to_string()))?;
        tracing::info!(namespace = %id, "namespace deleted through the control API");
        Ok(Response::new(pb::DeleteNamespaceResponse {}))
    }

    async fn list_rules(
        &self,
        req: Request<pb::ListRulesRequest>,
    ) -> Result<Response<pb::ListRulesResponse>, Status> {
        let req = req.into_inner();
        let ns = scope_namespace(req.scope, &req.namespace)?;
        let scope = if ns.is_some() {
            pb::RuleScope::Local
        } else {
            pb::RuleScope::Global
        };
        let rules = self.layer.list_rules(ns).map_err(status)?;
        Ok(Response::new(pb::ListRulesResponse {
            rules: rules
                .iter()
                .map(|r| rule_to_proto(r, scope, ns.unwrap_or("")))
                .collect(),
        }))
    }

    async fn add_rule(
        &self,
        req: Request<pb::AddRuleRequest>,
    ) -> Result<Response<pb::AddRuleResponse>, Status> {
        let r = req
            .into_inner()
            .rule
            .ok_or_else(|| Status::invalid_argument("rule: missing"))?;
        let ns = scope_namespace(r.scope, &r.namespace)?;
        let rule = rule_from_proto(&r)?;
        tracing::info!(rule = %rule, namespace = ns.unwrap_or("(global)"), "rule added through the control API");
        let replaced = self.layer.add_rule(ns, rule).map_err(status)?;
        Ok(Response::new(pb::AddRuleResponse { replaced }))
    }

    async fn delete_rule(
        &self,
        req: Request<pb::DeleteRuleRequest>,
    ) -> Result<Response<pb::DeleteRuleResponse>, Status> {
        let req = req.into_inner();
        let ns = scope_namespace(req.scope, &req.namespace)?;
        self.layer
            .delete_rule(ns, &req.tag)
            .map_err(|e| Status::not_found(e.to_string()))?;
        tracing::info!(tag = %req.tag, namespace = ns.unwrap_or("(global)"), "rule deleted through the control API");
        Ok(Response::new(pb::DeleteRuleResponse {}))
    }

    async fn replace_rules(
        &self,
        req: Request<pb::ReplaceRulesRequest>,
    ) -> Result<Response<pb::ReplaceRulesResponse>, Status> {
        let req = req.into_inner();
        if req.source.is_empty() {
            return Err(Status::invalid_argument(
                "source: must name who owns the rules",
            ));
        }
        let mut rules = Vec::with_capacity(req.rules.len());
        for (i, r) in req.rules.iter().enumerate() {
            let at = at(format!("rules[{i}]"));
            let ns = scope_namespace(r.scope, &r.namespace).map_err(&at)?;
            if !r.source.is_empty() && r.source != req.source {
                return Err(Status::invalid_argument(format!(
                    "rules[{i}].source: `{}` is not the request's source `{}`",
                    r.source, req.source
                )));
            }
            // Every rule gets the request's source, so callers need not repeat it.
            let rule = rule_from_proto(&pb::Rule {
                source: req.source.clone(),
                ..r.clone()
            })
            .map_err(&at)?;
            rules.push((ns.map(str::to_owned), rule));
        }
        let done = self
            .layer
            .replace_rules(&req.source, rules)
            .map_err(|e| Status::invalid_argument(format!("rules: {e}")))?;
        tracing::info!(source = %req.source, added = done.added, removed = done.removed, "rules replaced through the control API");
        Ok(Response::new(pb::ReplaceRulesResponse {
            added: u32::try_from(done.added).unwrap_or(u32::MAX),
            removed: u32::try_from(done.removed).unwrap_or(u32::MAX),
        }))
    }

    async fn replace_services(
        &self,
        req: Request<pb::ReplaceServicesRequest>,
    ) -> Result<Response<pb::ReplaceServicesResponse>, Status> {
        let req = req.into_inner();
        let services = req
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| service_from_proto(i, s))
            .collect::<Result<Vec<_>, Status>>()?;
        let count = self
            .layer
            .replace_services(&req.source, services)
            .map_err(service_status)?;
        tracing::info!(source = %req.source, services = count, "services replaced through the control API");
        Ok(Response::new(pb::ReplaceServicesResponse {
            services: u32::try_from(count).unwrap_or(u32::MAX),
        }))
    }

    async fn list_services(
        &self,
        _: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let services = self
            .layer
            .list_services()
            .into_iter()
            .map(|(source, s)| pb::SourcedService {
                source,
                service: Some(service_to_proto(&s)),
            })
            .collect();
        Ok(Response::new(pb::ListServicesResponse { services }))
    }

    async fn list_sessions(
        &self,
        req: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let filter = req.into_inner().namespace;
        let apps = self.layer.apps();
        let sessions = self
            .layer
            .sessions()
            .into_iter()
            .filter(|s| filter.is_empty() || s.namespace == filter)
            .map(|s| {
                let (sent, received) = self.layer.session_bytes(&s).unwrap_or_default();
                pb::Session {
                    id: s.id.0,
                    worker: s.id.thread() as u32,
                    transport: s.transport.as_str().to_owned(),
                    state: s.state.as_str().to_owned(),
                    namespace: s.namespace.clone(),
                    local: s.tuple.local.to_string(),
                    remote: s.tuple.remote.to_string(),
                    app_id: s.app.0,
                    app_name: apps
                        .iter()
                        .find(|a| a.0 == s.app)
                        .map(|a| a.1.clone())
                        .unwrap_or_default(),
                    is_client: s.is_client,
                    bytes_sent: sent,
                    bytes_received: received,
                }
            })
            .collect();
        Ok(Response::new(pb::ListSessionsResponse { sessions }))
    }

    async fn list_apps(
        &self,
        _: Request<pb::ListAppsRequest>,
    ) -> Result<Response<pb::ListAppsResponse>, Status> {
        let apps = self
            .layer
            .apps()
            .into_iter()
            .map(|(id, name, namespace, cred, workers, listeners)| pb::App {
                id: id.0,
                name,
                namespace,
                pid: cred.pid,
                uid: cred.uid,
                gid: cred.gid,
                workers: workers as u32,
                listeners: listeners.iter().map(|l| l.to_string()).collect(),
            })
            .collect();
        Ok(Response::new(pb::ListAppsResponse { apps }))
    }

    async fn get_stats(
        &self,
        _: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::GetStatsResponse>, Status> {
        let counts = self.layer.counts();
        let ct = self.layer.cut_through();
        let c = &self.layer.counters;
        let sum = |m: &std::sync::Mutex<std::collections::HashMap<&'static str, u64>>| -> u64 {
            m.lock().unwrap_or_else(|e| e.into_inner()).values().sum()
        };
        Ok(Response::new(pb::GetStatsResponse {
            attached_apps: counts.apps as u64,
            sessions: counts.sessions as u64,
            listeners: counts.listeners as u64,
            segments: ct.segment_count() as u64,
            cut_through_bytes: ct.totals().bytes,
            connects: c.connects.load(std::sync::atomic::Ordering::Relaxed),
            connect_failures: sum(&c.connect_failures),
            attach_failures: sum(&c.attach_failures),
            workers: self.workers as u32,
        }))
    }

    async fn put_certificate(
        &self,
        request: Request<pb::PutCertificateRequest>,
    ) -> Result<Response<pb::PutCertificateResponse>, Status> {
        let r = request.into_inner();
        // Refuse unusable material here, where the putter learns why, not at every handshake.
        let identity = CertSource::Pem {
            cert_chain: r.cert_chain.clone(),
            private_key: r.private_key.clone(),
            trust_bundle: r.trust_bundle.clone(),
        }
        .check()
        .map_err(|e| Status::invalid_argument(format!("certificate: {e}")))?
        .as_str()
        .to_owned();
        let certificate = Certificate {
            cert_chain: r.cert_chain,
            private_key: r.private_key,
            trust_bundle: r.trust_bundle,
            identity: identity.clone(),
            version: 0,
        };
        let version = self
            .layer
            .put_certificate(&r.namespace, &r.name, certificate)
            .map_err(session_status)?;
        tracing::info!(namespace = %r.namespace, name = %r.name, %identity, version, "certificate put");
        Ok(Response::new(pb::PutCertificateResponse {
            identity,
            version,
        }))
    }

    async fn delete_certificate(
        &self,
        request: Request<pb::DeleteCertificateRequest>,
    ) -> Result<Response<pb::DeleteCertificateResponse>, Status> {
        let r = request.into_inner();
        self.layer
            .delete_certificate(&r.namespace, &r.name)
            .map_err(session_status)?;
        Ok(Response::new(pb::DeleteCertificateResponse {}))
    }

    async fn list_certificates(
        &self,
        _: Request<pb::ListCertificatesRequest>,
    ) -> Result<Response<pb::ListCertificatesResponse>, Status> {
        let certificates = self
            .layer
            .list_certificates()
            .into_iter()
            .map(|(namespace, name, identity, version)| pb::CertificateInfo {
                namespace,
                name,
                identity,
                version,
            })
            .collect();
        Ok(Response::new(pb::ListCertificatesResponse { certificates }))
    }
}

fn session_status(e: SessionError) -> Status {
    match &e {
        SessionError::Namespace(NamespaceError::Unknown(_))
        | SessionError::Certificate(CertificateError::Unknown { .. }) => {
            Status::not_found(e.to_string())
        }
        _ => Status::invalid_argument(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::identity_match::Kind;

    const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";

    fn exact(id: &str) -> pb::IdentityMatch {
        pb::IdentityMatch {
            kind: Some(Kind::Exact(id.into())),
        }
    }

    fn proto_rule() -> pb::Rule {
        pb::Rule {
            scope: pb::RuleScope::Global as i32,
            remote_prefix: "10.0.0.0/8".into(),
            remote_ports: Some(pb::PortRange {
                first: 80,
                last: 90,
            }),
            action: pb::RuleAction::Deny as i32,
            tag: "t".into(),
            principal: Some(exact(CLIENT)),
            priority: 7,
            source: "xds/test".into(),
            ..Default::default()
        }
    }

    fn refusal(r: Result<impl std::fmt::Debug, Status>) -> String {
        let s = r.unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        s.message().to_owned()
    }

    #[test]
    fn rules_carry_principal_priority_and_source_both_ways() {
        let rule = rule_from_proto(&proto_rule()).unwrap();
        assert_eq!(rule.principal, Some(IdentityMatch::Exact(CLIENT.into())));
        assert_eq!((rule.priority, rule.source.as_str()), (7, "xds/test"));
        let back = rule_to_proto(&rule, pb::RuleScope::Global, "");
        assert_eq!(rule_from_proto(&back).unwrap(), rule);
        assert_eq!(back.principal, Some(exact(CLIENT)));
        assert_eq!((back.priority, back.source.as_str()), (7, "xds/test"));
        for kind in [
            Kind::Prefix("spiffe://a/".into()),
            Kind::Suffix("/sa/b".into()),
            Kind::Contains("/ns/".into()),
        ] {
            let m = pb::IdentityMatch { kind: Some(kind) };
            let r = rule_from_proto(&pb::Rule {
                principal: Some(m.clone()),
                ..proto_rule()
            })
            .unwrap();
            assert_eq!(identity_match_to_proto(r.principal.as_ref().unwrap()), m);
        }
        // Unset fields are a hand-written rule for any peer.
        let plain = rule_from_proto(&pb::Rule {
            principal: None,
            priority: 0,
            source: String::new(),
            ..proto_rule()
        })
        .unwrap();
        assert_eq!((plain.principal, plain.priority), (None, 0));
        assert!(plain.source.is_empty());
    }

    #[test]
    fn bad_rules_name_the_field() {
        let cases = [
            (
                pb::Rule {
                    principal: Some(pb::IdentityMatch { kind: None }),
                    ..proto_rule()
                },
                "principal: set one of",
            ),
            (
                pb::Rule {
                    principal: Some(pb::IdentityMatch {
                        kind: Some(Kind::Prefix(String::new())),
                    }),
                    ..proto_rule()
                },
                "principal: identity pattern is empty",
            ),
            (
                pb::Rule {
                    principal: Some(exact("spiffe://a/\u{1}")),
                    ..proto_rule()
                },
                "principal: identity pattern",
            ),
            (
                pb::Rule {
                    source: "x".repeat(300),
                    ..proto_rule()
                },
                "source: ",
            ),
            (
                pb::Rule {
                    tag: "t".repeat(257),
                    ..proto_rule()
                },
                "rule: tag must be 1 to 256",
            ),
        ];
        for (rule, field) in cases {
            let message = refusal(rule_from_proto(&rule));
            assert!(message.starts_with(field), "{message}");
        }
        assert!(
            rule_from_proto(&pb::Rule {
                tag: "t".repeat(256),
                ..proto_rule()
            })
            .is_ok()
        );
    }

    fn proto_service() -> pb::Service {
        pb::Service {
            cluster: "outbound|9080||reviews.default.svc.cluster.local".into(),
            direction: "outbound".into(),
            host: "reviews.default.svc.cluster.local".into(),
            port: 9080,
            subset: "v1".into(),
            endpoints: vec![
                pb::ServiceEndpoint {
                    address: "10.1.2.3:9080".into(),
                    workload: "reviews-v1;default;reviews;v1;Kubernetes".into(),
                    tls_mode: pb::TlsMode::Istio as i32,
                    locality: "eu/west-1a/".into(),
                },
                pb::ServiceEndpoint {
                    address: "unix:/run/reviews.sock".into(),
                    tls_mode: pb::TlsMode::Disabled as i32,
                    ..Default::default()
                },
            ],
            expected_identities: vec![exact("spiffe://cluster.local/ns/default/sa/reviews")],
            tls_mode: pb::TlsMode::Istio as i32,
        }
    }

    #[test]
    fn services_convert_both_ways() {
        let s = service_from_proto(0, &proto_service()).unwrap();
        assert_eq!(s.port, 9080);
        assert_eq!(
            s.endpoints[1].address,
            EndpointAddress::Unix("/run/reviews.sock".into())
        );
        assert_eq!(s.endpoints[0].tls_mode, TlsMode::Istio);
        assert_eq!(s.tls_mode, TlsMode::Istio);
        assert_eq!(service_to_proto(&s), proto_service());
    }

    #[test]
    fn bad_services_name_the_field() {
        let mut bad_address = proto_service();
        bad_address.endpoints[1].address = "reviews:9080".into();
        let mut bad_endpoint_mode = proto_service();
        bad_endpoint_mode.endpoints[0].tls_mode = 9;
        let mut bad_identity = proto_service();
        bad_identity
            .expected_identities
            .push(pb::IdentityMatch { kind: None });
        let cases = [
            (
                pb::Service {
                    port: 70000,
                    ..proto_service()
                },
                "services[3].port: 70000 is not a port",
            ),
            (
                bad_address,
                "services[3].endpoints[1].address `reviews:9080`: must be ip:port or unix:PATH",
            ),
            (bad_endpoint_mode, "services[3].endpoints[0].tls_mode: 9"),
            (
                pb::Service {
                    tls_mode: -1,
                    ..proto_service()
                },
                "services[3].tls_mode",
            ),
            (
                bad_identity,
                "services[3].expected_identities[1]: set one of",
            ),
        ];
        for (service, field) in cases {
            let message = refusal(service_from_proto(3, &service));
            assert!(message.starts_with(field), "{message}");
        }
        assert!(
            service_status(ServiceError::BadSource)
                .message()
                .starts_with("source: ")
        );
        assert!(
            service_status(ServiceError::TooManyEndpoints { count: 2, max: 1 })
                .message()
                .starts_with("services: ")
        );
    }
}
