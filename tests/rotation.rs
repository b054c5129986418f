//! Rotation under load, with nothing restarted: intermediates rotate by
//! themselves on short lifetimes, and an operator rotates the root (add ->
//! activate -> retire) while two proxies keep calling each other, on pooled
//! connections and on a fresh handshake per request. Not one call may fail.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Ca, EchoApp, Proxy, Server, mtls_get, plain_get, run, run_ok, s, wait_for};

/// Two sidecars: `server` in front of the app, `client` whose outbound
/// listener calls it; both get and renew their identities from the CA and
/// keep them in a state directory.
struct Pair {
    server: Proxy,
    client: Proxy,
    client_state: PathBuf,
}

fn pair(ca: &Ca, api: SocketAddr, app: SocketAddr) -> Pair {
    let dir = ca.tmp.path();
    let bundle = dir.join("bundle.pem");
    std::fs::write(&bundle, ca.bundle_pem()).unwrap();
    let config = |name: &str, rest: &str| {
        let token = dir.join(format!("{name}.token"));
        std::fs::write(&token, ca.token(&ca.id(&format!("/{name}")))).unwrap();
        let state = dir.join(format!("{name}-state"));
        let text = format!(
            "identity:\n  ca_url: https://{api}\n  token_file: {}\n  spiffe_id: {}\n  bundle: {}\n  state_dir: {}\nadmin: 127.0.0.1:0\n{rest}",
            s(&token),
            ca.id(&format!("/{name}")),
            s(&bundle),
            s(&state)
        );
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, text).unwrap();
        (file, state)
    };
    let (server_file, _) = config(
        "server",
        &format!(
            "inbound:\n  - name: app\n    listen: 127.0.0.1:0\n    app: {app}\n    policy:\n      rules:\n        - {{name: client, action: allow, from: [{}]}}\n",
            ca.id("/client")
        ),
    );
    let server = Proxy::start_file(&server_file);
    let (client_file, client_state) = config(
        "client",
        &format!(
            "outbound:\n  - name: out\n    listen: 127.0.0.1:0\n    destination: {}\n    server_id: {}\n",
            server.addr("app"),
            ca.id("/server")
        ),
    );
    let client = Proxy::start_file(&client_file);
    Pair {
        server,
        client,
        client_state,
    }
}

/// The client's current certificate, key and trust bundle, as a workload
/// would read them: its kept files, and the feed's cached bundle.
fn client_creds(state: &Path) -> Option<(String, String, String)> {
    let read = |f: &str| std::fs::read_to_string(state.join(f)).ok();
    let cert = read("cert.pem")?;
    let key = read("key.pem")?;
    // A renewal writes the key, then the certificate: read until stable.
    if read("cert.pem")? != cert {
        return None;
    }
    let feed: serde_json::Value = serde_json::from_str(&read("trust.json")?).ok()?;
    Some((cert, key, feed["trust_bundle"].as_str()?.to_owned()))
}

/// Calls through the pair every 25 ms until stopped: the app's call out
/// through the client (a pooled connection) and a fresh mTLS handshake to
/// the server with the client's current certificate. Counts (ok, failed)
/// and keeps the first failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<Mutex<Vec<String>>>,
}

impl Load {
    fn start(p: &Pair) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let (out, inbound, state) = (
            p.client.addr("out"),
            p.server.addr("app"),
            p.client_state.clone(),
        );
        let (s2, ok2, f2) = (stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                let pooled = plain_get(out, "/").map(|r| r.0);
                let fresh = match client_creds(&state) {
                    Some((cert, key, bundle)) => {
                        mtls_get(inbound, &bundle, Some((&cert, &key)), "GET", "/", "").map(|r| r.0)
                    }
                    None => Ok(200), // mid-write: not a call
                };
                for (what, r) in [("pooled", pooled), ("fresh", fresh)] {
                    match r {
                        Ok(200) => {
                            ok2.fetch_add(1, Ordering::Relaxed);
                        }
                        other => f2.lock().unwrap().push(format!("{what}: {other:?}")),
                    }
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        });
        Load { stop, ok, failed }
    }

    /// Stops, and asserts that calls went through and none failed.
    fn finish(self, min_ok: usize) {
        self.stop.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(100));
        let failed = self.failed.lock().unwrap();
        let ok = self.ok.load(Ordering::Relaxed);
        assert!(
            failed.is_empty(),
            "{} of {} calls failed: {:?}",
            failed.len(),
            ok + failed.len(),
            &failed[..failed.len().min(5)]
        );
        assert!(ok >= min_ok, "only {ok} calls");
    }
}

