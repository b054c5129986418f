//! `warden webhook`: the admission webhook over HTTPS (its certificate,
//! with the Service's DNS names, from the warden CA or from files: see
//! [`crate::serving`]), with `/live`, `/ready` and `/metrics` on an admin
//! port. Malformed reviews are answered 400 and counted.
//!
//! Memory is bounded whatever callers do, and slow callers cannot crowd
//! the API server out: a review's body is read first, each chunk taking
//! its share of one [`BODY_BUDGET`] shared by all requests (a chunk waits
//! for budget, within [`BODY_TIMEOUT`]), so a slow sender holds only what
//! it has sent; only a complete body takes one of [`MAX_REVIEWS_IN_FLIGHT`]
//! turns to be decided, waiting at most [`QUEUE_TIMEOUT`] for it (then 503
//! `busy`, with `Retry-After`). h2 flow control windows are small, so a
//! stream holds at most [`H2_STREAM_WINDOW`] of unread body, a connection
//! [`H2_CONNECTION_WINDOW`]. A source address has at most
//! [`MAX_CONNECTIONS_PER_SOURCE`] of the [`MAX_CONNECTIONS`] connections (the
//! others are closed at once), and a connection with no request for the
//! idle timeout, or older than [`MAX_CONNECTION_AGE`], is closed gracefully
//! (GOAWAY on h2: the API server reconnects).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use warden_identity::http::{Body, BodyError, problem, respond, server_builder};
use warden_identity::tls::{RotatingCert, provider};

use crate::limits::{ByteBudget, PerSource};
pub use crate::serving::Source;
use crate::sidecar::Settings;
use crate::webhook::{OptIn, review};

/// Largest AdmissionReview read (the API server caps objects at 1.5 MiB).
pub const MAX_REVIEW_BYTES: usize = 2 << 20;
/// Bytes of review bodies held at once, by all requests together (buffer
/// capacity: a body holds at most twice what it has sent). A chunk waits
/// for budget; the body timeout still applies.
pub const BODY_BUDGET: usize = 8 << 20;
/// Reviews decided at once: each parses its pod twice, so this bounds
/// memory (the pod manifest gives the webhook 256 MiB). The turn is taken
/// once the body is complete, so slow senders never hold one.
pub const MAX_REVIEWS_IN_FLIGHT: usize = 4;
/// How long a complete review waits for its turn before it is answered
/// 503: well inside the API server's `timeoutSeconds` (5), so that it can
/// retry.
pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Connections served at once from one source address: one pod cannot
/// hold every slot (the API server's replicas are a few sources).
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 32;
/// A connection is closed gracefully at this age, busy or not.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(600);
/// The default idle timeout: no request started or in flight for this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The h2 receive window of one stream: the unread body a waiting stream
/// can hold (the body is read as fast as the client sends once its turn
/// has come).
pub const H2_STREAM_WINDOW: u32 = 64 << 10;
/// The h2 receive window of one connection (all its streams together).
pub const H2_CONNECTION_WINDOW: u32 = 128 << 10;
/// The API server sends a review in one go and gives up after 5 s: a body
/// slower than this (waiting for budget included) is answered 400.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(4);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What `warden webhook` is started with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The HTTPS listener.
    pub listen: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    /// Where the serving certificate comes from.
    pub serving: crate::serving::Source,
    /// What the sidecars get.
    pub settings: Settings,
    /// A connection with no request started or in flight for this long is
    /// closed ([`IDLE_TIMEOUT`] by default).
    pub idle_timeout: Duration,
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

