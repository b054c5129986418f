//! rustls configs built from the current identity: one server config for
//! every inbound listener, one client config per outbound destination and
//! ALPN. Rebuilt whenever the identity changes; each new connection takes
//! the latest, open connections keep theirs.

use std::sync::Arc;

use rustls::{ClientConfig, ServerConfig};

use warden_config::IdentityPattern;
use warden_identity::tls::{self, SpiffeClientVerifier, SpiffeServerVerifier};

use crate::identity::Identity;

/// Why a TLS config could not be built from the current identity.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// rustls refused the settings.
    #[error("tls config: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built from the roots.
    #[error("tls config: client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// ALPN ids.
pub const H2: &[u8] = b"h2";
/// ALPN id of HTTP/1.1.
pub const HTTP1: &[u8] = b"http/1.1";

/// The inbound config: TLS 1.3, client certificate required and verified
/// against our bundle with exactly one SPIFFE ID in our trust domain.
pub fn server_config(id: &Identity, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let provider = tls::provider();
    let verifier = SpiffeClientVerifier::new(
        id.roots.clone(),
        id.trust_domain.clone(),
        provider.clone(),
        false,
    )?
    .denying(id.denied.clone());
    let resolver = Arc::new(tls::RotatingCert::default());
    resolver.set((*id.key).clone());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(resolver);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // No resumption: a resumed session skips the client-certificate checks,
    // so an expired or since-rotated-out peer certificate would keep working.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// An outbound config: our certificate as the client's, and the server must
/// prove an identity matching `expected` (secure naming).
pub fn client_config(
    id: &Identity,
    expected: &IdentityPattern,
    alpn: &[u8],
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let provider = tls::provider();
    let verifier = SpiffeServerVerifier::new(
        id.roots.clone(),
        id.trust_domain.clone(),
        expected.clone(),
        provider.clone(),
    )
    .denying(id.denied.clone());
    let resolver = Arc::new(tls::RotatingCert::default());
    resolver.set((*id.key).clone());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(resolver);
    config.alpn_protocols = vec![alpn.to_vec()];
    // A resumed session skips the server-certificate check (expiry included).
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}
