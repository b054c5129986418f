//! The CA's Prometheus metrics. Names are a stable surface (pinned by a test);
//! every label value comes from a fixed set, never from client input.

use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Handles to every CA metric.
#[derive(Debug, Clone)]
pub struct CaMetrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Certificate requests by kind (`bootstrap`, `renewal`, `offline`, `self`) and result (`issued`, `refused`).
    pub issuances: IntCounterVec,
    /// Refused requests by reason (see `Refusal::reason`).
    pub refusals: IntCounterVec,
    /// Deny reports (`POST /v1/deny`) by result (`denied`, `already_denied`, `refused`).
    pub deny_reports: IntCounterVec,
    /// TLS handshakes the API server refused, by reason.
    pub handshake_failures: IntCounterVec,
    /// NotAfter of the CA's certificates (`root`, `intermediate`, `serving`), unix seconds.
    pub cert_expiry: GaugeVec,
    /// NotAfter of every root and intermediate not retired, by `kind`,
    /// `state` and `id` (the first 16 hex characters of its SHA-256).
    pub chain_expiry: GaugeVec,
    /// Failed steps of automatic intermediate rotation.
    pub rotation_failures: IntCounter,
    /// The trust feed's sequence number as this server last read it.
    pub trust_sequence: IntGauge,
    /// Proxies waiting on `GET /v1/watch` now.
    pub trust_watchers: IntGauge,
}

impl CaMetrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        warden_identity::admin::register_process(&registry)?;
        let issuances = IntCounterVec::new(
            Opts::new(
                "warden_ca_issuances_total",
                "Certificate requests by kind and result.",
            ),
            &["kind", "result"],
        )?;
        let refusals = IntCounterVec::new(
            Opts::new(
                "warden_ca_refusals_total",
                "Refused CA API requests (certify and deny) by reason.",
            ),
            &["reason"],
        )?;
        let deny_reports = IntCounterVec::new(
            Opts::new(
                "warden_ca_deny_reports_total",
                "Requests from deny reporters to deny an identity, by result.",
            ),
            &["result"],
        )?;
        let handshake_failures = IntCounterVec::new(
            Opts::new(
                "warden_ca_handshake_failures_total",
                "TLS handshakes refused by the CA API, by reason.",
            ),
            &["reason"],
        )?;
        let cert_expiry = GaugeVec::new(
            Opts::new(
                "warden_ca_certificate_expiry_timestamp_seconds",
                "NotAfter of the CA's own certificates, unix seconds.",
            ),
            &["cert"],
        )?;
        let trust_sequence = IntGauge::new(
            "warden_ca_trust_sequence",
            "Sequence number of the trust feed (bundle and deny list) this server serves.",
        )?;
        let trust_watchers = IntGauge::new(
            "warden_ca_trust_watchers",
            "Proxies waiting on the trust feed (GET /v1/watch) now.",
        )?;
        let chain_expiry = GaugeVec::new(
            Opts::new(
                "warden_ca_chain_expiry_timestamp_seconds",
                "NotAfter of every root and intermediate of the CA that is not retired, unix seconds.",
            ),
            &["kind", "state", "id"],
        )?;
        registry.register(Box::new(chain_expiry.clone()))?;
        let rotation_failures = IntCounter::new(
            "warden_ca_rotation_failures_total",
            "Failed steps of automatic intermediate rotation (the current intermediate keeps signing).",
        )?;
        registry.register(Box::new(rotation_failures.clone()))?;
        registry.register(Box::new(trust_sequence.clone()))?;
        registry.register(Box::new(trust_watchers.clone()))?;
        registry.register(Box::new(issuances.clone()))?;
        registry.register(Box::new(refusals.clone()))?;
        registry.register(Box::new(deny_reports.clone()))?;
        registry.register(Box::new(handshake_failures.clone()))?;
        registry.register(Box::new(cert_expiry.clone()))?;
        Ok(Self {
            registry,
            issuances,
            refusals,
            deny_reports,
            handshake_failures,
            cert_expiry,
            chain_expiry,
            rotation_failures,
            trust_sequence,
            trust_watchers,
        })
    }
}
