//! One protected model route, request by request:
//!
//! the gate: request rate and concurrency, before any work (429) -> read
//! the body (bounded in size and time, 413/408) -> parse it (400) ->
//! per-request information caps (400) -> extraction detection and its
//! escalation ladder (warn header, degrade, 429 abnormal-usage, CA deny) ->
//! admit the request's tokens, logprobs, logit_bias and vectors against
//! every limit of every level (429 quota-exceeded) -> forward (uncompressed)
//! -> count the answer (JSON usage or the stream as it passes) and settle.
//!
//! Shadow mode runs every step, counts and logs what would have been
//! refused, and lets the request through unchanged.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body::Body as HttpBody;
use http_body_util::{BodyExt, Limited};

use warden_config::SpiffeId;
use warden_config::model::{
    LimitMode, ModelApi, ModelRoute, OnStoreError, OutputDetail, PredictFormat,
};
use warden_identity::ratelog::LogLimiter;

use super::answer::{self, AnswerBody, USAGE_WARNING};
use super::detect::{
    Assessment, CoverageSettings, Detector, Ladder, LlmQuery, Query, Settings, Step,
};
use super::limits::{Ask, Headroom, Hold, Plan, Store, Subjects};
use super::meter::Metered;
use super::metrics::{ModelMetrics, RouteMetrics};
use super::outputs;
use super::record::Recorder;
use super::refusal::{self, GuardRefusal};
use super::report::Reporter;
use super::request::predict::Shape;
use super::request::{Call, ModelRequest};
use super::ticket::{Settler, Ticket};
use super::usage::{Reserved, Tally};

/// Errors an app's body can carry.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body's error, boxed (a named function: a closure here trips rustc's
/// inference of the error's lifetime in the `Send` check of the stage's future).
fn boxed<E: Into<BoxError>>(e: E) -> BoxError {
    e.into()
}

static LOG: LogLimiter = LogLimiter::new(20);

/// Longest time to receive a request body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A route's runtime: its config, limits, detector and metrics.
pub struct Route {
    cfg: ModelRoute,
    /// Request rates and concurrency: checked before the body is read.
    gate: Arc<Settler>,
    /// Tokens, logprob tokens, logit_bias entries, vectors: reserved once the body is read.
    budget: Arc<Settler>,
    policy_header: Option<HeaderValue>,
    max_top_logprobs: Option<u32>,
    max_logit_bias: Option<u32>,
    detector: Option<Detector>,
    reporter: Option<Reporter>,
}

/// A request past the gate: it holds a request-rate charge and a
/// concurrency slot until its answer is done.
pub struct Gate {
    ticket: Ticket,
    ratelimit: Option<HeaderValue>,
}

/// What an admitted request carries to its answer.
pub struct Admitted {
    /// The gate's hold (slots released when the answer is done).
    gate: Ticket,
    /// The request's reservations; None for a request without a body.
    budget: Option<(Ticket, ModelRequest, Reserved)>,
    outputs: OutputDetail,
    /// The `RateLimit` value: what is left of the tightest limit.
    ratelimit: Option<HeaderValue>,
    warning: Option<HeaderValue>,
    /// The caller of an embeddings request on a route with detection: its
    /// answer's embeddings are measured (the answer coverage).
    answered: Option<SpiffeId>,
}

impl Admitted {
    /// The app never answered: settle as nothing used.
    pub fn cancel(self) {
        if let Some((t, ..)) = self.budget {
            t.finish(Default::default(), false);
        }
        self.gate.finish(Default::default(), false);
    }
}

/// The routes of one listener, matched by path (first match wins).
pub struct Routes(Vec<Arc<Route>>);

impl Routes {
    /// Builds the runtime of every route of `listener`; each route keeps
    /// its limits in a store of its own made from `store`
    /// ([`Store::for_route`]), and has its own detector.
    pub fn new(
        listener: &str,
        cfg: &[ModelRoute],
        store: &Arc<Store>,
        metrics: &ModelMetrics,
        reporter: Option<Reporter>,
    ) -> Self {
        Self(
            cfg.iter()
                .map(|r| Arc::new(Route::new(listener, r, store, metrics, reporter.clone())))
                .collect(),
        )
    }

