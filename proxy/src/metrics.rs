//! The proxy's Prometheus metrics. Names are a stable surface; label values
//! come from config (listener and rule names) or fixed sets, never from
//! client input. Listener families carry a `direction` label (`inbound`,
//! `outbound`), and every per-request handle is resolved once per listener
//! ([`RequestMetrics`], [`ConnMetrics`], and the stages' own).

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// Which way a listener's traffic goes: a label value on its metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// mTLS from peers to the local app.
    Inbound,
    /// Plain from the local app to an mTLS destination.
    Outbound,
}

impl Direction {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

/// Handles to every proxy metric.
#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Connections accepted, by listener.
    pub conns_opened: IntCounterVec,
    /// Connections ended, by listener.
    pub conns_closed: IntCounterVec,
    /// Connections open now, by listener.
    pub conns_open: IntGaugeVec,
    /// Refused handshakes, by listener and reason.
    pub handshake_failures: IntCounterVec,
    /// Requests answered, by listener and status class (`2xx`..`5xx`).
    pub requests: IntCounterVec,
    /// Requests refused before the app saw them, by listener and reason.
    pub rejected: IntCounterVec,
    /// Authorization decisions, by listener, rule (`default` when none matched) and result.
    pub authz: IntCounterVec,
    /// Request latency through the proxy, by listener.
    pub latency: HistogramVec,
    /// NotAfter of the current certificate, unix seconds (0: none).
    pub cert_expiry: Gauge,
    /// NotAfter of each level of the proxy's own chain (`leaf`,
    /// `intermediate`, `root`: the first root of its bundle to expire).
    pub chain_expiry: GaugeVec,
    /// Certificate renewals and reloads, by result.
    pub renewals: IntCounterVec,
    /// Config reloads, by result.
    pub config_reloads: IntCounterVec,
    /// Access-log lines dropped by its rate limit.
    pub access_log_dropped: IntCounter,
    /// Model API protection.
    pub model: warden_guard::metrics::ModelMetrics,
    /// The trust feed pushed by the CA (bundle and deny list).
    pub trust: TrustMetrics,
    /// Open connections closed because their peer was denied, by listener.
    pub revoked: IntCounterVec,
}

/// The trust feed's state, for alerts: a proxy that stopped syncing keeps
/// working on its cached copy, and says so here.
#[derive(Debug, Clone)]
pub struct TrustMetrics {
    /// Sequence number of the feed this proxy applied (0: none yet).
    pub sequence: IntGauge,
    /// When the proxy last heard from the CA's feed, unix seconds (0: never).
    pub last_sync: Gauge,
    /// Seconds since then (updated every second while the feed runs).
    pub sync_age: Gauge,
    /// Identities on the deny list now.
    pub denied: IntGauge,
    /// Failed calls to the feed.
    pub failures: IntCounter,
}

