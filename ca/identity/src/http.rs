//! Small HTTP pieces shared by warden's servers: problem+json answers,
//! bounded body reads, and a hyper connection builder with safe limits.

use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;

/// The body type every warden server answers with.
pub type Body = Full<Bytes>;

/// Base of the `type` URI of warden's problem answers.
pub const PROBLEM_TYPE_BASE: &str = "urn:warden:problem:";

/// An RFC 9457 `application/problem+json` answer. `reason` is a fixed label
/// that becomes the problem type; `detail` says what was wrong.
pub fn problem(status: u16, reason: &str, detail: &str) -> Response<Body> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::json!({
        "type": format!("{PROBLEM_TYPE_BASE}{}", reason.replace('_', "-")),
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    respond(status, "application/problem+json", body.to_string())
}

/// A response with a body and its content type.
pub fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Over the limit.
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    /// The client was too slow or the connection failed.
    #[error("request body could not be read: {0}")]
    Read(String),
}

/// Past the limit, up to this much more is read and thrown away before the
/// refusal is sent: closing a connection with unread data makes the kernel
/// reset it, and the client would lose the answer that says why.
const DRAIN_BYTES: usize = 1 << 20;

/// Reads a whole body, refusing more than `limit` bytes or taking longer than `timeout`.
pub async fn read_body<B>(body: B, limit: usize, timeout: Duration) -> Result<Bytes, BodyError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    match tokio::time::timeout(timeout, collect_bounded(body, limit)).await {
        Err(_) => Err(BodyError::Read("timed out".into())),
        Ok(r) => r,
    }
}

async fn collect_bounded<B>(body: B, limit: usize) -> Result<Bytes, BodyError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let mut body = std::pin::pin!(body);
    let mut kept = bytes::BytesMut::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen <= limit {
            kept.extend_from_slice(&data);
        } else if seen > limit.saturating_add(DRAIN_BYTES) {
            break;
        }
    }
    if seen > limit {
        Err(BodyError::TooLarge(limit))
    } else {
        Ok(kept.freeze())
    }
}

/// Header and stream limits for a small API or admin server.
pub fn server_builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_headers(64);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(8)
        .max_header_list_size(16 * 1024)
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    b
}
