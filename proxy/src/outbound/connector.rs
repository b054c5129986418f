//! The outbound connector: TCP to the destination, then mTLS with our SVID,
//! the destination's chain and SPIFFE ID checked by the client config's
//! verifier. It reports h2 when ALPN chose it, so hyper's pool multiplexes.
//! It also reads its own failures back out of whatever wraps them (hyper's
//! `client error (Connect)` says nothing), for logs and metric labels.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use prometheus::IntCounter;
use warden_identity::tls::DenyList;

use crate::revoke::Revocable;
use crate::stack::body::BoxError;

/// An mTLS connection to the destination, closed if the CA denies it.
pub type Upstream = Revocable<TlsStream<TcpStream>>;

/// A TLS stream that tells hyper what ALPN chose.
pub struct MtlsStream(TokioIo<Upstream>);

/// What a connection is dialled with: the client config of the current
/// identity, and the deny list it follows.
#[derive(Clone)]
pub struct Dial {
    /// TLS client config (certificate, roots, expected server ID).
    pub config: Arc<ClientConfig>,
    /// Identities the CA denied.
    pub denied: DenyList,
}

impl Connection for MtlsStream {
    fn connected(&self) -> Connected {
        let h2 = self.0.inner().get_ref().get_ref().1.alpn_protocol() == Some(crate::tls::H2);
        if h2 {
            Connected::new().negotiated_h2()
        } else {
            Connected::new()
        }
    }
}

impl hyper::rt::Read for MtlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for MtlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// Opens mTLS connections to one destination with the latest client config.
#[derive(Clone)]
pub struct MtlsConnector {
    destination: Arc<str>,
    config: watch::Receiver<Option<Dial>>,
    timeout: std::time::Duration,
    revoked: IntCounter,
}

impl MtlsConnector {
    /// A connector to `destination` (`host:port`) using whatever config
    /// `config` holds; connecting plus the handshake may take `timeout`.
    /// `revoked` counts connections closed because the CA denied the server.
    pub fn new(
        destination: &str,
        config: watch::Receiver<Option<Dial>>,
        timeout: std::time::Duration,
        revoked: IntCounter,
    ) -> Self {
        Self {
            destination: destination.into(),
            config,
            timeout,
            revoked,
        }
    }

    /// Connects and completes the handshake (used directly for TCP mode).
    pub async fn connect(&self) -> Result<Upstream, BoxError> {
        tokio::time::timeout(self.timeout, self.connect_inner())
            .await
            .map_err(|_| "connecting to the destination timed out")?
    }

    /// One line for the log saying why reaching the destination failed,
    /// found anywhere in `err`'s `source()` chain: for a valid SVID with the
    /// wrong SPIFFE ID, the ID the destination presented; for a certificate
    /// that is not an X.509-SVID leaf, which rule it broke; otherwise every
    /// message in the chain, joined with `: `.
    pub fn describe_error(err: &(dyn StdError + 'static)) -> String {
        let line = match tls_error(err) {
            Some(tls) => describe_tls(tls),
            None => crate::stack::error_chain(err),
        };
        line.replace(['\n', '\r'], " ")
    }

    /// The bounded `reason` label of a refused handshake in `err`'s chain,
    /// from the same set as `warden_proxy_handshake_failures_total` on the
    /// inbound (`wrong_identity`, `signing_key_usage`, ...); `None` when the
    /// failure was not TLS (refused connection, timeout).
    pub fn handshake_reason(err: &(dyn StdError + 'static)) -> Option<&'static str> {
        tls_error(err).map(warden_identity::tls::tls_failure_reason)
    }

    async fn connect_inner(&self) -> Result<Upstream, BoxError> {
        let Dial { config, denied } = self.config.borrow().clone().ok_or(NoCertificate)?;
        let tcp = TcpStream::connect(&*self.destination).await?;
        let _ = tcp.set_nodelay(true);
        let host = self
            .destination
            .rsplit_once(':')
            .map_or(&*self.destination, |(h, _)| h);
        let name = ServerName::try_from(
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
        )?;
        let tls = TlsConnector::from(config).connect(name, tcp).await?;
        // The verifier checked this leaf; its ID is what a denial names.
        let server = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or("the destination presented no certificate")
            .and_then(|leaf| {
                warden_identity::tls::peer_id(leaf).map_err(|_| "unreadable server certificate")
            })?;
        Ok(Revocable::new(tls, server, &denied, self.revoked.clone()))
    }
}

/// The proxy holds no valid certificate: nothing was tried.
#[derive(Debug, thiserror::Error)]
#[error("this proxy holds no valid certificate yet")]
pub struct NoCertificate;

impl tower_service::Service<Uri> for MtlsConnector {
    type Response = MtlsStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<MtlsStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(MtlsStream(TokioIo::new(this.connect().await?))) })
    }
}

