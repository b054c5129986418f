//! Every refusal the proxy makes, typed, and the one place that turns it
//! into an answer (as opposed to the app's):
//! - an HTTP caller gets the status and an RFC 9457 `application/problem+json`
//!   body whose type names the reason;
//! - a gRPC caller (`content-type: application/grpc*`) gets a trailers-only
//!   answer, HTTP 200 with `grpc-status` and `grpc-message`, which is what
//!   gRPC clients read (an HTTP 403 is an opaque `UNKNOWN` to them);
//! - an HTTP/1.1 connection that can no longer be trusted to frame requests
//!   the way the app would (a malformed method or path, CONNECT) is closed
//!   after the answer.
//!
//! Every refusal is counted by listener and reason ([`RefusalCounters`],
//! resolved once per listener) and its reason rides in the answer's
//! extensions for the access log.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use http::{HeaderName, Response, Version};
use http_body_util::Full;
use prometheus::IntCounter;
use tower::{Layer, Service};

use crate::metrics::{Direction, ProxyMetrics};
use crate::ratelimit::Limited;
use crate::stack::body::{Body, Req, Resp};
use warden_guard::refusal::GuardRefusal;

/// Why the proxy answered instead of the app (or the destination).
#[derive(Debug, Clone)]
pub enum Refusal {
    /// The path cannot be matched the way the app would read it (400).
    BadPath,
    /// A method spelled in lower case: apps disagree on what it means (400).
    BadMethod,
    /// CONNECT is not proxied (405).
    MethodNotAllowed,
    /// The header section is larger than the listener allows (431).
    HeadersTooLarge {
        /// Which bound: `header_bytes`, `header_count` or `header_value`.
        what: &'static str,
    },
    /// The caller is not allowed (403).
    Forbidden {
        /// The deciding rule (`default` when none matched).
        rule: Arc<str>,
    },
    /// The caller is over a request-rate limit (429), or the limit's
    /// shared store is unreachable and it fails closed (503).
    RateLimited(Box<Limited>),
    /// The listener's limit on requests in flight is reached (503).
    Overloaded,
    /// No valid certificate right now (503).
    NoIdentity,
    /// The app could not be reached (502).
    AppUnavailable,
    /// The app took longer than `connect_timeout` to accept a connection (504).
    AppConnectTimeout,
    /// The app sent no response head within `response_timeout` (504).
    AppTimeout,
    /// The destination's identity is not the expected one (502).
    WrongServerIdentity,
    /// The destination could not be reached over mTLS (502).
    UpstreamUnavailable,
    /// The destination sent no response head within `response_timeout` (504).
    UpstreamTimeout,
    /// A bug: a stage's future polled after it finished (500).
    Internal,
    /// A model API route refused the request or will not deliver the
    /// app's answer: its status, problem type and headers are the guard's.
    Model(Box<GuardRefusal>),
}

/// Every reason label, in [`Refusal::index`] order (for per-reason counters).
pub const REASONS: [&str; 18] = [
    "bad_path",
    "bad_method",
    "method_not_allowed",
    "headers_too_large",
    "forbidden",
    "rate_limited",
    "overloaded",
    "no_identity",
    "app_unavailable",
    "app_connect_timeout",
    "app_timeout",
    "wrong_server_identity",
    "upstream_unavailable",
    "upstream_timeout",
    "internal",
    "limit_store_unavailable",
    "model",
    "max_connections",
];

impl Refusal {
    /// Position of this refusal's reason in [`REASONS`].
    pub fn index(&self) -> usize {
        match self {
            Self::BadPath => 0,
            Self::BadMethod => 1,
            Self::MethodNotAllowed => 2,
            Self::HeadersTooLarge { .. } => 3,
            Self::Forbidden { .. } => 4,
            Self::RateLimited(l) => match **l {
                Limited::Exceeded(_) => 5,
                Limited::StoreUnavailable(_) => 15,
            },
            Self::Overloaded => 6,
            Self::NoIdentity => 7,
            Self::AppUnavailable => 8,
            Self::AppConnectTimeout => 9,
            Self::AppTimeout => 10,
            Self::WrongServerIdentity => 11,
            Self::UpstreamUnavailable => 12,
            Self::UpstreamTimeout => 13,
            Self::Internal => 14,
            Self::Model(_) => 16,
        }
    }

