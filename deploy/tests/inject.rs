//! The injection on workload manifests: what is added, what is kept, what
//! is skipped, and that injecting twice changes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use serde_json::Value;

use warden_deploy::inject::{Outcome, inject_stream};
use warden_deploy::sidecar::{CONTAINER, INJECTED, Settings};

fn settings() -> Settings {
    Settings {
        image: "registry.example/warden:0.1.0".into(),
        ca_url: "https://warden-ca.warden.svc:8443".into(),
        bundle_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
        trust_domain: "example.org".into(),
    }
}

const DEPLOYMENT: &str = "# the shop's web front end
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
      annotations:
        build: \"1234\"
        canary: \"true\"
    spec:
      someFutureField: keep-me
      initContainers:
        - name: logs
          image: fluent-bit
          restartPolicy: Always
      containers:
        - name: web
          image: shop/web:2
          ports:
            - containerPort: 8080
";

fn docs(text: &str) -> Vec<Value> {
    text.split("\n---")
        .filter(|d| {
            d.lines().any(|l| {
                !l.trim().is_empty() && !l.trim_start().starts_with('#') && l.trim() != "---"
            })
        })
        .map(|d| serde_saphyr::from_str(d.trim_start_matches("---")).unwrap())
        .collect()
}

#[test]
fn a_deployment_gets_a_native_sidecar_first_and_keeps_every_field() {
    let (out, reports) = inject_stream(DEPLOYMENT, &settings(), false).unwrap();
    assert_eq!(reports.len(), 1);
    assert_eq!(
        (reports[0].object.as_str(), &reports[0].outcome),
        ("Deployment/web", &Outcome::Injected)
    );
    let d = &docs(&out)[0];
    let spec = &d["spec"]["template"]["spec"];
    let sidecar = &spec["initContainers"][0];
    assert_eq!(sidecar["name"], CONTAINER);
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(sidecar["startupProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(sidecar["securityContext"]["runAsNonRoot"], true);
    assert_eq!(sidecar["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert_eq!(
        spec["initContainers"][1]["name"], "logs",
        "the app's own init containers follow"
    );
    assert_eq!(
        spec["initContainers"][1]["restartPolicy"], "Always",
        "fields a struct may not know survive"
    );
    assert_eq!(spec["someFutureField"], "keep-me");
    assert_eq!(spec["containers"][0]["name"], "web");
    assert!(
        spec["containers"][0].get("volumeMounts").is_none(),
        "the token is mounted into the sidecar only"
    );
    let token = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "warden-token")
        .unwrap();
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "warden"
    );
    let ann = &d["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(
        ann["build"], "1234",
        "strings that look like numbers stay strings"
    );
    assert_eq!(ann["canary"], "true");
    assert!(ann[INJECTED].is_string());
    // The proxy's config: the app's port, the pod's namespace only.
    let env = sidecar["env"].as_array().unwrap();
    let config = env
        .iter()
        .find(|e| e["name"] == "WARDEN_PROXY_CONFIG")
        .unwrap()["value"]
        .as_str()
        .unwrap();
    let config: Value = serde_saphyr::from_str(config).unwrap();
    assert_eq!(config["inbound"][0]["app"], "127.0.0.1:8080");
    assert_eq!(
        config["inbound"][0]["policy"]["rules"][0]["from"][0],
        "spiffe://example.org/ns/$(WARDEN_NAMESPACE)/*"
    );
    assert!(
        config["identity"]["kubernetes"]["bundle_pem"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    assert_eq!(
        env[0]["name"], "WARDEN_NAMESPACE",
        "defined before the config that refers to it"
    );
}

#[test]
fn injecting_twice_changes_nothing() {
    let (once, _) = inject_stream(DEPLOYMENT, &settings(), false).unwrap();
    let (twice, reports) = inject_stream(&once, &settings(), false).unwrap();
    assert_eq!(once, twice);
    assert_eq!(reports[0].outcome, Outcome::AlreadyInjected);
}

#[test]
fn documents_keep_their_order_and_untouched_ones_their_bytes() {
    let service = "---\n# keep this comment\napiVersion: v1\nkind: Service\nmetadata: {name: web}   # and this one\nspec:\n  ports: [{port: 80, targetPort: 8080}]\n";
    let config =
        "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {level: \"3\"}\n";
    let input = format!("{service}---\n{DEPLOYMENT}{config}");
    let (out, reports) = inject_stream(&input, &settings(), false).unwrap();
    assert_eq!(reports.len(), 1);
    assert!(out.starts_with(service), "{out}");
    assert!(out.ends_with(config), "{out}");
    let kinds: Vec<String> = docs(&out)
        .iter()
        .map(|d| d["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, ["Service", "Deployment", "ConfigMap"]);
}

#[test]
fn opted_out_host_network_and_windows_pods_are_skipped_and_unworkable_ones_refused() {
    let pod = |meta: &str, spec: &str, ports: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {meta}\nspec:\n{spec}  containers: [{{name: c, image: c{ports}}}]\n"
        )
    };
    let port80 = ", ports: [{containerPort: 80}]";
    for (pod, why) in [
        (
            pod(
                "{name: a, annotations: {warden.dev/inject: disabled}}",
                "",
                port80,
            ),
            "disabled",
        ),
        (
            pod("{name: b}", "  hostNetwork: true\n", port80),
            "hostNetwork",
        ),
        (
            pod("{name: w}", "  os: {name: windows}\n", port80),
            "Windows",
        ),
        // A container of the sidecar's name that warden did not add.
        (
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: x}}\nspec:\n  containers: [{{name: c, image: c{port80}}}, {{name: warden-proxy, image: other}}]\n"
            ),
            "did not inject",
        ),
    ] {
        let (out, reports) = inject_stream(&pod, &settings(), false).unwrap();
        assert_eq!(out, pod);
        match &reports[0].outcome {
            Outcome::Skipped(reason) => assert!(reason.contains(why), "{reason}"),
            other => panic!("{pod}: {other:?}"),
        }
    }
    // Annotations or ports that cannot work are an error, not a skip.
    for (pod, why) in [
        (pod("{name: c}", "", ""), "warden.dev/app-port"),
        (
            pod("{name: d}", "", ", ports: [{containerPort: 4143}]"),
            "4143",
        ),
        (
            pod(
                "{name: e, annotations: {warden.dev/proxy-memory-limit: lots}}",
                "",
                port80,
            ),
            "resource quantity",
        ),
        (
            pod(
                "{name: f, annotations: {warden.dev/allow: \"not a pattern\"}}",
                "",
                port80,
            ),
            "refuses",
        ),
        (
            pod(
                "{name: g, annotations: {warden.dev/policy-configmap: Not_A_Name}}",
                "",
                port80,
            ),
            "not a ConfigMap name",
        ),
        (
            pod(
                "{name: h, annotations: {warden.dev/policy-configmap: p, warden.dev/allow: \"spiffe://example.org/*\"}}",
                "",
                port80,
            ),
            "keep one",
        ),
    ] {
        let (out, reports) = inject_stream(&pod, &settings(), false).unwrap();
        assert_eq!(out, pod);
        match &reports[0].outcome {
            Outcome::Invalid(reason) => assert!(reason.contains(why), "{reason}"),
            other => panic!("{pod}: {other:?}"),
        }
    }
}

