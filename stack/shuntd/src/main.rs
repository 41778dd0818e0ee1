//! `shuntd`: see the crate docs in lib.rs.

use std::path::PathBuf;

use clap::Parser;
use shuntd::config::Config;

/// Shunt's node service: attaches apps, joins co-located ones through shared memory, and serves
/// the control API and Prometheus metrics.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// YAML configuration; keys it sets replace the built-in default's.
    #[arg(short, long, env = "SHUNTD_CONFIG")]
    config: Option<PathBuf>,
    /// Override `app_socket`.
    #[arg(long)]
    app_socket: Option<PathBuf>,
    /// Override `control_socket`.
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Override `metrics_address` (ip:port, or "" to disable).
    #[arg(long)]
    metrics_address: Option<String>,
    /// Override `workers`.
    #[arg(long)]
    workers: Option<usize>,
    /// Print the effective configuration as YAML and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(p) = args.app_socket {
        config.app_socket = p;
    }
    if let Some(p) = args.control_socket {
        config.control_socket = p;
    }
    if let Some(a) = args.metrics_address {
        config.metrics_address = a;
    }
    if let Some(w) = args.workers {
        config.workers = w;
    }
    if args.print_config {
        print!("{}", serde_yaml_ng::to_string(&config)?);
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let bound = shuntd::build(&config).await?;
        tokio::select! {
            r = bound.wait() => r,
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("shutting down");
                Ok(())
            }
        }
    })
}
