//! `warden demo`: the first command a new user runs must work and say so.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

#[test]
fn the_demo_runs_every_step_and_exits_0() {
    let out = common::run(&["demo"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "[ok  ] web -> orders: 200",
        "[ok  ] batch -> orders: 403",
        "[ok  ] a client without a certificate: refused at the TLS handshake",
        "[ok  ] certificate rotation under steady traffic",
        ", 0 failed;",
        "[ok  ] model API: analyst over the chat rate",
        "ratelimit-policy: \"identity-requests\"",
        "[ok  ] model API: honest users of the classifier",
        "[ok  ] model extraction: a scraper's random queries: refused (429 abnormal-usage-detected)",
        "[ok  ] model extraction: escalated to the CA",
        "demo: every step behaved as expected",
    ] {
        assert!(text.contains(step), "missing {step:?} in:\n{text}");
    }
    assert!(!text.contains("FAIL"), "{text}");
}