#[test]
fn every_workload_kind_and_lists_are_injected() {
    let template = "    metadata: {labels: {app: x}}\n    spec:\n      containers: [{name: x, image: x, ports: [{containerPort: 9000}]}]\n";
    let mut input = String::new();
    for kind in [
        "Deployment",
        "StatefulSet",
        "DaemonSet",
        "ReplicaSet",
        "Job",
    ] {
        input.push_str(&format!("---\napiVersion: apps/v1\nkind: {kind}\nmetadata: {{name: x}}\nspec:\n  template:\n{template}"));
    }
    input.push_str(&format!(
        "---\napiVersion: batch/v1\nkind: CronJob\nmetadata: {{name: nightly}}\nspec:\n  schedule: \"0 3 * * *\"\n  jobTemplate:\n    spec:\n      template:\n{}",
        template.lines().map(|l| format!("    {l}\n")).collect::<String>()
    ));
    input.push_str("---\napiVersion: v1\nkind: List\nitems:\n  - apiVersion: v1\n    kind: Pod\n    metadata: {name: p, annotations: {warden.dev/app-port: \"7000\"}}\n    spec:\n      containers: [{name: p, image: p}]\n");
    let (out, reports) = inject_stream(&input, &settings(), false).unwrap();
    assert_eq!(reports.len(), 7, "{reports:?}");
    assert!(
        reports.iter().all(|r| r.outcome == Outcome::Injected),
        "{reports:?}"
    );
    let d = docs(&out);
    assert_eq!(
        d[5]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["initContainers"][0]["name"],
        CONTAINER
    );
    assert_eq!(d[5]["spec"]["schedule"], "0 3 * * *");
    let pod = &d[6]["items"][0];
    assert_eq!(pod["spec"]["initContainers"][0]["name"], CONTAINER);
}

