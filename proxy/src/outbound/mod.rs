//! Outbound: a plain listener on loopback for the app; warden originates
//! mTLS to the destination with the workload's SVID and refuses a server
//! whose SPIFFE ID is not the expected one (secure naming: the app gets 502,
//! a TCP connection is closed). HTTP/1.1 requests ride pooled keep-alive
//! connections; h2 (prior-knowledge h2c from the app) rides one multiplexed
//! h2 connection.

mod connector;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::ClientConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use warden_config::proxy::{Outbound, Protocol};

use crate::headers;
use crate::identity::IdentityRx;
use crate::idle::IdleTimeout;
use crate::listener::ConnGuard;
use crate::metrics::{ProxyMetrics, RequestMetrics};
use crate::respond::{Body, Refusal, upstream};
use crate::tls::{H2, HTTP1, client_config};

pub use connector::MtlsConnector;

static UPSTREAM_LOG: warden_identity::ratelog::LogLimiter =
    warden_identity::ratelog::LogLimiter::new(10);

/// Keeps a client config for `cfg` rebuilt from every new identity.
fn config_channel(
    cfg: &Outbound,
    mut identity: IdentityRx,
    alpn: &'static [u8],
) -> watch::Receiver<Option<Arc<ClientConfig>>> {
    let build = |id: &Option<Arc<crate::identity::Identity>>,
                 expected: &warden_config::IdentityPattern| {
        id.as_ref()
            .and_then(|id| client_config(id, expected, alpn).ok())
    };
    let expected = cfg.server_id.clone();
    let (tx, rx) = watch::channel(build(&identity.borrow(), &expected));
    tokio::spawn(async move {
        while identity.changed().await.is_ok() {
            let next = build(&identity.borrow(), &expected);
            if tx.send(next).is_err() {
                return;
            }
        }
    });
    rx
}

struct OutboundHttp {
    name: String,
    authority: http::uri::Authority,
    h1: Client<MtlsConnector, Incoming>,
    h2: Client<MtlsConnector, Incoming>,
    requests: RequestMetrics,
    metrics: ProxyMetrics,
}

