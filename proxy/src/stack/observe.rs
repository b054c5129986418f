//! The outermost stage: what holds for a request until its answer's body
//! has ended (or was dropped), not just until the head was sent, so that a
//! streamed answer (a model's server-sent events, a large download) counts:
//! - a slot under the listener's `max_requests_in_flight` (503 past it);
//! - the connection's busy count, which keeps its idle timeout from firing
//!   while the request waits on the upstream (for the head, or for a body
//!   chunk the app has not sent yet), and only then: a caller that stops
//!   reading does not keep its connection busy, so a stalled connection
//!   idles out and gives its slots back;
//! - the status-class counter and the latency histogram (time to the last byte);
//! - one access-log line (target `warden::access`, at info, rate-limited
//!   with the dropped lines counted): peer, method, path as authorized,
//!   status, duration, bytes, rule or refusal reason, listener, direction.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{Method, Response, StatusCode};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use prometheus::IntCounter;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use warden_identity::ratelog::LogLimiter;

use crate::metrics::RequestMetrics;
use crate::metrics::{Direction, ProxyMetrics};
use crate::respond::{Caller, Refusal, RefusalCounters, Refused};
use crate::stack::body::{Body, BoxError};
use crate::stack::body::{Req, Resp};

static ACCESS_LOG: LogLimiter = LogLimiter::new(200);

/// In a request's extensions when its access-log line will be written
/// (decided when it arrives, within the log's rate limit): the stages below
/// note what the line needs only then, so the other requests cost nothing.
#[derive(Debug, Clone, Copy)]
pub struct Logged;

/// What authorization decided, in the answer's extensions (for the access log).
#[derive(Debug, Clone)]
pub struct Authorized {
    /// The deciding rule.
    pub rule: Arc<str>,
    /// The normalized path that was authorized (and forwarded).
    pub path: PathAndQuery,
}

/// What one listener's requests share.
#[derive(Debug)]
pub struct Shared {
    /// Listener name.
    pub listener: Arc<str>,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// Slots for requests in flight.
    pub in_flight: Arc<Semaphore>,
    /// Status classes and latency.
    pub requests: RequestMetrics,
    /// Refusals by reason.
    pub refusals: RefusalCounters,
    /// Access-log lines dropped by the rate limit.
    pub log_dropped: IntCounter,
}

impl Shared {
    /// What the requests of listener `name` share: `max_in_flight` slots
    /// and their metric handles.
    pub fn new(
        metrics: &ProxyMetrics,
        direction: Direction,
        name: &Arc<str>,
        max_in_flight: usize,
    ) -> Self {
        Self {
            listener: name.clone(),
            direction: direction.label(),
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            requests: RequestMetrics::new(metrics, direction, name),
            refusals: RefusalCounters::for_listener(metrics, direction, name),
            log_dropped: metrics.access_log_dropped.clone(),
        }
    }
}

/// The layer, for one connection.
#[derive(Debug, Clone)]
pub struct ObserveLayer {
    shared: Arc<Shared>,
    busy: Arc<AtomicUsize>,
    peer: Option<Arc<str>>,
}

impl ObserveLayer {
    /// For a connection whose busy count is `busy` and whose caller is `peer`
    /// (a SPIFFE ID inbound; none outbound, where the caller is the local app).
    pub fn new(shared: Arc<Shared>, busy: Arc<AtomicUsize>, peer: Option<Arc<str>>) -> Self {
        Self { shared, busy, peer }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`ObserveLayer`].
#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
    layer: ObserveLayer,
}

impl<S> Service<Req> for Observe<S>
where
    S: Service<Req, Response = Resp, Error = Infallible>,
    S::Future: Unpin,
{
    type Response = Response<Observed>;
    type Error = Infallible;
    type Future = Observing<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let l = &self.layer;
        let logged = tracing::enabled!(target: "warden::access", tracing::Level::INFO) && {
            let allowed = ACCESS_LOG.allow();
            if !allowed {
                l.shared.log_dropped.inc();
            }
            allowed
        };
        if logged {
            req.extensions_mut().insert(Logged);
        }
        let record = Record {
            logged,
            start: Instant::now(),
            method: req.method().clone(),
            path: req.uri().path_and_query().cloned(),
            status: StatusCode::OK,
            bytes: 0,
            rule: None,
            reason: None,
            peer: l.peer.clone(),
            shared: l.shared.clone(),
            busy: Busy::new(&l.busy),
            _permit: None,
        };
        match l.shared.in_flight.clone().try_acquire_owned() {
            Ok(permit) => Observing {
                inner: Some(self.inner.call(req)),
                refused: None,
                record: Some(Record {
                    _permit: Some(permit),
                    ..record
                }),
            },
            Err(_) => {
                let r = Refusal::Overloaded;
                l.shared.refusals.count(&r);
                Observing {
                    inner: None,
                    refused: Some(r.answer(Caller::of(&req))),
                    record: Some(record),
                }
            }
        }
    }
}

/// The future of [`Observe`].
pub struct Observing<F> {
    inner: Option<F>,
    refused: Option<Resp>,
    record: Option<Record>,
}

