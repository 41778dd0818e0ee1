//! Prometheus metrics, refreshed from the session layer at each scrape so the data path never
//! pays for them.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use shunt_session::SessionLayer;

use crate::app_server::ServerCounters;

pub struct Metrics {
    registry: Registry,
    layer: Arc<SessionLayer>,
    server: Arc<ServerCounters>,
    apps: IntGauge,
    app_workers: IntGauge,
    listeners: IntGauge,
    sessions: IntGaugeVec,
    half_open: IntGauge,
    segments: IntGaugeVec,
    ct_bytes: IntCounter,
    fifo_full: IntCounter,
    notifications: IntCounter,
    rule_hits: IntCounterVec,
    attach_failures: IntCounterVec,
    connects: IntCounter,
    standby_connects: IntCounter,
    standby_revocations: IntCounter,
    standby_revocations_undelivered: IntCounter,
    connect_failures: IntCounterVec,
    pairings: IntCounterVec,
    decode_errors: IntCounter,
    control_refusals: IntCounter,
    services: IntGauge,
    service_endpoints: IntGauge,
    limit_refusals: IntCounterVec,
    resume_refusals: IntCounterVec,
    refused_connections: IntCounterVec,
    accept_errors: IntCounterVec,
    socket_full: IntCounter,
}

/// Moves a counter up to `value`; counters only ever rise, and the sources are monotonic.
fn raise(counter: &IntCounter, value: u64) {
    let current = counter.get();
    if value > current {
        counter.inc_by(value - current);
    }
}

