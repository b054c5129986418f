//! Every answer the proxy itself gives (as opposed to the app's), in one
//! place: a fixed reason, a status, an RFC 9457 problem body.

use bytes::Bytes;
use http::Response;
use http_body_util::{Either, Full};
use hyper::body::Incoming;

/// The body type of every proxied response: the upstream's, streamed, or
/// one of ours. An enum rather than a box: no allocation per response.
pub type Body = Either<Incoming, Full<Bytes>>;
/// Errors a body can carry.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
        warden_ca::http::problem(self.status(), self.reason(), detail).map(Either::Right)
    }
}

/// An upstream response body, passed through as it streams.
pub fn upstream(body: Incoming) -> Body {
    Either::Left(body)
}
