//! `warden ca serve`: the certify API over real TLS, renewal over mTLS,
//! deny/allow on a running server, bad input, restarts, admin endpoints.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

fn chain_of(v: &Value) -> String {
    v["certificate_chain"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// A workload that bootstrapped with a token: its chain and key.
fn bootstrap(ca: &Ca, srv: &Server, id: &str) -> (String, String) {
    let token = ca.token(id);
    let (key, csr) = csr(&[id]);
    let (status, v) = certify(srv.api, &ca.bundle_pem(), None, &csr, Some(&token)).unwrap();
    assert_eq!(status, 200, "{v}");
    (chain_of(&v), key.serialize_pem())
}

#[test]
fn certify_with_a_token_returns_a_chain_that_verifies_against_the_bundle() {
    let ca = Ca::init("example.org");
    let srv = ca.serve();
    let id = ca.id("/ns/prod/sa/api");
    let token = ca.token(&id);
    let (_key, csr) = csr(&[&id]);
    let (status, v) = certify(srv.api, &ca.bundle_pem(), None, &csr, Some(&token)).unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["spiffe_id"], id);
    assert_eq!(v["trust_bundle"].as_str().unwrap(), ca.bundle_pem());
    let chain = chain_of(&v);
    webpki_verifies(&chain, &ca.bundle_pem()).unwrap();
    openssl_verifies(ca.tmp.path(), &chain, &ca.bundle_pem()).unwrap();
    let leaf = &certs(&chain)[0];
    assert_eq!(uri_sans(leaf), vec![id]);
    let (_, c) = x509_parser::parse_x509_certificate(leaf).unwrap();
    assert!(!c.is_ca());
    let eku = c.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let life = c.validity().not_after.timestamp() - c.validity().not_before.timestamp();
    assert_eq!(life, 3600 + 30, "default TTL 1 h, plus the skew backdate");
    let not_after = time::OffsetDateTime::parse(
        v["not_after"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!(
        not_after.unix_timestamp(),
        c.validity().not_after.timestamp()
    );
    assert_eq!(
        srv.metric("warden_ca_issuances_total{kind=\"bootstrap\",result=\"issued\"}"),
        1.0
    );
}

#[test]
fn the_ca_server_proves_its_own_spiffe_id() {
    let ca = Ca::init("example.org");
    let srv = ca.serve();
    let config = client_config(&ca.bundle_pem(), None);
    let mut conn = rustls::ClientConnection::new(
        std::sync::Arc::new(config),
        "ca.invalid".try_into().unwrap(),
    )
    .unwrap();
    let mut sock = std::net::TcpStream::connect(srv.api).unwrap();
    conn.complete_io(&mut sock).unwrap();
    let chain = conn.peer_certificates().unwrap();
    assert_eq!(
        uri_sans(&chain[0]),
        vec!["spiffe://example.org/warden/ca".to_owned()]
    );
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
}

#[test]
fn a_token_works_once() {
    let ca = Ca::init("example.org");
    let srv = ca.serve();
    let id = ca.id("/web");
    let token = ca.token(&id);
    let (_, csr1) = csr(&[&id]);
    assert_eq!(
        certify(srv.api, &ca.bundle_pem(), None, &csr1, Some(&token))
            .unwrap()
            .0,
        200
    );
    let (_, csr2) = csr(&[&id]);
    let (status, v) = certify(srv.api, &ca.bundle_pem(), None, &csr2, Some(&token)).unwrap();
    assert_eq!(status, 401);
    assert_eq!(problem_reason(&v), "token-used");
    assert!(v.get("certificate_chain").is_none());
    assert_eq!(
        srv.metric("warden_ca_refusals_total{reason=\"token_used\"}"),
        1.0
    );
}

#[test]
fn concurrent_requests_with_one_token_get_one_certificate() {
    let ca = Ca::init("example.org");
    let srv = ca.serve();
    let id = ca.id("/web");
    let token = ca.token(&id);
    let bundle = ca.bundle_pem();
    let results: Vec<u16> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                sc.spawn(|| {
                    let (_, c) = csr(&[&id]);
                    certify(srv.api, &bundle, None, &c, Some(&token)).unwrap().0
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        results.iter().filter(|s| **s == 200).count(),
        1,
        "{results:?}"
    );
    assert_eq!(
        results.iter().filter(|s| **s == 401).count(),
        7,
        "{results:?}"
    );
}

#[test]
fn unknown_and_expired_tokens_are_refused() {
    let ca = Ca::init("example.org");
    let srv = ca.serve();
    let id = ca.id("/web");
    let (_, c) = csr(&[&id]);
    let (status, v) = certify(srv.api, &ca.bundle_pem(), None, &c, Some("not-a-token")).unwrap();
    assert_eq!(
        (status, problem_reason(&v).as_str()),
        (401, "token-unknown")
    );

    let token = run_ok(&[
        "ca",
        "token",
        "--dir",
        ca.dir(),
        "--spiffe-id",
        &id,
        "--ttl",
        "1s",
    ])
    .trim()
    .to_owned();
    std::thread::sleep(Duration::from_millis(2100));
    let (status, v) = certify(srv.api, &ca.bundle_pem(), None, &c, Some(&token)).unwrap();
    assert_eq!(
        (status, problem_reason(&v).as_str()),
        (401, "token-expired")
    );
}

#[test]
fn no_token_and_no_certificate_is_refused() {
    let ca = Ca::init("example.org");
    let srv = ca.serve();
    let (_, c) = csr(&[&ca.id("/web")]);
    let (status, v) = certify(srv.api, &ca.bundle_pem(), None, &c, None).unwrap();
    assert_eq!(
        (status, problem_reason(&v).as_str()),
        (401, "unauthenticated")
    );
}

#[test]
fn renewal_over_mtls_with_the_current_svid_gets_a_new_certificate_for_a_new_key() {
    let ca = Ca::init("example.org");
    let srv = ca.serve();
    let id = ca.id("/web");
    let (chain, key) = bootstrap(&ca, &srv, &id);
    let (new_key, c) = csr(&[&id]);
    let (status, v) = certify(srv.api, &ca.bundle_pem(), Some((&chain, &key)), &c, None).unwrap();
    assert_eq!(status, 200, "{v}");
    let renewed = chain_of(&v);
    webpki_verifies(&renewed, &ca.bundle_pem()).unwrap();
    let renewed_certs = certs(&renewed);
    let (_, leaf) = x509_parser::parse_x509_certificate(&renewed_certs[0]).unwrap();
    assert_eq!(
        leaf.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&new_key).as_slice()
    );
    assert_ne!(certs(&renewed)[0], certs(&chain)[0]);
    assert_eq!(
        srv.metric("warden_ca_issuances_total{kind=\"renewal\",result=\"issued\"}"),
        1.0
    );

    // The offline-issued certificate renews too.
    let out = ca.issue(&ca.id("/batch"), None);
    let (c2, k2) = (
        std::fs::read_to_string(out.join("cert.pem")).unwrap(),
        std::fs::read_to_string(out.join("key.pem")).unwrap(),
    );
    let (_, c) = csr(&[&ca.id("/batch")]);
    assert_eq!(
        certify(srv.api, &ca.bundle_pem(), Some((&c2, &k2)), &c, None)
            .unwrap()
            .0,
        200
    );
}

#[test]
fn renewal_cannot_change_the_identity() {
    let ca = Ca::init("example.org");
    let srv = ca.serve();
    let (chain, key) = bootstrap(&ca, &srv, &ca.id("/web"));
    let (_, c) = csr(&[&ca.id("/db")]);
    let (status, v) = certify(srv.api, &ca.bundle_pem(), Some((&chain, &key)), &c, None).unwrap();
    assert_eq!(
        (status, problem_reason(&v).as_str()),
        (400, "csr-san-mismatch"),
        "{v}"
    );
}

#[test]
fn a_denied_id_is_refused_issuance_and_renewal_while_the_server_runs_until_allowed() {
    let ca = Ca::init("example.org");
    let srv = ca.serve();
    let id = ca.id("/web");
    let (chain, key) = bootstrap(&ca, &srv, &id);
    let token = ca.token(&id);
    run_ok(&["ca", "deny", "--dir", ca.dir(), "--spiffe-id", &id]);

    let (_, c) = csr(&[&id]);
    let (status, v) = certify(srv.api, &ca.bundle_pem(), Some((&chain, &key)), &c, None).unwrap();
    assert_eq!((status, problem_reason(&v).as_str()), (403, "denied"));
    let (status, v) = certify(srv.api, &ca.bundle_pem(), None, &c, Some(&token)).unwrap();
    assert_eq!((status, problem_reason(&v).as_str()), (403, "denied"));
    let out = run(&[
        "ca",
        "issue",
        "--dir",
        ca.dir(),
        "--spiffe-id",
        &id,
        "--out-dir",
        s(&ca.tmp.path().join("o")),
    ]);
    assert!(!out.status.success(), "offline issuance is refused too");
    // Another identity is unaffected.
    let (_, other) = csr(&[&ca.id("/api")]);
    let t2 = ca.token(&ca.id("/api"));
    assert_eq!(
        certify(srv.api, &ca.bundle_pem(), None, &other, Some(&t2))
            .unwrap()
            .0,
        200
    );

    run_ok(&["ca", "allow", "--dir", ca.dir(), "--spiffe-id", &id]);
    let (status, _) = certify(srv.api, &ca.bundle_pem(), Some((&chain, &key)), &c, None).unwrap();
    assert_eq!(status, 200);
    // The refused attempt did not use up the token.
    assert_eq!(
        certify(srv.api, &ca.bundle_pem(), None, &c, Some(&token))
            .unwrap()
            .0,
        200
    );
}

#[test]
fn an_expired_svid_cannot_renew() {
    let ca = Ca::init("example.org");
    let srv = ca.serve();
    let id = ca.id("/web");
    let out = ca.issue(&id, Some("1s"));
    let chain = std::fs::read_to_string(out.join("cert.pem")).unwrap();
    let key = std::fs::read_to_string(out.join("key.pem")).unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    let (_, c) = csr(&[&id]);
    let r = certify(srv.api, &ca.bundle_pem(), Some((&chain, &key)), &c, None);
    assert!(
        r.is_err(),
        "an expired certificate fails the handshake: {r:?}"
    );
    assert!(wait_for(Duration::from_secs(5), || srv.metric(
        "warden_ca_handshake_failures_total{reason=\"cert_expired\"}"
    ) == 1.0));
}

#[test]
fn certificates_from_a_foreign_ca_or_with_two_uri_sans_fail_the_handshake() {
    let ca = Ca::init("example.org");
    let other = Ca::init("example.org");
    let srv = ca.serve();
    let id = ca.id("/web");
    let foreign = other.issue(&id, None);
    let fc = std::fs::read_to_string(foreign.join("cert.pem")).unwrap();
    let fk = std::fs::read_to_string(foreign.join("key.pem")).unwrap();
    let (_, c) = csr(&[&id]);
    assert!(certify(srv.api, &ca.bundle_pem(), Some((&fc, &fk)), &c, None).is_err());
    // Same subject names as ours, other keys: webpki finds the namesake issuer and the signature fails.
    assert!(wait_for(Duration::from_secs(5), || {
        srv.metric("warden_ca_handshake_failures_total{reason=\"unknown_issuer\"}")
            + srv.metric("warden_ca_handshake_failures_total{reason=\"bad_signature\"}")
            == 1.0
    }));

    let (tc, tk) = forge_leaf(&ca.dir, svid_params(&[&id, &ca.id("/admin")]));
    assert!(certify(srv.api, &ca.bundle_pem(), Some((&tc, &tk)), &c, None).is_err());
    assert!(wait_for(Duration::from_secs(5), || srv.metric(
        "warden_ca_handshake_failures_total{reason=\"uri_san_count\"}"
    ) == 1.0));
}

#[test]
fn each_bad_csr_class_gets_its_own_4xx_and_no_certificate() {
    let ca = Ca::init("example.org");
    let srv = ca.serve();
    let id = ca.id("/web");
    let token = ca.token(&id);
    let bundle = ca.bundle_pem();

    let (key, good) = csr(&[&id]);
    let mut der = certs_like_csr(&good);
    let last = der.len() - 1;
    der[last] ^= 1;
    let bad_sig = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "garbage",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
            400,
            "csr-malformed",
        ),
        ("not pem", "hello".into(), 400, "csr-malformed"),
        ("bad signature", bad_sig, 400, "csr-bad-signature"),
        (
            "ed25519 key",
            csr_with_key(&ed, &[&id]),
            400,
            "csr-key-type",
        ),
        (
            "p-384 key",
            csr_with_key(&p384, &[&id]),
            400,
            "csr-key-type",
        ),
        (
            "other id",
            csr_with_key(&key, &[&ca.id("/admin")]),
            400,
            "csr-san-mismatch",
        ),
        (
            "dns san",
            csr_with_key(&key, &["DNS:web.example.org"]),
            400,
            "csr-san-mismatch",
        ),
        (
            "two sans",
            csr_with_key(&key, &[&id, &ca.id("/admin")]),
            400,
            "csr-san-count",
        ),
        (
            "id plus dns",
            csr_with_key(&key, &[&id, "DNS:web"]),
            400,
            "csr-san-count",
        ),
        ("no san", csr_with_key(&key, &[]), 400, "csr-san-count"),
    ];
    for (what, c, status, reason) in &cases {
        let (got, v) = certify(srv.api, &bundle, None, c, Some(&token)).unwrap();
        assert_eq!(
            (got, problem_reason(&v).as_str()),
            (*status, *reason),
            "{what}: {v}"
        );
        assert!(v.get("certificate_chain").is_none(), "{what}");
        assert_eq!(
            v["status"], *status,
            "{what}: problem+json carries the status"
        );
        assert!(
            !v["detail"].as_str().unwrap_or("").is_empty(),
            "{what}: says why"
        );
    }

    // Not a certify request at all, and an oversized body.
    let (status, body) =
        https(srv.api, &bundle, None, "POST", "/v1/certify", b"{not json").unwrap();
    assert_eq!(status, 400, "{body}");
    let huge = format!("{{\"csr\":\"{}\"}}", "A".repeat(200 * 1024));
    let (status, body) = https(
        srv.api,
        &bundle,
        None,
        "POST",
        "/v1/certify",
        huge.as_bytes(),
    )
    .unwrap();
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("body-too-large"), "{body}");

    assert_eq!(
        srv.metric("warden_ca_refusals_total{reason=\"csr_key_type\"}"),
        2.0
    );
    assert_eq!(
        srv.metric("warden_ca_refusals_total{reason=\"csr_malformed\"}"),
        2.0
    );
    assert_eq!(
        srv.metric("warden_ca_issuances_total{kind=\"bootstrap\",result=\"issued\"}"),
        0.0
    );
    // None of that used the token up.
    assert_eq!(
        certify(srv.api, &bundle, None, &good, Some(&token))
            .unwrap()
            .0,
        200
    );
}

