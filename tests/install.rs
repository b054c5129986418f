//! `warden install` as a platform team runs it: every object validates
//! against the Kubernetes schema (strict), and the CA and the webhook it
//! describes run from exactly what it wrote, as their pods would mount it:
//! the CA attests a pod, the webhook verifies for its Service name against
//! the MutatingWebhookConfiguration's `caBundle` and injects.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;
use serde_json::{Value, json};

use common::kube::{Kube, validate};
use common::{Ca, Running, csr, https, run, run_ok, s, webpki_verifies};

/// The manifests, by `Kind/name`.
fn objects(yaml: &str) -> HashMap<String, Value> {
    let mut docs = vec![String::new()];
    for line in yaml.lines() {
        if line == "---" {
            docs.push(String::new());
        } else if let Some(d) = docs.last_mut() {
            d.push_str(line);
            d.push('\n');
        }
    }
    docs.iter()
        .filter(|d| !d.trim().is_empty())
        .map(|d| {
            let v: Value = serde_saphyr::from_str(d).unwrap();
            let name = format!(
                "{}/{}",
                v["kind"].as_str().unwrap(),
                v["metadata"]["name"].as_str().unwrap()
            );
            (name, v)
        })
        .collect()
}

/// Writes a Secret's or ConfigMap's keys into `dir` as files, as a volume does.
fn mount(obj: &Value, items: &[(&str, &str)], dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (key, file) in items {
        let bytes = match (obj["data"][key].as_str(), obj["kind"].as_str()) {
            (Some(b64), Some("Secret")) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
            (Some(text), _) => text.as_bytes().to_vec(),
            _ => panic!("{key} missing in {obj}"),
        };
        std::fs::write(dir.join(file), bytes).unwrap();
    }
}