impl Metrics {
    pub fn new(layer: Arc<SessionLayer>, server: Arc<ServerCounters>) -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("shunt".into()), None)?;
        server.sidecar_usage.register(&registry)?;
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let gauge_vec =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntGaugeVec> {
                let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(g.clone()))?;
                Ok(g)
            };
        Ok(Self {
            apps: gauge("apps_attached", "Apps currently attached.")?,
            app_workers: gauge("app_workers_attached", "App workers currently attached.")?,
            listeners: gauge("listeners", "Listeners currently open.")?,
            sessions: gauge_vec(
                "sessions",
                "Sessions by transport and state.",
                &["transport", "state"],
            )?,
            half_open: gauge("half_open_sessions", "Connects in progress.")?,
            segments: gauge_vec(
                "segments",
                "Shared-memory segments by transport.",
                &["transport"],
            )?,
            ct_bytes: counter(
                "cut_through_bytes_total",
                "Bytes written into cut-through FIFOs.",
            )?,
            fifo_full: counter(
                "fifo_full_events_total",
                "Writes that found a cut-through FIFO full.",
            )?,
            notifications: counter(
                "notifications_sent_total",
                "Data notifications peers sent each other.",
            )?,
            rule_hits: counter_vec(
                "rule_hits_total",
                "Rule matches by table and action.",
                &["table", "action"],
            )?,
            attach_failures: counter_vec(
                "attach_failures_total",
                "Refused attaches by reason.",
                &["reason"],
            )?,
            connects: counter("connects_total", "Connects established.")?,
            standby_connects: counter(
                "standby_connects_total",
                "Connects established in standby, for clients that preconnect (also in connects_total).",
            )?,
            standby_revocations: counter(
                "standby_revocations_total",
                "Policy changes that made every worker drop its standby sessions.",
            )?,
            standby_revocations_undelivered: counter(
                "standby_revocations_undelivered_total",
                "Workers that could not be told of a standby revocation (event queue full or gone).",
            )?,
            connect_failures: counter_vec(
                "connect_failures_total",
                "Failed connects by reason.",
                &["reason"],
            )?,
            pairings: counter_vec(
                "pairings_total",
                "Pairing offers answered, by result (paired, or why not).",
                &["result"],
            )?,
            decode_errors: counter(
                "sapi_decode_errors_total",
                "Malformed session-API messages received.",
            )?,
            control_refusals: counter(
                "control_refusals_total",
                "Control API calls refused for the caller's user and group.",
            )?,
            // Totals only: a label per source or cluster would grow with the mesh.
            services: gauge(
                "services",
                "Services config sources describe, in all sources.",
            )?,
            service_endpoints: gauge(
                "service_endpoints",
                "Endpoints of the services config sources describe, in all sources.",
            )?,
            limit_refusals: counter_vec(
                "limit_refusals_total",
                "Requests refused at a cap, by resource and by whose cap (uid or namespace).",
                &["resource", "holder"],
            )?,
            resume_refusals: counter_vec(
                "resume_refusals_total",
                "Sessions reported as carried over from an earlier shuntd and refused, by reason.",
                &["reason"],
            )?,
            refused_connections: counter_vec(
                "app_connections_refused_total",
                "App-socket connections closed before they attached, by reason.",
                &["reason"],
            )?,
            accept_errors: counter_vec(
                "app_socket_accept_errors_total",
                "Failed accepts on the app socket, by reason.",
                &["reason"],
            )?,
            socket_full: counter(
                "app_socket_full_total",
                "Deliveries that found an app's socket full and waited for the app to read.",
            )?,
            registry,
            layer,
            server,
        })
    }

    fn refresh(&self) {
        let counts = self.layer.counts();
        self.apps.set(counts.apps as i64);
        self.app_workers.set(counts.workers as i64);
        self.listeners.set(counts.listeners as i64);
        self.half_open.set(counts.half_open as i64);
        let services = self.layer.service_counts();
        self.services.set(services.services as i64);
        self.service_endpoints.set(services.endpoints as i64);
        self.sessions.reset();
        for s in self.layer.sessions() {
            self.sessions
                .with_label_values(&[s.transport.as_str(), s.state.as_str()])
                .inc();
        }
        let ct = self.layer.cut_through();
        self.segments
            .with_label_values(&["cut-through"])
            .set(ct.segment_count() as i64);
        let totals = ct.totals();
        raise(&self.ct_bytes, totals.bytes);
        raise(&self.fifo_full, totals.full_events);
        raise(&self.notifications, totals.notifications);
        let c = &self.layer.counters;
        for ((table, action), n) in c.rule_hits.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            raise(
                &self.rule_hits.with_label_values(&[table.as_str(), action]),
                *n,
            );
        }
        for (reason, n) in c
            .attach_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            raise(&self.attach_failures.with_label_values(&[reason]), *n);
        }
        for (reason, n) in c
            .connect_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            raise(&self.connect_failures.with_label_values(&[reason]), *n);
        }
        for (result, n) in c.pairings.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            raise(&self.pairings.with_label_values(&[result]), *n);
        }
        raise(&self.connects, c.connects.load(Ordering::Relaxed));
        raise(
            &self.standby_connects,
            c.standby_connects.load(Ordering::Relaxed),
        );
        raise(
            &self.standby_revocations,
            c.standby_revocations.load(Ordering::Relaxed),
        );
        raise(
            &self.standby_revocations_undelivered,
            c.standby_revocations_undelivered.load(Ordering::Relaxed),
        );
        raise(
            &self.decode_errors,
            self.server.decode_errors.load(Ordering::Relaxed),
        );
        raise(
            &self.control_refusals,
            self.server.control_refusals.load(Ordering::Relaxed),
        );
        for ((resource, holder), n) in c
            .limit_refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            raise(
                &self
                    .limit_refusals
                    .with_label_values(&[resource.as_str(), holder.as_str()]),
                *n,
            );
        }
        let by_reason = [
            (&self.resume_refusals, &c.resume_refusals),
            (&self.refused_connections, &self.server.refused_connections),
            (&self.accept_errors, &self.server.accept_errors),
        ];
        for (family, counts) in by_reason {
            for (reason, n) in counts.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                raise(&family.with_label_values(&[reason]), *n);
            }
        }
        raise(
            &self.socket_full,
            self.server.socket_full.load(Ordering::Relaxed),
        );
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        self.refresh();
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve(
    metrics: Arc<Metrics>,
    listener: tokio::net::TcpListener,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let m = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    m.render(),
                )
            }
        }),
    );
    axum::serve(listener, app).await
}
