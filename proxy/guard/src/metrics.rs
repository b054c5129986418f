//! Model API metrics. Labels are listener and route names from config, quota
//! names compiled from config, and fixed sets; never client input (not even
//! SPIFFE IDs: an operator finds the identity in the logs).

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Every model API metric, registered once per proxy.
#[derive(Debug, Clone)]
pub struct ModelMetrics {
    /// Admission decisions by listener, route and result.
    pub decisions: IntCounterVec,
    /// Refusals by the quota that refused.
    pub quota_refusals: IntCounterVec,
    /// Units charged at settlement, by unit.
    pub charged: IntCounterVec,
    /// Admitted requests whose answer is not settled yet.
    pub reservations: IntGaugeVec,
    /// Tokens reserved and not settled yet.
    pub reserved_tokens: IntGaugeVec,
    /// Extraction suspicion score per observed query.
    pub suspicion: HistogramVec,
    /// Escalations, by the step reached.
    pub escalations: IntCounterVec,
    /// Identities tracked by the extraction detector.
    pub tracked: IntGaugeVec,
    /// Shared-state errors, by what was done (`open`: let through, `closed`: refused).
    pub store_errors: IntCounterVec,
    /// Streams cut at their reservation.
    pub streams_cut: IntCounterVec,
    /// Requests to the CA to deny an identity, by result.
    pub ca_reports: IntCounterVec,
}

impl ModelMetrics {
    /// Creates and registers every metric in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &["listener", "route"])?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let route = &["listener", "route"];
        let suspicion = HistogramVec::new(
            HistogramOpts::new(
                "warden_model_suspicion_score",
                "Extraction suspicion score of each observed query's caller.",
            )
            .buckets(vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),
            route,
        )?;
        registry.register(Box::new(suspicion.clone()))?;
        Ok(Self {
            decisions: counter(
                "warden_model_decisions_total",
                "Model API admission decisions by result.",
                &["listener", "route", "result"],
            )?,
            quota_refusals: counter(
                "warden_model_quota_refusals_total",
                "Requests refused (or, in shadow mode, that would be) by the quota that refused them.",
                &["listener", "route", "quota"],
            )?,
            charged: counter(
                "warden_model_charged_total",
                "Units charged at settlement: tokens, logprob_tokens, logit_bias, vectors.",
                &["listener", "route", "unit"],
            )?,
            reservations: gauge(
                "warden_model_reservations_outstanding",
                "Admitted requests not settled yet.",
            )?,
            reserved_tokens: gauge(
                "warden_model_reserved_tokens",
                "Tokens reserved by requests not settled yet.",
            )?,
            suspicion,
            escalations: counter(
                "warden_model_escalations_total",
                "Callers reaching an escalation step (warn, degrade, refuse, deny).",
                &["listener", "route", "step"],
            )?,
            tracked: gauge(
                "warden_model_tracked_identities",
                "Identities tracked by the extraction detector.",
            )?,
            store_errors: counter(
                "warden_model_store_errors_total",
                "Limit store (Redis) errors, by outcome: open (let through) or closed (refused).",
                &["listener", "route", "outcome"],
            )?,
            streams_cut: counter(
                "warden_model_streams_cut_total",
                "Streams ended by the proxy at their reservation.",
                route,
            )?,
            ca_reports: counter(
                "warden_model_ca_reports_total",
                "Requests to the CA to deny an identity, by result.",
                &["listener", "route", "result"],
            )?,
        })
    }
}

/// One route's handles, resolved once.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    /// The registry-wide handles, for labels only known later.
    pub all: ModelMetrics,
    /// Listener name.
    pub listener: String,
    /// Route name.
    pub route: String,
    /// Settled units: tokens, logprob tokens, logit_bias entries, vectors.
    pub charged: [IntCounter; 4],
    /// Holds outstanding.
    pub reservations: IntGauge,
    /// Tokens reserved.
    pub reserved_tokens: IntGauge,
    /// Suspicion scores.
    pub suspicion: Histogram,
    /// Streams cut.
    pub streams_cut: IntCounter,
    /// Tracked identities.
    pub tracked: IntGauge,
    /// Admitted requests (the per-request decision, resolved once).
    pub allowed: IntCounter,
}

impl RouteMetrics {
    /// The handles of `route` on `listener`.
    pub fn new(all: &ModelMetrics, listener: &str, route: &str) -> Self {
        let l = [listener, route];
        let unit = |u: &str| all.charged.with_label_values(&[listener, route, u]);
        Self {
            all: all.clone(),
            listener: listener.to_owned(),
            route: route.to_owned(),
            charged: [
                unit("tokens"),
                unit("logprob_tokens"),
                unit("logit_bias"),
                unit("vectors"),
            ],
            reservations: all.reservations.with_label_values(&l),
            reserved_tokens: all.reserved_tokens.with_label_values(&l),
            suspicion: all.suspicion.with_label_values(&l),
            streams_cut: all.streams_cut.with_label_values(&l),
            tracked: all.tracked.with_label_values(&l),
            allowed: all
                .decisions
                .with_label_values(&[listener, route, "allowed"]),
        }
    }

    /// Counts a decision.
    pub fn decision(&self, result: &str) {
        self.all
            .decisions
            .with_label_values(&[&self.listener, &self.route, result])
            .inc();
    }
}
