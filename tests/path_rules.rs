//! Path rules end to end: a spelling of a path that some app server reads
//! as another path is refused (400) or reaches the app as exactly the path
//! that was authorized, over HTTP/1.1 (hand-written request lines, so nothing
//! normalizes before warden) and h2.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::io::Write;

use common::*;

/// A CA, an echo app behind two listeners, and a caller's credentials.
/// `open` allows everything but `/admin/*` and `/v1/items:purge`;
/// `closed` allows only `/public/*`.
struct Mesh {
    ca: Ca,
    _app: EchoApp,
    proxy: Proxy,
    web: Creds,
}

fn creds(ca: &Ca, path: &str) -> Creds {
    Creds {
        dir: ca.issue(&ca.id(path), None),
    }
}

fn mesh() -> Mesh {
    let ca = Ca::init("example.org");
    let app = EchoApp::start();
    let own = creds(&ca, "/app");
    let config = format!(
        "{}admin: 127.0.0.1:0
inbound:
  - name: open
    listen: 127.0.0.1:0
    app: {app}
    policy:
      rules:
        - {{name: everything, action: allow, from: [spiffe://example.org/*], paths: [/*]}}
        - {{name: no-admin, action: deny, from: [spiffe://example.org/*], paths: [/admin/*, \"/v1/items:purge\"]}}
  - name: closed
    listen: 127.0.0.1:0
    app: {app}
    policy:
      rules:
        - {{name: public, action: allow, from: [spiffe://example.org/*], paths: [/public/*]}}
",
        own.identity_yaml(),
        app = app.addr
    );
    let proxy = Proxy::start(ca.tmp.path(), &config);
    let web = creds(&ca, "/web");
    Mesh {
        ca,
        _app: app,
        proxy,
        web,
    }
}

/// What warden must do with a request target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// 400 `bad-path`.
    Refused,
    /// 403: the normalized path is not allowed.
    Denied,
    /// 200, and the app received exactly this target.
    Forwarded(&'static str),
}

use Want::*;

/// True when the listener's policy does not allow `path` (as the app saw it).
fn outside_policy(listener: &str, target: &str) -> bool {
    let path = target.split('?').next().unwrap_or(target);
    let under = |p: &str| path == p || path.starts_with(&format!("{p}/"));
    match listener {
        "open" => under("/admin") || path == "/v1/items:purge",
        _ => !under("/public"),
    }
}

impl Mesh {
    /// One request with a hand-written request line; (status, body).
    fn h1(&self, listener: &str, method: &str, target: &str) -> (u16, String) {
        let (chain, key) = (self.web.chain(), self.web.key());
        let mut s = mtls_connect(
            self.proxy.addr(listener),
            &self.ca.bundle_pem(),
            Some((&chain, &key)),
            &[b"http/1.1"],
        )
        .unwrap();
        h1_over(&mut s, method, target, "")
            .unwrap_or_else(|e| panic!("{method} {target} on {listener}: {e}"))
    }

    /// One GET on a fresh h2 connection, `:path` exactly `target`; (status, body).
    fn h2(&self, listener: &str, target: &str) -> (u16, String) {
        let uri: http::Uri = format!("https://app.test{target}")
            .parse()
            .unwrap_or_else(|e| panic!("{target} cannot be sent over h2: {e}"));
        assert_eq!(
            uri.path_and_query().map(|p| p.as_str()),
            Some(target),
            "the client must send the target as it is"
        );
        let req = http::Request::get(uri)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let answer = common::h2::h2_send(
            self.proxy.addr(listener),
            &self.ca.bundle_pem(),
            &self.web,
            vec![req],
        )
        .remove(0);
        let (status, _, body) = answer.unwrap_or_else(|e| panic!("h2 {target} on {listener}: {e}"));
        (status, body)
    }

    /// Sends each target over HTTP/1.1 and, when `h2`, over h2, and checks
    /// the answer against what is wanted.
    fn check(&self, listener: &str, h2: bool, cases: &[(&str, Want)]) {
        for &(target, want) in cases {
            let mut sent = vec![("h1", self.h1(listener, "GET", target))];
            if h2 {
                sent.push(("h2", self.h2(listener, target)));
            }
            for (proto, (status, body)) in sent {
                let what = format!("{proto} {listener} {target}: {status} {body}");
                if status == 200 {
                    let seen = body
                        .lines()
                        .next()
                        .and_then(|l| l.strip_prefix("GET "))
                        .unwrap_or_else(|| panic!("not from the app: {what}"));
                    assert!(
                        !outside_policy(listener, seen),
                        "the app acted on a path the policy does not allow: {what}"
                    );
                }
                match want {
                    Refused => assert!(
                        status == 400 && body.contains("urn:warden:problem:bad-path"),
                        "wanted 400 bad-path: {what}"
                    ),
                    Denied => assert!(
                        status == 403 && body.contains("urn:warden:problem:forbidden"),
                        "wanted 403: {what}"
                    ),
                    Forwarded(path) => assert!(
                        status == 200 && body.starts_with(&format!("GET {path}\n")),
                        "wanted the app to see {path}: {what}"
                    ),
                }
            }
        }
    }
}

#[test]
fn a_matrix_parameter_cannot_reach_a_denied_path() {
    let m = mesh();
    let cases = [
        ("/admin;x", Refused),
        ("/admin;x/users", Refused),
        ("/admin/users;x", Refused),
        ("/admin;jsessionid=0123/users", Refused),
        ("/public/..;/admin", Refused),
        ("/public/..;/admin/users", Refused),
        ("/public/.;/../admin", Refused),
        ("/public/x;/../../admin", Refused),
        ("//;x/admin", Refused),
        ("/;x/admin", Refused),
        ("/public/%2e%2e;/admin", Refused),
        ("/public/%2E.;x/admin", Refused),
        ("/admin%3Bx", Refused),
        ("/admin%3bx/users", Refused),
        ("/public/..%3B/admin", Refused),
        ("/public/x;", Refused),
        ("/public/x", Forwarded("/public/x")),
    ];
    m.check("open", true, &cases);
    m.check("closed", true, &cases);
    m.check(
        "open",
        true,
        &[("/admin", Denied), ("/admin/users", Denied)],
    );
}

#[test]
fn dot_segments_in_any_spelling_are_resolved_before_matching_and_the_app_gets_the_result() {
    let m = mesh();
    m.check(
        "open",
        true,
        &[
            ("/public/../admin", Denied),
            ("/public/%2e%2e/admin", Denied),
            ("/public/.%2E/admin/x", Denied),
            ("/public/%2e/../admin", Denied),
            ("//admin", Denied),
            ("/public//..//admin", Denied),
            ("/%61dmin", Denied),
            ("/public/x/../y", Forwarded("/public/y")),
            ("/admin/../public/x", Forwarded("/public/x")),
            ("/public/./x//y/", Forwarded("/public/x/y/")),
            ("/public/x/..", Refused),
            ("/public/.", Refused),
            ("/../admin", Refused),
            ("/public/../../admin", Refused),
        ],
    );
    m.check(
        "closed",
        true,
        &[
            ("/public/../admin", Denied),
            ("/public/%2e%2e/admin", Denied),
            ("/public/x/../y", Forwarded("/public/y")),
            ("/admin/../public/x", Forwarded("/public/x")),
            ("/%70ublic/x", Forwarded("/public/x")),
        ],
    );
}

#[test]
fn encoded_separators_double_encoding_and_overlong_utf8_are_refused() {
    let m = mesh();
    let cases = [
        ("/public/..%2Fadmin", Refused),
        ("/public/..%2fadmin", Refused),
        ("/admin%2Fusers", Refused),
        ("/public/..%5Cadmin", Refused),
        ("/public\\..\\admin", Refused),
        ("/public/%00/../admin", Refused),
        ("/public/%252e%252e/admin", Refused),
        ("/public/%25%32%65%25%32%65/admin", Refused),
        ("/public/%252F..%252Fadmin", Refused),
        ("/public/%c0%ae%c0%ae/admin", Refused),
        ("/public/%e0%80%ae%e0%80%ae/admin", Refused),
        ("/public/%c0%af../admin", Refused),
        ("/%u0061dmin", Refused),
        ("/public/%zz", Refused),
    ];
    m.check("open", true, &cases);
    m.check("closed", true, &cases);
}

#[test]
fn look_alike_characters_and_windows_aliases_are_refused() {
    let m = mesh();
    let cases = [
        ("/public/%EF%BC%8E%EF%BC%8E/admin", Refused),
        ("/public%EF%BC%8F..%EF%BC%8Fadmin", Refused),
        ("/public/\u{FF0E}\u{FF0E}/admin", Refused),
        ("/public/%E2%80%A5/admin", Refused),
        ("/admin.", Refused),
        ("/admin./users", Refused),
        ("/admin%2e/users", Refused),
        ("/admin%20/users", Refused),
        ("/admin::$DATA", Refused),
        ("/admin::$INDEX_ALLOCATION/users", Refused),
        ("/admin%3A%3A%24DATA", Refused),
        ("/public/x.", Refused),
    ];
    m.check("open", true, &cases);
    m.check("closed", true, &cases);
}

#[test]
fn encoding_a_character_cannot_dodge_a_rule_because_the_app_gets_one_spelling() {
    let m = mesh();
    m.check(
        "open",
        true,
        &[
            ("/v1/items:purge", Denied),
            ("/v1/items%3Apurge", Denied),
            ("/v1/items%3apurge", Denied),
            ("/v1/%69tems:purge", Denied),
            ("/v1/items%3Alist", Forwarded("/v1/items:list")),
            ("/public/a%40b%2Bc", Forwarded("/public/a@b+c")),
            ("/public/caf%c3%a9", Forwarded("/public/caf%C3%A9")),
            ("/public/x%20y", Forwarded("/public/x%20y")),
            ("/public/50%25", Forwarded("/public/50%25")),
            ("/public/what%3F", Forwarded("/public/what%3F")),
            ("/public/a|b", Forwarded("/public/a%7Cb")),
            ("/admin*", Forwarded("/admin*")),
        ],
    );
    // Raw UTF-8 in a request line is sent as the bytes it is.
    m.check(
        "open",
        false,
        &[("/public/café", Forwarded("/public/caf%C3%A9"))],
    );
}

#[test]
fn an_absolute_form_target_is_matched_on_its_path() {
    let m = mesh();
    m.check(
        "open",
        false,
        &[
            ("http://app.test/admin", Denied),
            ("http://app.test/admin/users", Denied),
            ("http://app.test//admin", Denied),
            ("https://elsewhere.test/public/../admin", Denied),
            ("http://app.test/public/..;/admin", Refused),
            ("http://app.test/admin;x", Refused),
            ("http://app.test/public/x", Forwarded("/public/x")),
        ],
    );
    m.check(
        "closed",
        false,
        &[
            ("http://app.test/admin", Denied),
            ("http://public/admin", Denied),
            ("http://app.test/public/x?y=1", Forwarded("/public/x?y=1")),
        ],
    );
}

#[test]
fn a_fragment_is_cut_off_before_matching_and_never_reaches_the_app() {
    let m = mesh();
    // Go would read `/public/x#/../../admin` as `/admin`: warden forwards
    // only what it matched.
    let cases = [
        ("/public/x#/../../admin", Forwarded("/public/x")),
        ("/public/x#;/../../admin", Forwarded("/public/x")),
        ("/admin#/../public/x", Denied),
    ];
    m.check("open", false, &cases);
    m.check("closed", false, &cases);
}

#[test]
fn the_query_is_passed_on_as_it_is_and_never_matched() {
    let m = mesh();
    m.check(
        "open",
        true,
        &[
            (
                "/public/x?next=/../admin;x",
                Forwarded("/public/x?next=/../admin;x"),
            ),
            ("/public/./x?a=%2F", Forwarded("/public/x?a=%2F")),
            ("/admin?from=/public", Denied),
            ("/public/..;?x", Refused),
        ],
    );
}

#[test]
fn a_refusing_match_ignores_case_and_a_trailing_slash_and_an_allowing_one_does_not() {
    let m = mesh();
    m.check(
        "closed",
        true,
        &[
            ("/PUBLIC/x", Denied),
            ("/Public/x", Denied),
            ("/ADMIN", Denied),
        ],
    );
    // An app that folds case (Express's default router, IIS) would serve
    // `/admin` here: the deny rule reads paths widely.
    m.check(
        "open",
        true,
        &[
            ("/ADMIN/users", Denied),
            ("/Admin", Denied),
            ("/v1/items:purge/", Denied),
            ("/V1/ITEMS:PURGE", Denied),
        ],
    );
}

#[test]
fn an_asterisk_target_is_not_a_path() {
    let m = mesh();
    for listener in ["open", "closed"] {
        for method in ["OPTIONS", "GET"] {
            let (status, body) = m.h1(listener, method, "*");
            assert!(
                status == 400 && body.contains("bad-path"),
                "{method} * on {listener}: {status} {body}"
            );
        }
    }
    let mut s = mtls_connect(
        m.proxy.addr("open"),
        &m.ca.bundle_pem(),
        Some((&m.web.chain(), &m.web.key())),
        &[b"http/1.1"],
    )
    .unwrap();
    // A request line with a space in the target is split by the parser.
    write!(s, "GET /public/x /../../admin HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    let got = read_h1_response(&mut s);
    assert!(
        matches!(got, Ok((400, _)) | Err(_)),
        "a space in the target: {got:?}"
    );
}
