//! Sidecars that come back by themselves: each identity source (a pod's
//! ServiceAccount token, a join token with `state_dir`, files) is killed
//! with SIGKILL and started again three times while a client keeps calling
//! through it; and a proxy that cannot come back says why and what to do.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::kube::{ca_with_kubernetes, jwks_section};
use common::{Ca, Creds, EchoApp, Proxy, free_port, mtls_get, plain_get, s, wait_for};

const ALLOW_CLIENT: &str =
    "        - {name: client, action: allow, from: [spiffe://example.org/ns/web/sa/client]}\n";

/// A sidecar config: `identity` (YAML), an inbound listener on a fixed
/// port in front of `app`, and an outbound listener to nowhere.
fn sidecar(dir: &Path, identity: &str, port: u16, app: SocketAddr) -> PathBuf {
    let path = dir.join(format!("sidecar-{port}.yaml"));
    let config = format!(
        "{identity}admin: 127.0.0.1:0\ninbound:\n  - name: app\n    listen: 127.0.0.1:{port}\n    app: {app}\n    policy:\n      rules:\n{ALLOW_CLIENT}outbound:\n  - name: out\n    listen: 127.0.0.1:0\n    destination: 127.0.0.1:9\n    server_id: spiffe://example.org/ns/shop/sa/db\n"
    );
    std::fs::write(&path, config).unwrap();
    path
}

/// Calls `addr` every 20 ms until stopped; records when each call ended
/// and whether it got a 200 from the app.
fn keep_calling(
    addr: SocketAddr,
    bundle: String,
    client: Creds,
    stop: Arc<AtomicBool>,
) -> Arc<Mutex<Vec<(Instant, bool)>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let out = log.clone();
    std::thread::spawn(move || {
        let (chain, key) = (client.chain(), client.key());
        while !stop.load(Ordering::Relaxed) {
            let ok = matches!(
                mtls_get(addr, &bundle, Some((&chain, &key)), "GET", "/", ""),
                Ok((200, _))
            );
            out.lock().unwrap().push((Instant::now(), ok));
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    log
}

/// Kills the sidecar three times and starts it again each time; checks
/// that it is ready again by itself and that calls failed only while it
/// was down.
fn kill_and_restart_three_times(
    name: &str,
    config: &Path,
    port: u16,
    bundle: &str,
    client: Creds,
    between: impl Fn(usize),
) {
    let mut proxy = Proxy::start_file(config);
    assert_eq!(proxy.admin_get("/ready").0, 200, "{name}");
    let stop = Arc::new(AtomicBool::new(false));
    let calls = keep_calling(
        SocketAddr::from(([127, 0, 0, 1], port)),
        bundle.to_owned(),
        client,
        stop.clone(),
    );
    assert!(
        wait_for(Duration::from_secs(5), || calls
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.1)),
        "{name}: calls get through"
    );
    let mut down: Vec<(Instant, Instant)> = Vec::new();
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        let killed = Instant::now();
        proxy.child.kill().unwrap(); // SIGKILL
        proxy.child.wait().unwrap();
        between(i);
        drop(proxy);
        proxy = Proxy::start_file(config);
        let ready = Instant::now();
        assert_eq!(
            proxy.admin_get("/ready").0,
            200,
            "{name}: ready again after restart {i}"
        );
        down.push((killed, ready));
    }
    let back = Instant::now();
    assert!(
        wait_for(Duration::from_secs(5), || calls
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.1 && c.0 > back)),
        "{name}: calls get through after the last restart"
    );
    stop.store(true, Ordering::Relaxed);
    let calls = calls.lock().unwrap().clone();
    // A call in flight at the kill, or started just before `ready` was read,
    // may fail: allow 200 ms on either side of each outage.
    let slack = Duration::from_millis(200);
    let outside: Vec<Duration> = calls
        .iter()
        .filter(|(at, ok)| {
            !ok && !down
                .iter()
                .any(|(k, r)| *at + slack >= *k && *at <= *r + slack)
        })
        .map(|(at, _)| at.duration_since(down[0].0.min(*at)))
        .collect();
    let failed = calls.iter().filter(|c| !c.1).count();
    let downtime: Duration = down.iter().map(|(k, r)| *r - *k).sum();
    eprintln!(
        "{name}: {} calls, {failed} failed, down {downtime:?} over 3 restarts",
        calls.len()
    );
    assert!(
        outside.is_empty(),
        "{name}: calls failed while the sidecar was up: {outside:?}"
    );
}

