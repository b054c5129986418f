//! `POST /v1/deny` on `warden ca serve`: identities listed in `deny_reporters`
//! ask the CA, over mTLS, to deny another identity; everyone else is refused;
//! every accepted report is in the audit trail with its reporter and reason.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::*;
use serde_json::{Value, json};

const REPORTERS: &str = "spiffe://example.org/ns/security/*";

/// A CA whose `ca.yaml` lets `REPORTERS` report.
fn ca_with_reporters() -> Ca {
    let ca = Ca::init("example.org");
    let path = ca.dir.join("ca.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let edited = text.replace(
        "deny_reporters: []",
        &format!("deny_reporters: [{REPORTERS}]"),
    );
    assert_ne!(text, edited, "ca init writes `deny_reporters: []`");
    std::fs::write(&path, edited).unwrap();
    ca
}

/// `warden ca issue` for `path`: (chain, key).
fn svid(ca: &Ca, path: &str) -> (String, String) {
    let out = ca.issue(&ca.id(path), None);
    let creds = Creds { dir: out };
    (creds.chain(), creds.key())
}

fn post_deny(
    ca: &Ca,
    srv: &Server,
    who: ClientCert<'_>,
    body: &[u8],
) -> Result<(u16, Value), String> {
    let (status, text) = https(srv.api, &ca.bundle_pem(), who, "POST", "/v1/deny", body)?;
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, v))
}

fn deny(ca: &Ca, srv: &Server, who: ClientCert<'_>, target: &str, reason: &str) -> (u16, Value) {
    let body = json!({ "spiffe_id": target, "reason": reason }).to_string();
    post_deny(ca, srv, who, body.as_bytes()).unwrap()
}

/// A renewal of `(chain, key)`'s identity: the status and the problem reason.
fn renew(ca: &Ca, srv: &Server, id: &str, (chain, key): (&str, &str)) -> (u16, String) {
    let (_, c) = csr(&[id]);
    let (status, v) = certify(srv.api, &ca.bundle_pem(), Some((chain, key)), &c, None).unwrap();
    (status, problem_reason(&v))
}

fn trail(ca: &Ca) -> Vec<Value> {
    std::fs::read_to_string(ca.dir.join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn audit_verifies(ca: &Ca) {
    run_ok(&["ca", "audit", "verify", "--dir", ca.dir()]);
}

#[test]
fn a_reporter_denies_an_identity_whose_renewal_is_then_refused() {
    let ca = ca_with_reporters();
    let srv = ca.serve();
    let (gc, gk) = svid(&ca, "/ns/security/sa/guard");
    let target = ca.id("/ns/shop/sa/scraper");
    let (tc, tk) = svid(&ca, "/ns/shop/sa/scraper");
    assert_eq!(renew(&ca, &srv, &target, (&tc, &tk)).0, 200);

    let reason = "extraction suspected: score 0.97 over 10m";
    let (status, v) = deny(&ca, &srv, Some((&gc, &gk)), &target, reason);
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v,
        json!({ "spiffe_id": target, "denied": true, "already_denied": false })
    );
    assert_eq!(
        renew(&ca, &srv, &target, (&tc, &tk)),
        (403, "denied".to_owned())
    );

    // Again: still 200, and it says so.
    let (status, v) = deny(&ca, &srv, Some((&gc, &gk)), &target, "still at it");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["already_denied"], true);
    assert_eq!(
        srv.metric("warden_ca_deny_reports_total{result=\"denied\"}"),
        1.0
    );
    assert_eq!(
        srv.metric("warden_ca_deny_reports_total{result=\"already_denied\"}"),
        1.0
    );

    audit_verifies(&ca);
    let denials: Vec<Value> = trail(&ca)
        .into_iter()
        .filter(|e| e["event"] == "denied")
        .collect();
    assert_eq!(denials.len(), 2, "{denials:?}");
    for (e, (changed, why)) in denials.iter().zip([(true, reason), (false, "still at it")]) {
        assert_eq!(e["spiffe_id"], target.as_str(), "{e}");
        assert_eq!(e["reporter"], ca.id("/ns/security/sa/guard"), "{e}");
        assert_eq!(e["reason"], why, "{e}");
        assert_eq!(e["changed"], changed, "{e}");
    }

    // `warden ca allow` undoes a reported deny like any other.
    run_ok(&["ca", "allow", "--dir", ca.dir(), "--spiffe-id", &target]);
    assert_eq!(renew(&ca, &srv, &target, (&tc, &tk)).0, 200);
}

