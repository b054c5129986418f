//! The CA's trust feed (`GET /v1/watch`): a deny reaches every proxy in
//! seconds, which then refuses the denied identity's new handshakes in both
//! directions and closes its open connections; `allow` undoes it; a proxy
//! keeps serving while the CA is down, catches up when it is back, and a
//! restarted proxy enforces the cached list before it has heard from the CA.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    Ca, Creds, EchoApp, Proxy, Server, free_port, h1_over, mtls_connect, mtls_get, plain_get,
    run_ok, s, wait_for,
};

/// A sidecar with a CA identity (join token) for `path`, an inbound
/// listener in front of `app` that allows `allow`, and an outbound
/// listener to `upstream` (expecting `upstream_id`) when given.
fn sidecar(
    ca: &Ca,
    api: SocketAddr,
    path: &str,
    app: SocketAddr,
    allow: &[&str],
    upstream: Option<(SocketAddr, &str)>,
    state_dir: Option<&Path>,
) -> std::path::PathBuf {
    let id = ca.id(path);
    let dir = ca.tmp.path();
    let tag = path.trim_start_matches('/');
    let token = dir.join(format!("{tag}.token"));
    std::fs::write(&token, ca.token(&id)).unwrap();
    let bundle = dir.join("bundle.pem");
    std::fs::write(&bundle, ca.bundle_pem()).unwrap();
    let state = state_dir
        .map(|d| format!("  state_dir: {}\n", s(d)))
        .unwrap_or_default();
    let from: Vec<String> = allow.iter().map(|p| ca.id(p)).collect();
    let outbound = upstream
        .map(|(addr, sid)| {
            format!(
                "outbound:\n  - name: out\n    listen: 127.0.0.1:0\n    destination: {addr}\n    server_id: {}\n",
                ca.id(sid)
            )
        })
        .unwrap_or_default();
    let config = format!(
        "identity:\n  ca_url: https://{api}\n  token_file: {}\n  spiffe_id: {id}\n  bundle: {}\n{state}admin: 127.0.0.1:0\ninbound:\n  - name: app\n    listen: 127.0.0.1:0\n    app: {app}\n    policy:\n      rules:\n        - {{name: callers, action: allow, from: [{}]}}\n{outbound}",
        s(&token),
        s(&bundle),
        from.join(", ")
    );
    let file = dir.join(format!("{tag}.yaml"));
    std::fs::write(&file, config).unwrap();
    file
}

fn get(addr: SocketAddr, bundle: &str, who: &Creds) -> Option<u16> {
    mtls_get(
        addr,
        bundle,
        Some((&who.chain(), &who.key())),
        "GET",
        "/",
        "",
    )
    .ok()
    .map(|(status, _)| status)
}

/// Waits until `addr` answers (or refuses) `who` as `want` says; returns how long it took.
fn until(addr: SocketAddr, bundle: &str, who: &Creds, want: Option<u16>) -> Duration {
    let start = Instant::now();
    assert!(
        wait_for(Duration::from_secs(15), || get(addr, bundle, who) == want),
        "{addr} never answered {want:?}"
    );
    start.elapsed()
}