    /// Fixed label for metrics, logs and the problem type.
    pub fn reason(&self) -> &'static str {
        REASONS[self.index()]
    }

    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            Self::BadPath | Self::BadMethod => 400,
            Self::Forbidden { .. } => 403,
            Self::MethodNotAllowed => 405,
            Self::RateLimited(l) => l.status(),
            Self::HeadersTooLarge { .. } => 431,
            Self::Internal => 500,
            Self::AppUnavailable | Self::WrongServerIdentity | Self::UpstreamUnavailable => 502,
            Self::NoIdentity | Self::Overloaded => 503,
            Self::AppConnectTimeout | Self::AppTimeout | Self::UpstreamTimeout => 504,
            Self::Model(m) => m.status().as_u16(),
        }
    }

    /// The gRPC status code a gRPC caller gets instead.
    fn grpc_status(&self) -> &'static str {
        match self {
            Self::BadPath | Self::BadMethod => "3", // INVALID_ARGUMENT
            Self::MethodNotAllowed => "12",         // UNIMPLEMENTED
            Self::Forbidden { .. } => "7",          // PERMISSION_DENIED
            Self::HeadersTooLarge { .. } => "8",    // RESOURCE_EXHAUSTED
            Self::RateLimited(l) => match **l {
                Limited::Exceeded(_) => "8",
                Limited::StoreUnavailable(_) => "14", // UNAVAILABLE
            },
            Self::AppConnectTimeout | Self::AppTimeout | Self::UpstreamTimeout => "4", // DEADLINE_EXCEEDED
            Self::Internal => "13",                                                    // INTERNAL
            Self::Overloaded
            | Self::NoIdentity
            | Self::AppUnavailable
            | Self::WrongServerIdentity
            | Self::UpstreamUnavailable => "14", // UNAVAILABLE
            Self::Model(m) => match m.status().as_u16() {
                400 | 413 => "3", // INVALID_ARGUMENT
                408 => "4",       // DEADLINE_EXCEEDED
                429 => "8",       // RESOURCE_EXHAUSTED
                _ => "14",        // UNAVAILABLE
            },
        }
    }

    /// What the answer says.
    pub fn detail(&self) -> Cow<'static, str> {
        match self {
            Self::RateLimited(l) => Cow::Owned(l.detail()),
            Self::Model(m) => m.detail().clone(),
            other => Cow::Borrowed(other.fixed_detail()),
        }
    }

    /// The problem type: the reason, but a rate limit's is the model
    /// routes' (`quota-exceeded`), so one client handles both alike, and
    /// a model route's is the guard's own (also in the access log).
    fn problem_type(&self) -> &'static str {
        match self {
            Self::RateLimited(l) => l.reason(),
            Self::Model(m) => m.reason(),
            other => other.reason(),
        }
    }

    fn fixed_detail(&self) -> &'static str {
        match self {
            Self::BadPath => "the request path cannot be matched the way the app would read it",
            Self::BadMethod => "request methods are case-sensitive and must be upper case",
            Self::MethodNotAllowed => "CONNECT is not proxied",
            Self::HeadersTooLarge { .. } => "the request's header section is too large",
            Self::Forbidden { .. } => "the caller's identity is not allowed to make this request",
            Self::RateLimited(_) => "the caller is over its request-rate limit",
            Self::Overloaded => "too many requests in flight on this listener",
            Self::NoIdentity => {
                "no identity yet: this proxy holds no valid certificate right now (its /ready says why)"
            }
            Self::AppUnavailable => "the app behind this proxy did not answer",
            Self::AppConnectTimeout => {
                "the app behind this proxy did not accept a connection in time"
            }
            Self::AppTimeout => "the app behind this proxy did not answer in time",
            Self::WrongServerIdentity => "the destination did not prove the expected SPIFFE ID",
            Self::UpstreamUnavailable => "the destination could not be reached over mTLS",
            Self::UpstreamTimeout => "the destination did not answer in time",
            Self::Internal => "internal error",
            Self::Model(_) => "the model API guard refused this request",
        }
    }

    /// After this refusal an HTTP/1.x connection is closed: the caller
    /// framed something the app might read differently.
    fn closes_connection(&self) -> bool {
        matches!(
            self,
            Self::BadPath | Self::BadMethod | Self::MethodNotAllowed | Self::HeadersTooLarge { .. }
        )
    }

    /// The answer for a caller speaking `to`.
    pub fn answer(&self, to: Caller) -> Resp {
        let mut resp = if to.grpc {
            let mut r = Response::new(Body::Full(Full::new(Bytes::new())));
            let h = r.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert(GRPC_STATUS, HeaderValue::from_static(self.grpc_status()));
            let message = match self {
                // A guard's detail says which limit; it is plain ASCII, else the fixed one.
                Self::Model(m) => HeaderValue::from_str(m.detail()).ok(),
                _ => None,
            };
            h.insert(
                GRPC_MESSAGE,
                message.unwrap_or_else(|| HeaderValue::from_static(self.fixed_detail())),
            );
            r
        } else {
            warden_identity::http::problem(self.status(), self.problem_type(), &self.detail())
                .map(Body::Full)
        };
        match self {
            Self::RateLimited(l) => {
                for (name, value) in l.headers() {
                    resp.headers_mut().insert(name, value);
                }
            }
            Self::Model(m) => {
                for (name, value) in m.headers() {
                    resp.headers_mut().insert(name.clone(), value.clone());
                }
            }
            _ => {}
        }
        if to.version < Version::HTTP_2 && self.closes_connection() {
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        let logged = match self {
            Self::Model(m) => m.reason(),
            other => other.reason(),
        };
        resp.extensions_mut().insert(Refused {
            reason: logged,
            status: self.status(),
        });
        resp
    }
}

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// A refusal, in its answer's extensions: for the access log and the
/// status-class metrics, which count a gRPC refusal (HTTP 200 on the wire)
/// by the status it stands for.
#[derive(Debug, Clone, Copy)]
pub struct Refused {
    /// The reason label.
    pub reason: &'static str,
    /// The HTTP status the refusal stands for.
    pub status: u16,
}

