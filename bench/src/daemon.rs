//! shuntd, run inside the bench process on private sockets.
//!
//! Running it in-process keeps the bench self-contained (no installed daemon, no shared
//! `/run/shunt`), and costs nothing in the measurements: shuntd only sets sessions up, it is
//! not in their data path.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};

use anyhow::Context;
use shunt_client::{AttachOptions, Worker};

/// Each measurement listens on its own address so that a session left over from a previous
/// measurement can never be mistaken for the new one.
static NEXT_PORT: AtomicU16 = AtomicU16::new(20_000);

pub(crate) struct Daemon {
    // Holds the sockets; removed when the bench ends.
    dir: tempfile::TempDir,
    metrics: std::net::SocketAddr,
}

impl Daemon {
    pub(crate) fn start() -> anyhow::Result<Daemon> {
        let dir = tempfile::Builder::new().prefix("shunt-bench").tempdir()?;
        // Metrics on loopback, unused unless scraped: how a run proves cut-through applied.
        let mut config = shuntd::config::Config::private(dir.path());
        // One app-server thread is plenty for setup traffic and leaves the cores to the apps.
        config.workers = 1;

        let bg = shuntd::background::spawn(config).context("in-process shuntd")?;
        let metrics = bg
            .metrics_address
            .context("in-process shuntd serves no metrics")?;
        Ok(Daemon { dir, metrics })
    }

    /// The value of one series on shuntd's `/metrics` (`name{labels}` as printed), 0 when absent.
    pub(crate) fn metric(&self, series: &str) -> anyhow::Result<f64> {
        let text = crate::http::get(self.metrics, "/metrics").context("shuntd /metrics")?;
        for line in text.lines() {
            if let Some(value) = line.strip_prefix(series).and_then(|r| r.strip_prefix(' ')) {
                return value
                    .trim()
                    .parse()
                    .with_context(|| format!("shuntd metric `{line}`"));
            }
        }
        Ok(0.0)
    }

    pub(crate) fn socket(&self) -> PathBuf {
        self.dir.path().join("shuntd.sock")
    }

    pub(crate) fn attach(&self, name: &str) -> anyhow::Result<Worker> {
        self.attach_polling(name, std::time::Duration::ZERO)
    }

    /// Attaches a worker whose blocking calls poll for `busy_poll` before sleeping.
    pub(crate) fn attach_polling(
        &self,
        name: &str,
        busy_poll: std::time::Duration,
    ) -> anyhow::Result<Worker> {
        self.attach_with(AttachOptions::new(self.socket()).busy_poll(busy_poll), name)
    }

    /// Attaches a worker with `options` (whose socket is this shuntd's).
    pub(crate) fn attach_with(&self, options: AttachOptions, name: &str) -> anyhow::Result<Worker> {
        Worker::attach(options.app_name(name))
            .with_context(|| format!("attach `{name}` to the in-process shuntd"))
    }

    /// A fresh path for a Unix-socket baseline, next to shuntd's own sockets.
    pub(crate) fn unix_path(&self, tag: &str) -> PathBuf {
        let n = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        self.dir.path().join(format!("{tag}-{n}.sock"))
    }
}

/// A cut-through endpoint no earlier measurement used.
pub(crate) fn fresh_endpoint() -> std::net::SocketAddr {
    let port = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}
