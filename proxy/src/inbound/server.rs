//! The HTTP version stage: HTTP/1.1 or h2, as ALPN chose, served by hyper
//! with the listener's bounds. hyper's own header bounds are set at four
//! times the listener's, as a memory backstop: the `limits` stage below answers
//! 431 (counted, with a problem body) for anything between, the same way on
//! both protocols.

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;

use warden_config::proxy::Limits;

/// A connection builder for a listener with `limits`.
pub fn builder(l: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let backstop = l.max_header_bytes.saturating_mul(4).max(16 * 1024);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(l.header_read_timeout)
        .max_headers(l.max_headers.saturating_mul(4))
        .max_buf_size(backstop);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(l.max_concurrent_streams)
        // h2 counts 32 bytes of overhead per field on top of name and value.
        .max_header_list_size(
            u32::try_from(backstop.saturating_add(32 * l.max_headers)).unwrap_or(u32::MAX),
        )
        // Bounded buffering per stream and connection for bodies the app is slow to take.
        .initial_stream_window_size(256 * 1024)
        .initial_connection_window_size(1024 * 1024);
    builder
}