/// What a refusal's answer depends on about the caller.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// A gRPC call (`content-type: application/grpc*`).
    pub grpc: bool,
    /// The HTTP version the caller speaks.
    pub version: Version,
}

impl Caller {
    /// Read from the request before any stage sees it.
    pub fn of(req: &Req) -> Self {
        Self {
            grpc: req
                .headers()
                .get(CONTENT_TYPE)
                .is_some_and(|v| is_grpc(v.as_bytes())),
            version: req.version(),
        }
    }
}

/// `application/grpc`, alone or followed by `+format` or `;parameters`.
fn is_grpc(content_type: &[u8]) -> bool {
    content_type
        .strip_prefix(b"application/grpc")
        .is_some_and(|rest| rest.is_empty() || rest[0] == b'+' || rest[0] == b';')
}

/// One listener's refusal counters, one per reason, resolved once.
#[derive(Debug, Clone)]
pub struct RefusalCounters(Arc<[IntCounter]>);

impl RefusalCounters {
    /// The counters of listener `name` (in `warden_proxy_rejected_requests_total`).
    pub fn for_listener(metrics: &ProxyMetrics, direction: Direction, name: &str) -> Self {
        let labels = |r| [direction.label(), name, r];
        Self(
            REASONS
                .iter()
                .map(|r| metrics.rejected.with_label_values(&labels(r)))
                .collect(),
        )
    }

    /// Counts one refusal.
    pub fn count(&self, r: &Refusal) {
        if let Some(c) = self.0.get(r.index()) {
            c.inc();
        }
    }

    /// Counts a connection refused at the listener's connection limit.
    pub fn count_max_connections(&self) {
        if let Some(c) = self.0.get(REASONS.len() - 1) {
            c.inc();
        }
    }
}

/// The layer that answers every refusal from the stages below it.
#[derive(Debug, Clone)]
pub struct RespondLayer {
    counters: RefusalCounters,
}

impl RespondLayer {
    /// Refusals counted in `counters`.
    pub fn new(counters: RefusalCounters) -> Self {
        Self { counters }
    }
}

impl<S> Layer<S> for RespondLayer {
    type Service = Respond<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Respond {
            inner,
            counters: self.counters.clone(),
        }
    }
}

/// See [`RespondLayer`].
#[derive(Debug, Clone)]
pub struct Respond<S> {
    inner: S,
    counters: RefusalCounters,
}

impl<S> Service<Req> for Respond<S>
where
    S: Service<Req, Response = Resp, Error = Refusal>,
    S::Future: Unpin,
{
    type Response = Resp;
    type Error = Infallible;
    type Future = Answer<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self.inner.poll_ready(cx) {
            Poll::Ready(_) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        Answer {
            caller: Caller::of(&req),
            inner: self.inner.call(req),
            counters: self.counters.clone(),
        }
    }
}

/// The future of [`Respond`].
pub struct Answer<F> {
    caller: Caller,
    inner: F,
    counters: RefusalCounters,
}