impl<F> Future for Observing<F>
where
    F: Future<Output = Result<Resp, Infallible>> + Unpin,
{
    type Output = Result<Response<Observed>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let resp = match (&mut this.inner, this.refused.take()) {
            (_, Some(r)) => r,
            (Some(f), None) => match Pin::new(f).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(r)) => r,
            },
            (None, None) => Refusal::Internal.answer(Caller {
                grpc: false,
                version: http::Version::HTTP_11,
            }),
        };
        let (parts, body) = resp.into_parts();
        let record = this.record.take().map(|mut r| {
            // The head is here: from now on the request waits on the caller,
            // except while its body waits on the upstream (below).
            r.busy.release();
            r.status = parts.status;
            if let Some(a) = parts.extensions.get::<Authorized>() {
                r.rule = Some(a.rule.clone());
                r.path = Some(a.path.clone());
            }
            if let Some(refused) = parts.extensions.get::<Refused>() {
                r.reason = Some(refused.reason);
                r.status = StatusCode::from_u16(refused.status).unwrap_or(r.status);
            }
            r
        });
        let mut observed = Observed {
            inner: body,
            record,
        };
        if observed.inner.is_end_stream() {
            observed.finish();
        }
        Poll::Ready(Ok(Response::from_parts(parts, observed)))
    }
}

/// A request's share of its connection's busy count: held while the
/// request waits on the upstream, so the idle timer waits for the upstream,
/// never for a caller that does not read.
#[derive(Debug)]
struct Busy {
    count: Arc<AtomicUsize>,
    held: bool,
}

impl Busy {
    /// Held from the start: the request waits for its head.
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self {
            count: count.clone(),
            held: true,
        }
    }

    fn hold(&mut self) {
        if !self.held {
            self.count.fetch_add(1, Ordering::Relaxed);
            self.held = true;
        }
    }

    fn release(&mut self) {
        if self.held {
            self.count.fetch_sub(1, Ordering::Relaxed);
            self.held = false;
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.release();
    }
}

/// One request's accounting, closed when its answer ends.
struct Record {
    logged: bool,
    start: Instant,
    method: Method,
    path: Option<PathAndQuery>,
    status: StatusCode,
    bytes: u64,
    rule: Option<Arc<str>>,
    reason: Option<&'static str>,
    peer: Option<Arc<str>>,
    shared: Arc<Shared>,
    busy: Busy,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Record {
    fn close(self) {
        let seconds = self.start.elapsed().as_secs_f64();
        let s = &self.shared;
        s.requests.observe(self.status, seconds);
        if !self.logged {
            return;
        }
        tracing::info!(
            target: "warden::access",
            listener = %s.listener,
            direction = s.direction,
            peer = self.peer.as_deref().unwrap_or(""),
            method = %self.method,
            path = self.path.as_ref().map_or("", PathAndQuery::path),
            status = self.status.as_u16(),
            duration_ms = seconds * 1000.0,
            bytes = self.bytes,
            rule = self.rule.as_deref().unwrap_or(""),
            reason = self.reason.unwrap_or(""),
            "request"
        );
    }
}

/// An answer's body, holding its request's [`Record`] until it ends.
pub struct Observed {
    inner: Body,
    record: Option<Record>,
}

impl Observed {
    fn finish(&mut self) {
        if let Some(r) = self.record.take() {
            r.close();
        }
    }
}

impl HttpBody for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Some(r) = this.record.as_mut() {
            if polled.is_pending() {
                r.busy.hold();
            } else {
                r.busy.release();
            }
        }
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(r), Some(d)) = (this.record.as_mut(), frame.data_ref()) {
                    r.bytes += d.len() as u64;
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(_) => this.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use tower::ServiceExt;

    use crate::stack::ReqBody;

    #[tokio::test]
    async fn the_slot_is_held_until_the_body_ends_and_busy_only_while_waiting_on_the_upstream() {
        let metrics = ProxyMetrics::new().unwrap();
        let shared = Arc::new(Shared::new(&metrics, Direction::Inbound, &"l".into(), 1));
        let busy = Arc::new(AtomicUsize::new(0));
        let answer = tower::service_fn(|_req: Req| async {
            Ok::<_, Infallible>(Response::new(Body::Full(Full::new(Bytes::from_static(
                b"streamed",
            )))))
        });
        let svc = ObserveLayer::new(shared.clone(), busy.clone(), None)
            .layer(tower::util::BoxCloneService::new(answer));
        let req = || http::Request::new(ReqBody::read(Bytes::new()));
        let resp = svc.clone().oneshot(req()).await.unwrap();
        assert_eq!(
            shared.in_flight.available_permits(),
            0,
            "head sent, body not"
        );
        assert_eq!(
            busy.load(Ordering::Relaxed),
            0,
            "waiting on the caller to read is not busy"
        );
        let refused = svc.clone().oneshot(req()).await.unwrap();
        assert_eq!(refused.status(), 503);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"streamed");
        assert_eq!(shared.in_flight.available_permits(), 1);
        drop(refused);
        assert_eq!(busy.load(Ordering::Relaxed), 0);
    }
}
