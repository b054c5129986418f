//! The bodies that travel through the stack. The answer's ([`Body`]): the
//! upstream's, streamed; one the proxy made; or a model API stream metered
//! as it passes.
//!
//! The request body as it travels down the stack: the caller's, streamed
//! (its trailers cleaned like its head: a trailer is just a late header), or
//! one a stage read whole and perhaps rewrote (a model API request).
//!
//! A caller's body that nobody read to its end, because a stage answered
//! early (403, 429, 431...), is drained in the background when it is
//! dropped, up to [`DRAIN_BYTES`] and [`DRAIN_TIME`]. Without that an h2
//! stream is reset right after the answer and clients such as curl report
//! a framing error instead of the answer; an HTTP/1.1 client still writing
//! its body may never read it. Past either bound the body is dropped (the
//! stream reset, the connection closed).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};

use crate::headers;
use warden_guard::answer::AnswerBody;
use warden_guard::meter::Metered;

/// The request every stage sees.
pub type Req = http::Request<ReqBody>;
/// The answer every stage below `respond` returns.
pub type Resp = http::Response<Body>;

/// Most bytes of an unread body drained after an early answer.
pub const DRAIN_BYTES: usize = 64 * 1024;
/// Longest time spent draining an unread body after an early answer.
pub const DRAIN_TIME: Duration = Duration::from_secs(2);

/// A request body: the caller's, or one a stage read and replaced.
#[derive(Debug)]
pub enum ReqBody {
    /// The caller's body, streamed (`None` once taken).
    Caller(Option<Incoming>),
    /// A body a stage read whole.
    Read(Full<Bytes>),
}

impl ReqBody {
    /// The caller's body.
    pub fn caller(body: Incoming) -> Self {
        Self::Caller(Some(body))
    }

    /// A body a stage read (and perhaps rewrote).
    pub fn read(bytes: Bytes) -> Self {
        Self::Read(Full::new(bytes))
    }

    /// The caller's body itself, for a stage that reads it whole; `None`
    /// when a stage already replaced it.
    pub fn take_caller(&mut self) -> Option<Incoming> {
        match self {
            Self::Caller(b) => b.take(),
            Self::Read(_) => None,
        }
    }
}

impl HttpBody for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Caller(Some(b)) => Pin::new(b).poll_frame(cx).map_ok(|mut frame| {
                if let Some(t) = frame.trailers_mut() {
                    headers::strip_hop_by_hop(t);
                    headers::strip_identity(t);
                }
                frame
            }),
            Self::Caller(None) => Poll::Ready(None),
            Self::Read(b) => Pin::new(b).poll_frame(cx).map_err(|e| match e {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Caller(Some(b)) => b.is_end_stream(),
            Self::Caller(None) => true,
            Self::Read(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Caller(Some(b)) => b.size_hint(),
            Self::Caller(None) => SizeHint::with_exact(0),
            Self::Read(b) => b.size_hint(),
        }
    }
}

impl Drop for ReqBody {
    fn drop(&mut self) {
        if let Some(body) = self.take_caller().filter(|b| !b.is_end_stream()) {
            drain(body);
        }
    }
}

/// Reads and discards what is left of `body`, within the drain bounds.
fn drain(mut body: Incoming) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let too_big = body.size_hint().lower() > DRAIN_BYTES as u64;
    if too_big {
        return;
    }
    rt.spawn(async move {
        let read = async {
            let mut seen = 0usize;
            while let Some(Ok(frame)) = body.frame().await {
                seen += frame.data_ref().map_or(0, Bytes::len);
                if seen > DRAIN_BYTES {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_TIME, read).await;
    });
}

/// The body type of every proxied response: the upstream's, streamed; one
/// of ours; or a model API stream counted as it passes. An enum rather than
/// a box: no allocation per response (only a metered stream is boxed).
pub enum Body {
    /// The app's or the destination's answer, passed through.
    Upstream(Incoming),
    /// An answer made (or rewritten) by the proxy.
    Full(Full<Bytes>),
    /// A model API stream, counted against its reservation.
    Metered(Box<Metered<Incoming>>),
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

impl From<AnswerBody<Incoming>> for Body {
    fn from(b: AnswerBody<Incoming>) -> Self {
        match b {
            AnswerBody::Upstream(b) => Self::Upstream(b),
            AnswerBody::Metered(m) => Self::Metered(m),
            AnswerBody::Full(bytes) => Self::Full(Full::new(bytes)),
        }
    }
}

/// An upstream response body, passed through as it streams.
pub fn upstream(body: Incoming) -> Body {
    Body::Upstream(body)
}
