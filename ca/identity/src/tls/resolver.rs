//! A server certificate that can be replaced while the server runs: each new
//! handshake reads the latest; open connections keep the one they used.

use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Builds a rustls `CertifiedKey` from a PEM chain and a PEM private key.
pub fn certified_key(
    chain_pem: &str,
    key_pem: &str,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, rustls::Error> {
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| rustls::Error::General(format!("certificate chain: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| rustls::Error::General(format!("private key: {e}")))?;
    CertifiedKey::from_der(chain, key, provider)
}

/// The current certificate, or none yet (then handshakes fail closed).
#[derive(Debug, Default)]
pub struct RotatingCert {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl RotatingCert {
    /// Replaces the certificate for every later handshake.
    pub fn set(&self, key: CertifiedKey) {
        let mut slot = self.current.write().unwrap_or_else(|p| p.into_inner());
        *slot = Some(Arc::new(key));
    }

    /// The certificate new handshakes get.
    pub fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for RotatingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

impl rustls::client::ResolvesClientCert for RotatingCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        self.get().is_some()
    }
}
