//! Certificate verifiers that check the X.509-SVID leaf profile, the chain
//! with webpki, and then the SPIFFE ID (rustls-webpki has no URI-name
//! matching, so the stock server verifier would refuse every URI-only
//! certificate). Both sides run the same steps in the same order, so a leaf
//! is refused for the same reason whichever side presents it.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use warden_config::{IdentityPattern, SpiffeId, TrustDomain};

use super::deny::DenyList;
use super::peer::{PeerIdError, VerifiedPeer};
use super::profile::peer_id;

fn identity_error(e: PeerIdError) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The leaf's SPIFFE ID if it has the X.509-SVID profile; run before the
/// chain check (see `profile.rs` for why).
fn profiled_id(leaf: &CertificateDer<'_>) -> Result<SpiffeId, Error> {
    peer_id(leaf).map_err(identity_error)
}

/// Client side: checks the server's leaf profile, its chain against one
/// trust domain's bundle (serverAuth EKU, validity), and requires its SPIFFE
/// ID to match `expected` (secure naming). A valid SVID with another ID is
/// refused with rustls's `NotValidForNameContext`, whose `presented` holds
/// that ID (what the server proved) and `expected` the name dialled.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    trust_domain: TrustDomain,
    expected: IdentityPattern,
    provider: Arc<CryptoProvider>,
    denied: DenyList,
}

impl SpiffeServerVerifier {
    /// A verifier for servers in `trust_domain` (whose roots are `roots`)
    /// that must prove an identity matching `expected`.
    pub fn new(
        roots: Arc<RootCertStore>,
        trust_domain: TrustDomain,
        expected: IdentityPattern,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            roots,
            trust_domain,
            expected,
            provider,
            denied: DenyList::none(),
        }
    }

    /// Also refuses servers whose ID is on `denied` (the CA's pushed list).
    pub fn denying(self, denied: DenyList) -> Self {
        Self { denied, ..self }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let id = profiled_id(end_entity)?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let peer =
            VerifiedPeer::from_verified_id(id, &self.trust_domain).map_err(identity_error)?;
        if self.denied.contains(peer.id()) {
            return Err(Error::InvalidCertificate(CertificateError::Revoked));
        }
        if !self.expected.matches(peer.id()) {
            tracing::debug!(got = %peer.id(), expected = %self.expected, "server identity mismatch");
            return Err(Error::InvalidCertificate(
                CertificateError::NotValidForNameContext {
                    expected: server_name.to_owned(),
                    presented: vec![peer.into_id().to_string()],
                },
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Server side: the leaf profile, then webpki's client verifier (chain,
/// clientAuth EKU, validity), then the trust domain, so a certificate that is
/// not an X.509-SVID leaf or is from the wrong trust domain fails the
/// handshake itself.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: TrustDomain,
    denied: DenyList,
}

impl SpiffeClientVerifier {
    /// `optional`: also accept clients that present no certificate (the CA
    /// API, where a join token proves the identity instead).
    pub fn new(
        roots: Arc<RootCertStore>,
        trust_domain: TrustDomain,
        provider: Arc<CryptoProvider>,
        optional: bool,
    ) -> Result<Self, rustls::server::VerifierBuilderError> {
        let builder = WebPkiClientVerifier::builder_with_provider(roots, provider);
        let builder = if optional {
            builder.allow_unauthenticated()
        } else {
            builder
        };
        Ok(Self {
            inner: builder.build()?,
            trust_domain,
            denied: DenyList::none(),
        })
    }

    /// Also refuses clients whose ID is on `denied` (the CA's pushed list).
    pub fn denying(self, denied: DenyList) -> Self {
        Self { denied, ..self }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints would list our CA names to anyone who connects; peers know their CA.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let id = profiled_id(end_entity)?;
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let peer =
            VerifiedPeer::from_verified_id(id, &self.trust_domain).map_err(identity_error)?;
        if self.denied.contains(peer.id()) {
            return Err(Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The verified identity of a TLS connection's client, if it presented a
/// certificate. Only meaningful on a connection whose config used
/// [`SpiffeClientVerifier`], which already checked everything this reads.
pub fn verified_client(
    conn: &rustls::ServerConnection,
    trust_domain: &TrustDomain,
) -> Option<Result<VerifiedPeer, PeerIdError>> {
    let leaf = conn.peer_certificates()?.first()?;
    Some(peer_id(leaf).and_then(|id| VerifiedPeer::from_verified_id(id, trust_domain)))
}

/// Verifies a client's chain as the handshake does, outside of one: the
/// leaf profile, the chain against `roots` (clientAuth EKU, validity at
/// `now`), then the SPIFFE ID's trust domain. For tools and benchmarks; the
/// proxy gets its `VerifiedPeer` from the handshake.
pub fn verify_client_chain(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &RootCertStore,
    trust_domain: &TrustDomain,
    now: UnixTime,
) -> Result<VerifiedPeer, Error> {
    let id = profiled_id(leaf)?;
    let ee = webpki::EndEntityCert::try_from(leaf)
        .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let algs = super::provider().signature_verification_algorithms.all;
    ee.verify_for_usage(
        algs,
        &roots.roots,
        intermediates,
        now,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e)))))?;
    VerifiedPeer::from_verified_id(id, trust_domain).map_err(identity_error)
}
