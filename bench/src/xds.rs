//! `shunt-bench xds`: how long shunt-xds takes to accept and translate a large mesh, and how
//! much memory it needs beyond the encoded input.
//!
//! The mesh is what istiod would push a sidecar of a large cluster: N outbound EDS clusters
//! with Istio's mutual-TLS transport socket match and SAN, their endpoint assignments, and an
//! inbound listener with an RBAC policy per port. It goes through the client's own path
//! (`State::apply`: decode, check every resource, translate the whole set, publish), one
//! response per type, as a push on a fresh connection would.

use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::listener::v3::{FilterChain, FilterChainMatch};
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use serde::{Deserialize, Serialize};
use shunt_xds::metrics::Metrics;
use shunt_xds::resource::{Resource, ResourceType};
use shunt_xds::testing::mesh;
use shunt_xds::translate::{self, Context};
use shunt_xds::xds::State;
use shunt_xds::xds::state::Change;

use crate::report::{self, Reporter};

pub(crate) struct Options {
    pub(crate) clusters: usize,
    pub(crate) endpoints_per_cluster: usize,
    pub(crate) inbound_ports: usize,
    pub(crate) runs: usize,
}

impl Options {
    fn args(&self) -> Vec<String> {
        vec![
            "--clusters".into(),
            self.clusters.to_string(),
            "--endpoints-per-cluster".into(),
            self.endpoints_per_cluster.to_string(),
            "--inbound-ports".into(),
            self.inbound_ports.to_string(),
        ]
    }
}

const TARGET_MS: f64 = 200.0;
const TARGET_MIB: f64 = 64.0;

#[derive(Serialize, Deserialize)]
struct Run {
    bench: String,
    clusters: usize,
    endpoints: usize,
    inbound_ports: usize,
    input_mib: f64,
    /// Decode, check and translate all three responses, as the client does.
    accept_ms: f64,
    /// One translation of the whole accepted set.
    translate_ms: f64,
    services: usize,
    rules: usize,
    /// Peak resident memory above what the process held with the encoded input ready.
    peak_extra_mib: f64,
}

#[derive(Serialize)]
struct Summary {
    bench: &'static str,
    summary: bool,
    runs: usize,
    accept_ms_median: f64,
    translate_ms_median: f64,
    peak_extra_mib_max: f64,
    target_ms: f64,
    target_mib: f64,
    met: bool,
}

fn mesh_input(o: &Options) -> Vec<(ResourceType, Vec<(String, Any)>)> {
    let mut clusters = Vec::new();
    let mut assignments = Vec::new();
    for i in 0..o.clusters {
        let ns = format!("ns-{}", i % 50);
        let name = format!("outbound|8080||svc-{i}.{ns}.svc.cluster.local");
        let san = format!("spiffe://cluster.local/ns/{ns}/sa/svc-{i}");
        clusters.push((name.clone(), mesh::any(&mesh::mesh_cluster(&name, &san))));
        let ips: Vec<String> = (0..o.endpoints_per_cluster)
            .map(|j| format!("10.{}.{}.{}", (i >> 8) & 0xff, i & 0xff, j % 250 + 1))
            .collect();
        let endpoints: Vec<(&str, u32, bool)> = ips
            .iter()
            .enumerate()
            .map(|(j, ip)| (ip.as_str(), 8080, j % 5 != 0))
            .collect();
        assignments.push((
            name.clone(),
            mesh::any(&mesh::assignment(&name, &endpoints)),
        ));
    }
    let chains = (0..o.inbound_ports)
        .map(|p| {
            let port = 9000 + p as u32;
            let principals: Vec<String> = (0..10)
                .map(|k| format!("spiffe://cluster.local/ns/ns-{k}/sa/client-{p}"))
                .collect();
            let principals: Vec<&str> = principals.iter().map(String::as_str).collect();
            FilterChain {
                name: format!("inbound-{port}"),
                filter_chain_match: Some(FilterChainMatch {
                    destination_port: Some(UInt32Value { value: port }),
                    transport_protocol: "tls".into(),
                    ..Default::default()
                }),
                filters: vec![
                    mesh::rbac_filter(
                        mesh::RbacAction::Allow,
                        &[("allow", mesh::policy(port, &principals))],
                    ),
                    mesh::tcp_proxy_filter(&format!("inbound|{port}||")),
                ],
                ..Default::default()
            }
        })
        .collect();
    let listener = mesh::virtual_inbound(chains);
    vec![
        (ResourceType::Cluster, clusters),
        (ResourceType::Endpoints, assignments),
        (
            ResourceType::Listener,
            vec![("virtualInbound".into(), mesh::any(&listener))],
        ),
    ]
}

