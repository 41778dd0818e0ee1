//! The control API of a real shuntd over its Unix socket: a config source replaces its rules
//! and its services whole, rules written by hand stay, and bad requests name the field and
//! change nothing.

mod common;

use common::{Daemon, control_client};
use shunt_proto::control as pb;
use shunt_proto::control::control_client::ControlClient;
use tonic::Code;
use tonic::transport::Channel;

const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";

fn rule(scope: pb::RuleScope, namespace: &str, tag: &str, action: pb::RuleAction) -> pb::Rule {
    pb::Rule {
        scope: scope as i32,
        namespace: namespace.into(),
        action: action as i32,
        tag: tag.into(),
        ..Default::default()
    }
}

fn exact(id: &str) -> pb::IdentityMatch {
    pb::IdentityMatch {
        kind: Some(pb::identity_match::Kind::Exact(id.into())),
    }
}

async fn rules(c: &mut ControlClient<Channel>, namespace: &str) -> Vec<pb::Rule> {
    let scope = if namespace.is_empty() {
        pb::RuleScope::Global
    } else {
        pb::RuleScope::Local
    };
    c.list_rules(pb::ListRulesRequest {
        scope: scope as i32,
        namespace: namespace.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .rules
}

async fn tags(c: &mut ControlClient<Channel>) -> Vec<Vec<String>> {
    let mut all = Vec::new();
    for ns in ["", "default", "blue"] {
        all.push(rules(c, ns).await.into_iter().map(|r| r.tag).collect());
    }
    all
}

async fn replace(
    c: &mut ControlClient<Channel>,
    source: &str,
    rules: Vec<pb::Rule>,
) -> Result<pb::ReplaceRulesResponse, tonic::Status> {
    c.replace_rules(pb::ReplaceRulesRequest {
        source: source.into(),
        rules,
    })
    .await
    .map(|r| r.into_inner())
}

fn refused(r: Result<impl std::fmt::Debug, tonic::Status>, code: Code, starts: &str) {
    let status = r.unwrap_err();
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().starts_with(starts),
        "`{}` should start with `{starts}`",
        status.message()
    );
}

#[tokio::test]
async fn replace_rules_swaps_one_sources_rules_and_list_rules_shows_them() {
    let d = Daemon::start("");
    let mut c = control_client(&d.control_socket()).await;
    c.add_namespace(pb::AddNamespaceRequest {
        namespace: Some(pb::Namespace {
            id: "blue".into(),
            secret: Vec::new(),
            address: "10.2.0.1".into(),
            ..Default::default()
        }),
        replace: false,
    })
    .await
    .unwrap();
    let mut manual = rule(pb::RuleScope::Global, "", "manual", pb::RuleAction::Deny);
    manual.local_ports = Some(pb::PortRange {
        first: 5432,
        last: 5432,
    });
    c.add_rule(pb::AddRuleRequest { rule: Some(manual) })
        .await
        .unwrap();

    // The source's rules need not repeat the source: they get the request's.
    let mut deny_client = rule(
        pb::RuleScope::Global,
        "",
        "xds/deny-client",
        pb::RuleAction::Deny,
    );
    deny_client.principal = Some(exact(CLIENT));
    deny_client.priority = 1;
    let mut egress = rule(
        pb::RuleScope::Local,
        "default",
        "xds/egress",
        pb::RuleAction::Allow,
    );
    egress.remote_prefix = "10.0.0.0/8".into();
    egress.source = "xds/a".into();
    let done = replace(&mut c, "xds/a", vec![deny_client, egress])
        .await
        .unwrap();
    assert_eq!((done.added, done.removed), (2, 0));

    let global = rules(&mut c, "").await;
    assert_eq!(global.len(), 2);
    let first = &global[0];
    assert_eq!(
        first.tag, "xds/deny-client",
        "priority 1 is looked at first"
    );
    assert_eq!(first.principal, Some(exact(CLIENT)));
    assert_eq!((first.priority, first.source.as_str()), (1, "xds/a"));
    assert_eq!(global[1].tag, "manual");
    assert_eq!(global[1].principal, None);
    assert_eq!((global[1].priority, global[1].source.as_str()), (0, ""));
    let local = rules(&mut c, "default").await;
    assert_eq!(local.len(), 1);
    assert_eq!(
        (
            local[0].tag.as_str(),
            local[0].source.as_str(),
            local[0].remote_prefix.as_str()
        ),
        ("xds/egress", "xds/a", "10.0.0.0/8")
    );

    // A hand-written rule cannot take over the source's tag.
    refused(
        c.add_rule(pb::AddRuleRequest {
            rule: Some(rule(
                pb::RuleScope::Global,
                "",
                "xds/deny-client",
                pb::RuleAction::Allow,
            )),
        })
        .await,
        Code::FailedPrecondition,
        "tag `xds/deny-client` belongs to source `xds/a`",
    );

    // Refused replacements name the field and change nothing.
    let before = tags(&mut c).await;
    let good = || rule(pb::RuleScope::Global, "", "xds/new", pb::RuleAction::Allow);
    let mut bad_prefix = rule(pb::RuleScope::Global, "", "xds/bad", pb::RuleAction::Deny);
    bad_prefix.remote_prefix = "10.0.0.300/8".into();
    refused(
        replace(&mut c, "xds/a", vec![good(), bad_prefix]).await,
        Code::InvalidArgument,
        "rules[1].remote: ",
    );
    refused(
        replace(
            &mut c,
            "xds/a",
            vec![
                good(),
                rule(pb::RuleScope::Local, "nowhere", "x", pb::RuleAction::Deny),
            ],
        )
        .await,
        Code::InvalidArgument,
        "rules: unknown namespace `nowhere`",
    );
    refused(
        replace(
            &mut c,
            "xds/a",
            vec![
                good(),
                rule(pb::RuleScope::Local, "", "x", pb::RuleAction::Deny),
            ],
        )
        .await,
        Code::InvalidArgument,
        "rules[1].namespace: ",
    );
    refused(
        replace(
            &mut c,
            "xds/a",
            vec![
                good(),
                rule(pb::RuleScope::Global, "", "manual", pb::RuleAction::Deny),
            ],
        )
        .await,
        Code::InvalidArgument,
        "rules: global rules: tag `manual` belongs to a rule written by hand",
    );
    let mut other_source = good();
    other_source.source = "xds/b".into();
    refused(
        replace(&mut c, "xds/a", vec![other_source]).await,
        Code::InvalidArgument,
        "rules[0].source: ",
    );
    let mut bad_principal = good();
    bad_principal.principal = Some(pb::IdentityMatch { kind: None });
    refused(
        replace(&mut c, "xds/a", vec![bad_principal]).await,
        Code::InvalidArgument,
        "rules[0].principal: ",
    );
    refused(
        replace(&mut c, "", Vec::new()).await,
        Code::InvalidArgument,
        "source: ",
    );
    assert_eq!(tags(&mut c).await, before);

    // The new set replaces the old one in every table.
    let done = replace(&mut c, "xds/a", vec![good()]).await.unwrap();
    assert_eq!((done.added, done.removed), (1, 2));
    assert_eq!(
        tags(&mut c).await,
        [vec!["manual", "xds/new"], vec![], vec![]]
    );
    let done = replace(&mut c, "xds/a", Vec::new()).await.unwrap();
    assert_eq!((done.added, done.removed), (0, 1));
    assert_eq!(tags(&mut c).await, [vec!["manual"], vec![], vec![]]);
}

fn service(cluster: &str, addresses: &[&str]) -> pb::Service {
    pb::Service {
        cluster: cluster.into(),
        direction: "outbound".into(),
        host: "reviews.default.svc.cluster.local".into(),
        port: 9080,
        subset: String::new(),
        endpoints: addresses
            .iter()
            .map(|a| pb::ServiceEndpoint {
                address: (*a).into(),
                workload: "reviews-v1;default;reviews;v1;Kubernetes".into(),
                tls_mode: pb::TlsMode::Istio as i32,
                locality: "eu/west-1a/".into(),
            })
            .collect(),
        expected_identities: vec![exact("spiffe://cluster.local/ns/default/sa/reviews")],
        tls_mode: pb::TlsMode::Istio as i32,
    }
}

async fn services(c: &mut ControlClient<Channel>) -> Vec<pb::SourcedService> {
    c.list_services(pb::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner()
        .services
}

async fn replace_services(
    c: &mut ControlClient<Channel>,
    source: &str,
    services: Vec<pb::Service>,
) -> Result<u32, tonic::Status> {
    c.replace_services(pb::ReplaceServicesRequest {
        source: source.into(),
        services,
    })
    .await
    .map(|r| r.into_inner().services)
}

#[tokio::test]
async fn replace_services_swaps_a_sources_list_and_list_services_sorts_them() {
    let d = Daemon::start("");
    let mut c = control_client(&d.control_socket()).await;
    assert!(services(&mut c).await.is_empty());
    let z = service("outbound|9080||z", &["10.1.0.1:9080", "unix:/run/z.sock"]);
    let a = service("outbound|9080||a", &["[fd00::1]:9080"]);
    assert_eq!(
        replace_services(&mut c, "xds/b", vec![z.clone(), a.clone()])
            .await
            .unwrap(),
        2
    );
    let inbound = service("inbound|9080||", &[]);
    replace_services(&mut c, "xds/a", vec![inbound.clone()])
        .await
        .unwrap();
    let sourced = |source: &str, s: &pb::Service| pb::SourcedService {
        source: source.into(),
        service: Some(s.clone()),
    };
    let all = vec![
        sourced("xds/a", &inbound),
        sourced("xds/b", &a),
        sourced("xds/b", &z),
    ];
    assert_eq!(services(&mut c).await, all);

    let mut bad = service("outbound|1||bad", &["10.1.0.1:1"]);
    bad.endpoints[0].address = "reviews:9080".into();
    refused(
        replace_services(&mut c, "xds/b", vec![a.clone(), bad]).await,
        Code::InvalidArgument,
        "services[1].endpoints[0].address `reviews:9080`",
    );
    refused(
        replace_services(&mut c, "xds/b", vec![a.clone(), a.clone()]).await,
        Code::InvalidArgument,
        "services[1].cluster: ",
    );
    refused(
        replace_services(&mut c, "xds/b", vec![service("", &[])]).await,
        Code::InvalidArgument,
        "services[0].cluster: ",
    );
    refused(
        replace_services(&mut c, "", Vec::new()).await,
        Code::InvalidArgument,
        "source: ",
    );
    assert_eq!(services(&mut c).await, all);

    assert_eq!(
        replace_services(&mut c, "xds/b", Vec::new()).await.unwrap(),
        0
    );
    assert_eq!(services(&mut c).await, vec![sourced("xds/a", &inbound)]);
}

#[tokio::test]
async fn only_the_listed_users_may_call_the_control_api() {
    let me = rustix::process::getuid().as_raw();
    let stranger = me.wrapping_add(4242);

    let mode = |d: &Daemon| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(d.control_socket())
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    // By default only root and shuntd's own user may call, and the socket file says so too.
    let d = Daemon::start("");
    assert_eq!(mode(&d), 0o600);
    drop(d);

    // A list without this test's user: every call is refused, with the reason. The file is
    // open to all, since the credentials check decides.
    let d = Daemon::start(&format!("control_clients: {{uids: [{stranger}]}}\n"));
    assert_eq!(mode(&d), 0o666);
    let mut c = control_client(&d.control_socket()).await;
    let refused = c
        .list_rules(pb::ListRulesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains(&format!("uid {me} ")),
        "{}",
        refused.message()
    );
    let add = c
        .add_rule(pb::AddRuleRequest {
            rule: Some(rule(
                pb::RuleScope::Global,
                "",
                "sneaky",
                pb::RuleAction::Allow,
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(add.code(), Code::PermissionDenied);
    drop(d);

    // Listed, the same user gets in.
    let d = Daemon::start(&format!("control_clients: {{uids: [{stranger}, {me}]}}\n"));
    let mut c = control_client(&d.control_socket()).await;
    c.list_rules(pb::ListRulesRequest {
        scope: pb::RuleScope::Global as i32,
        ..Default::default()
    })
    .await
    .unwrap();
}
