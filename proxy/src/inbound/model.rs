//! The model guard stage: a request under a `model_api` route is admitted
//! (or refused) by its route: the request-rate and concurrency gate, then
//! for a request with a body the bounded read, the API's own fields, the
//! information caps, extraction detection and the token reservation. It is
//! forwarded with the body the route read, uncompressed, and its answer is
//! settled by the route (JSON usage, or the event stream as it passes).
//! Requests under no route pass through untouched. A route's refusals
//! ([`GuardRefusal`](warden_guard::refusal::GuardRefusal)) are answered by
//! `respond` as [`Refusal::Model`].

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Method, header};
use hyper::body::Body as _;
use tower::{Layer, Service};

use warden_identity::tls::VerifiedPeer;

use crate::respond::Refusal;
use crate::stack::body::Body;
use crate::stack::{Branch, Req, ReqBody, Resp};
use warden_guard::route::Routes;

/// The layer, for one connection's verified caller.
#[derive(Clone)]
pub struct ModelGuardLayer {
    routes: Arc<Routes>,
    peer: Arc<VerifiedPeer>,
}

impl ModelGuardLayer {
    /// Guards `routes` for `peer`.
    pub fn new(routes: Arc<Routes>, peer: Arc<VerifiedPeer>) -> Self {
        Self { routes, peer }
    }
}

impl<S> Layer<S> for ModelGuardLayer {
    type Service = ModelGuard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ModelGuard {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`ModelGuardLayer`].
#[derive(Clone)]
pub struct ModelGuard<S> {
    inner: S,
    layer: ModelGuardLayer,
}

impl<S> Service<Req> for ModelGuard<S>
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
        let Some(route) = self.layer.routes.find(req.uri().path()).cloned() else {
            return Branch::Pass(self.inner.call(req));
        };
        let peer = self.layer.peer.clone();
        let mut inner = self.inner.clone();
        Branch::Staged(Box::pin(async move {
            let (mut parts, mut body) = req.into_parts();
            let bodiless = matches!(
                parts.method,
                Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
            ) && body.is_end_stream();
            let gate = match route.gate(peer.id()).await {
                Ok(g) => g,
                Err(refused) => return Err(Refusal::Model(Box::new(refused))),
            };
            let (req, admitted) = if bodiless {
                match route.admit_bodiless(peer.id(), gate) {
                    Ok(a) => (http::Request::from_parts(parts, body), a),
                    Err(refused) => return Err(Refusal::Model(Box::new(refused))),
                }
            } else {
                let Some(caller) = body.take_caller() else {
                    return Err(Refusal::Internal);
                };
                match route.admit(peer.id(), parts.uri.path(), caller, gate).await {
                    Ok((bytes, a)) => {
                        parts.headers.remove(header::CONTENT_LENGTH);
                        parts.headers.remove(header::TRANSFER_ENCODING);
                        // The answer is counted and limited: it must come uncompressed.
                        parts.headers.insert(
                            header::ACCEPT_ENCODING,
                            HeaderValue::from_static("identity"),
                        );
                        (http::Request::from_parts(parts, ReqBody::read(bytes)), a)
                    }
                    Err(refused) => return Err(Refusal::Model(Box::new(refused))),
                }
            };
            match inner.call(req).await {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    match body {
                        Body::Upstream(b) => route
                            .answer(admitted, http::Response::from_parts(parts, b))
                            .await
                            .map(|resp| resp.map(Body::from))
                            .map_err(|refused| Refusal::Model(Box::new(refused))),
                        // Only the app client answers below this stage.
                        other => Ok(http::Response::from_parts(parts, other)),
                    }
                }
                Err(refusal) => {
                    // The app never answered: nothing was generated.
                    admitted.cancel();
                    Err(refusal)
                }
            }
        }))
    }
}
