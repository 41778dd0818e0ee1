//! Read-only views: sessions, apps and stats.

use shunt_proto::control as pb;

use crate::connect::Client;
use crate::rpc_error;
use crate::table::Table;

pub(crate) async fn sessions(
    client: &mut Client,
    namespace: Option<String>,
) -> anyhow::Result<String> {
    let reply = client
        .list_sessions(pb::ListSessionsRequest {
            namespace: namespace.unwrap_or_default(),
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    let mut t = Table::new(&[
        "ID",
        "WORKER",
        "TRANSPORT",
        "STATE",
        "NAMESPACE",
        "APP",
        "LOCAL",
        "REMOTE",
        "SIDE",
        "TX_BYTES",
        "RX_BYTES",
    ]);
    for s in reply.sessions {
        t.row(vec![
            s.id.to_string(),
            s.worker.to_string(),
            s.transport,
            s.state,
            s.namespace,
            format!("{}({})", s.app_name, s.app_id),
            s.local,
            s.remote,
            if s.is_client { "client" } else { "server" }.into(),
            s.bytes_sent.to_string(),
            s.bytes_received.to_string(),
        ]);
    }
    Ok(t.render())
}

pub(crate) async fn apps(client: &mut Client) -> anyhow::Result<String> {
    let reply = client
        .list_apps(pb::ListAppsRequest {})
        .await
        .map_err(rpc_error)?
        .into_inner();
    let mut t = Table::new(&[
        "ID",
        "NAME",
        "NAMESPACE",
        "PID",
        "UID",
        "GID",
        "WORKERS",
        "LISTENERS",
    ]);
    for a in reply.apps {
        t.row(vec![
            a.id.to_string(),
            a.name,
            a.namespace,
            a.pid.to_string(),
            a.uid.to_string(),
            a.gid.to_string(),
            a.workers.to_string(),
            a.listeners.join(","),
        ]);
    }
    Ok(t.render())
}

pub(crate) async fn stats(client: &mut Client) -> anyhow::Result<String> {
    let s = client
        .get_stats(pb::GetStatsRequest {})
        .await
        .map_err(rpc_error)?
        .into_inner();
    let mut t = Table::new(&["COUNTER", "VALUE"]);
    for (name, value) in [
        ("workers", u64::from(s.workers)),
        ("attached_apps", s.attached_apps),
        ("sessions", s.sessions),
        ("listeners", s.listeners),
        ("segments", s.segments),
        ("cut_through_bytes", s.cut_through_bytes),
        ("connects", s.connects),
        ("connect_failures", s.connect_failures),
        ("attach_failures", s.attach_failures),
    ] {
        t.row(vec![name.into(), value.to_string()]);
    }
    Ok(t.render())
}