/// Serves one outbound listener until `shutdown`, then drains within `drain`.
pub async fn serve(
    cfg: Outbound,
    listener: TcpListener,
    identity: IdentityRx,
    metrics: ProxyMetrics,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let name: Arc<str> = cfg.name.as_str().into();
    let limit = Arc::new(Semaphore::new(cfg.limits.max_connections));
    let graceful = GracefulShutdown::new();
    let timeout = cfg.limits.handshake_timeout;
    let h1_conn = MtlsConnector::new(
        &cfg.destination,
        config_channel(&cfg, identity.clone(), HTTP1),
        timeout,
    );
    let h2_conn = MtlsConnector::new(
        &cfg.destination,
        config_channel(&cfg, identity, H2),
        timeout,
    );
    let http = Arc::new(OutboundHttp {
        name: cfg.name.clone(),
        authority: http::uri::Authority::try_from(cfg.destination.as_str())
            .unwrap_or_else(|_| http::uri::Authority::from_static("invalid")),
        h1: Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(h1_conn.clone()),
        h2: Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(h2_conn),
        requests: RequestMetrics::new(&metrics, &cfg.name),
        metrics: metrics.clone(),
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(cfg.limits.header_read_timeout)
        .max_headers(cfg.limits.max_headers);
    builder
        .http2()
        .max_concurrent_streams(cfg.limits.max_concurrent_streams);
    let builder = Arc::new(builder);
    loop {
        let Some((stream, _)) = crate::listener::next(&listener, &mut shutdown, &name).await else {
            break;
        };
        let Some(guard) = ConnGuard::admit(&limit, &metrics, &name) else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let stream = IdleTimeout::new(stream, cfg.limits.idle_timeout);
        match cfg.protocol {
            Protocol::Tcp => {
                let (conn, metrics, name) = (h1_conn.clone(), metrics.clone(), name.clone());
                tokio::spawn(async move {
                    let _guard = guard;
                    splice(stream, &conn, &metrics, &name).await;
                });
            }
            Protocol::Http => {
                let (http, builder) = (http.clone(), builder.clone());
                let watcher = graceful.watcher();
                // Without pooling, this app connection gets its own upstream connection.
                let own = (!cfg.pool).then(|| Arc::new(OwnUpstream::new(h1_conn.clone())));
                tokio::spawn(async move {
                    let _guard = guard;
                    let svc = service_fn(move |req| {
                        let (http, own) = (http.clone(), own.clone());
                        async move { Ok::<_, Infallible>(http.handle(req, own.as_deref()).await) }
                    });
                    let conn = builder
                        .serve_connection(TokioIo::new(stream), svc)
                        .into_owned();
                    let _ = watcher.watch(conn).await;
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(listener = %name, "drain timeout: closing connections with requests in flight");
    }
}

async fn splice(
    mut app: IdleTimeout<TcpStream>,
    conn: &MtlsConnector,
    metrics: &ProxyMetrics,
    name: &str,
) {
    match conn.connect().await {
        Ok(mut tls) => {
            let _ = tokio::io::copy_bidirectional(&mut app, &mut tls).await;
        }
        Err(e) => {
            let reason = upstream_failure(&*e).reason();
            metrics.rejected.with_label_values(&[name, reason]).inc();
            if UPSTREAM_LOG.allow() {
                tracing::warn!(listener = %name, reason, error = %e, "cannot reach the destination");
            }
        }
    }
}

/// Secure-naming failures get their own answer: they mean a wrong or
/// impersonating server, not a network problem.
fn upstream_failure(e: &(dyn std::error::Error + 'static)) -> Refusal {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(rustls::Error::InvalidCertificate(c)) = err.downcast_ref::<rustls::Error>() {
            return match c {
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. } => {
                    Refusal::WrongServerIdentity
                }
                _ => Refusal::UpstreamUnavailable,
            };
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            cur = Some(inner);
            continue;
        }
        cur = err.source();
    }
    Refusal::UpstreamUnavailable
}

/// An upstream connection owned by one app connection (`pool: false`).
struct OwnUpstream {
    connector: MtlsConnector,
    sender: tokio::sync::Mutex<Option<hyper::client::conn::http1::SendRequest<Incoming>>>,
}

impl OwnUpstream {
    fn new(connector: MtlsConnector) -> Self {
        Self {
            connector,
            sender: tokio::sync::Mutex::new(None),
        }
    }

    async fn request(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, crate::respond::BoxError> {
        let mut slot = self.sender.lock().await;
        let reusable = slot.as_ref().is_some_and(|s| !s.is_closed());
        if !reusable {
            let tls = self.connector.connect().await?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
            tokio::spawn(conn);
            *slot = Some(sender);
        }
        let sender = slot.as_mut().ok_or("no upstream connection")?;
        sender.ready().await?;
        Ok(sender.send_request(req).await?)
    }
}

impl OutboundHttp {
    async fn handle(&self, req: Request<Incoming>, own: Option<&OwnUpstream>) -> Response<Body> {
        let start = Instant::now();
        let (mut parts, body) = req.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        let pq = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let h2 = parts.version == http::Version::HTTP_2;
        parts.uri = match Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
        {
            Ok(u) => u,
            Err(_) => return Refusal::BadPath.response(),
        };
        let req = Request::from_parts(parts, body);
        let result = match own {
            Some(own) if !h2 => {
                // The request goes as origin-form on a connection of its own.
                let (mut parts, body) = req.into_parts();
                parts.uri = parts
                    .uri
                    .path_and_query()
                    .cloned()
                    .map(Uri::from)
                    .unwrap_or_default();
                if !parts.headers.contains_key(http::header::HOST)
                    && let Ok(h) = http::HeaderValue::from_str(self.authority.as_str())
                {
                    parts.headers.insert(http::header::HOST, h);
                }
                own.request(Request::from_parts(parts, body)).await
            }
            _ => {
                let client = if h2 { &self.h2 } else { &self.h1 };
                client.request(req).await.map_err(Into::into)
            }
        };
        let resp = match result {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                headers::strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, upstream(body))
            }
            Err(e) => {
                let r = upstream_failure(&*e);
                self.metrics
                    .rejected
                    .with_label_values(&[&self.name, r.reason()])
                    .inc();
                if UPSTREAM_LOG.allow() {
                    tracing::warn!(listener = %self.name, reason = r.reason(), error = %e, "request to the destination failed");
                }
                r.response()
            }
        };
        self.requests
            .observe(resp.status(), start.elapsed().as_secs_f64());
        resp
    }
}
