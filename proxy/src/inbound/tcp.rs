//! Inbound TCP: after the handshake, the caller's identity alone decides
//! (rules with methods or paths do not apply); a denied caller's connection
//! is closed, an allowed one is spliced to the app both ways.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use warden_config::proxy::Inbound;
use warden_identity::tls::VerifiedPeer;

use crate::authz::Request;
use crate::inbound::authorize::PolicyRx;
use crate::metrics::ProxyMetrics;

static TCP_LOG: warden_identity::ratelog::LogLimiter =
    warden_identity::ratelog::LogLimiter::new(20);

/// Serves one authenticated TCP connection.
pub async fn serve<S>(
    cfg: &Inbound,
    policy: &PolicyRx,
    mut tls: S,
    peer: VerifiedPeer,
    local_port: u16,
    metrics: &ProxyMetrics,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let policy = policy.borrow().clone();
    let (d, _) = policy.decide(
        &peer,
        local_port,
        Request {
            method: None,
            path: None,
        },
    );
    if !d.allowed {
        if TCP_LOG.allow() {
            tracing::info!(listener = %cfg.name, peer = %peer.id(), rule = d.rule, "connection denied");
        }
        return;
    }
    if d.result == "audit_deny" && TCP_LOG.allow() {
        tracing::warn!(listener = %cfg.name, peer = %peer.id(), rule = d.rule, "audit: would deny this connection");
    }
    let mut app = match TcpStream::connect(cfg.app).await {
        Ok(a) => a,
        Err(e) => {
            metrics
                .rejected
                .with_label_values(&["inbound", &cfg.name, "app_unavailable"])
                .inc();
            tracing::warn!(listener = %cfg.name, error = %e, "app unreachable");
            return;
        }
    };
    let _ = app.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut tls, &mut app).await;
}
