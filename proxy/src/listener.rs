//! What every listener shares: binding with the `listening` line, a
//! connection limit, per-connection metrics, and graceful drain.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::ProxyMetrics;

/// Binds `addr` and prints `listening <name> <addr>` (DESIGN.md fixed point).
pub async fn bind(name: &str, addr: SocketAddr) -> std::io::Result<TcpListener> {
    let l = TcpListener::bind(addr).await?;
    println!("listening {name} {}", l.local_addr()?);
    Ok(l)
}

/// Counts a connection open until dropped, and holds its slot under the limit.
#[derive(Debug)]
pub struct ConnGuard {
    metrics: ProxyMetrics,
    name: Arc<str>,
    _permit: OwnedSemaphorePermit,
}

impl ConnGuard {
    /// Takes a slot, or returns `None` when the listener is full (the
    /// connection is then closed at once and counted).
    pub fn admit(limit: &Arc<Semaphore>, metrics: &ProxyMetrics, name: &Arc<str>) -> Option<Self> {
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            metrics
                .rejected
                .with_label_values(&[name, "max_connections"])
                .inc();
            return None;
        };
        metrics.conns_opened.with_label_values(&[name]).inc();
        metrics.conns_open.with_label_values(&[name]).inc();
        Some(Self {
            metrics: metrics.clone(),
            name: name.clone(),
            _permit: permit,
        })
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.metrics
            .conns_closed
            .with_label_values(&[&self.name])
            .inc();
        self.metrics
            .conns_open
            .with_label_values(&[&self.name])
            .dec();
    }
}
