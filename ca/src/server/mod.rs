//! `warden ca serve`: the CA's HTTPS API and admin listeners.
//!
//! The API is served with a certificate the CA issues to itself
//! (`spiffe://<td>/warden/ca`), renewed at half-life. Clients may present an
//! SVID (renewal) or none (bootstrap with a join token); a presented
//! certificate must verify against the bundle and carry exactly one SPIFFE ID
//! in this trust domain, or the handshake fails and is counted by reason.

pub mod api;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::ServerConfig;
use time::OffsetDateTime;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::authority::CaError;
use crate::lifetime::renew_at;
use crate::ratelog::LogLimiter;
use crate::service::{CaService, Caller};
use crate::tls::{self, RotatingCert, SpiffeClientVerifier};

/// Most simultaneous API connections; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 1024;
/// Longest a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest SIGTERM waits for in-flight requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed after this long, busy or idle: a client needs one
/// request per renewal, and nobody may sit on one of the connection slots.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// Shortest wait between two renewals of the server's own certificate.
const MIN_RENEW_INTERVAL: Duration = Duration::from_secs(1);
/// How often the rotation schedule is looked at (it acts a few times a year
/// with default lifetimes; the check itself reads memory).
const ROTATION_CHECK: Duration = Duration::from_secs(1);

static HANDSHAKE_LOG: LogLimiter = LogLimiter::new(10);

/// Binds a listener and prints the fixed startup line for it (DESIGN.md):
/// `listening <name> <ip:port>`, with the port the kernel picked for port 0.
pub async fn bind(name: &str, addr: SocketAddr) -> Result<TcpListener, CaError> {
    warden_identity::listen::bind(name, addr)
        .await
        .map_err(|source| CaError::Io {
            path: format!("{name} listener {addr}").into(),
            source,
        })
}

/// Obtains the serving certificate, prints `ready`, and serves the API and
/// admin endpoints until `shutdown` turns true; then drains.
pub async fn run(
    svc: Arc<CaService>,
    api: TcpListener,
    admin: TcpListener,
    shutdown: watch::Receiver<bool>,
) -> Result<(), CaError> {
    let cert = Arc::new(RotatingCert::default());
    let cert_valid_until = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let next = renew_serving_cert(&svc, &cert, &cert_valid_until).await?;
    let listening = Arc::new(AtomicBool::new(true));
    let ready = {
        let until = cert_valid_until.clone();
        let listening = listening.clone();
        Arc::new(move || {
            if !listening.load(Ordering::Relaxed) {
                Err("shutting down".to_owned())
            } else if until.load(Ordering::Relaxed) <= OffsetDateTime::now_utc().unix_timestamp() {
                Err("the CA server's own certificate has expired".to_owned())
            } else {
                Ok(())
            }
        })
    };
    tokio::spawn(crate::admin::serve(
        admin,
        svc.metrics.registry.clone(),
        ready,
        shutdown.clone(),
    ));
    tokio::spawn(crate::trust::keep_polling(svc.clone()));
    tokio::spawn(keep_renewing(
        svc.clone(),
        cert.clone(),
        cert_valid_until,
        next,
    ));

    tokio::spawn(keep_rotating(svc.clone()));
    let acceptor = Acceptor::new(&svc, cert)?;
    println!("ready");
    tracing::info!(id = %svc.authority.server_id(), "CA serving");
    accept_loop(svc, api, acceptor, shutdown).await;
    listening.store(false, Ordering::Relaxed);
    Ok(())
}

/// The API's TLS acceptor, rebuilt when the chain changes (a root added or
/// retired changes whose certificates verify).
struct Acceptor {
    cert: Arc<RotatingCert>,
    built_for: Arc<crate::authority::Chain>,
    acceptor: TlsAcceptor,
}

impl Acceptor {
    fn new(svc: &CaService, cert: Arc<RotatingCert>) -> Result<Self, CaError> {
        let chain = svc.authority.chain();
        let acceptor = TlsAcceptor::from(Arc::new(server_config(svc, &chain, cert.clone())?));
        Ok(Self {
            cert,
            built_for: chain,
            acceptor,
        })
    }

    fn current(&mut self, svc: &CaService) -> TlsAcceptor {
        let chain = svc.authority.chain();
        if !Arc::ptr_eq(&chain, &self.built_for) {
            match server_config(svc, &chain, self.cert.clone()) {
                Ok(c) => self.acceptor = TlsAcceptor::from(Arc::new(c)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot rebuild the API's TLS config; keeping the last one")
                }
            }
            self.built_for = chain;
        }
        self.acceptor.clone()
    }
}

