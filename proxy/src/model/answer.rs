//! The answers warden gives on a model route, and the rate-limit headers
//! on the app's answers (draft-ietf-httpapi-ratelimit-headers):
//!
//! - `RateLimit-Policy: "identity-tokens-per-minute";q=20000;w=60, ...`:
//!   every quota of the route (on refusals).
//! - `RateLimit: "identity-tokens-per-minute";r=0;t=42`: the quota that
//!   refused, or the one with the least left.
//! - `Retry-After` on a refusal that waiting can cure.
//!
//! Bodies are RFC 9457 problems: `quota-exceeded` or `abnormal-usage-detected`.

use http::{HeaderMap, HeaderName, HeaderValue, Response, header};

use super::limits::{Denial, Headroom, Kind, Plan};
use crate::stack::body::Body;

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The `RateLimit-Policy` value of a plan (None when it has no limit).
pub fn policy_header(plan: &Plan) -> Option<HeaderValue> {
    let mut v = String::new();
    for q in &plan.quotas {
        if !v.is_empty() {
            v.push_str(", ");
        }
        let (quota, window) = q.quota_and_window();
        match q.kind {
            Kind::Concurrent { .. } => v.push_str(&format!(
                "\"{}\";q={quota};qu=\"concurrent-requests\"",
                q.name
            )),
            _ => v.push_str(&format!("\"{}\";q={quota};w={window}", q.name)),
        }
    }
    (!v.is_empty())
        .then(|| HeaderValue::from_str(&v).ok())
        .flatten()
}

fn quota_value(plan: &Plan, quota: usize, remaining: u64, reset_s: u64) -> Option<HeaderValue> {
    let q = plan.quotas.get(quota)?;
    HeaderValue::from_str(&format!("\"{}\";r={remaining};t={reset_s}", q.name)).ok()
}

/// The `RateLimit` value for what remains of `plan`'s tightest limit.
pub fn ratelimit_value(plan: &Plan, room: Headroom) -> Option<HeaderValue> {
    quota_value(plan, room.quota, room.remaining, room.reset_s)
}

/// Adds `RateLimit` to an answer that was let through. `RateLimit-Policy`
/// (every quota, over a hundred bytes) goes on refusals only: on every
/// answer it cost both proxies measurable CPU in the peer bench.
pub fn add_headers(headers: &mut HeaderMap, ratelimit: Option<HeaderValue>) {
    if let Some(v) = ratelimit {
        headers.insert(RATELIMIT.clone(), v);
    }
}

/// 503 limit-store-unavailable, for a route that fails closed.
pub fn store_unavailable() -> Response<Body> {
    let mut r = problem(
        503,
        "limit_store_unavailable",
        "the shared limit store cannot be reached; this route fails closed",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// 429 quota-exceeded for a refusal by `denial`.
pub fn quota_exceeded(
    plan: &Plan,
    policy: &Option<HeaderValue>,
    denial: &Denial,
) -> Response<Body> {
    let name = plan
        .quotas
        .get(denial.quota)
        .map_or("quota", |q| q.name.as_str());
    let detail = format!(
        "the caller's {name} limit is used up; retry after {} s",
        denial.retry_after_s
    );
    let mut r = problem(429, "quota_exceeded", &detail);
    let h = r.headers_mut();
    if let Some(p) = policy {
        h.insert(RATELIMIT_POLICY.clone(), p.clone());
    }
    if let Some(v) = quota_value(plan, denial.quota, 0, denial.retry_after_s) {
        h.insert(RATELIMIT.clone(), v);
    }
    h.insert(header::RETRY_AFTER, HeaderValue::from(denial.retry_after_s));
    r
}

/// 429 abnormal-usage-detected: the caller's usage looks like model extraction.
pub fn abnormal_usage() -> Response<Body> {
    problem(
        429,
        "abnormal_usage_detected",
        "this caller's queries look like an attempt to copy the model; further requests are refused",
    )
}

/// A problem answer with a status, a fixed reason and a detail.
pub fn problem(status: u16, reason: &str, detail: &str) -> Response<Body> {
    warden_identity::http::problem(status, reason, detail).map(Body::Full)
}

/// The warning header on answers to a caller at the warn step or above.
pub static USAGE_WARNING: HeaderName = HeaderName::from_static("warden-usage-warning");

#[cfg(test)]
mod tests {
    use super::*;
    use warden_config::model::{LimitSet, Limits};

    #[test]
    fn refusals_carry_the_draft_headers_and_a_problem_body() {
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
        assert_eq!(r.headers()["retry-after"], "17");
        assert_eq!(
            r.headers()["ratelimit"],
            "\"identity-tokens-per-minute\";r=0;t=17"
        );
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
}
