//! What the guard decides instead of the app answering: a typed refusal
//! ([`GuardRefusal`]) with its status, its fixed reason (the problem type
//! and metric label), what it says, and the rate-limit headers it carries
//! (draft-ietf-httpapi-ratelimit-headers):
//!
//! - `RateLimit-Policy: "identity-tokens-per-minute";q=20000;w=60, ...`:
//!   every quota of the route.
//! - `RateLimit: "identity-tokens-per-minute";r=0;t=42`: the quota that refused.
//! - `Retry-After` on a refusal that waiting can cure.
//!
//! The guard builds no answer: the proxy renders a refusal the way it
//! renders all of its own (an RFC 9457 problem, or a gRPC status).

use std::borrow::Cow;

use http::{HeaderName, HeaderValue, StatusCode, header};

use super::answer::{RATELIMIT, RATELIMIT_POLICY, quota_value};
use super::limits::{Denial, Plan};

/// A model request refused by the guard, or an app's answer it will not deliver.
#[derive(Debug, Clone)]
pub struct GuardRefusal {
    status: StatusCode,
    reason: &'static str,
    detail: Cow<'static, str>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl GuardRefusal {
    /// A refusal with `status`, a fixed `reason` (problem type, metric
    /// label) and a `detail` saying what was wrong.
    pub fn new(
        status: StatusCode,
        reason: &'static str,
        detail: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            status,
            reason,
            detail: detail.into(),
            headers: Vec::new(),
        }
    }

    /// Adds a header to the answer.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The fixed reason: the problem type (`quota_exceeded` becomes
    /// `urn:warden:problem:quota-exceeded`) and the decision's metric label.
    pub fn reason(&self) -> &'static str {
        self.reason
    }

    /// What the answer says.
    pub fn detail(&self) -> &Cow<'static, str> {
        &self.detail
    }

    /// Headers the answer carries besides the problem's own.
    pub fn headers(&self) -> &[(HeaderName, HeaderValue)] {
        &self.headers
    }
}

/// 400 with `reason`: a request the guard will not forward.
pub fn bad_request(reason: &'static str, detail: impl Into<Cow<'static, str>>) -> GuardRefusal {
    GuardRefusal::new(StatusCode::BAD_REQUEST, reason, detail)
}

/// 502 with `reason`: an app's answer the guard will not deliver.
pub fn bad_answer(reason: &'static str, detail: &'static str) -> GuardRefusal {
    GuardRefusal::new(StatusCode::BAD_GATEWAY, reason, detail)
}

/// 503 limit-store-unavailable, for a route that fails closed.
pub fn store_unavailable() -> GuardRefusal {
    GuardRefusal::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "limit_store_unavailable",
        "the shared limit store cannot be reached; this route fails closed",
    )
    .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
}

/// 429 quota-exceeded for a refusal by `denial`.
pub fn quota_exceeded(plan: &Plan, policy: &Option<HeaderValue>, denial: &Denial) -> GuardRefusal {
    let name = plan
        .quotas
        .get(denial.quota)
        .map_or("quota", |q| q.name.as_str());
    let detail = format!(
        "the caller's {name} limit is used up; retry after {} s",
        denial.retry_after_s
    );
    let mut r = GuardRefusal::new(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded", detail);
    if let Some(p) = policy {
        r = r.with_header(RATELIMIT_POLICY.clone(), p.clone());
    }
    if let Some(v) = quota_value(plan, denial.quota, 0, denial.retry_after_s) {
        r = r.with_header(RATELIMIT.clone(), v);
    }
    r.with_header(header::RETRY_AFTER, HeaderValue::from(denial.retry_after_s))
}

/// 429 abnormal-usage-detected: the caller's usage looks like model extraction.
pub fn abnormal_usage() -> GuardRefusal {
    GuardRefusal::new(
        StatusCode::TOO_MANY_REQUESTS,
        "abnormal_usage_detected",
        "this caller's queries look like an attempt to copy the model; further requests are refused",
    )
}

#[cfg(test)]
mod tests {
    use super::super::answer::policy_header;
    use super::*;
    use warden_config::model::{LimitSet, Limits};

    #[test]
    fn refusals_carry_the_draft_headers() {
        let plan = Plan::new(
            "chat",
            &Limits {
                identity: LimitSet {
                    tokens_per_minute: Some(1000),
                    concurrent: Some(2),
                    ..LimitSet::default()
                },
                ..Limits::default()
            },
        );
        let policy = policy_header(&plan);
        assert_eq!(
            policy.as_ref().unwrap(),
            "\"identity-tokens-per-minute\";q=1000;w=60, \"identity-concurrent\";q=2;qu=\"concurrent-requests\""
        );
        let r = quota_exceeded(
            &plan,
            &policy,
            &Denial {
                quota: 0,
                retry_after_s: 17,
            },
        );
        assert_eq!(r.status(), 429);
        assert_eq!(r.reason(), "quota_exceeded");
        let h = |name: &str| {
            r.headers()
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.to_str().unwrap().to_owned())
        };
        assert_eq!(h("retry-after").unwrap(), "17");
        assert_eq!(
            h("ratelimit").unwrap(),
            "\"identity-tokens-per-minute\";r=0;t=17"
        );
        assert_eq!(
            h("ratelimit-policy"),
            policy.map(|p| p.to_str().unwrap().to_owned())
        );
    }
}