fn server_config(
    svc: &CaService,
    chain: &crate::authority::Chain,
    cert: Arc<RotatingCert>,
) -> Result<ServerConfig, CaError> {
    let provider = tls::provider();
    let tls_err = |e: String| CaError::Setup(format!("tls setup: {e}"));
    let roots = tls::root_store(&chain.roots).map_err(|e| tls_err(e.to_string()))?;
    let verifier = SpiffeClientVerifier::new(
        roots,
        svc.authority.trust_domain().clone(),
        provider.clone(),
        true,
    )
    .map_err(|e| tls_err(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err(e.to_string()))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // No resumption: a resumed session would carry a client certificate
    // forward without checking it again, past its expiry.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// Issues the server's own certificate and installs it; returns when to renew.
async fn renew_serving_cert(
    svc: &CaService,
    cert: &RotatingCert,
    valid_until: &std::sync::atomic::AtomicI64,
) -> Result<OffsetDateTime, CaError> {
    let now = OffsetDateTime::now_utc();
    let (issued, key_pem) = svc
        .issue_local(&svc.authority.server_id(), None, "self", now)
        .map_err(|e| CaError::Setup(format!("issuing the server certificate: {e}")))?;
    let key = tls::certified_key(&issued.svid.chain_pem, &key_pem, &tls::provider())
        .map_err(|e| CaError::Setup(format!("loading the server certificate: {e}")))?;
    cert.set(key);
    let v = issued.svid.validity;
    valid_until.store(v.not_after.unix_timestamp(), Ordering::Relaxed);
    svc.metrics
        .cert_expiry
        .with_label_values(&["serving"])
        .set(v.not_after.unix_timestamp() as f64);
    let jitter = (rand::random::<f64>() - 0.5) / 5.0;
    Ok(renew_at(v.not_before, v.not_after, jitter))
}

async fn keep_renewing(
    svc: Arc<CaService>,
    cert: Arc<RotatingCert>,
    valid_until: Arc<std::sync::atomic::AtomicI64>,
    mut next: OffsetDateTime,
) {
    let mut feed = svc.trust.subscribe();
    loop {
        let wait = (next - OffsetDateTime::now_utc())
            .unsigned_abs()
            .max(MIN_RENEW_INTERVAL);
        let signer = svc.authority.chain().intermediate_id.clone();
        // Renew at half-life, or at once when another intermediate signs (a
        // root is activated): the server's chain moves with its workloads'.
        let moved = tokio::select! {
            () = tokio::time::sleep(wait) => false,
            r = feed.wait_for(|_| svc.authority.chain().intermediate_id != signer) => r.is_ok(),
        };
        if moved {
            tokio::time::sleep(MIN_RENEW_INTERVAL).await;
        }
        match renew_serving_cert(&svc, &cert, &valid_until).await {
            Ok(n) => next = n,
            Err(e) => {
                tracing::error!(error = %e, "renewing the CA server certificate failed; retrying in 30s");
                next = OffsetDateTime::now_utc() + Duration::from_secs(30);
            }
        }
    }
}

/// Moves the rotation schedule on (see [`crate::rotation`]).
async fn keep_rotating(svc: Arc<CaService>) {
    static ROTATION_LOG: LogLimiter = LogLimiter::new(2);
    loop {
        tokio::time::sleep(ROTATION_CHECK).await;
        let s = svc.clone();
        match tokio::task::spawn_blocking(move || s.rotate(OffsetDateTime::now_utc())).await {
            Ok(Ok(steps)) => {
                for step in steps {
                    tracing::info!(?step, "intermediate rotation");
                }
            }
            Ok(Err(e)) => {
                svc.metrics.rotation_failures.inc();
                if ROTATION_LOG.allow() {
                    tracing::error!(error = %e, "intermediate rotation failed; the current intermediate keeps signing");
                }
            }
            Err(e) => tracing::error!(error = %e, "rotation task failed"),
        }
    }
}

async fn accept_loop(
    svc: Arc<CaService>,
    listener: TcpListener,
    mut acceptor: Acceptor,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    let builder = Arc::new(crate::http::server_builder());
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, peer)) => (s, warden_identity::listen::canonical(peer)),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let acceptor = acceptor.current(&svc);
        let svc = svc.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let Some((tls, caller)) = handshake(&svc, &acceptor, stream, peer).await else {
                return;
            };
            let svc2 = svc.clone();
            let service = service_fn(move |req| {
                let (svc, caller) = (svc2.clone(), caller.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(
                        api::handle(svc, caller, peer.ip(), req).await,
                    )
                }
            });
            let conn = builder
                .serve_connection(TokioIo::new(tls), service)
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    svc.trust.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout: closing connections with requests in flight");
    }
}

async fn handshake(
    svc: &CaService,
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, Caller)> {
    let _ = stream.set_nodelay(true);
    let tls = match tls::accept(acceptor, stream, HANDSHAKE_TIMEOUT).await {
        Ok(tls) => tls,
        Err(e) => {
            let reason = tls::handshake_failure_reason(&e);
            svc.metrics
                .handshake_failures
                .with_label_values(&[reason])
                .inc();
            if HANDSHAKE_LOG.allow() {
                tracing::warn!(%peer, reason, error = %e, "handshake refused");
            }
            return None;
        }
    };
    let caller = match tls::verified_client(tls.get_ref().1, svc.authority.trust_domain()) {
        None => Caller::Anonymous,
        Some(Ok(p)) => {
            let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
            let serial = leaf.and_then(|l| {
                x509_parser::parse_x509_certificate(l)
                    .ok()
                    .map(|(_, c)| hex::encode(c.raw_serial()))
            });
            match (leaf.map(|l| crate::authority::validity_of(l)), serial) {
                (Some(Ok(v)), Some(serial)) => Caller::Svid {
                    id: p.into_id(),
                    not_after: v.not_after,
                    serial,
                },
                _ => return None,
            }
        }
        // The verifier already refused such certificates; never reached.
        Some(Err(e)) => {
            svc.metrics
                .handshake_failures
                .with_label_values(&[e.reason()])
                .inc();
            return None;
        }
    };
    Some((tls, caller))
}
