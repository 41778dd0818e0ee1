//! The session layer: attach, listen, connect and close, over any transport.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use shunt_sapi::ErrorCode;
use shunt_sapi::event::Event;
use shunt_sapi::message::{PairOffer, Resume, Scope};
use subtle::ConstantTimeEq;

use crate::app::{AppId, AppRecord, ListenerId, PeerCred, WorkerId, WorkerRecord};
use crate::certificates::{Certificate, CertificateError};
use crate::cut_through::{CutThrough, CutThroughConfig};
use crate::limits::{Holder, Ledger, LimitExceeded, Limits, Owner, Resource};
use crate::link::{Deliveries, LinkError, WorkerLink};
use crate::namespace::{Namespace, NamespaceError, Namespaces};
use crate::pairing::{DEFAULT_PAIR_TIMEOUT, Offer, OfferOutcome, PairingError, PairingTable};
use crate::resume::{ResumeHalves, ResumeRefusal};
use crate::rules::{Rule, RuleAction, RuleError, RulesTable};
use crate::services::{Service, ServiceCounts, ServiceError, ServicesTable};
use crate::tables::{FiveTuple, ListenerTable, SessionTable};
use crate::transport::{ConnectRequest, ConnectionId, Transport, TransportError, TransportProto};

mod resume;

#[derive(Debug, Clone, Copy)]
pub struct SessionLayerConfig {
    pub cut_through: CutThroughConfig,
    /// How long one end of a pairing waits for the other.
    pub pair_timeout: Duration,
    /// Caps per user and per namespace.
    pub limits: Limits,
    /// The user shuntd runs as: with root, the only one who may attach to a namespace that
    /// lists no users or groups.
    pub daemon_uid: u32,
}

