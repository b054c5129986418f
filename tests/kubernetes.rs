//! Kubernetes attestation against the real `warden ca serve`, with the
//! Kubernetes API played over TLS by `common::kube` (JSON shapes of the API
//! reference; tokens with the claim set of projected ServiceAccount
//! tokens, RS256 and ES256). Every refusal class has a case here.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::net::SocketAddr;

use base64::Engine;
use serde_json::{Value, json};

use common::kube::{ISSUER, Kube, Pod};
use common::{Ca, Server, csr, https, problem_reason, run, s, uri_sans};

/// A CA with a `kubernetes:` section, and the fake API it calls.
fn setup(section: &str) -> (Ca, Kube, Server) {
    let (ca, kube) = common::kube::ca_with_kubernetes(section);
    let server = ca.serve();
    (ca, kube, server)
}

/// POST /v1/certify with a ServiceAccount token and a CSR for `id`.
fn attest(addr: SocketAddr, bundle: &str, id: &str, token: &str) -> (u16, Value, String) {
    let (_key, csr) = csr(&[id]);
    let body = json!({ "csr": csr, "k8s_token": token });
    let (status, text) = https(
        addr,
        bundle,
        None,
        "POST",
        "/v1/certify",
        body.to_string().as_bytes(),
    )
    .unwrap();
    let json: Value = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
    let reason = problem_reason(&json);
    if status != 200 {
        // A refusal is a problem+json answer with its status and a fixed type.
        assert_eq!(json["status"], status, "{json}");
        assert!(
            json["type"]
                .as_str()
                .is_some_and(|t| t.starts_with("urn:warden:problem:")),
            "{json}"
        );
    }
    (status, json, reason)
}

fn pod_id(p: &Pod) -> String {
    format!(
        "spiffe://example.org/ns/{}/sa/{}",
        p.namespace, p.service_account
    )
}

/// `claims` with `key` set to `value`.
fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

