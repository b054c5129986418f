//! `warden proxy`, the request stack end to end: header limits (431), the
//! app and destination timeouts (504), answers held in flight until their body ends, typed
//! refusals for gRPC callers, early answers a real client reads, the access
//! log, and the process metrics.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;

use common::h2::h2_send;
use common::*;

fn creds(ca: &Ca, path: &str) -> Creds {
    Creds {
        dir: ca.issue(&ca.id(path), None),
    }
}

const RULES: &str = "    policy:
      rules:
        - {name: web, action: allow, from: [spiffe://example.org/web]}
        - {name: no-admin, action: deny, from: [spiffe://example.org/*], paths: [/admin/*]}
";

struct Mesh {
    ca: Ca,
    proxy: Proxy,
    web: Creds,
}

fn mesh(app: SocketAddr, limits: &str, env: &[(&str, &str)]) -> Mesh {
    let ca = Ca::init("example.org");
    let app_creds = creds(&ca, "/app");
    let config = format!(
        "{}admin: 127.0.0.1:0\ninbound:\n  - name: app\n    listen: 127.0.0.1:0\n    app: {app}\n{limits}{RULES}",
        app_creds.identity_yaml()
    );
    let proxy = Proxy::start_env(ca.tmp.path(), &config, env);
    let web = creds(&ca, "/web");
    Mesh { ca, proxy, web }
}

impl Mesh {
    fn tls(&self) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
        mtls_connect(
            self.proxy.addr("app"),
            &self.ca.bundle_pem(),
            Some((&self.web.chain(), &self.web.key())),
            &[b"http/1.1"],
        )
        .unwrap()
    }

    fn get(&self, path: &str) -> (u16, String) {
        h1_over(&mut self.tls(), "GET", path, "").unwrap()
    }

    fn h2(&self, reqs: Vec<http::Request<Full<Bytes>>>) -> Vec<common::h2::H2Answer> {
        h2_send(
            self.proxy.addr("app"),
            &self.ca.bundle_pem(),
            &self.web,
            reqs,
        )
    }
}

fn h2_get(path: &str, headers: &[(String, String)]) -> http::Request<Full<Bytes>> {
    let mut b = http::Request::get(format!("https://app.test{path}"));
    for (n, v) in headers {
        b = b.header(n, v);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

/// An app whose `/big` answers 128 MiB at once, whose `/stream` answers with a head at once, then five chunks
/// 200 ms apart; whose `/hang` never answers; and whose other paths answer
/// `ok` at once.
fn streaming_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut out = stream;
                while let Some((head, _)) = read_request(&mut reader) {
                    let target = head[0].split_whitespace().nth(1).unwrap_or("").to_owned();
                    if target == "/hang" {
                        std::thread::sleep(Duration::from_secs(30));
                        return;
                    }
                    if target == "/big" {
                        // More than every socket buffer on the way can hold
                        // (Linux autotunes a receive buffer up to 32 MiB).
                        let chunk = vec![b'x'; 1 << 20];
                        let _ = write!(
                            out,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                            128 << 20
                        );
                        for _ in 0..128 {
                            if out.write_all(&chunk).is_err() {
                                return;
                            }
                        }
                        continue;
                    }
                    if target == "/stream" {
                        let _ = out.write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
                        );
                        for i in 0..5 {
                            std::thread::sleep(Duration::from_millis(200));
                            let event = format!("data: {i}\n\n");
                            let _ = write!(out, "{:x}\r\n{event}\r\n", event.len());
                            let _ = out.flush();
                        }
                        let _ = out.write_all(b"0\r\n\r\n");
                        continue;
                    }
                    let _ = out.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                }
            });
        }
    });
    addr
}

