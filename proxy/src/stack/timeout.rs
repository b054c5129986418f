//! The response-head timeout: an upstream (the app inbound, the destination
//! outbound) that sends no response head within the listener's
//! `response_timeout` is answered 504 with a reason, and the request's slot
//! is freed, so one hung upstream cannot hold the listener's requests in
//! flight. A streamed answer that has started is not cut by it (the idle
//! timeout watches a stalled one).

use std::task::{Context, Poll};
use std::time::Duration;

use tower::{Layer, Service};

use crate::respond::Refusal;
use crate::stack::{Req, Resp, StageFuture};

/// Answers `refusal` when the head takes longer than `after`.
#[derive(Debug, Clone)]
pub struct TimeoutLayer {
    after: Duration,
    refusal: Refusal,
}

impl TimeoutLayer {
    /// A timeout of `after`, refused as `refusal` (`AppTimeout` or `UpstreamTimeout`).
    pub fn new(after: Duration, refusal: Refusal) -> Self {
        Self { after, refusal }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Timeout {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`TimeoutLayer`].
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    layer: TimeoutLayer,
}

impl<S> Service<Req> for Timeout<S>
where
    S: Service<Req, Response = Resp, Error = Refusal>,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = Refusal;
    type Future = StageFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let fut = self.inner.call(req);
        let TimeoutLayer { after, refusal } = self.layer.clone();
        Box::pin(async move {
            match tokio::time::timeout(after, fut).await {
                Ok(r) => r,
                Err(_) => Err(refusal),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    use crate::stack::ReqBody;
    use crate::stack::body::Body;

    fn app(delay: Duration) -> tower::util::BoxCloneService<Req, Resp, Refusal> {
        tower::util::BoxCloneService::new(tower::service_fn(move |_req: Req| async move {
            tokio::time::sleep(delay).await;
            Ok(http::Response::new(Body::Full(Default::default())))
        }))
    }

    fn req() -> Req {
        http::Request::new(ReqBody::read(bytes::Bytes::new()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_later_than_the_timeout_is_refused_and_one_in_time_passes() {
        let layer = TimeoutLayer::new(Duration::from_secs(5), Refusal::AppTimeout);
        let slow = layer
            .layer(app(Duration::from_secs(6)))
            .oneshot(req())
            .await;
        assert!(matches!(slow, Err(Refusal::AppTimeout)));
        let fast = layer
            .layer(app(Duration::from_secs(4)))
            .oneshot(req())
            .await;
        assert_eq!(fast.unwrap().status(), 200);
    }
}