#[test]
fn callers_that_are_not_reporters_are_refused_403_and_deny_nothing() {
    let ca = ca_with_reporters();
    let srv = ca.serve();
    let target = ca.id("/ns/shop/sa/api");
    let (tc, tk) = svid(&ca, "/ns/shop/sa/api");
    let (wc, wk) = svid(&ca, "/ns/shop/sa/web");
    // Not below /ns/security/: whole segments only.
    let (xc, xk) = svid(&ca, "/ns/securityx/sa/guard");

    let before = trail(&ca).len();
    let (status, v) = deny(&ca, &srv, None, &target, "no certificate");
    assert_eq!(
        (status, problem_reason(&v).as_str()),
        (403, "not-a-reporter")
    );
    assert_eq!(
        trail(&ca).len(),
        before,
        "anyone can send that: not written"
    );
    for (who, (c, k)) in [
        ("/ns/shop/sa/web", (&wc, &wk)),
        ("/ns/securityx/sa/guard", (&xc, &xk)),
    ] {
        let (status, v) = deny(&ca, &srv, Some((c, k)), &target, "not mine to ask");
        assert_eq!(
            (status, problem_reason(&v).as_str()),
            (403, "not-a-reporter"),
            "{who}: {v}"
        );
        assert!(
            v["detail"].as_str().unwrap().contains("deny_reporters"),
            "{v}"
        );
        let last = trail(&ca).pop().unwrap();
        assert_eq!(
            (
                &last["event"],
                &last["kind"],
                &last["reason"],
                &last["spiffe_id"]
            ),
            (
                &json!("refused"),
                &json!("deny"),
                &json!("not_a_reporter"),
                &json!(ca.id(who))
            ),
        );
    }
    assert_eq!(renew(&ca, &srv, &target, (&tc, &tk)).0, 200);
    assert_eq!(
        srv.metric("warden_ca_refusals_total{reason=\"not_a_reporter\"}"),
        3.0
    );
    assert_eq!(
        srv.metric("warden_ca_deny_reports_total{result=\"refused\"}"),
        3.0
    );
    audit_verifies(&ca);

    // Without `deny_reporters` (the default), nobody may report.
    let plain = Ca::init("example.org");
    let srv = plain.serve();
    let (gc, gk) = svid(&plain, "/ns/security/sa/guard");
    let (status, v) = deny(
        &plain,
        &srv,
        Some((&gc, &gk)),
        &plain.id("/ns/shop/sa/api"),
        "x",
    );
    assert_eq!(
        (status, problem_reason(&v).as_str()),
        (403, "not-a-reporter")
    );
}

#[test]
fn a_denied_reporter_can_deny_nobody() {
    let ca = ca_with_reporters();
    let srv = ca.serve();
    let guard = ca.id("/ns/security/sa/guard");
    let (gc, gk) = svid(&ca, "/ns/security/sa/guard");
    run_ok(&["ca", "deny", "--dir", ca.dir(), "--spiffe-id", &guard]);
    let (status, v) = deny(&ca, &srv, Some((&gc, &gk)), &ca.id("/ns/shop/sa/api"), "x");
    assert_eq!(
        (status, problem_reason(&v).as_str()),
        (403, "denied"),
        "{v}"
    );
    assert!(
        trail(&ca)
            .iter()
            .all(|e| e["spiffe_id"] != ca.id("/ns/shop/sa/api"))
    );
}

#[test]
fn reporters_cannot_deny_each_other_or_themselves() {
    let ca = ca_with_reporters();
    let srv = ca.serve();
    let (gc, gk) = svid(&ca, "/ns/security/sa/guard");
    for target in ["/ns/security/sa/other-guard", "/ns/security/sa/guard"] {
        let (status, v) = deny(&ca, &srv, Some((&gc, &gk)), &ca.id(target), "x");
        assert_eq!(
            (status, problem_reason(&v).as_str()),
            (400, "bad-target"),
            "{target}: {v}"
        );
    }
    // The guard itself is still fine: it can renew.
    let guard = ca.id("/ns/security/sa/guard");
    assert_eq!(renew(&ca, &srv, &guard, (&gc, &gk)).0, 200);
}

