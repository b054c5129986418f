//! The outbound connector: TCP to the destination, then mTLS with our SVID,
//! the destination's chain and SPIFFE ID checked by the client config's
//! verifier. It reports h2 when ALPN chose it, so hyper's pool multiplexes.

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

use crate::respond::BoxError;

/// A TLS stream that tells hyper what ALPN chose.
pub struct MtlsStream(TokioIo<TlsStream<TcpStream>>);

impl Connection for MtlsStream {
    fn connected(&self) -> Connected {
        let h2 = self.0.inner().get_ref().1.alpn_protocol() == Some(crate::tls::H2);
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
    config: watch::Receiver<Option<Arc<ClientConfig>>>,
    timeout: std::time::Duration,
}

impl MtlsConnector {
    /// A connector to `destination` (`host:port`) using whatever config
    /// `config` holds; connecting plus the handshake may take `timeout`.
    pub fn new(
        destination: &str,
        config: watch::Receiver<Option<Arc<ClientConfig>>>,
        timeout: std::time::Duration,
    ) -> Self {
        Self {
            destination: destination.into(),
            config,
            timeout,
        }
    }

    /// Connects and completes the handshake (used directly for TCP mode).
    pub async fn connect(&self) -> Result<TlsStream<TcpStream>, BoxError> {
        tokio::time::timeout(self.timeout, self.connect_inner())
            .await
            .map_err(|_| "connecting to the destination timed out")?
    }

    async fn connect_inner(&self) -> Result<TlsStream<TcpStream>, BoxError> {
        let config = self.config.borrow().clone().ok_or("no valid certificate")?;
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
        Ok(TlsConnector::from(config).connect(name, tcp).await?)
    }
}

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
