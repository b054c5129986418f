//! The path stage: the request's path is normalized (see `warden_config::normalize`
//! for the rules) and replaced by the normal form, so every later stage
//! matches, and the app receives, one spelling. A path that cannot be made
//! unambiguous is refused (400). The query is kept as sent and never matched.

use std::borrow::Cow;

use http::Uri;
use http::uri::{Parts, PathAndQuery};

use crate::respond::Refusal;
use crate::stack::{Check, Req};
use warden_config::normalize::normalize;

/// See the module docs.
#[derive(Debug, Clone, Copy)]
pub struct NormalizePath;

impl Check for NormalizePath {
    fn check(&self, req: &mut Req) -> Result<(), Refusal> {
        let uri = req.uri();
        // Already normal: the request's own bytes stay, no copy.
        let text = match normalize(uri.path()).map_err(|_| Refusal::BadPath)? {
            Cow::Borrowed(_) if uri.scheme().is_none() && uri.authority().is_none() => {
                return Ok(());
            }
            Cow::Borrowed(p) => match uri.query() {
                Some(q) => format!("{p}?{q}"),
                None => p.to_owned(),
            },
            Cow::Owned(p) => match uri.query() {
                Some(q) => format!("{p}?{q}"),
                None => p,
            },
        };
        // An absolute-form target (`GET http://host/x`) keeps its authority
        // for the Host header (the app stage reads it), never for routing.
        let mut parts = Parts::default();
        parts.path_and_query = Some(PathAndQuery::try_from(text).map_err(|_| Refusal::BadPath)?);
        if let Some(a) = uri.authority()
            && !req.headers().contains_key(http::header::HOST)
            && let Ok(h) = http::HeaderValue::from_str(a.as_str())
        {
            req.headers_mut().insert(http::header::HOST, h);
        }
        *req.uri_mut() = Uri::from_parts(parts).map_err(|_| Refusal::BadPath)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::ReqBody;

    fn checked(target: &str) -> Result<Req, Refusal> {
        let mut req = http::Request::builder()
            .uri(target)
            .body(ReqBody::read(bytes::Bytes::new()))
            .unwrap();
        NormalizePath.check(&mut req).map(|()| req)
    }

    #[test]
    fn later_stages_see_the_normal_path_and_the_query_as_sent() {
        let r = checked("/a/./b/../c?x=%2e").unwrap();
        assert_eq!(r.uri(), "/a/c?x=%2e");
        assert_eq!(checked("/a/b").unwrap().uri(), "/a/b");
        assert!(matches!(
            checked("/a/%2e%2e/%2e%2e/x"),
            Err(Refusal::BadPath)
        ));
    }

    #[test]
    fn an_absolute_form_target_keeps_its_authority_only_as_host() {
        let r = checked("http://evil.test/admin/../x").unwrap();
        assert_eq!(r.uri(), "/x");
        assert_eq!(r.headers()[http::header::HOST], "evil.test");
    }
}
