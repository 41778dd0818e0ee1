//! Runs `xds --quick --json` and checks that it accepted the whole mesh and reported time and
//! memory. Speeds are not checked: CI machines vary too much for them to mean anything.

use std::process::Command;

use serde_json::Value;

#[test]
fn translates_the_whole_mesh_and_reports_time_and_memory() {
    let out = Command::new(env!("CARGO_BIN_EXE_shunt-bench"))
        .args(["xds", "--quick", "--json"])
        .output()
        .expect("run shunt-bench");
    assert!(
        out.status.success(),
        "shunt-bench xds failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let (summary, runs) = lines.split_last().expect("printed nothing");
    assert_eq!(summary["summary"], true, "{summary}");
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    assert_eq!(run["services"], 50, "{run}");
    assert_eq!(run["endpoints"], 500, "{run}");
    // Five ports, each: ten allowed principals and one rule refusing the rest.
    assert_eq!(run["rules"], 55, "{run}");
    for key in ["accept_ms", "translate_ms", "input_mib"] {
        let v = run[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} in {run}"));
        assert!(v.is_finite() && v > 0.0, "{key} = {v}");
    }
    assert!(run["peak_extra_mib"].as_f64().is_some_and(|m| m >= 0.0));
}
