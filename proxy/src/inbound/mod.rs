//! Inbound: accept mTLS from peers and forward to the local app. The whole
//! path, top to bottom:
//!
//! accept -> connection limit -> TLS 1.3 + peer identity (client
//! certificate required: chain -> bundle, the X.509-SVID leaf profile, our
//! trust domain; refused handshakes counted by reason) -> `VerifiedPeer` ->
//! TCP (`tcp.rs`), or HTTP/1.1 or h2 by ALPN (`server.rs`) -> per request,
//! the stack in [`stack`]:
//!
//! observe -> respond -> limits -> path -> authorize -> rate limit ->
//! identity header -> model guard -> app client (with the response timeout).

mod app;
mod authorize;
mod identity;
mod limits;
mod model;
mod path;
mod rate_limit;
mod report;
mod server;
#[cfg(test)]
mod stack_tests;
mod tcp;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tower::{Service, ServiceBuilder};

use warden_config::proxy::{Inbound, Protocol};
use warden_identity::ratelog::LogLimiter;
use warden_identity::tls::{self, VerifiedPeer};

use crate::headers;
use crate::identity::{Identity, IdentityRx};
use crate::idle::IdleTimeout;
use crate::listener::ConnGuard;
use crate::metrics::{Direction, ProxyMetrics};
use crate::respond::{RefusalCounters, RespondLayer};
use crate::revoke::Revocable;
use crate::stack::observe::{ObserveLayer, Observed, Shared};
use crate::stack::{CheckLayer, ReqBody};
use crate::tls::{H2, HTTP1, server_config};
use warden_guard::limits::Store;
use warden_guard::route::Routes;

pub use authorize::{CompiledPolicy, PolicyRx};

static HANDSHAKE_LOG: LogLimiter = LogLimiter::new(10);

/// What every connection of one listener shares (one allocation, not a copy
/// of the config per connection).
struct Listener {
    cfg: Inbound,
    name: Arc<str>,
    policy: PolicyRx,
    metrics: ProxyMetrics,
    observe: Arc<Shared>,
    refusals: RefusalCounters,
    app: app::AppClient,
    models: Arc<Routes>,
    builder: auto::Builder<TokioExecutor>,
}

impl Listener {
    /// The request stack for one connection from `peer`: every stage an
    /// inbound request goes through, in order.
    fn stack(
        &self,
        peer: Arc<VerifiedPeer>,
        local_port: u16,
        xfcc: http::HeaderValue,
        busy: Arc<AtomicUsize>,
    ) -> impl Service<
        http::Request<Incoming>,
        Response = http::Response<Observed>,
        Error = std::convert::Infallible,
        Future: Send,
    > + Clone
    + Send
    + 'static {
        let l = &self.cfg.limits;
        ServiceBuilder::new()
            .map_request(|req: http::Request<Incoming>| req.map(ReqBody::caller))
            .layer(ObserveLayer::new(
                self.observe.clone(),
                busy,
                Some(peer.id().as_str().into()),
            ))
            .layer(RespondLayer::new(self.refusals.clone()))
            .layer(CheckLayer(limits::RequestLimits::new(l)))
            .layer(CheckLayer(path::NormalizePath))
            .layer(authorize::AuthorizeLayer::new(
                self.name.clone(),
                self.policy.clone(),
                peer.clone(),
                local_port,
            ))
            .layer(rate_limit::RateLimitLayer::new(
                self.policy.clone(),
                peer.clone(),
                local_port,
            ))
            .layer(CheckLayer(identity::IdentityHeader {
                xfcc,
                app_h2c: self.cfg.app_h2c,
            }))
            .layer(model::ModelGuardLayer::new(self.models.clone(), peer))
            .service(self.app.clone())
    }

    /// Serves HTTP/1.1 or h2 on one authenticated connection.
    async fn serve_http<S>(
        &self,
        tls: S,
        peer: VerifiedPeer,
        local_port: u16,
        own: &Identity,
        busy: Arc<AtomicUsize>,
        watcher: hyper_util::server::graceful::Watcher,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Some(xfcc) = headers::xfcc_value(own.id.as_str(), peer.id().as_str()) else {
            return;
        };
        let svc = crate::stack::Serve::new(self.stack(Arc::new(peer), local_port, xfcc, busy));
        let conn = self
            .builder
            .serve_connection(TokioIo::new(tls), svc)
            .into_owned();
        if let Err(e) = watcher.watch(conn).await {
            tracing::debug!(listener = %self.name, error = %e, "connection ended with an error");
        }
    }
}

