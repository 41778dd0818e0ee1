//! shuntd on a thread of its own, for programs that embed it (benchmarks, tests).

use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context;

use crate::config::Config;

/// A shuntd running on its own thread and single-threaded runtime. It stops with the process.
#[derive(Debug)]
pub struct Background {
    /// Where `/metrics` is served, if `metrics_address` was set (port 0 picks a free port).
    pub metrics_address: Option<SocketAddr>,
}

/// Starts shuntd with `config` on a new thread and returns once its sockets are bound.
pub fn spawn(config: Config) -> anyhow::Result<Background> {
    let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<Option<SocketAddr>>>();
    std::thread::Builder::new()
        .name("shuntd".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            rt.block_on(async move {
                match crate::build(&config).await {
                    Ok(bound) => {
                        let _ = ready_tx.send(Ok(bound.metrics_address));
                        if let Err(e) = bound.wait().await {
                            tracing::error!(error = %format!("{e:#}"), "embedded shuntd stopped");
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
        })?;
    let metrics_address = ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("embedded shuntd did not start within 10 s")??;
    Ok(Background { metrics_address })
}