impl<F> Future for Answer<F>
where
    F: Future<Output = Result<Resp, Refusal>> + Unpin,
{
    type Output = Result<Resp, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(resp)) => Poll::Ready(Ok(resp)),
            Poll::Ready(Err(r)) => {
                this.counters.count(&r);
                Poll::Ready(Ok(r.answer(this.caller)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    use crate::stack::ReqBody;

    fn refusing(r: Refusal) -> impl Service<Req, Response = Resp, Error = Infallible> + Clone {
        let metrics = ProxyMetrics::new().unwrap();
        let counters = RefusalCounters::for_listener(&metrics, Direction::Inbound, "l");
        let inner = tower::service_fn(move |_req: Req| {
            let r = r.clone();
            async move { Err::<Resp, _>(r) }
        });
        RespondLayer::new(counters).layer(tower::util::BoxCloneService::new(inner))
    }

    fn req(content_type: &str, version: Version) -> Req {
        let mut r = http::Request::new(ReqBody::read(Bytes::new()));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_str(content_type).unwrap());
        *r.version_mut() = version;
        r
    }

    #[tokio::test]
    async fn grpc_callers_get_a_grpc_status_and_others_a_problem() {
        let forbidden = Refusal::Forbidden { rule: "r".into() };
        let grpc = refusing(forbidden.clone())
            .oneshot(req("application/grpc+proto", Version::HTTP_2))
            .await
            .unwrap();
        assert_eq!(grpc.status(), 200);
        assert_eq!(grpc.headers()[GRPC_STATUS], "7");
        let http = refusing(forbidden)
            .oneshot(req("application/json", Version::HTTP_2))
            .await
            .unwrap();
        assert_eq!(http.status(), 403);
        assert_eq!(http.headers()[CONTENT_TYPE], "application/problem+json");
        assert!(http.headers().get(CONNECTION).is_none());
    }

    #[tokio::test]
    async fn a_framing_refusal_closes_an_http1_connection_only() {
        let h1 = refusing(Refusal::BadPath)
            .oneshot(req("text/plain", Version::HTTP_11))
            .await
            .unwrap();
        assert_eq!(h1.status(), 400);
        assert_eq!(h1.headers()[CONNECTION], "close");
        let h2 = refusing(Refusal::BadPath)
            .oneshot(req("text/plain", Version::HTTP_2))
            .await
            .unwrap();
        assert!(h2.headers().get(CONNECTION).is_none());
    }

    #[tokio::test]
    async fn a_model_refusal_keeps_its_problem_type_and_headers_and_is_counted_as_model() {
        let metrics = ProxyMetrics::new().unwrap();
        let counters = RefusalCounters::for_listener(&metrics, Direction::Inbound, "l");
        let refusal = Refusal::Model(Box::new(
            GuardRefusal::new(
                http::StatusCode::TOO_MANY_REQUESTS,
                "quota_exceeded",
                "used up",
            )
            .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("17")),
        ));
        let inner = tower::service_fn(move |_req: Req| {
            let r = refusal.clone();
            async move { Err::<Resp, _>(r) }
        });
        let svc = RespondLayer::new(counters).layer(tower::util::BoxCloneService::new(inner));
        let http = svc
            .clone()
            .oneshot(req("application/json", Version::HTTP_11))
            .await
            .unwrap();
        assert_eq!(http.status(), 429);
        assert_eq!(http.headers()["retry-after"], "17");
        assert_eq!(http.headers()[CONTENT_TYPE], "application/problem+json");
        assert!(http.headers().get(CONNECTION).is_none());
        assert_eq!(
            http.extensions().get::<Refused>().unwrap().reason,
            "quota_exceeded"
        );
        let body = http_body_util::BodyExt::collect(http.into_body())
            .await
            .unwrap()
            .to_bytes();
        let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(doc["type"], "urn:warden:problem:quota-exceeded");
        assert_eq!(doc["detail"], "used up");
        let grpc = svc
            .oneshot(req("application/grpc", Version::HTTP_2))
            .await
            .unwrap();
        assert_eq!(grpc.status(), 200);
        assert_eq!(grpc.headers()[GRPC_STATUS], "8");
        assert_eq!(grpc.headers()[GRPC_MESSAGE], "used up");
        let counted = metrics
            .rejected
            .with_label_values(&["inbound", "l", "model"])
            .get();
        assert_eq!(counted, 2);
    }

    #[test]
    fn every_refusal_has_its_own_reason() {
        let all = [
            Refusal::BadPath,
            Refusal::BadMethod,
            Refusal::MethodNotAllowed,
            Refusal::HeadersTooLarge { what: "x" },
            Refusal::Forbidden { rule: "r".into() },
            Refusal::Overloaded,
            Refusal::NoIdentity,
            Refusal::AppUnavailable,
            Refusal::AppConnectTimeout,
            Refusal::AppTimeout,
            Refusal::WrongServerIdentity,
            Refusal::UpstreamUnavailable,
            Refusal::UpstreamTimeout,
            Refusal::Internal,
            Refusal::Model(Box::new(GuardRefusal::new(
                http::StatusCode::TOO_MANY_REQUESTS,
                "quota_exceeded",
                "x",
            ))),
        ];
        let mut seen = std::collections::HashSet::new();
        for r in &all {
            assert!(seen.insert(r.reason()), "{r:?}");
        }
        // Left: a rate limit's two (tested in `ratelimit`) and max_connections.
        assert_eq!(seen.len() + 3, REASONS.len());
    }
}