/// `err` and its sources. `io::Error::source()` skips the error it wraps
/// (tokio-rustls puts rustls's error there), so step into it instead.
fn tls_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    crate::stack::causes(err).find_map(|e| e.downcast_ref::<rustls::Error>())
}

fn describe_tls(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::NotValidForNameContext {
            expected,
            presented,
        }) => match presented.as_slice() {
            [] => format!("destination {} presented no SPIFFE ID", expected.to_str()),
            names => format!(
                "destination {} presented {}, not the expected SPIFFE ID",
                expected.to_str(),
                names.join(", ")
            ),
        },
        rustls::Error::InvalidCertificate(C::Other(o)) => {
            match o.0.downcast_ref::<warden_identity::tls::PeerIdError>() {
                Some(p) => format!("destination certificate is not a usable X.509-SVID: {p}"),
                None => format!("destination certificate refused: {o}"),
            }
        }
        other => format!("TLS handshake with the destination failed: {other}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design

    use super::*;
    use rustls::CertificateError;
    use warden_identity::tls::{KeyUsageBits, PeerIdError};

    /// Wraps its cause the way hyper-util's client error does: a Display
    /// that says nothing, the cause only as `source()`.
    #[derive(Debug)]
    struct Connect(BoxError);

    impl std::fmt::Display for Connect {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("client error (Connect)")
        }
    }

    impl StdError for Connect {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&*self.0)
        }
    }

    fn from_handshake(e: CertificateError) -> Connect {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(e),
        );
        Connect(Box::new(io))
    }

    #[test]
    fn a_wrong_identity_is_described_by_the_id_the_destination_presented() {
        let err = from_handshake(CertificateError::NotValidForNameContext {
            expected: ServerName::try_from("127.0.0.1").unwrap(),
            presented: vec!["spiffe://example.org/web".into()],
        });
        assert_eq!(err.to_string(), "client error (Connect)");
        assert_eq!(
            MtlsConnector::describe_error(&err),
            "destination 127.0.0.1 presented spiffe://example.org/web, not the expected SPIFFE ID"
        );
        assert_eq!(
            MtlsConnector::handshake_reason(&err),
            Some("wrong_identity")
        );
    }

    #[test]
    fn a_leaf_that_breaks_the_profile_is_described_by_the_rule() {
        let bits = KeyUsageBits(KeyUsageBits::DIGITAL_SIGNATURE | KeyUsageBits::KEY_CERT_SIGN);
        let err = from_handshake(CertificateError::Other(rustls::OtherError(Arc::new(
            PeerIdError::SigningKeyUsage(bits),
        ))));
        assert_eq!(
            MtlsConnector::describe_error(&err),
            "destination certificate is not a usable X.509-SVID: leaf keyUsage (digitalSignature, keyCertSign) has keyCertSign or cRLSign; a leaf SVID must not sign"
        );
        assert_eq!(
            MtlsConnector::handshake_reason(&err),
            Some("signing_key_usage")
        );
    }

    #[test]
    fn other_failures_are_described_by_their_whole_chain() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let err = Connect(Box::new(refused));
        assert_eq!(
            MtlsConnector::describe_error(&err),
            "client error (Connect): connection refused"
        );
        assert_eq!(MtlsConnector::handshake_reason(&err), None);
    }
}
