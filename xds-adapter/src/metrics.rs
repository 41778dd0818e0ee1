//! The adapter's Prometheus metrics, served at `/metrics`.

use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{Encoder, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::resource::ResourceType;

pub struct Metrics {
    registry: Registry,
    connected: IntGaugeVec,
    updates: IntCounterVec,
    resources: IntGaugeVec,
    last_update: IntGauge,
    last_update_age: IntGauge,
    translation_errors: IntCounterVec,
    connection_terminations: IntCounterVec,
    shuntd_applies: IntCounterVec,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique and valid");
    c
}

impl Default for Metrics {
    fn default() -> Self {
        let r = Registry::new();
        Metrics {
            connected: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "shunt_xds_connected",
                        "1 while the stream to this xDS server is up",
                    ),
                    &["stream"],
                )
                .expect("valid"),
            ),
            updates: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "shunt_xds_updates_total",
                        "xDS responses by type and outcome (accepted: ACKed; rejected: NACKed)",
                    ),
                    &["type", "result"],
                )
                .expect("valid"),
            ),
            resources: register(
                &r,
                IntGaugeVec::new(
                    Opts::new("shunt_xds_resources", "Accepted resources by type"),
                    &["type"],
                )
                .expect("valid"),
            ),
            last_update: register(
                &r,
                IntGauge::new(
                    "shunt_xds_last_update_timestamp_seconds",
                    "When an update was last accepted (Unix time)",
                )
                .expect("valid"),
            ),
            last_update_age: register(
                &r,
                IntGauge::new(
                    "shunt_xds_last_update_age_seconds",
                    "Seconds since an update was last accepted (-1: never)",
                )
                .expect("valid"),
            ),
            translation_errors: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "shunt_xds_translation_errors_total",
                        "Resources refused, by reason",
                    ),
                    &["reason"],
                )
                .expect("valid"),
            ),
            connection_terminations: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "shunt_xds_connection_terminations_total",
                        "Ended xDS streams, by reason",
                    ),
                    &["reason"],
                )
                .expect("valid"),
            ),
            shuntd_applies: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "shunt_xds_shuntd_applies_total",
                        "Table swaps sent to shuntd, by outcome",
                    ),
                    &["result"],
                )
                .expect("valid"),
            ),
            registry: r,
        }
    }
}

impl Metrics {
    pub fn connected(&self, stream: &str, up: bool) {
        self.connected
            .with_label_values(&[stream])
            .set(i64::from(up));
    }

    pub fn update(&self, kind: ResourceType, accepted: bool) {
        let result = if accepted { "accepted" } else { "rejected" };
        self.updates
            .with_label_values(&[kind.short_name(), result])
            .inc();
    }

    pub fn resources(&self, kind: ResourceType, count: usize) {
        self.resources
            .with_label_values(&[kind.short_name()])
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub fn updated_at(&self, at: SystemTime) {
        let secs = at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.last_update
            .set(i64::try_from(secs).unwrap_or(i64::MAX));
    }

    pub fn translation_error(&self, reason: &str) {
        self.translation_errors.with_label_values(&[reason]).inc();
    }

    pub fn terminated(&self, reason: &str) {
        self.connection_terminations
            .with_label_values(&[reason])
            .inc();
    }

    pub fn shuntd_apply(&self, ok: bool) {
        self.shuntd_applies
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    /// The text exposition, with the update age computed now.
    pub fn render(&self) -> String {
        let last = self.last_update.get();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.last_update_age.set(if last == 0 {
            -1
        } else {
            i64::try_from(now).unwrap_or(i64::MAX) - last
        });
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Serves `/metrics` until the listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: std::sync::Arc<Metrics>,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    metrics.render(),
                )
            }
        }),
    );
    axum::serve(listener, app).await
}
