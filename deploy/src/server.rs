//! `warden webhook`: the admission webhook over HTTPS (its certificate
//! from files, reloaded when they change: the warden CA issues it with the
//! Service's DNS names), with `/live`, `/ready` and `/metrics` on an admin
//! port. Malformed reviews are answered 400 and counted.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus::{IntCounterVec, Opts, Registry};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use warden_identity::http::{Body, BodyError, problem, read_body, respond, server_builder};
use warden_identity::tls::{RotatingCert, certified_key, provider};

use crate::sidecar::Settings;
use crate::webhook::{OptIn, review};

/// Largest AdmissionReview read (the API server caps objects at 1.5 MiB).
pub const MAX_REVIEW_BYTES: usize = 2 << 20;
/// Reviews decided at once: each holds the pod parsed twice, so this bounds
/// memory (the pod manifest gives the webhook 256 MiB).
pub const MAX_REVIEWS_IN_FLIGHT: usize = 4;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 256;
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What `warden webhook` is started with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The HTTPS listener.
    pub listen: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    /// Serving certificate chain (PEM).
    pub cert: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
    /// What the sidecars get.
    pub settings: Settings,
}

/// Why the webhook could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate or key is not usable.
    #[error("serving certificate: {0}")]
    Certificate(String),
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

fn load(cfg: &Config) -> Result<rustls::sign::CertifiedKey, String> {
    let read =
        |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    certified_key(&read(&cfg.cert)?, &read(&cfg.key)?, &provider()).map_err(|e| e.to_string())
}

fn modified(cfg: &Config) -> Vec<Option<SystemTime>> {
    [&cfg.cert, &cfg.key]
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

async fn bind(name: &str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    println!("listening {name} {}", l.local_addr().unwrap_or(addr));
    Ok(l)
}

/// Serves until `shutdown` turns true, then drains.
pub async fn run(cfg: Config, mut shutdown: watch::Receiver<bool>) -> Result<(), StartError> {
    let cert = Arc::new(RotatingCert::default());
    cert.set(load(&cfg).map_err(StartError::Certificate)?);
    let api = bind("webhook", cfg.listen).await?;
    let admin = bind("admin", cfg.admin).await?;
    let registry = Registry::new();
    warden_identity::admin::register_process(&registry)?;
    let reviews = IntCounterVec::new(
        Opts::new(
            "warden_webhook_reviews_total",
            "AdmissionReviews answered, by path and result (injected, unchanged, skipped, malformed).",
        ),
        &["path", "result"],
    )?;
    registry.register(Box::new(reviews.clone()))?;
    tokio::spawn(warden_identity::admin::serve(
        admin,
        registry,
        Arc::new(|| Ok(())),
        shutdown.clone(),
    ));
    // The certificate files are renewed by whoever writes them: reload.
    {
        let (cert, cfg, mut shutdown) = (cert.clone(), cfg.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut seen = modified(&cfg);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = shutdown.changed() => return,
                }
                let now = modified(&cfg);
                if now != seen {
                    seen = now;
                    match load(&cfg) {
                        Ok(k) => {
                            cert.set(k);
                            tracing::info!("serving certificate reloaded");
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "serving certificate changed but is not usable; keeping the current one")
                        }
                    }
                }
            }
        });
    }
    let mut tls = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError::Certificate(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    println!("ready");

    let settings = Arc::new(cfg.settings);
    let deciding = Arc::new(Semaphore::new(MAX_REVIEWS_IN_FLIGHT));
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    let builder = Arc::new(server_builder());
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (stream, peer) = tokio::select! {
            r = api.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let (acceptor, builder, watcher) = (acceptor.clone(), builder.clone(), graceful.watcher());
        let (settings, reviews, deciding) = (settings.clone(), reviews.clone(), deciding.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = service_fn(move |req| {
                let (settings, reviews, deciding) =
                    (settings.clone(), reviews.clone(), deciding.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(
                        answer(req, &settings, &reviews, &deciding).await,
                    )
                }
            });
            let conn = builder
                .serve_connection(TokioIo::new(tls), service)
                .into_owned();
            let _ = watcher.watch(conn).await;
        });
    }
    drop(api);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await;
    Ok(())
}

async fn answer(
    req: Request<Incoming>,
    s: &Settings,
    reviews: &IntCounterVec,
    deciding: &Semaphore,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let Some(opt_in) = OptIn::from_path(&path) else {
        return problem(
            404,
            "not_found",
            "the webhook answers POST /inject/namespace and /inject/pod",
        );
    };
    if req.method() != Method::POST {
        return problem(405, "method_not_allowed", "POST an AdmissionReview");
    }
    let body = match read_body(req.into_body(), MAX_REVIEW_BYTES, BODY_TIMEOUT).await {
        Ok(b) => b,
        Err(e) => {
            reviews.with_label_values(&[&path, "malformed"]).inc();
            let status = if matches!(e, BodyError::TooLarge(_)) {
                413
            } else {
                400
            };
            return problem(status, "bad_review", &e.to_string());
        }
    };
    let Ok(_turn) = deciding.acquire().await else {
        return problem(503, "shutting_down", "the webhook is stopping");
    };
    match review(&body, opt_in, s) {
        Ok((answer, verdict)) => {
            reviews.with_label_values(&[&path, verdict.label()]).inc();
            respond(StatusCode::OK, "application/json", answer.to_string())
        }
        Err(why) => {
            reviews.with_label_values(&[&path, "malformed"]).inc();
            tracing::warn!(path, error = %why, "malformed AdmissionReview");
            problem(400, "bad_review", &why)
        }
    }
}
