//! Envoy only warns when a module's ABI version differs and never checks signatures, so drift
//! would load silently and misbehave. This compares what `libshunt_envoy.so` imports and
//! exports with the symbols of the pinned Envoy binary.

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
