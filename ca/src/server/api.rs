//! The CA's HTTPS API.
//!
//! - `POST /v1/certify`: `{"csr": PEM, "token": "...", "ttl": "1h"}` with a
//!   join token (bootstrap), `{"csr", "k8s_token": JWT}` with a pod's
//!   projected ServiceAccount token (Kubernetes), or neither over mTLS with
//!   the current SVID (renewal). Answers the chain, the bundle and the
//!   expiry, or a problem+json refusal.
//! - `GET /v1/bundle`: the trust bundle as PEM; `?format=spiffe` (or
//!   `Accept: application/json`) for the SPIFFE JSON bundle.
//! - `POST /v1/deny`: `{"spiffe_id": "...", "reason": "..."}` over mTLS from
//!   an identity listed in `deny_reporters`: denies that identity, as
//!   `warden ca deny` does. Answers `{"spiffe_id", "denied", "already_denied"}`.
//! - `GET /v1/watch?after=N`: the trust feed, over mTLS from any workload of
//!   the trust domain that is not denied: `{"sequence", "trust_bundle",
//!   "denied"}` at once when the feed is not at `N`, else within
//!   `api::WATCH_HOLD` when it moves, else 204 (long poll; see `crate::trust`).

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use warden_config::HumanDuration;

pub use warden_identity::api::{CertifyAnswer, CertifyBody, DenyAnswer, DenyBody};
use warden_identity::api::{TRUST_SEQUENCE_HEADER, WATCH_HOLD, WATCH_PATH};

use crate::http::{Body, BodyError, problem, read_body, respond};
use crate::service::{CaService, Caller, CertifyRequest, DenyReport, Refusal};
use crate::token::MAX_TOKEN_LEN;

/// Largest request body; a P-256 CSR plus a token is about 1 KiB, a deny
/// report at most a 2 KiB SPIFFE ID and a 200-byte reason.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Most trust feed watchers one server holds at once: three quarters of
/// its connection slots, so certify requests always find one.
pub const MAX_WATCHERS: i64 = (crate::server::MAX_CONNECTIONS as i64) * 3 / 4;
/// How long a client may take to send its body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Routes one request.
pub async fn handle(
    svc: Arc<CaService>,
    caller: Caller,
    source: std::net::IpAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/v1/certify") => certify(svc, caller, source, req).await,
        (&Method::POST, "/v1/deny") => deny(svc, caller, req).await,
        (&Method::GET | &Method::HEAD, "/v1/bundle") => bundle(&svc, &req),
        (&Method::GET, WATCH_PATH) => watch(svc, caller, &req).await,
        (_, "/v1/certify" | "/v1/bundle" | "/v1/deny" | WATCH_PATH) => {
            problem(405, "method_not_allowed", "method not allowed on this path")
        }
        _ => problem(404, "not_found", "no such endpoint"),
    }
}

/// Reads and parses the body, then hands the decision (or the refusal of a
/// malformed request) to the blocking pool: it signs and writes the store.
async fn certify(
    svc: Arc<CaService>,
    caller: Caller,
    source: std::net::IpAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let now = OffsetDateTime::now_utc();
    // Over a limit: counted and logged, never written to the trail (the
    // limits are what bound the trail).
    let limited = |svc: &CaService, r: Refusal, kind: &'static str| {
        static LIMIT_LOG: crate::ratelog::LogLimiter = crate::ratelog::LogLimiter::new(10);
        svc.metrics.refusals.with_label_values(&[r.reason()]).inc();
        svc.metrics
            .issuances
            .with_label_values(&[kind, "refused"])
            .inc();
        if LIMIT_LOG.allow() {
            tracing::warn!(%source, detail = %r, "certify request over a limit");
        }
        refused(&r)
    };
    if let Err(r) = svc.limits.check_source(source) {
        // Read (and drop) the body first, as for every refusal: a client
        // still sending would get a reset instead of this answer.
        let _ = body(req).await;
        return limited(&svc, r, "malformed");
    }
    let parsed = parse(req).await;
    if let Ok((request, _)) = &parsed
        && let Err(r) = svc.limits.check_caller(request, &caller)
    {
        let kind = if request.token.is_some() {
            "bootstrap"
        } else {
            "renewal"
        };
        return limited(&svc, r, kind);
    }
    let parsed = match parsed {
        Ok((request, Some(k8s_token))) => match attest(&svc, &k8s_token, source, now).await {
            Ok(pod) => Ok((request, Caller::Pod(pod))),
            Err((refusal, Some(pod))) => {
                let decision = tokio::task::spawn_blocking(move || {
                    svc.record_pod_refusal(&refusal, &pod, now);
                    refusal
                })
                .await;
                return match decision {
                    Ok(r) => refused(&r),
                    Err(join) => problem(500, "internal", &format!("refusal task failed: {join}")),
                };
            }
            Err((refusal, None)) => Err(("kubernetes", refusal)),
        },
        Ok((request, None)) => Ok((request, caller)),
        Err(refusal) => Err(("malformed", refusal)),
    };
    let decision = match parsed {
        Ok((request, caller)) => {
            tokio::task::spawn_blocking(move || svc.certify(request, caller, now)).await
        }
        Err((kind, refusal)) => {
            tokio::task::spawn_blocking(move || {
                svc.record_refusal(kind, &refusal, None, now);
                Err(refusal)
            })
            .await
        }
    };
    match decision {
        Ok(Ok(issued)) => {
            let fmt = |t: OffsetDateTime| t.format(&Rfc3339).unwrap_or_default();
            let answer = CertifyAnswer {
                spiffe_id: issued.spiffe_id.to_string(),
                certificate_chain: issued.svid.chain_pem,
                trust_bundle: issued.bundle_pem,
                serial: issued.svid.serial,
                not_before: fmt(issued.svid.validity.not_before),
                not_after: fmt(issued.svid.validity.not_after),
            };
            match serde_json::to_vec(&answer) {
                Ok(json) => respond(StatusCode::OK, "application/json", json),
                Err(e) => problem(500, "internal", &e.to_string()),
            }
        }
        // Already counted, logged and audited.
        Ok(Err(r)) => refused(&r),
        Err(join) => problem(500, "internal", &format!("issuance task failed: {join}")),
    }
}

