//! The layer's rules decisions with real workers (their events recorded instead of sent):
//! identities at pairing, connects without identities, and replacing a source's rules.

use std::sync::Arc;
use std::sync::Mutex as StdMutex;

use shunt_sapi::message::{PAIR_TOKEN_LEN, PairRole};

use super::*;
use crate::app::SegmentGrant;
use crate::identity_match::IdentityMatch;
use crate::rules::{PortRange, parse_prefix};

const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";
const RESPONDER: &str = "10.1.0.2:15006";

/// Keeps what the layer tells a worker.
#[derive(Default)]
struct Recorder {
    events: StdMutex<Vec<Event>>,
    /// Whether each event would have rung the doorbell.
    loud: StdMutex<Vec<bool>>,
}

impl WorkerLink for Recorder {
    fn grant_segment(&self, _: SegmentGrant) -> Result<(), LinkError> {
        Ok(())
    }
    fn post(&self, event: &Event) -> Result<(), LinkError> {
        self.events.lock().unwrap().push(*event);
        self.loud.lock().unwrap().push(true);
        Ok(())
    }
    fn post_quietly(&self, event: &Event) -> Result<(), LinkError> {
        self.events.lock().unwrap().push(*event);
        self.loud.lock().unwrap().push(false);
        Ok(())
    }
    fn has_room(&self, _: usize) -> bool {
        true
    }
}

fn layer() -> SessionLayer {
    let layer = SessionLayer::new(SessionLayerConfig {
        cut_through: CutThroughConfig {
            fifo_size: 4096,
            segment_size: 1 << 22,
        },
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
    layer
}

fn attach(layer: &SessionLayer, name: &str) -> WorkerId {
    attach_recorded(layer, name).0
}

/// Attaches a worker whose events stay readable.
fn attach_recorded(layer: &SessionLayer, name: &str) -> (WorkerId, Arc<Recorder>) {
    let doorbell = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
    let recorder = Arc::new(Recorder::default());
    let worker = layer
        .attach(AttachRequest {
            namespace_id: "default".into(),
            namespace_secret: Vec::new(),
            app_name: name.into(),
            scope: Scope::Global,
            cred: PeerCred::default(),
            thread: 0,
            link: recorder.clone(),
            doorbell,
            resume: Resume::default(),
        })
        .unwrap()
        .worker;
    (worker, recorder)
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
    fn new(layer: &SessionLayer) -> Pairer {
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
    let layer = Arc::new(layer());
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
