//! The app client, last in the inbound stack: the request goes to the
//! local app over pooled keep-alive HTTP/1.1 (or h2c), with its path already
//! normalized and authorized, and the app's answer comes back with its
//! hop-by-hop headers removed. An app that does not accept a connection
//! within `connect_timeout` is answered 504 (`app_connect_timeout`); one
//! that refuses or drops it, 502 (`app_unavailable`); one that sends no
//! response head within `response_timeout`, 504 (`app_timeout`), so a hung
//! app cannot hold the listener's requests in flight. A streamed answer
//! that has started is not cut by it (the idle timeout watches a stalled one).

use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use http::uri::{Authority, Scheme};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::Service;

use warden_identity::ratelog::LogLimiter;

use crate::headers;
use crate::respond::Refusal;
use crate::stack::body::Body;
use crate::stack::{Req, ReqBody, StageFuture, error_chain};

static APP_LOG: LogLimiter = LogLimiter::new(10);

/// A pooled client for one listener's app.
#[derive(Clone, Debug)]
pub struct AppClient {
    client: Client<HttpConnector, ReqBody>,
    authority: Authority,
    h2c: bool,
    response_timeout: Duration,
    listener: std::sync::Arc<str>,
}

impl AppClient {
    /// A client for the app at `addr` (h2c when `h2c`), connecting within
    /// `connect_timeout` and answered within `response_timeout`.
    pub fn new(
        listener: std::sync::Arc<str>,
        addr: SocketAddr,
        h2c: bool,
        (connect_timeout, response_timeout): (Duration, Duration),
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .http2_only(h2c)
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Self {
            client,
            authority: Authority::try_from(addr.to_string())
                .unwrap_or_else(|_| Authority::from_static("127.0.0.1")),
            h2c,
            response_timeout,
            listener,
        }
    }
}

impl Service<Req> for AppClient {
    type Response = crate::stack::Resp;
    type Error = Refusal;
    type Future = StageFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(self.authority.clone());
        parts.uri = match Uri::from_parts(uri) {
            Ok(u) => u,
            Err(_) => return Box::pin(async { Err(Refusal::BadPath) }),
        };
        parts.version = if self.h2c {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        let fut = self.client.request(http::Request::from_parts(parts, body));
        let (listener, after) = (self.listener.clone(), self.response_timeout);
        Box::pin(async move {
            match tokio::time::timeout(after, fut)
                .await
                .map_err(|_| Refusal::AppTimeout)?
            {
                Ok(resp) => {
                    let (mut parts, body) = resp.into_parts();
                    headers::strip_hop_by_hop(&mut parts.headers);
                    Ok(http::Response::from_parts(parts, Body::Upstream(body)))
                }
                Err(e) => {
                    let refusal = if timed_out(&e) {
                        Refusal::AppConnectTimeout
                    } else {
                        Refusal::AppUnavailable
                    };
                    if APP_LOG.allow() {
                        tracing::warn!(listener = %listener, reason = refusal.reason(), error = %error_chain(&e), "app unreachable");
                    }
                    Err(refusal)
                }
            }
        })
    }
}

fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cur = err.source();
    }
    false
}