/// The audit trail's events.
fn audit_events(ca: &Ca) -> Vec<Value> {
    std::fs::read_to_string(ca.dir.join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .collect()
}

/// The refusal in the trail with `reason`; checks that it names the pod.
fn audited_refusal(ca: &Ca, reason: &str, pod: &Pod) -> Value {
    let event = audit_events(ca)
        .into_iter()
        .find(|e| e["event"] == "refused" && e["reason"] == reason)
        .unwrap_or_else(|| panic!("an audit line for {reason}"));
    assert_eq!(event["spiffe_id"], pod_id(pod), "{event}");
    assert_eq!(
        (
            event["namespace"].as_str(),
            event["service_account"].as_str(),
            event["pod"].as_str(),
            event["pod_uid"].as_str(),
        ),
        (
            Some(pod.namespace.as_str()),
            Some(pod.service_account.as_str()),
            Some(pod.name.as_str()),
            Some(pod.uid.as_str()),
        ),
        "{event}"
    );
    event
}

/// Asserts `warden_ca_refusals_total{reason}` counted each of `reasons`.
fn assert_counted(server: &Server, reasons: &[&str]) {
    for reason in reasons {
        assert!(
            server.metric(&format!("warden_ca_refusals_total{{reason=\"{reason}\"}}")) >= 1.0,
            "{reason}"
        );
    }
}

#[test]
fn tokenreview_mode_issues_the_pod_identity_and_refuses_each_class() {
    // The test's own calls come quickly from one address: room for them.
    let (ca, kube, server) = setup(&format!(
        "  verify: tokenreview\n  issuer: {ISSUER}\n  attestations_per_minute: 4\n  reviews_per_source: 50\n"
    ));
    let bundle = ca.bundle_pem();
    let cart = kube.add_pod("shop", "cart-5d8f", "cart");

    // The pod's own identity, from its token alone.
    let (status, answer, _) = attest(server.api, &bundle, &pod_id(&cart), &kube.token(&cart));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["spiffe_id"], pod_id(&cart));
    let leaf = common::certs(answer["certificate_chain"].as_str().unwrap());
    assert_eq!(uri_sans(&leaf[0]), [pod_id(&cart)]);
    assert!(kube.calls("review") >= 1 && kube.calls("pod") >= 1);

    // `aud` as a plain string (RFC 7519), reviewed as such.
    let plain = kube.sign(&with(kube.claims(&cart), "aud", "warden".into()), "rsa-1");
    let (status, answer, _) = attest(server.api, &bundle, &pod_id(&cart), &plain);
    assert_eq!(status, 200, "{answer}");

    // A CSR for any other identity: refused the pod, and audited as its.
    let (status, _, reason) = attest(
        server.api,
        &bundle,
        "spiffe://example.org/ns/shop/sa/admin",
        &kube.token(&cart),
    );
    assert_eq!((status, reason.as_str()), (403, "k8s-csr-mismatch"));
    let event = audited_refusal(&ca, "k8s_csr_mismatch", &cart);
    assert_eq!(event["asked"], "spiffe://example.org/ns/shop/sa/admin");

    // Another issuer: refused before the API server is asked.
    let reviews = kube.calls("review");
    let evil = kube.sign(
        &with(kube.claims(&cart), "iss", "https://evil.example".into()),
        "rsa-1",
    );
    let (status, _, reason) = attest(server.api, &bundle, &pod_id(&cart), &evil);
    assert_eq!((status, reason.as_str()), (401, "k8s-wrong-issuer"));
    assert_eq!(kube.calls("review"), reviews);

    // A token for the API's default audience: refused before the API
    // server is even asked.
    let reviews = kube.calls("review");
    let default_aud = kube.sign(
        &with(
            kube.claims(&cart),
            "aud",
            json!(["https://kubernetes.default.svc"]),
        ),
        "rsa-1",
    );
    let (status, _, reason) = attest(server.api, &bundle, &pod_id(&cart), &default_aud);
    assert_eq!((status, reason.as_str()), (401, "k8s-wrong-audience"));
    assert_eq!(
        kube.calls("review"),
        reviews,
        "junk costs the API server no call"
    );

    // A token the API server does not authenticate (a signature that is
    // not the cluster's); its words stay in the CA's log.
    let good = kube.token(&cart);
    let forged = format!("{}AAAA", &good[..good.len() - 4]);
    let (status, answer, reason) = attest(server.api, &bundle, &pod_id(&cart), &forged);
    assert_eq!((status, reason.as_str()), (401, "k8s-rejected"), "{answer}");
    assert!(
        !answer["detail"]
            .as_str()
            .unwrap()
            .contains("invalid bearer token"),
        "{answer}"
    );

    // An API server that ignores the audiences asked for reviews against
    // its own default: never taken for warden's.
    kube.ignore_audiences(true);
    let (status, _, reason) = attest(server.api, &bundle, &pod_id(&cart), &kube.token(&cart));
    assert_eq!((status, reason.as_str()), (401, "k8s-wrong-audience"));
    kube.ignore_audiences(false);

    // Not bound to a pod (`kubectl create token`).
    let mut unbound = kube.claims(&cart);
    unbound["kubernetes.io"]
        .as_object_mut()
        .unwrap()
        .remove("pod");
    let (status, _, reason) = attest(
        server.api,
        &bundle,
        &pod_id(&cart),
        &kube.sign(&unbound, "rsa-1"),
    );
    assert_eq!((status, reason.as_str()), (401, "k8s-no-pod"));

    // Outside the allowlist.
    let other = kube.add_pod("billing", "ledger-0", "ledger");
    let (status, _, reason) = attest(server.api, &bundle, &pod_id(&other), &kube.token(&other));
    assert_eq!((status, reason.as_str()), (403, "k8s-not-allowed"));

    // A deleted pod's token stops working at once.
    let gone = kube.add_pod("shop", "search-0", "search");
    let token = kube.token(&gone);
    kube.delete_pod(&gone);
    let (status, _, reason) = attest(server.api, &bundle, &pod_id(&gone), &token);
    assert_eq!((status, reason.as_str()), (401, "k8s-pod-gone"));

    // A pod of the same name, recreated: another UID.
    let old = kube.add_pod("shop", "web-0", "web");
    let token = kube.token(&old);
    kube.delete_pod(&old);
    kube.add_pod("shop", "web-0", "web");
    let (status, _, reason) = attest(server.api, &bundle, &pod_id(&old), &token);
    assert_eq!((status, reason.as_str()), (401, "k8s-pod-changed"));

    // A pod attesting too often (4 a minute here).
    let busy = kube.add_pod("shop", "busy-0", "busy");
    let mut last = 0;
    for _ in 0..5 {
        let (status, _, _) = attest(server.api, &bundle, &pod_id(&busy), &kube.token(&busy));
        last = status;
    }
    assert_eq!(last, 429);
    let (_, body) = {
        let (_key, csr) = csr(&[&pod_id(&busy)]);
        let body = json!({ "csr": csr, "k8s_token": kube.token(&busy) });
        https(
            server.api,
            &bundle,
            None,
            "POST",
            "/v1/certify",
            body.to_string().as_bytes(),
        )
        .unwrap()
    };
    assert!(body.contains("retry in"), "{body}");

    // Counted by reason, and the trail names the pod.
    assert_counted(
        &server,
        &[
            "k8s_csr_mismatch",
            "k8s_wrong_issuer",
            "k8s_wrong_audience",
            "k8s_rejected",
            "k8s_no_pod",
            "k8s_not_allowed",
            "k8s_pod_gone",
            "k8s_pod_changed",
            "k8s_rate_limited",
        ],
    );
    let issued = audit_events(&ca)
        .into_iter()
        .find(|e| e["kind"] == "kubernetes" && e["pod"] == "cart-5d8f")
        .expect("an audit line for the pod's issuance");
    assert_eq!(
        (
            issued["namespace"].as_str(),
            issued["service_account"].as_str()
        ),
        (Some("shop"), Some("cart"))
    );
    assert_eq!(issued["pod_uid"], cart.uid);
    audited_refusal(&ca, "k8s_pod_gone", &gone);
}