#[test]
fn oversized_header_sections_get_431_on_http1_and_h2() {
    let app = EchoApp::start();
    let m = mesh(app.addr, "", &[]);
    // One 12 KiB header.
    let big = format!("x-big: {}\r\n", "a".repeat(12 * 1024));
    let (status, body) = h1_over(&mut m.tls(), "GET", "/ok", &big).unwrap();
    assert_eq!(status, 431, "{body}");
    assert!(body.contains("headers-too-large"), "{body}");
    // 64 headers of 1 KiB, written in pieces.
    let mut s = m.tls();
    write!(s, "GET /ok HTTP/1.1\r\nHost: app.test\r\n").unwrap();
    for i in 0..64 {
        write!(s, "x-h{i}: {}\r\n", "b".repeat(1024)).unwrap();
        s.flush().unwrap();
    }
    write!(s, "\r\n").unwrap();
    s.flush().unwrap();
    let (status, _) = read_h1_response(&mut s).unwrap();
    assert_eq!(status, 431);
    // The same two over h2.
    let one = vec![("x-big".to_owned(), "a".repeat(12 * 1024))];
    let many: Vec<_> = (0..64)
        .map(|i| (format!("x-h{i}"), "b".repeat(1024)))
        .collect();
    let out = m.h2(vec![h2_get("/ok", &one), h2_get("/ok", &many)]);
    for answer in out {
        let (status, _, body) = answer.unwrap();
        assert_eq!(status, 431, "{body}");
    }
    // A normal request still passes, and the app never saw the others.
    assert_eq!(m.get("/ok").0, 200);
    assert_eq!(
        m.proxy.metric(
            "warden_proxy_rejected_requests_total{direction=\"inbound\",listener=\"app\",reason=\"headers_too_large\"}"
        ),
        4.0
    );
}

#[test]
fn a_hung_app_is_answered_504_within_the_timeout_while_other_requests_flow() {
    let app = streaming_app();
    let m = mesh(
        app,
        "    limits: {response_timeout: 500ms, max_requests_in_flight: 2}\n",
        &[],
    );
    let start = Instant::now();
    let hung: Vec<_> = (0..2)
        .map(|_| {
            let mut s = m.tls();
            std::thread::spawn(move || h1_over(&mut s, "GET", "/hang", "").unwrap())
        })
        .collect();
    for h in hung {
        let (status, body) = h.join().unwrap();
        assert_eq!(status, 504, "{body}");
        assert!(body.contains("app-timeout"), "{body}");
    }
    assert!(start.elapsed() < Duration::from_secs(10));
    // Their slots are free again: the listener is not stuck at its limit.
    for _ in 0..3 {
        assert_eq!(m.get("/fine"), (200, "ok".into()));
    }
}

#[test]
fn an_outbound_destination_that_sends_no_head_is_answered_504_within_its_timeout() {
    let app = streaming_app();
    let m = mesh(app, "    limits: {response_timeout: 5s}\n", &[]);
    let config = format!(
        "{}admin: 127.0.0.1:0\noutbound:\n  - name: to-app\n    listen: 127.0.0.1:0\n    destination: {}\n    server_id: spiffe://example.org/app\n    limits: {{response_timeout: 300ms}}\n",
        m.web.identity_yaml(),
        m.proxy.addr("app")
    );
    let out = Proxy::start(m.ca.tmp.path(), &config);
    let start = Instant::now();
    let (status, body) = plain_get(out.addr("to-app"), "/hang").unwrap();
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("upstream-timeout"), "{body}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "the outbound's own timeout answered"
    );
    assert_eq!(
        plain_get(out.addr("to-app"), "/fine").unwrap(),
        (200, "ok".into())
    );
    assert_eq!(
        out.metric(
            "warden_proxy_rejected_requests_total{direction=\"outbound\",listener=\"to-app\",reason=\"upstream_timeout\"}"
        ),
        1.0
    );
}

#[test]
fn a_streamed_answer_counts_in_flight_until_its_last_byte() {
    let app = streaming_app();
    let m = mesh(app, "    limits: {max_requests_in_flight: 1}\n", &[]);
    let mut s = m.tls();
    write!(s, "GET /stream HTTP/1.1\r\nHost: app.test\r\n\r\n").unwrap();
    s.flush().unwrap();
    // The head arrives at once; the body takes a second.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 200"));
    let (status, body) = m.get("/other");
    assert_eq!(status, 503, "the stream still holds the only slot: {body}");
    assert!(body.contains("overloaded"), "{body}");
    // Read the stream to its end; then the slot is free.
    let mut rest = Vec::new();
    while !rest.ends_with(b"0\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        rest.push(byte[0]);
    }
    assert!(String::from_utf8_lossy(&rest).contains("data: 4"));
    assert!(wait_for(Duration::from_secs(5), || m.get("/other").0 == 200));
    // The latency histogram measured the whole stream, not the head.
    let slowest = m.proxy.metric(
        "warden_proxy_request_duration_seconds_bucket{direction=\"inbound\",listener=\"app\",le=\"0.5\"}",
    );
    let total = m.proxy.metric(
        "warden_proxy_request_duration_seconds_count{direction=\"inbound\",listener=\"app\"}",
    );
    assert_eq!(total - slowest, 1.0, "exactly the stream took over 0.5 s");
}

