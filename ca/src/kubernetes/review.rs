//! Online verification: the API server reviews the token for warden's
//! audience (`POST /apis/authentication.k8s.io/v1/tokenreviews`), then the
//! pod it is bound to is fetched (`GET /api/v1/namespaces/<ns>/pods/<name>`)
//! and must still exist with the same UID and ServiceAccount. This is the
//! mode that notices a deleted pod before its token expires.

use serde::Deserialize;
use serde_json::json;

use super::Refused;
use super::api::{Api, MAX_ANSWER_BYTES};
use super::claims::Subject;

#[derive(Deserialize)]
struct Review {
    status: Option<Status>,
}

#[derive(Deserialize)]
struct Status {
    #[serde(default)]
    authenticated: bool,
    user: Option<User>,
    audiences: Option<Vec<String>>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct User {
    username: Option<String>,
    #[serde(default)]
    extra: std::collections::HashMap<String, Vec<String>>,
}

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// Asks the API server whether `token` is valid for `audience`; returns the
/// pod-bound ServiceAccount it authenticates.
pub async fn review(api: &Api, token: &str, audience: &str) -> Result<Subject, Refused> {
    let body = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": [audience]},
    });
    let (status, answer) = api
        .post(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            body.to_string().into_bytes(),
            MAX_ANSWER_BYTES,
        )
        .await
        .map_err(Refused::Unavailable)?;
    if !status.is_success() {
        return Err(Refused::Unavailable(format!(
            "TokenReview answered HTTP {status} (does the CA's ServiceAccount may create tokenreviews?)"
        )));
    }
    let review: Review = serde_json::from_slice(&answer)
        .map_err(|e| Refused::Unavailable(format!("TokenReview answer: {e}")))?;
    let s = review
        .status
        .ok_or_else(|| Refused::Unavailable("TokenReview answer has no status".into()))?;
    if !s.authenticated {
        return Err(Refused::Rejected(
            s.error
                .unwrap_or_else(|| "not authenticated".into())
                .chars()
                .take(200)
                .collect(),
        ));
    }
    // An API server that does not support audiences reviews against its
    // own: never accept that in place of warden's.
    if !s.audiences.is_some_and(|a| a.iter().any(|x| x == audience)) {
        return Err(Refused::Audience(audience.to_owned()));
    }
    let user = s
        .user
        .ok_or_else(|| Refused::Subject("TokenReview status has no user".into()))?;
    let username = user.username.unwrap_or_default();
    let (namespace, service_account) = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split_once(':'))
        .ok_or_else(|| Refused::Subject(format!("{username:?} is not a ServiceAccount")))?;
    let first = |k: &str| user.extra.get(k).and_then(|v| v.first()).cloned();
    let (Some(pod), Some(pod_uid)) = (first(POD_NAME), first(POD_UID)) else {
        return Err(Refused::NoPod);
    };
    Subject::new(namespace, service_account, &pod, &pod_uid)
}

#[derive(Deserialize)]
struct Pod {
    metadata: Meta,
    spec: Option<PodSpec>,
}

#[derive(Deserialize)]
struct Meta {
    uid: Option<String>,
    #[serde(rename = "deletionTimestamp")]
    deletion_timestamp: Option<String>,
}

#[derive(Deserialize)]
struct PodSpec {
    #[serde(rename = "serviceAccountName")]
    service_account_name: Option<String>,
}

/// Checks that the pod still exists, with the token's UID and ServiceAccount.
pub async fn pod_is_live(api: &Api, s: &Subject) -> Result<(), Refused> {
    let path = format!("/api/v1/namespaces/{}/pods/{}", s.namespace, s.pod);
    let (status, answer) = api
        .get(&path, MAX_ANSWER_BYTES)
        .await
        .map_err(Refused::Unavailable)?;
    if status == http::StatusCode::NOT_FOUND {
        return Err(Refused::PodGone(format!("{}/{}", s.namespace, s.pod)));
    }
    if !status.is_success() {
        return Err(Refused::Unavailable(format!(
            "GET pod answered HTTP {status} (may the CA's ServiceAccount get pods?)"
        )));
    }
    let pod: Pod = serde_json::from_slice(&answer)
        .map_err(|e| Refused::Unavailable(format!("pod object: {e}")))?;
    if pod.metadata.uid.as_deref() != Some(s.pod_uid.as_str()) {
        return Err(Refused::PodChanged(format!(
            "pod {}/{} now has UID {}, the token was for {}",
            s.namespace,
            s.pod,
            pod.metadata.uid.unwrap_or_default(),
            s.pod_uid
        )));
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return Err(Refused::PodGone(format!(
            "{}/{} (terminating)",
            s.namespace, s.pod
        )));
    }
    let sa = pod.spec.and_then(|p| p.service_account_name);
    if sa.as_deref().unwrap_or("default") != s.service_account {
        return Err(Refused::PodChanged(format!(
            "pod {}/{} runs as ServiceAccount {}, the token names {}",
            s.namespace,
            s.pod,
            sa.unwrap_or_else(|| "default".into()),
            s.service_account
        )));
    }
    Ok(())
}
