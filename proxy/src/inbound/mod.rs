//! Inbound: accept mTLS from peers and forward to the local app.
//!
//! accept -> connection limit -> TLS 1.3 handshake (client certificate
//! required; chain -> bundle; exactly one URI SAN; our trust domain) ->
//! `VerifiedPeer` -> HTTP (`http.rs`) or TCP (`tcp.rs`).
//! A refused handshake is counted by reason and logged (rate-limited).

mod http;
mod tcp;

use std::sync::Arc;
use std::time::Duration;

use hyper_util::server::graceful::GracefulShutdown;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use warden_config::proxy::{Inbound, Protocol};
use warden_identity::ratelog::LogLimiter;
use warden_identity::tls;

use crate::identity::{Identity, IdentityRx};
use crate::idle::IdleTimeout;
use crate::listener::ConnGuard;
use crate::metrics::ProxyMetrics;
use crate::model::limits::Store;
use crate::model::report::Reporter;
use crate::reload::PolicyRx;
use crate::tls::{H2, HTTP1, server_config};

pub use http::InboundHttp;

static HANDSHAKE_LOG: LogLimiter = LogLimiter::new(10);

/// What every connection of one listener shares (one allocation, not a copy
/// of the config per connection).
struct Listener {
    cfg: Inbound,
    name: Arc<str>,
    policy: PolicyRx,
    metrics: ProxyMetrics,
    http: Arc<InboundHttp>,
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
    let reporter = Some(Reporter::new(identity.clone()));
    let http = Arc::new(InboundHttp::new(
        &cfg,
        policy.clone(),
        metrics.clone(),
        &store,
        reporter,
    ));
    let shared = Arc::new(Listener {
        cfg: cfg.clone(),
        name: name.clone(),
        policy,
        metrics: metrics.clone(),
        http,
    });
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
        let Some(guard) = ConnGuard::admit(&limit, &metrics, &name) else {
            continue;
        };
        // Fail closed: no valid certificate, no handshake.
        let current = identity.borrow().clone();
        let Some(id) = current.filter(|id| id.is_valid(time::OffsetDateTime::now_utc())) else {
            metrics
                .handshake_failures
                .with_label_values(&[&name, "no_identity"])
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
        tokio::spawn(async move {
            let _guard = guard;
            let (cfg, name, metrics) = (&l.cfg, &l.name, &l.metrics);
            let _ = stream.set_nodelay(true);
            let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let stream = IdleTimeout::new(stream, cfg.limits.idle_timeout).with_busy(busy.clone());
            let tls = match tls::accept(&acceptor, stream, cfg.limits.handshake_timeout).await {
                Ok(t) => t,
                Err(e) => {
                    let reason = tls::handshake_failure_reason(&e);
                    metrics
                        .handshake_failures
                        .with_label_values(&[name, reason])
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
                        .with_label_values(&[name, "no_client_cert"])
                        .inc();
                    return;
                }
            };
            match cfg.protocol {
                Protocol::Http => l.http.serve(tls, peer, &id, busy, watcher).await,
                Protocol::Tcp => tcp::serve(cfg, &l.policy, tls, peer, metrics).await,
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
}
