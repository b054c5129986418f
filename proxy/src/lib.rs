//! warden's data plane: inbound mTLS listeners that authorize each
//! connection and request by the caller's verified SPIFFE ID and forward to
//! the local app; outbound listeners that originate mTLS and check the
//! destination's identity; the workload identity kept fresh; admin and metrics.

#![forbid(unsafe_code)]

pub mod authz;
pub mod headers;
pub mod identity;
pub mod idle;
pub mod inbound;
pub mod listener;
pub mod metrics;
/// The path normal form lives with the config, whose rules are written in it.
pub use warden_config::normalize;
pub mod outbound;
pub mod ratelimit;
pub mod reload;
pub mod respond;
pub mod revoke;
pub mod stack;
pub mod tls;
pub mod trust;

use std::sync::Arc;

use time::OffsetDateTime;
use tokio::sync::watch;

use warden_config::ProxyConfig;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({name}): {source}")]
    Bind {
        /// Listener name.
        name: String,
        /// Address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The identity could not be set up.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    /// The shared limit store's URL is unusable.
    #[error(transparent)]
    Store(warden_guard::limits::StoreError),
    /// Metrics registration failed.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Runs the proxy from the config read from `path` until `shutdown` turns
/// true; then drains and returns. SIGHUP or a change to `path` reloads it.
pub async fn run(
    config: ProxyConfig,
    source: warden_config::proxy::ConfigSource,
    shutdown: watch::Receiver<bool>,
) -> Result<(), StartError> {
    let metrics = metrics::ProxyMetrics::new()?;
    let bind = |name: String, addr| async move {
        listener::bind(&name, addr)
            .await
            .map_err(|source| StartError::Bind { name, addr, source })
    };
    let admin = bind("admin".into(), config.admin).await?;
    let mut inbound = Vec::new();
    for l in &config.inbound {
        inbound.push((l.clone(), bind(l.name.clone(), l.listen).await?));
    }
    let mut outbound = Vec::new();
    for l in &config.outbound {
        outbound.push((l.clone(), bind(l.name.clone(), l.listen).await?));
    }
    let (identity, waiting) = identity::start(&config.identity, metrics.clone()).await?;

    let ready_id = identity.clone();
    let ready: warden_identity::admin::ReadyCheck = Arc::new(move || {
        let valid = ready_id
            .borrow()
            .as_ref()
            .is_some_and(|id| id.is_valid(OffsetDateTime::now_utc()));
        if valid {
            Ok(())
        } else {
            Err(format!(
                "no identity yet: {}",
                waiting
                    .get()
                    .unwrap_or_else(|| "the certificate has expired".to_owned())
            ))
        }
    });
    tokio::spawn(warden_identity::admin::serve(
        admin,
        metrics.registry.clone(),
        ready,
        shutdown.clone(),
    ));

    let store = Arc::new(match &config.redis {
        // Connects lazily and reconnects by itself: a proxy starts while Redis
        // is down, and each route's `on_redis_error` decides meanwhile.
        Some(url) => warden_guard::limits::Store::Redis(
            warden_guard::limits::redis::RedisStore::new(url).map_err(StartError::Store)?,
        ),
        None => {
            warden_guard::limits::Store::Local(warden_guard::limits::local::LocalStore::default())
        }
    });
    let mut reloader =
        reload::Reloader::new(source, config.clone(), metrics.clone(), store.clone());
    let mut tasks = tokio::task::JoinSet::new();
    for (cfg, l) in inbound {
        let policy = reloader.policy(&cfg.name, &cfg.policy);
        tasks.spawn(inbound::serve(
            cfg,
            policy,
            l,
            identity.clone(),
            metrics.clone(),
            store.clone(),
            shutdown.clone(),
            config.drain_timeout,
        ));
    }
    for (cfg, l) in outbound {
        tasks.spawn(outbound::serve(
            cfg,
            l,
            identity.clone(),
            metrics.clone(),
            shutdown.clone(),
            config.drain_timeout,
        ));
    }
    tokio::spawn(reloader.run(shutdown.clone()));
    // `ready` once a valid certificate is held (every listener is bound by now).
    let mut waiting = identity.clone();
    let announced = tokio::spawn(async move {
        if waiting.wait_for(|id| id.is_some()).await.is_ok() {
            println!("ready");
        }
    });
    while tasks.join_next().await.is_some() {}
    announced.abort();
    Ok(())
}
