//! TLS with SPIFFE identities, shared by the CA server, its client and the
//! proxy: rustls configs, verifiers that check the chain *and* the SPIFFE ID,
//! a hot-swappable certificate, and fixed reasons for refused handshakes.

mod deny;
mod failure;
mod peer;
mod profile;
mod resolver;
#[cfg(test)]
mod tests;
mod verify;

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::CertificateDer;

pub use deny::{DeniedSet, DenyList};
pub use failure::{handshake_failure_reason, tls_failure_reason};
pub use peer::{KeyUsageBits, PeerIdError, VerifiedPeer};
pub use profile::{bundle_trust_domain, peer_id};
pub use resolver::{RotatingCert, certified_key};
pub use verify::{
    SpiffeClientVerifier, SpiffeServerVerifier, verified_client, verify_client_chain,
};

/// The one crypto provider warden uses (aws-lc-rs, with its default
/// post-quantum hybrid key exchange first).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The server side of a handshake, bounded by `timeout` (a timeout is an
/// `io::ErrorKind::TimedOut` error, labelled `timeout` by
/// [`handshake_failure_reason`]).
pub async fn accept<IO>(
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: IO,
    timeout: std::time::Duration,
) -> std::io::Result<tokio_rustls::server::TlsStream<IO>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "handshake timed out",
        )),
    }
}

/// A trust domain's roots, as a rustls root store.
pub fn root_store(bundle: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, rustls::Error> {
    let mut roots = RootCertStore::empty();
    for cert in bundle {
        roots.add(cert.clone())?;
    }
    Ok(Arc::new(roots))
}
