//! Installs translated tables in shuntd through its control API: each swap replaces the whole
//! of this adapter's rules and services in one call, so shuntd never holds half an update.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use shunt_proto::control as pb;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::tables::{Certificate, Tables};
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

/// What was last stored in shuntd's certificate store, to store it again only when it changed
/// or shuntd lost it (a restart empties the store).
#[derive(Debug, Default)]
pub struct Installed {
    certificates: Vec<Certificate>,
}

/// Installs `tables` for `target`: services and rules swapped whole every time (cheap, and it
/// repairs a shuntd that restarted and lost them), certificates only when changed or missing,
/// so a resync does not make every sidecar reload an unchanged certificate.
pub async fn install(
    target: &ShuntdTarget,
    tables: &Tables,
    installed: &mut Installed,
) -> Result<(), ApplyError> {
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
    let to_store: Vec<&Certificate> = tables.certificates.iter().filter(|c| !c.redacted).collect();
    let stored = if to_store.is_empty() {
        Vec::new()
    } else {
        c.list_certificates(pb::ListCertificatesRequest {})
            .await
            .map_err(refused("certificate listing"))?
            .into_inner()
            .certificates
    };
    let mut now_installed = Vec::new();
    for cert in to_store {
        let present = stored
            .iter()
            .any(|s| s.namespace == target.namespace && s.name == cert.name);
        if !present || !installed.certificates.contains(cert) {
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
        now_installed.push(cert.clone());
    }
    installed.certificates = now_installed;
    Ok(())
}

/// Keeps shuntd in step with the latest tables until `tables` closes: on every change, and
/// every `resync` besides, so that a shuntd that restarted gets its tables back. A failed
/// install is retried with backoff; a newer table set replaces one still waiting.
pub async fn keep_in_step(
    target: ShuntdTarget,
    mut tables: watch::Receiver<Arc<Tables>>,
    metrics: Arc<Metrics>,
    resync: Duration,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    let mut installed = Installed::default();
    let mut last: Option<Arc<Tables>> = None;
    loop {
        let current = tables.borrow_and_update().clone();
        match install(&target, &current, &mut installed).await {
            Ok(()) => {
                metrics.shuntd_apply(true);
                backoff.reset();
                if last.as_ref().is_none_or(|l| !Arc::ptr_eq(l, &current)) {
                    tracing::info!(
                        services = current.services.len(),
                        rules = current.rules.len(),
                        certificates = current.certificates.len(),
                        "installed in shuntd"
                    );
                }
                last = Some(current);
                tokio::select! {
                    changed = tables.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(resync) => {}
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
