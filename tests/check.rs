//! `warden check` on proxy configs: warnings about rules that can never
//! match are printed as `file:line:column: warning: ...` and keep exit 0.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::{Ca, run, s};

#[test]
fn check_warns_about_rules_that_can_never_match_and_still_exits_0() {
    let ca = Ca::init("example.org");
    let creds = ca.issue(&ca.id("/ns/web/sa/web"), None);
    let f = ca.tmp.path().join("p.yaml");
    let text = format!(
        "identity: {{cert: {c}/cert.pem, key: {c}/key.pem, bundle: {c}/bundle.pem}}
admin: 127.0.0.1:0
inbound:
  - name: web
    listen: 127.0.0.1:8443
    app: 127.0.0.1:8080
    policy:
      rules:
        - {{name: everyone, action: allow, from: [spiffe://example.org/*]}}
        - {{name: admin-only-ops, action: deny, not_from: [spiffe://example.org/ns/ops/sa/admin], paths: [/admin/*]}}
        - {{name: partner, action: allow, from: [spiffe://partner.org/*], methods: [get]}}
        - {{name: same, action: allow, from: [spiffe://example.org/*], paths: [/x/*], not_paths: [/x/*]}}
        - {{name: shop-admin, action: allow, from: [spiffe://example.org/ns/shop/*], paths: [/admin/*]}}
",
        c = s(&creds)
    );
    std::fs::write(&f, text).unwrap();
    let out = run(&["check", "--config", s(&f)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let p = f.display();
    for want in [
        format!(
            "{p}:11:49: warning: spiffe://partner.org/* is outside this proxy's trust domain example.org"
        ),
        format!("{p}:11:84: warning: method \"get\" is read as \"GET\""),
        format!(
            "{p}:12:11: warning: rule \"same\" can never match: every path in `paths` is excluded by `not_paths`"
        ),
        format!(
            "{p}:13:11: warning: rule \"shop-admin\" never lets a request through: deny rule \"admin-only-ops\""
        ),
    ] {
        assert!(err.contains(&want), "{want}\n{err}");
    }
    assert!(String::from_utf8_lossy(&out.stdout).ends_with(": ok\n"));
}

#[test]
fn check_warns_about_model_routes_whose_probing_defence_is_disarmed() {
    let ca = Ca::init("example.org");
    let creds = ca.issue(&ca.id("/ns/web/sa/web"), None);
    let f = ca.tmp.path().join("m.yaml");
    let text = format!(
        "identity: {{cert: {c}/cert.pem, key: {c}/key.pem, bundle: {c}/bundle.pem}}
admin: 127.0.0.1:0
inbound:
  - name: models
    listen: 127.0.0.1:8443
    app: 127.0.0.1:8080
    model_api:
      - name: open
        paths: [/a/*]
        api: openai
      - name: default-size
        paths: [/b/*]
        api: openai
        detection: {{report_to_ca: false}}
      - name: huge
        paths: [/c/*]
        api: openai
        detection: {{hidden_size: 1000000}}
      - name: closed
        paths: [/d/*]
        api: openai
        limits:
          identity: {{max_top_logprobs: 0, max_logit_bias: 0}}
      - name: budgeted
        paths: [/e/*]
        api: openai
        limits:
          identity: {{logit_bias_per_day: 1000, max_top_logprobs: 0}}
      - name: classify
        paths: [/f/*]
        api: predict
        detection: {{history: 64}}
      - name: small-reference
        paths: [/g/*]
        api: predict
        input_width: 8
        detection: {{reference: few.jsonl}}
",
        c = s(&creds)
    );
    std::fs::write(&f, text).unwrap();
    // 40 natural vectors of 8 inputs: enough to load, too few for the
    // outlier test (8 per input).
    let rows: String = (0..40)
        .map(|i| format!("[{}]\n", vec![format!("{}.5", i % 7); 8].join(",")))
        .collect();
    std::fs::write(ca.tmp.path().join("few.jsonl"), rows).unwrap();
    let out = run(&["check", "--config", s(&f)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let p = f.display();
    for want in [
        format!(
            "{p}:8:15: warning: route \"open\" allows logprobs and logit_bias with neither detection nor"
        ),
        format!(
            "{p}:14:20: warning: detection on route \"default-size\" allows logprobs and logit_bias but names no hidden_size"
        ),
        format!(
            "{p}:18:20: warning: hidden_size on route \"huge\" is larger than any served model's"
        ),
        format!(
            "{p}:37:32: warning: reference has 40 vectors, fewer than the 64 its outlier test needs"
        ),
    ] {
        assert!(err.contains(&want), "{want}\n{err}");
    }
    assert!(
        !err.contains("\"closed\"") && !err.contains("\"budgeted\""),
        "{err}"
    );
}

#[test]
fn a_reference_of_texts_serves_an_embeddings_route_and_is_refused_on_a_predict_route() {
    let ca = Ca::init("example.org");
    let creds = ca.issue(&ca.id("/ns/web/sa/web"), None);
    let f = ca.tmp.path().join("t.yaml");
    let route =
        |api: &str| embeddings_route(&creds, api, "{hidden_size: 4096, reference: texts.jsonl}");
    let texts: String = (0..40)
        .map(|i| {
            format!(
                "{:?}\n",
                format!("natural question number {i} about invoices")
            )
        })
        .collect();
    std::fs::write(ca.tmp.path().join("texts.jsonl"), texts).unwrap();

    std::fs::write(&f, route("openai")).unwrap();
    let out = run(&["check", "--config", s(&f)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("reference"), "{err}");

    std::fs::write(&f, route("predict")).unwrap();
    let out = run(&["check", "--config", s(&f)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    let want = format!(
        "error: {}:11:51: a reference of texts is for api: openai",
        f.display()
    );
    assert!(err.contains(&want), "{want}\n{err}");
}

#[test]
fn an_embeddings_route_without_max_coverage_is_a_warning_and_max_coverage_on_predict_an_error() {
    let ca = Ca::init("example.org");
    let creds = ca.issue(&ca.id("/ns/web/sa/web"), None);
    let f = ca.tmp.path().join("e.yaml");
    let route = |api: &str, detection: &str| embeddings_route(&creds, api, detection);
    std::fs::write(&f, route("openai", "{history: 64}")).unwrap();
    let out = run(&["check", "--config", s(&f)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let want = format!(
        "{}:11:20: warning: detection on route \"embed\" does not bound how much of the embedding space a caller is answered in",
        f.display()
    );
    assert!(err.contains(&want), "{want}\n{err}");

    std::fs::write(&f, route("openai", "{max_coverage: 0.7}")).unwrap();
    let out = run(&["check", "--config", s(&f)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("embedding space"), "{err}");

    std::fs::write(&f, route("openai", "{max_coverage: 1.5}")).unwrap();
    let out = run(&["check", "--config", s(&f)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("max_coverage is a share of the embedding space: in (0, 1]"),
        "{err}"
    );

    std::fs::write(&f, route("predict", "{max_coverage: 0.5}")).unwrap();
    let out = run(&["check", "--config", s(&f)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("max_coverage bounds the embeddings an openai route answers"),
        "{err}"
    );
}

/// A proxy config whose one model route serves `/v1/embeddings` with `api`
/// and `detection` (a YAML flow mapping), on line 11 from column 20.
fn embeddings_route(creds: &std::path::Path, api: &str, detection: &str) -> String {
    format!(
        "identity: {{cert: {c}/cert.pem, key: {c}/key.pem, bundle: {c}/bundle.pem}}
admin: 127.0.0.1:0
inbound:
  - name: models
    listen: 127.0.0.1:8443
    app: 127.0.0.1:8080
    model_api:
      - name: embed
        paths: [/v1/embeddings]
        api: {api}
        detection: {detection}
",
        c = s(creds)
    )
}