fn certs_like_csr(pem_text: &str) -> Vec<u8> {
    pem::parse(pem_text).unwrap().into_contents()
}

#[test]
fn used_tokens_stay_used_across_a_restart() {
    let ca = Ca::init("example.org");
    let id = ca.id("/web");
    let token = ca.token(&id);
    let (_, c) = csr(&[&id]);
    {
        let srv = ca.serve();
        assert_eq!(
            certify(srv.api, &ca.bundle_pem(), None, &c, Some(&token))
                .unwrap()
                .0,
            200
        );
        assert!(srv.terminate().success());
    }
    let srv = ca.serve();
    let (status, v) = certify(srv.api, &ca.bundle_pem(), None, &c, Some(&token)).unwrap();
    assert_eq!((status, problem_reason(&v).as_str()), (401, "token-used"));
}

#[test]
fn bundle_is_served_as_pem_and_as_a_spiffe_bundle() {
    let ca = Ca::init("example.org");
    let srv = ca.serve();
    let bundle = ca.bundle_pem();
    let (status, pem_body) = https(srv.api, &bundle, None, "GET", "/v1/bundle", b"").unwrap();
    assert_eq!((status, pem_body.as_str()), (200, bundle.as_str()));
    let (status, json) = https(
        srv.api,
        &bundle,
        None,
        "GET",
        "/v1/bundle?format=spiffe",
        b"",
    )
    .unwrap();
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&json).unwrap();
    let key = &v["keys"][0];
    assert_eq!(key["use"], "x509-svid");
    assert_eq!(key["kty"], "EC");
    assert_eq!(key["crv"], "P-256");
    use base64::Engine;
    let x5c = base64::engine::general_purpose::STANDARD
        .decode(key["x5c"][0].as_str().unwrap())
        .unwrap();
    assert_eq!(x5c, certs(&bundle)[0].as_ref());
    assert!(v["spiffe_refresh_hint"].as_u64().is_some());
}

