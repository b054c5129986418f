//! Inbound HTTP, one request at a time:
//! normalize the path (400 when unsafe) -> authorize (403, default deny) ->
//! replace the identity header -> forward to the app over pooled keep-alive
//! HTTP/1.1 (or h2c) -> count and time the answer.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncWrite};

use warden_ca::tls::VerifiedPeer;
use warden_config::proxy::Inbound;

use crate::authz::{self, Request as AuthzRequest};
use crate::headers;
use crate::identity::Identity;
use crate::metrics::ProxyMetrics;
use crate::normalize::normalize;
use crate::reload::PolicyRx;
use crate::respond::{Body, Refusal, boxed};

/// Everything an inbound HTTP listener needs per request.
pub struct InboundHttp {
    name: String,
    policy: PolicyRx,
    app: Authority,
    app_version: http::Version,
    client: Client<HttpConnector, Incoming>,
    builder: auto::Builder<TokioExecutor>,
    metrics: ProxyMetrics,
}

impl InboundHttp {
    /// Builds the app client (pooled) and the server settings from config.
    pub fn new(cfg: &Inbound, policy: PolicyRx, metrics: ProxyMetrics) -> Self {
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
            .max_header_list_size(u32::try_from(l.max_header_bytes).unwrap_or(u32::MAX));
        Self {
            name: cfg.name.clone(),
            policy,
            app: authority(cfg.app),
            app_version: if cfg.app_h2c {
                http::Version::HTTP_2
            } else {
                http::Version::HTTP_11
            },
            client,
            builder,
            metrics,
        }
    }

    /// Serves HTTP/1.1 or h2 (as negotiated) on one authenticated connection.
    pub async fn serve<S>(
        self: &Arc<Self>,
        tls: S,
        peer: VerifiedPeer,
        own: &Identity,
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
            let (this, peer, xfcc) = (this.clone(), peer.clone(), xfcc.clone());
            async move { Ok::<_, Infallible>(this.handle(req, &peer, &xfcc).await) }
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
        let resp = match self.admit(req, peer, xfcc) {
            Ok(req) => self.forward(req).await,
            Err(r) => {
                self.metrics
                    .rejected
                    .with_label_values(&[&self.name, r.reason()])
                    .inc();
                r.response(match r {
                    Refusal::BadPath => "the request path cannot be normalized safely",
                    _ => "the caller's identity is not allowed to make this request",
                })
            }
        };
        let class = match resp.status().as_u16() {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.metrics
            .requests
            .with_label_values(&[&self.name, class])
            .inc();
        self.metrics
            .latency
            .with_label_values(&[&self.name])
            .observe(start.elapsed().as_secs_f64());
        resp
    }

    /// The request stages before the app: path, policy, identity header.
    fn admit(
        &self,
        req: Request<Incoming>,
        peer: &VerifiedPeer,
        xfcc: &HeaderValue,
    ) -> Result<Request<Incoming>, Refusal> {
        let (mut parts, body) = req.into_parts();
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
            tracing::info!(listener = %self.name, peer = %peer.id(), method = %parts.method, path, rule = d.rule, "request denied");
            return Err(Refusal::Forbidden);
        }
        if d.result == "audit_deny" {
            tracing::warn!(listener = %self.name, peer = %peer.id(), method = %parts.method, path, rule = d.rule, "audit: would deny this request");
        }
        // The app sees the path that was authorized, and the caller's original Host.
        let host = parts.uri.authority().map(|a| a.as_str().to_owned());
        let pq = match parts.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let mut uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.app.clone());
        uri = uri.path_and_query(PathAndQuery::try_from(pq).map_err(|_| Refusal::BadPath)?);
        parts.uri = uri.build().map_err(|_| Refusal::BadPath)?;
        headers::set_identity(&mut parts.headers, xfcc);
        if !parts.headers.contains_key(header::HOST)
            && let Some(h) = host.and_then(|h| HeaderValue::from_str(&h).ok())
        {
            parts.headers.insert(header::HOST, h);
        }
        parts.version = self.app_version;
        Ok(Request::from_parts(parts, body))
    }

    async fn forward(&self, req: Request<Incoming>) -> Response<Body> {
        match self.client.request(req).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                headers::strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, boxed(body))
            }
            Err(e) => {
                self.metrics
                    .rejected
                    .with_label_values(&[&self.name, "app_unavailable"])
                    .inc();
                tracing::warn!(listener = %self.name, error = %e, "app unreachable");
                Refusal::AppUnavailable.response("the app behind this proxy did not answer")
            }
        }
    }
}

fn authority(addr: SocketAddr) -> Authority {
    Authority::try_from(addr.to_string()).unwrap_or_else(|_| Authority::from_static("127.0.0.1"))
}
