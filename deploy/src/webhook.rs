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
//!   only those: selectors see labels, not annotations); the annotation of
//!   that name opts in too.
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
    /// Only its own annotation can opt it in.
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
    let wanted = match opt_in {
        OptIn::Namespace => says("annotations") != Some("disabled"),
        OptIn::Pod => {
            says("annotations") == Some("enabled")
                || (says("labels") == Some("enabled") && says("annotations") != Some("disabled"))
        }
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