/// Serves one inbound listener until `shutdown`, then drains within `drain`.
/// Model routes keep their limits in `store`.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    cfg: Inbound,
    policy: PolicyRx,
    listener: TcpListener,
    identity: IdentityRx,
    metrics: ProxyMetrics,
    store: Arc<Store>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let name: Arc<str> = cfg.name.as_str().into();
    let limit = Arc::new(Semaphore::new(cfg.limits.max_connections));
    let graceful = GracefulShutdown::new();
    let reporter: Option<warden_guard::report::Reporter> =
        Some(Arc::new(report::CaReporter::new(identity.clone())));
    let refusals = RefusalCounters::for_listener(&metrics, Direction::Inbound, &name);
    let conns = metrics.connections(Direction::Inbound, &name);
    let revoked = metrics.revoked.with_label_values(&["inbound", &name]);
    let shared = Arc::new(Listener {
        name: name.clone(),
        policy,
        observe: Arc::new(Shared::new(
            &metrics,
            Direction::Inbound,
            &name,
            cfg.limits.max_requests_in_flight,
        )),
        refusals: refusals.clone(),
        app: app::AppClient::new(
            name.clone(),
            cfg.app,
            cfg.app_h2c,
            (cfg.limits.connect_timeout, cfg.limits.response_timeout),
        ),
        models: Arc::new(Routes::new(
            &cfg.name,
            &cfg.model_api,
            &store,
            &metrics.model,
            reporter,
        )),
        builder: server::builder(&cfg.limits),
        metrics: metrics.clone(),
        cfg: cfg.clone(),
    });
    // Usage recordings (`record:`) are written every minute and at the end.
    let recorders: Vec<_> = shared.models.recorders().cloned().collect();
    for r in &recorders {
        tokio::spawn(r.clone().keep(Duration::from_secs(60)));
    }
    let alpn: &[&[u8]] = match cfg.protocol {
        Protocol::Http => &[H2, HTTP1],
        Protocol::Tcp => &[],
    };
    let mut cache: Option<(Arc<Identity>, TlsAcceptor)> = None;
    loop {
        let Some((stream, peer_addr)) =
            crate::listener::next(&listener, &mut shutdown, &name).await
        else {
            break;
        };
        let Some(guard) = ConnGuard::admit(&limit, &conns, &refusals) else {
            continue;
        };
        // Fail closed: no valid certificate, no handshake.
        let current = identity.borrow().clone();
        let Some(id) = current.filter(|id| id.is_valid(time::OffsetDateTime::now_utc())) else {
            metrics
                .handshake_failures
                .with_label_values(&["inbound", &name, "no_identity"])
                .inc();
            continue;
        };
        let acceptor = match &cache {
            Some((cached, a)) if Arc::ptr_eq(cached, &id) => a.clone(),
            _ => match server_config(&id, alpn) {
                Ok(c) => {
                    let a = TlsAcceptor::from(c as Arc<ServerConfig>);
                    cache = Some((id.clone(), a.clone()));
                    a
                }
                Err(e) => {
                    tracing::error!(listener = %name, error = %e, "cannot build the TLS config");
                    continue;
                }
            },
        };
        let l = shared.clone();
        let watcher = graceful.watcher();
        let revoked = revoked.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let (cfg, name, metrics) = (&l.cfg, &l.name, &l.metrics);
            let _ = stream.set_nodelay(true);
            // Rules with `ports` match the port the connection was accepted on.
            let local_port = stream.local_addr().map_or(0, |a| a.port());
            let busy = Arc::new(AtomicUsize::new(0));
            let stream = IdleTimeout::new(stream, cfg.limits.idle_timeout).with_busy(busy.clone());
            let tls = match tls::accept(&acceptor, stream, cfg.limits.handshake_timeout).await {
                Ok(t) => t,
                Err(e) => {
                    let reason = tls::handshake_failure_reason(&e);
                    metrics
                        .handshake_failures
                        .with_label_values(&["inbound", name, reason])
                        .inc();
                    if HANDSHAKE_LOG.allow() {
                        tracing::warn!(listener = %name, peer = %peer_addr, reason, error = %e, "handshake refused");
                    }
                    return;
                }
            };
            let peer = match tls::verified_client(tls.get_ref().1, &id.trust_domain) {
                Some(Ok(p)) => p,
                // Unreachable: the verifier requires and checks the certificate.
                _ => {
                    metrics
                        .handshake_failures
                        .with_label_values(&["inbound", name, "no_client_cert"])
                        .inc();
                    return;
                }
            };
            // Closed the moment the CA denies the peer.
            let tls = Revocable::new(tls, peer.id().clone(), &id.denied, revoked);
            match cfg.protocol {
                Protocol::Http => {
                    l.serve_http(tls, peer, local_port, &id, busy, watcher)
                        .await
                }
                Protocol::Tcp => tcp::serve(cfg, &l.policy, tls, peer, local_port, metrics).await,
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(listener = %name, "drain timeout: closing connections with requests in flight");
    }
    for r in recorders {
        if let Err(e) = r.flush() {
            tracing::warn!(listener = %name, error = %e, "cannot write the usage recording");
        }
    }
}
