//! The layer with real workers (their events recorded instead of sent): rules decisions
//! (identities at pairing, connects without identities, replacing a source's rules), the lock
//! discipline of deliveries, limits, who may attach, and resumed sessions.

use std::sync::Mutex as StdMutex;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, OnceLock, Weak};

use shunt_sapi::message::{PAIR_TOKEN_LEN, PairRole};

use super::*;
use crate::identity_match::IdentityMatch;
use crate::limits::Caps;
use crate::link::SegmentGrant;
use crate::rules::{PortRange, parse_prefix};

const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";
const RESPONDER: &str = "10.1.0.2:15006";

/// Keeps what the layer tells a worker, and checks how: queued under the registry lock,
/// delivered (flushed) only once it is free.
#[derive(Default, Debug)]
struct Recorder {
    events: StdMutex<Vec<Event>>,
    /// Whether each event would have woken the worker.
    loud: StdMutex<Vec<bool>>,
    grants: AtomicUsize,
    /// Grants and events queued since the last flush.
    unflushed: AtomicUsize,
    flushes: AtomicUsize,
    /// Flushes that found the registry locked: each one a system call that could have made
    /// every app wait.
    flushes_under_lock: AtomicUsize,
    layer: OnceLock<Weak<SessionLayer>>,
}

impl Recorder {
    fn queued(&self) {
        self.unflushed.fetch_add(1, Ordering::Relaxed);
    }

    /// Everything queued was delivered, and never under the lock.
    fn assert_delivered_outside_the_lock(&self) {
        assert_eq!(
            self.unflushed.load(Ordering::Relaxed),
            0,
            "queued, never flushed"
        );
        assert_eq!(self.flushes_under_lock.load(Ordering::Relaxed), 0);
    }
}