/// Attests a pod by its ServiceAccount token; a refusal comes with the pod
/// the token named, once verified data said which.
async fn attest(
    svc: &CaService,
    token: &str,
    source: std::net::IpAddr,
    now: OffsetDateTime,
) -> Result<crate::kubernetes::Pod, (Refusal, Option<crate::kubernetes::Pod>)> {
    let Some(attestor) = &svc.kubernetes else {
        return Err((crate::kubernetes::Refused::Disabled.into(), None));
    };
    let mut claimed = None;
    match attestor
        .attest(token, source, now.unix_timestamp(), &mut claimed)
        .await
    {
        Ok(pod) => Ok(pod),
        Err(r) => {
            if claimed.is_none() {
                // Who the token claims to be, unverified: for the operator
                // reading the log, never for the trail.
                static CLAIMS_LOG: crate::ratelog::LogLimiter = crate::ratelog::LogLimiter::new(10);
                if CLAIMS_LOG.allow()
                    && let Ok(c) = crate::kubernetes::claims::unverified(token)
                    && let Some(k) = c.kubernetes
                {
                    tracing::warn!(
                        reason = r.reason(),
                        namespace = ?k.namespace.chars().take(64).collect::<String>(),
                        service_account = ?k.serviceaccount.map(|s| s.name.chars().take(64).collect::<String>()).unwrap_or_default(),
                        pod = ?k.pod.map(|p| p.name.chars().take(64).collect::<String>()).unwrap_or_default(),
                        "a ServiceAccount token was refused; it claims (unverified) to be this pod"
                    );
                }
            }
            Err((r.into(), claimed))
        }
    }
}

/// The problem answer of a refusal (with `Retry-After` when it has one).
fn refused(r: &Refusal) -> Response<Body> {
    let detail = match r {
        Refusal::Kubernetes(k) => k.public(),
        other => other.to_string(),
    };
    let mut resp = problem(r.status(), r.reason(), &detail);
    let wait = match r {
        Refusal::Kubernetes(
            crate::kubernetes::Refused::RateLimited(_, s)
            | crate::kubernetes::Refused::SourceRateLimited(s),
        )
        | Refusal::RateLimited(_, s)
        | Refusal::Busy(s) => Some(*s),
        _ => None,
    };
    if let Some(s) = wait
        && let Ok(v) = header::HeaderValue::from_str(&s.to_string())
    {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

/// Reads the whole body (always, so that a refusal reaches the client), then
/// lets the service decide on the blocking pool: it writes the store.
async fn deny(svc: Arc<CaService>, caller: Caller, req: Request<Incoming>) -> Response<Body> {
    let now = OffsetDateTime::now_utc();
    let report = body(req).await.and_then(|bytes| {
        let body: DenyBody = serde_json::from_slice(&bytes)
            .map_err(|e| Refusal::BadRequest(format!("body is not a deny request: {e}")))?;
        Ok(DenyReport {
            spiffe_id: body.spiffe_id,
            reason: body.reason,
        })
    });
    match tokio::task::spawn_blocking(move || svc.report_deny(caller, report, now)).await {
        Ok(Ok(denial)) => {
            let answer = DenyAnswer {
                spiffe_id: denial.spiffe_id.to_string(),
                denied: true,
                already_denied: denial.already_denied,
            };
            match serde_json::to_vec(&answer) {
                Ok(json) => respond(StatusCode::OK, "application/json", json),
                Err(e) => problem(500, "internal", &e.to_string()),
            }
        }
        // Already counted, logged and audited.
        Ok(Err(r)) => problem(r.status(), r.reason(), &r.to_string()),
        Err(join) => problem(500, "internal", &format!("deny task failed: {join}")),
    }
}

async fn body(req: Request<Incoming>) -> Result<bytes::Bytes, Refusal> {
    read_body(req.into_body(), MAX_BODY_BYTES, BODY_TIMEOUT)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge(n) => Refusal::TooLarge(n),
            other => Refusal::BadRequest(other.to_string()),
        })
}

