//! The mutating admission webhook's decision, as a pure function of the
//! AdmissionReview it receives (`admission.k8s.io/v1`): the same mutation
//! as `warden inject`, applied to the raw JSON of the pod in the request,
//! and answered as a JSONPatch computed against that same raw JSON, so that
//! fields warden does not know (or a newer API adds) are never touched.
//!
//! Two paths, for the two ways to opt in (each is its own entry in the
//! MutatingWebhookConfiguration `warden install` writes):
//! - `/inject/namespace`: the API server sends pods of namespaces labelled
//!   `warden.dev/inject=enabled`; they are injected unless opted out;
//! - `/inject/pod`: pods elsewhere that carry the label
//!   `warden.dev/inject=enabled` (the configuration's objectSelector sends
//!   only those: selectors see labels, not annotations), as Istio's
//!   `sidecar.istio.io/inject` label does. The annotation
//!   `warden.dev/inject: disabled` still opts a pod out, on either path;
//!   the annotation `enabled` opts nothing in (the API server would never
//!   send such a pod here).
//!
//! Everything else (another kind, an opted-out pod, a pod already injected,
//! a pod that cannot be injected) is allowed unchanged, with a warning
//! that says why when it was a pod warden was asked to inject.

use base64::Engine;
use serde_json::{Value, json};

use crate::inject::{Outcome, inject};
use crate::sidecar::{INJECT, Settings};

/// How a pod reached the webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptIn {
    /// Its namespace is labelled: inject unless the pod opts out.
    Namespace,
    /// Only its own label (`warden.dev/inject: enabled`) opts it in.
    Pod,
}

impl OptIn {
    /// The path the API server calls for each.
    pub fn from_path(path: &str) -> Option<Self> {
        match path {
            "/inject/namespace" => Some(OptIn::Namespace),
            "/inject/pod" => Some(OptIn::Pod),
            _ => None,
        }
    }
}

/// What the webhook did with one review (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A patch adds the sidecar.
    Injected,
    /// Allowed unchanged.
    Unchanged,
    /// Allowed unchanged, though asked to inject (with a warning).
    Skipped,
    /// Refused: asked to inject, and its annotations cannot work.
    Refused,
}

impl Verdict {
    /// The label.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Injected => "injected",
            Verdict::Unchanged => "unchanged",
            Verdict::Skipped => "skipped",
            Verdict::Refused => "refused",
        }
    }
}