impl ProxyMetrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let conns_opened = counter(
            "warden_proxy_connections_opened_total",
            "Connections accepted.",
            &["direction", "listener"],
        )?;
        let conns_closed = counter(
            "warden_proxy_connections_closed_total",
            "Connections ended.",
            &["direction", "listener"],
        )?;
        let handshake_failures = counter(
            "warden_proxy_handshake_failures_total",
            "Refused TLS handshakes by reason: peers refused inbound, destinations outbound.",
            &["direction", "listener", "reason"],
        )?;
        let requests = counter(
            "warden_proxy_requests_total",
            "Requests by status class.",
            &["direction", "listener", "class"],
        )?;
        let rejected = counter(
            "warden_proxy_rejected_requests_total",
            "Requests refused before reaching the app, by reason.",
            &["direction", "listener", "reason"],
        )?;
        let authz = counter(
            "warden_proxy_authz_decisions_total",
            "Authorization decisions by rule and result.",
            &["listener", "rule", "result"],
        )?;
        let renewals = counter(
            "warden_proxy_certificate_renewals_total",
            "Certificate renewals and reloads by result.",
            &["result"],
        )?;
        let config_reloads = counter(
            "warden_proxy_config_reloads_total",
            "Config reloads by result.",
            &["result"],
        )?;
        let conns_open = IntGaugeVec::new(
            Opts::new("warden_proxy_connections_open", "Connections open now."),
            &["direction", "listener"],
        )?;
        registry.register(Box::new(conns_open.clone()))?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "warden_proxy_request_duration_seconds",
                "Request latency through the proxy.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["direction", "listener"],
        )?;
        registry.register(Box::new(latency.clone()))?;
        let cert_expiry = Gauge::new(
            "warden_proxy_certificate_expiry_timestamp_seconds",
            "NotAfter of the current certificate, unix seconds (0: none).",
        )?;
        registry.register(Box::new(cert_expiry.clone()))?;
        let chain_expiry = GaugeVec::new(
            Opts::new(
                "warden_proxy_chain_expiry_timestamp_seconds",
                "NotAfter of each level of the proxy's own chain (leaf, intermediate, root: the first root of its bundle to expire), unix seconds.",
            ),
            &["level"],
        )?;
        registry.register(Box::new(chain_expiry.clone()))?;
        let access_log_dropped = IntCounter::new(
            "warden_proxy_access_log_dropped_total",
            "Access-log lines dropped by the log's rate limit.",
        )?;
        registry.register(Box::new(access_log_dropped.clone()))?;
        let revoked = counter(
            "warden_proxy_connections_revoked_total",
            "Open connections closed because the CA denied their peer's identity.",
            &["direction", "listener"],
        )?;
        let trust = TrustMetrics {
            sequence: IntGauge::new(
                "warden_proxy_trust_sequence",
                "Sequence number of the CA's trust feed this proxy applied (0: none yet).",
            )?,
            last_sync: Gauge::new(
                "warden_proxy_trust_last_sync_timestamp_seconds",
                "When the proxy last heard from the CA's trust feed, unix seconds (0: never).",
            )?,
            sync_age: Gauge::new(
                "warden_proxy_trust_sync_age_seconds",
                "Seconds since the proxy last heard from the CA's trust feed.",
            )?,
            denied: IntGauge::new(
                "warden_proxy_trust_denied_identities",
                "Identities on the deny list this proxy enforces.",
            )?,
            failures: IntCounter::new(
                "warden_proxy_trust_sync_failures_total",
                "Failed calls to the CA's trust feed.",
            )?,
        };
        registry.register(Box::new(trust.sequence.clone()))?;
        registry.register(Box::new(trust.last_sync.clone()))?;
        registry.register(Box::new(trust.sync_age.clone()))?;
        registry.register(Box::new(trust.denied.clone()))?;
        registry.register(Box::new(trust.failures.clone()))?;
        warden_identity::admin::register_process(&registry)?;
        let model = warden_guard::metrics::ModelMetrics::new(&registry)?;
        Ok(Self {
            access_log_dropped,
            model,
            registry,
            conns_opened,
            conns_closed,
            conns_open,
            handshake_failures,
            requests,
            rejected,
            authz,
            latency,
            cert_expiry,
            chain_expiry,
            renewals,
            config_reloads,
            trust,
            revoked,
        })
    }
}

impl ProxyMetrics {
    /// Listener `name`'s connection counters.
    pub fn connections(&self, direction: Direction, name: &str) -> ConnMetrics {
        let labels = [direction.label(), name];
        ConnMetrics {
            opened: self.conns_opened.with_label_values(&labels),
            closed: self.conns_closed.with_label_values(&labels),
            open: self.conns_open.with_label_values(&labels),
        }
    }
}

/// One listener's connection counters, resolved once.
#[derive(Debug, Clone)]
pub struct ConnMetrics {
    /// Accepted.
    pub opened: IntCounter,
    /// Ended.
    pub closed: IntCounter,
    /// Open now.
    pub open: IntGauge,
}

/// One listener's per-request metrics, resolved once: the request path
/// touches atomics only, no label lookups.
#[derive(Debug, Clone)]
pub struct RequestMetrics {
    by_class: [IntCounter; 5],
    latency: Histogram,
}

impl RequestMetrics {
    /// The handles for listener `name`.
    pub fn new(metrics: &ProxyMetrics, direction: Direction, name: &str) -> Self {
        let d = direction.label();
        let class = |c: &str| metrics.requests.with_label_values(&[d, name, c]);
        Self {
            by_class: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            latency: metrics.latency.with_label_values(&[d, name]),
        }
    }

    /// Counts an answer with `status`, ended `seconds` after the request arrived.
    pub fn observe(&self, status: http::StatusCode, seconds: f64) {
        let i = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.by_class[i].inc();
        self.latency.observe(seconds);
    }
}
