//! The `shunt` binary against a real shuntd (run in-process on temporary sockets).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use shunt_client::{AttachOptions, Worker};

struct Daemon {
    dir: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let mut config = shuntd::config::Config::private(dir.path());
        config.metrics_address = String::new();
        shuntd::background::spawn(config).expect("shuntd starts");
        Daemon { dir }
    }

    fn app_socket(&self) -> PathBuf {
        self.dir.path().join("shuntd.sock")
    }

    fn shunt(&self, args: &[&str]) -> Output {
        shunt_at(&self.dir.path().join("control.sock"), args)
    }

    /// Runs `shunt`, asserts success and returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.shunt(args);
        assert!(
            out.status.success(),
            "shunt {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `shunt`, asserts failure and returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.shunt(args);
        assert!(!out.status.success(), "shunt {args:?} should fail");
        String::from_utf8(out.stderr).unwrap()
    }
}

fn shunt_at(control_socket: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shunt"))
        .arg("--control-socket")
        .arg(control_socket)
        .args(args)
        .output()
        .expect("run shunt")
}

#[test]
fn namespaces_can_be_added_listed_and_deleted() {
    let d = Daemon::start();
    let secret = d.dir.path().join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    d.ok(&[
        "namespaces",
        "add",
        "shop.cart",
        "--address",
        "10.1.0.7",
        "--secret-file",
        secret.to_str().unwrap(),
    ]);
    let list = d.ok(&["namespaces", "list"]);
    assert!(
        list.contains("shop.cart") && list.contains("10.1.0.7"),
        "{list}"
    );
    assert!(!list.contains("s3cret"), "secrets must never be listed");

    // The secret is the file's content without the newline.
    let attach = |secret: &[u8]| {
        Worker::attach(AttachOptions::new(d.app_socket()).namespace("shop.cart", secret))
    };
    assert!(attach(b"s3cret").is_ok());
    assert!(attach(b"s3cret\n").is_err());

    let err = d.fails(&["namespaces", "add", "shop.cart", "--address", "10.1.0.8"]);
    assert!(err.contains("shop.cart"), "{err}");
    d.ok(&["namespaces", "del", "shop.cart"]);
    assert!(!d.ok(&["namespaces", "list"]).contains("shop.cart"));
}

