//! `shunt certs`: workload certificates that apps of a namespace fetch by name.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use shunt_proto::control as pb;

use crate::connect::Client;
use crate::rpc_error;
use crate::table::Table;

#[derive(Subcommand, Debug)]
pub(crate) enum CertsCommand {
    /// List certificates: namespace, name, SPIFFE id and version (never the material).
    List,
    /// Store a certificate under a name in a namespace, replacing any; shuntd checks it first.
    Put {
        /// The certificate's name, as apps ask for it (the Envoy module's `tls.certificate`).
        name: String,
        #[arg(long)]
        namespace: String,
        /// PEM file: the leaf certificate, then intermediates.
        #[arg(long)]
        cert_chain: PathBuf,
        /// PEM file: the leaf's private key.
        #[arg(long)]
        private_key: PathBuf,
        /// PEM file: the CA certificates peers must chain to.
        #[arg(long)]
        trust_bundle: PathBuf,
    },
    /// Delete a certificate.
    #[command(alias = "del")]
    Delete {
        name: String,
        #[arg(long)]
        namespace: String,
    },
}

fn read(flag: &str, path: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("--{flag} {}", path.display()))
}

pub(crate) async fn run(client: &mut Client, cmd: CertsCommand) -> anyhow::Result<String> {
    match cmd {
        CertsCommand::List => {
            let reply = client
                .list_certificates(pb::ListCertificatesRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner();
            let mut t = Table::new(&["NAMESPACE", "NAME", "IDENTITY", "VERSION"]);
            for c in reply.certificates {
                t.row(vec![c.namespace, c.name, c.identity, c.version.to_string()]);
            }
            Ok(t.render())
        }
        CertsCommand::Put {
            name,
            namespace,
            cert_chain,
            private_key,
            trust_bundle,
        } => {
            let reply = client
                .put_certificate(pb::PutCertificateRequest {
                    namespace,
                    name: name.clone(),
                    cert_chain: read("cert-chain", &cert_chain)?,
                    private_key: read("private-key", &private_key)?,
                    trust_bundle: read("trust-bundle", &trust_bundle)?,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            Ok(format!(
                "certificate {name}: {} (version {})\n",
                reply.identity, reply.version
            ))
        }
        CertsCommand::Delete { name, namespace } => {
            client
                .delete_certificate(pb::DeleteCertificateRequest {
                    namespace,
                    name: name.clone(),
                })
                .await
                .map_err(rpc_error)?;
            Ok(format!("certificate {name} deleted\n"))
        }
    }
}