#[test]
fn admin_answers_live_ready_and_metrics_with_stable_names() {
    let ca = Ca::init("example.org");
    let srv = ca.serve();
    assert_eq!(srv.admin_get("/live").0, 200);
    assert_eq!(srv.admin_get("/ready").0, 200);
    let (status, body) = srv.admin_get("/metrics");
    assert_eq!(status, 200);
    for name in [
        "warden_ca_issuances_total",
        "warden_ca_certificate_expiry_timestamp_seconds{cert=\"intermediate\"}",
        "warden_ca_certificate_expiry_timestamp_seconds{cert=\"root\"}",
        "warden_ca_certificate_expiry_timestamp_seconds{cert=\"serving\"}",
    ] {
        assert!(body.contains(name), "{name} missing from:\n{body}");
    }
    let serving = srv.metric("warden_ca_certificate_expiry_timestamp_seconds{cert=\"serving\"}");
    let now = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
    assert!(serving > now && serving <= now + 3700.0);
    assert_eq!(srv.admin_get("/nope").0, 404);
    // The admin port is plain HTTP and not the API port.
    assert_ne!(srv.admin, srv.api);
}

#[test]
fn sigterm_stops_the_server_with_exit_0() {
    let ca = Ca::init("example.org");
    let srv = ca.serve();
    assert_eq!(srv.terminate().code(), Some(0));
}