/// Answers one AdmissionReview; `Err` says why it is not one (answered 400).
pub fn review(body: &[u8], opt_in: OptIn, s: &Settings) -> Result<(Value, Verdict), String> {
    let review: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    if review["apiVersion"] != "admission.k8s.io/v1" || review["kind"] != "AdmissionReview" {
        return Err("not an admission.k8s.io/v1 AdmissionReview".into());
    }
    let request = &review["request"];
    let uid = request["uid"]
        .as_str()
        .filter(|u| !u.is_empty())
        .ok_or("request.uid is missing")?;
    let original = request
        .get("object")
        .filter(|o| o.is_object())
        .ok_or("request.object is missing")?;
    let mut response = json!({"uid": uid, "allowed": true});
    let is_pod_create = original["kind"] == "Pod"
        && request["operation"]
            .as_str()
            .is_none_or(|op| op == "CREATE");
    let says = |field: &str| {
        original
            .pointer(&format!("/metadata/{field}"))
            .and_then(|a| a.get(INJECT))
            .and_then(Value::as_str)
    };
    let opted_out = says("annotations") == Some("disabled");
    let wanted = match opt_in {
        OptIn::Namespace => !opted_out,
        OptIn::Pod => says("labels") == Some("enabled") && !opted_out,
    };
    let mut verdict = Verdict::Unchanged;
    if is_pod_create && wanted {
        let mut pod = original.clone();
        let reports = inject(&mut pod, s);
        match reports.first().map(|r| &r.outcome) {
            Some(Outcome::Injected) => {
                let patch = json_patch::diff(original, &pod);
                let bytes = serde_json::to_vec(&patch).map_err(|e| e.to_string())?;
                response["patchType"] = "JSONPatch".into();
                response["patch"] = base64::engine::general_purpose::STANDARD
                    .encode(bytes)
                    .into();
                verdict = Verdict::Injected;
            }
            Some(Outcome::Skipped(why)) => {
                response["warnings"] = json!([format!("warden: not injected: {why}")]);
                verdict = Verdict::Skipped;
            }
            // Asked to be protected and cannot be: refused, never admitted
            // unprotected (the event names warden and says why).
            Some(Outcome::Invalid(why)) => {
                response["allowed"] = false.into();
                response["status"] = json!({
                    "code": 400,
                    "message": format!("warden: cannot inject this pod: {why}"),
                });
                verdict = Verdict::Refused;
            }
            Some(Outcome::AlreadyInjected) | None => {}
        }
    }
    // A dry run gets the same answer: the mutation has no side effects.
    Ok((
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": response,
        }),
        verdict,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

    use super::*;

    fn settings() -> Settings {
        Settings {
            image: "warden:test".into(),
            ca_url: "https://warden-ca.warden.svc:8443".into(),
            bundle_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            trust_domain: "example.org".into(),
        }
    }

    fn review_of(pod: &Value) -> Vec<u8> {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {"uid": "u1", "operation": "CREATE", "object": pod},
        })
        .to_string()
        .into_bytes()
    }

    fn patch_of(answer: &Value) -> json_patch::Patch {
        let b64 = answer["response"]["patch"].as_str().unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn pod(meta: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"containers": [{"name": "web", "image": "web", "ports": [{"containerPort": 8080}]}]},
        })
    }

    #[test]
    fn patch_paths_escape_slash_and_tilde_in_keys() {
        // RFC 6901: `~` is `~0`, `/` is `~1`, `~` first.
        let mut p = pod(json!({"name": "p", "annotations": {"a/b~c": "x"}}));
        // An unknown key on the app's first init container: the sidecar
        // takes index 0, so the patch touches that key there.
        p["spec"]["initContainers"] = json!([{"name": "init", "image": "i", "a/b~c": 1}]);
        let (answer, verdict) = review(&review_of(&p), OptIn::Namespace, &settings()).unwrap();
        assert_eq!(verdict, Verdict::Injected);
        let patch = patch_of(&answer);
        let paths: Vec<String> = serde_json::to_value(&patch)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|op| op["path"].as_str().unwrap().to_owned())
            .collect();
        assert!(
            paths.contains(&"/spec/initContainers/0/a~1b~0c".to_owned()),
            "{paths:?}"
        );
        assert!(
            paths.contains(&"/metadata/annotations/warden.dev~1injected".to_owned()),
            "{paths:?}"
        );
        // Applied, it gives the pod the mutation gives, the key kept on its
        // container (now second).
        let mut patched = p.clone();
        json_patch::patch(&mut patched, &patch).unwrap();
        let mut injected = p.clone();
        crate::inject::inject(&mut injected, &settings());
        assert_eq!(patched, injected);
        assert_eq!(patched["spec"]["initContainers"][1]["a/b~c"], 1);
        assert_eq!(patched["metadata"]["annotations"]["a/b~c"], "x");
    }

    #[test]
    fn outside_labelled_namespaces_only_the_pod_label_opts_in() {
        let s = settings();
        let answer = |p: &Value, via| review(&review_of(p), via, &s).unwrap().1;
        let labelled = pod(json!({"name": "p", "labels": {INJECT: "enabled"}}));
        assert_eq!(answer(&labelled, OptIn::Pod), Verdict::Injected);
        let annotated = pod(json!({"name": "p", "annotations": {INJECT: "enabled"}}));
        assert_eq!(answer(&annotated, OptIn::Pod), Verdict::Unchanged);
        let opted_out = pod(json!({
            "name": "p", "labels": {INJECT: "enabled"}, "annotations": {INJECT: "disabled"},
        }));
        assert_eq!(answer(&opted_out, OptIn::Pod), Verdict::Unchanged);
        assert_eq!(answer(&opted_out, OptIn::Namespace), Verdict::Unchanged);
        let plain = pod(json!({"name": "p"}));
        assert_eq!(answer(&plain, OptIn::Namespace), Verdict::Injected);
        assert_eq!(answer(&plain, OptIn::Pod), Verdict::Unchanged);
    }

    #[test]
    fn a_foreign_container_named_like_the_sidecar_is_skipped_with_a_warning() {
        let mut p = pod(json!({"name": "p"}));
        p["spec"]["containers"][0]["name"] = crate::sidecar::CONTAINER.into();
        let (answer, verdict) = review(&review_of(&p), OptIn::Namespace, &settings()).unwrap();
        assert_eq!(verdict, Verdict::Skipped);
        let warning = answer["response"]["warnings"][0].as_str().unwrap();
        assert!(warning.contains("warden-proxy"), "{warning}");
        assert!(answer["response"].get("patch").is_none());
    }
}
