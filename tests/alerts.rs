//! The alerting rules in `deploy/alerts`: valid for Prometheus (`promtool
//! check rules`), right about when they fire (`promtool test rules`), and
//! about metrics that a real CA, proxy and webhook do export.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::{Ca, Proxy, s};

const RULES: &str = "deploy/alerts/warden.rules.yaml";

/// `promtool ARGS` in `deploy/alerts`; `None` when it is not installed (a
/// failure under CI, where `.ci/run` installs it).
fn promtool(args: &[&str]) -> Option<(bool, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/alerts");
    match Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
    {
        Ok(o) => Some((
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var("CI").map_or(true, |v| v != "true"),
                "promtool is not installed, and CI=true requires it (apt-get install -y prometheus; .ci/run does it)"
            );
            eprintln!("notice: promtool is not installed; rule checks skipped");
            None
        }
        Err(e) => panic!("promtool: {e}"),
    }
}

#[test]
fn the_rules_are_valid_and_fire_when_they_should() {
    let Some((ok, out)) = promtool(&["check", "rules", "warden.rules.yaml"]) else {
        return;
    };
    assert!(ok, "{out}");
    let (ok, out) = promtool(&["test", "rules", "warden.rules.test.yaml"]).unwrap();
    assert!(ok, "{out}");
}

#[test]
fn every_metric_the_rules_name_is_exported_by_the_ca_the_proxy_or_the_webhook() {
    let rules = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(RULES)).unwrap();
    let named: BTreeSet<String> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("warden_"))
        .map(str::to_owned)
        .collect();
    assert!(named.len() >= 6, "{named:?}");
    let ca = Ca::init("example.org");
    let srv = ca.serve();
    let token = ca.tmp.path().join("token");
    std::fs::write(&token, ca.token(&ca.id("/web"))).unwrap();
    let bundle = ca.tmp.path().join("bundle.pem");
    std::fs::write(&bundle, ca.bundle_pem()).unwrap();
    let proxy = Proxy::start(
        ca.tmp.path(),
        &format!(
            "identity:\n  ca_url: https://{}\n  token_file: {}\n  spiffe_id: {}\n  bundle: {}\nadmin: 127.0.0.1:0\ninbound:\n  - name: app\n    listen: 127.0.0.1:0\n    app: 127.0.0.1:9\n",
            srv.api,
            s(&token),
            ca.id("/web"),
            s(&bundle)
        ),
    );
    assert!(common::wait_for(
        std::time::Duration::from_secs(10),
        || proxy.metric("warden_proxy_trust_last_sync_timestamp_seconds") > 0.0
    ));
    let out = ca.tmp.path().join("webhook");
    common::issue_webhook_cert(
        &ca,
        &ca.id("/ns/warden/sa/warden-webhook"),
        "warden-webhook.warden.svc",
        &out,
        None,
    );
    let webhook = common::webhook_from_files(&out, &bundle, &[], true);
    let exported = format!(
        "{}{}{}",
        srv.admin_get("/metrics").1,
        proxy.admin_get("/metrics").1,
        common::admin_get(webhook.addrs["admin"], "/metrics").1
    );
    for name in &named {
        assert!(
            exported.lines().any(|l| l.starts_with(name.as_str())),
            "{name} is named by the rules but exported by none of the CA, the proxy and the webhook"
        );
    }
}