#[test]
fn the_cli_client_bootstraps_and_renews() {
    let ca = Ca::init("example.org");
    let srv = ca.serve();
    let id = ca.id("/web");
    let token = ca.token(&id);
    let out = ca.tmp.path().join("wl");
    let server = format!("https://{}", srv.api);
    let bundle = s(&ca.dir.join("bundle.pem")).to_owned();
    let certify_cli = |how: &[&str]| {
        let mut args = vec![
            "ca",
            "certify",
            "--server",
            &server,
            "--bundle",
            &bundle,
            "--spiffe-id",
            &id,
            "--out-dir",
            s(&out),
        ];
        args.extend_from_slice(how);
        run(&args)
    };
    let succeeds = |o: std::process::Output| {
        assert!(
            o.status.success(),
            "certify failed: {}",
            String::from_utf8_lossy(&o.stderr)
        )
    };
    succeeds(certify_cli(&["--token", &token]));
    let first = std::fs::read_to_string(out.join("cert.pem")).unwrap();
    webpki_verifies(&first, &ca.bundle_pem()).unwrap();
    succeeds(certify_cli(&["--renew-from", s(&out)]));
    let second = std::fs::read_to_string(out.join("cert.pem")).unwrap();
    assert_ne!(first, second);
    // A crash between the key's rename and the certificate's leaves the new
    // key beside the certificate still in cert.tmp: renewing finishes it.
    std::fs::rename(out.join("cert.pem"), out.join("cert.tmp")).unwrap();
    succeeds(certify_cli(&["--renew-from", s(&out)]));
    assert_ne!(
        std::fs::read_to_string(out.join("cert.pem")).unwrap(),
        second
    );
    // A certificate that is not the key's is refused with the reason.
    std::fs::write(out.join("cert.pem"), &first).unwrap();
    let o = certify_cli(&["--renew-from", s(&out)]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("do not belong together"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = certify_cli(&["--token", &token]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("token-used"));
}

/// A TLS server on 127.0.0.1:0 that presents `chain`/`key` and then drops
/// the connection: stands in for an impostor CA.
fn impostor(chain: &str, key: &str) -> std::net::SocketAddr {
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(chain.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let config = std::sync::Arc::new(config);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut sock) = stream else { continue };
            let mut conn = rustls::ServerConnection::new(config.clone()).unwrap();
            let _ = conn.complete_io(&mut sock);
        }
    });
    addr
}

