//! Every answer the proxy itself gives (as opposed to the app's), in one
//! place: a fixed reason, a status, an RFC 9457 problem body.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};

use crate::model::meter::Metered;

/// The body type of every proxied response: the upstream's, streamed; one
/// of ours; or a model API stream counted as it passes. An enum rather than
/// a box: no allocation per response (only a metered stream is boxed).
pub enum Body {
    /// The app's or the destination's answer, passed through.
    Upstream(Incoming),
    /// An answer made (or rewritten) by the proxy.
    Full(Full<Bytes>),
    /// A model API stream, counted against its reservation.
    Metered(Box<Metered>),
}

/// Errors a body can carry.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Upstream(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Self::Full(b) => Pin::new(b).poll_frame(cx).map_err(|e| match e {}),
            Self::Metered(b) => Pin::new(&mut **b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Upstream(b) => b.is_end_stream(),
            Self::Full(b) => b.is_end_stream(),
            Self::Metered(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Upstream(b) => b.size_hint(),
            Self::Full(b) => b.size_hint(),
            Self::Metered(b) => b.size_hint(),
        }
    }
}

/// Why the proxy answered instead of the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The path cannot be normalized safely (400).
    BadPath,
    /// The caller is not allowed (403).
    Forbidden,
    /// The app could not be reached (502).
    AppUnavailable,
    /// The destination's identity is not the expected one (502).
    WrongServerIdentity,
    /// The destination could not be reached (502).
    UpstreamUnavailable,
    /// No valid certificate right now (503).
    NoIdentity,
    /// A method spelled in lower case: apps disagree on what it means (400).
    BadMethod,
    /// CONNECT is not proxied (405).
    MethodNotAllowed,
    /// The listener's limit on requests in flight is reached (503).
    Overloaded,
}

impl Refusal {
    /// Fixed label for metrics and the problem type.
    pub fn reason(self) -> &'static str {
        match self {
            Self::BadPath => "bad_path",
            Self::Forbidden => "forbidden",
            Self::AppUnavailable => "app_unavailable",
            Self::WrongServerIdentity => "wrong_server_identity",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::NoIdentity => "no_identity",
            Self::BadMethod => "bad_method",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Overloaded => "overloaded",
        }
    }

    fn status(self) -> u16 {
        match self {
            Self::BadPath | Self::BadMethod => 400,
            Self::MethodNotAllowed => 405,
            Self::Forbidden => 403,
            Self::AppUnavailable | Self::WrongServerIdentity | Self::UpstreamUnavailable => 502,
            Self::NoIdentity | Self::Overloaded => 503,
        }
    }

    /// What the problem body says.
    pub fn detail(self) -> &'static str {
        match self {
            Self::BadPath => "the request path cannot be normalized safely",
            Self::Forbidden => "the caller's identity is not allowed to make this request",
            Self::AppUnavailable => "the app behind this proxy did not answer",
            Self::WrongServerIdentity => "the destination did not prove the expected SPIFFE ID",
            Self::UpstreamUnavailable => "the destination could not be reached over mTLS",
            Self::NoIdentity => "this proxy holds no valid certificate right now",
            Self::BadMethod => "request methods are case-sensitive and must be upper case",
            Self::MethodNotAllowed => "CONNECT is not proxied",
            Self::Overloaded => "too many requests in flight on this listener",
        }
    }

    /// The response.
    pub fn response(self) -> Response<Body> {
        let detail = self.detail();
        warden_identity::http::problem(self.status(), self.reason(), detail).map(Body::Full)
    }
}

/// An upstream response body, passed through as it streams.
pub fn upstream(body: Incoming) -> Body {
    Body::Upstream(body)
}
