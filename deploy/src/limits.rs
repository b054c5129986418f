//! What one caller of the webhook can hold, so that slow or many callers
//! cannot crowd the API server's reviews out.
//!
//! - [`ByteBudget`]: review bodies are read into memory counted against one
//!   budget shared by every request, taken as each chunk arrives (a chunk
//!   waits for budget within the body timeout). A slow sender holds only
//!   what it has sent (at most twice that in buffer capacity, which is what
//!   is counted), not a turn that real reviews wait for.
//! - [`PerSource`]: connections counted per source address, so that one pod
//!   cannot hold every connection slot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::{Body, Bytes};
use tokio::sync::Semaphore;

use warden_identity::http::BodyError;

/// Past the limit, up to this much more is read and thrown away.
const DRAIN_BYTES: usize = 1 << 20;

/// Bytes of review bodies held at once, shared by all requests.
#[derive(Debug)]
pub struct ByteBudget {
    bytes: Semaphore,
    total: usize,
}

/// A body read under a [`ByteBudget`]; its bytes go back when dropped.
#[derive(Debug)]
pub struct Held<'a> {
    budget: &'a ByteBudget,
    held: usize,
    body: Vec<u8>,
}

impl Held<'_> {
    /// The body.
    pub fn bytes(&self) -> &[u8] {
        &self.body
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.budget.bytes.add_permits(self.held);
    }
}

impl ByteBudget {
    /// A budget of `total` bytes.
    pub fn new(total: usize) -> Self {
        ByteBudget {
            bytes: Semaphore::new(total),
            total,
        }
    }

    /// Bytes currently held by bodies being read or waiting to be decided.
    pub fn in_use(&self) -> usize {
        self.total.saturating_sub(self.bytes.available_permits())
    }

    /// Reads a whole body of at most `limit` bytes within `timeout`, each
    /// chunk taking its share of the budget (buffer capacity, so at most
    /// twice the bytes received) before it is kept. Fails closed: over the
    /// limit, too slow (including waiting for budget), or a broken body.
    pub async fn read<B>(
        &self,
        body: B,
        limit: usize,
        timeout: Duration,
    ) -> Result<Held<'_>, BodyError>
    where
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let mut held = Held {
            budget: self,
            held: 0,
            body: Vec::new(),
        };
        match tokio::time::timeout(timeout, self.fill(&mut held, body, limit)).await {
            Err(_) => Err(BodyError::Read("timed out".into())),
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) => Ok(held),
        }
    }

    async fn fill<B>(&self, held: &mut Held<'_>, body: B, limit: usize) -> Result<(), BodyError>
    where
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let mut body = std::pin::pin!(body);
        let mut over = None;
        while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if let Some(seen) = over.as_mut() {
                // Past the limit: read up to DRAIN_BYTES more and throw them
                // away, so that the refusal reaches the client instead of
                // a reset.
                *seen += data.len();
                if *seen > DRAIN_BYTES {
                    break;
                }
                continue;
            }
            let len = held.body.len().saturating_add(data.len());
            if len > limit {
                held.body = Vec::new();
                self.bytes.add_permits(std::mem::take(&mut held.held));
                over = Some(0);
                continue;
            }
            if len > held.body.capacity() {
                // Doubling, capped at the limit: what is counted is what
                // is allocated.
                let cap = len.max(held.body.capacity().saturating_mul(2)).min(limit);
                let more = cap.saturating_sub(held.held);
                let n = u32::try_from(more).map_err(|_| BodyError::TooLarge(limit))?;
                self.bytes
                    .acquire_many(n)
                    .await
                    .map_err(|_| BodyError::Read("the webhook is stopping".into()))?
                    .forget();
                held.held = held.held.saturating_add(more);
                held.body.reserve_exact(cap.saturating_sub(held.body.len()));
            }
            held.body.extend_from_slice(&data);
        }
        match over {
            Some(_) => Err(BodyError::TooLarge(limit)),
            None => Ok(()),
        }
    }
}

/// Connections open per source address, each at most `cap`.
#[derive(Debug)]
pub struct PerSource {
    cap: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection of a source; given back when dropped.
#[derive(Debug)]
pub struct SourceSlot {
    sources: Arc<PerSource>,
    ip: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self
            .sources
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

impl PerSource {
    /// At most `cap` connections per source address.
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(PerSource {
            cap,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more connection from `ip`, or `None` when it has
    /// `cap` open. The map only holds sources with a connection open, so it
    /// is as bounded as the connections.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let ip = ip.to_canonical();
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = open.entry(ip).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            sources: self.clone(),
            ip,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

    use super::*;
    use hyper::body::Frame;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// Chunks, then (if `stall`) a body that never ends.
    struct Chunks {
        chunks: Vec<Bytes>,
        stall: bool,
    }

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.chunks.is_empty() {
                return if self.stall {
                    Poll::Pending
                } else {
                    Poll::Ready(None)
                };
            }
            let c = self.chunks.remove(0);
            Poll::Ready(Some(Ok(Frame::data(c))))
        }
    }

    fn body(chunks: &[&'static [u8]], stall: bool) -> Chunks {
        Chunks {
            chunks: chunks.iter().map(|c| Bytes::from_static(c)).collect(),
            stall,
        }
    }

    const T: Duration = Duration::from_millis(200);

    #[tokio::test]
    async fn a_slow_body_holds_only_what_it_has_sent() {
        let budget = ByteBudget::new(1 << 20);
        let slow = budget.read(body(&[b"{\"api", b"Version\""], true), 2 << 20, T);
        let good = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            // Read while the slow one waits for its next bytes.
            let held = budget
                .read(body(&[b"{}"], false), 2 << 20, T)
                .await
                .unwrap();
            assert!(budget.in_use() <= 2 * 14 + 2, "{}", budget.in_use());
            assert_eq!(held.bytes(), b"{}");
        };
        let (slow, ()) = tokio::join!(slow, good);
        assert!(matches!(slow, Err(BodyError::Read(_))), "{slow:?}");
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test]
    async fn a_chunk_waits_for_budget_and_bytes_come_back_when_dropped() {
        let budget = ByteBudget::new(8);
        let first = budget
            .read(body(&[b"12345678"], false), 64, T)
            .await
            .unwrap();
        assert_eq!(budget.in_use(), 8);
        let waited = budget.read(body(&[b"x"], false), 64, T).await;
        assert!(matches!(waited, Err(BodyError::Read(_))), "{waited:?}");
        assert_eq!(budget.in_use(), 8);
        drop(first);
        assert_eq!(budget.in_use(), 0);
        let held = budget
            .read(body(&[b"ab", b"cdef"], false), 64, T)
            .await
            .unwrap();
        assert_eq!(held.bytes(), b"abcdef");
        assert!(budget.in_use() >= 6 && budget.in_use() <= 8);
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_too_large_and_holds_nothing() {
        let budget = ByteBudget::new(1 << 20);
        let r = budget.read(body(&[b"1234", b"5678"], false), 6, T).await;
        assert!(matches!(r, Err(BodyError::TooLarge(6))), "{r:?}");
        assert_eq!(budget.in_use(), 0);
    }

    #[test]
    fn a_source_gets_at_most_its_cap_and_others_still_get_in() {
        let sources = PerSource::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let (a1, _a2) = (sources.take(a).unwrap(), sources.take(a).unwrap());
        assert!(sources.take(a).is_none());
        // The same source as an IPv4-mapped IPv6 address.
        assert!(sources.take("::ffff:10.0.0.1".parse().unwrap()).is_none());
        assert!(sources.take(b).is_some());
        drop(a1);
        assert!(sources.take(a).is_some());
    }
}