#[test]
fn the_library_client_bootstraps_renews_fetches_the_bundle_and_insists_on_the_ca_identity() {
    use warden_ca::client::{CaClient, ClientError};
    use warden_config::{SpiffeId, TrustDomain};
    let ca = Ca::init("example.org");
    let srv = ca.serve();
    let td = TrustDomain::parse("example.org").unwrap();
    let id = SpiffeId::parse(&ca.id("/web")).unwrap();
    let token = ca.token(id.as_str());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = CaClient::new(&srv.api.to_string(), td.clone(), &ca.bundle_pem()).unwrap();

    let creds = rt
        .block_on(client.bootstrap(&id, &token, Some(Duration::from_secs(600))))
        .unwrap();
    assert_eq!(creds.spiffe_id, id);
    assert_eq!(
        (creds.not_after - creds.not_before).whole_seconds(),
        600 + 30
    );
    webpki_verifies(&creds.chain_pem, &ca.bundle_pem()).unwrap();
    let renewed = rt.block_on(client.renew(&creds, None)).unwrap();
    assert_ne!(renewed.key_pem, creds.key_pem, "a renewal makes a new key");
    assert_eq!(rt.block_on(client.fetch_bundle()).unwrap(), ca.bundle_pem());

    // A server with a valid SVID from the same CA, but not the CA's identity.
    let web = ca.issue(&ca.id("/web2"), None);
    let fake = impostor(
        &std::fs::read_to_string(web.join("cert.pem")).unwrap(),
        &std::fs::read_to_string(web.join("key.pem")).unwrap(),
    );
    let fooled = CaClient::new(&fake.to_string(), td.clone(), &ca.bundle_pem()).unwrap();
    let r = rt.block_on(fooled.fetch_bundle());
    assert!(
        matches!(&r, Err(ClientError::Unreachable { detail, .. })
            if detail.contains("not valid for name") && detail.contains("spiffe://example.org/web2")),
        "{r:?}"
    );

    // A client that trusts another CA refuses this one.
    let other = Ca::init("example.org");
    let wary = CaClient::new(&srv.api.to_string(), td, &other.bundle_pem()).unwrap();
    assert!(matches!(
        rt.block_on(wary.fetch_bundle()),
        Err(ClientError::Unreachable { .. })
    ));
}