impl Default for SessionLayerConfig {
    fn default() -> Self {
        Self {
            cut_through: CutThroughConfig::default(),
            pair_timeout: DEFAULT_PAIR_TIMEOUT,
            limits: Limits::default(),
            daemon_uid: rustix::process::geteuid().as_raw(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    #[error("denied by {table} rule `{tag}`")]
    Denied { table: RuleTable, tag: String },
    #[error("no listener at {0}")]
    NoListener(SocketAddr),
    #[error("{0} is already in use")]
    AddressInUse(SocketAddr),
    #[error("no free local port in namespace `{0}`")]
    NoLocalPort(String),
    #[error("unknown app or wrong app token")]
    BadAppToken,
    #[error("unknown worker {0}")]
    UnknownWorker(WorkerId),
    #[error("unknown listener {0:?}")]
    UnknownListener(ListenerId),
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    #[error("worker {0} cannot be told: {1}")]
    Link(WorkerId, LinkError),
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error("{table} rules: {error}")]
    RulesOf { table: String, error: RuleError },
    #[error("pairing: {0}")]
    Pairing(#[from] PairingError),
    #[error(transparent)]
    Certificate(#[from] CertificateError),
    #[error(transparent)]
    Limit(#[from] LimitExceeded),
    #[error("resumed session refused: {0}")]
    Resume(#[from] ResumeRefusal),
}

impl SessionError {
    /// The code an app sees for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            SessionError::Namespace(NamespaceError::WrongSecret(_)) => ErrorCode::WrongSecret,
            SessionError::Namespace(NamespaceError::Unknown(_)) => ErrorCode::UnknownNamespace,
            SessionError::Namespace(NamespaceError::NotPermitted { .. }) => ErrorCode::NotPermitted,
            SessionError::Namespace(_) | SessionError::Rule(_) | SessionError::RulesOf { .. } => {
                ErrorCode::InvalidRequest
            }
            SessionError::Denied { .. } => ErrorCode::Denied,
            SessionError::NoListener(_) => ErrorCode::NoListener,
            SessionError::AddressInUse(_) | SessionError::NoLocalPort(_) => ErrorCode::AddressInUse,
            SessionError::BadAppToken => ErrorCode::WrongSecret,
            SessionError::UnknownWorker(_) | SessionError::UnknownListener(_) => {
                ErrorCode::InvalidRequest
            }
            SessionError::Transport(TransportError::SegmentFull) => ErrorCode::SegmentFull,
            SessionError::Transport(TransportError::NeedsSegment) => ErrorCode::LimitExceeded,
            SessionError::Transport(_) => ErrorCode::Internal,
            SessionError::Link(_, LinkError::QueueFull) => ErrorCode::EventQueueFull,
            SessionError::Link(..) => ErrorCode::PeerGone,
            SessionError::Pairing(PairingError::Conflict) => ErrorCode::PairConflict,
            SessionError::Pairing(_) => ErrorCode::InvalidRequest,
            SessionError::Certificate(CertificateError::Unknown { .. }) => {
                ErrorCode::UnknownCertificate
            }
            SessionError::Certificate(_) => ErrorCode::InvalidRequest,
            SessionError::Limit(_) => ErrorCode::LimitExceeded,
            SessionError::Resume(r) => r.code(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuleTable {
    Local,
    Global,
}

impl RuleTable {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleTable::Local => "local",
            RuleTable::Global => "global",
        }
    }
}

impl std::fmt::Display for RuleTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl SessionId {
    /// The shuntd worker thread the session is pinned to.
    pub fn thread(self) -> usize {
        (self.0 >> 40) as usize
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    Connecting,
    Ready,
    /// Carried over from an earlier shuntd: flowing, but not set up by this one. Both halves
    /// were reported from the same segment, mirrored.
    Resumed,
    /// Reported as carried over, but its other half has not been: listed, holding no 5-tuple.
    Unconfirmed,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Connecting => "connecting",
            SessionState::Ready => "ready",
            SessionState::Resumed => "resumed",
            SessionState::Unconfirmed => "unconfirmed",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SessionRecord {
    pub id: SessionId,
    pub worker: WorkerId,
    pub app: AppId,
    pub namespace: String,
    pub transport: TransportProto,
    pub connection: Option<ConnectionId>,
    pub tuple: FiveTuple,
    pub is_client: bool,
    pub state: SessionState,
    pub peer: Option<SessionId>,
    /// Whose session allowance this session takes, if anyone's (see [`crate::limits`]).
    pub charged_to: Option<Owner>,
}

#[derive(Debug, Clone)]
pub struct ListenerRecord {
    pub id: ListenerId,
    pub app: AppId,
    pub endpoint: SocketAddr,
    pub namespace: String,
    pub scope: Scope,
    pub workers: Vec<WorkerId>,
    rotor: usize,
    charged_to: Owner,
}

/// Who is attaching and how to reach them.
pub struct AttachRequest {
    pub namespace_id: String,
    pub namespace_secret: Vec<u8>,
    pub app_name: String,
    pub scope: Scope,
    pub cred: PeerCred,
    pub thread: usize,
    pub link: Arc<dyn WorkerLink>,
    pub resume: Resume,
}

#[derive(Debug, Clone)]
pub struct Attached {
    pub app: AppId,
    pub app_token: [u8; 32],
    pub worker: WorkerId,
    pub namespace_address: IpAddr,
}

/// What a connect did, for the caller's logs and metrics.
#[derive(Debug, Clone, Copy)]
pub struct ConnectOutcome {
    pub client_session: SessionId,
    pub server_session: SessionId,
    pub transport: TransportProto,
}

/// What a pairing offer did.
#[derive(Debug, Clone, Copy)]
pub enum PairOutcome {
    /// The other end has not arrived yet.
    Waiting,
    Paired(ConnectOutcome),
}

/// How the serving side of a new session hears of it.
#[derive(Debug, Clone, Copy)]
enum ServerNotice {
    /// Through its listener's backlog.
    Accepted(ListenerId),
    /// Held back from its listener's backlog until the client opens it.
    Standby(ListenerId),
    /// As the answer to its own request (a pairing offer).
    Connected(u32),
}

/// Everything [`SessionLayer::establish`] needs.
struct Establish {
    proto: TransportProto,
    client: WorkerId,
    client_request: u32,
    server: WorkerId,
    server_notice: ServerNotice,
    local: SocketAddr,
    remote: SocketAddr,
    /// Bytes per FIFO the apps asked for; `None` for the transport's default.
    fifo_size: Option<u32>,
}

/// What [`SessionLayer::replace_rules`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RulesReplaced {
    pub added: usize,
    pub removed: usize,
}

/// A rule that matched while deciding a connect.
#[derive(Debug, Clone, Copy)]
pub struct RuleHit {
    pub table: RuleTable,
    pub action: RuleAction,
}

#[derive(Default)]
struct Registry {
    next_app: u64,
    next_worker: u32,
    next_listener: u64,
    next_session: HashMap<usize, u64>,
    apps: BTreeMap<AppId, AppRecord>,
    workers: BTreeMap<WorkerId, WorkerRecord>,
    listeners: BTreeMap<ListenerId, ListenerRecord>,
    local_listeners: HashMap<String, ListenerTable<ListenerId>>,
    global_listeners: ListenerTable<ListenerId>,
    sessions: BTreeMap<SessionId, SessionRecord>,
    table: SessionTable<SessionId>,
    pairings: PairingTable,
    /// What each user and namespace holds, against their caps.
    ledger: Ledger,
    /// Segment memory charged per segment, to give back when the segment goes.
    segment_charges: HashMap<u32, (Owner, u64)>,
    /// Resumed halves waiting for their other half.
    resume_halves: ResumeHalves<SessionId>,
}

impl Registry {
    fn session_id(&mut self, thread: usize) -> SessionId {
        let n = self.next_session.entry(thread).or_default();
        *n += 1;
        SessionId(((thread as u64) << 40) | (*n & ((1 << 40) - 1)))
    }

    /// Takes a session record out of the tables, giving back its charge and its port.
    fn remove_session(&mut self, id: SessionId) -> Option<SessionRecord> {
        let s = self.sessions.remove(&id)?;
        if s.state != SessionState::Unconfirmed && self.table.lookup(&s.tuple) == Some(id) {
            self.table.remove(&s.tuple);
        }
        if s.state == SessionState::Unconfirmed {
            self.resume_halves.forget(|h| h.session == id);
        }
        if let Some(owner) = &s.charged_to {
            self.ledger.release(owner, Resource::Sessions, 1);
        }
        Some(s)
    }

    /// Gives back the memory of segments a transport freed.
    fn segments_freed(&mut self, segments: &[u32]) {
        for id in segments {
            if let Some((owner, bytes)) = self.segment_charges.remove(id) {
                self.ledger.release(&owner, Resource::SegmentBytes, bytes);
            }
        }
    }
}

/// Counters the daemon exposes; plain atomics so this crate stays free of a metrics library.
#[derive(Debug, Default)]
pub struct LayerCounters {
    pub rule_hits: Mutex<HashMap<(RuleTable, &'static str), u64>>,
    pub attach_failures: Mutex<HashMap<&'static str, u64>>,
    pub connects: AtomicU64,
    /// Connects established in standby (also counted in `connects`).
    pub standby_connects: AtomicU64,
    /// Policy changes that revoked standby sessions, and workers that could not be told.
    pub standby_revocations: AtomicU64,
    pub standby_revocations_undelivered: AtomicU64,
    pub connect_failures: Mutex<HashMap<&'static str, u64>>,
    /// Completed pairings ("paired") and refused ones, by error code.
    pub pairings: Mutex<HashMap<&'static str, u64>>,
    /// Certificates put so far; also the source of their versions.
    pub certificate_puts: AtomicU64,
    /// Requests refused at a cap, by resource and holder.
    pub limit_refusals: Mutex<HashMap<(Resource, Holder), u64>>,
    /// Resumed sessions refused, by reason.
    pub resume_refusals: Mutex<HashMap<&'static str, u64>>,
}

impl LayerCounters {
    fn bump<K: std::hash::Hash + Eq>(map: &Mutex<HashMap<K, u64>>, key: K) {
        *map.lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default() += 1;
    }

    /// Counts a refusal if `result` is one at a cap.
    fn count_limit<T>(&self, result: &Result<T, SessionError>) {
        if let Err(e) = result {
            self.count_refusal(e);
        }
    }

    /// Counts `e` if it is a refusal at a cap.
    fn count_refusal(&self, e: &SessionError) {
        if let SessionError::Limit(l) = e {
            Self::bump(&self.limit_refusals, (l.resource, l.holder));
        }
    }
}

pub struct SessionLayer {
    namespaces: RwLock<Namespaces>,
    global_rules: RwLock<RulesTable>,
    services: RwLock<ServicesTable>,
    registry: Mutex<Registry>,
    cut_through: CutThrough,
    daemon_uid: u32,
    pub counters: LayerCounters,
}

fn random_token() -> [u8; 32] {
    let mut t = [0u8; 32];
    // The OS RNG only fails on a broken system; a zero token still never matches, because
    // attach_worker rejects all-zero tokens.
    let _ = getrandom::fill(&mut t);
    t
}

impl SessionLayer {
    pub fn new(config: SessionLayerConfig) -> Self {
        Self {
            namespaces: RwLock::new(Namespaces::default()),
            global_rules: RwLock::new(RulesTable::default()),
            services: RwLock::new(ServicesTable::default()),
            registry: Mutex::new(Registry {
                pairings: PairingTable::new(config.pair_timeout),
                ledger: Ledger::new(config.limits),
                ..Registry::default()
            }),
            cut_through: CutThrough::new(config.cut_through),
            daemon_uid: config.daemon_uid,
            counters: LayerCounters::default(),
        }
    }

    /// The registry lock. Whoever holds it queues to workers through a [`Deliveries`] and
    /// delivers only after letting go (see [`crate::link`]).
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` under the registry lock, then delivers what it queued to workers.
    fn locked<T>(&self, f: impl FnOnce(&mut Registry, &mut Deliveries) -> T) -> T {
        let mut out = Deliveries::default();
        let result = {
            let mut reg = self.registry();
            f(&mut reg, &mut out)
        };
        out.deliver();
        result
    }

    /// The caps and what `uid` and `namespace` hold, for listings and tests.
    pub fn usage(&self, uid: u32, namespace: &str, resource: Resource) -> (u64, u64) {
        let reg = self.registry();
        (
            reg.ledger.used_by_uid(uid, resource),
            reg.ledger.used_by_namespace(namespace, resource),
        )
    }

    pub fn limits(&self) -> Limits {
        self.registry().ledger.limits()
    }

    fn transport(&self, proto: TransportProto) -> &dyn Transport {
        match proto {
            TransportProto::CutThrough => &self.cut_through,
        }
    }

    pub fn cut_through(&self) -> &CutThrough {
        &self.cut_through
    }

    // ---- namespaces and rules (control plane) ----

    pub fn add_namespace(&self, ns: Namespace, replace: bool) -> Result<(), NamespaceError> {
        self.namespaces
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ns, replace)?;
        // A replaced namespace may have new local rules or a new address.
        self.revoke_standby();
        Ok(())
    }

    /// Stores `certificate` under `name` in namespace `namespace`, replacing any; returns the
    /// version it was given.
    pub fn put_certificate(
        &self,
        namespace: &str,
        name: &str,
        mut certificate: Certificate,
    ) -> Result<u64, SessionError> {
        let mut namespaces = self.namespaces.write().unwrap_or_else(|e| e.into_inner());
        let ns = namespaces
            .get_mut(namespace)
            .ok_or_else(|| NamespaceError::Unknown(namespace.to_owned()))?;
        certificate.version = self
            .counters
            .certificate_puts
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        let version = certificate.version;
        ns.certificates.put(name, certificate)?;
        Ok(version)
    }

    pub fn delete_certificate(&self, namespace: &str, name: &str) -> Result<(), SessionError> {
        let mut namespaces = self.namespaces.write().unwrap_or_else(|e| e.into_inner());
        let ns = namespaces
            .get_mut(namespace)
            .ok_or_else(|| NamespaceError::Unknown(namespace.to_owned()))?;
        ns.certificates.remove(name).map(|_| ()).ok_or_else(|| {
            CertificateError::Unknown {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            }
            .into()
        })
    }

    /// Every stored certificate as (namespace, name, identity, version); never the material.
    pub fn list_certificates(&self) -> Vec<(String, String, String, u64)> {
        let namespaces = self.namespaces.read().unwrap_or_else(|e| e.into_inner());
        namespaces
            .iter()
            .flat_map(|ns| {
                ns.certificates.iter().map(|(name, c)| {
                    (
                        ns.id.clone(),
                        name.to_owned(),
                        c.identity.clone(),
                        c.version,
                    )
                })
            })
            .collect()
    }

    /// The certificate `name` of the namespace `worker`'s app attached to: an app sees only its
    /// own namespace's certificates.
    pub fn certificate_for(
        &self,
        worker: WorkerId,
        name: &str,
    ) -> Result<Certificate, SessionError> {
        let namespace = {
            let reg = self.registry();
            let w = reg
                .workers
                .get(&worker)
                .ok_or(SessionError::UnknownWorker(worker))?;
            reg.apps[&w.app].namespace.clone()
        };
        let namespaces = self.namespaces.read().unwrap_or_else(|e| e.into_inner());
        namespaces
            .get(&namespace)
            .and_then(|ns| ns.certificates.get(name))
            .cloned()
            .ok_or_else(|| {
                CertificateError::Unknown {
                    namespace,
                    name: name.to_owned(),
                }
                .into()
            })
    }

    pub fn delete_namespace(&self, id: &str) -> Result<(), NamespaceError> {
        self.namespaces
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)?;
        self.registry().ledger.forget_namespace(id);
        self.revoke_standby();
        Ok(())
    }

    /// Tells every worker to drop the standby sessions it holds (see
    /// [`SessionLayer::connect_standby`]); called after any change of policy. Sessions already
    /// opened stay, as connections established before a rule change do.
    ///
    /// The registry lock orders this against connects: a connect decided under the old policy
    /// posted its events while holding it, so they reach each worker before this revocation;
    /// one that takes it later reads the new policy.
    pub fn revoke_standby(&self) {
        let unreachable = self.locked(|reg, out| {
            let mut unreachable = 0;
            for (id, w) in &reg.workers {
                if let Err(e) = out.post(&w.link, &Event::StandbyRevoked) {
                    // Its queue is full or its process gone; its standby sessions stay until
                    // its peers or shuntd reset them.
                    tracing::warn!(worker = %id, error = %e, "cannot revoke a worker's standby sessions");
                    unreachable += 1;
                }
            }
            unreachable
        });
        self.counters
            .standby_revocations
            .fetch_add(1, Ordering::Relaxed);
        if unreachable > 0 {
            self.counters
                .standby_revocations_undelivered
                .fetch_add(unreachable, Ordering::Relaxed);
        }
    }

    pub fn with_namespaces<T>(&self, f: impl FnOnce(&Namespaces) -> T) -> T {
        f(&self.namespaces.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Adds a rule to a namespace's local table (`Some(ns)`) or the global table (`None`).
    pub fn add_rule(&self, namespace: Option<&str>, rule: Rule) -> Result<bool, SessionError> {
        let added = self.insert_rule(namespace, rule)?;
        self.revoke_standby();
        Ok(added)
    }

    fn insert_rule(&self, namespace: Option<&str>, rule: Rule) -> Result<bool, SessionError> {
        match namespace {
            None => Ok(self
                .global_rules
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .add(rule)?),
            Some(id) => {
                let mut nss = self.namespaces.write().unwrap_or_else(|e| e.into_inner());
                let ns = nss
                    .get_mut(id)
                    .ok_or_else(|| NamespaceError::Unknown(id.to_owned()))?;
                Ok(ns.local_rules.add(rule)?)
            }
        }
    }

    pub fn delete_rule(&self, namespace: Option<&str>, tag: &str) -> Result<Rule, SessionError> {
        let deleted = self.remove_rule(namespace, tag)?;
        self.revoke_standby();
        Ok(deleted)
    }

    fn remove_rule(&self, namespace: Option<&str>, tag: &str) -> Result<Rule, SessionError> {
        match namespace {
            None => Ok(self
                .global_rules
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(tag)?),
            Some(id) => {
                let mut nss = self.namespaces.write().unwrap_or_else(|e| e.into_inner());
                let ns = nss
                    .get_mut(id)
                    .ok_or_else(|| NamespaceError::Unknown(id.to_owned()))?;
                Ok(ns.local_rules.remove(tag)?)
            }
        }
    }

    /// Replaces every rule of `source`, in the global table and in every namespace's local
    /// table, with `rules`: pairs of a namespace (`None` for the global table) and a rule that
    /// carries `source`. An empty `rules` removes the source's rules.
    ///
    /// Everything is checked first (each rule, its source, unique tags per table, no tag of
    /// another source, every namespace exists); on error nothing changes. Then every table
    /// changes while the write locks of both the global table and the namespaces are held,
    /// taken in the order lookups take them, so no lookup sees part of the old set and part
    /// of the new one.
    pub fn replace_rules(
        &self,
        source: &str,
        rules: Vec<(Option<String>, Rule)>,
    ) -> Result<RulesReplaced, SessionError> {
        let added = rules.len();
        let mut global_new = Vec::new();
        let mut local_new: BTreeMap<String, Vec<Rule>> = BTreeMap::new();
        for (namespace, rule) in rules {
            match namespace {
                None => global_new.push(rule),
                Some(id) => local_new.entry(id).or_default().push(rule),
            }
        }
        let mut global = self.global_rules.write().unwrap_or_else(|e| e.into_inner());
        let mut nss = self.namespaces.write().unwrap_or_else(|e| e.into_inner());
        // The global check also refuses an empty or malformed source, so namespaces that get
        // no new rules (and only lose the source's old ones) need no check of their own.
        global
            .check_replace(source, &global_new)
            .map_err(|error| SessionError::RulesOf {
                table: "global".into(),
                error,
            })?;
        for (id, rules) in &local_new {
            let ns = nss
                .get(id)
                .ok_or_else(|| NamespaceError::Unknown(id.clone()))?;
            ns.local_rules
                .check_replace(source, rules)
                .map_err(|error| SessionError::RulesOf {
                    table: format!("local:{id}"),
                    error,
                })?;
        }
        let mut removed = global.apply_replace(source, global_new);
        for ns in nss.iter_mut() {
            let rules = local_new.remove(&ns.id).unwrap_or_default();
            removed += ns.local_rules.apply_replace(source, rules);
        }
        drop(nss);
        drop(global);
        self.revoke_standby();
        Ok(RulesReplaced { added, removed })
    }

    pub fn list_rules(&self, namespace: Option<&str>) -> Result<Vec<Rule>, SessionError> {
        match namespace {
            None => Ok(self
                .global_rules
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned()
                .collect()),
            Some(id) => {
                let nss = self.namespaces.read().unwrap_or_else(|e| e.into_inner());
                let ns = nss
                    .get(id)
                    .ok_or_else(|| NamespaceError::Unknown(id.to_owned()))?;
                Ok(ns.local_rules.iter().cloned().collect())
            }
        }
    }

    // ---- services ----

    /// Replaces `source`'s whole list of services; returns how many it now has. On error
    /// nothing changes.
    pub fn replace_services(
        &self,
        source: &str,
        services: Vec<Service>,
    ) -> Result<usize, ServiceError> {
        self.services
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .replace(source, services)
    }

    /// Every service as (source, service), sorted by source, then cluster.
    pub fn list_services(&self) -> Vec<(String, Service)> {
        self.services
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .list()
    }

    pub fn service_counts(&self) -> ServiceCounts {
        self.services
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .counts()
    }

    // ---- apps ----

    pub fn attach(&self, req: AttachRequest) -> Result<Attached, SessionError> {
        let result = self.try_attach(req);
        if let Err(e) = &result {
            let reason = match e {
                SessionError::Namespace(NamespaceError::WrongSecret(_)) => "wrong_secret",
                SessionError::Namespace(NamespaceError::NotPermitted { .. }) => "not_permitted",
                SessionError::Limit(_) => "limit_exceeded",
                _ => "unknown_namespace",
            };
            LayerCounters::bump(&self.counters.attach_failures, reason);
            self.counters.count_limit(&result);
        }
        result
    }

    fn try_attach(&self, req: AttachRequest) -> Result<Attached, SessionError> {
        let address = {
            let nss = self.namespaces.read().unwrap_or_else(|e| e.into_inner());
            let ns = nss.authenticate(&req.namespace_id, &req.namespace_secret)?;
            // The secret is checked first, in constant time, whoever asks; then who asks.
            if !ns
                .access
                .admits(req.cred.uid, req.cred.gid, self.daemon_uid)
            {
                return Err(NamespaceError::NotPermitted {
                    namespace: ns.id.clone(),
                    uid: req.cred.uid,
                    gid: req.cred.gid,
                }
                .into());
            }
            ns.address
        };
        let owner = Owner {
            uid: req.cred.uid,
            namespace: req.namespace_id.as_str().into(),
        };
        let mut reg = self.registry();
        reg.ledger.check(&owner, Resource::Apps, 1)?;
        reg.ledger.check(&owner, Resource::Workers, 1)?;
        reg.ledger.charge(&owner, Resource::Apps, 1)?;
        reg.ledger.charge(&owner, Resource::Workers, 1)?;
        reg.next_app += 1;
        let app = AppId(reg.next_app);
        let token = random_token();
        reg.apps.insert(
            app,
            AppRecord {
                id: app,
                name: req.app_name,
                namespace: req.namespace_id,
                scope: req.scope,
                cred: req.cred,
                token,
                workers: Vec::new(),
                owner,
            },
        );
        let worker = Self::add_worker(&mut reg, app, req.thread, req.link);
        drop(reg);
        self.resume(worker, &req.resume);
        Ok(Attached {
            app,
            app_token: token,
            worker,
            namespace_address: address,
        })
    }

    /// Adds a worker to an attached app, proven by the token its first worker received.
    pub fn attach_worker(
        &self,
        app: AppId,
        token: &[u8],
        thread: usize,
        link: Arc<dyn WorkerLink>,
        resume: &Resume,
    ) -> Result<Attached, SessionError> {
        let result = self.try_attach_worker(app, token, thread, link, resume);
        self.counters.count_limit(&result);
        result
    }

    fn try_attach_worker(
        &self,
        app: AppId,
        token: &[u8],
        thread: usize,
        link: Arc<dyn WorkerLink>,
        resume: &Resume,
    ) -> Result<Attached, SessionError> {
        let mut reg = self.registry();
        let (ok, ns) = match reg.apps.get(&app) {
            Some(rec) => (
                token.len() == 32 && bool::from(rec.token.ct_eq(token)) && rec.token != [0; 32],
                rec.namespace.clone(),
            ),
            None => (false, String::new()),
        };
        if !ok {
            LayerCounters::bump(&self.counters.attach_failures, "bad_app_token");
            return Err(SessionError::BadAppToken);
        }
        let address = self
            .with_namespaces(|n| n.get(&ns).map(|n| n.address))
            .ok_or(NamespaceError::Unknown(ns))?;
        let owner = reg.apps[&app].owner();
        reg.ledger.charge(&owner, Resource::Workers, 1)?;
        let worker = Self::add_worker(&mut reg, app, thread, link);
        let token = reg.apps[&app].token;
        drop(reg);
        self.resume(worker, resume);
        Ok(Attached {
            app,
            app_token: token,
            worker,
            namespace_address: address,
        })
    }

    fn add_worker(
        reg: &mut Registry,
        app: AppId,
        thread: usize,
        link: Arc<dyn WorkerLink>,
    ) -> WorkerId {
        reg.next_worker += 1;
        let id = WorkerId(reg.next_worker);
        reg.workers.insert(
            id,
            WorkerRecord {
                id,
                app,
                thread,
                link,
                listeners: Vec::new(),
            },
        );
        if let Some(a) = reg.apps.get_mut(&app) {
            a.workers.push(id);
        }
        id
    }

    /// Re-opens the listeners a worker carried over from an earlier shuntd; its sessions follow
    /// in [`SessionLayer::resume_sessions`].
    fn resume(&self, worker: WorkerId, resume: &Resume) {
        for ep in &resume.listeners {
            if let Err(e) = self.listen(worker, *ep) {
                tracing::warn!(%worker, endpoint = %ep, error = %e, "cannot restore listener after re-attach");
            }
        }
    }

    /// A worker's socket closed: its listeners go, and its sessions' peers are reset.
    pub fn detach_worker(&self, worker: WorkerId) {
        self.locked(|reg, out| {
            let Some(rec) = reg.workers.remove(&worker) else {
                return;
            };
            reg.pairings.remove_worker(worker);
            let owner = reg.apps.get(&rec.app).map(AppRecord::owner);
            for lid in rec.listeners {
                Self::remove_listener_worker(reg, lid, worker);
            }
            let gone = self.cut_through.worker_gone(worker);
            reg.segments_freed(&gone.segments);
            let doomed: Vec<SessionId> = reg
                .sessions
                .values()
                .filter(|s| {
                    s.worker == worker
                        || s.connection.is_some_and(|c| gone.connections.contains(&c))
                })
                .map(|s| s.id)
                .collect();
            for id in doomed {
                let Some(s) = reg.remove_session(id) else {
                    continue;
                };
                if s.worker != worker {
                    // The peer survives; tell it through shuntd too, in case it missed the
                    // hang-up.
                    if let Some(peer) = reg.workers.get(&s.worker) {
                        let _ = out.post(&peer.link, &Event::Reset { session_id: s.id.0 });
                    }
                }
            }
            let app = rec.app;
            if let Some(owner) = &owner {
                reg.ledger.release(owner, Resource::Workers, 1);
            }
            let empty = reg.apps.get_mut(&app).map(|a| {
                a.workers.retain(|w| *w != worker);
                a.workers.is_empty()
            });
            if empty == Some(true) {
                reg.apps.remove(&app);
                if let Some(owner) = &owner {
                    reg.ledger.release(owner, Resource::Apps, 1);
                }
            }
        });
    }

    // ---- listeners ----

    pub fn listen(
        &self,
        worker: WorkerId,
        endpoint: SocketAddr,
    ) -> Result<ListenerId, SessionError> {
        let result = self.try_listen(worker, endpoint);
        self.counters.count_limit(&result);
        result
    }

    fn try_listen(
        &self,
        worker: WorkerId,
        endpoint: SocketAddr,
    ) -> Result<ListenerId, SessionError> {
        let mut reg = self.registry();
        let w = reg
            .workers
            .get(&worker)
            .ok_or(SessionError::UnknownWorker(worker))?;
        let app = w.app;
        let (namespace, scope) = {
            let a = &reg.apps[&app];
            (a.namespace.clone(), a.scope)
        };
        let proto = TransportProto::CutThrough;
        let existing = match scope {
            Scope::Local => reg
                .local_listeners
                .get(&namespace)
                .and_then(|t| t.lookup_exact(proto, endpoint)),
            Scope::Global => reg.global_listeners.lookup_exact(proto, endpoint),
        };
        if let Some(lid) = existing {
            // Another worker of the same app joins the listener; anyone else is refused.
            let l = reg
                .listeners
                .get_mut(&lid)
                .expect("table and registry agree");
            if l.app != app {
                return Err(SessionError::AddressInUse(endpoint));
            }
            if !l.workers.contains(&worker) {
                l.workers.push(worker);
                reg.workers
                    .get_mut(&worker)
                    .expect("checked")
                    .listeners
                    .push(lid);
            }
            return Ok(lid);
        }
        let owner = reg.apps[&app].owner();
        reg.ledger.charge(&owner, Resource::Listeners, 1)?;
        if let Err(e) = self.transport(proto).start_listen(endpoint) {
            reg.ledger.release(&owner, Resource::Listeners, 1);
            return Err(e.into());
        }
        reg.next_listener += 1;
        let lid = ListenerId(reg.next_listener);
        let inserted = match scope {
            Scope::Local => reg
                .local_listeners
                .entry(namespace.clone())
                .or_default()
                .insert(proto, endpoint, lid),
            Scope::Global => reg.global_listeners.insert(proto, endpoint, lid),
        };
        debug_assert!(inserted);
        reg.listeners.insert(
            lid,
            ListenerRecord {
                id: lid,
                app,
                endpoint,
                namespace,
                scope,
                workers: vec![worker],
                rotor: 0,
                charged_to: owner,
            },
        );
        reg.workers
            .get_mut(&worker)
            .expect("checked")
            .listeners
            .push(lid);
        Ok(lid)
    }

    pub fn unlisten(&self, worker: WorkerId, lid: ListenerId) -> Result<(), SessionError> {
        let mut reg = self.registry();
        let w = reg
            .workers
            .get_mut(&worker)
            .ok_or(SessionError::UnknownWorker(worker))?;
        if !w.listeners.contains(&lid) {
            return Err(SessionError::UnknownListener(lid));
        }
        w.listeners.retain(|l| *l != lid);
        Self::remove_listener_worker(&mut reg, lid, worker);
        Ok(())
    }

    fn remove_listener_worker(reg: &mut Registry, lid: ListenerId, worker: WorkerId) {
        let Some(l) = reg.listeners.get_mut(&lid) else {
            return;
        };
        l.workers.retain(|w| *w != worker);
        if !l.workers.is_empty() {
            return;
        }
        let l = reg.listeners.remove(&lid).expect("present");
        reg.ledger.release(&l.charged_to, Resource::Listeners, 1);
        let proto = TransportProto::CutThrough;
        match l.scope {
            Scope::Local => {
                if let Some(t) = reg.local_listeners.get_mut(&l.namespace) {
                    t.remove(proto, l.endpoint);
                }
            }
            Scope::Global => {
                reg.global_listeners.remove(proto, l.endpoint);
            }
        }
    }

    // ---- connect ----

    /// Counts the rule that matched in `table`, if any, and turns a deny into the error.
    /// Returns the action to follow (`None`: no rule matched).
    fn decide(
        &self,
        table: RuleTable,
        rule: Option<Rule>,
    ) -> Result<Option<RuleAction>, SessionError> {
        let Some(rule) = rule else { return Ok(None) };
        LayerCounters::bump(&self.counters.rule_hits, (table, rule.action.as_str()));
        match rule.action {
            RuleAction::Deny => Err(SessionError::Denied {
                table,
                tag: rule.tag,
            }),
            action => Ok(Some(action)),
        }
    }

    /// Connects `worker` to `remote`. On success both workers have been told, through their
    /// event queues, and each already holds the segment the session lives in.
    pub fn connect(
        &self,
        worker: WorkerId,
        request_id: u32,
        remote: SocketAddr,
    ) -> Result<ConnectOutcome, SessionError> {
        self.connect_as(worker, request_id, remote, false)
    }

    /// Connects like [`SessionLayer::connect`], but the listener's worker holds the session
    /// back from accept until the client opens it, which it does without asking shuntd. The
    /// decision is today's policy: when policy changes, [`SessionLayer::revoke_standby`] has
    /// every worker drop the standby sessions it holds.
    pub fn connect_standby(
        &self,
        worker: WorkerId,
        request_id: u32,
        remote: SocketAddr,
    ) -> Result<ConnectOutcome, SessionError> {
        self.connect_as(worker, request_id, remote, true)
    }

    fn connect_as(
        &self,
        worker: WorkerId,
        request_id: u32,
        remote: SocketAddr,
        standby: bool,
    ) -> Result<ConnectOutcome, SessionError> {
        let mut out = Deliveries::default();
        let result = self.try_connect(&mut out, worker, request_id, remote, standby);
        out.deliver();
        self.counters.count_limit(&result);
        match &result {
            Ok(_) => {
                self.counters.connects.fetch_add(1, Ordering::Relaxed);
                if standby {
                    self.counters
                        .standby_connects
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => LayerCounters::bump(&self.counters.connect_failures, e.code().as_str()),
        }
        result
    }

    fn try_connect(
        &self,
        out: &mut Deliveries,
        worker: WorkerId,
        request_id: u32,
        mut remote: SocketAddr,
        standby: bool,
    ) -> Result<ConnectOutcome, SessionError> {
        let proto = TransportProto::CutThrough;
        let mut reg = self.registry();
        let w = reg
            .workers
            .get(&worker)
            .ok_or(SessionError::UnknownWorker(worker))?;
        let client_app = w.app;
        let (namespace, client_scope) = {
            let a = &reg.apps[&client_app];
            (a.namespace.clone(), a.scope)
        };
        // One view of both tables for the whole decision, locked in the order replace_rules
        // takes them. A connect carries no peer identity: rules naming principals never match.
        let global_rules = self.global_rules.read().unwrap_or_else(|e| e.into_inner());
        let nss = self.namespaces.read().unwrap_or_else(|e| e.into_inner());
        let ns = nss
            .get(&namespace)
            .ok_or_else(|| NamespaceError::Unknown(namespace.clone()))?;
        let ns_address = ns.address;
        let unspecified_local = SocketAddr::new(ns_address, 0);

        // Egress: the client's namespace decides whether, and where, it may connect.
        let egress = ns
            .local_rules
            .lookup(unspecified_local, remote, None)
            .cloned();
        if let Some(RuleAction::Redirect(to)) = self.decide(RuleTable::Local, egress)? {
            remote = to;
        }

        let lid = reg
            .local_listeners
            .get(&namespace)
            .and_then(|t| t.lookup(proto, remote))
            .or_else(|| match client_scope {
                Scope::Global => reg.global_listeners.lookup(proto, remote),
                Scope::Local => None,
            })
            .ok_or(SessionError::NoListener(remote))?;

        let port = reg
            .table
            .free_local_port(proto, ns_address, remote)
            .ok_or_else(|| SessionError::NoLocalPort(namespace.clone()))?;
        let local = SocketAddr::new(ns_address, port);

        // Ingress: the node's global table decides whether the listener may take it.
        let listener_ep = reg.listeners[&lid].endpoint;
        let ingress = global_rules
            .lookup(
                SocketAddr::new(remote.ip(), listener_ep.port()),
                local,
                None,
            )
            .cloned();
        drop(nss);
        drop(global_rules);
        self.decide(RuleTable::Global, ingress)?;

        let l = reg.listeners.get_mut(&lid).expect("looked up");
        let server = l.workers[l.rotor % l.workers.len()];
        l.rotor = l.rotor.wrapping_add(1);
        self.establish(
            &mut reg,
            out,
            Establish {
                proto,
                client: worker,
                client_request: request_id,
                server,
                server_notice: if standby {
                    ServerNotice::Standby(lid)
                } else {
                    ServerNotice::Accepted(lid)
                },
                local,
                remote,
                fifo_size: None,
            },
        )
    }

    /// Creates the transport connection between two workers, queues word of it to both, and
    /// records the session pair. Each worker receives the segment before it hears of the
    /// session. The connecting side pays for the session, and for a segment if one is made.
    fn establish(
        &self,
        reg: &mut Registry,
        out: &mut Deliveries,
        e: Establish,
    ) -> Result<ConnectOutcome, SessionError> {
        let Establish {
            proto,
            client: worker,
            client_request: request_id,
            server,
            server_notice,
            local,
            remote,
            fifo_size,
        } = e;
        let client_rec = reg
            .workers
            .get(&worker)
            .ok_or(SessionError::UnknownWorker(worker))?;
        let server_rec = reg
            .workers
            .get(&server)
            .ok_or(SessionError::UnknownWorker(server))?;
        let (client_app, client_thread) = (client_rec.app, client_rec.thread);
        let (server_app, server_thread) = (server_rec.app, server_rec.thread);
        let namespace = reg.apps[&client_app].namespace.clone();
        let server_ns = reg.apps[&server_app].namespace.clone();
        let (client_link, server_link) = (client_rec.link.clone(), server_rec.link.clone());
        let owner = reg.apps[&client_app].owner();
        let segment_bytes = self.cut_through.config().segment_size as u64;
        let may_grow = reg
            .ledger
            .check(&owner, Resource::SegmentBytes, segment_bytes);

        let client_tuple = FiveTuple {
            proto,
            local,
            remote,
        };
        let client_id = reg.session_id(client_thread);
        reg.table
            .insert_half_open(client_tuple, client_id)
            .map_err(|_| SessionError::AddressInUse(local))?;
        if let Err(e) = reg.ledger.charge(&owner, Resource::Sessions, 1) {
            reg.table.remove(&client_tuple);
            return Err(e.into());
        }
        // Undoes the two steps above when the connect goes no further.
        let undo = |reg: &mut Registry| {
            reg.table.remove(&client_tuple);
            reg.ledger.release(&owner, Resource::Sessions, 1);
        };

        if !server_link.has_room(1) || !client_link.has_room(1) {
            undo(reg);
            let full = if server_link.has_room(1) {
                worker
            } else {
                server
            };
            return Err(SessionError::Link(full, LinkError::QueueFull));
        }
        let req = ConnectRequest {
            client: worker,
            server,
            local,
            remote,
            fifo_size,
            may_create_segment: may_grow.is_ok(),
        };
        let connected = match self.transport(proto).connect(&req) {
            Ok(c) => c,
            Err(e) => {
                undo(reg);
                return Err(match (e, may_grow) {
                    (TransportError::NeedsSegment, Err(limit)) => limit.into(),
                    (e, _) => e.into(),
                });
            }
        };
        if let Some(seg) = connected.new_segment {
            // Checked above; the ledger still refuses rather than overdraw.
            if reg
                .ledger
                .charge(&owner, Resource::SegmentBytes, seg.bytes)
                .is_ok()
            {
                reg.segment_charges
                    .insert(seg.id, (owner.clone(), seg.bytes));
            }
        }
        let server_id = reg.session_id(server_thread);
        let conn = connected.id;

        // Nobody waits on a standby session: each side finds it at its next dispatch, which
        // comes before the client can use it and before the server hears it was opened. So
        // neither is woken for it.
        let quiet = matches!(server_notice, ServerNotice::Standby(_));
        let post = |out: &mut Deliveries, link: &Arc<dyn WorkerLink>, event: &Event| {
            if quiet {
                out.post_quietly(link, event)
            } else {
                out.post(link, event)
            }
        };
        let client_grant = connected.client_grant;
        let server_grant = connected.server_grant;
        let tell_client = |out: &mut Deliveries| -> Result<(), SessionError> {
            if let Some(g) = client_grant {
                out.grant(&client_link, g)
                    .map_err(|e| SessionError::Link(worker, e))?;
            }
            let event = Event::Connected {
                request_id,
                session_id: client_id.0,
                fifos: connected.client_fifos,
                local,
            };
            post(out, &client_link, &event).map_err(|e| SessionError::Link(worker, e))
        };
        let tell_server = |out: &mut Deliveries| -> Result<(), SessionError> {
            if let Some(g) = server_grant {
                out.grant(&server_link, g)
                    .map_err(|e| SessionError::Link(server, e))?;
            }
            let event = match server_notice {
                ServerNotice::Accepted(lid) | ServerNotice::Standby(lid) => Event::Accepted {
                    listener_id: lid.0,
                    session_id: server_id.0,
                    fifos: connected.server_fifos,
                    peer: local,
                    standby: quiet,
                },
                ServerNotice::Connected(request_id) => Event::Connected {
                    request_id,
                    session_id: server_id.0,
                    fifos: connected.server_fifos,
                    local: remote,
                },
            };
            post(out, &server_link, &event).map_err(|e| SessionError::Link(server, e))
        };
        // A listener learns first, so its backlog holds the session before the client can
        // write. The two ends of a pairing only talk to each other over the connection they
        // replace, and the responder answers on it once told; so the initiator learns first.
        let delivered = match server_notice {
            ServerNotice::Accepted(_) | ServerNotice::Standby(_) => {
                tell_server(out).and_then(|()| tell_client(out))
            }
            ServerNotice::Connected(_) => tell_client(out).and_then(|()| tell_server(out)),
        };

        reg.table
            .establish(&client_tuple)
            .expect("inserted half-open above");
        let server_tuple = client_tuple.reversed();
        let _ = reg.table.insert_established(server_tuple, server_id);
        reg.sessions.insert(
            client_id,
            SessionRecord {
                id: client_id,
                worker,
                app: client_app,
                namespace,
                transport: proto,
                connection: Some(conn),
                tuple: client_tuple,
                is_client: true,
                state: SessionState::Ready,
                peer: Some(server_id),
                charged_to: Some(owner),
            },
        );
        reg.sessions.insert(
            server_id,
            SessionRecord {
                id: server_id,
                worker: server,
                app: server_app,
                namespace: server_ns,
                transport: proto,
                connection: Some(conn),
                tuple: server_tuple,
                is_client: false,
                state: SessionState::Ready,
                peer: Some(client_id),
                charged_to: None,
            },
        );
        if let Err(e) = delivered {
            // A worker that cannot be told is gone or going (the queues had room). One side may
            // already have word of the session, so its FIFOs stay allocated, reset, until the
            // gone worker's detach frees them with the rest of its pair's segments.
            let _ = self.transport(proto).reset(conn);
            return Err(e);
        }
        Ok(ConnectOutcome {
            client_session: client_id,
            server_session: server_id,
            transport: proto,
        })
    }

    // ---- pairing ----

    /// Takes one end of a pairing. When its other end is already waiting, the two workers get a
    /// cut-through session, as after a connect; otherwise the offer waits. Either way the
    /// answers arrive as `Connected` or `ConnectFailed` events, so an offer never blocks shuntd.
    pub fn pair(
        &self,
        worker: WorkerId,
        request_id: u32,
        offer: PairOffer,
    ) -> Result<PairOutcome, SessionError> {
        let mut out = Deliveries::default();
        let result = self.try_pair(&mut out, worker, request_id, offer);
        out.deliver();
        self.counters.count_limit(&result);
        match &result {
            Ok(PairOutcome::Paired(_)) => {
                self.counters.connects.fetch_add(1, Ordering::Relaxed);
                LayerCounters::bump(&self.counters.pairings, "paired");
            }
            Ok(PairOutcome::Waiting) => {}
            Err(e) => LayerCounters::bump(&self.counters.pairings, e.code().as_str()),
        }
        result
    }

    fn try_pair(
        &self,
        out: &mut Deliveries,
        worker: WorkerId,
        request_id: u32,
        offer: PairOffer,
    ) -> Result<PairOutcome, SessionError> {
        let mut reg = self.registry();
        self.expire_offers(&mut reg, out);
        if !reg.workers.contains_key(&worker) {
            return Err(SessionError::UnknownWorker(worker));
        }
        let waiting = Offer {
            worker,
            request_id,
            role: offer.role,
            local: offer.local,
            remote: offer.remote,
            fifo_size: offer.fifo_size,
            peer_identity: offer.peer_identity,
        };
        let (initiator, responder) =
            match reg.pairings.offer(offer.token, waiting, Instant::now())? {
                OfferOutcome::Waiting => return Ok(PairOutcome::Waiting),
                OfferOutcome::Matched {
                    initiator,
                    responder,
                } => (initiator, responder),
            };
        let outcome = self
            .check_pair(&reg, &initiator, &responder)
            .and_then(|()| {
                self.establish(
                    &mut reg,
                    out,
                    Establish {
                        proto: TransportProto::CutThrough,
                        client: initiator.worker,
                        client_request: initiator.request_id,
                        server: responder.worker,
                        server_notice: ServerNotice::Connected(responder.request_id),
                        local: initiator.local,
                        remote: initiator.remote,
                        // Either side may need the room: the larger wish applies.
                        fifo_size: initiator.fifo_size.max(responder.fifo_size),
                    },
                )
            });
        match outcome {
            Ok(o) => Ok(PairOutcome::Paired(o)),
            Err(e) => {
                // Whichever end asked second hears through its request; the first is waiting
                // for an event, so it gets one.
                let first = if worker == initiator.worker {
                    &responder
                } else {
                    &initiator
                };
                Self::refuse_offer(&reg, out, first, e.code());
                Err(e)
            }
        }
    }

    /// Both ends must be allowed to meet: the initiator's namespace rules (egress) and the
    /// node's global rules (ingress) see the connection the pairing replaces. A pairing replaces
    /// an existing connection, so a redirect has nothing to redirect and counts as allow.
    ///
    /// Each table sees the identity of the end it guards against, as the other end verified
    /// it: egress the responder's (from the initiator's offer), ingress the initiator's (from
    /// the responder's offer). An end that verified nothing (plain mode) offers none, and rules
    /// naming principals then do not match.
    fn check_pair(
        &self,
        reg: &Registry,
        initiator: &Offer,
        responder: &Offer,
    ) -> Result<(), SessionError> {
        let app_of = |w: &WorkerId| {
            reg.workers
                .get(w)
                .map(|r| &reg.apps[&r.app])
                .ok_or(SessionError::UnknownWorker(*w))
        };
        let (client_app, server_app) = (app_of(&initiator.worker)?, app_of(&responder.worker)?);
        if client_app.namespace != server_app.namespace && server_app.scope != Scope::Global {
            return Err(SessionError::Denied {
                table: RuleTable::Local,
                tag: format!("scope of namespace `{}`", server_app.namespace),
            });
        }
        // Both tables at once, locked in the order replace_rules takes them, so a replacement
        // is seen whole or not at all.
        let global_rules = self.global_rules.read().unwrap_or_else(|e| e.into_inner());
        let nss = self.namespaces.read().unwrap_or_else(|e| e.into_inner());
        let egress = nss.get(&client_app.namespace).and_then(|ns| {
            ns.local_rules
                .lookup(
                    initiator.local,
                    initiator.remote,
                    initiator.peer_identity.as_deref(),
                )
                .cloned()
        });
        let ingress = global_rules
            .lookup(
                responder.local,
                responder.remote,
                responder.peer_identity.as_deref(),
            )
            .cloned();
        drop(nss);
        drop(global_rules);
        self.decide(RuleTable::Local, egress)?;
        self.decide(RuleTable::Global, ingress)?;
        Ok(())
    }

    fn refuse_offer(reg: &Registry, out: &mut Deliveries, offer: &Offer, code: ErrorCode) {
        if let Some(w) = reg.workers.get(&offer.worker) {
            let _ = out.post(
                &w.link,
                &Event::ConnectFailed {
                    request_id: offer.request_id,
                    code,
                },
            );
        }
    }

    fn expire_offers(&self, reg: &mut Registry, out: &mut Deliveries) {
        for offer in reg.pairings.expire(Instant::now()) {
            LayerCounters::bump(&self.counters.pairings, ErrorCode::PairTimeout.as_str());
            Self::refuse_offer(reg, out, &offer, ErrorCode::PairTimeout);
        }
    }

    /// Answers the offers that waited too long; shuntd calls this now and then, since an
    /// offer's other end may never come.
    pub fn expire_pair_offers(&self) {
        self.locked(|reg, out| self.expire_offers(reg, out));
    }

    /// An app closed (or reset) its side of a session.
    pub fn session_closed(
        &self,
        worker: WorkerId,
        session: SessionId,
        reset: bool,
    ) -> Result<(), SessionError> {
        let mut reg = self.registry();
        let owned = reg
            .sessions
            .get(&session)
            .is_some_and(|s| s.worker == worker);
        if !owned {
            return Err(SessionError::UnknownWorker(worker));
        }
        let s = reg.remove_session(session).expect("checked");
        if let Some(conn) = s.connection {
            let t = self.transport(s.transport);
            if reset {
                let _ = t.reset(conn);
            }
            t.close(conn, s.is_client)?;
        }
        Ok(())
    }

    // ---- listings ----

    pub fn sessions(&self) -> Vec<SessionRecord> {
        self.registry().sessions.values().cloned().collect()
    }

    pub fn session_bytes(&self, s: &SessionRecord) -> Option<(u64, u64)> {
        let stats = self.transport(s.transport).stats(s.connection?)?;
        Some(if s.is_client {
            (stats.client_to_server, stats.server_to_client)
        } else {
            (stats.server_to_client, stats.client_to_server)
        })
    }

    pub fn apps(&self) -> Vec<(AppId, String, String, PeerCred, usize, Vec<SocketAddr>)> {
        let reg = self.registry();
        reg.apps
            .values()
            .map(|a| {
                let listeners = reg
                    .listeners
                    .values()
                    .filter(|l| l.app == a.id)
                    .map(|l| l.endpoint)
                    .collect();
                (
                    a.id,
                    a.name.clone(),
                    a.namespace.clone(),
                    a.cred,
                    a.workers.len(),
                    listeners,
                )
            })
            .collect()
    }

    pub fn counts(&self) -> LayerCounts {
        let reg = self.registry();
        LayerCounts {
            apps: reg.apps.len(),
            workers: reg.workers.len(),
            listeners: reg.listeners.len(),
            sessions: reg.sessions.len(),
            half_open: reg.table.half_open_len(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct LayerCounts {
    pub apps: usize,
    pub workers: usize,
    pub listeners: usize,
    pub sessions: usize,
    pub half_open: usize,
}

#[cfg(test)]
mod tests;