#[test]
fn installed_objects_validate_and_run_as_their_pods_would() {
    let tmp = tempfile::tempdir().unwrap();
    let yaml = run_ok(&[
        "install",
        "--trust-domain",
        "example.org",
        "--allow",
        "spiffe://example.org/ns/shop/*",
    ]);
    validate(tmp.path(), &yaml);
    // A kustomization of the output builds offline (GitOps users wrap it).
    std::fs::write(tmp.path().join("warden.yaml"), &yaml).unwrap();
    std::fs::write(
        tmp.path().join("kustomization.yaml"),
        "resources: [warden.yaml]\n",
    )
    .unwrap();
    match std::process::Command::new("kubectl")
        .args(["kustomize", s(tmp.path())])
        .output()
    {
        Ok(k) => {
            assert!(k.status.success(), "{}", String::from_utf8_lossy(&k.stderr));
            assert_eq!(
                String::from_utf8_lossy(&k.stdout)
                    .matches("\nkind: ")
                    .count(),
                15
            );
        }
        // kubectl is no Debian package: skipped only outside CI, as the
        // other tests that need a tool do.
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("kubectl is not installed, and CI=true requires the kustomize check: {e}")
        }
        Err(e) => eprintln!("kubectl not installed ({e}): kustomize check skipped outside CI"),
    }
    let o = objects(&yaml);
    for want in [
        "Namespace/warden",
        "ServiceAccount/warden-ca",
        "ClusterRole/warden-ca",
        "ClusterRoleBinding/warden-ca",
        "StatefulSet/warden-ca",
        "Service/warden-ca",
        "Deployment/warden-webhook",
        "Service/warden-webhook",
        "MutatingWebhookConfiguration/warden-injector",
        "PodDisruptionBudget/warden-webhook",
        "PodDisruptionBudget/warden-ca",
    ] {
        assert!(o.contains_key(want), "{want} missing");
    }
    // RBAC: what the CA uses, nothing else.
    let rules = &o["ClusterRole/warden-ca"]["rules"];
    assert_eq!(rules.as_array().unwrap().len(), 2);
    assert_eq!(rules[0]["verbs"], json!(["create"]));
    assert_eq!(rules[1]["verbs"], json!(["get"]));
    // Hardened everywhere.
    for w in ["StatefulSet/warden-ca", "Deployment/warden-webhook"] {
        let pod = &o[w]["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{w}");
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{w}"
        );
        let c = &pod["containers"][0];
        let sc = &c["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true, "{w}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{w}");
        assert_eq!(sc["privileged"], false, "{w}");
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{w}");
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true, "{w}");
        assert_eq!(
            c["securityContext"]["capabilities"]["drop"],
            json!(["ALL"]),
            "{w}"
        );
        assert!(c["resources"]["limits"]["memory"].is_string(), "{w}");
    }
    let hooks = &o["MutatingWebhookConfiguration/warden-injector"]["webhooks"];
    assert_eq!(hooks[0]["failurePolicy"], "Fail");
    assert_eq!(
        hooks[0]["clientConfig"]["service"]["path"],
        "/inject/namespace"
    );
    assert_eq!(hooks[1]["clientConfig"]["service"]["path"], "/inject/pod");

    // The CA, from its projected volume (the keys Secret and the config
    // ConfigMap) and an empty state volume; the API where the pod finds it.
    let keys = tmp.path().join("etc-warden-ca");
    mount(
        &o["Secret/warden-ca-keys"],
        &[
            ("tls.crt", "intermediate.pem"),
            ("tls.key", "intermediate-key.pem"),
            ("ca.crt", "root.pem"),
        ],
        &keys,
    );
    mount(
        &o["ConfigMap/warden-ca-config"],
        &[("ca.yaml", "ca.yaml"), ("bundle.pem", "bundle.pem")],
        &keys,
    );
    mount(
        &o["Secret/warden-ca-secrets"],
        &[("store.key", "store.key"), ("root-key.pem", "root-key.pem")],
        &keys,
    );
    let kube = Kube::start(tmp.path());
    let ca_yaml = std::fs::read_to_string(keys.join("ca.yaml")).unwrap();
    std::fs::write(
        keys.join("ca.yaml"),
        format!(
            "{ca_yaml}  api: {{url: {}, ca_file: {}, token_file: {}}}\n",
            kube.url(),
            s(&kube.ca_file),
            s(&kube.reviewer_token_file)
        ),
    )
    .unwrap();
    let state = tmp.path().join("var-lib-warden");
    std::fs::create_dir_all(&state).unwrap();
    let ca = Running::start(&[
        "ca",
        "serve",
        "--dir",
        s(&keys),
        "--state-dir",
        s(&state),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ]);
    let bundle = std::fs::read_to_string(keys.join("bundle.pem")).unwrap();
    let pod = kube.add_pod("shop", "cart-5d8f", "cart");
    let id = "spiffe://example.org/ns/shop/sa/cart";
    let (_key, csr) = csr(&[id]);
    let body = json!({"csr": csr, "k8s_token": kube.token(&pod)});
    let (status, answer) = https(
        ca.addrs["api"],
        &bundle,
        None,
        "POST",
        "/v1/certify",
        body.to_string().as_bytes(),
    )
    .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert!(
        state.join("state.db").exists() && state.join("audit.jsonl").exists(),
        "state on its own volume"
    );
    // Operator commands find the same CA through the pod's environment
    // (`kubectl exec warden-ca-0 -- warden ca ...`).
    let env = |args: &[&str]| {
        common::warden()
            .args(args)
            .env("WARDEN_CA_DIR", &keys)
            .env("WARDEN_CA_STATE_DIR", &state)
            .output()
            .unwrap()
    };
    let denied = env(&[
        "ca",
        "deny",
        "--spiffe-id",
        "spiffe://example.org/ns/shop/sa/old",
    ]);
    assert!(
        denied.status.success(),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    let verified = env(&["ca", "audit", "verify"]);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );

    // The webhook as its pod runs it: the args of its Deployment, the
    // bundle of the CA's ConfigMap and its projected token (audience
    // warden) in its volume; it attests to the CA for a certificate with
    // the names the CA's ca.yaml grants it (the install narrowed `allow`
    // to ns/shop: the webhook is allowed all the same).
    let secrets = tmp.path().join("var-run-secrets-warden");
    mount(
        &o["ConfigMap/warden-ca-config"],
        &[("bundle.pem", "bundle.pem")],
        &secrets,
    );
    let webhook_pod = kube.add_pod("warden", "warden-webhook-7c9f", "warden-webhook");
    std::fs::write(secrets.join("token"), kube.token(&webhook_pod)).unwrap();
    let spec = &o["Deployment/warden-webhook"]["spec"]["template"]["spec"];
    assert_eq!(
        spec["volumes"][0]["projected"]["sources"][1]["serviceAccountToken"]["audience"],
        "warden"
    );
    let ca_url = format!("https://{}", ca.addrs["api"]);
    let args: Vec<String> = spec["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_str().unwrap();
            match a {
                "[::]:8443" | "[::]:9901" => "127.0.0.1:0".to_owned(),
                "https://warden-ca.warden.svc:8443" => ca_url.clone(),
                a => a.replace("/var/run/secrets/warden", s(&secrets)),
            }
        })
        .collect();
    assert!(
        args.windows(2)
            .any(|w| w == ["--dns-name", "warden-webhook.warden.svc"]),
        "{args:?}"
    );
    let hook = Running::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let ca_bundle = base64::engine::general_purpose::STANDARD
        .decode(hooks[0]["clientConfig"]["caBundle"].as_str().unwrap())
        .unwrap();
    let ca_bundle = String::from_utf8(ca_bundle).unwrap();
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "1", "operation": "CREATE", "namespace": "shop",
            "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                "spec": {"containers": [{"name": "p", "image": "p", "ports": [{"containerPort": 80}]}]}}}
    });
    let (status, answer) = common::post_verified(
        hook.addrs["webhook"],
        &ca_bundle,
        "warden-webhook.warden.svc",
        "/inject/namespace",
        review.to_string().as_bytes(),
    );
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("\"patchType\":\"JSONPatch\""), "{answer}");

    // Replicas only on the shared store.
    let r = run(&[
        "install",
        "--trust-domain",
        "example.org",
        "--ca-replicas",
        "3",
    ]);
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("--ha"));
}

