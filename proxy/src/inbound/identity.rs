//! The identity header stage: the caller's verified SPIFFE ID is what the
//! app learns, in `x-forwarded-client-cert` (Envoy's `By=<ours>;URI=<peer>`).
//! Every copy and look-alike the client sent goes first, and so do the
//! hop-by-hop headers and those `Connection` names (see `crate::headers`);
//! `te: trailers` is kept for an h2c app, where gRPC needs it.

use http::{HeaderValue, header};

use crate::headers;
use crate::respond::Refusal;
use crate::stack::{Check, Req};

/// The connection's XFCC value, built once per connection.
#[derive(Debug, Clone)]
pub struct IdentityHeader {
    /// The value the app receives.
    pub xfcc: HeaderValue,
    /// The app speaks h2c: keep `te: trailers`.
    pub app_h2c: bool,
}

impl Check for IdentityHeader {
    fn check(&self, req: &mut Req) -> Result<(), Refusal> {
        let h = req.headers_mut();
        let te_trailers = self.app_h2c
            && h.get(header::TE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
        headers::set_identity(h, &self.xfcc);
        if te_trailers {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        Ok(())
    }
}