#[test]
fn sidecars_come_back_after_sigkill_with_every_identity_source() {
    let (ca, kube) = ca_with_kubernetes(&jwks_section());
    let server = ca.serve();
    let app = EchoApp::start();
    let bundle = ca.bundle_pem();
    let bundle_file = ca.dir.join("bundle.pem");
    let client = || Creds {
        dir: ca.issue(&ca.id("/ns/web/sa/client"), None),
    };
    let api = server.api;

    // A pod's ServiceAccount token; the kubelet rotates it between restarts.
    let pod = kube.add_pod("shop", "cart-5d8f", "cart");
    let token_file = ca.tmp.path().join("sa-token");
    std::fs::write(&token_file, kube.token(&pod)).unwrap();
    let port = free_port();
    let path = sidecar(
        ca.tmp.path(),
        &format!(
            "identity:\n  kubernetes:\n    ca_url: https://{api}\n    bundle: {}\n    token_file: {}\n",
            s(&bundle_file),
            s(&token_file)
        ),
        port,
        app.addr,
    );
    kill_and_restart_three_times("kubernetes", &path, port, &bundle, client(), |_| {
        std::fs::write(&token_file, kube.token(&pod)).unwrap();
    });

    // A join token, spent at the first start; the certificate is kept.
    let join = ca.tmp.path().join("join-token");
    std::fs::write(&join, ca.token(&ca.id("/ns/shop/sa/search"))).unwrap();
    let state = ca.tmp.path().join("state");
    let port = free_port();
    let path = sidecar(
        ca.tmp.path(),
        &format!(
            "identity:\n  ca_url: https://{api}\n  token_file: {}\n  spiffe_id: spiffe://example.org/ns/shop/sa/search\n  bundle: {}\n  state_dir: {}\n",
            s(&join),
            s(&bundle_file),
            s(&state)
        ),
        port,
        app.addr,
    );
    // The second kill lands between the two renames of a renewal's write
    // (the new key in place, its certificate still in cert.tmp): the pair
    // is finished on start, and the spent token is not needed.
    let search = ca.id("/ns/shop/sa/search");
    kill_and_restart_three_times(
        "join token + state_dir",
        &path,
        port,
        &bundle,
        client(),
        |i| {
            if i == 1 {
                let renewed = ca.issue(&search, None);
                std::fs::copy(renewed.join("key.pem"), state.join("key.pem")).unwrap();
                std::fs::copy(renewed.join("cert.pem"), state.join("cert.tmp")).unwrap();
            }
        },
    );
    assert!(
        !state.join("cert.tmp").exists(),
        "the interrupted write was finished"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(state.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the kept key is private");

    // Files.
    let files = Creds {
        dir: ca.issue(&ca.id("/ns/shop/sa/files"), None),
    };
    let port = free_port();
    let path = sidecar(ca.tmp.path(), &files.identity_yaml(), port, app.addr);
    kill_and_restart_three_times("files", &path, port, &bundle, client(), |_| {});
}

#[test]
fn a_sidecar_that_cannot_come_back_says_why_and_recovers_once_told() {
    let ca = Ca::init("example.org");
    let server = ca.serve();
    let app = EchoApp::start();
    let join = ca.tmp.path().join("join-token");
    let id = ca.id("/ns/shop/sa/search");
    std::fs::write(&join, ca.token(&id)).unwrap();
    let port = free_port();
    let path = sidecar(
        ca.tmp.path(),
        &format!(
            "identity:\n  ca_url: https://{}\n  token_file: {}\n  spiffe_id: {id}\n  bundle: {}\n",
            server.api,
            s(&join),
            s(&ca.dir.join("bundle.pem"))
        ),
        port,
        app.addr,
    );
    let mut proxy = Proxy::start_file(&path);
    proxy.child.kill().unwrap();
    proxy.child.wait().unwrap();
    drop(proxy);

    // No state_dir: the token is spent and nothing was kept.
    let proxy = Proxy::start_unready(&path, 3);
    assert!(
        wait_for(Duration::from_secs(10), || proxy
            .admin_get("/ready")
            .1
            .contains("join token already used")),
        "{}",
        proxy.admin_get("/ready").1
    );
    let (status, body) = proxy.admin_get("/ready");
    assert_eq!(status, 503);
    assert!(body.contains("no stored certificate: mint a new token (warden ca token --spiffe-id spiffe://example.org/ns/shop/sa/search)"), "{body}");
    assert!(body.contains("set identity.state_dir"), "{body}");
    let log = proxy.log();
    assert!(
        !log.contains("keeping the current one"),
        "no message claims a certificate that does not exist:\n{log}"
    );
    assert!(
        log.contains("no certificate yet: join token already used"),
        "{log}"
    );
    // The app calling out through the sidecar is told the same.
    let (status, body) = plain_get(proxy.addr("out"), "/").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no identity yet"), "{body}");

    // A new token in the file: it comes back by itself.
    std::fs::write(&join, ca.token(&id)).unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || proxy.admin_get("/ready").0
            == 200),
        "{}",
        proxy.log()
    );
}