/// POST on an open TLS stream, keeping the connection.
fn post_over<S: std::io::Read + std::io::Write>(
    s: &mut S,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: ca\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()?;
    read_h1_response(s)
}

#[test]
fn an_expired_svid_cannot_renew_by_resuming_a_session_or_reusing_a_connection() {
    use std::io::Write as _;
    let ca = Ca::init("example.org");
    let srv = ca.serve();
    let id = ca.id("/web");
    let out = ca.issue(&id, Some("3s"));
    let (chain, key) = (
        std::fs::read_to_string(out.join("cert.pem")).unwrap(),
        std::fs::read_to_string(out.join("key.pem")).unwrap(),
    );
    let config = std::sync::Arc::new(client_config(&ca.bundle_pem(), Some((&chain, &key))));
    let connect = || {
        let conn = rustls::ClientConnection::new(config.clone(), "ca.invalid".try_into().unwrap())
            .unwrap();
        let sock = std::net::TcpStream::connect(srv.api).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        rustls::StreamOwned::new(conn, sock)
    };
    let (_, c) = csr(&[&id]);
    let body = serde_json::json!({ "csr": c }).to_string();
    let mut kept = connect();
    assert_eq!(post_over(&mut kept, "/v1/certify", &body).unwrap().0, 200);
    // Whole seconds past NotAfter: webpki's expiry check has 1 s resolution.
    std::thread::sleep(Duration::from_millis(4600));

    // The same connection, after the certificate expired.
    let (status, text) = post_over(&mut kept, "/v1/certify", &body).unwrap();
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("svid-expired"), "{text}");
    // A new connection with the same client config (which would resume if it could).
    let mut again = connect();
    let r = post_over(&mut again, "/v1/certify", &body);
    assert!(r.is_err(), "no resumption past expiry: {r:?}");
    let _ = again.flush();
}