impl WorkerLink for Recorder {
    fn grant_segment(&self, _: SegmentGrant) -> Result<(), LinkError> {
        self.grants.fetch_add(1, Ordering::Relaxed);
        self.queued();
        Ok(())
    }
    fn post(&self, event: &Event) -> Result<(), LinkError> {
        self.events.lock().unwrap().push(*event);
        self.loud.lock().unwrap().push(true);
        self.queued();
        Ok(())
    }
    fn post_quietly(&self, event: &Event) -> Result<(), LinkError> {
        self.events.lock().unwrap().push(*event);
        self.loud.lock().unwrap().push(false);
        self.queued();
        Ok(())
    }
    fn has_room(&self, _: usize) -> bool {
        true
    }
    fn flush(&self) {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.unflushed.store(0, Ordering::Relaxed);
        let layer = self.layer.get().and_then(Weak::upgrade);
        if layer.is_some_and(|l| l.registry.try_lock().is_err()) {
            self.flushes_under_lock.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn layer_with(limits: Limits) -> Arc<SessionLayer> {
    let layer = SessionLayer::new(SessionLayerConfig {
        cut_through: CutThroughConfig {
            fifo_size: 4096,
            segment_size: 1 << 22,
        },
        limits,
        daemon_uid: 0,
        ..SessionLayerConfig::default()
    });
    for (id, address) in [("default", "10.1.0.1"), ("blue", "10.2.0.1")] {
        layer
            .add_namespace(
                Namespace::new(id, b"", address.parse().unwrap()).unwrap(),
                false,
            )
            .unwrap();
    }
    Arc::new(layer)
}

fn layer() -> Arc<SessionLayer> {
    layer_with(Limits::default())
}

fn attach(layer: &Arc<SessionLayer>, name: &str) -> WorkerId {
    attach_recorded(layer, name).0
}

/// Attaches a worker whose events stay readable.
fn attach_recorded(layer: &Arc<SessionLayer>, name: &str) -> (WorkerId, Arc<Recorder>) {
    attach_as(layer, name, "default", PeerCred::default()).unwrap()
}

fn attach_as(
    layer: &Arc<SessionLayer>,
    name: &str,
    namespace: &str,
    cred: PeerCred,
) -> Result<(WorkerId, Arc<Recorder>), SessionError> {
    let recorder = Arc::new(Recorder::default());
    let _ = recorder.layer.set(Arc::downgrade(layer));
    let worker = layer
        .attach(AttachRequest {
            namespace_id: namespace.into(),
            namespace_secret: Vec::new(),
            app_name: name.into(),
            scope: Scope::Global,
            cred,
            thread: 0,
            link: recorder.clone(),
            resume: Resume::default(),
        })?
        .worker;
    Ok((worker, recorder))
}

fn any_v4(action: RuleAction, tag: &str) -> Rule {
    let any = parse_prefix("0.0.0.0/0").unwrap();
    Rule::new(any, PortRange::ANY, any, PortRange::ANY, action, tag)
}

fn deny_principal(tag: &str, principal: &str, priority: u32) -> Rule {
    let mut r = any_v4(RuleAction::Deny, tag);
    r.principal = Some(IdentityMatch::Exact(principal.into()));
    r.priority = priority;
    r
}

fn sourced(mut r: Rule, source: &str) -> Rule {
    r.source = source.into();
    r
}

/// Two workers that pair over a fresh token and connection each time.
struct Pairer {
    a: WorkerId,
    b: WorkerId,
    next_token: u16,
}

impl Pairer {
    fn new(layer: &Arc<SessionLayer>) -> Pairer {
        Pairer {
            a: attach(layer, "sidecar-a"),
            b: attach(layer, "sidecar-b"),
            next_token: 0,
        }
    }

    fn pair(
        &mut self,
        layer: &SessionLayer,
        initiator_saw: Option<&str>,
        responder_saw: Option<&str>,
    ) -> Result<PairOutcome, SessionError> {
        self.next_token += 1;
        let mut token = [0; PAIR_TOKEN_LEN];
        token[..2].copy_from_slice(&self.next_token.to_le_bytes());
        // A paired connection stays in the session table: each pairing replaces another one.
        let initiator: SocketAddr = SocketAddr::new([10, 1, 0, 1].into(), self.next_token);
        let responder: SocketAddr = RESPONDER.parse().unwrap();
        let offer = |role, local, remote, peer: Option<&str>| PairOffer {
            token,
            role,
            local,
            remote,
            fifo_size: None,
            peer_identity: peer.map(str::to_owned),
        };
        let first = layer.pair(
            self.a,
            1,
            offer(PairRole::Initiator, initiator, responder, initiator_saw),
        )?;
        assert!(matches!(first, PairOutcome::Waiting));
        layer.pair(
            self.b,
            2,
            offer(PairRole::Responder, responder, initiator, responder_saw),
        )
    }
}

fn denied_by(r: Result<PairOutcome, SessionError>) -> (RuleTable, String) {
    match r {
        Err(SessionError::Denied { table, tag }) => (table, tag),
        other => panic!("expected a denial, got {other:?}"),
    }
}

#[test]
fn the_global_table_sees_the_initiators_identity_as_the_responder_verified_it() {
    let layer = layer();
    let mut p = Pairer::new(&layer);
    layer
        .add_rule(None, deny_principal("no-client", CLIENT, 1))
        .unwrap();
    // The responder verified the client: denied, and the error names the rule.
    let (table, tag) = denied_by(p.pair(&layer, Some(SERVER), Some(CLIENT)));
    assert_eq!((table, tag.as_str()), (RuleTable::Global, "no-client"));
    assert_eq!(
        SessionError::Denied { table, tag }.to_string(),
        "denied by global rule `no-client`"
    );
    // The initiator's view of its peer is not what the ingress table looks at.
    assert!(matches!(
        p.pair(
            &layer,
            Some(CLIENT),
            Some("spiffe://cluster.local/ns/default/sa/other")
        ),
        Ok(PairOutcome::Paired(_))
    ));
    // Without an identity (plain mode) a principal rule never matches.
    assert!(matches!(
        p.pair(&layer, None, None),
        Ok(PairOutcome::Paired(_))
    ));
}

#[test]
fn a_local_table_sees_the_responders_identity_as_the_initiator_verified_it() {
    let layer = layer();
    let mut p = Pairer::new(&layer);
    layer
        .add_rule(Some("default"), deny_principal("no-server", SERVER, 0))
        .unwrap();
    let (table, tag) = denied_by(p.pair(&layer, Some(SERVER), Some(CLIENT)));
    assert_eq!((table, tag.as_str()), (RuleTable::Local, "no-server"));
    assert!(matches!(
        p.pair(&layer, Some(CLIENT), Some(SERVER)),
        Ok(PairOutcome::Paired(_))
    ));
    // Another namespace's table is not consulted.
    layer.delete_rule(Some("default"), "no-server").unwrap();
    layer
        .add_rule(Some("blue"), deny_principal("blue-no-server", SERVER, 0))
        .unwrap();
    assert!(matches!(
        p.pair(&layer, Some(SERVER), Some(CLIENT)),
        Ok(PairOutcome::Paired(_))
    ));
}

#[test]
fn priorities_decide_between_principal_rules_at_pairing() {
    let layer = layer();
    let mut p = Pairer::new(&layer);
    // Allow the client at priority 1 over a broad deny at priority 0... then deny it at 2.
    let mut allow = any_v4(RuleAction::Allow, "allow-client");
    allow.principal = Some(IdentityMatch::Exact(CLIENT.into()));
    allow.priority = 1;
    layer.add_rule(None, allow).unwrap();
    layer
        .add_rule(None, any_v4(RuleAction::Deny, "deny-all"))
        .unwrap();
    assert!(matches!(
        p.pair(&layer, None, Some(CLIENT)),
        Ok(PairOutcome::Paired(_))
    ));
    assert_eq!(denied_by(p.pair(&layer, None, Some(SERVER))).1, "deny-all");
    let mut deny = deny_principal("deny-ns", "unused", 2);
    deny.principal = Some(IdentityMatch::Prefix(
        "spiffe://cluster.local/ns/default/".into(),
    ));
    layer.add_rule(None, deny).unwrap();
    assert_eq!(denied_by(p.pair(&layer, None, Some(CLIENT))).1, "deny-ns");
}

#[test]
fn a_connect_carries_no_identity_so_principal_rules_never_match_it() {
    let layer = layer();
    let server = attach(&layer, "server");
    let client = attach(&layer, "client");
    layer
        .listen(server, "10.1.0.1:80".parse().unwrap())
        .unwrap();
    layer
        .add_rule(None, deny_principal("no-client", CLIENT, 5))
        .unwrap();
    let mut deny_any = deny_principal("no-one", "x", 5);
    deny_any.principal = Some(IdentityMatch::Contains("spiffe".into()));
    layer.add_rule(Some("default"), deny_any).unwrap();
    layer
        .connect(client, 1, "10.1.0.1:80".parse().unwrap())
        .unwrap();
    // A rule without a principal still applies.
    layer
        .add_rule(None, any_v4(RuleAction::Deny, "all"))
        .unwrap();
    let err = layer
        .connect(client, 2, "10.1.0.1:80".parse().unwrap())
        .unwrap_err();
    assert!(matches!(err, SessionError::Denied { ref tag, .. } if tag == "all"));
}

#[test]
fn standby_connects_wake_nobody_and_policy_changes_revoke_them_everywhere() {
    let layer = layer();
    let (server, server_events) = attach_recorded(&layer, "server");
    let (client, client_events) = attach_recorded(&layer, "client");
    let (_, bystander_events) = attach_recorded(&layer, "bystander");
    let remote = "10.1.0.1:80".parse().unwrap();
    layer.listen(server, remote).unwrap();

    layer.connect_standby(client, 7, remote).unwrap();
    let server_saw = server_events.events.lock().unwrap().clone();
    assert!(
        matches!(server_saw[..], [Event::Accepted { standby: true, .. }]),
        "{server_saw:?}"
    );
    let client_saw = client_events.events.lock().unwrap().clone();
    assert!(
        matches!(client_saw[..], [Event::Connected { request_id: 7, .. }]),
        "{client_saw:?}"
    );
    assert_eq!(*server_events.loud.lock().unwrap(), [false]);
    assert_eq!(*client_events.loud.lock().unwrap(), [false]);
    assert_eq!(layer.counters.standby_connects.load(Ordering::Relaxed), 1);

    // An ordinary connect still wakes both.
    layer.connect(client, 8, remote).unwrap();
    assert_eq!(*server_events.loud.lock().unwrap(), [false, true]);

    // Any change of policy reaches every worker, loudly.
    let before = layer.counters.standby_revocations.load(Ordering::Relaxed);
    layer
        .add_rule(None, any_v4(RuleAction::Allow, "allow-all"))
        .unwrap();
    for recorder in [&server_events, &client_events, &bystander_events] {
        let events = recorder.events.lock().unwrap();
        assert_eq!(events.last(), Some(&Event::StandbyRevoked));
        assert_eq!(recorder.loud.lock().unwrap().last(), Some(&true));
    }
    layer.delete_rule(None, "allow-all").unwrap();
    layer.replace_rules("xds/a", Vec::new()).unwrap();
    let revocations = |r: &Recorder| {
        r.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| **e == Event::StandbyRevoked)
            .count()
    };
    assert_eq!(revocations(&bystander_events), 3);
    assert_eq!(
        layer.counters.standby_revocations.load(Ordering::Relaxed) - before,
        3
    );
}

type ScopedRule = (Option<String>, Rule);

fn tags(layer: &SessionLayer, namespace: Option<&str>) -> Vec<String> {
    let mut t: Vec<String> = layer
        .list_rules(namespace)
        .unwrap()
        .into_iter()
        .map(|r| r.tag)
        .collect();
    t.sort();
    t
}

fn snapshot(layer: &SessionLayer) -> Vec<Vec<String>> {
    [None, Some("default"), Some("blue")]
        .into_iter()
        .map(|ns| tags(layer, ns))
        .collect()
}

#[test]
fn replace_rules_swaps_one_sources_set_in_every_table() {
    let layer = layer();
    layer
        .add_rule(None, any_v4(RuleAction::Allow, "manual"))
        .unwrap();
    layer
        .add_rule(Some("blue"), any_v4(RuleAction::Allow, "manual-blue"))
        .unwrap();
    layer
        .replace_rules(
            "xds/other",
            vec![(
                Some("default".into()),
                sourced(any_v4(RuleAction::Allow, "other"), "xds/other"),
            )],
        )
        .unwrap();
    let old = vec![
        (None, sourced(any_v4(RuleAction::Deny, "g1"), "xds/a")),
        (None, sourced(any_v4(RuleAction::Deny, "g2"), "xds/a")),
        (
            Some("default".into()),
            sourced(any_v4(RuleAction::Deny, "d1"), "xds/a"),
        ),
        (
            Some("blue".into()),
            sourced(any_v4(RuleAction::Deny, "b1"), "xds/a"),
        ),
    ];
    assert_eq!(
        layer.replace_rules("xds/a", old).unwrap(),
        RulesReplaced {
            added: 4,
            removed: 0
        }
    );
    assert_eq!(
        snapshot(&layer),
        [
            vec!["g1", "g2", "manual"],
            vec!["d1", "other"],
            vec!["b1", "manual-blue"]
        ]
    );
    // The new set: nothing in blue any more, a rule reusing an old tag, and new ones.
    let new = vec![
        (None, sourced(any_v4(RuleAction::Allow, "g1"), "xds/a")),
        (
            Some("default".into()),
            sourced(any_v4(RuleAction::Deny, "d2"), "xds/a"),
        ),
        (
            Some("default".into()),
            sourced(any_v4(RuleAction::Deny, "d3"), "xds/a"),
        ),
    ];
    assert_eq!(
        layer.replace_rules("xds/a", new).unwrap(),
        RulesReplaced {
            added: 3,
            removed: 4
        }
    );
    assert_eq!(
        snapshot(&layer),
        [
            vec!["g1", "manual"],
            vec!["d2", "d3", "other"],
            vec!["manual-blue"]
        ]
    );
    let g1 = layer
        .list_rules(None)
        .unwrap()
        .into_iter()
        .find(|r| r.tag == "g1")
        .unwrap();
    assert_eq!(g1.action, RuleAction::Allow, "the new g1, not the old one");
    assert_eq!(
        layer.replace_rules("xds/a", Vec::new()).unwrap(),
        RulesReplaced {
            added: 0,
            removed: 3
        }
    );
    assert_eq!(
        snapshot(&layer),
        [vec!["manual"], vec!["other"], vec!["manual-blue"]]
    );
}

#[test]
fn a_refused_replacement_leaves_every_table_unchanged() {
    let layer = layer();
    layer
        .add_rule(Some("blue"), any_v4(RuleAction::Allow, "manual-blue"))
        .unwrap();
    layer
        .replace_rules(
            "xds/a",
            vec![
                (None, sourced(any_v4(RuleAction::Deny, "g"), "xds/a")),
                (
                    Some("default".into()),
                    sourced(any_v4(RuleAction::Deny, "d"), "xds/a"),
                ),
            ],
        )
        .unwrap();
    let before = snapshot(&layer);
    // Each set is fine in the global table but wrong in a local one (or the other way), so a
    // table-by-table swap would have changed something before failing.
    let good_global = || (None, sourced(any_v4(RuleAction::Allow, "g-new"), "xds/a"));
    let cases: Vec<(Vec<ScopedRule>, &str)> = vec![
        (
            vec![
                good_global(),
                (
                    Some("nowhere".into()),
                    sourced(any_v4(RuleAction::Deny, "x"), "xds/a"),
                ),
            ],
            "unknown namespace `nowhere`",
        ),
        (
            vec![
                good_global(),
                (
                    Some("blue".into()),
                    sourced(any_v4(RuleAction::Deny, "manual-blue"), "xds/a"),
                ),
            ],
            "local:blue rules: tag `manual-blue` belongs to a rule written by hand",
        ),
        (
            vec![
                good_global(),
                (
                    Some("default".into()),
                    sourced(any_v4(RuleAction::Deny, "dup"), "xds/a"),
                ),
                (
                    Some("default".into()),
                    sourced(any_v4(RuleAction::Deny, "dup"), "xds/a"),
                ),
            ],
            "local:default rules: tag `dup` appears more than once",
        ),
        (
            vec![
                (
                    Some("default".into()),
                    sourced(any_v4(RuleAction::Deny, "d-new"), "xds/a"),
                ),
                (None, any_v4(RuleAction::Deny, "unsourced")),
            ],
            "global rules: rule `unsourced` has source ``, expected `xds/a`",
        ),
    ];
    for (rules, message) in cases {
        let err = layer.replace_rules("xds/a", rules).unwrap_err();
        assert!(err.to_string().contains(message), "{err}");
        assert_eq!(snapshot(&layer), before);
    }
    let err = layer.replace_rules("", Vec::new()).unwrap_err();
    assert!(
        matches!(
            err,
            SessionError::RulesOf {
                error: RuleError::NoSource,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(snapshot(&layer), before);
}

/// A pairing reads both tables; while another thread keeps swapping a source between a set
/// that denies in the global table and one that denies in the local table, every pairing must
/// be denied by one of them. A swap seen half-done would let one through.
#[test]
fn pairings_never_see_half_a_replacement() {
    let layer = layer();
    let set_global = || {
        vec![(
            None,
            sourced(any_v4(RuleAction::Deny, "global-deny"), "xds/a"),
        )]
    };
    let set_local = || {
        vec![(
            Some("default".to_owned()),
            sourced(any_v4(RuleAction::Deny, "local-deny"), "xds/a"),
        )]
    };
    layer.replace_rules("xds/a", set_global()).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (layer, stop) = (layer.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let set = if swaps.is_multiple_of(2) {
                    set_local()
                } else {
                    set_global()
                };
                layer.replace_rules("xds/a", set).unwrap();
                swaps += 1;
            }
            swaps
        })
    };
    let mut p = Pairer::new(&layer);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..2000 {
        let (_, tag) = denied_by(p.pair(&layer, None, None));
        seen.insert(tag);
    }
    stop.store(true, Ordering::Relaxed);
    assert!(swapper.join().unwrap() > 0);
    assert!(!seen.is_empty());
}

#[test]
fn deliveries_reach_workers_only_after_the_registry_lock_is_released() {
    let layer = layer();
    let (server, server_link) = attach_recorded(&layer, "server");
    let (client, client_link) = attach_recorded(&layer, "client");
    let (_, bystander) = attach_recorded(&layer, "bystander");
    let remote = "10.1.0.1:80".parse().unwrap();
    layer.listen(server, remote).unwrap();
    layer.connect(client, 1, remote).unwrap();
    layer.connect_standby(client, 2, remote).unwrap();
    // A refused connect (no listener) and a policy change that reaches everyone.
    assert!(
        layer
            .connect(client, 3, "10.1.0.1:81".parse().unwrap())
            .is_err()
    );
    layer
        .add_rule(None, any_v4(RuleAction::Allow, "allow-all"))
        .unwrap();
    let mut p = Pairer::new(&layer);
    p.pair(&layer, None, None).unwrap();
    // The server goes: the client hears of its sessions' resets through shuntd too.
    layer.detach_worker(server);
    assert!(
        client_link
            .events
            .lock()
            .unwrap()
            .iter()
            .any(|e| matches!(e, Event::Reset { .. }))
    );
    assert_eq!(server_link.grants.load(Ordering::Relaxed), 1);
    assert_eq!(client_link.grants.load(Ordering::Relaxed), 1);
    for link in [&server_link, &client_link, &bystander] {
        assert!(link.flushes.load(Ordering::Relaxed) > 0);
        link.assert_delivered_outside_the_lock();
    }
}

fn capped(caps: Caps) -> Limits {
    Limits {
        per_uid: caps,
        per_namespace: Caps::DEFAULT,
    }
}

fn limit_of(e: SessionError) -> (Resource, Holder) {
    match e {
        SessionError::Limit(l) => (l.resource, l.holder),
        other => panic!("expected a limit, got {other:?}"),
    }
}

#[test]
fn sessions_are_charged_to_the_connecting_user_and_refused_at_its_cap() {
    let layer = layer_with(capped(Caps {
        sessions: 2,
        ..Caps::DEFAULT
    }));
    let server = attach(&layer, "server");
    let attacker = PeerCred {
        uid: 1000,
        ..PeerCred::default()
    };
    let mut ns = Namespace::new("tenant", b"", "10.1.0.9".parse().unwrap()).unwrap();
    ns.access = crate::access::AccessList {
        uids: vec![1000],
        gids: vec![],
    };
    layer.add_namespace(ns, false).unwrap();
    let (hog, _) = attach_as(&layer, "hog", "tenant", attacker).unwrap();
    let remote = "10.1.0.1:80".parse().unwrap();
    layer.listen(server, remote).unwrap();
    let first = layer.connect(hog, 1, remote).unwrap();
    layer.connect(hog, 2, remote).unwrap();
    let refused = layer.connect(hog, 3, remote).unwrap_err();
    assert_eq!(refused.code(), ErrorCode::LimitExceeded);
    assert_eq!(limit_of(refused), (Resource::Sessions, Holder::Uid));
    assert_eq!(
        layer.counters.limit_refusals.lock().unwrap()[&(Resource::Sessions, Holder::Uid)],
        1
    );
    // The server's user pays for none of them: it still connects out.
    let server_client = attach(&layer, "server-client");
    layer.connect(server_client, 4, remote).unwrap();
    layer.connect(server_client, 5, remote).unwrap();
    assert_eq!(layer.usage(1000, "tenant", Resource::Sessions), (2, 2));
    // A close gives the allowance back.
    layer
        .session_closed(hog, first.client_session, false)
        .unwrap();
    layer.connect(hog, 6, remote).unwrap();
    layer.detach_worker(hog);
    assert_eq!(layer.usage(1000, "tenant", Resource::Sessions), (0, 0));
    assert_eq!(layer.usage(1000, "tenant", Resource::Apps), (0, 0));
}

#[test]
fn attaches_listeners_and_segments_have_caps_too() {
    let layer = layer_with(capped(Caps {
        apps: 2,
        listeners: 1,
        // One segment of the test's 4 MiB.
        segment_bytes: 1 << 22,
        ..Caps::DEFAULT
    }));
    let a = attach(&layer, "a");
    let b = attach(&layer, "b");
    assert_eq!(
        limit_of(attach_as(&layer, "c", "default", PeerCred::default()).unwrap_err()),
        (Resource::Apps, Holder::Uid)
    );
    layer.listen(a, "10.1.0.1:80".parse().unwrap()).unwrap();
    // Another worker of the same app joins the listener; a second listener is refused.
    assert_eq!(
        limit_of(layer.listen(b, "10.1.0.1:81".parse().unwrap()).unwrap_err()),
        (Resource::Listeners, Holder::Uid)
    );
    // b -> a makes the one segment allowed; a second pair of workers would need another.
    layer.connect(b, 1, "10.1.0.1:80".parse().unwrap()).unwrap();
    layer.connect(b, 2, "10.1.0.1:80".parse().unwrap()).unwrap();
    let (app, token) = {
        let reg = layer.registry();
        let app = reg.workers[&b].app;
        (app, reg.apps[&app].token)
    };
    let c = layer
        .attach_worker(
            app,
            &token,
            0,
            Arc::new(Recorder::default()),
            &Resume::default(),
        )
        .unwrap()
        .worker;
    assert_eq!(
        limit_of(
            layer
                .connect(c, 3, "10.1.0.1:80".parse().unwrap())
                .unwrap_err()
        ),
        (Resource::SegmentBytes, Holder::Uid)
    );
    // When the segment goes with its worker, its memory is given back.
    layer.detach_worker(b);
    assert_eq!(layer.usage(0, "default", Resource::SegmentBytes), (0, 0));
    layer.connect(c, 4, "10.1.0.1:80".parse().unwrap()).unwrap();
}

#[test]
fn attach_checks_the_callers_user_after_the_secret() {
    let layer = layer();
    let user = |uid, gid| PeerCred { pid: 1, uid, gid };
    // `default` lists nobody: root and shuntd's own user (root here) only.
    attach_as(&layer, "root", "default", user(0, 0)).unwrap();
    let refused = attach_as(&layer, "other", "default", user(1000, 1000)).unwrap_err();
    assert_eq!(refused.code(), ErrorCode::NotPermitted);
    assert_eq!(
        layer.counters.attach_failures.lock().unwrap()["not_permitted"],
        1
    );
    let mut mesh = Namespace::new("mesh", b"s3cret", "10.3.0.1".parse().unwrap()).unwrap();
    mesh.access = crate::access::AccessList {
        uids: vec![1337],
        gids: vec![2000],
    };
    layer.add_namespace(mesh, false).unwrap();
    let attach_mesh = |cred: PeerCred, secret: &[u8]| {
        layer.attach(AttachRequest {
            namespace_id: "mesh".into(),
            namespace_secret: secret.to_vec(),
            app_name: "envoy".into(),
            scope: Scope::Local,
            cred,
            thread: 0,
            link: Arc::new(Recorder::default()),
            resume: Resume::default(),
        })
    };
    attach_mesh(user(1337, 1337), b"s3cret").unwrap();
    attach_mesh(user(4242, 2000), b"s3cret").unwrap();
    // A wrong secret is a wrong secret, for a listed user or not.
    assert_eq!(
        attach_mesh(user(1337, 1337), b"guess").unwrap_err().code(),
        ErrorCode::WrongSecret
    );
    assert_eq!(
        attach_mesh(user(0, 0), b"s3cret").unwrap_err().code(),
        ErrorCode::NotPermitted
    );
}

/// A segment holding one FIFO pair at the offsets `resumed` reports, as apps keep them.
fn resumable_segment(session: &shunt_sapi::message::ResumedSession) -> shunt_shm::Segment {
    let seg = shunt_shm::Segment::create("resume-test", 1 << 22).unwrap();
    for off in [session.rx_offset, session.tx_offset] {
        shunt_shm::init_fifo(seg.region(), off as usize, 4096).unwrap();
    }
    seg
}

fn resumed(is_client: bool, client: &str, server: &str) -> shunt_sapi::message::ResumedSession {
    let area = shunt_sapi::layout::ct_fifo_area() as u32;
    let (to_server, to_client) = (area, area + 8192);
    let (client, server) = (client.parse().unwrap(), server.parse().unwrap());
    shunt_sapi::message::ResumedSession {
        local: if is_client { client } else { server },
        remote: if is_client { server } else { client },
        is_client,
        slot: 0,
        rx_offset: if is_client { to_client } else { to_server },
        tx_offset: if is_client { to_server } else { to_client },
    }
}

#[test]
#[cfg_attr(miri, ignore = "memfd/mmap syscalls")]
fn resumed_sessions_hold_their_tuple_only_once_both_halves_are_reported() {
    let layer = layer();
    let (client, server, forger) = (
        attach(&layer, "client"),
        attach(&layer, "server"),
        attach(&layer, "forger"),
    );
    let client_half = resumed(true, "10.1.0.1:5000", "10.1.0.1:80");
    let seg = resumable_segment(&client_half);
    let fd = || seg.try_clone_fd().unwrap();
    let tuple = FiveTuple {
        proto: TransportProto::CutThrough,
        local: client_half.local,
        remote: client_half.remote,
    };
    let a = layer.resume_sessions(client, fd(), &[client_half])[0]
        .as_ref()
        .copied()
        .unwrap();
    let state_of = |id| layer.registry().sessions[&id].state;
    assert_eq!(state_of(a), SessionState::Unconfirmed);
    assert_eq!(
        layer.registry().table.lookup(&tuple),
        None,
        "holds no tuple yet"
    );
    // A forger's own segment, or the same side again, confirms nothing.
    let forged_seg = resumable_segment(&client_half);
    let server_half = resumed(false, "10.1.0.1:5000", "10.1.0.1:80");
    let forged = layer.resume_sessions(forger, forged_seg.try_clone_fd().unwrap(), &[server_half]);
    assert_eq!(
        state_of(*forged[0].as_ref().unwrap()),
        SessionState::Unconfirmed
    );
    let dup = layer.resume_sessions(forger, fd(), &[client_half]);
    assert_eq!(dup[0].as_ref().unwrap_err().code(), ErrorCode::AddressInUse);
    // Another namespace's address is not the client's to claim.
    let elsewhere = resumed(true, "10.2.0.1:5000", "10.1.0.1:80");
    let refused = layer.resume_sessions(client, fd(), &[elsewhere]);
    assert_eq!(
        refused[0].as_ref().unwrap_err().code(),
        ErrorCode::NotPermitted
    );
    // The real peer's half confirms both.
    let b = layer.resume_sessions(server, fd(), &[server_half])[0]
        .as_ref()
        .copied()
        .unwrap();
    assert_eq!(
        (state_of(a), state_of(b)),
        (SessionState::Resumed, SessionState::Resumed)
    );
    assert_eq!(layer.registry().table.lookup(&tuple), Some(a));
    assert_eq!(
        layer
            .counters
            .resume_refusals
            .lock()
            .unwrap()
            .values()
            .sum::<u64>(),
        2
    );
    // Closing gives back the charge, the tuple and the waiting forgery alike.
    layer.session_closed(client, a, false).unwrap();
    assert_eq!(layer.registry().table.lookup(&tuple), None);
    layer.detach_worker(forger);
    assert!(layer.registry().resume_halves.is_empty());
}
