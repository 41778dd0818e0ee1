//! Envoy only warns when a module's ABI version differs and never checks signatures, so drift
//! would load silently and misbehave. This compares what `libshunt_envoy.so` imports and
//! exports with the symbols of the pinned Envoy binary, and checks that Envoy loads the module
//! from the example bootstraps and rejects a bad module config with the field named.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn symbols(file: &Path, which: &str) -> BTreeSet<String> {
    let out = Command::new("nm")
        .args(["-D", which])
        .arg(file)
        .output()
        .expect("run nm (binutils)");
    assert!(out.status.success(), "nm failed on {}", file.display());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter(|s| s.starts_with("envoy_dynamic_module_"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_callback_the_module_imports_is_exported_by_the_pinned_envoy() {
    let module = common::module_dir().join("libshunt_envoy.so");
    let envoy = common::envoy_binary();
    let imported = symbols(&module, "--undefined-only");
    let exported = symbols(&envoy, "--defined-only");
    assert!(
        imported.len() >= 10,
        "suspiciously few imports: {imported:?}"
    );
    let missing: Vec<_> = imported.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the pinned Envoy does not export: {missing:?}"
    );
}

#[test]
fn the_module_exports_every_transport_socket_and_network_filter_hook() {
    let module = common::module_dir().join("libshunt_envoy.so");
    let exported = symbols(&module, "--defined-only");
    let hooks = [
        "factory_config_new",
        "factory_config_destroy",
        "new",
        "destroy",
        "set_callbacks",
        "on_connected",
        "do_read",
        "do_write",
        "close",
        "get_protocol",
        "get_failure_reason",
        "can_flush_close",
        "start_secure_transport",
    ];
    let mut expected: BTreeSet<String> = hooks
        .iter()
        .map(|h| format!("envoy_dynamic_module_on_transport_socket_{h}"))
        .collect();
    expected.insert("envoy_dynamic_module_on_program_init".into());
    // The companion filter's hooks: exactly those of a network-filter module statically linked
    // into the pinned Envoy (its symbols carry a `<module>_static_` prefix).
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(common::envoy_binary())
        .output()
        .expect("run nm (binutils)");
    const HOOK: &str = "envoy_dynamic_module_on_network_filter_";
    let network_filter_hooks: BTreeSet<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| Some(&l[l.find(HOOK)?..]))
        .map(str::to_owned)
        .collect();
    assert!(network_filter_hooks.len() >= 8, "{network_filter_hooks:?}");
    expected.extend(network_filter_hooks);
    assert_eq!(exported, expected);
}

#[test]
fn the_example_sidecars_load_the_module_and_validate() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/envoy");
    // The mutual-TLS examples read certificates from `certs/` under Envoy's working directory,
    // as `shunt dev-certs certs` writes them.
    let cwd = tempfile::tempdir().unwrap();
    let ca = shunt_tls::dev_pki::DevCa::new("dev mesh CA").unwrap();
    for side in ["client", "server"] {
        let id = format!("spiffe://cluster.local/ns/default/sa/{side}");
        ca.write_workload(&id, &cwd.path().join("certs").join(side))
            .unwrap();
    }
    for name in [
        "client-sidecar.yaml",
        "server-sidecar.yaml",
        "client-sidecar-mtls.yaml",
        "server-sidecar-mtls.yaml",
    ] {
        let out = Command::new(common::envoy_binary())
            .args(["--mode", "validate", "--disable-hot-restart", "-c"])
            .arg(examples.join(name))
            .current_dir(cwd.path())
            .env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", common::module_dir())
            .output()
            .expect("run envoy --mode validate");
        assert!(
            out.status.success(),
            "{name} does not validate:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_bad_module_config_fails_envoys_config_load_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = common::tcp_sidecar(
        common::free_port(),
        "",
        common::free_port(),
        &common::module_socket("pairing_timeout_ms: 0\n"),
    );
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, bootstrap).unwrap();
    let out = Command::new(common::envoy_binary())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(&path)
        .env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", common::module_dir())
        .output()
        .expect("run envoy --mode validate");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "a bad config validated:\n{log}");
    assert!(
        log.contains("pairing_timeout_ms"),
        "no field name in:\n{log}"
    );
}

/// Every module config embedded in `examples/istio` (EnvoyFilter patches, and the bootstrap
/// override's JSON) parses; Istio itself is not here to load them.
#[test]
fn the_istio_examples_carry_valid_module_configs() {
    fn module_configs(v: &serde_yaml_ng::Value, found: &mut Vec<String>) {
        use serde_yaml_ng::Value;
        match v {
            Value::Mapping(m) => {
                for (k, v) in m {
                    if k.as_str() == Some("transport_socket_config")
                        && let Some(value) = v.get("value").and_then(Value::as_str)
                    {
                        found.push(value.to_owned());
                    }
                    if k.as_str() == Some("custom_bootstrap.json") {
                        let json: Value = serde_yaml_ng::from_str(v.as_str().unwrap()).unwrap();
                        module_configs(&json, found);
                    }
                    module_configs(v, found);
                }
            }
            Value::Sequence(s) => s.iter().for_each(|v| module_configs(v, found)),
            _ => {}
        }
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/istio");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            for doc in serde_yaml_ng::Deserializer::from_str(&text) {
                let v: serde_yaml_ng::Value = serde::Deserialize::deserialize(doc)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                module_configs(&v, &mut found);
            }
        }
    }
    assert_eq!(found.len(), 3, "module configs in examples/istio");
    for config in found {
        let parsed = shunt_envoy::config::SocketConfig::parse(b"shunt", config.as_bytes());
        let tls = parsed.unwrap_or_else(|e| panic!("{e}\n{config}")).tls;
        assert!(tls.is_some(), "the Istio examples run in mutual-TLS mode");
    }
}