/// Resident and peak resident memory, in bytes, from /proc.
fn memory() -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or_else(|| anyhow::anyhow!("no {name} in /proc/self/status"))?;
        let kib: u64 = line[name.len()..]
            .trim()
            .trim_end_matches(" kB")
            .trim()
            .parse()?;
        Ok(kib * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

fn one_run(o: &Options) -> anyhow::Result<Run> {
    let input = mesh_input(o);
    let input_bytes: usize = input
        .iter()
        .flat_map(|(_, r)| r.iter().map(|(_, a)| a.value.len()))
        .sum();
    // Writing 5 resets the peak-RSS mark, so the peak below belongs to this run.
    std::fs::write("/proc/self/clear_refs", "5")?;
    let (before, _) = memory()?;

    let context = Context::new("xds/bench.default", vec!["10.255.0.7".parse()?]);
    let state = State::new(context.clone(), Arc::new(Metrics::default()));
    let start = Instant::now();
    for (kind, resources) in &input {
        let upserts = resources
            .iter()
            .map(|(_, any)| Resource::from_any(*kind, any).map(|r| (r, "v1".to_owned())))
            .collect::<Result<Vec<_>, _>>()?;
        state
            .apply(
                *kind,
                Change {
                    upserts,
                    ..Default::default()
                },
            )
            .map_err(|r| anyhow::anyhow!("rejected: {r:?}"))?;
    }
    let accept = start.elapsed();
    let (_, peak) = memory()?;

    let mut set = translate::ResourceSet::new();
    for (kind, resources) in &input {
        for (name, any) in resources {
            set.entry(*kind)
                .or_default()
                .insert(name.clone(), Resource::from_any(*kind, any)?);
        }
    }
    let start = Instant::now();
    let tables = translate::translate(&set, &context);
    let translate_time = start.elapsed();
    let published = state.tables();
    anyhow::ensure!(
        *published == tables,
        "the client's tables differ from a direct translation"
    );
    let endpoints: usize = tables.services.iter().map(|s| s.endpoints.len()).sum();
    anyhow::ensure!(
        tables.services.len() == o.clusters,
        "every cluster is a service"
    );
    anyhow::ensure!(
        endpoints == o.clusters * o.endpoints_per_cluster,
        "every endpoint is listed"
    );
    Ok(Run {
        bench: "xds".into(),
        clusters: o.clusters,
        endpoints,
        inbound_ports: o.inbound_ports,
        input_mib: input_bytes as f64 / (1 << 20) as f64,
        accept_ms: ms(accept),
        translate_ms: ms(translate_time),
        services: tables.services.len(),
        rules: tables.rules.len(),
        peak_extra_mib: peak.saturating_sub(before) as f64 / (1 << 20) as f64,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One measurement, printed as one JSON line: what `run` starts in a fresh process per run,
/// because an allocator keeps freed memory and would hide the next run's peak.
pub(crate) fn single(o: &Options) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(&one_run(o)?)?);
    Ok(())
}

fn in_child(o: &Options) -> anyhow::Result<Run> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .arg("xds")
        .arg("--single")
        .args(o.args())
        .stderr(std::process::Stdio::inherit())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "the measuring process failed: {}",
        out.status
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

pub(crate) fn run(o: &Options, r: &mut Reporter) -> anyhow::Result<()> {
    let mut runs = Vec::new();
    for _ in 0..o.runs.max(1) {
        let run = in_child(o)?;
        r.emit(&run)?;
        runs.push(run);
    }
    let rows = runs
        .iter()
        .map(|x| {
            vec![
                format!("{}x{}", x.clusters, x.endpoints),
                format!("{:.1}", x.accept_ms),
                format!("{:.1}", x.translate_ms),
                format!("{:.1}", x.peak_extra_mib),
                x.rules.to_string(),
            ]
        })
        .collect::<Vec<_>>();
    r.table(
        "shunt-xds: accept and translate a mesh",
        &[
            "clusters x endpoints",
            "accept ms",
            "translate ms",
            "peak extra MiB",
            "rules",
        ],
        &rows,
    );
    let accept = report::median(runs.iter().map(|x| x.accept_ms).collect());
    let translate_ms = report::median(runs.iter().map(|x| x.translate_ms).collect());
    let peak = runs.iter().map(|x| x.peak_extra_mib).fold(0.0, f64::max);
    let met = accept < TARGET_MS && peak < TARGET_MIB;
    r.verdict("accept (median ms)", accept, "< 200 ms", accept < TARGET_MS);
    r.verdict(
        "peak extra memory (MiB)",
        peak,
        "< 64 MiB",
        peak < TARGET_MIB,
    );
    r.emit(&Summary {
        bench: "xds",
        summary: true,
        runs: runs.len(),
        accept_ms_median: accept,
        translate_ms_median: translate_ms,
        peak_extra_mib_max: peak,
        target_ms: TARGET_MS,
        target_mib: TARGET_MIB,
        met,
    })
}
