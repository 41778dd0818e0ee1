//! Installs translated tables in shuntd through its control API: each swap replaces the whole
//! of this adapter's rules and services in one call, so shuntd never holds half an update.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use shunt_proto::control as pb;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::tables::Tables;
use crate::xds::backoff::Backoff;

#[derive(Debug, Clone)]
pub struct ShuntdTarget {
    pub control_socket: PathBuf,
    /// The source this adapter's rules and services are filed under.
    pub source: String,
    /// shuntd namespace the workload's apps attach to; certificates are stored there.
    pub namespace: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot reach shuntd's control socket: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("shuntd refused {what}: {status}")]
    Refused {
        what: &'static str,
        status: tonic::Status,
    },
}

/// Installs `tables` for `target`.
pub async fn install(target: &ShuntdTarget, tables: &Tables) -> Result<(), ApplyError> {
    let mut c = shunt_proto::control_client(&target.control_socket).await?;
    let refused = |what| move |status| ApplyError::Refused { what, status };
    c.replace_services(pb::ReplaceServicesRequest {
        source: target.source.clone(),
        services: tables.services.iter().map(Into::into).collect(),
    })
    .await
    .map_err(refused("services"))?;
    c.replace_rules(pb::ReplaceRulesRequest {
        source: target.source.clone(),
        rules: tables
            .rules
            .iter()
            .map(|r| r.to_proto(&target.source))
            .collect(),
    })
    .await
    .map_err(refused("rules"))?;
    for cert in tables.certificates.iter().filter(|c| !c.redacted) {
        c.put_certificate(pb::PutCertificateRequest {
            namespace: target.namespace.clone(),
            name: cert.name.clone(),
            cert_chain: cert.cert_chain.clone(),
            private_key: cert.private_key.clone(),
            trust_bundle: cert.trust_bundle.clone(),
        })
        .await
        .map_err(refused("certificate"))?;
    }
    Ok(())
}

/// Keeps shuntd in step with the latest tables until `tables` closes. A failed install is
/// retried with backoff; a newer table set replaces one still waiting.
pub async fn keep_in_step(
    target: ShuntdTarget,
    mut tables: watch::Receiver<Arc<Tables>>,
    metrics: Arc<Metrics>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    loop {
        let current = tables.borrow_and_update().clone();
        match install(&target, &current).await {
            Ok(()) => {
                metrics.shuntd_apply(true);
                backoff.reset();
                tracing::info!(
                    services = current.services.len(),
                    rules = current.rules.len(),
                    certificates = current.certificates.len(),
                    "installed in shuntd"
                );
                if tables.changed().await.is_err() {
                    return;
                }
            }
            Err(error) => {
                metrics.shuntd_apply(false);
                let delay = backoff.next_delay();
                tracing::warn!(%error, ?delay, "installing in shuntd failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    changed = tables.changed() => if changed.is_err() { return },
                }
            }
        }
    }
}
