//! `shunt dev-certs`: a throwaway mesh CA and workload certificates, to try the Envoy module's
//! mutual-TLS mode without a mesh. Never for production: there, the mesh's CA issues them.

use std::fmt::Write;
use std::path::Path;

use anyhow::Context;
use shunt_tls::dev_pki::DevCa;

/// Writes one directory per SPIFFE id, named after the id's last path segment, holding
/// `cert-chain.pem`, `key.pem` and `root-cert.pem` (the layout Istio uses for proxies).
pub(crate) fn write(dir: &Path, ids: &[String]) -> anyhow::Result<String> {
    let ca = DevCa::new("shunt dev mesh CA").context("creating the CA")?;
    let mut out = String::new();
    for id in ids {
        let name = id
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty() && id.starts_with("spiffe://"))
            .with_context(|| format!("`{id}` is not a SPIFFE id (spiffe://<domain>/<path>)"))?;
        let files = ca
            .write_workload(id, &dir.join(name))
            .with_context(|| format!("writing the certificate of {id}"))?;
        let _ = writeln!(out, "{id}: {}", files.cert_chain.display());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_directory_per_identity_and_refuses_non_spiffe_ids() {
        let dir = tempfile::tempdir().unwrap();
        let ids = ["spiffe://cluster.local/ns/default/sa/web".to_owned()];
        let out = write(dir.path(), &ids).unwrap();
        assert!(out.contains("sa/web"));
        for f in ["cert-chain.pem", "key.pem", "root-cert.pem"] {
            assert!(dir.path().join("web").join(f).exists(), "{f}");
        }
        assert!(write(dir.path(), &["https://example.com/x".to_owned()]).is_err());
    }
}
