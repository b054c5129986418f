//! The trust feed: what every proxy must know now (the trust bundle and the
//! deny list) with the store's sequence number, served by `GET /v1/watch`.
//!
//! The store is the source of truth (a `warden ca deny` in another process,
//! or another replica, writes it), so the server polls the sequence every
//! [`POLL_INTERVAL`] and rebuilds the snapshot only when it moved. Every
//! waiting watcher shares the one serialized answer.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use crate::api::TrustAnswer;
use crate::authority::CaError;
use crate::service::CaService;
use crate::store;

/// How often the server looks for a change in the store: a deny reaches the
/// watchers within this (plus one round trip).
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// One state of the feed.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The store's trust sequence.
    pub sequence: u64,
    /// The [`TrustAnswer`] as JSON, shared by every watcher.
    pub json: Bytes,
    /// The denied IDs (a denied caller may not watch).
    pub denied: HashSet<String>,
}

/// The latest snapshot, and a way for watchers to wait for the next.
#[derive(Debug)]
pub struct TrustFeed(watch::Sender<Arc<Snapshot>>, watch::Sender<bool>);

impl TrustFeed {
    /// An empty feed; [`CaService::refresh_trust`] fills it.
    pub fn new() -> Self {
        Self(watch::channel(Arc::default()).0, watch::channel(false).0)
    }

    /// The server is shutting down: waiting watchers answer now (so the
    /// drain does not wait on them) and reconnect to another replica.
    pub fn close(&self) {
        self.1.send_replace(true);
    }

    /// Resolves once [`TrustFeed::close`] was called.
    pub async fn closed(&self) {
        let mut rx = self.1.subscribe();
        let _ = rx.wait_for(|closed| *closed).await;
    }

    /// Waits on changes from here.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.0.subscribe()
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<Snapshot> {
        self.0.borrow().clone()
    }
}

impl Default for TrustFeed {
    fn default() -> Self {
        Self::new()
    }
}

impl CaService {
    /// Rebuilds the feed's snapshot if the store's sequence moved; returns
    /// whether it did.
    pub fn refresh_trust(&self) -> Result<bool, CaError> {
        let (sequence, denied) = {
            let mut conn = self.store.lock();
            let sequence = store::trust_sequence(&mut *conn)?;
            if sequence == self.trust.current().sequence {
                return Ok(false);
            }
            (sequence, store::denied_ids(&mut *conn)?)
        };
        // A rotation step moved it, perhaps: sign with, and hand out, what
        // the store now records. If that fails, the deny list still goes
        // out (with the bundle as it stands): revocation must not wait on it.
        if let Err(e) = self.reload_chain() {
            self.metrics.rotation_failures.inc();
            tracing::error!(error = %e, "cannot load the chain the store records; signing with the current one");
        }
        let answer = TrustAnswer {
            sequence,
            trust_bundle: self.authority.bundle_pem(),
            denied,
        };
        let json =
            serde_json::to_vec(&answer).map_err(|e| CaError::Setup(format!("trust feed: {e}")))?;
        self.metrics.trust_sequence.set(sequence as i64);
        self.trust.0.send_replace(Arc::new(Snapshot {
            sequence,
            json: json.into(),
            denied: answer.denied.into_iter().collect(),
        }));
        Ok(true)
    }
}

/// How often each `ca serve` records that it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

/// This replica's name: the host (a pod's name) and the process id.
fn replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    format!("{host}/{}", std::process::id())
}

/// Keeps the feed current until the process ends.
pub async fn keep_polling(svc: Arc<CaService>) {
    let mut failing = false;
    let name = replica_name();
    let started = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut beat = tokio::time::Instant::now();
    loop {
        if beat <= tokio::time::Instant::now() {
            beat = tokio::time::Instant::now() + HEARTBEAT;
            let (s, n) = (svc.clone(), name.clone());
            let r = tokio::task::spawn_blocking(move || {
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                let mut conn = s.store.lock_exclusive();
                let mut tx = store::begin_write(&mut conn)?;
                store::heartbeat(&mut tx, &n, started, now)?;
                tx.commit()
            })
            .await;
            if let Ok(Err(e)) = r {
                tracing::warn!(error = %e, "cannot record this replica's heartbeat");
            }
        }
        let s = svc.clone();
        match tokio::task::spawn_blocking(move || s.refresh_trust()).await {
            Ok(Ok(changed)) => {
                if changed {
                    tracing::info!(
                        sequence = svc.trust.current().sequence,
                        "trust feed moved on"
                    );
                }
                failing = false;
            }
            Ok(Err(e)) if !failing => {
                tracing::error!(error = %e, "cannot read the trust feed from the store; watchers keep the last one");
                failing = true;
            }
            Ok(Err(_)) => {}
            Err(e) => tracing::error!(error = %e, "trust feed task failed"),
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