async fn bind(name: &str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    warden_identity::listen::bind(name, addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// Serves until `shutdown` turns true, then drains.
pub async fn run(cfg: Config, mut shutdown: watch::Receiver<bool>) -> Result<(), StartError> {
    let cert = Arc::new(RotatingCert::default());
    let api = bind("webhook", cfg.listen).await?;
    let admin = bind("admin", cfg.admin).await?;
    let registry = Registry::new();
    warden_identity::admin::register_process(&registry)?;
    let reviews = IntCounterVec::new(
        Opts::new(
            "warden_webhook_reviews_total",
            "AdmissionReviews answered, by path and result (injected, unchanged, skipped, refused, malformed, busy).",
        ),
        &["path", "result"],
    )?;
    registry.register(Box::new(reviews.clone()))?;
    let in_flight = IntGauge::new(
        "warden_webhook_reviews_in_flight",
        "AdmissionReviews holding a turn (being decided).",
    )?;
    registry.register(Box::new(in_flight.clone()))?;
    // The expiry and NotBefore are exported for an alert; no certificate yet, or an
    // expired one (which no API server accepts), makes the webhook unready.
    let source = match cfg.serving {
        crate::serving::Source::Files { .. } => "files",
        crate::serving::Source::Ca { .. } => "ca",
    };
    let certificate_gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
        let g = IntGauge::with_opts(Opts::new(name, help).const_label("source", source))?;
        registry.register(Box::new(g.clone()))?;
        Ok(g)
    };
    let expiry = certificate_gauge(
        "warden_webhook_certificate_expiry_timestamp_seconds",
        "When the serving certificate in use expires (Unix seconds; 0: none yet), by where it comes from (ca: renewed at half-life; files: by whoever writes them).",
    )?;
    let not_before = certificate_gauge(
        "warden_webhook_certificate_not_before_timestamp_seconds",
        "When the serving certificate in use became valid (Unix seconds; 0: none yet): with the expiry, its lifetime.",
    )?;
    let serving = crate::serving::Serving::new(cert.clone(), expiry, not_before);
    let ready = {
        let serving = serving.clone();
        Arc::new(move || serving.ready())
    };
    tokio::spawn(warden_identity::admin::serve(
        admin,
        registry,
        ready,
        shutdown.clone(),
    ));
    match crate::serving::start(cfg.serving.clone(), serving.clone(), shutdown.clone()).await {
        // Stopped while still waiting for the CA: nothing to drain.
        Err(_) if *shutdown.borrow() => return Ok(()),
        r => r.map_err(StartError::Certificate)?,
    }
    // `ready` only with a valid certificate (DESIGN.md): files that hold an
    // expired or not yet valid one are waited on until they change.
    let mut said = false;
    while let Err(why) = serving.ready() {
        if !said {
            tracing::warn!(%why, "not ready");
            said = true;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
    let mut tls = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError::Certificate(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    println!("ready");

    let hook = Arc::new(Hook {
        settings: cfg.settings,
        reviews,
        in_flight,
        turns: Semaphore::new(MAX_REVIEWS_IN_FLIGHT),
        budget: ByteBudget::new(BODY_BUDGET),
    });
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let sources = PerSource::new(MAX_CONNECTIONS_PER_SOURCE);
    let mut builder = server_builder();
    builder.http1().max_buf_size(64 << 10);
    builder
        .http2()
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .adaptive_window(false);
    let builder = Arc::new(builder);
    let idle_timeout = cfg.idle_timeout;
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (stream, peer) = tokio::select! {
            r = api.accept() => match r {
                Ok((s, peer)) => (s, warden_identity::listen::canonical(peer)),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let Some(source) = sources.take(peer.ip()) else {
            tracing::debug!(%peer, "closing: {MAX_CONNECTIONS_PER_SOURCE} connections from this source already");
            drop(stream);
            continue;
        };
        let (acceptor, builder, hook) = (acceptor.clone(), builder.clone(), hook.clone());
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slots = (permit, source);
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let activity = Arc::new(Activity::new());
            let service = {
                let activity = activity.clone();
                service_fn(move |req| {
                    let (hook, busy) = (hook.clone(), activity.start());
                    async move {
                        let answer = hook.answer(req).await;
                        drop(busy);
                        Ok::<_, std::convert::Infallible>(answer)
                    }
                })
            };
            let conn = builder
                .serve_connection(TokioIo::new(tls), service)
                .into_owned();
            let mut conn = std::pin::pin!(conn);
            let why = tokio::select! {
                _ = conn.as_mut() => return,
                _ = activity.idle(idle_timeout) => "idle",
                _ = tokio::time::sleep(MAX_CONNECTION_AGE) => "max age",
                _ = shutdown.wait_for(|stop| *stop) => "shutdown",
            };
            tracing::debug!(%peer, why, "closing the connection");
            // GOAWAY on h2, `Connection: close` on HTTP/1.1: requests in
            // flight finish, then the connection closes.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, conn).await;
        });
    }
    drop(api);
    // Every connection closes gracefully on the signal, within its own
    // drain timeout: wait for their slots to come back.
    let _ = tokio::time::timeout(
        DRAIN_TIMEOUT + Duration::from_secs(1),
        permits.acquire_many(MAX_CONNECTIONS as u32),
    )
    .await;
    Ok(())
}

/// When a connection last started or finished a request, and how many it
/// has in flight: what its idle timeout reads (bytes do not count, so
/// keep-alive pings never keep a connection open).
struct Activity {
    opened: Instant,
    /// Milliseconds after `opened`.
    last: AtomicU64,
    in_flight: AtomicUsize,
}

/// A request in flight on its connection; done when dropped.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    fn new() -> Self {
        Activity {
            opened: Instant::now(),
            last: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    fn start(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        Busy(self.clone())
    }

    /// Returns once no request has started or been in flight for `timeout`.
    async fn idle(&self, timeout: Duration) {
        loop {
            let wait = if self.in_flight.load(Ordering::Relaxed) > 0 {
                timeout
            } else {
                let last = self.opened + Duration::from_millis(self.last.load(Ordering::Relaxed));
                match (last + timeout).checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left,
                    _ => return,
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// Takes one off the in-flight gauge when dropped.
struct Counted<'a>(&'a IntGauge);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What every request of the webhook shares.
struct Hook {
    settings: Settings,
    reviews: IntCounterVec,
    in_flight: IntGauge,
    /// Turns to decide a review (its body complete).
    turns: Semaphore,
    /// The bytes of bodies being read or waiting for a turn.
    budget: ByteBudget,
}

impl Hook {
    async fn answer(&self, req: Request<Incoming>) -> Response<Body> {
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
        // The body first, under the shared byte budget: a slow sender holds
        // what it has sent, never a turn.
        let body = match self
            .budget
            .read(req.into_body(), MAX_REVIEW_BYTES, BODY_TIMEOUT)
            .await
        {
            Ok(b) => b,
            Err(e) => {
                self.reviews.with_label_values(&[&path, "malformed"]).inc();
                let status = if matches!(e, BodyError::TooLarge(_)) {
                    413
                } else {
                    400
                };
                return problem(status, "bad_review", &e.to_string());
            }
        };
        let _turn = match tokio::time::timeout(QUEUE_TIMEOUT, self.turns.acquire()).await {
            Ok(Ok(turn)) => turn,
            Ok(Err(_)) => return problem(503, "shutting_down", "the webhook is stopping"),
            Err(_) => {
                self.reviews.with_label_values(&[&path, "busy"]).inc();
                let mut busy = problem(
                    503,
                    "busy",
                    &format!(
                        "{MAX_REVIEWS_IN_FLIGHT} reviews are being decided; none finished within {QUEUE_TIMEOUT:?}"
                    ),
                );
                busy.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return busy;
            }
        };
        self.in_flight.inc();
        // Down again even when the caller goes away mid-review.
        let _counted = Counted(&self.in_flight);
        self.decide(body.bytes(), &path, opt_in)
    }

    fn decide(&self, body: &[u8], path: &str, opt_in: OptIn) -> Response<Body> {
        match review(body, opt_in, &self.settings) {
            Ok((answer, verdict)) => {
                self.reviews
                    .with_label_values(&[path, verdict.label()])
                    .inc();
                respond(StatusCode::OK, "application/json", answer.to_string())
            }
            Err(why) => {
                self.reviews.with_label_values(&[path, "malformed"]).inc();
                tracing::warn!(path, error = %why, "malformed AdmissionReview");
                problem(400, "bad_review", &why)
            }
        }
    }
}