#[test]
fn jwks_mode_verifies_offline_and_refuses_each_class() {
    // Room for one pod's many refusals (the rate has a test of its own).
    let (ca, kube, server) = setup(&format!(
        "  verify: jwks\n  issuer: {ISSUER}\n  max_token_lifetime: 24h\n  attestations_per_minute: 100\n"
    ));
    let bundle = ca.bundle_pem();
    let cart = kube.add_pod("shop", "cart-5d8f", "cart");
    let id = pod_id(&cart);
    let claims = kube.claims(&cart);

    // RS256 and ES256; `aud` as an array or a string.
    for (c, kid) in [
        (claims.clone(), "rsa-1"),
        (with(claims.clone(), "aud", "warden".into()), "ec-1"),
    ] {
        let (status, answer, _) = attest(server.api, &bundle, &id, &kube.sign(&c, kid));
        assert_eq!(status, 200, "{kid}: {answer}");
    }
    assert_eq!(
        kube.calls("review") + kube.calls("pod"),
        0,
        "offline: no call per attestation"
    );
    assert_eq!(kube.calls("discovery"), 1);

    // Every class is a 401 problem with its fixed reason.
    let refused = |token: &str| {
        let (status, answer, reason) = attest(server.api, &bundle, &id, token);
        assert_eq!(status, 401, "{reason}: {answer}");
        reason
    };
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let good = kube.sign(&claims, "rsa-1");
    let parts: Vec<&str> = good.split('.').collect();

    // alg none (unsigned) and HMAC.
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": "rsa-1"})),
        parts[1]
    );
    assert_eq!(refused(&none), "k8s-algorithm");
    let hmac = format!(
        "{}.{}.{}",
        b64(&json!({"alg": "HS256", "kid": "rsa-1"})),
        parts[1],
        parts[2]
    );
    assert_eq!(refused(&hmac), "k8s-algorithm");

    // Another payload under the cluster's signature.
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64(&with(
            claims.clone(),
            "sub",
            "system:serviceaccount:shop:admin".into()
        )),
        parts[2]
    );
    assert_eq!(refused(&forged), "k8s-bad-signature");

    // Each claim rule.
    let now = claims["iat"].as_i64().unwrap();
    for (c, want) in [
        (
            with(claims.clone(), "iss", "https://evil.example".into()),
            "k8s-wrong-issuer",
        ),
        (
            with(
                claims.clone(),
                "aud",
                json!(["https://kubernetes.default.svc"]),
            ),
            "k8s-wrong-audience",
        ),
        (
            with(
                with(claims.clone(), "exp", (now - 120).into()),
                "iat",
                (now - 3720).into(),
            ),
            "k8s-expired",
        ),
        (
            with(claims.clone(), "nbf", (now + 600).into()),
            "k8s-not-yet-valid",
        ),
        (
            with(claims.clone(), "exp", (now + 3 * 86_400).into()),
            "k8s-lifetime",
        ),
        (
            with(
                claims.clone(),
                "sub",
                "system:serviceaccount:shop:admin".into(),
            ),
            "k8s-subject",
        ),
    ] {
        assert_eq!(refused(&kube.sign(&c, "rsa-1")), want, "{c}");
    }
    let mut unbound = claims.clone();
    unbound["kubernetes.io"]
        .as_object_mut()
        .unwrap()
        .remove("pod");
    assert_eq!(refused(&kube.sign(&unbound, "rsa-1")), "k8s-no-pod");

    // Once the signature is the cluster's, its claims name who was
    // refused: the trail says which pod sent an expired token.
    audited_refusal(&ca, "k8s_expired", &cart);
    audited_refusal(&ca, "k8s_wrong_audience", &cart);
    let unbound_event = audit_events(&ca)
        .into_iter()
        .find(|e| e["reason"] == "k8s_no_pod")
        .expect("a signed token bound to no pod is audited");
    assert_eq!(
        (
            unbound_event["namespace"].as_str(),
            unbound_event["service_account"].as_str(),
            unbound_event.get("pod"),
        ),
        (Some("shop"), Some("cart"), None),
        "{unbound_event}"
    );
    // A signature that does not verify names nobody in the trail.
    assert!(
        !audit_events(&ca)
            .iter()
            .any(|e| e["reason"] == "k8s_bad_signature" || e["reason"] == "k8s_algorithm"),
        "unverified claims are only logged"
    );

    // A key rotation: a token signed with the new key verifies as soon as
    // the CA may fetch again (at most every 2 s; the proxy retries).
    let before = kube.calls("jwks");
    kube.rotate("rsa-2", jsonwebtoken::Algorithm::RS256);
    let rotated = kube.sign(&claims, "rsa-2");
    assert!(common::wait_for(std::time::Duration::from_secs(10), || {
        attest(server.api, &bundle, &id, &rotated).0 == 200
    }));
    assert_eq!(
        kube.calls("jwks"),
        before + 1,
        "fetched once for the new key"
    );
    // Tokens naming unknown keys do not make the CA hammer the JWKS endpoint.
    let before = kube.calls("jwks");
    let started = std::time::Instant::now();
    for i in 0..20 {
        let t = format!(
            "{}.{}.{}",
            b64(&json!({"alg": "RS256", "kid": format!("nope-{i}")})),
            parts[1],
            parts[2]
        );
        assert_eq!(refused(&t), "k8s-unknown-key");
    }
    // One fetch per 2 s at most, however many tokens.
    let allowed = 1 + started.elapsed().as_secs() as usize / 2;
    assert!(
        kube.calls("jwks") <= before + allowed,
        "{} fetches for 20 unknown keys in {:?}",
        kube.calls("jwks") - before,
        started.elapsed()
    );

    assert_counted(
        &server,
        &[
            "k8s_algorithm",
            "k8s_unknown_key",
            "k8s_bad_signature",
            "k8s_wrong_issuer",
            "k8s_wrong_audience",
            "k8s_expired",
            "k8s_not_yet_valid",
            "k8s_lifetime",
            "k8s_subject",
            "k8s_no_pod",
        ],
    );
}

