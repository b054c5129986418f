//! The identity header stage: what the app learns about the caller.
//!
//! A client must never be able to choose the identity the app sees. So,
//! before anything is added: every `x-forwarded-client-cert` header is removed
//! (header names are case-insensitive, all copies go), and so are the
//! hop-by-hop headers, including every header the `Connection` header names
//! (a client could otherwise ask the app's own HTTP stack to drop ours).
//! Look-alikes spelled with `_` (`x_forwarded_client_cert`) go too: servers
//! that map header names to CGI variables read `-` and `_` the same.
//! Then exactly one XFCC is added, in Envoy's form: `By=<our id>;URI=<peer id>`.
//!
//! Headers with which a client could make the app act on another method or
//! path than the one authorized go too ([`OVERRIDES`]): method overrides
//! (Express's `method-override`, ASP.NET, Google APIs) and URL rewrites
//! (IIS URL Rewrite, Symfony and Laminas read `X-Original-URL`).

use http::HeaderMap;
use http::header::{CONNECTION, HeaderName, HeaderValue, TE, TRANSFER_ENCODING, UPGRADE};

/// The identity header the app receives.
pub const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes hop-by-hop headers (RFC 9110 section 7.6.1) and those named in
/// `Connection`. `Trailer` is end to end and stays, so declared trailers
/// still reach the other side.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        TE,
        TRANSFER_ENCODING,
        UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// Request headers that some app stacks read as the method or the path to
/// act on instead of the request's own: a client could authorize one
/// request and have the app perform another.
pub const OVERRIDES: [HeaderName; 7] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
    HeaderName::from_static("x-original-uri"),
    HeaderName::from_static("x-forwarded-prefix"),
];

/// A spelling of the identity header that some servers read as it:
/// `x_forwarded_client_cert` and its mixes of `-` and `_`.
fn identity_lookalike(name: &HeaderName) -> bool {
    let (name, xfcc) = (name.as_str().as_bytes(), b"x-forwarded-client-cert");
    name.len() == xfcc.len()
        && name
            .iter()
            .zip(xfcc)
            .all(|(&n, &x)| n == x || (n == b'_' && x == b'-'))
}

/// Removes every spelling of the identity header a client could send.
pub fn strip_identity(headers: &mut HeaderMap) {
    strip_where(headers, identity_lookalike);
}

/// Removes the headers `spoofed` picks, in one pass over the names (and no
/// allocation when there are none, the usual case).
fn strip_where(headers: &mut HeaderMap, spoofed: impl Fn(&HeaderName) -> bool) {
    let found: Vec<HeaderName> = headers.keys().filter(|k| spoofed(k)).cloned().collect();
    for name in found {
        headers.remove(name);
    }
}

/// Replaces whatever identity header the client sent with the verified one.
pub fn set_identity(headers: &mut HeaderMap, xfcc: &HeaderValue) {
    strip_hop_by_hop(headers);
    strip_where(headers, |k| identity_lookalike(k) || OVERRIDES.contains(k));
    headers.insert(XFCC, xfcc.clone());
}

/// The XFCC value for a peer, built once per connection.
pub fn xfcc_value(own: &str, peer: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!("By={own};URI={peer}")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_client_copy_is_replaced_by_exactly_one_verified_header() {
        let mut h = HeaderMap::new();
        h.append(
            "X-Forwarded-Client-Cert",
            HeaderValue::from_static("By=x;URI=spiffe://td/admin"),
        );
        h.append(
            "x-forwarded-client-cert",
            HeaderValue::from_static("URI=spiffe://td/root"),
        );
        h.append(
            "connection",
            HeaderValue::from_static("keep-alive, X-Forwarded-Client-Cert, x-secret"),
        );
        h.append("x-secret", HeaderValue::from_static("1"));
        h.append("x-kept", HeaderValue::from_static("1"));
        h.append("X-HTTP-Method-Override", HeaderValue::from_static("DELETE"));
        h.append("x-original-url", HeaderValue::from_static("/admin"));
        h.append(
            "X_Forwarded_Client_Cert",
            HeaderValue::from_static("URI=spiffe://td/admin"),
        );
        h.append(
            "x-forwarded_client-cert",
            HeaderValue::from_static("URI=spiffe://td/admin"),
        );
        let v = xfcc_value("spiffe://td/app", "spiffe://td/web").unwrap();
        set_identity(&mut h, &v);
        let all: Vec<_> = h.get_all(XFCC).iter().collect();
        assert_eq!(all, vec![&v]);
        assert!(h.get("connection").is_none() && h.get("x-secret").is_none());
        assert!(h.get("x-kept").is_some());
        assert_eq!(h.len(), 2, "only x-kept and ours remain: {h:?}");
    }
}
