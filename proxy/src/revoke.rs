//! Closing open connections whose peer the CA denies: a stream wrapper that
//! fails every read and write from the moment its peer's SPIFFE ID is on the
//! deny list. Handshakes are refused by the verifiers; this is for the
//! connections that were already open, pooled outbound ones included (hyper
//! owns those, so only their stream can end them).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::JoinHandle;

use warden_config::SpiffeId;
use warden_identity::tls::DenyList;

#[derive(Default)]
struct Flag {
    revoked: AtomicBool,
    waker: AtomicWaker,
}

/// `S`, until its peer is denied; then an error on every call.
pub struct Revocable<S> {
    inner: S,
    flag: Arc<Flag>,
    /// Waits for the denial; none when the list can never change.
    watch: Option<JoinHandle<()>>,
}

impl<S> Revocable<S> {
    /// Wraps `inner`, a connection with `peer`, watching `denied`; `closed`
    /// counts the connection if it is ended for that.
    pub fn new(inner: S, peer: SpiffeId, denied: &DenyList, closed: IntCounter) -> Self {
        let flag = Arc::new(Flag::default());
        if !denied.can_change() {
            return Self {
                inner,
                flag,
                watch: None,
            };
        }
        let f = flag.clone();
        let denied = denied.clone();
        let watch = Some(tokio::spawn(async move {
            denied.until_denied(peer.clone()).await;
            f.revoked.store(true, Ordering::Release);
            f.waker.wake();
            closed.inc();
            tracing::warn!(peer = %peer, "closing a connection: the CA denied its peer");
        }));
        Self { inner, flag, watch }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Registers the task and says whether the peer is denied. Registering
    /// first, then reading the flag, cannot miss a wake-up.
    fn revoked(&self, cx: &Context<'_>) -> bool {
        self.flag.waker.register(cx.waker());
        self.flag.revoked.load(Ordering::Acquire)
    }
}

impl<S> Drop for Revocable<S> {
    fn drop(&mut self) {
        if let Some(w) = &self.watch {
            w.abort();
        }
    }
}

fn denied() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        "the CA denied the peer's identity",
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for Revocable<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.revoked(cx) {
            return Poll::Ready(Err(denied()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Revocable<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.revoked(cx) {
            return Poll::Ready(Err(denied()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.revoked(cx) {
            return Poll::Ready(Err(denied()));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.revoked(cx) {
            return Poll::Ready(Err(denied()));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use warden_identity::tls::DeniedSet;

    #[tokio::test]
    async fn a_read_waiting_on_an_idle_connection_fails_once_the_peer_is_denied() {
        let peer = SpiffeId::parse("spiffe://example.org/web").unwrap();
        let (tx, list) = DenyList::channel(DeniedSet::default());
        let (a, mut b) = tokio::io::duplex(64);
        let closed = IntCounter::new("c", "c").unwrap();
        let mut conn = Revocable::new(a, peer.clone(), &list, closed.clone());
        b.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        conn.read_exact(&mut buf).await.unwrap();
        // Nothing more arrives: the read only ends because of the denial.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 1];
            conn.read(&mut buf).await
        });
        tokio::task::yield_now().await;
        tx.send(Arc::new([peer].into())).unwrap();
        let err = reader.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
        assert_eq!(closed.get(), 1);
    }
}