#[test]
fn services_selecting_injected_pods_are_pointed_at_the_sidecar_when_asked() {
    let service = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  selector: {app: web}\n  ports:\n    - {name: http, port: 80, targetPort: 8080}\n    - {name: metrics, port: 9090}\n";
    let other = "---\napiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\nspec:\n  selector: {app: db}\n  ports: [{port: 5432}]\n";
    let input = format!("{service}---\n{DEPLOYMENT}{other}");
    let (plain, _) = inject_stream(&input, &settings(), false).unwrap();
    assert!(plain.starts_with(service), "not asked: untouched");
    let (out, _) = inject_stream(&input, &settings(), true).unwrap();
    let d = docs(&out);
    assert_eq!(
        d[0]["spec"]["ports"][0]["targetPort"], 4143,
        "the app's port now reaches the sidecar"
    );
    assert!(
        d[0]["spec"]["ports"][1].get("targetPort").is_none(),
        "another port is left alone"
    );
    assert!(out.ends_with(other), "a Service of other pods is untouched");
}

#[test]
fn a_policy_configmap_becomes_the_inbound_policy_of_the_sidecar_alone() {
    let input = DEPLOYMENT.replace(
        "        canary: \"true\"\n",
        "        canary: \"true\"\n        warden.dev/policy-configmap: web-policy\n",
    );
    let (out, reports) = inject_stream(&input, &settings(), false).unwrap();
    assert_eq!(reports[0].outcome, Outcome::Injected);
    let d = &docs(&out)[0];
    let spec = &d["spec"]["template"]["spec"];
    let env = spec["initContainers"][0]["env"].as_array().unwrap();
    let names: Vec<&str> = env.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "WARDEN_NAMESPACE",
            "WARDEN_LOG",
            "WARDEN_POLICY",
            "WARDEN_PROXY_CONFIG"
        ],
        "the policy is its own variable, beside the config"
    );
    assert_eq!(
        env[2]["valueFrom"]["configMapKeyRef"],
        serde_json::json!({"name": "web-policy", "key": "policy.json", "optional": false})
    );
    for other in ["containers", "initContainers"] {
        for (i, c) in spec[other].as_array().unwrap().iter().enumerate() {
            if other == "initContainers" && i == 0 {
                continue;
            }
            assert!(
                !c.to_string().contains("web-policy"),
                "only the sidecar reads the ConfigMap: {c}"
            );
        }
    }
    // The config names the variable; it never holds the ConfigMap's text.
    let config = env[3]["value"].as_str().unwrap();
    assert!(!config.contains("$(WARDEN_POLICY)"), "{config}");
    let parsed: serde_json::Value = serde_saphyr::from_str(config).unwrap();
    assert_eq!(parsed["inbound"][0]["policy_env"], "WARDEN_POLICY");
    assert!(parsed["inbound"][0].get("policy").is_none(), "{config}");
    assert_eq!(parsed["inbound"].as_array().unwrap().len(), 1);
}
