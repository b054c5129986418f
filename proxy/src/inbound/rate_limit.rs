//! The rate-limit stage: an allowed request is charged against the first of
//! the policy's `rate_limits` that applies (`crate::ratelimit`), keyed on
//! the verified caller and the normalized path only, so no spelling, header
//! or new connection moves it to another bucket. Over its rate it gets 429
//! with `RateLimit-Policy`, `RateLimit` and `Retry-After`; with the shared
//! store unreachable and the limit failing closed, 503. An admitted answer
//! carries `RateLimit`. A policy without rate limits costs one branch.

use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use warden_identity::tls::VerifiedPeer;

use crate::inbound::authorize::PolicyRx;
use crate::respond::Refusal;
use crate::stack::{Branch, Req, Resp};

/// The layer, for one connection's verified caller.
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    policy: PolicyRx,
    peer: Arc<VerifiedPeer>,
    local_port: u16,
}

impl RateLimitLayer {
    /// Charges `peer`'s requests, on a connection accepted on `local_port`,
    /// against the latest policy's rate limits.
    pub fn new(policy: PolicyRx, peer: Arc<VerifiedPeer>, local_port: u16) -> Self {
        Self {
            policy,
            peer,
            local_port,
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`RateLimitLayer`].
#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    layer: RateLimitLayer,
}

impl<S> Service<Req> for RateLimit<S>
where
    S: Service<Req, Response = Resp, Error = Refusal> + Clone + Send + 'static,
    S::Future: Send + Unpin + 'static,
{
    type Response = Resp;
    type Error = Refusal;
    type Future = Branch<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let compiled = self.layer.policy.borrow().clone();
        if compiled.rate_limits.is_empty() {
            return Branch::Pass(self.inner.call(req));
        }
        let (peer, port) = (self.layer.peer.clone(), self.layer.local_port);
        let mut inner = self.inner.clone();
        Branch::Staged(Box::pin(async move {
            let admitted = compiled
                .rate_limits
                .check(&peer, port, req.method().as_str(), req.uri().path())
                .await
                .map_err(|l| Refusal::RateLimited(Box::new(l)))?;
            let mut resp = inner.call(req).await?;
            if let Some((name, value)) = admitted.and_then(|a| a.header()) {
                resp.headers_mut().insert(name, value);
            }
            Ok(resp)
        }))
    }
}
