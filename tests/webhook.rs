//! The real `warden webhook` over TLS, as the API server calls it: its
//! certificate (from the warden CA, with the Service's DNS name) verifies
//! for that name, it answers the AdmissionReview of the Kubernetes
//! documentation with a JSONPatch that, applied to the request's object,
//! gives exactly the pod `warden inject` gives; malformed reviews get 400.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConnection, StreamOwned};
use serde_json::{Value, json};

use common::{Ca, Running, metric, s, warden};

const SERVICE: &str = "warden-webhook.warden.svc";
/// The identity of the webhooks these tests start from files.
const WEBHOOK_ID: &str = "spiffe://example.org/ns/warden/sa/webhook";

/// POST to the webhook, verified for `SERVICE` as the API server does.
fn post(addr: std::net::SocketAddr, bundle: &str, path: &str, body: &[u8]) -> (u16, String) {
    common::post_verified(addr, bundle, SERVICE, path, body)
}

/// The example AdmissionReview of the Kubernetes documentation ("Dynamic
/// Admission Control", request), for a pod.
/// The webhook's answer to a review of `pod` (not a dry run) on `path`.
fn answer_to(addr: std::net::SocketAddr, bundle: &str, path: &str, pod: &Value) -> Value {
    let (_, body) = post(
        addr,
        bundle,
        path,
        admission_review(pod, false).to_string().as_bytes(),
    );
    serde_json::from_str(&body).unwrap()
}

fn admission_review(pod: &Value, dry_run: bool) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "web-7d4b9c",
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "014fbff9a07c",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]
            },
            "object": pod,
            "oldObject": null,
            "dryRun": dry_run,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

fn pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web-7d4b9c",
            "namespace": "shop",
            "labels": {"app": "web"},
            // Keys with `/` and `~`: the patch must escape them.
            "annotations": {"example.com/owner~team": "shop", "warden.dev/app-port": "8080"}
        },
        "spec": {
            "serviceAccountName": "web",
            "initContainers": [{"name": "migrate", "image": "shop/migrate:1", "restartPolicy": "Always"}],
            "containers": [{"name": "web", "image": "shop/web:2", "ports": [{"containerPort": 8080}]}],
            "someFieldOfANewerRelease": {"x": 1}
        }
    })
}

/// The CA and `warden webhook` with its certificate for `SERVICE`, plus
/// `extra` flags.
fn start_webhook(extra: &[&str]) -> (Ca, Running) {
    let ca = Ca::init("example.org");
    let out = ca.tmp.path().join("webhook");
    common::issue_webhook_cert(&ca, WEBHOOK_ID, SERVICE, &out, None);
    let hook = common::webhook_from_files(&out, &ca.dir.join("bundle.pem"), extra, true);
    (ca, hook)
}

