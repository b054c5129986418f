//! `warden inject` as a platform team runs it: its output validates against
//! the Kubernetes OpenAPI schema (kubernetes-validate, strict, the release
//! `.ci/run` pins), injecting twice changes nothing, and the sidecar it
//! writes, run the way the kubelet runs it (its environment, its token
//! file), gets the pod's identity and lets only the pod's namespace in.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::net::SocketAddr;

use std::io::Write;
use std::process::Stdio;

use serde_json::Value;

use common::kube::{ca_with_kubernetes, jwks_section, validate};
use common::{Ca, Creds, EchoApp, Proxy, free_port, mtls_get, s, warden};

/// `warden inject` on `input` (through standard input); (stdout, stderr).
fn inject(args: &[&str], input: &str) -> (String, String) {
    let mut child = warden()
        .args(["inject", "-f", "-"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn manifests(inbound: u16, admin: u16, app: u16) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: shop}}
spec:
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
      annotations:
        warden.dev/inbound-port: \"{inbound}\"
        warden.dev/admin-port: \"{admin}\"
        warden.dev/app-port: \"{app}\"
    spec:
      serviceAccountName: web
      containers:
        - name: web
          image: shop/web:2
          ports: [{{containerPort: 8080}}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {{name: report, namespace: shop}}
spec:
  schedule: \"0 3 * * *\"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers:
            - name: report
              image: shop/report:1
              ports: [{{containerPort: 9000}}]
"
    )
}

#[test]
fn injected_manifests_validate_and_injecting_twice_changes_nothing() {
    let ca = Ca::init("example.org");
    let bundle = s(&ca.dir.join("bundle.pem")).to_owned();
    let input = manifests(4143, 4191, 8080);
    let (once, log) = inject(&["--bundle", &bundle], &input);
    assert!(log.contains("Deployment/web: injected"), "{log}");
    assert!(log.contains("CronJob/report: injected"), "{log}");
    assert!(
        once.starts_with("apiVersion: v1\nkind: Service\n"),
        "untouched, first:\n{once}"
    );
    validate(ca.tmp.path(), &once);
    let (twice, log) = inject(&["--bundle", &bundle], &once);
    assert_eq!(once, twice);
    assert!(log.contains("Deployment/web: already injected"), "{log}");
}

#[test]
fn the_injected_sidecar_runs_as_the_kubelet_starts_it_and_guards_the_pod() {
    // The cluster: its API (for the CA's JWKS), the CA, a pod.
    let (ca, kube) = ca_with_kubernetes(&jwks_section());
    let server = ca.serve();
    let app = EchoApp::start();
    let pod = kube.add_pod("shop", "web-6f9c", "web");

    let (inbound, admin) = (free_port(), free_port());
    let (out, _) = inject(
        &[
            "--bundle",
            s(&ca.dir.join("bundle.pem")),
            "--ca-url",
            &format!("https://{}", server.api),
        ],
        &manifests(inbound, admin, app.addr.port()),
    );
    // The sidecar as the kubelet starts it: the env of the container spec,
    // `$(WARDEN_NAMESPACE)` expanded from the downward API, the projected
    // token at its path (here in a temp dir).
    let deployment: Value = serde_saphyr::from_str(out.split("\n---\n").nth(1).unwrap()).unwrap();
    let sidecar = &deployment["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(sidecar["args"][0], "proxy");
    let env = sidecar["env"].as_array().unwrap();
    let config = env
        .iter()
        .find(|e| e["name"] == "WARDEN_PROXY_CONFIG")
        .unwrap()["value"]
        .as_str()
        .unwrap();
    let token = ca.tmp.path().join("token");
    std::fs::write(&token, kube.token(&pod)).unwrap();
    let config = config
        .replace("$(WARDEN_NAMESPACE)", "shop")
        .replace("/var/run/secrets/tokens/warden", s(&token));
    let proxy = Proxy::start_config_env(&config);
    assert_eq!(proxy.admin_get("/ready").0, 200, "{}", proxy.log());
    assert!(
        proxy.log().contains("spiffe://example.org/ns/shop/sa/web"),
        "{}",
        proxy.log()
    );

    // Callers from the pod's namespace get through; others do not. The
    // sidecar listens on `[::]`: IPv4 peers (and IPv6 ones, where this host
    // has `::1`) reach it, as in IPv4, dual-stack and IPv6-only clusters.
    let bundle = ca.bundle_pem();
    let port = proxy.addr("app").port();
    assert!(proxy.addr("app").ip().is_unspecified(), "{}", proxy.log());
    let mut peers = vec![SocketAddr::from(([127, 0, 0, 1], port))];
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        peers.push(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)));
    }
    let neighbour = Creds {
        dir: ca.issue(&ca.id("/ns/shop/sa/cart"), None),
    };
    let stranger = Creds {
        dir: ca.issue(&ca.id("/ns/billing/sa/ledger"), None),
    };
    for peer in peers {
        assert_eq!(status_of_get(peer, &bundle, &neighbour), 200, "{peer}");
        assert_eq!(status_of_get(peer, &bundle, &stranger), 403, "{peer}");
    }
    assert_eq!(
        common::admin_get(
            SocketAddr::from(([127, 0, 0, 1], proxy.addr("admin").port())),
            "/ready"
        )
        .0,
        200
    );
}