#[test]
fn a_caller_that_stops_reading_idles_out_and_gives_its_slot_back() {
    let app = streaming_app();
    let m = mesh(
        app,
        "    limits: {max_requests_in_flight: 1, idle_timeout: 2s}\n",
        &[],
    );
    let mut s = m.tls();
    write!(s, "GET /big HTTP/1.1\r\nHost: app.test\r\n\r\n").unwrap();
    s.flush().unwrap();
    // The answer has started (reading drives the client's TLS handshake to
    // its end: until then the request may sit in the client's buffer).
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    // It never reads the 128 MiB: the answer stalls on it, not on the app.
    assert!(
        wait_for(Duration::from_secs(5), || m.get("/other").0 == 503),
        "the stalled answer holds the slot"
    );
    assert!(
        wait_for(Duration::from_secs(10), || m.get("/other").0 == 200),
        "the stalled connection idled out and freed its slot"
    );
    drop(s);
}

#[test]
fn a_grpc_caller_is_refused_with_a_grpc_status() {
    let app = EchoApp::start();
    let m = mesh(app.addr, "", &[]);
    let req = http::Request::post("https://app.test/admin/Service/Method")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let (status, headers, _) = m.h2(vec![req]).remove(0).unwrap();
    assert_eq!(status, 200, "gRPC carries its status in grpc-status");
    assert_eq!(
        headers["grpc-status"], "7",
        "PERMISSION_DENIED: {headers:?}"
    );
    assert!(headers.contains_key("grpc-message"));
    assert_eq!(headers["content-type"], "application/grpc");
}

#[test]
fn curl_over_h2_reads_a_403_for_a_denied_post_with_a_body() {
    let app = EchoApp::start();
    let m = mesh(app.addr, "", &[]);
    let dir = &m.web.dir;
    let body = dir.join("body.json");
    std::fs::write(&body, "x".repeat(20_000)).unwrap();
    let url = format!(
        "https://127.0.0.1:{}/admin/users",
        m.proxy.addr("app").port()
    );
    for attempt in 0..7 {
        let out = Command::new("curl")
            .args([
                "--http2",
                "-sS",
                "-k",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .args(["--cert", s(&dir.join("cert.pem"))])
            .args(["--key", s(&dir.join("key.pem"))])
            .args(["-X", "POST", "--data-binary"])
            .arg(format!("@{}", s(&body)))
            .arg(&url)
            .output()
            .expect("curl is installed (.ci/run installs it)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "attempt {attempt}: {stderr}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "403", "{stderr}");
    }
}

#[test]
fn every_request_writes_one_json_access_log_line() {
    let app = EchoApp::start();
    let m = mesh(app.addr, "", &[("WARDEN_LOG_FORMAT", "json")]);
    assert_eq!(m.get("/api/a/./b?secret=1").0, 200);
    assert_eq!(m.get("/admin/x").0, 403);
    let mut lines = Vec::new();
    assert!(wait_for(Duration::from_secs(5), || {
        lines = m
            .proxy
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "warden::access")
            .collect();
        lines.len() == 2
    }));
    let allowed = &lines[0]["fields"];
    assert_eq!(allowed["peer"], "spiffe://example.org/web");
    assert_eq!(allowed["method"], "GET");
    assert_eq!(
        allowed["path"], "/api/a/b",
        "the path as authorized, no query"
    );
    assert_eq!(allowed["status"], 200);
    assert_eq!(allowed["rule"], "web");
    assert_eq!(allowed["listener"], "app");
    assert_eq!(allowed["direction"], "inbound");
    assert!(allowed["bytes"].as_u64().unwrap() > 0);
    assert!(allowed["duration_ms"].as_f64().is_some());
    let denied = &lines[1]["fields"];
    assert_eq!(denied["status"], 403);
    assert_eq!(denied["reason"], "forbidden");
}

#[test]
fn metrics_carry_the_process_family_and_the_build_info() {
    let app = EchoApp::start();
    let m = mesh(app.addr, "", &[]);
    let (_, text) = m.proxy.admin_get("/metrics");
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
    assert_eq!(
        m.proxy.metric(&format!(
            "warden_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
}
