//! Inbound HTTP, one request at a time:
//! requests in flight (503 past the limit) -> method (400 lower case, 405
//! CONNECT) -> normalize the path (400 when unsafe) -> authorize (403,
//! default deny) -> replace the identity header (head and trailers) ->
//! forward to the app over pooled keep-alive HTTP/1.1 (or h2c) -> count and
//! time the answer.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Method, Request, Response, Uri, header};
use http_body_util::combinators::MapFrame;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body as _, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

use warden_config::proxy::Inbound;
use warden_identity::ratelog::LogLimiter;
use warden_identity::tls::VerifiedPeer;

use crate::authz::{self, Request as AuthzRequest};
use crate::headers;
use crate::identity::Identity;
use crate::metrics::{ProxyMetrics, RequestMetrics};
use crate::model::limits::Store;
use crate::model::report::Reporter;
use crate::model::route::{Route, Routes};
use crate::normalize::normalize;
use crate::reload::PolicyRx;
use crate::respond::{Body, Refusal, upstream};

static DECISION_LOG: LogLimiter = LogLimiter::new(20);

/// The body sent to the app: the caller's, with its trailers cleaned like
/// its head (a trailer is just a late header).
type AppBody = MapFrame<Incoming, fn(Frame<Bytes>) -> Frame<Bytes>>;
/// What the app client sends: the caller's body streamed, or a model API
/// body that was read, checked and perhaps rewritten.
type ToApp = Either<AppBody, Full<Bytes>>;

fn clean_trailers(mut frame: Frame<Bytes>) -> Frame<Bytes> {
    if let Some(t) = frame.trailers_mut() {
        headers::strip_hop_by_hop(t);
        headers::strip_identity(t);
    }
    frame
}

/// Everything an inbound HTTP listener needs per request.
pub struct InboundHttp {
    name: String,
    policy: PolicyRx,
    app: Authority,
    app_h2c: bool,
    client: Client<HttpConnector, ToApp>,
    models: Routes,
    builder: auto::Builder<TokioExecutor>,
    in_flight: Arc<Semaphore>,
    requests: RequestMetrics,
    metrics: ProxyMetrics,
}

