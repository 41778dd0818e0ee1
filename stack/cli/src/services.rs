//! `shunt services`: the mesh's services as config sources (the xDS adapter) describe them.

use shunt_proto::control as pb;

use crate::connect::Client;
use crate::rpc_error;
use crate::rules::format_principal;
use crate::table::Table;

fn tls_mode(v: i32) -> String {
    match pb::TlsMode::try_from(v) {
        Ok(pb::TlsMode::Istio) => "istio".into(),
        Ok(pb::TlsMode::Disabled) => "disabled".into(),
        Ok(pb::TlsMode::Unspecified) => "-".into(),
        Err(_) => format!("unknown({v})"),
    }
}

/// The identities a service's TLS accepts, or `-` when it checks none.
fn identities(ids: &[pb::IdentityMatch]) -> String {
    if ids.is_empty() {
        return "-".into();
    }
    ids.iter()
        .map(|m| format_principal(Some(m)))
        .collect::<Vec<_>>()
        .join(",")
}

pub(crate) async fn list(client: &mut Client, source: Option<String>) -> anyhow::Result<String> {
    let reply = client
        .list_services(pb::ListServicesRequest {})
        .await
        .map_err(rpc_error)?
        .into_inner();
    let mut t = Table::new(&["SOURCE", "CLUSTER", "ENDPOINTS", "TLS", "IDENTITIES"]);
    for s in reply.services {
        if source.as_ref().is_some_and(|wanted| *wanted != s.source) {
            continue;
        }
        let service = s.service.unwrap_or_default();
        t.row(vec![
            s.source,
            service.cluster,
            service.endpoints.len().to_string(),
            tls_mode(service.tls_mode),
            identities(&service.expected_identities),
        ]);
    }
    Ok(t.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_show_unset_values_as_dashes() {
        assert_eq!(tls_mode(pb::TlsMode::Istio as i32), "istio");
        assert_eq!(tls_mode(0), "-");
        assert_eq!(tls_mode(9), "unknown(9)");
        assert_eq!(identities(&[]), "-");
        let exact = |id: &str| pb::IdentityMatch {
            kind: Some(pb::identity_match::Kind::Exact(id.into())),
        };
        assert_eq!(
            identities(&[exact("spiffe://a/x"), exact("spiffe://a/y")]),
            "exact:spiffe://a/x,exact:spiffe://a/y"
        );
    }
}
