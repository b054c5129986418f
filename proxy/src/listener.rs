//! What every listener shares: binding with the `listening` line, a
//! connection limit, per-connection metrics, and graceful drain.

use std::net::SocketAddr;
use std::sync::Arc;

use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::metrics::ConnMetrics;
use crate::respond::RefusalCounters;

pub use warden_identity::listen::bind;

/// The next connection, or `None` once `shutdown` turns true. A failed
/// accept (out of file descriptors, say) is logged and retried after a pause
/// instead of spinning.
pub async fn next(
    listener: &TcpListener,
    shutdown: &mut watch::Receiver<bool>,
    name: &str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, peer)) => return Some((s, warden_identity::listen::canonical(peer))),
                Err(e) => {
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            _ = shutdown.changed() => return None,
        }
    }
}

/// Counts a connection open until dropped, and holds its slot under the limit.
#[derive(Debug)]
pub struct ConnGuard {
    metrics: ConnMetrics,
    _permit: OwnedSemaphorePermit,
}

impl ConnGuard {
    /// Takes a slot, or returns `None` when the listener is full (the
    /// connection is then closed at once and counted as `max_connections`).
    pub fn admit(
        limit: &Arc<Semaphore>,
        metrics: &ConnMetrics,
        refusals: &RefusalCounters,
    ) -> Option<Self> {
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            refusals.count_max_connections();
            return None;
        };
        metrics.opened.inc();
        metrics.open.inc();
        Some(Self {
            metrics: metrics.clone(),
            _permit: permit,
        })
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.metrics.closed.inc();
        self.metrics.open.dec();
    }
}