fn events(ca: &Ca) -> Vec<serde_json::Value> {
    std::fs::read_to_string(ca.dir.join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn count(ca: &Ca, event: &str) -> usize {
    events(ca).iter().filter(|e| e["event"] == event).count()
}

fn settings(ca: &Ca, extra: &str) {
    let path = ca.dir.join("ca.yaml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(extra);
    std::fs::write(path, text).unwrap();
}

#[test]
fn intermediates_rotate_by_themselves_under_load_with_zero_failed_requests() {
    let ca = Ca::init_with("example.org", &["--intermediate-ttl", "24s"]);
    settings(&ca, "rotation_overlap: 2s\n");
    let server = Server::start(&ca.dir);
    let app = EchoApp::start();
    let p = pair(&ca, server.api, app.addr);
    let load = Load::start(&p);
    // Prepared at 12 s, signing from 20 s, the old one gone after its last
    // leaf (capped at 24 s) plus the overlap; then the next cycle begins.
    assert!(
        wait_for(Duration::from_secs(60), || count(
            &ca,
            "intermediate_activated"
        ) >= 2
            && count(&ca, "intermediate_retired") >= 1),
        "{}",
        String::from_utf8_lossy(&run(&["ca", "status", "--dir", ca.dir()]).stdout)
    );
    load.finish(200);

    // No leaf outlived the intermediate that signed it.
    let trail = events(&ca);
    let life: std::collections::HashMap<String, i64> = trail
        .iter()
        .filter(|e| e["event"] == "intermediate_prepared" || e["event"] == "chain_recorded")
        .map(|e| {
            (
                e["id"].as_str().unwrap().to_owned(),
                e["not_after"].as_i64().unwrap(),
            )
        })
        .collect();
    let leaves: Vec<_> = trail
        .iter()
        .filter(|e| e["event"] == "issued" || e["event"] == "renewed")
        .collect();
    assert!(leaves.len() > 6, "{leaves:?}");
    let mut issuers = std::collections::HashSet::new();
    for leaf in leaves {
        let issuer = leaf["issuer"].as_str().unwrap();
        issuers.insert(issuer.to_owned());
        assert!(
            leaf["not_after"].as_i64().unwrap() <= life[issuer],
            "{leaf} outlives its intermediate"
        );
    }
    assert!(issuers.len() >= 2, "leaves came from {issuers:?}");
    let status = run_ok(&["ca", "status", "--dir", ca.dir()]);
    assert!(status.contains("intermediate retired"), "{status}");
    assert!(server.metric("warden_ca_rotation_failures_total") == 0.0);
}

#[test]
fn an_operator_rotates_the_root_under_load_with_zero_failed_requests() {
    // A short intermediate so that leaves under the old root end soon.
    let ca = Ca::init_with("example.org", &["--intermediate-ttl", "30s"]);
    settings(&ca, "rotation_overlap: 3s\n");
    let server = Server::start(&ca.dir);
    let app = EchoApp::start();
    let p = pair(&ca, server.api, app.addr);
    let load = Load::start(&p);

    let added = run_ok(&["ca", "root", "add", "--dir", ca.dir(), "--ttl", "1d"]);
    let id = added.split_whitespace().nth(1).unwrap().to_owned();
    assert!(added.contains("added"), "{added}");
    // Every proxy trusts both roots within moments.
    for proxy in [&p.server, &p.client] {
        assert!(wait_for(Duration::from_secs(10), || proxy
            .log()
            .contains("trust bundle changed")));
    }
    // Too early to sign: proxies that are behind would not trust it yet.
    let early = run(&[
        "ca",
        "root",
        "activate",
        "--dir",
        ca.dir(),
        "--id",
        &id[..12],
    ]);
    assert!(!early.status.success());
    assert!(String::from_utf8_lossy(&early.stderr).contains("rotation_overlap"));
    assert!(wait_for(Duration::from_secs(10), || run(&[
        "ca",
        "root",
        "activate",
        "--dir",
        ca.dir(),
        "--id",
        &id
    ])
    .status
    .success()));
    // The old root (the one init made) cannot go while its leaves live.
    let status = run_ok(&["ca", "status", "--dir", ca.dir()]);
    let old = status
        .lines()
        .find(|l| l.trim_start().starts_with("root") && l.contains("published"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap()
        .to_owned();
    let refused = run(&["ca", "root", "retire", "--dir", ca.dir(), "--id", &old]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("still valid"));
    assert!(
        wait_for(Duration::from_secs(60), || run(&[
            "ca",
            "root",
            "retire",
            "--dir",
            ca.dir(),
            "--id",
            &old
        ])
        .status
        .success()),
        "{}",
        run_ok(&["ca", "status", "--dir", ca.dir()])
    );
    // The bundle proxies are pushed now holds the new root alone.
    for proxy in [&p.server, &p.client] {
        let before = proxy.metric("warden_proxy_trust_sequence");
        assert!(wait_for(Duration::from_secs(10), || proxy
            .metric("warden_proxy_trust_sequence")
            > before
            || before >= 1.0
                && proxy.log().matches("trust bundle changed").count() >= 2));
    }
    std::thread::sleep(Duration::from_secs(2));
    load.finish(200);
    let bundle = String::from_utf8(
        std::process::Command::new("curl")
            .args(["-sk", &format!("https://{}/v1/bundle", server.api)])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 1, "{bundle}");
    for e in ["root_added", "root_activated", "root_retired"] {
        assert_eq!(count(&ca, e), 1, "{e}");
    }
    assert!(run_ok(&["ca", "audit", "verify", "--dir", ca.dir()]).contains("ok"));
}
