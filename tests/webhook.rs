//! The real `warden webhook` over TLS, as the API server calls it: its
//! certificate (from the warden CA, with the Service's DNS name) verifies
//! for that name, it answers the AdmissionReview of the Kubernetes
//! documentation with a JSONPatch that, applied to the request's object,
//! gives exactly the pod `warden inject` gives; malformed reviews get 400.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::io::Write;

use base64::Engine;
use serde_json::{Value, json};

use common::{Ca, Running, metric, run_ok, s, warden};

const SERVICE: &str = "warden-webhook.warden.svc";

/// POST to the webhook, verified for `SERVICE` as the API server does.
fn post(addr: std::net::SocketAddr, bundle: &str, path: &str, body: &[u8]) -> (u16, String) {
    common::post_verified(addr, bundle, SERVICE, path, body)
}

/// The example AdmissionReview of the Kubernetes documentation ("Dynamic
/// Admission Control", request), for a pod.
fn admission_review(pod: &Value, dry_run: bool) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "web-7d4b9c",
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "014fbff9a07c",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]
            },
            "object": pod,
            "oldObject": null,
            "dryRun": dry_run,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

fn pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web-7d4b9c",
            "namespace": "shop",
            "labels": {"app": "web"},
            // Keys with `/` and `~`: the patch must escape them.
            "annotations": {"example.com/owner~team": "shop", "warden.dev/app-port": "8080"}
        },
        "spec": {
            "serviceAccountName": "web",
            "initContainers": [{"name": "migrate", "image": "shop/migrate:1", "restartPolicy": "Always"}],
            "containers": [{"name": "web", "image": "shop/web:2", "ports": [{"containerPort": 8080}]}],
            "someFieldOfANewerRelease": {"x": 1}
        }
    })
}

#[test]
fn the_webhook_patch_gives_the_same_pod_as_inject_and_malformed_reviews_get_400() {
    let ca = Ca::init("example.org");
    let out = ca.tmp.path().join("webhook");
    run_ok(&[
        "ca",
        "issue",
        "--dir",
        ca.dir(),
        "--spiffe-id",
        "spiffe://example.org/ns/warden/sa/webhook",
        "--dns-name",
        SERVICE,
        "--out-dir",
        s(&out),
    ]);
    let bundle = s(&ca.dir.join("bundle.pem")).to_owned();
    let hook = Running::start(&[
        "webhook",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--cert",
        s(&out.join("cert.pem")),
        "--key",
        s(&out.join("key.pem")),
        "--bundle",
        &bundle,
    ]);
    let (api, admin) = (hook.addrs["webhook"], hook.addrs["admin"]);
    let bundle_pem = ca.bundle_pem();

    // Injected: the uid echoed, a JSONPatch.
    let review = admission_review(&pod(), false);
    let (status, body) = post(
        api,
        &bundle_pem,
        "/inject/namespace",
        review.to_string().as_bytes(),
    );
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    let response = &answer["response"];
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut patched = pod();
    json_patch::patch(&mut patched, &patch).unwrap();

    // `warden inject` on the same pod gives the same pod.
    let mut cli = warden()
        .args(["inject", "-f", "-", "--bundle", &bundle])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    cli.stdin
        .take()
        .unwrap()
        .write_all(pod().to_string().as_bytes())
        .unwrap();
    let injected = cli.wait_with_output().unwrap();
    let injected: Value =
        serde_saphyr::from_str(&String::from_utf8(injected.stdout).unwrap()).unwrap();
    assert_eq!(patched, injected);
    assert_eq!(patched["spec"]["initContainers"][0]["name"], "warden-proxy");
    assert_eq!(
        patched["spec"]["initContainers"][1]["restartPolicy"], "Always",
        "unknown-to-structs fields survive"
    );
    assert_eq!(patched["spec"]["someFieldOfANewerRelease"]["x"], 1);
    assert_eq!(
        patched["metadata"]["annotations"]["example.com/owner~team"],
        "shop"
    );

    // A dry run gets the same answer.
    let (_, dry) = post(
        api,
        &bundle_pem,
        "/inject/namespace",
        admission_review(&pod(), true).to_string().as_bytes(),
    );
    let dry: Value = serde_json::from_str(&dry).unwrap();
    assert_eq!(dry["response"]["patch"], response["patch"]);

    // Elsewhere only the pod's own annotation opts in.
    let (_, body) = post(
        api,
        &bundle_pem,
        "/inject/pod",
        review.to_string().as_bytes(),
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["response"]["allowed"], true);
    assert!(v["response"].get("patch").is_none(), "{v}");
    let mut opted = pod();
    opted["metadata"]["annotations"]["warden.dev/inject"] = "enabled".into();
    let (_, body) = post(
        api,
        &bundle_pem,
        "/inject/pod",
        admission_review(&opted, false).to_string().as_bytes(),
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["response"]["patchType"], "JSONPatch");

    // A pod that cannot be injected is allowed, with a warning.
    let mut host = pod();
    host["spec"]["hostNetwork"] = true.into();
    let (_, body) = post(
        api,
        &bundle_pem,
        "/inject/namespace",
        admission_review(&host, false).to_string().as_bytes(),
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["response"]["allowed"], true);
    assert!(
        v["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("hostNetwork"),
        "{v}"
    );

    // A pod asked to be protected whose annotations cannot work is
    // refused, never admitted unprotected.
    let mut bad = pod();
    bad["metadata"]["annotations"]["warden.dev/proxy-memory-limit"] = "lots".into();
    let (_, body) = post(
        api,
        &bundle_pem,
        "/inject/namespace",
        admission_review(&bad, false).to_string().as_bytes(),
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["response"]["allowed"], false, "{v}");
    assert!(
        v["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("resource quantity"),
        "{v}"
    );

    // Elsewhere the label routes a pod here (selectors see labels).
    let mut labelled = pod();
    labelled["metadata"]["labels"]["warden.dev/inject"] = "enabled".into();
    let (_, body) = post(
        api,
        &bundle_pem,
        "/inject/pod",
        admission_review(&labelled, false).to_string().as_bytes(),
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["response"]["patchType"], "JSONPatch", "{v}");

    // Malformed: 400, counted.
    for junk in [
        &b"{not json"[..],
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
        br#"{"kind":"Pod"}"#,
    ] {
        let (status, body) = post(api, &bundle_pem, "/inject/namespace", junk);
        assert_eq!(status, 400, "{body}");
    }
    assert_eq!(
        metric(
            admin,
            "warden_webhook_reviews_total{path=\"/inject/namespace\",result=\"malformed\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(
            admin,
            "warden_webhook_reviews_total{path=\"/inject/namespace\",result=\"injected\"}"
        ),
        2.0
    );
    assert_eq!(common::admin_get(admin, "/ready").0, 200);
}
