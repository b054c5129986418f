//! Outbound: a plain listener on loopback for the app; warden originates
//! mTLS to the destination with the workload's SVID and refuses a server
//! whose SPIFFE ID is not the expected one (secure naming: the app gets 502
//! and the log names what the server presented; a TCP connection is
//! closed). HTTP/1.1 requests ride pooled keep-alive connections; h2
//! (prior-knowledge h2c from the app) rides one multiplexed h2 connection.
//!
//! Per request, the stack: observe -> respond -> upstream client
//! (`upstream.rs`, with the response-head timeout).

mod connector;
mod upstream;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tower::ServiceBuilder;

use warden_config::proxy::{Outbound, Protocol};

use crate::identity::IdentityRx;
use crate::idle::IdleTimeout;
use crate::listener::ConnGuard;
use crate::metrics::{Direction, ProxyMetrics};
use crate::respond::{Refusal, RefusalCounters, RespondLayer};
use crate::stack::ReqBody;
use crate::stack::observe::{ObserveLayer, Shared};
use crate::tls::{H2, HTTP1, client_config};

pub use connector::{Dial, MtlsConnector};

static UPSTREAM_LOG: warden_identity::ratelog::LogLimiter =
    warden_identity::ratelog::LogLimiter::new(10);

/// Keeps a client config for `cfg` rebuilt from every new identity.
fn config_channel(
    cfg: &Outbound,
    mut identity: IdentityRx,
    alpn: &'static [u8],
) -> watch::Receiver<Option<Dial>> {
    let build = |id: &Option<Arc<crate::identity::Identity>>,
                 expected: &warden_config::IdentityPattern| {
        id.as_ref().and_then(|id| {
            Some(Dial {
                config: client_config(id, expected, alpn).ok()?,
                denied: id.denied.clone(),
            })
        })
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
    let timeout = cfg.limits.handshake_timeout.min(cfg.limits.connect_timeout);
    let revoked = metrics.revoked.with_label_values(&["outbound", &name]);
    let h1_conn = MtlsConnector::new(
        &cfg.destination,
        config_channel(&cfg, identity.clone(), HTTP1),
        timeout,
        revoked.clone(),
    );
    let h2_conn = MtlsConnector::new(
        &cfg.destination,
        config_channel(&cfg, identity, H2),
        timeout,
        revoked,
    );
    let refusals = RefusalCounters::for_listener(&metrics, Direction::Outbound, &name);
    let conns = metrics.connections(Direction::Outbound, &name);
    let observe = Arc::new(Shared::new(
        &metrics,
        Direction::Outbound,
        &name,
        cfg.limits.max_requests_in_flight,
    ));
    let pooled = upstream::Upstream::new(
        name.clone(),
        metrics.handshake_failures.clone(),
        &cfg.destination,
        (
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .build(h1_conn.clone()),
            Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(h2_conn),
        ),
        cfg.limits.response_timeout,
    );
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
        let Some(guard) = ConnGuard::admit(&limit, &conns, &refusals) else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let busy = Arc::new(AtomicUsize::new(0));
        let stream = IdleTimeout::new(stream, cfg.limits.idle_timeout).with_busy(busy.clone());
        match cfg.protocol {
            Protocol::Tcp => {
                let (conn, refusals, name) = (h1_conn.clone(), refusals.clone(), name.clone());
                let handshakes = metrics.handshake_failures.clone();
                tokio::spawn(async move {
                    let _guard = guard;
                    splice(stream, &conn, &refusals, &handshakes, &name).await;
                });
            }
            Protocol::Http => {
                // Without pooling, this app connection gets its own upstream connection.
                let upstream = if cfg.pool {
                    pooled.clone()
                } else {
                    pooled.with_own_connection(h1_conn.clone())
                };
                let stack = ServiceBuilder::new()
                    .map_request(|req: http::Request<Incoming>| req.map(ReqBody::caller))
                    .layer(ObserveLayer::new(observe.clone(), busy, None))
                    .layer(RespondLayer::new(refusals.clone()))
                    .service(upstream);
                let builder = builder.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let _guard = guard;
                    let conn = builder
                        .serve_connection(TokioIo::new(stream), crate::stack::Serve::new(stack))
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
    refusals: &RefusalCounters,
    handshakes: &prometheus::IntCounterVec,
    name: &str,
) {
    match conn.connect().await {
        Ok(mut tls) => {
            let _ = tokio::io::copy_bidirectional(&mut app, &mut tls).await;
        }
        Err(e) => {
            refusals.count(&upstream_failed(name, handshakes, &*e));
        }
    }
}

/// Secure-naming failures get their own answer: they mean a wrong or
/// impersonating server, not a network problem.
pub(crate) fn upstream_failure(e: &(dyn std::error::Error + 'static)) -> Refusal {
    if crate::stack::causes(e).any(|c| c.is::<connector::NoCertificate>()) {
        return Refusal::NoIdentity;
    }
    let wrong_name = crate::stack::causes(e).any(|c| {
        matches!(
            c.downcast_ref::<rustls::Error>(),
            Some(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. }
            ))
        )
    });
    if wrong_name {
        Refusal::WrongServerIdentity
    } else {
        Refusal::UpstreamUnavailable
    }
}

/// Counts and logs (rate-limited) a failed upstream connection or request.
pub(crate) fn upstream_failed(
    listener: &str,
    handshakes: &prometheus::IntCounterVec,
    e: &(dyn std::error::Error + 'static),
) -> Refusal {
    let refusal = upstream_failure(e);
    if let Some(reason) = MtlsConnector::handshake_reason(e) {
        handshakes
            .with_label_values(&["outbound", listener, reason])
            .inc();
    }
    if UPSTREAM_LOG.allow() {
        tracing::warn!(listener = %listener, reason = refusal.reason(), error = %MtlsConnector::describe_error(e), "cannot reach the destination");
    }
    refusal
}
