//! Request limits that need no state: the header section's size, line
//! length and count (431, on HTTP/1.1 and h2 alike: hyper's own bounds sit
//! above these as a memory backstop), and the method (400 for one spelled in
//! lower case, which apps disagree on; 405 for CONNECT, which is not proxied).

use http::Method;

use warden_config::proxy::Limits;

use crate::respond::Refusal;
use crate::stack::{Check, Req};

/// The per-request bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    max_bytes: usize,
    max_line: usize,
    max_count: usize,
}

impl RequestLimits {
    /// From the listener's `limits`.
    pub fn new(l: &Limits) -> Self {
        Self {
            max_bytes: l.max_header_bytes,
            max_line: l.max_header_line_bytes,
            max_count: l.max_headers,
        }
    }
}

impl Check for RequestLimits {
    fn check(&self, req: &mut Req) -> Result<(), Refusal> {
        let headers = req.headers();
        if headers.len() > self.max_count {
            return Err(Refusal::HeadersTooLarge {
                what: "header_count",
            });
        }
        // As HTTP/1.1 spells it: the request line, then `name: value\r\n` each.
        // An authority (h2's `:authority`, an absolute-form target) counts:
        // it becomes the Host the app sees.
        let uri = req.uri();
        let mut total = uri.path_and_query().map_or(1, |pq| pq.as_str().len())
            + uri.authority().map_or(0, |a| a.as_str().len())
            + 16;
        if uri
            .authority()
            .is_some_and(|a| a.as_str().len() + 6 > self.max_line)
        {
            return Err(Refusal::HeadersTooLarge {
                what: "header_line",
            });
        }
        for (name, value) in headers {
            let line = name.as_str().len() + value.len() + 4;
            if line > self.max_line {
                return Err(Refusal::HeadersTooLarge {
                    what: "header_line",
                });
            }
            total += line;
        }
        if total > self.max_bytes {
            return Err(Refusal::HeadersTooLarge {
                what: "header_bytes",
            });
        }
        let method = req.method();
        if *method == Method::CONNECT {
            return Err(Refusal::MethodNotAllowed);
        }
        if method.as_str().bytes().any(|b| b.is_ascii_lowercase()) {
            return Err(Refusal::BadMethod);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::ReqBody;

    fn req(headers: &[(&str, String)]) -> Req {
        let mut b = http::Request::builder().uri("/x");
        for (n, v) in headers {
            b = b.header(*n, v.as_str());
        }
        b.body(ReqBody::read(bytes::Bytes::new())).unwrap()
    }

    #[test]
    fn defaults_refuse_what_nginx_refuses() {
        let l = RequestLimits::new(&Limits::default());
        assert!(l.check(&mut req(&[("a", "x".repeat(8000))])).is_ok());
        let one_big = l.check(&mut req(&[("a", "x".repeat(12 * 1024))]));
        assert!(matches!(
            one_big,
            Err(Refusal::HeadersTooLarge {
                what: "header_line"
            })
        ));
        let many: Vec<_> = (0..64)
            .map(|i| ("x-h", format!("{i}{}", "v".repeat(1024))))
            .collect();
        assert!(matches!(
            l.check(&mut req(&many)),
            Err(Refusal::HeadersTooLarge {
                what: "header_bytes"
            })
        ));
        let count: Vec<_> = (0..101).map(|i| ("x-h", i.to_string())).collect();
        assert!(matches!(
            l.check(&mut req(&count)),
            Err(Refusal::HeadersTooLarge {
                what: "header_count"
            })
        ));
    }
}