/// The stock rustls client config the API server's checks amount to: the
/// webhook verified for `SERVICE` against the bundle.
fn tls_config(bundle: &str, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

/// An HTTP/1.1 connection over TLS to the webhook.
fn connect(addr: SocketAddr, bundle: &str) -> StreamOwned<ClientConnection, TcpStream> {
    let conn = ClientConnection::new(
        tls_config(bundle, b"http/1.1"),
        ServerName::try_from(SERVICE).unwrap(),
    )
    .unwrap();
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    StreamOwned::new(conn, sock)
}

#[test]
fn the_webhook_patch_gives_the_same_pod_as_inject_and_malformed_reviews_get_400() {
    let (ca, hook) = start_webhook(&[]);
    let bundle = s(&ca.dir.join("bundle.pem")).to_owned();
    let (api, admin) = (hook.addrs["webhook"], hook.addrs["admin"]);
    let bundle_pem = ca.bundle_pem();

    // Injected: the uid echoed, a JSONPatch.
    let review = admission_review(&pod(), false);
    let (status, body) = post(
        api,
        &bundle_pem,
        "/inject/namespace",
        review.to_string().as_bytes(),
    );
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    let response = &answer["response"];
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut patched = pod();
    json_patch::patch(&mut patched, &patch).unwrap();

    // `warden inject` on the same pod gives the same pod.
    let mut cli = warden()
        .args(["inject", "-f", "-", "--bundle", &bundle])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    cli.stdin
        .take()
        .unwrap()
        .write_all(pod().to_string().as_bytes())
        .unwrap();
    let injected = cli.wait_with_output().unwrap();
    let injected: Value =
        serde_saphyr::from_str(&String::from_utf8(injected.stdout).unwrap()).unwrap();
    assert_eq!(patched, injected);
    assert_eq!(patched["spec"]["initContainers"][0]["name"], "warden-proxy");
    assert_eq!(
        patched["spec"]["initContainers"][1]["restartPolicy"], "Always",
        "unknown-to-structs fields survive"
    );
    assert_eq!(patched["spec"]["someFieldOfANewerRelease"]["x"], 1);
    assert_eq!(
        patched["metadata"]["annotations"]["example.com/owner~team"],
        "shop"
    );
    // The patched pod itself validates (but for the field of a "newer
    // release" this test put there on purpose, which the patch left alone).
    let mut checked = patched.clone();
    checked["spec"]
        .as_object_mut()
        .unwrap()
        .remove("someFieldOfANewerRelease");
    common::kube::validate(ca.tmp.path(), &checked.to_string());

    // A dry run gets the same answer.
    let (_, dry) = post(
        api,
        &bundle_pem,
        "/inject/namespace",
        admission_review(&pod(), true).to_string().as_bytes(),
    );
    let dry: Value = serde_json::from_str(&dry).unwrap();
    assert_eq!(dry["response"]["patch"], response["patch"]);

    // Elsewhere only the pod's own label opts in (selectors see labels):
    // neither no label nor an `enabled` annotation does.
    let mut annotated = pod();
    annotated["metadata"]["annotations"]["warden.dev/inject"] = "enabled".into();
    for unlabelled in [pod(), annotated] {
        let v = answer_to(api, &bundle_pem, "/inject/pod", &unlabelled);
        assert_eq!(v["response"]["allowed"], true);
        assert!(v["response"].get("patch").is_none(), "{v}");
    }

    // A pod that cannot be injected is allowed, with a warning.
    let mut host = pod();
    host["spec"]["hostNetwork"] = true.into();
    let v = answer_to(api, &bundle_pem, "/inject/namespace", &host);
    assert_eq!(v["response"]["allowed"], true);
    assert!(
        v["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("hostNetwork"),
        "{v}"
    );

    // A pod asked to be protected whose annotations cannot work is
    // refused, never admitted unprotected.
    let mut bad = pod();
    bad["metadata"]["annotations"]["warden.dev/proxy-memory-limit"] = "lots".into();
    let v = answer_to(api, &bundle_pem, "/inject/namespace", &bad);
    assert_eq!(v["response"]["allowed"], false, "{v}");
    assert!(
        v["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("resource quantity"),
        "{v}"
    );

    // Elsewhere the label routes a pod here (selectors see labels); the
    // `disabled` annotation still opts it out.
    let mut labelled = pod();
    labelled["metadata"]["labels"]["warden.dev/inject"] = "enabled".into();
    let v = answer_to(api, &bundle_pem, "/inject/pod", &labelled);
    assert_eq!(v["response"]["patchType"], "JSONPatch", "{v}");
    labelled["metadata"]["annotations"]["warden.dev/inject"] = "disabled".into();
    let v = answer_to(api, &bundle_pem, "/inject/pod", &labelled);
    assert!(v["response"].get("patch").is_none(), "{v}");

    // A key with both `/` and `~` that the patch really touches: an
    // unknown field of the app's first init container, whose index the
    // sidecar takes. Applied, the patch still gives inject's pod.
    let mut odd = pod();
    odd["spec"]["initContainers"][0]["x.example/a~b"] = "kept".into();
    let v = answer_to(api, &bundle_pem, "/inject/namespace", &odd);
    let patch = base64::engine::general_purpose::STANDARD
        .decode(v["response"]["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    assert!(
        serde_json::to_string(&patch)
            .unwrap()
            .contains("\"/spec/initContainers/0/x.example~1a~0b\""),
        "{patch:?}"
    );
    let mut patched_odd = odd.clone();
    json_patch::patch(&mut patched_odd, &patch).unwrap();
    assert_eq!(
        patched_odd["spec"]["initContainers"][1]["x.example/a~b"],
        "kept"
    );
    assert_eq!(
        patched_odd["spec"]["initContainers"][0]["name"],
        "warden-proxy"
    );

    // Malformed: 400, counted.
    for junk in [
        &b"{not json"[..],
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
        br#"{"kind":"Pod"}"#,
    ] {
        let (status, body) = post(api, &bundle_pem, "/inject/namespace", junk);
        assert_eq!(status, 400, "{body}");
    }
    assert_eq!(
        metric(
            admin,
            "warden_webhook_reviews_total{path=\"/inject/namespace\",result=\"malformed\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(
            admin,
            "warden_webhook_reviews_total{path=\"/inject/namespace\",result=\"injected\"}"
        ),
        3.0
    );
    assert_eq!(common::admin_get(admin, "/ready").0, 200);
}

#[test]
fn slow_senders_do_not_keep_a_good_review_from_being_answered_promptly() {
    let (ca, hook) = start_webhook(&[]);
    let bundle = ca.bundle_pem();
    let (api, admin) = (hook.addrs["webhook"], hook.addrs["admin"]);
    // Twelve reviews that announce a large body and send a few bytes, then
    // a few more every second: they hold what they sent, not a turn.
    let slow: Vec<_> = (0..12)
        .map(|_| {
            let bundle = bundle.clone();
            std::thread::spawn(move || {
                let mut c = connect(api, &bundle);
                write!(
                    c,
                    "POST /inject/namespace HTTP/1.1\r\nHost: {SERVICE}\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{{\"apiVersion\""
                )
                .unwrap();
                c.flush().unwrap();
                for _ in 0..3 {
                    std::thread::sleep(Duration::from_secs(1));
                    if c.write_all(b"    ").and_then(|()| c.flush()).is_err() {
                        break;
                    }
                }
                let mut raw = Vec::new();
                let _ = c.read_to_end(&mut raw);
                common::parse_response(&raw)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..3 {
        let asked = Instant::now();
        let (status, body) = post(
            api,
            &bundle,
            "/inject/namespace",
            admission_review(&pod(), false).to_string().as_bytes(),
        );
        assert_eq!(status, 200, "{body}");
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "{:?}",
            asked.elapsed()
        );
        std::thread::sleep(Duration::from_millis(700));
    }
    // The slow ones gave up on their body at the body timeout: 400.
    let answers: Vec<_> = slow.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(answers.iter().all(|a| a.0 == 400), "{answers:?}");
    assert_eq!(
        metric(
            admin,
            "warden_webhook_reviews_total{path=\"/inject/namespace\",result=\"busy\"}"
        ),
        0.0
    );
    assert_eq!(metric(admin, "warden_webhook_reviews_in_flight"), 0.0);
}

/// A TLS connection to the webhook from `source` (any 127.0.0.0/8 address
/// is loopback on Linux).
fn connect_from(
    source: &str,
    addr: SocketAddr,
    bundle: &str,
) -> StreamOwned<ClientConnection, TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sock = rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{source}:0").parse().unwrap()).unwrap();
        s.connect(addr).await.unwrap().into_std().unwrap()
    });
    sock.set_nonblocking(false).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let conn = ClientConnection::new(
        tls_config(bundle, b"http/1.1"),
        ServerName::try_from(SERVICE).unwrap(),
    )
    .unwrap();
    StreamOwned::new(conn, sock)
}

#[test]
fn one_source_gets_at_most_32_connections_and_another_still_gets_in() {
    let (ca, hook) = start_webhook(&[]);
    let bundle = ca.bundle_pem();
    let api = hook.addrs["webhook"];
    let review = admission_review(&pod(), false).to_string();
    let request = format!(
        "POST /inject/namespace HTTP/1.1\r\nHost: {SERVICE}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{review}",
        review.len()
    );
    // 32 idle connections from 127.0.0.1, each through its handshake.
    let held: Vec<_> = (0..32)
        .map(|_| {
            let mut c = connect_from("127.0.0.1", api, &bundle);
            while c.conn.is_handshaking() {
                c.conn.complete_io(&mut c.sock).unwrap();
            }
            c
        })
        .collect();
    // The 33rd is closed without an answer.
    let mut extra = connect_from("127.0.0.1", api, &bundle);
    let _ = extra.write_all(request.as_bytes());
    let mut raw = Vec::new();
    let _ = extra.read_to_end(&mut raw);
    assert!(raw.is_empty(), "{}", String::from_utf8_lossy(&raw));
    // Another source is answered.
    let mut other = connect_from("127.0.0.2", api, &bundle);
    other.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = other.read_to_end(&mut raw);
    let (status, body) = common::parse_response(&raw);
    assert_eq!(status, 200, "{body}");
    // A slot given back is a slot again.
    drop(held);
    assert!(common::wait_for(Duration::from_secs(5), || {
        let mut c = connect_from("127.0.0.1", api, &bundle);
        let _ = c.write_all(request.as_bytes());
        let mut raw = Vec::new();
        let _ = c.read_to_end(&mut raw);
        !raw.is_empty() && common::parse_response(&raw).0 == 200
    }));
}

#[test]
fn idle_connections_are_closed_after_the_idle_timeout_keep_alive_pings_or_not() {
    let (ca, hook) = start_webhook(&["--idle-timeout", "1s"]);
    let bundle = ca.bundle_pem();
    let api = hook.addrs["webhook"];
    let review = admission_review(&pod(), false).to_string();

    // HTTP/1.1 keep-alive: one review, then nothing: closed.
    let mut c = connect(api, &bundle);
    write!(
        c,
        "POST /inject/namespace HTTP/1.1\r\nHost: {SERVICE}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{review}",
        review.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    let answered = Instant::now();
    let _ = c.read_to_end(&mut raw);
    let took = answered.elapsed();
    assert_eq!(common::parse_response(&raw).0, 200);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "{took:?}"
    );

    // h2 with the client pinging every 100 ms: bytes move, no request does.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(api).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(tls_config(&bundle, b"h2"))
            .connect(ServerName::try_from(SERVICE).unwrap(), tcp)
            .await
            .unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(Duration::from_millis(100))
                .keep_alive_while_idle(true)
                .handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let req = http::Request::post("/inject/namespace")
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(review)))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        drop(resp);
        let idle = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("the server closes an idle h2 connection")
            .unwrap()
            .unwrap();
        assert!(
            idle.elapsed() >= Duration::from_millis(900),
            "{:?}",
            idle.elapsed()
        );
    });
}

