//! `shunt-xds translate`: what the adapter would install for an Envoy config dump.

use std::net::IpAddr;

use serde::Serialize;

use crate::config_dump::{self, ConfigDumpError};
use crate::node::{NodeId, workload_ips};
use crate::tables::{Finding, Severity, Tables};
use crate::translate::{self, Context, ResourceSet};

#[derive(Debug, Serialize)]
pub struct Report {
    /// The dump's node id, if its bootstrap section has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    pub source: String,
    pub workload_ips: Vec<IpAddr>,
    #[serde(flatten)]
    pub tables: Tables,
}

/// Translates a config dump. `workload_ips` overrides the addresses the dump's node metadata
/// gives (dumps without a bootstrap section have none).
pub fn translate_dump(
    text: &str,
    workload_ips_override: &[IpAddr],
) -> Result<Report, ConfigDumpError> {
    let dumped = config_dump::parse(text)?;
    let node_id = dumped.node.as_ref().map(|n| n.id.clone());
    let source = node_id
        .as_deref()
        .and_then(|id| id.parse::<NodeId>().ok())
        .map(|n| format!("xds/{}", n.id))
        .unwrap_or_else(|| "xds/config-dump".into());
    let ips = if workload_ips_override.is_empty() {
        dumped.node.as_ref().map(workload_ips).unwrap_or_default()
    } else {
        workload_ips_override.to_vec()
    };
    let context = Context::new(source.clone(), ips.clone());
    let mut set = ResourceSet::new();
    for r in dumped.resources {
        set.entry(r.kind())
            .or_default()
            .insert(r.name().to_owned(), r);
    }
    let mut tables = translate::translate(&set, &context);
    for t in &dumped.unknown_types {
        tables.findings.push(Finding {
            severity: Severity::Unknown,
            subject: format!("type/{t}"),
            detail: "extension config without a schema in this build; not read".into(),
        });
    }
    for s in &dumped.skipped_sections {
        tables.findings.push(Finding {
            severity: Severity::Ignored,
            subject: format!("section/{s}"),
            detail: "config dump section the adapter does not translate".into(),
        });
    }
    tables.findings.sort();
    Ok(Report {
        node_id,
        source,
        workload_ips: ips,
        tables,
    })
}
