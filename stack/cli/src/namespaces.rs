//! `shunt namespaces`: app namespaces and their secrets.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use shunt_proto::control as pb;

use crate::connect::Client;
use crate::rpc_error;
use crate::table::Table;

#[derive(Subcommand, Debug)]
pub(crate) enum NamespacesCommand {
    /// List namespaces (secrets are never shown).
    List,
    /// Add a namespace, or replace one with --replace.
    Add {
        /// Namespace id: 1 to 128 of [A-Za-z0-9._-], e.g. `shop.cart`.
        id: String,
        /// Address of the namespace's apps; connects from it use it as their local address.
        #[arg(long)]
        address: String,
        /// File holding the secret apps present when they attach (read as raw bytes; a
        /// trailing newline is removed). Without it the namespace has an empty secret.
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// A user that may attach (repeat for more). Without --uid and --gid only root and
        /// the user shuntd runs as may; Istio's sidecars run as 1337.
        #[arg(long = "uid", value_name = "UID")]
        uids: Vec<u32>,
        /// A primary group whose members may attach (repeat for more).
        #[arg(long = "gid", value_name = "GID")]
        gids: Vec<u32>,
        /// Replace the address, secret and users of an existing namespace.
        #[arg(long)]
        replace: bool,
    },
    /// Delete a namespace; its attached apps are detached.
    #[command(alias = "del")]
    Delete { id: String },
}

pub(crate) async fn run(client: &mut Client, cmd: NamespacesCommand) -> anyhow::Result<String> {
    match cmd {
        NamespacesCommand::List => {
            let reply = client
                .list_namespaces(pb::ListNamespacesRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner();
            let mut t = Table::new(&["ID", "ADDRESS", "APPS", "LOCAL_RULES", "MAY_ATTACH"]);
            for ns in reply.namespaces {
                t.row(vec![
                    ns.id,
                    ns.address,
                    ns.attached_apps.to_string(),
                    ns.local_rules.to_string(),
                    may_attach(&ns.uids, &ns.gids),
                ]);
            }
            Ok(t.render())
        }
        NamespacesCommand::Add {
            id,
            address,
            secret_file,
            uids,
            gids,
            replace,
        } => {
            let secret = match secret_file {
                Some(path) => {
                    let mut s = std::fs::read(&path)
                        .with_context(|| format!("--secret-file {}", path.display()))?;
                    if s.last() == Some(&b'\n') {
                        s.pop();
                    }
                    s
                }
                None => Vec::new(),
            };
            client
                .add_namespace(pb::AddNamespaceRequest {
                    namespace: Some(pb::Namespace {
                        id: id.clone(),
                        secret,
                        address,
                        uids,
                        gids,
                    }),
                    replace,
                })
                .await
                .map_err(rpc_error)?;
            Ok(format!("namespace {id} added\n"))
        }
        NamespacesCommand::Delete { id } => {
            client
                .delete_namespace(pb::DeleteNamespaceRequest { id: id.clone() })
                .await
                .map_err(rpc_error)?;
            Ok(format!("namespace {id} deleted\n"))
        }
    }
}

/// Who may attach, for the listing: `uid:1337,gid:2000`, or the default.
fn may_attach(uids: &[u32], gids: &[u32]) -> String {
    if uids.is_empty() && gids.is_empty() {
        return "root,shuntd".into();
    }
    let uids = uids.iter().map(|u| format!("uid:{u}"));
    let gids = gids.iter().map(|g| format!("gid:{g}"));
    uids.chain(gids).collect::<Vec<_>>().join(",")
}