    /// The route covering the normalized `path`, read widely (any ASCII
    /// case, a trailing `/`): a respelled path must not escape its route.
    /// The call itself is then decided by the exact path, so a respelled
    /// endpoint is refused as not metered (fail closed). Shared, so a
    /// request's future can hold the route it was matched to.
    pub fn find(&self, path: &str) -> Option<&Arc<Route>> {
        self.0
            .iter()
            .find(|r| r.cfg.paths.iter().any(|p| p.matches_widely(path)))
    }

    /// The usage recorders of the routes that have one (`record:`), for the
    /// proxy to flush.
    pub fn recorders(&self) -> impl Iterator<Item = &Arc<Recorder>> {
        self.0.iter().filter_map(|r| r.gate.recorder.as_ref())
    }
}

fn min_cap(a: Option<u32>, b: Option<u32>) -> Option<u32> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The less revealing of two output details.
fn coarser(a: OutputDetail, b: OutputDetail) -> OutputDetail {
    use OutputDetail::{Decimals, Full, Label};
    match (a, b) {
        (Label, _) | (_, Label) => Label,
        (Decimals(x), Decimals(y)) => Decimals(x.min(y)),
        (Decimals(x), Full) | (Full, Decimals(x)) => Decimals(x),
        (Full, Full) => Full,
    }
}

impl Route {
    fn new(
        listener: &str,
        cfg: &ModelRoute,
        store: &Store,
        metrics: &ModelMetrics,
        reporter: Option<Reporter>,
    ) -> Self {
        let plan = Plan::new(&cfg.name, &cfg.limits);
        let policy_header = answer::policy_header(&plan);
        let (gate, budget) = plan.split();
        let l = &cfg.limits;
        let levels = [&l.identity, &l.namespace, &l.trust_domain];
        let max_top_logprobs = levels
            .iter()
            .fold(None, |c, s| min_cap(c, s.max_top_logprobs));
        let max_logit_bias = levels
            .iter()
            .fold(None, |c, s| min_cap(c, s.max_logit_bias));
        let detector = cfg.detection.as_ref().map(|d| {
            let defaults = Settings::default();
            // A fifth of the population learns the standardization, the rest the cells.
            let coverage = CoverageSettings {
                warmup: d.population / 5,
                min_population: d.population - d.population / 5,
                ..defaults.coverage
            };
            let detector = Detector::new(Settings {
                coverage,
                max_identities: d.max_identities,
                history: d.history,
                hidden_size: d.hidden_size,
                max_coverage: d.max_coverage.unwrap_or(0.0),
                ladder: d.ladder.map_or(defaults.ladder, |l| Ladder {
                    warn: l.warn,
                    degrade: l.degrade,
                    refuse: l.refuse,
                    deny: l.deny,
                }),
                ..defaults
            });
            if let Some(r) = &d.reference {
                detector.seed(&r.rows);
                detector.seed_texts(&r.texts);
            }
            detector
        });
        let reporter = reporter.filter(|_| cfg.detection.as_ref().is_some_and(|d| d.report_to_ca));
        let metrics = RouteMetrics::new(metrics, listener, &cfg.name);
        // The route's own state: no lock in common with any other route.
        let store = Arc::new(store.for_route());
        let recorder = cfg
            .record
            .as_ref()
            .map(|path| Arc::new(Recorder::new(&cfg.name, path)));
        Self {
            policy_header,
            gate: Arc::new(Settler {
                plan: gate,
                store: store.clone(),
                metrics: metrics.clone(),
                recorder: recorder.clone(),
            }),
            budget: Arc::new(Settler {
                plan: budget,
                store,
                metrics,
                recorder,
            }),
            cfg: cfg.clone(),
            max_top_logprobs,
            max_logit_bias,
            detector,
            reporter,
        }
    }