#[test]
fn jwks_mode_refuses_a_csr_for_another_id_and_limits_each_pod() {
    let (ca, kube, server) = setup(&format!(
        "{}  attestations_per_minute: 3\n",
        common::kube::jwks_section()
    ));
    let bundle = ca.bundle_pem();
    let cart = kube.add_pod("shop", "cart-5d8f", "cart");

    // Another ID than the token's: 403, and the trail names the pod.
    let (status, answer, reason) = attest(
        server.api,
        &bundle,
        "spiffe://example.org/ns/shop/sa/admin",
        &kube.token(&cart),
    );
    assert_eq!(
        (status, reason.as_str()),
        (403, "k8s-csr-mismatch"),
        "{answer}"
    );
    assert!(
        answer["detail"].as_str().unwrap().contains("attests only"),
        "{answer}"
    );
    let event = audited_refusal(&ca, "k8s_csr_mismatch", &cart);
    assert_eq!(event["asked"], "spiffe://example.org/ns/shop/sa/admin");

    // That was the pod's first attestation of the minute: two more, then 429.
    for _ in 0..2 {
        let (status, answer, _) = attest(server.api, &bundle, &pod_id(&cart), &kube.token(&cart));
        assert_eq!(status, 200, "{answer}");
    }
    let (status, answer, reason) = attest(server.api, &bundle, &pod_id(&cart), &kube.token(&cart));
    assert_eq!(
        (status, reason.as_str()),
        (429, "k8s-rate-limited"),
        "{answer}"
    );
    assert!(
        answer["detail"].as_str().unwrap().contains("retry in"),
        "{answer}"
    );
    // Counted per pod UID: a pod of the same ServiceAccount is not limited.
    let twin = kube.add_pod("shop", "cart-9x2k", "cart");
    let (status, answer, _) = attest(server.api, &bundle, &pod_id(&twin), &kube.token(&twin));
    assert_eq!(status, 200, "{answer}");
    assert_counted(&server, &["k8s_csr_mismatch", "k8s_rate_limited"]);
    assert!(
        !audit_events(&ca)
            .iter()
            .any(|e| e["reason"] == "k8s_rate_limited"),
        "rate refusals stay out of the trail"
    );
}