/// Counts a connection's requests in flight, so its idle timer waits for them.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl InboundHttp {
    /// Builds the app client (pooled), the server settings and the model
    /// routes from config.
    pub fn new(
        cfg: &Inbound,
        policy: PolicyRx,
        metrics: ProxyMetrics,
        store: &Arc<Store>,
        reporter: Option<Reporter>,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .http2_only(cfg.app_h2c)
            .pool_idle_timeout(std::time::Duration::from_secs(90))
            .build(connector);
        let mut builder = auto::Builder::new(TokioExecutor::new());
        let l = &cfg.limits;
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(l.header_read_timeout)
            .max_headers(l.max_headers)
            .max_buf_size(l.max_header_bytes.max(8192));
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(l.max_concurrent_streams)
            .max_header_list_size(u32::try_from(l.max_header_bytes).unwrap_or(u32::MAX))
            // Bounded buffering per stream and connection for bodies the app is slow to take.
            .initial_stream_window_size(256 * 1024)
            .initial_connection_window_size(1024 * 1024);
        Self {
            name: cfg.name.clone(),
            policy,
            app: authority(cfg.app),
            app_h2c: cfg.app_h2c,
            client,
            models: Routes::new(&cfg.name, &cfg.model_api, store, &metrics.model, reporter),
            builder,
            in_flight: Arc::new(Semaphore::new(l.max_requests_in_flight)),
            requests: RequestMetrics::new(&metrics, &cfg.name),
            metrics,
        }
    }

    /// Serves HTTP/1.1 or h2 (as negotiated) on one authenticated connection.
    /// `busy` counts its requests in flight (read by the idle timeout).
    pub async fn serve<S>(
        self: &Arc<Self>,
        tls: S,
        peer: VerifiedPeer,
        own: &Identity,
        busy: Arc<AtomicUsize>,
        watcher: Watcher,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Some(xfcc) = headers::xfcc_value(own.id.as_str(), peer.id().as_str()) else {
            return;
        };
        let peer = Arc::new(peer);
        let this = self.clone();
        let svc = service_fn(move |req| {
            let (this, peer, xfcc, busy) = (this.clone(), peer.clone(), xfcc.clone(), busy.clone());
            async move {
                let _busy = Busy::new(&busy);
                Ok::<_, Infallible>(this.handle(req, &peer, &xfcc).await)
            }
        });
        let conn = self
            .builder
            .serve_connection(TokioIo::new(tls), svc)
            .into_owned();
        if let Err(e) = watcher.watch(conn).await {
            tracing::debug!(listener = %self.name, error = %e, "connection ended with an error");
        }
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: &VerifiedPeer,
        xfcc: &HeaderValue,
    ) -> Response<Body> {
        let start = Instant::now();
        let resp = match self.in_flight.try_acquire() {
            Err(_) => self.refuse(Refusal::Overloaded),
            Ok(_permit) => match self.admit(req, peer, xfcc) {
                Ok((parts, body, None)) => {
                    let body = body.map_frame(clean_trailers as fn(Frame<Bytes>) -> Frame<Bytes>);
                    match self
                        .forward(Request::from_parts(parts, Either::Left(body)))
                        .await
                    {
                        Ok(resp) => resp.map(upstream),
                        Err(r) => r,
                    }
                }
                Ok((parts, body, Some(route))) => {
                    self.forward_model(route, parts, body, peer).await
                }
                Err(r) => self.refuse(r),
            },
        };
        self.requests
            .observe(resp.status(), start.elapsed().as_secs_f64());
        resp
    }

    fn refuse(&self, r: Refusal) -> Response<Body> {
        self.metrics
            .rejected
            .with_label_values(&[&self.name, r.reason()])
            .inc();
        r.response()
    }

    /// The request stages before the app: method, path, policy, identity
    /// header; and the model route the path falls under, if any.
    fn admit(
        &self,
        req: Request<Incoming>,
        peer: &VerifiedPeer,
        xfcc: &HeaderValue,
    ) -> Result<(http::request::Parts, Incoming, Option<&Route>), Refusal> {
        let (mut parts, body) = req.into_parts();
        if parts.method == Method::CONNECT {
            return Err(Refusal::MethodNotAllowed);
        }
        if parts
            .method
            .as_str()
            .bytes()
            .any(|b| b.is_ascii_lowercase())
        {
            return Err(Refusal::BadMethod);
        }
        let path = normalize(parts.uri.path()).map_err(|_| Refusal::BadPath)?;
        let policy = self.policy.borrow().clone();
        let d = authz::decide(
            &policy,
            peer,
            AuthzRequest {
                method: Some(parts.method.as_str()),
                path: Some(&path),
            },
        );
        self.metrics
            .authz
            .with_label_values(&[&self.name, d.rule, d.result])
            .inc();
        if !d.allowed {
            if DECISION_LOG.allow() {
                tracing::info!(listener = %self.name, peer = %peer.id(), method = %parts.method, path = %path, rule = d.rule, "request denied");
            }
            return Err(Refusal::Forbidden);
        }
        if d.result == "audit_deny" && DECISION_LOG.allow() {
            tracing::warn!(listener = %self.name, peer = %peer.id(), method = %parts.method, path = %path, rule = d.rule, "audit: would deny this request");
        }
        let route = self.models.find(&path);
        // The app sees the path that was authorized, and the caller's original Host.
        let host = parts.uri.authority().map(|a| a.as_str().to_owned());
        let pq = match (path, parts.uri.path_and_query()) {
            // Already normal: the request's own bytes, no copy.
            (Cow::Borrowed(_), Some(pq)) => pq.clone(),
            (path, _) => {
                let text = match parts.uri.query() {
                    Some(q) => format!("{path}?{q}"),
                    None => path.into_owned(),
                };
                PathAndQuery::try_from(text).map_err(|_| Refusal::BadPath)?
            }
        };
        let uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.app.clone())
            .path_and_query(pq);
        parts.uri = uri.build().map_err(|_| Refusal::BadPath)?;
        // gRPC over h2c needs `te: trailers`, the one TE value h2 allows.
        let te_trailers = self.app_h2c
            && parts
                .headers
                .get(header::TE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
        headers::set_identity(&mut parts.headers, xfcc);
        if te_trailers {
            parts
                .headers
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
        if !parts.headers.contains_key(header::HOST)
            && let Some(h) = host.and_then(|h| HeaderValue::from_str(&h).ok())
        {
            parts.headers.insert(header::HOST, h);
        }
        parts.version = if self.app_h2c {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        Ok((parts, body, route))
    }

    /// Sends to the app; its answer with hop-by-hop headers removed.
    async fn forward(&self, req: Request<ToApp>) -> Result<Response<Incoming>, Response<Body>> {
        match self.client.request(req).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                headers::strip_hop_by_hop(&mut parts.headers);
                Ok(Response::from_parts(parts, body))
            }
            Err(e) => {
                if DECISION_LOG.allow() {
                    tracing::warn!(listener = %self.name, error = %e, "app unreachable");
                }
                Err(self.refuse(Refusal::AppUnavailable))
            }
        }
    }

    /// A model API request: admitted (or refused) by its route, forwarded
    /// with the body the route read, answered and settled by the route.
    async fn forward_model(
        &self,
        route: &Route,
        mut parts: http::request::Parts,
        body: Incoming,
        peer: &VerifiedPeer,
    ) -> Response<Body> {
        let bodiless = matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
        ) && body.is_end_stream();
        let gate = match route.gate(peer.id()).await {
            Ok(g) => g,
            Err(resp) => return resp,
        };
        let (req, admitted) = if bodiless {
            match route.admit_bodiless(peer.id(), gate) {
                Ok(a) => {
                    let body = body.map_frame(clean_trailers as fn(Frame<Bytes>) -> Frame<Bytes>);
                    (Request::from_parts(parts, Either::Left(body)), a)
                }
                Err(resp) => return resp,
            }
        } else {
            match route.admit(peer.id(), parts.uri.path(), body, gate).await {
                Ok((bytes, a)) => {
                    parts.headers.remove(header::CONTENT_LENGTH);
                    parts.headers.remove(header::TRANSFER_ENCODING);
                    // The answer is counted and limited: it must come uncompressed.
                    parts.headers.insert(
                        header::ACCEPT_ENCODING,
                        HeaderValue::from_static("identity"),
                    );
                    (
                        Request::from_parts(parts, Either::Right(Full::new(bytes))),
                        a,
                    )
                }
                Err(resp) => return resp,
            }
        };
        match self.forward(req).await {
            Ok(resp) => route.answer(admitted, resp).await,
            Err(resp) => {
                // The app never answered: nothing was generated.
                admitted.cancel();
                resp
            }
        }
    }
}

fn authority(addr: SocketAddr) -> Authority {
    Authority::try_from(addr.to_string()).unwrap_or_else(|_| Authority::from_static("127.0.0.1"))
}
