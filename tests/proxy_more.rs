//! `warden proxy`: h2 (spoofed headers, multiplexing), TCP outbound,
//! live policy reload, and the identity from a CA that goes down and back.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;

fn creds(ca: &Ca, path: &str) -> Creds {
    Creds {
        dir: ca.issue(&ca.id(path), None),
    }
}

fn sidecar_config(app_creds: &Creds, app: std::net::SocketAddr, rules: &str) -> String {
    format!(
        "{}admin: 127.0.0.1:0\ninbound:\n  - name: app\n    listen: 127.0.0.1:0\n    app: {app}\n    policy:\n      rules:\n{rules}",
        app_creds.identity_yaml()
    )
}

const WEB_ONLY: &str = "        - {name: web, action: allow, from: [spiffe://example.org/web]}\n";

/// GETs over one h2 connection, concurrently; returns (status, body) each.
fn h2_requests(
    addr: std::net::SocketAddr,
    bundle: &str,
    who: &Creds,
    reqs: Vec<http::Request<http_body_util::Full<bytes::Bytes>>>,
) -> Vec<(u16, String)> {
    common::h2::h2_send(addr, bundle, who, reqs)
        .into_iter()
        .map(|a| {
            let (status, _, body) = a.unwrap();
            (status, body)
        })
        .collect()
}

fn get(uri: &str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    http::Request::get(uri)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap()
}

#[test]
fn spoofed_identity_headers_on_h2_never_reach_the_app() {
    let ca = Ca::init("example.org");
    let app = EchoApp::start();
    let proxy = Proxy::start(
        ca.tmp.path(),
        &sidecar_config(&creds(&ca, "/app"), app.addr, WEB_ONLY),
    );
    let web = creds(&ca, "/web");
    let mut req = get("https://app.test/api/x");
    let h = req.headers_mut();
    h.append(
        "x-forwarded-client-cert",
        "By=x;URI=spiffe://example.org/admin".parse().unwrap(),
    );
    h.append(
        "x-forwarded-client-cert",
        "URI=spiffe://example.org/root".parse().unwrap(),
    );
    let out = h2_requests(proxy.addr("app"), &ca.bundle_pem(), &web, vec![req]);
    let (status, body) = &out[0];
    assert_eq!(*status, 200, "{body}");
    let xfcc: Vec<&str> = body
        .lines()
        .filter(|l| {
            l.to_ascii_lowercase()
                .starts_with("x-forwarded-client-cert:")
        })
        .collect();
    assert_eq!(
        xfcc,
        vec!["x-forwarded-client-cert: By=spiffe://example.org/app;URI=spiffe://example.org/web"],
        "{body}"
    );
    assert!(
        body.lines()
            .any(|l| l.eq_ignore_ascii_case("host: app.test")),
        "the app sees the caller's authority: {body}"
    );
}

#[test]
fn many_h2_streams_share_one_connection() {
    let ca = Ca::init("example.org");
    let app = EchoApp::start();
    let proxy = Proxy::start(
        ca.tmp.path(),
        &sidecar_config(&creds(&ca, "/app"), app.addr, WEB_ONLY),
    );
    let web = creds(&ca, "/web");
    let reqs = (0..32)
        .map(|i| get(&format!("https://app.test/item/{i}")))
        .collect();
    let out = h2_requests(proxy.addr("app"), &ca.bundle_pem(), &web, reqs);
    assert_eq!(out.len(), 32);
    for (i, (status, body)) in out.iter().enumerate() {
        assert_eq!(*status, 200);
        assert!(body.starts_with(&format!("GET /item/{i}\n")), "{body}");
    }
    assert_eq!(
        proxy.metric(
            "warden_proxy_connections_opened_total{direction=\"inbound\",listener=\"app\"}"
        ),
        1.0
    );
    assert_eq!(
        proxy.metric(
            "warden_proxy_requests_total{class=\"2xx\",direction=\"inbound\",listener=\"app\"}"
        ),
        32.0
    );
}