#[test]
fn without_allow_no_pod_is_attested_in_either_mode() {
    for verify in [
        "tokenreview".to_owned(),
        format!("jwks\n  issuer: {ISSUER}"),
    ] {
        let ca = Ca::init("example.org");
        let kube = Kube::start(ca.tmp.path());
        let config = ca.dir.join("ca.yaml");
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(&format!(
            "kubernetes:\n  verify: {verify}\n  api: {{url: {}, ca_file: {}, token_file: {}}}\n",
            kube.url(),
            s(&kube.ca_file),
            s(&kube.reviewer_token_file)
        ));
        std::fs::write(&config, text).unwrap();
        let server = ca.serve();
        let bundle = ca.bundle_pem();
        for (ns, name, sa) in [
            ("shop", "cart-5d8f", "cart"),
            ("default", "web-0", "default"),
        ] {
            let pod = kube.add_pod(ns, name, sa);
            let (status, answer, reason) =
                attest(server.api, &bundle, &pod_id(&pod), &kube.token(&pod));
            assert_eq!(
                (status, reason.as_str()),
                (403, "k8s-not-allowed"),
                "{verify}: {answer}"
            );
        }
        assert_eq!(
            kube.calls("review"),
            0,
            "{verify}: refused before any review"
        );
    }
}