/// The expiry of the leaf in a PEM chain, Unix seconds.
fn leaf_not_after(chain_pem: &str) -> i64 {
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    cert.validity().not_after.timestamp()
}

#[test]
fn a_reissued_certificate_is_served_without_a_restart_its_expiry_exported_and_an_expired_one_unready()
 {
    let (ca, hook) = start_webhook(&[]);
    let admin = hook.addrs["admin"];
    let out = ca.tmp.path().join("webhook");
    let expiry = || metric(admin, "warden_webhook_certificate_expiry_timestamp_seconds");
    let first = std::fs::read_to_string(out.join("cert.pem")).unwrap();
    assert_eq!(expiry(), leaf_not_after(&first) as f64);
    assert_eq!(common::admin_get(admin, "/ready").0, 200);

    // The operator issues a new one into the same files (a shorter life,
    // so that it differs): served to the next connection, exported.
    let reissue = |ttl: &str| common::issue_webhook_cert(&ca, WEBHOOK_ID, SERVICE, &out, Some(ttl));
    let second = reissue("2h");
    let second_expiry = leaf_not_after(&second);
    assert_ne!(second_expiry, leaf_not_after(&first));
    assert!(common::wait_for(Duration::from_secs(10), || expiry() == second_expiry as f64));
    let served = served_leaf(hook.addrs["webhook"], &ca.bundle_pem());
    let want = CertificateDer::pem_slice_iter(second.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(served, want, "the reissued certificate is served");

    // A certificate that runs out: the webhook says so on /ready.
    let third = reissue("1s");
    assert!(common::wait_for(Duration::from_secs(10), || expiry()
        == leaf_not_after(&third) as f64));
    assert!(common::wait_for(Duration::from_secs(10), || {
        let (status, body) = common::admin_get(admin, "/ready");
        status == 503 && body.contains("serving certificate has expired")
    }));
}

/// `warden webhook` taking its certificate from the CA with a pod's token
/// (`--k8s-token`), as `warden install` runs it: the CA of `ca.yaml`
/// granting `granted` to `spiffe://example.org/ns/shop/sa/<account>`.
fn webhook_from_the_ca(
    account: &str,
    granted: &str,
    ttl: &str,
) -> (Ca, common::kube::Kube, common::Server, Running) {
    let (ca, kube) = common::kube::ca_with_kubernetes(&format!(
        "{}  dns_names:\n    - {{spiffe_id: spiffe://example.org/ns/shop/sa/warden-webhook, names: [{granted}]}}\n",
        common::kube::jwks_section()
    ));
    let server = ca.serve();
    let pod = kube.add_pod("shop", &format!("{account}-5d8f"), account);
    let token = ca.tmp.path().join("token");
    std::fs::write(&token, kube.token(&pod)).unwrap();
    let bundle = s(&ca.dir.join("bundle.pem")).to_owned();
    // Bound, not necessarily ready: `ready` waits for the certificate.
    let hook = common::webhook_on_loopback(
        &[
            "--k8s-token",
            s(&token),
            "--dns-name",
            SERVICE,
            "--ttl",
            ttl,
            "--bundle",
            &bundle,
            "--ca-url",
            &format!("https://{}", server.api),
        ],
        false,
    );
    (ca, kube, server, hook)
}

/// The leaf the webhook serves to a client that verifies it for `SERVICE`.
fn served_leaf(addr: SocketAddr, bundle: &str) -> CertificateDer<'static> {
    let mut tls = connect(addr, bundle);
    tls.write_all(b"GET /live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let _ = tls.read(&mut [0; 256]).unwrap();
    tls.conn.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

#[test]
fn a_webhook_attested_by_its_token_serves_the_granted_name_and_renews_it_at_half_life() {
    let (ca, _kube, _server, hook) = webhook_from_the_ca("warden-webhook", SERVICE, "60s");
    let admin = hook.addrs["admin"];
    assert!(common::wait_for(
        Duration::from_secs(10),
        || common::admin_get(admin, "/ready").0 == 200
    ));
    // The API server's check: the chain verifies for the Service's name.
    let first = served_leaf(hook.addrs["webhook"], &ca.bundle_pem());
    let (_, cert) = x509_parser::parse_x509_certificate(&first).unwrap();
    let names: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(
        names,
        [
            "URI(spiffe://example.org/ns/shop/sa/warden-webhook)".to_owned(),
            format!("DNSName({SERVICE})")
        ]
    );
    let expiry = || metric(admin, "warden_webhook_certificate_expiry_timestamp_seconds");
    // The one served, or a renewal already (the gauge moves first).
    assert!(expiry() >= cert.validity().not_after.timestamp() as f64);
    // Renewed at half-life (+-10%), with the token again, to a new
    // certificate: by 60% of its life, plus slack for a loaded machine.
    let (nb, na) = (
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    );
    let by = nb + (na - nb) * 6 / 10 + 10;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let wait = Duration::from_secs(u64::try_from(by - now).unwrap_or(0));
    assert!(
        common::wait_for(wait, || {
            served_leaf(hook.addrs["webhook"], &ca.bundle_pem()) != first
        }),
        "not renewed by {by} (valid {nb}..{na})"
    );
    assert!(expiry() > cert.validity().not_after.timestamp() as f64);
    assert_eq!(common::admin_get(admin, "/ready").0, 200);
}

#[test]
fn a_webhook_asking_for_a_name_not_granted_to_it_gets_no_certificate_and_says_why() {
    // Granted to warden-webhook; asked for by another service account.
    let (_ca, _kube, server, hook) = webhook_from_the_ca("web", SERVICE, "1h");
    let admin = hook.addrs["admin"];
    assert!(
        common::wait_for(Duration::from_secs(10), || {
            let (status, body) = common::admin_get(admin, "/ready");
            status == 503
                && body.contains("no serving certificate yet")
                && body.contains("k8s-csr-mismatch")
        }),
        "{:?}",
        common::admin_get(admin, "/ready")
    );
    // Exported, and 0: no certificate at all.
    let (_, metrics) = common::admin_get(admin, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l == "warden_webhook_certificate_expiry_timestamp_seconds{source=\"ca\"} 0"),
        "{metrics}"
    );
    assert!(common::wait_for(Duration::from_secs(5), || metric(
        server.admin,
        "warden_ca_refusals_total{reason=\"k8s_csr_mismatch\"}"
    ) >= 1.0));
}

#[test]
fn a_webhook_given_an_expired_certificate_is_not_ready_until_its_files_hold_a_valid_one() {
    let ca = Ca::init("example.org");
    let out = ca.tmp.path().join("webhook");
    let expired = common::issue_webhook_cert(&ca, WEBHOOK_ID, SERVICE, &out, Some("1s"));
    let not_after = leaf_not_after(&expired);
    assert!(common::wait_for(Duration::from_secs(5), || {
        time::OffsetDateTime::now_utc().unix_timestamp() > not_after
    }));
    let hook = common::webhook_from_files(&out, &ca.dir.join("bundle.pem"), &[], false);
    let admin = hook.addrs["admin"];
    assert!(common::wait_for(Duration::from_secs(5), || {
        let (status, body) = common::admin_get(admin, "/ready");
        status == 503 && body.contains("serving certificate has expired")
    }));
    // A valid one in its files: picked up, served, ready.
    let valid = common::issue_webhook_cert(&ca, WEBHOOK_ID, SERVICE, &out, Some("1h"));
    assert!(common::wait_for(
        Duration::from_secs(10),
        || common::admin_get(admin, "/ready").0 == 200
    ));
    let want = CertificateDer::pem_slice_iter(valid.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(served_leaf(hook.addrs["webhook"], &ca.bundle_pem()), want);
}
