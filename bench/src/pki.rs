//! A mesh CA and the two workload identities of a sidecar chain, made fresh for each run and
//! written as PEM files, the form sidecars load them in.

use std::path::PathBuf;

use shunt_tls::dev_pki::{DevCa, WorkloadFiles};

pub(crate) const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
pub(crate) const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";

/// One workload's material, and the identity it expects of its peer.
pub(crate) struct Identity {
    pub(crate) cert_chain: PathBuf,
    pub(crate) private_key: PathBuf,
    pub(crate) trust_bundle: PathBuf,
    pub(crate) peer_id: &'static str,
}

impl Identity {
    fn new(files: WorkloadFiles, peer_id: &'static str) -> Self {
        Self {
            cert_chain: files.cert_chain,
            private_key: files.private_key,
            trust_bundle: files.trust_bundle,
            peer_id,
        }
    }
}

pub(crate) struct Pki {
    pub(crate) client: Identity,
    pub(crate) server: Identity,
    // Holds the files; removed when the run ends.
    _dir: tempfile::TempDir,
}

impl Pki {
    pub(crate) fn generate() -> anyhow::Result<Pki> {
        let dir = tempfile::Builder::new()
            .prefix("shunt-bench-pki")
            .tempdir()?;
        let ca = DevCa::new("mesh CA")?;
        let client = ca.write_workload(CLIENT_ID, &dir.path().join("client"))?;
        let server = ca.write_workload(SERVER_ID, &dir.path().join("server"))?;
        Ok(Pki {
            client: Identity::new(client, SERVER_ID),
            server: Identity::new(server, CLIENT_ID),
            _dir: dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_side_trusts_the_ca_and_expects_the_other() {
        let pki = Pki::generate().unwrap();
        assert_eq!(pki.client.peer_id, SERVER_ID);
        assert_eq!(pki.server.peer_id, CLIENT_ID);
        for id in [&pki.client, &pki.server] {
            for f in [&id.cert_chain, &id.private_key, &id.trust_bundle] {
                let pem = std::fs::read_to_string(f).unwrap();
                assert!(pem.starts_with("-----BEGIN "), "{}", f.display());
            }
        }
    }
}