#[test]
fn a_jwks_file_needs_no_api_and_ca_certify_takes_a_service_account_token() {
    let ca = Ca::init("example.org");
    let kube = Kube::start(ca.tmp.path());
    let pod = kube.add_pod("shop", "cart-5d8f", "cart");
    // The cluster's JWKS, as `kubectl get --raw /openid/v1/jwks` prints it.
    let jwks = {
        let (status, text) = raw_get(&kube, "/openid/v1/jwks");
        assert_eq!(status, 200);
        text
    };
    std::fs::write(ca.tmp.path().join("jwks.json"), jwks).unwrap();
    let config = ca.dir.join("ca.yaml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "kubernetes:\n  allow: [spiffe://example.org/ns/shop/sa/cart]\n  verify: jwks\n  issuer: {ISSUER}\n  jwks_file: {}\n",
        s(&ca.tmp.path().join("jwks.json"))
    ));
    std::fs::write(&config, text).unwrap();
    let server = ca.serve();
    let token_file = ca.tmp.path().join("token");
    std::fs::write(&token_file, kube.token(&pod)).unwrap();
    let out = ca.tmp.path().join("out");
    let url = format!("https://{}", server.api);
    let bundle = s(&ca.dir.join("bundle.pem")).to_owned();
    let r = run(&[
        "ca",
        "certify",
        "--server",
        &url,
        "--bundle",
        &bundle,
        "--k8s-token",
        s(&token_file),
        "--out-dir",
        s(&out),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(
        String::from_utf8_lossy(&r.stdout)
            .contains("obtained spiffe://example.org/ns/shop/sa/cart")
    );
    let chain = std::fs::read_to_string(out.join("cert.pem")).unwrap();
    assert_eq!(uri_sans(&common::certs(&chain)[0]), [pod_id(&pod)]);
    assert_eq!(
        (kube.calls("discovery"), kube.calls("jwks")),
        (0, 1),
        "only the test's own fetch"
    );

    // A pod's certificate does not renew over mTLS: the pod proves itself
    // with its token again (its pod may be gone).
    let r = run(&[
        "ca",
        "certify",
        "--server",
        &url,
        "--bundle",
        &bundle,
        "--spiffe-id",
        &pod_id(&pod),
        "--renew-from",
        s(&out),
        "--out-dir",
        s(&out),
    ]);
    assert!(!r.status.success());
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("k8s-renew-with-token"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );

    // Refused: the CLI says why, with the CA's reason.
    let other = kube.add_pod("shop", "search-0", "search");
    std::fs::write(&token_file, kube.token(&other)).unwrap();
    let r = run(&[
        "ca",
        "certify",
        "--server",
        &url,
        "--bundle",
        &bundle,
        "--k8s-token",
        s(&token_file),
        "--out-dir",
        s(&out),
    ]);
    assert!(!r.status.success());
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("k8s-not-allowed"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
}

/// A GET to the fake API as the reviewer.
fn raw_get(kube: &Kube, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let pem = std::fs::read_to_string(&kube.ca_file).unwrap();
    let config = common::client_config(&pem, None);
    let mut conn = rustls::ClientConnection::new(
        std::sync::Arc::new(config),
        rustls::pki_types::ServerName::try_from("kubernetes.default.svc").unwrap(),
    )
    .unwrap();
    let mut sock = std::net::TcpStream::connect(kube.addr).unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    let token = std::fs::read_to_string(&kube.reviewer_token_file).unwrap();
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        token.trim()
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw);
    common::parse_response(&raw)
}

/// POST /v1/certify as `attest` does, from the local address `from` (any
/// of 127.0.0.0/8 reaches the CA on 127.0.0.1): another client host.
fn attest_from(
    from: std::net::IpAddr,
    addr: SocketAddr,
    bundle: &str,
    csr: &str,
    token: &str,
) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let sock = rt
        .block_on(async {
            let s = tokio::net::TcpSocket::new_v4()?;
            s.bind(SocketAddr::new(from, 0))?;
            s.connect(addr).await
        })
        .ok()?
        .into_std()
        .ok()?;
    sock.set_nonblocking(false).ok()?;
    let mut sock = sock;
    sock.set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .ok()?;
    let mut conn = rustls::ClientConnection::new(
        std::sync::Arc::new(common::client_config(bundle, None)),
        rustls::pki_types::ServerName::try_from("ca.invalid").unwrap(),
    )
    .unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    let body = json!({ "csr": csr, "k8s_token": token }).to_string();
    write!(
        tls,
        "POST /v1/certify HTTP/1.1\r\nHost: ca\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw);
    (!raw.is_empty()).then(|| common::parse_response(&raw))
}

#[test]
fn a_flood_of_forged_tokens_from_one_address_does_not_stop_a_real_pod() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    // The default share: reviews_per_source 10 a second.
    let (ca, kube, server) = setup("  verify: tokenreview\n");
    let bundle = ca.bundle_pem();
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(std::sync::Mutex::new(Vec::new()));
    // Tokens whose claims pass every check made before the review (the
    // API server is what finds them forged), each for a made-up pod.
    let forged = |n: usize| {
        let pod = Pod {
            namespace: "shop".into(),
            name: format!("fake-{n}"),
            uid: format!("{n:08x}-dead-4bad-9d1f-000000000000"),
            service_account: "cart".into(),
        };
        let t = kube.token(&pod);
        (pod_id(&pod), format!("{}AAAA", &t[..t.len() - 4]))
    };
    let tokens: Vec<(String, String)> = (0..64).map(forged).collect();
    let (_key, flood_csr) = csr(&[&tokens[0].0]);
    let flooders: Vec<_> = (0..8)
        .map(|i| {
            let (stop, answers, bundle, csr) = (
                stop.clone(),
                answers.clone(),
                bundle.clone(),
                flood_csr.clone(),
            );
            let tokens = tokens.clone();
            let api = server.api;
            std::thread::spawn(move || {
                let mut n = i;
                while !stop.load(Ordering::Relaxed) {
                    let from = "127.0.0.2".parse().unwrap();
                    if let Some((status, text)) =
                        attest_from(from, api, &bundle, &csr, &tokens[n % tokens.len()].1)
                    {
                        let reason = serde_json::from_str::<Value>(&text)
                            .map(|v| problem_reason(&v))
                            .unwrap_or_default();
                        answers.lock().unwrap().push((status, reason));
                    }
                    n += 8;
                }
            })
        })
        .collect();
    // Let the flood get going, then attest real pods from another address
    // while it lasts: each gets its identity at the first try.
    let started = Instant::now();
    assert!(common::wait_for(Duration::from_secs(10), || {
        answers.lock().unwrap().len() >= 100
    }));
    for i in 0..5 {
        let pod = kube.add_pod("shop", &format!("cart-{i}"), "cart");
        let (status, answer, _) = attest(server.api, &bundle, &pod_id(&pod), &kube.token(&pod));
        assert_eq!(status, 200, "pod {i} during the flood: {answer}");
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.join().unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64() + 1.0;
    let answers = answers.lock().unwrap();
    let limited = answers
        .iter()
        .filter(|(s, r)| *s == 429 && r == "k8s-source-rate-limited")
        .count();
    let rejected = answers
        .iter()
        .filter(|(s, r)| *s == 401 && r == "k8s-rejected")
        .count();
    assert_eq!(
        limited + rejected,
        answers.len(),
        "the flood is refused, never 503: {:?}",
        answers.iter().find(|(s, _)| *s != 429 && *s != 401)
    );
    assert!(limited > rejected, "{limited} limited, {rejected} reviewed");
    // At most 10 reviews a second for the flooding address (plus the
    // real pods' own).
    assert!(
        (rejected as f64) <= 10.0 * (elapsed + 1.0),
        "{rejected} reviews for the flood in {elapsed:.1} s"
    );
    assert!(kube.calls("review") <= rejected + 5);
    assert_counted(&server, &["k8s_source_rate_limited"]);
    assert!(
        !audit_events(&ca)
            .iter()
            .any(|e| e["reason"] == "k8s_source_rate_limited" || e["reason"] == "k8s_rejected"),
        "an unverified flood writes nothing to the trail"
    );
}
