//! Runs `envoy --quick --json` against the pinned Envoy (fetched by `ci/envoy.sh`; never
//! skipped) and checks that every mode moved bytes and answered requests, and that the ratios
//! line came last; then that `--modes` and `--rounds` choose and repeat modes. Speeds are not
//! checked: CI machines vary too much for them to mean anything.

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;

const MODES: [&str; 5] = ["direct", "plain", "envoy-tls", "shunt", "shunt-busy-poll"];

fn positive(v: &Value, key: &str, line: &Value) -> f64 {
    let x = v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` is not a number in {line}"));
    assert!(x.is_finite() && x > 0.0, "`{key}` is {x} in {line}");
    x
}

#[test]
fn every_mode_moves_bytes_and_answers_requests() {
    let out = Command::new(env!("CARGO_BIN_EXE_shunt-bench"))
        .args(["envoy", "--quick", "--json"])
        .output()
        .expect("run shunt-bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "shunt-bench envoy failed: {}\n{stderr}",
        out.status
    );
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .expect("stdout is UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();

    let (ratios, modes) = lines
        .split_last()
        .expect("shunt-bench envoy printed nothing");
    assert_eq!(
        ratios["bench"], "envoy-ratios",
        "the ratios line comes last"
    );
    assert_eq!(ratios["shunt_mode"], "shunt");
    for key in [
        "gbps_vs_envoy_tls",
        "gbps_vs_plain",
        "cpu_s_per_gb_vs_envoy_tls",
        "p50_us_1conn_vs_plain",
        "busy_poll_p50_us_1conn_vs_plain",
        "busy_poll_cpu_per_request_1conn_vs_plain",
    ] {
        assert!(ratios.get(key).is_some(), "`{key}` missing from {ratios}");
    }

    let names: Vec<&str> = modes
        .iter()
        .map(|v| {
            assert_eq!(v["bench"], "envoy", "unexpected line {v}");
            v["mode"].as_str().expect("mode is a string")
        })
        .collect();
    assert_eq!(names, MODES, "one line per mode, in order");
    for v in modes {
        positive(v, "gbps", v);
        positive(v, "bulk_bytes", v);
        let rr = v["rr"].as_array().expect("rr is an array");
        let conns: BTreeSet<u64> = rr
            .iter()
            .map(|r| r["connections"].as_u64().unwrap())
            .collect();
        assert_eq!(conns, BTreeSet::from([1, 16]), "in {v}");
        for r in rr {
            positive(r, "rps", v);
            positive(r, "p50_us", v);
            positive(r, "p99_us", v);
            let cpu = r["envoy_cpu_us_per_request"].as_f64().unwrap();
            if v["mode"] == "direct" {
                assert_eq!(cpu, 0.0, "no Envoy runs in direct mode: {v}");
            } else {
                assert!(cpu >= 0.0, "in {v}");
            }
        }
        let cpu = v["cpu_s_per_gb"].as_f64().expect("cpu_s_per_gb");
        if v["mode"] == "direct" {
            assert_eq!(cpu, 0.0, "no Envoy runs in direct mode: {v}");
        } else {
            assert!(cpu >= 0.0, "in {v}");
        }
        let paired = v["paired_connections"].as_u64().unwrap();
        if v["mode"].as_str().unwrap().starts_with("shunt") {
            assert_eq!(paired, v["connections"].as_u64().unwrap(), "in {v}");
            // The first bytes of the upload at least had to wake the server sidecar.
            positive(&v["bulk_wakeups"], "data_wakeups_per_mib", v);
            let full = v["bulk_wakeups"]["fifo_full_per_mib"].as_f64().unwrap();
            assert!(full >= 0.0, "in {v}");
        } else {
            assert_eq!(paired, 0, "in {v}");
            assert!(v.get("bulk_wakeups").is_none(), "no FIFOs in {v}");
        }
        assert_eq!(v["rounds"], 1, "in {v}");
        assert_eq!(
            v["gbps_each_round"],
            serde_json::json!([v["gbps"]]),
            "in {v}"
        );
    }
}

#[test]
fn rounds_report_the_median_of_the_chosen_modes() {
    let out = Command::new(env!("CARGO_BIN_EXE_shunt-bench"))
        .args([
            "envoy",
            "--quick",
            "--json",
            "--modes",
            "plain,direct",
            "--rounds",
            "3",
        ])
        .output()
        .expect("run shunt-bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stderr}", out.status);
    assert_eq!(stderr.matches("(round ").count(), 6, "{stderr}");
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .expect("stdout is UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let names: Vec<&str> = lines.iter().map(|v| v["mode"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["plain", "direct"],
        "the chosen modes only, no ratios"
    );
    for v in &lines {
        assert_eq!(v["rounds"], 3, "in {v}");
        let mut each: Vec<f64> = v["gbps_each_round"]
            .as_array()
            .expect("gbps_each_round")
            .iter()
            .map(|g| g.as_f64().unwrap())
            .collect();
        each.sort_by(f64::total_cmp);
        assert_eq!(v["gbps"].as_f64().unwrap(), each[1], "the median in {v}");
    }
}

#[test]
fn a_mode_named_twice_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_shunt-bench"))
        .args(["envoy", "--quick", "--modes", "plain,plain"])
        .output()
        .expect("run shunt-bench");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--modes names plain twice"), "{stderr}");
}
