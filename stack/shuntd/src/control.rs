//! The gRPC control API: namespaces, rules, sessions, apps, stats and certificates.

use std::net::IpAddr;
use std::sync::Arc;

use shunt_proto::control as pb;
use shunt_proto::control::control_server::Control;
use shunt_session::SessionLayer;
use shunt_session::certificates::{Certificate, CertificateError};
use shunt_session::layer::SessionError;
use shunt_session::namespace::Namespace;
use shunt_session::namespace::NamespaceError;
use shunt_session::rules::{PortRange, Rule, RuleAction};
use shunt_tls::CertSource;
use tonic::{Request, Response, Status};

use crate::config::{RuleActionSection, build_rule};

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
    }
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
    build_rule(
        opt(&r.local_prefix).as_deref(),
        ports_from_proto("local_ports", r.local_ports.as_ref())?.as_deref(),
        opt(&r.remote_prefix).as_deref(),
        ports_from_proto("remote_ports", r.remote_ports.as_ref())?.as_deref(),
        action,
        redirect_to,
        &r.tag,
    )
    .map_err(|(field, e)| Status::invalid_argument(format!("{field}: {e}")))
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
        let ns = Namespace::new(&ns.id, &ns.secret, address)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
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