#[test]
fn an_expired_intermediate_signs_nothing_and_the_server_will_not_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    run_ok(&[
        "ca",
        "init",
        "--dir",
        s(&dir),
        "--trust-domain",
        "example.org",
        "--intermediate-ttl",
        "2s",
    ]);
    let out = tmp.path().join("o");
    run_ok(&[
        "ca",
        "issue",
        "--dir",
        s(&dir),
        "--spiffe-id",
        "spiffe://example.org/a",
        "--out-dir",
        s(&out),
    ]);
    let chain = std::fs::read_to_string(out.join("cert.pem")).unwrap();
    let c = certs(&chain);
    let (_, leaf) = x509_parser::parse_x509_certificate(&c[0]).unwrap();
    let (_, int) = x509_parser::parse_x509_certificate(&c[1]).unwrap();
    assert_eq!(
        leaf.validity().not_after,
        int.validity().not_after,
        "the leaf is capped at the intermediate's expiry"
    );
    std::thread::sleep(Duration::from_millis(2500));
    let o = run(&[
        "ca",
        "issue",
        "--dir",
        s(&dir),
        "--spiffe-id",
        "spiffe://example.org/a",
        "--out-dir",
        s(&out),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("intermediate CA certificate expired"));
    let o = run(&[
        "ca",
        "serve",
        "--dir",
        s(&dir),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("ready"));
}

#[test]
fn certify_requests_over_a_callers_limit_get_429_with_retry_after_and_stay_out_of_the_trail() {
    let ca = Ca::init("example.org");
    let path = ca.dir.join("ca.yaml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("rate_limits: {per_source: 8, per_token: 2, per_identity: 2}\n");
    std::fs::write(path, text).unwrap();
    let srv = ca.serve();
    let bundle = ca.bundle_pem();
    let id = ca.id("/web");
    // A token: two tries (a CSR for another ID, say), then 429 even with a good CSR.
    let token = ca.token(&id);
    let (_, wrong) = csr(&[&ca.id("/other")]);
    for _ in 0..2 {
        let (status, _) = certify(srv.api, &bundle, None, &wrong, Some(&token)).unwrap();
        assert_eq!(status, 400);
    }
    let (_, good) = csr(&[&id]);
    let (status, v) = certify(srv.api, &bundle, None, &good, Some(&token)).unwrap();
    assert_eq!(status, 429, "{v}");
    assert_eq!(problem_reason(&v), "rate-limited");
    assert!(v["detail"].as_str().unwrap().contains("join token"), "{v}");
    // Another token is not held back meanwhile.
    let other = ca.token(&ca.id("/api"));
    let (_, c) = csr(&[&ca.id("/api")]);
    let (status, v) = certify(srv.api, &bundle, None, &c, Some(&other)).unwrap();
    assert_eq!(status, 200, "{v}");
    // Renewals of one identity: two, then 429.
    let key = {
        let t = ca.token(&ca.id("/renewer"));
        let (k, c) = csr(&[&ca.id("/renewer")]);
        let (s, v) = certify(srv.api, &bundle, None, &c, Some(&t)).unwrap();
        assert_eq!(s, 200, "{v}");
        (
            v["certificate_chain"].as_str().unwrap().to_owned(),
            k.serialize_pem(),
        )
    };
    let (_, c) = csr(&[&ca.id("/renewer")]);
    for want in [200, 200, 429] {
        let (s, v) = certify(srv.api, &bundle, Some((&key.0, &key.1)), &c, None).unwrap();
        assert_eq!(s, want, "{v}");
    }
    // A source address: 8 requests a minute from 127.0.0.1, whatever they are.
    let mut last = None;
    for _ in 0..4 {
        last = Some(
            std::process::Command::new("curl")
                .args(["-sk", "-i", "-X", "POST", "--data", "{}"])
                .arg(format!("https://{}/v1/certify", srv.api))
                .output()
                .unwrap(),
        );
    }
    let head = String::from_utf8_lossy(&last.unwrap().stdout).to_lowercase();
    assert!(
        head.starts_with("http/2 429") || head.starts_with("http/1.1 429"),
        "{head}"
    );
    assert!(head.contains("\nretry-after: "), "{head}");
    assert!(srv.metric("warden_ca_refusals_total{reason=\"rate_limited\"}") >= 3.0);
    // Limited requests are not in the trail: it is what the limits bound.
    let trail = std::fs::read_to_string(ca.dir.join("audit.jsonl")).unwrap();
    assert!(!trail.contains("rate_limited"));
}
