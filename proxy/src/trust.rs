//! The trust feed as a proxy follows it: a long poll on the CA's `GET
//! /v1/watch` over mTLS with the proxy's own certificate. Each answer is
//! applied at once: the deny list to every verifier and open connection
//! (through [`DenyList`]), new roots by republishing the identity (so new
//! handshakes verify against them). When the CA is unreachable the proxy
//! keeps working on what it last applied, retries with backoff, and says how
//! old that is (`warden_proxy_trust_sync_age_seconds`). With a `state_dir`
//! the last answer is kept there (`trust.json`), so a proxy restarted while
//! the CA is down still refuses the identities denied before.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::watch;

use warden_config::SpiffeId;
use warden_identity::api::TrustAnswer;
use warden_identity::client::TrustUpdate;
use warden_identity::files_out;
use warden_identity::tls::DeniedSet;

use crate::identity::Identity;
use crate::metrics::ProxyMetrics;

/// The cached answer's file name in `state_dir`.
pub const CACHE_FILE: &str = "trust.json";
/// Longest wait between two attempts while the CA is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

static FEED_LOG: warden_identity::ratelog::LogLimiter =
    warden_identity::ratelog::LogLimiter::new(6);

/// What a previous run applied, from `state_dir`: its sequence and deny
/// list. Its bundle is not used: the state directory cannot bring its own
/// trust anchors (the stored certificate verifies against the configured
/// bundle for the same reason).
pub fn cached(state_dir: Option<&Path>) -> (Option<u64>, DeniedSet) {
    let Some(dir) = state_dir else {
        return (None, DeniedSet::default());
    };
    let Ok(text) = std::fs::read_to_string(dir.join(CACHE_FILE)) else {
        return (None, DeniedSet::default());
    };
    match serde_json::from_str::<TrustAnswer>(&text) {
        Ok(a) => {
            let denied: DeniedSet = Arc::new(
                a.denied
                    .iter()
                    .filter_map(|d| SpiffeId::parse(d).ok())
                    .collect(),
            );
            tracing::info!(
                sequence = a.sequence,
                denied = denied.len(),
                "applied the cached trust feed"
            );
            (Some(a.sequence), denied)
        }
        Err(e) => {
            tracing::warn!(file = %dir.join(CACHE_FILE).display(), error = %e, "ignoring the cached trust feed");
            (None, DeniedSet::default())
        }
    }
}