#[test]
fn install_ha_runs_replicas_on_the_postgres_url_of_a_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let yaml = run_ok(&[
        "install",
        "--trust-domain",
        "example.org",
        "--ha",
        "--ca-replicas",
        "3",
        "--store-secret",
        "ca-db",
    ]);
    validate(tmp.path(), &yaml);
    let o = objects(&yaml);
    let ca = &o["StatefulSet/warden-ca"]["spec"];
    assert_eq!(ca["replicas"], 3);
    let env = ca["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    let store = env.iter().find(|e| e["name"] == "WARDEN_CA_STORE").unwrap();
    assert_eq!(
        store["valueFrom"]["secretKeyRef"],
        json!({"name": "ca-db", "key": "url", "optional": false})
    );
    // Every replica unseals rotation's keys with the same store.key.
    let secrets = &o["Secret/warden-ca-secrets"]["data"];
    assert!(secrets["store.key"].is_string());
    assert!(secrets["root-key.pem"].is_string());
    // One replica at a time through a drain.
    assert_eq!(
        o["PodDisruptionBudget/warden-ca"]["spec"]["maxUnavailable"],
        1
    );
    let plain = run_ok(&["install", "--trust-domain", "example.org"]);
    assert!(!plain.contains("WARDEN_CA_STORE"));
}

/// A root made elsewhere: (certificate PEM, key PEM).
fn own_root() -> (Ca, String, String) {
    let ca = Ca::init("example.org");
    let cert = std::fs::read_to_string(ca.dir.join("root.pem")).unwrap();
    let key = std::fs::read_to_string(ca.dir.join("root-key.pem")).unwrap();
    (ca, cert, key)
}

/// What a brought root must give: the keys Secret's `ca.crt` and the bundle
/// are that root, the CA's intermediate chains to it, and its key is
/// nowhere in the output.
fn check_brought_root(yaml: &str, root_pem: &str, key_pem: &str) {
    let o = objects(yaml);
    let data = |obj: &str, key: &str| {
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(o[obj]["data"][key].as_str().unwrap())
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(
        data("Secret/warden-ca-keys", "ca.crt").trim(),
        root_pem.trim()
    );
    assert!(
        o["Secret/warden-ca-secrets"]["data"]
            .get("root-key.pem")
            .is_none(),
        "the root's key stays where it was"
    );
    let body = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<String>();
    assert!(!yaml.contains(&body), "the root's key is not written out");
    // The intermediate of the keys Secret signs leaves that chain to it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("intermediate.pem"),
        data("Secret/warden-ca-keys", "tls.crt"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("intermediate-key.pem"),
        data("Secret/warden-ca-keys", "tls.key"),
    )
    .unwrap();
    let (leaf, _) =
        common::forge_leaf(dir.path(), common::svid_params(&["spiffe://example.org/w"]));
    webpki_verifies(&leaf, root_pem).unwrap();
}

#[test]
fn install_brings_a_root_from_pem_files_or_a_cert_manager_secret() {
    let (ca, cert, key) = own_root();
    let tmp = ca.tmp.path();
    let files = run_ok(&[
        "install",
        "--trust-domain",
        "example.org",
        "--root-cert",
        s(&ca.dir.join("root.pem")),
        "--root-key",
        s(&ca.dir.join("root-key.pem")),
    ]);
    check_brought_root(&files, &cert, &key);
    validate(tmp, &files);

    // The Secret as `kubectl get secret -o yaml` prints it, and as JSON.
    let b64 = |t: &str| base64::engine::general_purpose::STANDARD.encode(t);
    let yaml = format!(
        "apiVersion: v1\ndata:\n  ca.crt: {}\n  tls.crt: {}\n  tls.key: {}\nkind: Secret\nmetadata:\n  annotations:\n    cert-manager.io/issuer-name: selfsigned\n  name: warden-root\n  namespace: cert-manager\n  resourceVersion: \"1234\"\ntype: kubernetes.io/tls\n",
        b64(&cert),
        b64(&cert),
        b64(&key)
    );
    let json = json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "warden-root"},
        "data": {"tls.crt": b64(&cert), "tls.key": b64(&key)},
    })
    .to_string();
    for (name, text) in [("root.yaml", yaml), ("root.json", json)] {
        let file = tmp.join(name);
        std::fs::write(&file, text).unwrap();
        let out = run_ok(&[
            "install",
            "--trust-domain",
            "example.org",
            "--root-secret",
            s(&file),
        ]);
        check_brought_root(&out, &cert, &key);
    }

    // What is missing or wrong is said, with the file: exit 2.
    let no_key = tmp.join("no-key.yaml");
    std::fs::write(
        &no_key,
        format!(
            "apiVersion: v1\nkind: Secret\ndata:\n  tls.crt: {}\n",
            b64(&cert)
        ),
    )
    .unwrap();
    let missing = tmp.join("nowhere.yaml");
    for (file, says) in [
        (&no_key, "the Secret has no tls.key in data"),
        (&missing, "No such file"),
    ] {
        let r = run(&[
            "install",
            "--trust-domain",
            "example.org",
            "--root-secret",
            s(file),
        ]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{err}");
        assert!(err.contains(s(file)) && err.contains(says), "{err}");
    }
    // One root at a time.
    let r = run(&[
        "install",
        "--trust-domain",
        "example.org",
        "--root-secret",
        s(&no_key),
        "--root-cert",
        s(&ca.dir.join("root.pem")),
        "--root-key",
        s(&ca.dir.join("root-key.pem")),
    ]);
    assert_eq!(r.status.code(), Some(2));
}

