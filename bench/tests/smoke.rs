//! Runs every command with `--quick --json` and checks the shape of what it prints, never the
//! speed: CI machines vary too much for numbers to mean anything here.

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;

fn run(command: &str) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_shunt-bench"))
        .args([command, "--quick", "--json"])
        .output()
        .expect("run shunt-bench");
    assert!(
        out.status.success(),
        "shunt-bench {command} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("stdout is UTF-8");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!lines.is_empty(), "shunt-bench {command} printed nothing");
    for v in &lines {
        assert!(v.is_object(), "not an object: {v}");
        assert_numbers_positive(v, v);
    }
    lines
}

/// Every number anywhere in the line is finite and positive.
fn assert_numbers_positive(v: &Value, line: &Value) {
    match v {
        Value::Number(n) => {
            let x = n.as_f64().expect("a number");
            assert!(x.is_finite() && x > 0.0, "bad number {x} in {line}");
        }
        Value::Array(a) => a.iter().for_each(|x| assert_numbers_positive(x, line)),
        Value::Object(o) => o.values().for_each(|x| assert_numbers_positive(x, line)),
        _ => {}
    }
}

fn has(v: &Value, keys: &[&str]) {
    for k in keys {
        assert!(v.get(k).is_some(), "`{k}` missing from {v}");
    }
}

fn split<'a>(lines: &'a [Value], bench: &str) -> (Vec<&'a Value>, &'a Value) {
    let results: Vec<&Value> = lines.iter().filter(|v| v["bench"] == bench).collect();
    let ratios: Vec<&Value> = lines
        .iter()
        .filter(|v| v["bench"] == format!("{bench}-ratios").as_str())
        .collect();
    assert_eq!(
        results.len() + ratios.len(),
        lines.len(),
        "unexpected bench names in {lines:?}"
    );
    assert_eq!(ratios.len(), 1, "one ratios line expected");
    assert_eq!(lines.last(), Some(ratios[0]), "the ratios line comes last");
    (results, ratios[0])
}

/// The transports of the results, and `eventfd` and `pipe`: pingpong's wake-up floors.
const TRANSPORTS: [&str; 6] = [
    "cut-through",
    "tcp-loopback",
    "unix",
    "memcpy",
    "eventfd",
    "pipe",
];

/// Whether kernel TCP was also measured polling, the baseline the adaptive mode compares with.
fn has_polled_kernel_baseline(results: &[&Value]) -> bool {
    results
        .iter()
        .any(|v| v["transport"] == "tcp-loopback" && v["mode"] == "adaptive")
}

fn transports(results: &[&Value]) -> BTreeSet<String> {
    results
        .iter()
        .map(|v| {
            let t = v["transport"].as_str().expect("transport is a string");
            assert!(TRANSPORTS.contains(&t), "unknown transport {t}");
            t.to_owned()
        })
        .collect()
}

#[test]
fn fifo_reports_every_transport_and_size() {
    let lines = run("fifo");
    let (results, ratios) = split(&lines, "fifo");
    for v in &results {
        has(
            v,
            &["bench", "transport", "msg_size", "gbps", "bytes", "secs"],
        );
    }
    assert_eq!(transports(&results).len(), 4, "all four transports");
    let sizes: BTreeSet<u64> = results
        .iter()
        .map(|v| v["msg_size"].as_u64().unwrap())
        .collect();
    assert_eq!(
        sizes,
        BTreeSet::from([64, 1 << 10, 16 << 10, 64 << 10, 1 << 20])
    );
    has(
        ratios,
        &["transport", "msg_size", "vs_tcp", "ratio", "target_met"],
    );
    assert!(ratios["target_met"].is_boolean());
}

