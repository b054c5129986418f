//! The upstream client, last in the outbound stack: the app's request, its
//! hop-by-hop headers removed, goes to the destination over mTLS: HTTP/1.1
//! on pooled keep-alive connections, h2 multiplexed on one, or (`pool:
//! false`) on a connection owned by the app's connection. A destination that
//! proves the wrong identity is answered 502 `wrong_server_identity`, with
//! what it presented in the log; one that cannot be reached, 502
//! `upstream_unavailable`; one that sends no response head within
//! `response_timeout`, 504 `upstream_timeout`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::TokioIo;
use tower::Service;

use super::{MtlsConnector, upstream_failed};
use crate::headers;
use crate::respond::Refusal;
use crate::stack::body::{Body, BoxError};
use crate::stack::{Req, ReqBody, Resp, StageFuture};

/// The clients of one outbound listener, and perhaps one app connection's
/// own. A clone shares them (two reference counts, nothing copied).
#[derive(Clone)]
pub struct Upstream {
    pooled: Arc<Pooled>,
    own: Option<Arc<OwnUpstream>>,
}

/// What every request of the listener shares.
struct Pooled {
    listener: Arc<str>,
    handshakes: prometheus::IntCounterVec,
    authority: Authority,
    h1: Client<MtlsConnector, ReqBody>,
    h2: Client<MtlsConnector, ReqBody>,
    response_timeout: Duration,
}

impl Upstream {
    /// Pooled clients to `destination`, which must send a response head
    /// within `response_timeout`.
    pub fn new(
        listener: Arc<str>,
        handshakes: prometheus::IntCounterVec,
        destination: &str,
        (h1, h2): (
            Client<MtlsConnector, ReqBody>,
            Client<MtlsConnector, ReqBody>,
        ),
        response_timeout: Duration,
    ) -> Self {
        Self {
            pooled: Arc::new(Pooled {
                listener,
                handshakes,
                authority: Authority::try_from(destination)
                    .unwrap_or_else(|_| Authority::from_static("invalid")),
                h1,
                h2,
                response_timeout,
            }),
            own: None,
        }
    }

    /// The same, but HTTP/1.1 requests go on a connection of their own.
    pub fn with_own_connection(&self, connector: MtlsConnector) -> Self {
        Self {
            pooled: self.pooled.clone(),
            own: Some(Arc::new(OwnUpstream::new(connector))),
        }
    }
}

impl Service<Req> for Upstream {
    type Response = Resp;
    type Error = Refusal;
    type Future = StageFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        // gRPC over h2 needs `te: trailers`, the one TE value h2 allows.
        let te_trailers = parts.version == http::Version::HTTP_2
            && parts
                .headers
                .get(http::header::TE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
        headers::strip_hop_by_hop(&mut parts.headers);
        if te_trailers {
            parts
                .headers
                .insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        }
        let pooled = &self.pooled;
        let pq = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let h2 = parts.version == http::Version::HTTP_2;
        // The request is rewritten and sent here, so that the future boxed
        // below holds only the client's (already boxed) one and the timer.
        let sent = match self.own.as_ref().filter(|_| !h2) {
            // HTTP/1.1 on a connection of its own goes in origin-form.
            Some(own) => {
                parts.uri = Uri::from(pq);
                if !parts.headers.contains_key(http::header::HOST)
                    && let Ok(h) = http::HeaderValue::from_str(pooled.authority.as_str())
                {
                    parts.headers.insert(http::header::HOST, h);
                }
                let own = own.clone();
                let req = Request::from_parts(parts, body);
                Sent::Own(Box::pin(async move { own.request(req).await }))
            }
            None => {
                let uri = Uri::builder()
                    .scheme(Scheme::HTTP)
                    .authority(pooled.authority.clone())
                    .path_and_query(pq)
                    .build();
                let Ok(uri) = uri else {
                    return Box::pin(async { Err(Refusal::BadPath) });
                };
                parts.uri = uri;
                let client = if h2 { &pooled.h2 } else { &pooled.h1 };
                Sent::Pooled(client.request(Request::from_parts(parts, body)))
            }
        };
        let pooled = pooled.clone();
        Box::pin(async move {
            let answer = async {
                match sent {
                    Sent::Pooled(f) => f.await.map_err(Into::into),
                    Sent::Own(f) => f.await,
                }
            };
            // A stalled head is answered 504; a streamed body that has
            // started is the idle timeout's.
            match tokio::time::timeout(pooled.response_timeout, answer).await {
                Err(_) => Err(Refusal::UpstreamTimeout),
                Ok(Ok(resp)) => {
                    let (mut parts, body) = resp.into_parts();
                    headers::strip_hop_by_hop(&mut parts.headers);
                    Ok(Response::from_parts(parts, Body::Upstream(body)))
                }
                Ok(Err(e)) => Err(upstream_failed(&pooled.listener, &pooled.handshakes, &*e)),
            }
        })
    }
}

/// A request on its way: on a pooled connection, or on the app connection's own.
enum Sent {
    Pooled(ResponseFuture),
    Own(Pin<Box<dyn Future<Output = Result<Response<Incoming>, BoxError>> + Send>>),
}

/// An upstream connection owned by one app connection (`pool: false`).
pub struct OwnUpstream {
    connector: MtlsConnector,
    sender: tokio::sync::Mutex<Option<hyper::client::conn::http1::SendRequest<ReqBody>>>,
}

impl OwnUpstream {
    fn new(connector: MtlsConnector) -> Self {
        Self {
            connector,
            sender: tokio::sync::Mutex::new(None),
        }
    }

    async fn request(&self, req: Request<ReqBody>) -> Result<Response<Incoming>, BoxError> {
        let mut slot = self.sender.lock().await;
        let reusable = slot.as_ref().is_some_and(|s| !s.is_closed());
        if !reusable {
            let tls = self.connector.connect().await?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
            tokio::spawn(conn);
            *slot = Some(sender);
        }
        let sender = slot.as_mut().ok_or("no upstream connection")?;
        sender.ready().await?;
        Ok(sender.send_request(req).await?)
    }
}