#[test]
fn a_deny_reaches_every_proxy_in_seconds_both_directions_and_allow_undoes_it() {
    let ca = Ca::init("example.org");
    let server = ca.serve();
    let bundle = ca.bundle_pem();
    let app = EchoApp::start();
    let client = Creds {
        dir: ca.issue(&ca.id("/client"), None),
    };
    let p2 = Proxy::start_file(&sidecar(
        &ca,
        server.api,
        "/p2",
        app.addr,
        &["/client", "/p1"],
        None,
        None,
    ));
    let p3 = Proxy::start_file(&sidecar(
        &ca,
        server.api,
        "/p3",
        app.addr,
        &["/client"],
        None,
        None,
    ));
    let p1 = Proxy::start_file(&sidecar(
        &ca,
        server.api,
        "/p1",
        app.addr,
        &["/client"],
        Some((p2.addr("app"), "/p2")),
        None,
    ));
    let proxies = [&p1, &p2, &p3];
    for p in proxies {
        assert_eq!(get(p.addr("app"), &bundle, &client), Some(200));
        // Each follows the feed before anything is denied.
        assert!(wait_for(Duration::from_secs(10), || p
            .metric("warden_proxy_trust_sequence")
            >= 1.0));
    }
    // The app's call out through p1 to p2, on a pooled connection.
    assert_eq!(plain_get(p1.addr("out"), "/").unwrap().0, 200);
    // A keep-alive connection to p3 that stays open across the deny.
    let mut open = mtls_connect(
        p3.addr("app"),
        &bundle,
        Some((&client.chain(), &client.key())),
        &[b"http/1.1"],
    )
    .unwrap();
    assert_eq!(h1_over(&mut open, "GET", "/", "").unwrap().0, 200);

    // An operator denies the client, from another process (the store is the truth).
    run_ok(&[
        "ca",
        "deny",
        "--dir",
        ca.dir(),
        "--spiffe-id",
        &ca.id("/client"),
    ]);
    let took: Vec<Duration> = proxies
        .iter()
        .map(|p| until(p.addr("app"), &bundle, &client, None))
        .collect();
    eprintln!("deny to refused handshake: {took:?}");
    for p in proxies {
        // The first refusal may have been a connection closed just after
        // its handshake; this one is refused at the handshake.
        assert_eq!(get(p.addr("app"), &bundle, &client), None);
        assert!(
            p.metric("warden_proxy_handshake_failures_total{direction=\"inbound\",listener=\"app\",reason=\"denied\"}")
                >= 1.0,
            "{}",
            p.admin_get("/metrics").1
        );
        assert!(p.log().contains("deny list changed"), "{}", p.log());
    }
    // Its open connection was closed, not left to run.
    let after = h1_over(&mut open, "GET", "/", "");
    assert!(
        after.is_err(),
        "the open connection still answered: {after:?}"
    );
    assert_eq!(
        p3.metric("warden_proxy_connections_revoked_total{direction=\"inbound\",listener=\"app\"}"),
        1.0
    );
    // Others are untouched: p1 still reaches p2.
    assert_eq!(plain_get(p1.addr("out"), "/").unwrap().0, 200);

    // Denying the server: p1 drops its pooled connection to p2 and refuses
    // to dial it again.
    run_ok(&[
        "ca",
        "deny",
        "--dir",
        ca.dir(),
        "--spiffe-id",
        &ca.id("/p2"),
    ]);
    assert!(
        wait_for(Duration::from_secs(15), || plain_get(p1.addr("out"), "/")
            .is_ok_and(|(status, _)| status == 502)),
        "{}",
        p1.log()
    );
    assert_eq!(
        p1.metric(
            "warden_proxy_connections_revoked_total{direction=\"outbound\",listener=\"out\"}"
        ),
        1.0
    );
    // The first 502 may have been the pooled connection closing under a
    // request; this call dials anew and is refused at the handshake.
    assert_eq!(plain_get(p1.addr("out"), "/").unwrap().0, 502);
    assert!(
        p1.metric("warden_proxy_handshake_failures_total{direction=\"outbound\",listener=\"out\",reason=\"denied\"}")
            >= 1.0
    );

    // `allow` undoes both, the same way.
    run_ok(&[
        "ca",
        "allow",
        "--dir",
        ca.dir(),
        "--spiffe-id",
        &ca.id("/client"),
    ]);
    run_ok(&[
        "ca",
        "allow",
        "--dir",
        ca.dir(),
        "--spiffe-id",
        &ca.id("/p2"),
    ]);
    for p in proxies {
        until(p.addr("app"), &bundle, &client, Some(200));
        assert_eq!(p.metric("warden_proxy_trust_denied_identities"), 0.0);
    }
    assert!(wait_for(Duration::from_secs(15), || plain_get(
        p1.addr("out"),
        "/"
    )
    .is_ok_and(|(status, _)| status == 200)));
    // The CA counted its watchers.
    assert!(server.metric("warden_ca_trust_sequence") >= 5.0);
}

#[test]
fn a_proxy_keeps_serving_with_the_ca_down_and_catches_up_when_it_is_back() {
    let ca = Ca::init("example.org");
    let listen = format!("127.0.0.1:{}", free_port());
    let server = Server::start_at(&ca.dir, &listen);
    let bundle = ca.bundle_pem();
    let app = EchoApp::start();
    let client = Creds {
        dir: ca.issue(&ca.id("/client"), None),
    };
    let state = ca.tmp.path().join("state");
    let config = sidecar(
        &ca,
        server.api,
        "/web",
        app.addr,
        &["/client"],
        None,
        Some(&state),
    );
    let proxy = Proxy::start_file(&config);
    assert!(wait_for(Duration::from_secs(10), || proxy
        .metric("warden_proxy_trust_last_sync_timestamp_seconds")
        > 0.0));
    // Every level of its own chain has its expiry exported, leaf first to go.
    let level = |l: &str| {
        proxy.metric(&format!(
            "warden_proxy_chain_expiry_timestamp_seconds{{level=\"{l}\"}}"
        ))
    };
    assert!(level("leaf") > 0.0);
    assert!(level("leaf") <= level("intermediate"));
    assert!(level("intermediate") <= level("root"));

    // The CA goes away; the proxy keeps serving and says the feed is stale.
    assert!(server.terminate().success());
    run_ok(&[
        "ca",
        "deny",
        "--dir",
        ca.dir(),
        "--spiffe-id",
        &ca.id("/client"),
    ]);
    assert!(wait_for(Duration::from_secs(10), || proxy
        .metric("warden_proxy_trust_sync_failures_total")
        >= 1.0));
    assert!(wait_for(Duration::from_secs(10), || proxy
        .metric("warden_proxy_trust_sync_age_seconds")
        >= 2.0));
    assert_eq!(get(proxy.addr("app"), &bundle, &client), Some(200));

    // Back at the same address: the proxy learns of the deny by itself.
    let server = Server::start_at(&ca.dir, &listen);
    until(proxy.addr("app"), &bundle, &client, None);
    assert!(
        state.join("trust.json").exists(),
        "the applied feed is cached"
    );

    // A restart while the CA is down again: the stored certificate and the
    // cached deny list apply before the CA is heard from.
    assert!(server.terminate().success());
    drop(proxy);
    let proxy = Proxy::start_file(&config);
    assert_eq!(get(proxy.addr("app"), &bundle, &client), None);
    assert!(proxy.log().contains("applied the cached trust feed"));
    let other = Creds {
        dir: ca.issue(&ca.id("/client2"), None),
    };
    // Denied and refused are different things: /client2 is not allowed by policy.
    let mut c = mtls_connect(
        proxy.addr("app"),
        &bundle,
        Some((&other.chain(), &other.key())),
        &[b"http/1.1"],
    )
    .unwrap();
    c.flush().unwrap();
    assert_eq!(h1_over(&mut c, "GET", "/", "").unwrap().0, 403);
}