/// The certify request, and the ServiceAccount token it carries, if any.
async fn parse(req: Request<Incoming>) -> Result<(CertifyRequest, Option<String>), Refusal> {
    let bytes = body(req).await?;
    let body: CertifyBody = serde_json::from_slice(&bytes)
        .map_err(|e| Refusal::BadRequest(format!("body is not a certify request: {e}")))?;
    if body.token.is_some() && body.k8s_token.is_some() {
        return Err(Refusal::BadRequest(
            "a request carries a join token or a ServiceAccount token, not both".into(),
        ));
    }
    if body.token.as_ref().is_some_and(|t| t.len() > MAX_TOKEN_LEN) {
        return Err(Refusal::TokenUnknown);
    }
    let ttl = body
        .ttl
        .as_deref()
        .map(HumanDuration::parse)
        .transpose()
        .map_err(Refusal::BadRequest)?;
    Ok((
        CertifyRequest {
            csr: body.csr,
            token: body.token,
            // Asking for less than a minute is clamped up: renewal needs room.
            ttl: ttl.map(|d| d.0.max(warden_config::ca::MIN_LEAF_TTL)),
        },
        body.k8s_token,
    ))
}

fn bundle(svc: &CaService, req: &Request<Incoming>) -> Response<Body> {
    let wants_json = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "format=spiffe"))
        || req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("application/json"));
    if wants_json {
        let sequence = svc.trust.current().sequence;
        let json = crate::bundle::spiffe_json(&svc.authority.bundle(), sequence);
        respond(StatusCode::OK, "application/json", json.to_string())
    } else {
        respond(
            StatusCode::OK,
            "application/x-pem-file",
            svc.authority.bundle_pem(),
        )
    }
}

/// The trust feed (long poll). Only a workload with a current certificate
/// may watch: the deny list names who was caught, which is for proxies only.
async fn watch(svc: Arc<CaService>, caller: Caller, req: &Request<Incoming>) -> Response<Body> {
    let now = OffsetDateTime::now_utc();
    let (id, not_after) = match caller {
        Caller::Svid { id, not_after, .. } if not_after > now => (id, not_after),
        Caller::Svid { .. } => return refused(&Refusal::SvidExpired),
        Caller::Anonymous | Caller::Pod(_) => return refused(&Refusal::Unauthenticated),
    };
    let after = match req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|p| p.strip_prefix("after="))
            .map(str::parse::<u64>)
    }) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => {
            return refused(&Refusal::BadRequest(
                "after must be the sequence number of the last answer".into(),
            ));
        }
    };
    let mut rx = svc.trust.subscribe();
    if rx.borrow_and_update().denied.contains(id.as_str()) {
        return refused(&Refusal::Denied(id));
    }
    // A caller at or past this replica's sequence (another replica may be
    // ahead by a poll) waits for news; it is never sent an older answer.
    if after.is_some_and(|a| a >= rx.borrow().sequence) {
        // Waiting watchers hold connections; certify requests need some too.
        if svc.metrics.trust_watchers.get() >= MAX_WATCHERS {
            svc.metrics.refusals.with_label_values(&["busy"]).inc();
            return refused(&Refusal::Busy(5));
        }
        // Never past the caller's certificate: it renews, then watches again.
        let hold = WATCH_HOLD.min((not_after - now).unsigned_abs());
        // Until a change, the hold, or shutdown; what it was is read below.
        let _watching = Watching::new(&svc.metrics.trust_watchers);
        tokio::select! {
            _ = tokio::time::timeout(hold, rx.changed()) => {}
            () = svc.trust.closed() => {}
        }
    }
    let snapshot = rx.borrow().clone();
    if after.is_some_and(|a| a >= snapshot.sequence) {
        // Nothing past the caller's sequence (the hold ended, or closing).
        let mut resp = respond(StatusCode::NO_CONTENT, "application/json", Vec::new());
        if let Ok(v) = header::HeaderValue::from_str(&snapshot.sequence.to_string()) {
            resp.headers_mut().insert(TRUST_SEQUENCE_HEADER, v);
        }
        return resp;
    }
    if snapshot.denied.contains(id.as_str()) {
        return refused(&Refusal::Denied(id));
    }
    respond(StatusCode::OK, "application/json", snapshot.json.clone())
}

/// Counts a waiting watcher for as long as it waits, however the wait ends
/// (a client that hangs up drops the request's future).
struct Watching(prometheus::IntGauge);

impl Watching {
    fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.dec();
    }
}
