//! `warden proxy`: inbound mTLS, authorization, identity header, TCP mode,
//! outbound with secure naming, SIGTERM drain, file rotation.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;

/// A CA, an echo app, a sidecar in front of it, and credentials for callers.
struct Mesh {
    ca: Ca,
    app: EchoApp,
    proxy: Proxy,
    web: Creds,
    intruder: Creds,
}

const POLICY: &str = "    policy:
      rules:
        - name: web-api
          action: allow
          from: [spiffe://example.org/ns/shop/sa/web]
          methods: [GET, POST]
          paths: [/api/*, /slow]
        - name: no-admin
          action: deny
          from: [spiffe://example.org/*]
          paths: [/api/admin/*]
";

fn creds(ca: &Ca, path: &str) -> Creds {
    Creds {
        dir: ca.issue(&ca.id(path), None),
    }
}

fn mesh_with(extra_inbound: &str, mode: &str) -> Mesh {
    let ca = Ca::init("example.org");
    let app = EchoApp::start();
    let app_creds = creds(&ca, "/ns/shop/sa/app");
    let policy = POLICY.replace("      rules:", &format!("      mode: {mode}\n      rules:"));
    let config = format!(
        "{}admin: 127.0.0.1:0\ninbound:\n  - name: app\n    listen: 127.0.0.1:0\n    app: {}\n{policy}{extra_inbound}",
        app_creds.identity_yaml(),
        app.addr
    );
    let proxy = Proxy::start(ca.tmp.path(), &config);
    let web = creds(&ca, "/ns/shop/sa/web");
    let intruder = creds(&ca, "/ns/bank/sa/intruder");
    Mesh {
        ca,
        app,
        proxy,
        web,
        intruder,
    }
}

fn mesh() -> Mesh {
    mesh_with("", "enforce")
}

impl Mesh {
    fn get_as(
        &self,
        who: &Creds,
        method: &str,
        path: &str,
        extra: &str,
    ) -> std::io::Result<(u16, String)> {
        mtls_get(
            self.proxy.addr("app"),
            &self.ca.bundle_pem(),
            Some((&who.chain(), &who.key())),
            method,
            path,
            extra,
        )
    }
}

fn header_lines<'a>(body: &'a str, name: &str) -> Vec<&'a str> {
    body.lines()
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(n, _)| n.eq_ignore_ascii_case(name))
        })
        .collect()
}

#[test]
fn an_allowed_caller_reaches_the_app_which_sees_its_verified_identity() {
    let m = mesh();
    let (status, body) = m.get_as(&m.web, "GET", "/api/items?x=1", "").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("GET /api/items?x=1\n"), "{body}");
    assert_eq!(
        header_lines(&body, "x-forwarded-client-cert"),
        vec![
            "x-forwarded-client-cert: By=spiffe://example.org/ns/shop/sa/app;URI=spiffe://example.org/ns/shop/sa/web"
        ]
    );
    assert_eq!(
        m.proxy.metric(
            "warden_proxy_authz_decisions_total{listener=\"app\",result=\"allow\",rule=\"web-api\"}"
        ),
        1.0
    );
    assert_eq!(
        m.proxy.metric(
            "warden_proxy_requests_total{class=\"2xx\",direction=\"inbound\",listener=\"app\"}"
        ),
        1.0
    );
    let _ = &m.app;
}

#[test]
fn a_caller_without_a_matching_rule_gets_403_problem_json() {
    let m = mesh();
    let (status, body) = m.get_as(&m.intruder, "GET", "/api/items", "").unwrap();
    assert_eq!(status, 403);
    assert!(body.contains("urn:warden:problem:forbidden"), "{body}");
    let (status, _) = m.get_as(&m.web, "DELETE", "/api/items", "").unwrap();
    assert_eq!(status, 403, "method not allowed by the rule");
    let (status, _) = m.get_as(&m.web, "GET", "/other", "").unwrap();
    assert_eq!(status, 403, "path not allowed by the rule");
    let (status, _) = m.get_as(&m.web, "GET", "/api/admin/users", "").unwrap();
    assert_eq!(status, 403, "deny wins over allow");
    assert_eq!(
        m.proxy.metric(
            "warden_proxy_authz_decisions_total{listener=\"app\",result=\"deny\",rule=\"default\"}"
        ),
        3.0
    );
    assert_eq!(
        m.proxy.metric(
            "warden_proxy_authz_decisions_total{listener=\"app\",result=\"deny\",rule=\"no-admin\"}"
        ),
        1.0
    );
}

#[test]
fn paths_are_normalized_before_authorization_and_the_app_sees_the_authorized_path() {
    let m = mesh();
    let (status, _) = m
        .get_as(&m.web, "GET", "/api/../api/admin/users", "")
        .unwrap();
    assert_eq!(status, 403);
    let (status, _) = m.get_as(&m.web, "GET", "/api/%61dmin/users", "").unwrap();
    assert_eq!(status, 403);
    let (status, _) = m.get_as(&m.web, "GET", "//api//admin/users", "").unwrap();
    assert_eq!(status, 403);
    let (status, body) = m.get_as(&m.web, "GET", "/api/./x/../items", "").unwrap();
    assert_eq!(status, 200);
    assert!(body.starts_with("GET /api/items\n"), "{body}");
    for bad in ["/api/a%2Fb", "/api/%zz", "/api/..%5c..", "/../api/x"] {
        let (status, body) = m.get_as(&m.web, "GET", bad, "").unwrap();
        assert_eq!(status, 400, "{bad}: {body}");
    }
}

#[test]
fn audit_mode_lets_a_denied_request_through_and_counts_it() {
    let m = mesh_with("", "audit");
    let (status, _) = m.get_as(&m.intruder, "GET", "/api/items", "").unwrap();
    assert_eq!(status, 200);
    assert_eq!(m.proxy.metric("warden_proxy_authz_decisions_total{listener=\"app\",result=\"audit_deny\",rule=\"default\"}"), 1.0);
}

#[test]
fn spoofed_identity_headers_on_http1_never_reach_the_app() {
    let m = mesh();
    let spoof = "X-Forwarded-Client-Cert: By=x;URI=spiffe://example.org/ns/shop/sa/admin\r\n\
                 x-forwarded-client-cert: URI=spiffe://example.org/root\r\n\
                 X-FORWARDED-CLIENT-CERT: URI=spiffe://evil\r\n\
                 X_Forwarded_Client_Cert: URI=spiffe://example.org/underscore\r\n\
                 Connection: keep-alive, x-forwarded-client-cert\r\n";
    let (status, body) = m.get_as(&m.web, "GET", "/api/x", spoof).unwrap();
    assert_eq!(status, 200);
    let xfcc = header_lines(&body, "x-forwarded-client-cert");
    assert_eq!(xfcc.len(), 1, "{body}");
    assert!(
        xfcc[0].ends_with("URI=spiffe://example.org/ns/shop/sa/web"),
        "{body}"
    );
    assert!(
        !body
            .to_ascii_lowercase()
            .contains("connection: keep-alive, x-forwarded"),
        "{body}"
    );
    assert!(
        !body.contains("underscore"),
        "a look-alike spelled with '_' is dropped too: {body}"
    );
}

#[test]
fn no_client_certificate_a_foreign_ca_and_an_expired_certificate_fail_the_handshake() {
    let m = mesh();
    let bundle = m.ca.bundle_pem();
    let addr = m.proxy.addr("app");
    assert!(mtls_get(addr, &bundle, None, "GET", "/api/x", "").is_err());
    let other = Ca::init("example.org");
    let foreign = creds(&other, "/ns/shop/sa/web");
    assert!(
        mtls_get(
            addr,
            &bundle,
            Some((&foreign.chain(), &foreign.key())),
            "GET",
            "/api/x",
            ""
        )
        .is_err()
    );
    let expired = Creds {
        dir: m.ca.issue(&m.ca.id("/ns/shop/sa/web"), Some("1s")),
    };
    std::thread::sleep(Duration::from_millis(2100));
    assert!(
        mtls_get(
            addr,
            &bundle,
            Some((&expired.chain(), &expired.key())),
            "GET",
            "/api/x",
            ""
        )
        .is_err()
    );
    assert!(wait_for(Duration::from_secs(5), || {
        m.proxy.metric(
            "warden_proxy_handshake_failures_total{direction=\"inbound\",listener=\"app\",reason=\"no_client_cert\"}",
        ) == 1.0
            && m.proxy.metric(
                "warden_proxy_handshake_failures_total{direction=\"inbound\",listener=\"app\",reason=\"cert_expired\"}",
            ) == 1.0
    }));
}

#[test]
fn two_uri_sans_or_a_foreign_trust_domain_fail_the_handshake_even_from_our_ca() {
    let m = mesh();
    let bundle = m.ca.bundle_pem();
    let addr = m.proxy.addr("app");
    let web = m.ca.id("/ns/shop/sa/web");
    let (two, two_key) = forge_leaf(
        &m.ca.dir,
        svid_params(&[&web, "spiffe://example.org/ns/shop/sa/admin"]),
    );
    assert!(mtls_get(addr, &bundle, Some((&two, &two_key)), "GET", "/api/x", "").is_err());
    let (td, td_key) = forge_leaf(
        &m.ca.dir,
        svid_params(&["spiffe://evil.org/ns/shop/sa/web"]),
    );
    assert!(mtls_get(addr, &bundle, Some((&td, &td_key)), "GET", "/api/x", "").is_err());
    assert!(wait_for(Duration::from_secs(5), || {
        m.proxy.metric("warden_proxy_handshake_failures_total{direction=\"inbound\",listener=\"app\",reason=\"uri_san_count\"}") == 1.0
            && m.proxy.metric("warden_proxy_handshake_failures_total{direction=\"inbound\",listener=\"app\",reason=\"wrong_trust_domain\"}") == 1.0
    }));
}

#[test]
fn tcp_mode_splices_allowed_callers_and_closes_denied_ones() {
    let ca = Ca::init("example.org");
    let echo = tcp_echo();
    let app = creds(&ca, "/db");
    let config = format!(
        "{}admin: 127.0.0.1:0\ninbound:\n  - name: db\n    listen: 127.0.0.1:0\n    app: {echo}\n    protocol: tcp\n    policy:\n      rules:\n        - {{name: web, action: allow, from: [spiffe://example.org/web]}}\n",
        app.identity_yaml()
    );
    let proxy = Proxy::start(ca.tmp.path(), &config);
    let web = creds(&ca, "/web");
    let other = creds(&ca, "/other");
    let mut s = mtls_connect(
        proxy.addr("db"),
        &ca.bundle_pem(),
        Some((&web.chain(), &web.key())),
        &[],
    )
    .unwrap();
    s.write_all(b"ping\n").unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping\n");

    let mut s = mtls_connect(
        proxy.addr("db"),
        &ca.bundle_pem(),
        Some((&other.chain(), &other.key())),
        &[],
    )
    .unwrap();
    let _ = s.write_all(b"ping\n");
    let mut buf = Vec::new();
    let r = s.read_to_end(&mut buf);
    assert!(buf.is_empty(), "a denied caller gets nothing back: {r:?}");
    assert_eq!(
        proxy.metric(
            "warden_proxy_authz_decisions_total{listener=\"db\",result=\"deny\",rule=\"default\"}"
        ),
        1.0
    );
}

/// A client sidecar with an outbound listener to the mesh's inbound.
fn client_sidecar(m: &Mesh, who: &Creds, server_id: &str, protocol: &str) -> Proxy {
    let config = format!(
        "{}admin: 127.0.0.1:0\noutbound:\n  - name: to-app\n    listen: 127.0.0.1:0\n    destination: {}\n    server_id: {server_id}\n    protocol: {protocol}\n",
        who.identity_yaml(),
        m.proxy.addr("app")
    );
    Proxy::start(m.ca.tmp.path(), &config)
}

#[test]
fn outbound_originates_mtls_and_the_app_sees_the_callers_identity() {
    let m = mesh();
    let out = client_sidecar(&m, &m.web, "spiffe://example.org/ns/shop/sa/app", "http");
    for _ in 0..3 {
        let (status, body) = plain_get(out.addr("to-app"), "/api/items").unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains("URI=spiffe://example.org/ns/shop/sa/web"),
            "{body}"
        );
    }
    // Keep-alive pooling: three requests, one mTLS connection.
    assert_eq!(
        m.proxy.metric(
            "warden_proxy_connections_opened_total{direction=\"inbound\",listener=\"app\"}"
        ),
        1.0
    );
}

#[test]
fn outbound_refuses_a_server_with_the_wrong_identity_with_502() {
    let m = mesh();
    let out = client_sidecar(
        &m,
        &m.web,
        "spiffe://example.org/ns/shop/sa/payments",
        "http",
    );
    let (status, body) = plain_get(out.addr("to-app"), "/api/items").unwrap();
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("wrong-server-identity"), "{body}");
    assert_eq!(
        m.proxy.metric(
            "warden_proxy_requests_total{class=\"2xx\",direction=\"inbound\",listener=\"app\"}"
        ),
        0.0
    );
}

#[test]
fn sigterm_lets_a_slow_request_in_flight_complete_then_exits_0() {
    let mut m = mesh();
    let bundle = m.ca.bundle_pem();
    let (chain, key) = (m.web.chain(), m.web.key());
    let addr = m.proxy.addr("app");
    let slow = std::thread::spawn(move || {
        mtls_get(addr, &bundle, Some((&chain, &key)), "GET", "/slow", "")
    });
    std::thread::sleep(Duration::from_millis(500));
    m.proxy.signal("TERM");
    let (status, _) = slow.join().unwrap().unwrap();
    assert_eq!(status, 200, "the in-flight request completed");
    let code = m.proxy.wait_exit(Duration::from_secs(15)).expect("exited");
    assert_eq!(code.code(), Some(0));
}

#[test]
fn a_rotated_certificate_serves_new_handshakes_with_zero_failed_requests_and_open_connections_stay_up()
 {
    let m = mesh();
    let bundle = m.ca.bundle_pem();
    let mut open = mtls_connect(
        m.proxy.addr("app"),
        &bundle,
        Some((&m.web.chain(), &m.web.key())),
        &[b"http/1.1"],
    )
    .unwrap();
    assert_eq!(h1_over(&mut open, "GET", "/api/1", "").unwrap().0, 200);
    let serial_of = |s: &rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>| {
        s.conn.peer_certificates().unwrap()[0].to_vec()
    };
    let before = serial_of(&open);

    // Steady traffic, a full handshake per request, across the rotation.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, bundle, addr) = (stop.clone(), bundle.clone(), m.proxy.addr("app"));
        let (chain, key) = (m.web.chain(), m.web.key());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match mtls_get(addr, &bundle, Some((&chain, &key)), "GET", "/api/load", "") {
                    Ok((200, _)) => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        })
    };
    std::thread::sleep(Duration::from_millis(300));

    // Rotate the app's certificate files in place.
    let app_dir = m.proxy_creds_dir();
    let fresh = m.ca.issue(&m.ca.id("/ns/shop/sa/app"), None);
    for f in ["key.pem", "cert.pem"] {
        std::fs::copy(fresh.join(f), app_dir.join(f)).unwrap();
    }
    assert!(wait_for(Duration::from_secs(10), || {
        m.proxy
            .metric("warden_proxy_certificate_renewals_total{result=\"ok\"}")
            >= 1.0
    }));
    let mut newer = mtls_connect(
        m.proxy.addr("app"),
        &bundle,
        Some((&m.web.chain(), &m.web.key())),
        &[b"http/1.1"],
    )
    .unwrap();
    assert_eq!(h1_over(&mut newer, "GET", "/api/2", "").unwrap().0, 200);
    assert_ne!(
        serial_of(&newer),
        before,
        "new handshakes get the new certificate"
    );
    assert_eq!(
        h1_over(&mut open, "GET", "/api/3", "").unwrap().0,
        200,
        "the open connection survived"
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.join().unwrap();
    assert!(ok > 10, "steady traffic ran: {ok}");
    assert_eq!(failed, 0, "no request failed during the rotation");
}

impl Mesh {
    /// The directory holding the inbound proxy's own certificate files.
    fn proxy_creds_dir(&self) -> std::path::PathBuf {
        let cfg = std::fs::read_dir(self.ca.tmp.path())
            .unwrap()
            .filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().starts_with("proxy-"))
            .unwrap()
            .path();
        let text = std::fs::read_to_string(cfg).unwrap();
        let cert = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("cert: "))
            .unwrap();
        std::path::Path::new(cert).parent().unwrap().to_path_buf()
    }
}

#[test]
fn check_reports_proxy_config_errors_with_line_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("p.yaml");
    std::fs::write(
        &f,
        "identity: {cert: c.pem, key: k.pem, bundle: b.pem}\nadmin: 127.0.0.1:9901\ninbound:\n  - name: app\n    listen: 127.0.0.1:8443\n    app: 127.0.0.1:8080\n    policy:\n      rules:\n        - {name: r, action: allow, from: [spiffe://Example.org/x]}\n",
    )
    .unwrap();
    let out = run(&["check", "--config", s(&f)]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:9:", f.display())), "{err}");
    let out = run(&["proxy", "--config", s(&f)]);
    assert_eq!(out.status.code(), Some(2), "the proxy refuses to start");
}

#[test]
fn lower_case_methods_and_connect_are_refused_and_head_follows_get_rules() {
    let m = mesh();
    let (status, body) = m.get_as(&m.web, "get", "/api/items", "").unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("bad-method"), "{body}");
    let (status, _) = m.get_as(&m.web, "CONNECT", "/api/items", "").unwrap();
    assert_eq!(status, 405);
    // A HEAD answer has no body: read only its head.
    let mut s = mtls_connect(
        m.proxy.addr("app"),
        &m.ca.bundle_pem(),
        Some((&m.web.chain(), &m.web.key())),
        &[b"http/1.1"],
    )
    .unwrap();
    write!(s, "HEAD /api/items HTTP/1.1\r\nHost: app\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap() == 1 {
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "HEAD is covered by a GET rule: {}",
        String::from_utf8_lossy(&head)
    );
}
