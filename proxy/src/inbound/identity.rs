//! The identity header stage: the caller's verified SPIFFE ID is what the
//! app learns, in `x-forwarded-client-cert` (Envoy's `By=<ours>;URI=<peer>`).
//! Every copy and look-alike the client sent goes first, and so do the
//! hop-by-hop headers and those `Connection` names (see `crate::headers`);
//! `te: trailers` is kept for an h2c app, where gRPC needs it; h2 cookie
//! crumbs are joined into one field for an HTTP/1.1 app.

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
        // h2 may split `cookie` into crumbs; an HTTP/1.1 app must get one
        // field (RFC 9113 section 8.2.3), or it may read only one crumb.
        if !self.app_h2c && h.get_all(header::COOKIE).iter().nth(1).is_some() {
            let joined: Vec<&[u8]> = h
                .get_all(header::COOKIE)
                .iter()
                .map(|v| v.as_bytes())
                .collect();
            if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
                h.insert(header::COOKIE, v);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::ReqBody;

    #[test]
    fn cookie_crumbs_become_one_field_for_an_http1_app() {
        let mut req = http::Request::builder()
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .body(ReqBody::read(bytes::Bytes::new()))
            .unwrap();
        let stage = IdentityHeader {
            xfcc: HeaderValue::from_static("By=x;URI=y"),
            app_h2c: false,
        };
        stage.check(&mut req).unwrap();
        let all: Vec<_> = req.headers().get_all(header::COOKIE).iter().collect();
        assert_eq!(all, vec!["a=1; b=2"]);
    }

    #[test]
    fn the_app_sees_one_verified_identity_and_te_trailers_only_over_h2c() {
        let xfcc = HeaderValue::from_static("By=spiffe://td/app;URI=spiffe://td/web");
        for app_h2c in [false, true] {
            let mut req = http::Request::builder()
                .header("x-forwarded-client-cert", "URI=spiffe://td/admin")
                .header("X_Forwarded_Client_Cert", "URI=spiffe://td/admin")
                .header("te", "trailers")
                .body(ReqBody::read(bytes::Bytes::new()))
                .unwrap();
            let stage = IdentityHeader {
                xfcc: xfcc.clone(),
                app_h2c,
            };
            stage.check(&mut req).unwrap();
            let all: Vec<_> = req.headers().get_all(headers::XFCC).iter().collect();
            assert_eq!(all, vec![&xfcc]);
            assert_eq!(req.headers().len(), 1 + usize::from(app_h2c));
            assert_eq!(req.headers().contains_key(header::TE), app_h2c);
        }
    }
}