#[test]
fn bad_targets_and_reasons_are_refused_400_and_deny_nothing() {
    let ca = ca_with_reporters();
    let srv = ca.serve();
    let (gc, gk) = svid(&ca, "/ns/security/sa/guard");
    let who = Some((gc.as_str(), gk.as_str()));
    let ok_target = ca.id("/ns/shop/sa/api");
    let long = "r".repeat(201);
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "not an id",
            json!({"spiffe_id": "web", "reason": "x"}),
            "bad-target",
        ),
        (
            "no path",
            json!({"spiffe_id": "spiffe://example.org", "reason": "x"}),
            "bad-target",
        ),
        (
            "dot segment",
            json!({"spiffe_id": "spiffe://example.org/a/../b", "reason": "x"}),
            "bad-target",
        ),
        (
            "percent",
            json!({"spiffe_id": "spiffe://example.org/a%2fb", "reason": "x"}),
            "bad-target",
        ),
        (
            "foreign",
            json!({"spiffe_id": "spiffe://other.org/ns/shop/sa/api", "reason": "x"}),
            "bad-target",
        ),
        (
            "the ca",
            json!({"spiffe_id": "spiffe://example.org/warden/ca", "reason": "x"}),
            "bad-target",
        ),
        (
            "empty reason",
            json!({"spiffe_id": ok_target, "reason": ""}),
            "bad-request",
        ),
        (
            "long reason",
            json!({"spiffe_id": ok_target, "reason": long}),
            "bad-request",
        ),
        (
            "newline",
            json!({"spiffe_id": ok_target, "reason": "a\nb"}),
            "bad-request",
        ),
        (
            "not ascii",
            json!({"spiffe_id": ok_target, "reason": "caf\u{e9}"}),
            "bad-request",
        ),
        ("no reason", json!({"spiffe_id": ok_target}), "bad-request"),
        (
            "extra field",
            json!({"spiffe_id": ok_target, "reason": "x", "ttl": "1h"}),
            "bad-request",
        ),
        ("not an object", json!([ok_target]), "bad-request"),
    ];
    for (what, body, reason) in &cases {
        let (status, v) = post_deny(&ca, &srv, who, body.to_string().as_bytes()).unwrap();
        assert_eq!(
            (status, problem_reason(&v).as_str()),
            (400, *reason),
            "{what}: {v}"
        );
        assert_eq!(v["status"], 400, "{what}");
    }
    let (status, v) = post_deny(&ca, &srv, who, b"{not json").unwrap();
    assert_eq!((status, problem_reason(&v).as_str()), (400, "bad-request"));
    let huge = format!(
        "{{\"spiffe_id\":\"{}\",\"reason\":\"x\"}}",
        "a".repeat(64 * 1024)
    );
    let (status, v) = post_deny(&ca, &srv, who, huge.as_bytes()).unwrap();
    assert_eq!(
        (status, problem_reason(&v).as_str()),
        (413, "body-too-large")
    );
    let (status, _) = https(srv.api, &ca.bundle_pem(), who, "GET", "/v1/deny", b"").unwrap();
    assert_eq!(status, 405);

    assert!(trail(&ca).iter().all(|e| e["event"] != "denied"));
    assert_eq!(
        srv.metric("warden_ca_refusals_total{reason=\"bad_target\"}"),
        6.0
    );
    // Each refusal names its reporter, so each is in the trail.
    let refused = trail(&ca)
        .into_iter()
        .filter(|e| e["event"] == "refused" && e["kind"] == "deny")
        .count();
    assert_eq!(refused, cases.len() + 2);
    audit_verifies(&ca);

    // The longest reason is fine.
    let (status, v) = deny(&ca, &srv, who, &ok_target, &"r".repeat(200));
    assert_eq!(status, 200, "{v}");
}

#[test]
fn the_library_client_reports_a_deny_with_its_current_svid() {
    use std::time::Duration;
    use warden_ca::client::{CaClient, ClientError};
    use warden_config::{SpiffeId, TrustDomain};
    let ca = ca_with_reporters();
    let srv = ca.serve();
    let td = TrustDomain::parse("example.org").unwrap();
    let client = CaClient::new(&srv.api.to_string(), td, &ca.bundle_pem()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bootstrap = |path: &str| {
        let id = SpiffeId::parse(&ca.id(path)).unwrap();
        let token = ca.token(id.as_str());
        rt.block_on(client.bootstrap(&id, &token, Some(Duration::from_secs(600))))
            .unwrap()
    };
    let guard = bootstrap("/ns/security/sa/guard");
    let web = bootstrap("/ns/shop/sa/web");
    let scraper = bootstrap("/ns/shop/sa/scraper");

    rt.block_on(client.report_deny(&guard, &scraper.spiffe_id, "logprob sweep"))
        .unwrap();
    let r = rt.block_on(client.renew(&scraper, None));
    assert!(
        matches!(&r, Err(ClientError::Refused { status: 403, reason, .. }) if reason == "denied"),
        "{r:?}"
    );
    // Idempotent.
    rt.block_on(client.report_deny(&guard, &scraper.spiffe_id, "again"))
        .unwrap();

    let r = rt.block_on(client.report_deny(&web, &guard.spiffe_id, "payback"));
    assert!(
        matches!(&r, Err(ClientError::Refused { status: 403, reason, .. }) if reason == "not-a-reporter"),
        "{r:?}"
    );
    let r = rt.block_on(client.report_deny(&guard, &web.spiffe_id, ""));
    assert!(
        matches!(&r, Err(ClientError::Refused { status: 400, reason, .. }) if reason == "bad-request"),
        "{r:?}"
    );
    rt.block_on(client.renew(&web, None)).unwrap();
    audit_verifies(&ca);
}

#[test]
fn check_reports_a_bad_deny_reporter_with_its_line_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ca.yaml");
    std::fs::write(
        &path,
        "trust_domain: example.org\ndeny_reporters:\n  - spiffe://example.org/ns/security/*\n  - spiffe://other.org/guard\n",
    )
    .unwrap();
    let out = run(&["check", "--config", s(&path)]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:4:5: ", path.display())) && err.contains("trust domain"),
        "{err}"
    );
}