    fn metrics(&self) -> &RouteMetrics {
        &self.budget.metrics
    }

    fn shadow(&self) -> bool {
        self.cfg.mode == LimitMode::Shadow
    }

    /// Refuses with `refusal` (counted as `result`), or in shadow mode counts
    /// `shadow_<result>`, logs, and returns None to go on.
    fn refuse(
        &self,
        peer: &SpiffeId,
        result: &'static str,
        detail: &str,
        refusal: impl FnOnce() -> GuardRefusal,
    ) -> Option<GuardRefusal> {
        if self.shadow() {
            self.metrics().decision(&format!("shadow_{result}"));
            if LOG.allow() {
                tracing::warn!(route = %self.cfg.name, peer = %peer, result, detail, "shadow: would refuse this model request");
            }
            return None;
        }
        self.metrics().decision(result);
        if LOG.allow() {
            tracing::info!(route = %self.cfg.name, peer = %peer, result, detail, "model request refused");
        }
        Some(refusal())
    }

    /// The first step of every request: request rate and concurrency,
    /// before the body is read or parsed.
    pub async fn gate(&self, peer: &SpiffeId) -> Result<Gate, GuardRefusal> {
        let (ticket, headroom) = self
            .charge(&self.gate, peer, Ask::default(), false)
            .await
            .map_err(|r| self.warned(peer, r))?;
        let ratelimit = headroom.and_then(|h| answer::ratelimit_value(&self.gate.plan, h));
        Ok(Gate { ticket, ratelimit })
    }