#[test]
fn rules_round_trip_through_the_control_api() {
    let d = Daemon::start();
    d.ok(&[
        "rules",
        "add",
        "--scope",
        "global",
        "--tag",
        "no-db",
        "--action",
        "deny",
        "--local",
        "127.0.0.0/8",
        "--local-ports",
        "5432",
    ]);
    d.ok(&[
        "rules",
        "add",
        "--scope",
        "local",
        "--namespace",
        "default",
        "--tag",
        "to-proxy",
        "--action",
        "redirect",
        "--redirect-to",
        "127.0.0.1:15001",
        "--remote",
        "10.0.0.0/8",
        "--remote-ports",
        "80-90",
    ]);
    let list = d.ok(&["rules", "list"]);
    let row = |tag: &str| {
        list.lines()
            .find(|l| l.contains(tag))
            .unwrap_or_else(|| panic!("{tag} missing from\n{list}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert!(
        row("no-db").starts_with("global no-db deny 127.0.0.0/8 5432"),
        "{list}"
    );
    assert!(
        row("to-proxy").starts_with("local:default to-proxy redirect:127.0.0.1:15001"),
        "{list}"
    );
    assert!(
        row("to-proxy").ends_with("10.0.0.0/8 80-90 0 * -"),
        "priority 0, any peer, written by hand: {list}"
    );

    // The deny rule is enforced: a connect to 127.0.0.1:5432 is refused.
    let server = Worker::attach(AttachOptions::new(d.app_socket())).unwrap();
    let _listener = server.listen("127.0.0.1:5432".parse().unwrap()).unwrap();
    let client = Worker::attach(AttachOptions::new(d.app_socket())).unwrap();
    assert!(client.connect("127.0.0.1:5432".parse().unwrap()).is_err());
    d.ok(&["rules", "del", "--scope", "global", "no-db"]);
    assert!(client.connect("127.0.0.1:5432".parse().unwrap()).is_ok());

    let list = d.ok(&["rules", "list", "--scope", "global"]);
    assert!(!list.contains("no-db"), "{list}");
}

#[test]
fn rules_name_principals_and_priorities() {
    let d = Daemon::start();
    let id = "spiffe://cluster.local/ns/default/sa/client";
    d.ok(&[
        "rules",
        "add",
        "--scope",
        "global",
        "--tag",
        "no-client",
        "--action",
        "deny",
        "--principal",
        id,
        "--priority",
        "5",
    ]);
    d.ok(&[
        "rules",
        "add",
        "--scope",
        "local",
        "--namespace",
        "default",
        "--tag",
        "ns-only",
        "--action",
        "allow",
        "--principal",
        "prefix:spiffe://cluster.local/ns/default/",
    ]);
    let list = d.ok(&["rules", "list"]);
    let row = |tag: &str| {
        list.lines()
            .find(|l| l.contains(tag))
            .unwrap_or_else(|| panic!("{tag} missing from\n{list}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert!(list.starts_with("TABLE"), "{list}");
    for column in ["PRIO", "PRINCIPAL", "SOURCE"] {
        assert!(list.lines().next().unwrap().contains(column), "{list}");
    }
    assert!(
        row("no-client").ends_with(&format!("5 exact:{id} -")),
        "{list}"
    );
    assert!(
        row("ns-only").ends_with("0 prefix:spiffe://cluster.local/ns/default/ -"),
        "{list}"
    );
    // A principal rule never matches an ordinary connect, which carries no identity.
    let server = Worker::attach(AttachOptions::new(d.app_socket())).unwrap();
    let _listener = server.listen("127.0.0.1:7600".parse().unwrap()).unwrap();
    let client = Worker::attach(AttachOptions::new(d.app_socket())).unwrap();
    assert!(client.connect("127.0.0.1:7600".parse().unwrap()).is_ok());

    let err = d.fails(&[
        "rules",
        "add",
        "--scope",
        "global",
        "--tag",
        "x",
        "--action",
        "deny",
        "--principal",
        "suffix:",
    ]);
    assert!(err.contains("--principal"), "{err}");
    let err = d.fails(&[
        "rules",
        "add",
        "--scope",
        "global",
        "--tag",
        "x",
        "--action",
        "deny",
        "--principal",
        "exact:spiffe://a/\u{7f}",
    ]);
    assert!(err.contains("principal"), "{err}");
    let err = d.fails(&[
        "rules",
        "add",
        "--scope",
        "global",
        "--tag",
        "x",
        "--action",
        "deny",
        "--priority",
        "high",
    ]);
    assert!(err.contains("--priority"), "{err}");
}

#[test]
fn services_list_what_config_sources_replaced() {
    use shunt_proto::control as pb;
    let d = Daemon::start();
    assert_eq!(
        d.ok(&["services"]),
        "SOURCE  CLUSTER  ENDPOINTS  TLS  IDENTITIES\n"
    );
    let exact = |id: &str| pb::IdentityMatch {
        kind: Some(pb::identity_match::Kind::Exact(id.into())),
    };
    let endpoint = |address: &str| pb::ServiceEndpoint {
        address: address.into(),
        ..Default::default()
    };
    let reviews = pb::Service {
        cluster: "outbound|9080||reviews.default.svc.cluster.local".into(),
        endpoints: vec![endpoint("10.1.0.1:9080"), endpoint("10.1.0.2:9080")],
        expected_identities: vec![
            exact("spiffe://cluster.local/ns/default/sa/reviews"),
            pb::IdentityMatch {
                kind: Some(pb::identity_match::Kind::Prefix(
                    "spiffe://cluster.local/ns/prod/".into(),
                )),
            },
        ],
        tls_mode: pb::TlsMode::Istio as i32,
        ..Default::default()
    };
    let legacy = pb::Service {
        cluster: "legacy".into(),
        endpoints: vec![endpoint("unix:/run/legacy.sock")],
        tls_mode: pb::TlsMode::Disabled as i32,
        ..Default::default()
    };
    let control = d.dir.path().join("control.sock");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = shunt_proto::control_client(&control).await.unwrap();
        for (source, services) in [("xds/b", vec![reviews]), ("xds/a", vec![legacy])] {
            c.replace_services(pb::ReplaceServicesRequest {
                source: source.into(),
                services,
            })
            .await
            .unwrap();
        }
    });
    let list = d.ok(&["services"]);
    let rows: Vec<String> = list
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        rows,
        [
            "SOURCE CLUSTER ENDPOINTS TLS IDENTITIES",
            "xds/a legacy 1 disabled -",
            "xds/b outbound|9080||reviews.default.svc.cluster.local 2 istio \
             exact:spiffe://cluster.local/ns/default/sa/reviews,prefix:spiffe://cluster.local/ns/prod/",
        ],
        "{list}"
    );
    let only_b = d.ok(&["services", "--source", "xds/b"]);
    assert!(
        !only_b.contains("legacy") && only_b.contains("reviews"),
        "{only_b}"
    );
    let help = String::from_utf8(
        shunt_at(&d.dir.path().join("control.sock"), &["services", "--help"]).stdout,
    )
    .unwrap();
    assert!(
        help.contains("--source") && help.contains("identities"),
        "{help}"
    );
}

#[test]
fn bad_input_names_the_problem() {
    let d = Daemon::start();
    let err = d.fails(&[
        "rules",
        "add",
        "--scope",
        "global",
        "--tag",
        "x",
        "--action",
        "allow",
        "--local",
        "10.0.0.300/8",
    ]);
    assert!(err.contains("local"), "{err}");
    let err = d.fails(&[
        "rules",
        "add",
        "--scope",
        "global",
        "--tag",
        "x",
        "--action",
        "allow",
        "--remote-ports",
        "9-1",
    ]);
    assert!(err.contains("--remote-ports"), "{err}");
    let err = d.fails(&[
        "rules", "add", "--scope", "local", "--tag", "x", "--action", "deny",
    ]);
    assert!(err.contains("--namespace"), "{err}");
    let err = d.fails(&["rules", "del", "--scope", "global", "never-added"]);
    assert!(err.contains("never-added"), "{err}");
}

#[test]
fn sessions_apps_and_stats_show_live_state() {
    let d = Daemon::start();
    let server = Worker::attach(AttachOptions::new(d.app_socket()).app_name("echo")).unwrap();
    let listener = server.listen("127.0.0.1:7400".parse().unwrap()).unwrap();
    let client = Worker::attach(AttachOptions::new(d.app_socket()).app_name("caller")).unwrap();
    let mut c = client.connect("127.0.0.1:7400".parse().unwrap()).unwrap();
    let _s = listener.accept().unwrap();
    std::io::Write::write_all(&mut c, &[1u8; 1000]).unwrap();

    let sessions = d.ok(&["sessions"]);
    let caller = sessions
        .lines()
        .find(|l| l.contains("caller"))
        .unwrap_or_else(|| panic!("{sessions}"));
    assert!(
        caller.contains("cut-through") && caller.contains("127.0.0.1:7400"),
        "{sessions}"
    );
    assert!(
        caller.split_whitespace().any(|w| w == "1000"),
        "tx bytes: {sessions}"
    );

    let apps = d.ok(&["apps"]);
    assert!(
        apps.contains("echo") && apps.contains("127.0.0.1:7400"),
        "{apps}"
    );
    assert!(
        apps.contains(&std::process::id().to_string()),
        "peer pid: {apps}"
    );

    let stats = d.ok(&["stats"]);
    let value = |name: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in {stats}"))
    };
    assert_eq!(value("attached_apps"), 2);
    assert_eq!(value("sessions"), 2, "one session per side");
    assert!(value("cut_through_bytes") >= 1000);
}

#[test]
fn unreachable_shuntd_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = shunt_at(&dir.path().join("absent.sock"), &["stats"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is shuntd running"), "{err}");
}

#[test]
fn help_lists_every_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_shunt"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for cmd in [
        "sessions",
        "apps",
        "stats",
        "namespaces",
        "rules",
        "services",
        "certs",
    ] {
        assert!(help.contains(cmd), "{cmd} missing from --help:\n{help}");
    }
}

