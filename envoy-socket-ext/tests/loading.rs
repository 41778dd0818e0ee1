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
fn the_module_exports_every_transport_socket_hook() {
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
    assert_eq!(exported, expected);
}

#[test]
fn the_example_sidecars_load_the_module_and_validate() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/envoy");
    for name in ["client-sidecar.yaml", "server-sidecar.yaml"] {
        let out = Command::new(common::envoy_binary())
            .args(["--mode", "validate", "--disable-hot-restart", "-c"])
            .arg(examples.join(name))
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