#[test]
fn tcp_outbound_reaches_a_tcp_inbound_and_refuses_the_wrong_server() {
    let ca = Ca::init("example.org");
    let echo = tcp_echo();
    let db = creds(&ca, "/db");
    let inbound = format!(
        "{}admin: 127.0.0.1:0\ninbound:\n  - name: db\n    listen: 127.0.0.1:0\n    app: {echo}\n    protocol: tcp\n    policy:\n      rules:\n{WEB_ONLY}",
        db.identity_yaml()
    );
    let server = Proxy::start(ca.tmp.path(), &inbound);
    let web = creds(&ca, "/web");
    let outbound = |server_id: &str| {
        format!(
            "{}admin: 127.0.0.1:0\noutbound:\n  - name: to-db\n    listen: 127.0.0.1:0\n    destination: {}\n    server_id: {server_id}\n    protocol: tcp\n",
            web.identity_yaml(),
            server.addr("db")
        )
    };
    let good = Proxy::start(ca.tmp.path(), &outbound("spiffe://example.org/db"));
    let mut s = std::net::TcpStream::connect(good.addr("to-db")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"hello\n").unwrap();
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello\n");

    let bad = Proxy::start(ca.tmp.path(), &outbound("spiffe://example.org/payments-db"));
    let mut s = std::net::TcpStream::connect(bad.addr("to-db")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(b"hello\n");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(buf.is_empty());
    assert!(wait_for(Duration::from_secs(5), || {
        bad.metric("warden_proxy_rejected_requests_total{direction=\"outbound\",listener=\"to-db\",reason=\"wrong_server_identity\"}") == 1.0
    }));
}

#[test]
fn a_changed_policy_applies_live_and_a_bad_reload_keeps_the_old_one() {
    let ca = Ca::init("example.org");
    let app = EchoApp::start();
    let app_creds = creds(&ca, "/app");
    let path = ca.tmp.path().join("live.yaml");
    std::fs::write(&path, sidecar_config(&app_creds, app.addr, WEB_ONLY)).unwrap();
    let proxy = Proxy::start_file(&path);
    let web = creds(&ca, "/web");
    let api = creds(&ca, "/api");
    let bundle = ca.bundle_pem();
    let status_as = |who: &Creds| {
        mtls_get(
            proxy.addr("app"),
            &bundle,
            Some((&who.chain(), &who.key())),
            "GET",
            "/",
            "",
        )
        .unwrap()
        .0
    };
    assert_eq!((status_as(&web), status_as(&api)), (200, 403));

    // Allow api too, with SIGHUP.
    let both = format!(
        "{WEB_ONLY}        - {{name: api, action: allow, from: [spiffe://example.org/api]}}\n"
    );
    std::fs::write(&path, sidecar_config(&app_creds, app.addr, &both)).unwrap();
    proxy.signal("HUP");
    assert!(wait_for(Duration::from_secs(10), || status_as(&api) == 200));
    assert_eq!(status_as(&web), 200);

    // A broken file: the running policy stays, the failure is counted.
    std::fs::write(
        &path,
        sidecar_config(
            &app_creds,
            app.addr,
            "        - {name: x, action: maybe, from: [spiffe://example.org/web]}\n",
        ),
    )
    .unwrap();
    proxy.signal("HUP");
    assert!(wait_for(Duration::from_secs(10), || proxy
        .metric("warden_proxy_config_reloads_total{result=\"failed\"}")
        >= 1.0));
    assert_eq!((status_as(&web), status_as(&api)), (200, 200));
    assert!(
        proxy.stderr.lock().unwrap().contains("live.yaml:"),
        "the error names the file and line"
    );

    // A change a reload cannot apply is reported, and the policy part still applies.
    let moved = sidecar_config(&app_creds, app.addr, &both)
        .replace(&format!("app: {}", app.addr), "app: 127.0.0.1:9");
    std::fs::write(&path, moved).unwrap();
    proxy.signal("HUP");
    assert!(wait_for(Duration::from_secs(10), || proxy.metric(
        "warden_proxy_config_reloads_total{result=\"restart_required\"}"
    ) >= 1.0));
    assert_eq!(
        status_as(&web),
        200,
        "the app address in force is still the old one"
    );

    // Deny web again by editing the file (no signal: the change is noticed).
    std::fs::write(
        &path,
        sidecar_config(
            &app_creds,
            app.addr,
            "        - {name: api, action: allow, from: [spiffe://example.org/api]}\n",
        ),
    )
    .unwrap();
    assert!(wait_for(Duration::from_secs(10), || status_as(&web) == 403));
    assert_eq!(status_as(&api), 200);
}

#[test]
fn identity_from_the_ca_survives_the_ca_going_down_and_renews_when_it_is_back() {
    let ca = Ca::init("example.org");
    let srv = ca.serve();
    let app = EchoApp::start();
    let token_file = ca.tmp.path().join("token");
    std::fs::write(&token_file, ca.token(&ca.id("/app"))).unwrap();
    // The CA listens on a fixed port across the restart below.
    let api = srv.api;
    let config = format!(
        "identity:\n  ca_url: https://{api}\n  token_file: {}\n  spiffe_id: spiffe://example.org/app\n  bundle: {}\n  ttl: 1m\nadmin: 127.0.0.1:0\ninbound:\n  - name: app\n    listen: 127.0.0.1:0\n    app: {}\n    policy:\n      rules:\n{WEB_ONLY}",
        s(&token_file),
        s(&ca.dir.join("bundle.pem")),
        app.addr
    );
    let proxy = Proxy::start(ca.tmp.path(), &config);
    assert_eq!(proxy.admin_get("/ready").0, 200);
    let web = creds(&ca, "/web");
    let bundle = ca.bundle_pem();
    let call = || {
        mtls_get(
            proxy.addr("app"),
            &bundle,
            Some((&web.chain(), &web.key())),
            "GET",
            "/",
            "",
        )
    };
    assert_eq!(call().unwrap().0, 200);
    let first_expiry = proxy.metric("warden_proxy_certificate_expiry_timestamp_seconds");
    assert!(first_expiry > 0.0);

    // CA down: renewal (due at ~30 s of a 60 s certificate) fails; the proxy keeps serving.
    drop(srv);
    std::thread::sleep(Duration::from_secs(33));
    assert_eq!(
        call().unwrap().0,
        200,
        "the current certificate keeps serving"
    );
    assert!(proxy.metric("warden_proxy_certificate_renewals_total{result=\"failed\"}") >= 1.0);

    // CA back on the same port: the next retry renews.
    let back = warden()
        .args([
            "ca",
            "serve",
            "--dir",
            ca.dir(),
            "--listen",
            &api.to_string(),
            "--admin",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _back = Kill(back);
    assert!(wait_for(Duration::from_secs(25), || {
        proxy.metric("warden_proxy_certificate_expiry_timestamp_seconds") > first_expiry
    }));
    assert_eq!(call().unwrap().0, 200);
}

#[test]
fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let ca = Ca::init("example.org");
    let app = EchoApp::start();
    let mut config = sidecar_config(&creds(&ca, "/app"), app.addr, WEB_ONLY);
    config.push_str("    limits:\n      idle_timeout: 1s\n");
    let proxy = Proxy::start(ca.tmp.path(), &config);
    let web = creds(&ca, "/web");
    let mut s = mtls_connect(
        proxy.addr("app"),
        &ca.bundle_pem(),
        Some((&web.chain(), &web.key())),
        &[b"http/1.1"],
    )
    .unwrap();
    assert_eq!(h1_over(&mut s, "GET", "/", "").unwrap().0, 200);
    let start = std::time::Instant::now();
    let mut buf = Vec::new();
    let r = s.read_to_end(&mut buf);
    let idle = start.elapsed();
    assert!(r.is_ok() || buf.is_empty(), "{r:?}");
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_secs(5),
        "closed after {idle:?}"
    );
    assert!(wait_for(Duration::from_secs(5), || proxy.metric(
        "warden_proxy_connections_open{direction=\"inbound\",listener=\"app\"}"
    ) == 0.0));
}

#[test]
fn h2c_from_the_app_rides_one_multiplexed_mtls_connection() {
    use http_body_util::BodyExt;
    let ca = Ca::init("example.org");
    let app = EchoApp::start();
    let server = Proxy::start(
        ca.tmp.path(),
        &sidecar_config(&creds(&ca, "/app"), app.addr, WEB_ONLY),
    );
    let web = creds(&ca, "/web");
    let out = Proxy::start(
        ca.tmp.path(),
        &format!(
            "{}admin: 127.0.0.1:0\noutbound:\n  - name: to-app\n    listen: 127.0.0.1:0\n    destination: {}\n    server_id: spiffe://example.org/app\n",
            web.identity_yaml(),
            server.addr("app")
        ),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = out.addr("to-app");
    let results: Vec<(u16, String)> = rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let mut send = send.clone();
                tokio::spawn(async move {
                    let resp = send
                        .send_request(get(&format!("http://app.test/h2/{i}")))
                        .await
                        .unwrap();
                    let status = resp.status().as_u16();
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    (status, String::from_utf8_lossy(&body).to_string())
                })
            })
            .collect();
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    });
    for (i, (status, body)) in results.iter().enumerate() {
        assert_eq!(*status, 200, "{body}");
        assert!(body.starts_with(&format!("GET /h2/{i}\n")), "{body}");
        assert!(body.contains("URI=spiffe://example.org/web"), "{body}");
    }
    assert_eq!(
        server.metric(
            "warden_proxy_connections_opened_total{direction=\"inbound\",listener=\"app\"}"
        ),
        1.0,
        "one mTLS connection for 16 streams"
    );
}