#[test]
fn install_puts_everything_in_the_namespace_image_and_webhook_replicas_asked_for() {
    let tmp = tempfile::tempdir().unwrap();
    let yaml = run_ok(&[
        "install",
        "--trust-domain",
        "example.org",
        "--namespace",
        "mesh",
        "--image",
        "registry.example/warden:9.9.9",
        "--webhook-replicas",
        "3",
    ]);
    validate(tmp.path(), &yaml);
    let o = objects(&yaml);
    assert!(o.contains_key("Namespace/mesh"));
    for (name, obj) in &o {
        let cluster_wide = ["Namespace/", "ClusterRole", "MutatingWebhookConfiguration/"]
            .iter()
            .any(|k| name.starts_with(k));
        if !cluster_wide {
            assert_eq!(obj["metadata"]["namespace"], "mesh", "{name}");
        }
    }
    assert_eq!(
        o["ClusterRoleBinding/warden-ca"]["subjects"][0]["namespace"],
        "mesh"
    );
    let webhook = &o["Deployment/warden-webhook"]["spec"];
    assert_eq!(webhook["replicas"], 3);
    for w in ["StatefulSet/warden-ca", "Deployment/warden-webhook"] {
        assert_eq!(
            o[w]["spec"]["template"]["spec"]["containers"][0]["image"],
            "registry.example/warden:9.9.9",
            "{w}"
        );
    }
    // The sidecars the webhook injects: the same image, the CA in `mesh`.
    let args: Vec<&str> = webhook["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let after = |flag: &str| args[args.iter().position(|a| *a == flag).unwrap() + 1];
    assert_eq!(after("--image"), "registry.example/warden:9.9.9");
    assert_eq!(after("--ca-url"), "https://warden-ca.mesh.svc:8443");
    // With more than one replica a drain keeps one.
    assert_eq!(
        o["PodDisruptionBudget/warden-webhook"]["spec"]["minAvailable"],
        1
    );
    let hooks = &o["MutatingWebhookConfiguration/warden-injector"]["webhooks"];
    for h in hooks.as_array().unwrap() {
        assert_eq!(h["clientConfig"]["service"]["namespace"], "mesh");
        assert!(
            h["namespaceSelector"].to_string().contains("\"mesh\""),
            "its own namespace is never sent: {h}"
        );
    }
    // The webhook asks for the names of its Service in `mesh`, and the
    // CA's ca.yaml grants them to its ServiceAccount there.
    let names: Vec<&str> = args
        .windows(2)
        .filter(|w| w[0] == "--dns-name")
        .map(|w| w[1])
        .collect();
    assert_eq!(
        names,
        [
            "warden-webhook.mesh.svc",
            "warden-webhook.mesh.svc.cluster.local"
        ]
    );
    let ca_yaml = o["ConfigMap/warden-ca-config"]["data"]["ca.yaml"]
        .as_str()
        .unwrap();
    assert!(
        ca_yaml.contains("- {spiffe_id: spiffe://example.org/ns/mesh/sa/warden-webhook, names: [warden-webhook.mesh.svc, warden-webhook.mesh.svc.cluster.local]}"),
        "{ca_yaml}"
    );
    // Out of range: exit 2, the flag named.
    let r = run(&[
        "install",
        "--trust-domain",
        "example.org",
        "--webhook-replicas",
        "0",
    ]);
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("--webhook-replicas"));
}
