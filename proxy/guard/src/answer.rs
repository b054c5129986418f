//! What the guard makes of the app's answer on a model route: its body
//! ([`AnswerBody`]: passed through, metered as it streams, or read and
//! limited) and the rate-limit headers on it
//! (draft-ietf-httpapi-ratelimit-headers): `RateLimit`, what remains of the
//! tightest quota. Refusals, and the headers they carry, are in
//! `refusal.rs`.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::limits::{Headroom, Kind, Plan};
use super::meter::Metered;

pub(crate) static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub(crate) static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The body of an answer the guard delivers, over the app's body type `B`.
pub enum AnswerBody<B> {
    /// The app's body, passed through (nothing in it to count).
    Upstream(B),
    /// An event stream, counted against its reservation as it passes.
    Metered(Box<Metered<B>>),
    /// A JSON answer read whole, counted, and perhaps limited.
    Full(Bytes),
}

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

pub(crate) fn quota_value(
    plan: &Plan,
    quota: usize,
    remaining: u64,
    reset_s: u64,
) -> Option<HeaderValue> {
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

/// The warning header on answers to a caller at the warn step or above.
pub static USAGE_WARNING: HeaderName = HeaderName::from_static("warden-usage-warning");