    /// Everything else before the app for a request with a body (sent to
    /// the normalized `path`): the body to forward and the admission, or
    /// the refusal (with the warning header when the caller is suspected).
    pub async fn admit<B>(
        &self,
        peer: &SpiffeId,
        path: &str,
        body: B,
        gate: Gate,
    ) -> Result<(Bytes, Admitted), GuardRefusal>
    where
        B: HttpBody<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        self.admit_body(peer, path, body, gate)
            .await
            .map_err(|r| self.warned(peer, r))
    }

    /// A refusal to `peer`, with `warden-usage-warning` when it is at the
    /// warn step or above: every answer to a suspected caller says so.
    fn warned(&self, peer: &SpiffeId, refusal: GuardRefusal) -> GuardRefusal {
        match self.warning(self.step_of(peer)) {
            Some(w) => refusal.with_header(USAGE_WARNING.clone(), w),
            None => refusal,
        }
    }

    /// The caller's step now (None without detection).
    fn step_of(&self, peer: &SpiffeId) -> Option<Step> {
        self.detector.as_ref().map(|d| d.step(peer.as_str()))
    }

    /// The `warden-usage-warning` value for a caller at `step`: from the
    /// warn step on, and never in shadow mode.
    fn warning(&self, step: Option<Step>) -> Option<HeaderValue> {
        step.filter(|s| *s >= Step::Warn && !self.shadow())
            .map(|s| HeaderValue::from_static(s.label()))
    }

    async fn admit_body<B>(
        &self,
        peer: &SpiffeId,
        path: &str,
        body: B,
        gate: Gate,
    ) -> Result<(Bytes, Admitted), GuardRefusal>
    where
        B: HttpBody<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let bytes = self.read_body(body).await?;
        let mut request = match match self.cfg.api {
            ModelApi::Predict => ModelRequest::predict(&self.cfg.format, &bytes),
            api => ModelRequest::parse(api, path, &bytes, self.cfg.default_max_tokens),
        } {
            Ok(r) => r,
            Err(e) => {
                self.metrics().decision("bad_model_request");
                return Err(refusal::bad_request("bad_model_request", e.0));
            }
        };
        if let Some(w) = self.cfg.input_width
            && request.features.iter().any(|f| f.len() != w)
        {
            self.metrics().decision("bad_model_request");
            let detail = format!("this model takes feature vectors of {w} values");
            return Err(refusal::bad_request("bad_model_request", detail));
        }
        // Every request the detector can read is evidence, the ones an
        // information cap refuses too: thousands of refused probes are a signal.
        let mut outputs = self.cfg.outputs;
        let assessed = self.assess(peer, &request);
        if let Some(refused) = self.check_caps(peer, &request) {
            return Err(refused);
        }
        if let Some(step) = assessed {
            if step >= Step::Refuse {
                if let Some(r) = self.refuse(
                    peer,
                    "abnormal_usage",
                    "extraction suspected",
                    refusal::abnormal_usage,
                ) {
                    return Err(r);
                }
            } else if !self.shadow() && step >= Step::Degrade {
                request.strip_information();
                if let Some(d) = &self.cfg.detection {
                    outputs = coarser(outputs, d.degrade_outputs);
                }
            }
        }
        let warning = self.warning(assessed);
        let reserved = Reserved::of(&request);
        let (ticket, headroom) = self.charge(&self.budget, peer, reserved.ask, true).await?;
        self.metrics().allowed.inc();
        let forward = request.body(bytes);
        let answered =
            (request.call == Call::Embeddings && self.detector.is_some()).then(|| peer.clone());
        Ok((
            forward,
            Admitted {
                gate: gate.ticket,
                budget: Some((ticket, request, reserved)),
                outputs,
                ratelimit: headroom
                    .and_then(|h| answer::ratelimit_value(&self.budget.plan, h))
                    .or(gate.ratelimit),
                warning,
                answered,
            },
        ))
    }

    /// A request without a body (GET, HEAD, DELETE, OPTIONS, such as
    /// `GET /v1/models`): the gate is all it is counted against.
    pub fn admit_bodiless(&self, peer: &SpiffeId, gate: Gate) -> Result<Admitted, GuardRefusal> {
        let step = self.step_of(peer);
        if step.is_some_and(|s| s >= Step::Refuse)
            && let Some(r) = self.refuse(
                peer,
                "abnormal_usage",
                "extraction suspected",
                refusal::abnormal_usage,
            )
        {
            return Err(match self.warning(step) {
                Some(w) => r.with_header(USAGE_WARNING.clone(), w),
                None => r,
            });
        }
        self.metrics().allowed.inc();
        Ok(Admitted {
            gate: gate.ticket,
            budget: None,
            outputs: self.cfg.outputs,
            ratelimit: gate.ratelimit,
            warning: self.warning(step),
            answered: None,
        })
    }

    async fn read_body<B>(&self, body: B) -> Result<Bytes, GuardRefusal>
    where
        B: HttpBody<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let read = Limited::new(body.map_err(boxed::<B::Error>), self.cfg.max_body_bytes).collect();
        let (status, reason, detail) = match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
            Ok(Ok(b)) => return Ok(b.to_bytes()),
            Ok(Err(e))
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!(
                        "the request body is larger than {} bytes",
                        self.cfg.max_body_bytes
                    ),
                )
            }
            Ok(Err(_)) => (
                StatusCode::BAD_REQUEST,
                "bad_model_request",
                "the request body could not be read".to_owned(),
            ),
            Err(_) => (
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!("the request body took longer than {BODY_READ_TIMEOUT:?}"),
            ),
        };
        self.metrics().decision(reason);
        Err(GuardRefusal::new(status, reason, detail))
    }

    /// Charges `ask` against every limit of `settler`'s plan at every
    /// level, atomically.
    async fn charge(
        &self,
        settler: &Arc<Settler>,
        peer: &SpiffeId,
        ask: Ask,
        metered: bool,
    ) -> Result<(Ticket, Option<Headroom>), GuardRefusal> {
        let plan = &settler.plan;
        let ticket =
            |hold, room| Ok((Ticket::new(settler.clone(), peer, hold, ask, metered), room));
        if plan.is_empty() {
            return ticket(Hold::default(), None);
        }
        if let Some(q) = plan.larger_than_a_quota(&ask) {
            // Waiting cannot help: say so, without a Retry-After.
            let detail = format!("the request needs more than the whole {} quota", q.name);
            if let Some(r) = self.refuse(peer, "exceeds_quota", &detail, || {
                refusal::bad_request("request_exceeds_quota", detail.clone())
            }) {
                return Err(r);
            }
            return ticket(Hold::default(), None);
        }
        match settler.store.admit(plan, &Subjects::of(peer), &ask).await {
            Ok(Ok(hold)) => {
                let room = hold.headroom;
                ticket(hold, room)
            }
            Ok(Err(denial)) => {
                let quota = plan
                    .quotas
                    .get(denial.quota)
                    .map_or("", |q| q.name.as_str());
                let m = self.metrics();
                m.all
                    .quota_refusals
                    .with_label_values(&[m.listener.as_str(), m.route.as_str(), quota])
                    .inc();
                let detail = format!("{quota} exceeded");
                if let Some(r) = self.refuse(peer, "quota_exceeded", &detail, || {
                    refusal::quota_exceeded(plan, &self.policy_header, &denial)
                }) {
                    return Err(r);
                }
                ticket(Hold::default(), None)
            }
            Err(e) => {
                let m = self.metrics();
                let outcome = match self.cfg.on_store_error {
                    OnStoreError::Open => "open",
                    OnStoreError::Closed => "closed",
                };
                m.all
                    .store_errors
                    .with_label_values(&[m.listener.as_str(), m.route.as_str(), outcome])
                    .inc();
                if LOG.allow() {
                    tracing::error!(route = %self.cfg.name, error = %e, outcome, "limit store unavailable");
                }
                if self.cfg.on_store_error == OnStoreError::Closed {
                    m.decision("store_unavailable");
                    return Err(refusal::store_unavailable());
                }
                ticket(Hold::default(), None)
            }
        }
    }

    fn check_caps(&self, peer: &SpiffeId, r: &ModelRequest) -> Option<GuardRefusal> {
        let detail = if let Some(cap) = self
            .max_top_logprobs
            .filter(|c| r.logprobs && (r.top_logprobs > *c || *c == 0))
        {
            format!(
                "this route allows at most {cap} top_logprobs (0: no logprobs); the request asked for {}",
                r.top_logprobs
            )
        } else if let Some(cap) = self
            .max_logit_bias
            .filter(|c| r.logit_bias.len() > *c as usize)
        {
            format!(
                "this route allows at most {cap} logit_bias entries; the request has {}",
                r.logit_bias.len()
            )
        } else {
            return None;
        };
        self.refuse(peer, "information_limit", &detail, || {
            refusal::bad_request("information_limit", detail.clone())
        })
    }

    /// Observes the request; returns the caller's step (None without detection).
    fn assess(&self, peer: &SpiffeId, r: &ModelRequest) -> Option<Step> {
        let d = self.detector.as_ref()?;
        let id = peer.as_str();
        let before = d.step(id);
        let a = match r.call {
            Call::Predict => {
                let mut last = None;
                for f in &r.features {
                    last = Some(d.observe(id, Query::Features(f)));
                }
                last?
            }
            Call::Embeddings => {
                let inputs: Vec<&str> = r.inputs.iter().map(String::as_str).collect();
                d.observe(id, Query::Embeddings(&inputs))
            }
            Call::Chat | Call::Completion | Call::Responses => d.observe(
                id,
                Query::Llm(LlmQuery {
                    prompt: &r.text,
                    logprobs: r.logprobs,
                    top_logprobs: r.top_logprobs,
                    logit_bias: &r.logit_bias,
                    max_tokens: u32::try_from(r.max_tokens).unwrap_or(u32::MAX),
                }),
            ),
        };
        let m = self.metrics();
        m.suspicion.observe(a.score);
        m.tracked
            .set(i64::try_from(d.tracked()).unwrap_or(i64::MAX));
        self.escalated(peer, before, &a);
        Some(a.step)
    }

    /// Logs, counts and reports (at deny) a caller whose step an
    /// assessment moved up from `before`.
    fn escalated(&self, peer: &SpiffeId, before: Step, a: &Assessment) {
        let m = self.metrics();
        if a.step > before {
            m.all
                .escalations
                .with_label_values(&[m.listener.as_str(), m.route.as_str(), a.step.label()])
                .inc();
            tracing::warn!(route = %self.cfg.name, peer = %peer, step = a.step.label(), score = a.score, signals = ?a.signals, "extraction detection: caller escalated");
            // Steps are sticky: reaching deny happens once per caller, and so does the report.
            if a.step == Step::Deny {
                self.report(peer);
            }
        }
    }

    /// Measures the embeddings an answer to `peer` carries (B4B's coverage
    /// of the embedding space) and records the share for sizing; returns
    /// the caller's step after it. On a route with `max_coverage` an answer
    /// that takes its caller to the refuse step is not delivered (so nobody
    /// is answered past the share allowed), and neither is one whose
    /// embeddings cannot be measured.
    fn measure_answer(
        &self,
        peer: &SpiffeId,
        doc: &serde_json::Value,
    ) -> Result<Option<Step>, GuardRefusal> {
        let Some(d) = self.detector.as_ref() else {
            return Ok(None);
        };
        let listed = doc
            .get("data")
            .and_then(serde_json::Value::as_array)
            .map_or(0, Vec::len);
        let embeddings = crate::usage::embeddings(doc);
        let before = d.step(peer.as_str());
        let measured = (embeddings.len() == listed)
            .then(|| d.observe_answer(peer.as_str(), &embeddings))
            .flatten();
        let Some((a, share)) = measured else {
            if listed > 0 && d.bounds_answers() {
                self.metrics().decision("response_unmeasurable");
                return Err(refusal::bad_answer(
                    "model_response_unreadable",
                    "the embeddings in the model's answer cannot be measured (one width, float values, at most 8192)",
                ));
            }
            return Ok(None);
        };
        if let Some(r) = &self.budget.recorder {
            r.record_coverage(peer, share);
        }
        self.escalated(peer, before, &a);
        // A caller already at refuse was refused (or, in shadow mode,
        // counted) when it was admitted.
        if a.step >= Step::Refuse && before < Step::Refuse {
            let detail = format!("answers cover {share:.3} of the embedding space today");
            if let Some(r) = self.refuse(peer, "answer_withheld", &detail, refusal::abnormal_usage)
            {
                return Err(self.warned(peer, r));
            }
        }
        Ok(Some(a.step))
    }

    /// Asks the CA to stop renewing `peer` (called when it first reaches deny).
    fn report(&self, peer: &SpiffeId) {
        let Some(reporter) = &self.reporter else {
            return;
        };
        if self.shadow() {
            return;
        }
        let m = self.metrics().clone();
        reporter.report(
            peer.clone(),
            format!("abnormal usage of model route {}", self.cfg.name),
            Box::new(move |ok| {
                m.all
                    .ca_reports
                    .with_label_values(&[
                        m.listener.as_str(),
                        m.route.as_str(),
                        if ok { "ok" } else { "failed" },
                    ])
                    .inc();
            }),
        );
    }

    /// Counts the app's answer and settles; limits what a predict answer
    /// reveals; adds the rate-limit headers. Refuses an answer it cannot
    /// count or limit (502).
    pub async fn answer<B>(
        &self,
        adm: Admitted,
        resp: Response<B>,
    ) -> Result<Response<AnswerBody<B>>, GuardRefusal>
    where
        B: HttpBody<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        // Hop-by-hop headers are already gone (the inbound's forward).
        let (mut parts, body) = resp.into_parts();
        answer::add_headers(&mut parts.headers, adm.ratelimit.clone());
        if let Some(w) = adm.warning.clone() {
            parts.headers.insert(answer::USAGE_WARNING.clone(), w);
        }
        let Some((ticket, request, reserved)) = adm.budget else {
            // Nothing to count in the answer: the gate is settled, the body passed through.
            adm.gate.finish(Ask::default(), false);
            return Ok(Response::from_parts(parts, AnswerBody::Upstream(body)));
        };
        // warden asked for an uncompressed answer: one it cannot read, it cannot count or limit.
        let encoded = parts
            .headers
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        if encoded {
            self.metrics().decision("response_encoded");
            return Err(refusal::bad_answer(
                "model_response_unreadable",
                "the model's answer was compressed although the proxy asked for it uncompressed",
            ));
        }
        let is_stream = parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        if is_stream && parts.status.is_success() {
            parts.headers.remove(header::CONTENT_LENGTH);
            let metered = Metered::new(body, &request, reserved, ticket, adm.gate);
            return Ok(Response::from_parts(
                parts,
                AnswerBody::Metered(Box::new(metered)),
            ));
        }
        let bytes = match Limited::new(body.map_err(boxed::<B::Error>), self.cfg.max_response_bytes)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                // The tickets settle at their full reservation when dropped.
                self.metrics().decision("response_too_large");
                return Err(refusal::bad_answer(
                    "model_response_too_large",
                    "the model's answer was too large or broken",
                ));
            }
        };
        let mut doc = serde_json::from_slice::<serde_json::Value>(&bytes).ok();
        let mut tally = Tally::default();
        if let Some(d) = &doc {
            tally.add_document(d);
        }
        let success = parts.status.is_success();
        let used = if !success {
            // The model produced nothing: charge only what it says it used.
            let mut u = tally.used(&reserved);
            if !tally.usage_seen {
                u.tokens = 0;
            }
            u.vectors = 0;
            u
        } else if tally.usage_seen || request.call == Call::Predict {
            tally.used(&reserved)
        } else {
            // No usage to settle from: the reservation stands.
            reserved.ask
        };
        ticket.finish(used, false);
        adm.gate.finish(Ask::default(), false);
        if success && let (Some(peer), Some(d)) = (&adm.answered, &doc) {
            // The answer itself may move the caller up: this answer says so.
            if let Some(w) = self.warning(self.measure_answer(peer, d)?) {
                parts.headers.insert(answer::USAGE_WARNING.clone(), w);
            }
        }
        if success
            && tally
                .completion
                .is_some_and(|c| c > reserved.completion_reserve)
        {
            // A model that ignored max_tokens: charged, but what it generated
            // beyond the reservation is not delivered.
            self.metrics().decision("response_over_reservation");
            return Err(refusal::bad_answer(
                "model_exceeded_reservation",
                "the model generated more tokens than were reserved for this request",
            ));
        }
        let mut out = bytes;
        if self.cfg.api == ModelApi::Predict && adm.outputs != OutputDetail::Full && success {
            // Fail closed: an answer whose probabilities cannot be limited is not delivered.
            let pointer = match &self.cfg.format {
                PredictFormat::Json(j) => j.output.as_str(),
                _ => "",
            };
            let shape = request.shape.unwrap_or(Shape::Rows);
            let limited = doc
                .as_mut()
                .and_then(|d| Some((outputs::limit(d, shape, pointer, adm.outputs)?, d)));
            let Some((changed, d)) = limited else {
                self.metrics().decision("response_unlimitable");
                return Err(refusal::bad_answer(
                    "model_response_unreadable",
                    "the model's answer has no scores where its format puts them",
                ));
            };
            if changed && let Ok(v) = serde_json::to_vec(d) {
                out = Bytes::from(v);
                parts.headers.remove(header::CONTENT_LENGTH);
            }
        }
        if parts.status == StatusCode::NO_CONTENT {
            out = Bytes::new();
        }
        Ok(Response::from_parts(parts, AnswerBody::Full(out)))
    }
}

#[cfg(test)]
#[path = "route_tests.rs"]
mod tests;