#[test]
fn an_expired_certificate_fails_closed() {
    let ca = Ca::init("example.org");
    let app = EchoApp::start();
    let app_creds = Creds {
        dir: ca.issue(&ca.id("/app"), Some("3s")),
    };
    let proxy = Proxy::start(
        ca.tmp.path(),
        &sidecar_config(&app_creds, app.addr, WEB_ONLY),
    );
    let web = creds(&ca, "/web");
    let bundle = ca.bundle_pem();
    let call = || {
        mtls_get(
            proxy.addr("app"),
            &bundle,
            Some((&web.chain(), &web.key())),
            "GET",
            "/",
            "",
        )
    };
    assert_eq!(call().unwrap().0, 200);
    assert_eq!(proxy.admin_get("/ready").0, 200);
    assert!(wait_for(Duration::from_secs(10), || proxy
        .admin_get("/ready")
        .0
        == 503));
    assert!(call().is_err(), "no valid certificate: no handshake");
    assert!(wait_for(Duration::from_secs(5), || {
        proxy.metric("warden_proxy_certificate_expiry_timestamp_seconds") == 0.0
    }));
}

/// An app that speaks only h2c (prior knowledge) and answers with the
/// version, path and identity header it received.
fn h2c_app() -> std::net::SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            loop {
                let (s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        |req: http::Request<hyper::body::Incoming>| async move {
                            let xfcc = req
                                .headers()
                                .get_all("x-forwarded-client-cert")
                                .iter()
                                .map(|v| v.to_str().unwrap_or("").to_owned())
                                .collect::<Vec<_>>()
                                .join(" | ");
                            let body =
                                format!("{:?} {}\n{xfcc}\n", req.version(), req.uri().path());
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from(body)),
                            ))
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
                });
            }
        });
    });
    rx.recv().unwrap()
}

#[test]
fn an_h2c_app_gets_h2_with_the_verified_identity() {
    let ca = Ca::init("example.org");
    let app = h2c_app();
    let mut config = sidecar_config(&creds(&ca, "/app"), app, WEB_ONLY);
    config = config.replace(
        &format!("    app: {app}\n"),
        &format!("    app: {app}\n    app_h2c: true\n"),
    );
    let proxy = Proxy::start(ca.tmp.path(), &config);
    let web = creds(&ca, "/web");
    let spoof = "x-forwarded-client-cert: URI=spiffe://example.org/admin\r\n";
    let (status, body) = mtls_get(
        proxy.addr("app"),
        &ca.bundle_pem(),
        Some((&web.chain(), &web.key())),
        "GET",
        "/a/./b",
        spoof,
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        "HTTP/2.0 /a/b\nBy=spiffe://example.org/app;URI=spiffe://example.org/web\n"
    );
}
