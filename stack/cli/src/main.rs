//! `shunt`: inspect and change a running shuntd through its control API.

mod certs;
mod connect;
mod dev_certs;
mod namespaces;
mod rules;
mod services;
mod status;
mod table;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Inspect and change a running shuntd: attached apps, sessions, namespaces, rules, services,
/// certificates and stats.
#[derive(Parser, Debug)]
#[command(version, about, propagate_version = true)]
struct Cli {
    /// shuntd's control socket.
    #[arg(
        long,
        global = true,
        env = "SHUNT_CONTROL_SOCKET",
        default_value = "/run/shunt/control.sock"
    )]
    control_socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List sessions with their transport, state, endpoints and byte counts.
    Sessions {
        /// Only sessions of this namespace.
        #[arg(long)]
        namespace: Option<String>,
    },
    /// List attached apps with their namespace, credentials and listeners.
    Apps,
    /// Show node-wide counters.
    Stats,
    /// List, add or delete app namespaces.
    #[command(subcommand)]
    Namespaces(namespaces::NamespacesCommand),
    /// List, add or delete session rules (local: a namespace's egress; global: ingress).
    #[command(subcommand)]
    Rules(rules::RulesCommand),
    /// List the mesh's services as config sources (the xDS adapter) describe them.
    ///
    /// One row per cluster, sorted by source and cluster: its source, how many endpoints it
    /// has, how its TLS applies (`istio`: mutual TLS, the peer proves an identity; `disabled`:
    /// plain TCP; `-`: not said) and the peer identities its TLS accepts (`-`: none checked).
    Services {
        /// Only the services of this source, e.g. `xds/istiod`.
        #[arg(long)]
        source: Option<String>,
    },
    /// List, put or delete workload certificates that apps of a namespace fetch by name.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Write a throwaway mesh CA and workload certificates, to try the Envoy module's
    /// mutual-TLS mode without a mesh (never for production). Needs no shuntd.
    DevCerts {
        /// Where to write one directory per identity.
        dir: std::path::PathBuf,
        /// SPIFFE ids to issue certificates for.
        #[arg(
            long = "id",
            default_values_t = [
                "spiffe://cluster.local/ns/default/sa/client".to_owned(),
                "spiffe://cluster.local/ns/default/sa/server".to_owned(),
            ]
        )]
        ids: Vec<String>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(output) => {
            print!("{output}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<String> {
    if let Command::DevCerts { dir, ids } = &cli.command {
        return dev_certs::write(dir, ids);
    }
    let mut client = connect::control_client(&cli.control_socket).await?;
    match cli.command {
        Command::Sessions { namespace } => status::sessions(&mut client, namespace).await,
        Command::Apps => status::apps(&mut client).await,
        Command::Stats => status::stats(&mut client).await,
        Command::Namespaces(cmd) => namespaces::run(&mut client, cmd).await,
        Command::Rules(cmd) => rules::run(&mut client, cmd).await,
        Command::Services { source } => services::list(&mut client, source).await,
        Command::Certs(cmd) => certs::run(&mut client, cmd).await,
        // Answered above, without shuntd.
        Command::DevCerts { .. } => Ok(String::new()),
    }
}

/// Turns a gRPC status into an error that shows shuntd's message, which names the bad field.
pub(crate) fn rpc_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("shuntd refused: {}", status.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
