//! `warden proxy`: per-identity request-rate limits on a plain path, with
//! the RateLimit headers, and no way around them by respelling the path,
//! adding headers, opening new connections or switching to h2.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use bytes::Bytes;
use http_body_util::Full;

use common::h2::h2_send;
use common::*;

fn creds(ca: &Ca, path: &str) -> Creds {
    Creds {
        dir: ca.issue(&ca.id(path), None),
    }
}

/// A proxy whose `/limited/*` allows each caller a burst of 3, then one
/// request a minute (so nothing refills during the test).
fn limited() -> (Ca, Proxy, Creds, Creds, EchoApp) {
    let ca = Ca::init("example.org");
    let app = EchoApp::start();
    let config = format!(
        "{}admin: 127.0.0.1:0\ninbound:\n  - name: app\n    listen: 127.0.0.1:0\n    app: {}\n    policy:\n      rules:\n        - {{name: all, action: allow, from: [spiffe://example.org/*]}}\n      rate_limits:\n        - name: limited\n          paths: [/limited/*]\n          identity: {{requests_per_second: 0.0167, burst: 3}}\n",
        creds(&ca, "/app").identity_yaml(),
        app.addr
    );
    let proxy = Proxy::start(ca.tmp.path(), &config);
    let (a, b) = (creds(&ca, "/a"), creds(&ca, "/b"));
    (ca, proxy, a, b, app)
}

/// One request on a fresh connection; the status and the whole raw head.
fn raw(proxy: &Proxy, ca: &Ca, who: &Creds, target: &str, extra: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = mtls_connect(
        proxy.addr("app"),
        &ca.bundle_pem(),
        Some((&who.chain(), &who.key())),
        &[b"http/1.1"],
    )
    .unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: app.test\r\n{extra}Connection: close\r\n\r\n"
    )
    .unwrap();
    s.flush().unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[test]
fn a_caller_over_its_rate_gets_429_with_ratelimit_headers_and_others_do_not() {
    let (ca, proxy, a, b, _app) = limited();
    for i in 0..3 {
        let (status, head) = raw(&proxy, &ca, &a, "/limited/x", "");
        assert_eq!(status, 200, "request {i}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("\r\nratelimit: \"limited-identity\";r="),
            "{head}"
        );
    }
    let (status, head) = raw(&proxy, &ca, &a, "/limited/x", "");
    assert_eq!(status, 429, "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.contains("ratelimit-policy: \"limited-identity\";q=3;w="),
        "{head}"
    );
    assert!(
        lower.contains("\r\nratelimit: \"limited-identity\";r=0;t="),
        "{head}"
    );
    assert!(lower.contains("\r\nretry-after: "), "{head}");
    assert!(head.contains("urn:warden:problem:quota-exceeded"), "{head}");
    // Another caller has its own bucket; other paths are not limited.
    assert_eq!(raw(&proxy, &ca, &b, "/limited/x", "").0, 200);
    assert_eq!(raw(&proxy, &ca, &a, "/free", "").0, 200);
    assert_eq!(
        proxy.metric(
            "warden_proxy_rejected_requests_total{direction=\"inbound\",listener=\"app\",reason=\"rate_limited\"}"
        ),
        1.0
    );
}

#[test]
fn no_path_spelling_header_connection_or_protocol_gets_around_a_rate_limit() {
    let (ca, proxy, a, _b, _app) = limited();
    for _ in 0..3 {
        assert_eq!(raw(&proxy, &ca, &a, "/limited/x", "").0, 200);
    }
    // Each variant is on a new connection; each is refused, or never
    // reaches the app as a limited path.
    let variants = [
        "/limited/y",
        "/limited",
        "//limited/x",
        "/free/../limited/x",
        "/%6cimited/x",
        "/limited;x/y",
        "/limited/./x",
        "http://other.host/limited/x",
    ];
    for target in variants {
        let (status, head) = raw(&proxy, &ca, &a, target, "");
        assert!(status == 429 || status == 400, "{target}: {head}");
    }
    for extra in [
        "X-Forwarded-For: 10.9.9.9\r\n",
        "X-Forwarded-Client-Cert: By=x;URI=spiffe://example.org/b\r\n",
        "Authorization: Bearer other\r\n",
    ] {
        assert_eq!(raw(&proxy, &ca, &a, "/limited/x", extra).0, 429, "{extra}");
    }
    let h2 = h2_send(
        proxy.addr("app"),
        &ca.bundle_pem(),
        &a,
        vec![
            http::Request::get("https://app.test/limited/x")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ],
    );
    assert_eq!(h2[0].as_ref().unwrap().0, 429);
}