#[test]
fn certificates_are_checked_stored_for_their_namespace_only_and_deleted() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    d.ok(&["dev-certs", dir.path().to_str().unwrap()]);
    let files = dir.path().join("server");
    let file = |name: &str| files.join(name).to_str().unwrap().to_owned();
    let put = |name: &str, key: &str| {
        d.shunt(&[
            "certs",
            "put",
            name,
            "--namespace",
            "default",
            "--cert-chain",
            &file("cert-chain.pem"),
            "--private-key",
            key,
            "--trust-bundle",
            &file("root-cert.pem"),
        ])
    };
    let out = put("mesh", &file("key.pem"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("spiffe://cluster.local/ns/default/sa/server")
    );
    // A key that does not belong to the chain is refused, with the reason.
    let wrong_key = dir.path().join("client").join("key.pem");
    let out = put("other", wrong_key.to_str().unwrap());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("certificate"));
    assert!(d.ok(&["certs", "list"]).contains("mesh"));

    // An app of the namespace fetches it; the material never shows in the listing.
    let app = Worker::attach(AttachOptions::new(d.app_socket()).namespace("default", b"")).unwrap();
    let cert = app.certificate("mesh").unwrap();
    assert_eq!(
        cert.private_key,
        std::fs::read_to_string(files.join("key.pem")).unwrap()
    );
    assert!(!d.ok(&["certs", "list"]).contains("PRIVATE KEY"));
    assert!(app.certificate("absent").is_err());

    d.ok(&["certs", "delete", "mesh", "--namespace", "default"]);
    assert!(app.certificate("mesh").is_err());
    assert!(
        d.fails(&["certs", "delete", "mesh", "--namespace", "default"])
            .contains("mesh")
    );
}