/// Follows the CA's feed for as long as the proxy runs, calling as the
/// identity currently published on `identity`.
pub async fn follow(
    identity: watch::Sender<Option<Arc<Identity>>>,
    denied: watch::Sender<DeniedSet>,
    metrics: ProxyMetrics,
    cached: Option<u64>,
    state_dir: Option<PathBuf>,
) {
    // The first call asks for the whole current state (the cached bundle
    // is not used, so roots rotated meanwhile must come from the CA); the
    // cached deny list stays applied until it answers.
    let mut sequence: Option<u64> = None;
    let m = &metrics.trust;
    m.sequence.set(cached.unwrap_or(0) as i64);
    m.denied.set(denied.borrow().len() as i64);
    let last_sync = Arc::new(AtomicI64::new(0));
    tokio::spawn(age(last_sync.clone(), metrics.clone()));
    let mut current = identity.subscribe();
    let mut attempt = 0u32;
    let mut watcher = warden_identity::client::TrustWatcher::default();
    loop {
        let link = match current
            .wait_for(|id| id.as_ref().is_some_and(|i| i.ca.is_some()))
            .await
        {
            Ok(id) => id.as_ref().and_then(|i| i.ca.clone()),
            Err(_) => return,
        };
        let Some(link) = link else { continue };
        match watcher.watch(&link.client, &link.creds, sequence).await {
            Ok(update) => {
                attempt = 0;
                let now = OffsetDateTime::now_utc().unix_timestamp();
                last_sync.store(now, Ordering::Relaxed);
                m.last_sync.set(now as f64);
                m.sync_age.set(0.0);
                // Never back to an older answer (a replica a poll behind):
                // that would lift a deny.
                let newer = |u: &TrustUpdate| match sequence {
                    Some(s) => u.sequence > s,
                    None => u.sequence >= cached.unwrap_or(0),
                };
                if let Some(u) = &update
                    && !newer(u)
                {
                    // A replica behind what this proxy already enforces.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                if let Some(u) = update {
                    sequence = Some(u.sequence);
                    apply(&identity, &denied, &metrics, &u);
                    if let Some(dir) = &state_dir {
                        keep(dir, &u);
                    }
                }
            }
            Err(e) => {
                m.failures.inc();
                let wait = Duration::from_secs(1u64 << attempt.min(5)).min(MAX_BACKOFF);
                attempt += 1;
                if FEED_LOG.allow() {
                    tracing::warn!(error = %e, retry_in = ?wait, "cannot follow the CA's trust feed; keeping the last one applied");
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Applies one answer: the deny list, then the roots if they changed.
fn apply(
    identity: &watch::Sender<Option<Arc<Identity>>>,
    denied: &watch::Sender<DeniedSet>,
    metrics: &ProxyMetrics,
    u: &TrustUpdate,
) {
    let m = &metrics.trust;
    m.sequence.set(u.sequence as i64);
    m.denied.set(u.denied.len() as i64);
    denied.send_if_modified(|set| {
        if **set == u.denied {
            return false;
        }
        let added: Vec<_> = u.denied.difference(set).map(|i| i.to_string()).collect();
        let removed = set.difference(&u.denied).count();
        tracing::warn!(
            sequence = u.sequence,
            denied = u.denied.len(),
            ?added,
            removed,
            "deny list changed"
        );
        *set = Arc::new(u.denied.clone());
        true
    });
    identity.send_if_modified(|current| {
        let Some(id) = current.as_ref() else {
            return false;
        };
        if id.ca.as_ref().is_none_or(|l| l.creds.bundle_pem == u.bundle_pem) {
            return false;
        }
        match id.with_bundle(&u.bundle_pem, &u.roots) {
            Ok(next) => {
                // The CA's own serving chain may move to the new roots too.
                if let Some(l) = &id.ca
                    && let Err(e) = l.client.set_bundle(&u.bundle_pem)
                {
                    tracing::error!(error = %e, "cannot trust the pushed bundle for calls to the CA");
                }
                tracing::info!(sequence = u.sequence, roots = u.roots.len(), "trust bundle changed");
                if let Some(t) = next.chain_not_after.1 {
                    metrics
                        .chain_expiry
                        .with_label_values(&["root"])
                        .set(t.unix_timestamp() as f64);
                }
                *current = Some(Arc::new(next));
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "the CA pushed a bundle that is not usable; keeping the current one");
                false
            }
        }
    });
}

fn keep(dir: &Path, u: &TrustUpdate) {
    let mut denied: Vec<String> = u.denied.iter().map(|d| d.to_string()).collect();
    denied.sort();
    let answer = TrustAnswer {
        sequence: u.sequence,
        trust_bundle: u.bundle_pem.clone(),
        denied,
    };
    let written = serde_json::to_string(&answer)
        .map_err(|e| e.to_string())
        .and_then(|text| {
            files_out::write_private(dir, CACHE_FILE, &text).map_err(|e| e.to_string())
        });
    if let Err(e) = written {
        tracing::warn!(error = %e, "cannot cache the trust feed in state_dir");
    }
}

/// Keeps `warden_proxy_trust_sync_age_seconds` current.
async fn age(last_sync: Arc<AtomicI64>, metrics: ProxyMetrics) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let last = last_sync.load(Ordering::Relaxed);
        if last > 0 {
            let now = OffsetDateTime::now_utc().unix_timestamp();
            metrics.trust.sync_age.set((now - last).max(0) as f64);
        }
    }
}