#[test]
fn pingpong_reports_every_cut_through_mode_and_the_kernel() {
    let lines = run("pingpong");
    let (results, ratios) = split(&lines, "pingpong");
    for v in &results {
        has(
            v,
            &[
                "bench",
                "transport",
                "msg_size",
                "p50_us",
                "p99_us",
                "latency",
                "mode",
                "placement",
            ],
        );
        assert_eq!(v["latency"], "rtt");
    }
    let values_of = |key: &str, (field, value): (&str, &str)| -> BTreeSet<&str> {
        results
            .iter()
            .filter(|v| v[field] == value)
            .map(|v| v[key].as_str().expect("a string"))
            .collect()
    };
    assert_eq!(
        values_of("transport", ("placement", "one-cpu")),
        BTreeSet::from(["cut-through", "tcp-loopback", "unix", "eventfd", "pipe"])
    );
    assert_eq!(
        values_of("mode", ("transport", "cut-through")),
        BTreeSet::from(["busy-poll", "event", "adaptive"])
    );
    let t = transports(&results);
    assert!(t.contains("tcp-loopback") && t.contains("unix"));
    assert!(has_polled_kernel_baseline(&results));
    has(
        ratios,
        &[
            "busy_poll_ratio",
            "event_ratio",
            "adaptive_ratio",
            "adaptive_busy_poll_us",
            "wake_floor_p50_us",
            "event_over_wake_floor",
            "eventfd_floor_p50_us",
            "one_cpu_event_ratio",
            "targets_met",
        ],
    );
}

#[test]
fn connect_reports_a_rate_per_transport() {
    let lines = run("connect");
    let (results, ratios) = split(&lines, "connect");
    for v in &results {
        has(
            v,
            &[
                "bench",
                "transport",
                "mode",
                "concurrency",
                "msg_size",
                "cps",
                "connect_us",
                "exchange_us",
                "close_us",
                "cpu_us_per_conn",
            ],
        );
        // CPU time comes in clock ticks: a quick run may see none.
        assert!(v["cpu_us_per_conn"].as_f64().unwrap() >= 0.0, "{v}");
        // The phases are parts of each connection's time, and each connecting thread spends
        // its wall-clock time on them, so they cannot add up to more than the threads had.
        let phases: f64 = ["connect_us", "exchange_us", "close_us"]
            .iter()
            .map(|k| v[*k].as_f64().unwrap())
            .sum();
        let thread_time_per_conn =
            v["us_per_conn"].as_f64().unwrap() * v["concurrency"].as_f64().unwrap();
        assert!(phases > 0.0 && phases <= thread_time_per_conn, "{v}");
    }
    let t = transports(&results);
    assert!(t.contains("cut-through") && t.contains("tcp-loopback") && t.contains("unix"));
    let cut_through: BTreeSet<(String, u64, u64)> = results
        .iter()
        .filter(|v| v["transport"] == "cut-through")
        .map(|v| {
            (
                v["mode"].as_str().unwrap().to_owned(),
                v["concurrency"].as_u64().unwrap(),
                // Absent when the worker keeps no standby sessions.
                v.get("preconnect").map_or(0, |p| p.as_u64().unwrap()),
            )
        })
        .collect();
    let loaded = ratios["concurrency"].as_u64().unwrap();
    let depth = ratios["preconnect"].as_u64().unwrap();
    assert!(loaded > 1 && depth > 0, "{ratios}");
    for case in [("event", 1, 0), ("event", 1, depth), ("adaptive", 1, depth)] {
        assert!(
            cut_through.contains(&(case.0.into(), case.1, case.2)),
            "{case:?}"
        );
    }
    for case in [("event", loaded, 0), ("event", loaded, depth)] {
        assert!(
            cut_through.contains(&(case.0.into(), case.1, case.2)),
            "{case:?}"
        );
    }
    for transport in ["tcp-loopback", "unix"] {
        assert!(
            results
                .iter()
                .any(|v| v["transport"] == transport && v["concurrency"] == loaded),
            "{transport} under load"
        );
    }
    assert!(has_polled_kernel_baseline(&results));
    has(
        ratios,
        &[
            "ratio",
            "loaded_ratio",
            "target_met",
            "ratio_without_preconnect",
            "loaded_ratio_without_preconnect",
            "adaptive_ratio",
        ],
    );
}
