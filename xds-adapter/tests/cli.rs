//! The `shunt-xds` command line: `translate` on files and standard input, and its errors.

use std::io::Write;
use std::process::{Command, Stdio};

fn shunt_xds(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shunt-xds"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run shunt-xds");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn translate_prints_the_tables_as_json() {
    let dump = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/envoy-1.40/delta-configdump.json"
    );
    let (ok, stdout, stderr) = shunt_xds(&["translate", dump], None);
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON on stdout");
    assert_eq!(report["source"], "xds/echo-1.default");
    assert_eq!(report["services"].as_array().unwrap().len(), 3);
    assert_eq!(report["rules"].as_array().unwrap().len(), 3);
    assert_eq!(report["certificates"][0]["redacted"], true);
    assert!(
        report["certificates"][0].get("private_key").is_none(),
        "material never printed"
    );
    assert!(report["findings"].is_array());
}

#[test]
fn translate_reads_yaml_from_standard_input() {
    let yaml = "configs:\n- '@type': type.googleapis.com/envoy.admin.v3.ClustersConfigDump\n  static_clusters:\n  - cluster:\n      '@type': type.googleapis.com/envoy.config.cluster.v3.Cluster\n      name: outbound|80||web.shop.svc.cluster.local\n      type: STATIC\n      load_assignment:\n        cluster_name: outbound|80||web.shop.svc.cluster.local\n        endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 10.1.0.4, port_value: 8080}}}}]}]\n";
    let (ok, stdout, stderr) = shunt_xds(&["translate", "-"], Some(yaml));
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let service = &report["services"][0];
    assert_eq!(service["host"], "web.shop.svc.cluster.local");
    assert_eq!(service["endpoints"][0]["address"], "10.1.0.4:8080");
}

#[test]
fn bad_input_is_a_clear_error() {
    let (ok, stdout, stderr) = shunt_xds(&["translate", "-"], Some("{\"configs\": 7}"));
    assert!(!ok);
    assert!(stdout.is_empty());
    assert!(stderr.contains("ConfigDump schema"), "{stderr}");

    let (ok, _, stderr) = shunt_xds(&["translate", "/nonexistent/dump.json"], None);
    assert!(!ok);
    assert!(
        stderr.contains("reading /nonexistent/dump.json"),
        "{stderr}"
    );

    let (ok, _, stderr) = shunt_xds(
        &["run", "--xds-address", "ftp://x", "--node-id", "a~b"],
        None,
    );
    assert!(!ok);
    assert!(
        stderr.contains("neither unix:PATH nor an http(s):// URI"),
        "{stderr}"
    );
}
