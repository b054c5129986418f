//! Live reload: on SIGHUP, or when the config file changes, the file is read
//! and validated again. A valid file's policies replace the running ones
//! (per inbound listener, by name; the next request or connection uses them).
//! An invalid file changes nothing: the running config stays, the error is
//! logged with its location and counted. Changes that need new sockets or a
//! new identity source (listeners, addresses, identity) are reported as
//! needing a restart. Certificate files are watched on their own (`identity.rs`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use warden_config::ProxyConfig;
use warden_config::proxy::{ConfigSource, Policy};

use crate::inbound::{CompiledPolicy, PolicyRx};
use crate::metrics::ProxyMetrics;
use warden_guard::limits::Store;

/// Owns the policy channels and applies reloads to them.
pub struct Reloader {
    source: ConfigSource,
    running: ProxyConfig,
    policies: HashMap<String, watch::Sender<Arc<CompiledPolicy>>>,
    metrics: ProxyMetrics,
    store: Arc<Store>,
}

impl Reloader {
    /// A reloader for `running`, read from `source`; rate limits keep their
    /// state in `store`.
    pub fn new(
        source: ConfigSource,
        running: ProxyConfig,
        metrics: ProxyMetrics,
        store: Arc<Store>,
    ) -> Self {
        Self {
            source,
            running,
            policies: HashMap::new(),
            metrics,
            store,
        }
    }

    /// The policy channel of inbound listener `name`.
    pub fn policy(&mut self, name: &str, initial: &Policy) -> PolicyRx {
        let compiled = CompiledPolicy::new(
            initial.clone(),
            &self.metrics.authz,
            name,
            self.store.clone(),
        );
        let (tx, rx) = watch::channel(Arc::new(compiled));
        self.policies.insert(name.to_owned(), tx);
        rx
    }

    /// Reads the file again and applies what it can.
    pub fn reload(&mut self) {
        let new = match self.source.load() {
            Ok(c) => c,
            Err(d) => {
                self.metrics
                    .config_reloads
                    .with_label_values(&["failed"])
                    .inc();
                tracing::error!("config reload failed; keeping the running config:\n{d}");
                return;
            }
        };
        for l in &new.inbound {
            if let Some(tx) = self.policies.get(&l.name) {
                tx.send_if_modified(|p| {
                    let changed = p.policy != l.policy;
                    if changed {
                        let compiled = CompiledPolicy::new(
                            l.policy.clone(),
                            &self.metrics.authz,
                            &l.name,
                            self.store.clone(),
                        );
                        *p = Arc::new(compiled);
                        tracing::info!(listener = %l.name, rules = l.policy.rules.len(), "policy reloaded");
                    }
                    changed
                });
            }
            if let Some(running) = self.running.inbound.iter_mut().find(|r| r.name == l.name) {
                running.policy = l.policy.clone();
            }
        }
        // Everything else is what the process was started with; say so when the file differs.
        if without_policies(&new) == without_policies(&self.running) {
            self.metrics.config_reloads.with_label_values(&["ok"]).inc();
        } else {
            self.metrics
                .config_reloads
                .with_label_values(&["restart_required"])
                .inc();
            tracing::warn!(
                "policies reloaded; other changes in the config (listeners, destinations, server ids, limits, model routes, redis, identity) take effect at the next restart"
            );
        }
    }

    /// Reloads on SIGHUP and whenever the file's modification time changes.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut seen = modified(&self.source);
        loop {
            let hangup = async {
                match hup.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = hangup => {
                    tracing::info!("SIGHUP: reloading the config");
                    self.reload();
                }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    let now = modified(&self.source);
                    if now != seen {
                        // Let a writer that is not atomic finish before reading.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let settled = modified(&self.source);
                        if settled != now {
                            continue;
                        }
                        seen = settled;
                        tracing::info!("config file changed: reloading");
                        self.reload();
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// The config with its policies blanked: the part a reload cannot apply.
fn without_policies(c: &ProxyConfig) -> ProxyConfig {
    let mut c = c.clone();
    for l in &mut c.inbound {
        l.policy = Policy::default();
    }
    c
}

/// The config file's modification time (`None` for a config from the
/// environment: it never changes under a running process).
fn modified(source: &ConfigSource) -> Option<SystemTime> {
    std::fs::metadata(source.file()?)
        .and_then(|m| m.modified())
        .ok()
}