#[test]
fn every_golden_injection_validates_against_the_kubernetes_schema() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/tests/golden");
    let tmp = tempfile::tempdir().unwrap();
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        // A `List` has no schema of its own: `validate` checks its items.
        if !name.ends_with(".out.yaml") {
            continue;
        }
        validate(tmp.path(), &std::fs::read_to_string(&path).unwrap());
        n += 1;
    }
    assert!(n >= 10, "{n} golden files");
}

/// The injected sidecar's config for the Deployment of
/// `manifests(inbound, admin, app)` with `warden.dev/policy-configmap`, as
/// the kubelet expands it (namespace `shop`, the token at `token`).
fn configmap_sidecar_config(
    ca: &Ca,
    ca_url: &str,
    (inbound, admin, app): (u16, u16, u16),
    token: &std::path::Path,
) -> String {
    let input = manifests(inbound, admin, app).replace(
        &format!("        warden.dev/app-port: \"{app}\"\n"),
        &format!(
            "        warden.dev/app-port: \"{app}\"\n        warden.dev/policy-configmap: web-policy\n"
        ),
    );
    let (out, _) = inject(
        &[
            "--bundle",
            s(&ca.dir.join("bundle.pem")),
            "--ca-url",
            ca_url,
        ],
        &input,
    );
    let deployment: Value = serde_saphyr::from_str(out.split("\n---\n").nth(1).unwrap()).unwrap();
    let env = deployment["spec"]["template"]["spec"]["initContainers"][0]["env"]
        .as_array()
        .unwrap()
        .clone();
    assert!(env.iter().any(|e| e["name"] == "WARDEN_POLICY"), "{env:?}");
    env.iter()
        .find(|e| e["name"] == "WARDEN_PROXY_CONFIG")
        .unwrap()["value"]
        .as_str()
        .unwrap()
        .replace("$(WARDEN_NAMESPACE)", "shop")
        .replace("/var/run/secrets/tokens/warden", s(token))
}

#[test]
fn the_policy_configmap_is_the_policy_the_injected_sidecar_enforces() {
    let (ca, kube) = ca_with_kubernetes(&jwks_section());
    let server = ca.serve();
    let app = EchoApp::start();
    let pod = kube.add_pod("shop", "web-6f9c", "web");
    let token = ca.tmp.path().join("token");
    std::fs::write(&token, kube.token(&pod)).unwrap();
    let config = configmap_sidecar_config(
        &ca,
        &format!("https://{}", server.api),
        (free_port(), free_port(), app.addr.port()),
        &token,
    );
    // The ConfigMap's policy.json, in YAML (block YAML is fine: it is a
    // value of its own, not text in the config): billing only.
    let policy = "rules:\n  - name: billing\n    action: allow\n    from: [spiffe://example.org/ns/billing/*]\n";
    let proxy = common::Proxy::start_env(ca.tmp.path(), &config, &[("WARDEN_POLICY", policy)]);
    assert_eq!(proxy.admin_get("/ready").0, 200, "{}", proxy.log());
    assert_eq!(
        proxy.addrs.len(),
        2,
        "admin and app only: {:?}",
        proxy.addrs
    );
    let bundle = ca.bundle_pem();
    let call = |path: &str| {
        let who = Creds {
            dir: ca.issue(&ca.id(path), None),
        };
        status_of_get(proxy.addr("app"), &bundle, &who)
    };
    assert_eq!(call("/ns/billing/sa/ledger"), 200);
    assert_eq!(
        call("/ns/shop/sa/cart"),
        403,
        "the ConfigMap's policy, not the default"
    );
}

#[test]
fn a_policy_configmap_that_tries_to_add_a_listener_is_refused_by_the_proxy() {
    let ca = Ca::init("example.org");
    let token = ca.tmp.path().join("token");
    std::fs::write(&token, "unused").unwrap();
    let (inbound, admin, extra) = (free_port(), free_port(), free_port());
    let config =
        configmap_sidecar_config(&ca, "https://127.0.0.1:1", (inbound, admin, 8080), &token);
    // Pasted into the config as text, this would close the policy and add
    // a listener that lets anyone through to the node's port 22.
    let evil = format!(
        r#"{{"rules": []}}}}, {{"name": "x", "listen": "127.0.0.1:{extra}", "app": "127.0.0.1:22", "policy": {{"rules": [{{"name": "all", "action": "allow", "from": ["*"]}}]}}"#
    );
    let mut child = warden()
        .args(["proxy", "--config-env", "WARDEN_PROXY_CONFIG"])
        .env("WARDEN_PROXY_CONFIG", &config)
        .env("WARDEN_POLICY", &evil)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let exited = common::wait_for(std::time::Duration::from_secs(10), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(exited, "the proxy started with it: {stdout}{stderr}");
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("$WARDEN_POLICY:1:"), "{stderr}");
    assert!(!stdout.contains("listening"), "{stdout}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", extra)).is_err());
}

/// The status of `GET /` by `who` through the sidecar's inbound at `addr`.
fn status_of_get(addr: std::net::SocketAddr, bundle: &str, who: &Creds) -> u16 {
    mtls_get(
        addr,
        bundle,
        Some((&who.chain(), &who.key())),
        "GET",
        "/",
        "",
    )
    .unwrap()
    .0
}
