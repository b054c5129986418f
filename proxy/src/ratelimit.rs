//! Request-rate limits per caller identity, on an inbound listener's
//! allowed requests: the `rate_limits:` of its policy, in the shape of
//! Linkerd's HTTPLocalRateLimitPolicy (a total over every caller, a rate per
//! caller identity, overrides for named callers).
//!
//! The first limit that applies to a request (its rule, methods and paths
//! match, and it has a rate for the caller) is charged: the caller's rate
//! (its override's, else the identity one) and the total, in one atomic
//! GCRA step on the same store as the model limits, so a refused request
//! charges nothing. Keyed on the verified SPIFFE ID and the normalized path
//! only: nothing the client spells can move it to another bucket.
//!
//! Answers (made by the inbound path from [`Limited`]): 429 with
//! `RateLimit-Policy`, `RateLimit` and `Retry-After`, as the model routes
//! answer; or, when the shared store cannot be reached and the limit fails
//! closed (the default), 503 with `Retry-After: 1`.

use std::sync::Arc;

use http::{HeaderName, HeaderValue, header};

use warden_config::SpiffeId;
use warden_config::model::OnStoreError;
use warden_config::pattern::{IdentityPattern, PathMatch, method_covers};
use warden_config::proxy::{Policy, Rate, RateLimit, Rule};
use warden_identity::ratelog::LogLimiter;
use warden_identity::tls::VerifiedPeer;

use crate::authz::{self, Request};
use warden_guard::answer;
use warden_guard::limits::{
    Ask, Denial, Headroom, Hold, Kind, Level, Plan, Quota, Store, StoreError, Subjects,
};

static LOG: LogLimiter = LogLimiter::new(20);

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers).
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The quotas charged for one kind of caller of one limit, with the header
/// naming them (built once).
#[derive(Debug)]
struct Tier {
    /// The limit's name in the config.
    limit: Arc<str>,
    /// The limit's position in the policy's `rate_limits`.
    index: usize,
    /// The caller's quota (level identity), then the total (level trust
    /// domain: every caller of a listener is in the proxy's trust domain).
    plan: Plan,
    /// `RateLimit-Policy` for this plan.
    policy: HeaderValue,
}

#[derive(Debug)]
struct Limit {
    rule: Option<Rule>,
    methods: Vec<String>,
    paths: Vec<PathMatch>,
    /// For callers no override names; None: they are not limited by it.
    default: Option<Arc<Tier>>,
    overrides: Vec<(Vec<IdentityPattern>, Arc<Tier>)>,
    on_store_error: OnStoreError,
}

/// A listener's rate limits, compiled from its policy once (and again when
/// a reload changes the policy; state keys depend only on names, so the
/// buckets carry over).
pub struct RateLimits {
    limits: Vec<Limit>,
    store: Arc<Store>,
}

fn quota(name: String, level: Level, r: Rate) -> Quota {
    Quota {
        name,
        level,
        kind: Kind::Rate {
            interval_us: ((1e6 / r.requests_per_second).round() as u64).max(1),
            burst: r.burst.max(1),
        },
    }
}

impl Limit {
    fn new(listener: &str, index: usize, cfg: &RateLimit, rules: &[Rule]) -> Self {
        let name: Arc<str> = cfg.name.as_str().into();
        let route = format!("ratelimit/{listener}/{}", cfg.name);
        let total = cfg
            .total
            .map(|r| quota(format!("{}-total", cfg.name), Level::TrustDomain, r));
        let tier = |caller: Option<Quota>| {
            let quotas: Vec<Quota> = caller.into_iter().chain(total.clone()).collect();
            if quotas.is_empty() {
                return None;
            }
            let plan = Plan {
                route: route.clone(),
                quotas,
            };
            // Quota names are letters, digits, '-' and '_': always a valid value.
            let policy =
                answer::policy_header(&plan).unwrap_or_else(|| HeaderValue::from_static(""));
            Some(Arc::new(Tier {
                limit: name.clone(),
                index,
                plan,
                policy,
            }))
        };
        let default = tier(
            cfg.identity
                .map(|r| quota(format!("{}-identity", cfg.name), Level::Identity, r)),
        );
        let overrides = cfg
            .overrides
            .iter()
            .enumerate()
            .filter_map(|(i, o)| {
                let q = quota(
                    format!("{}-override-{}", cfg.name, i + 1),
                    Level::Identity,
                    o.rate,
                );
                Some((o.from.clone(), tier(Some(q))?))
            })
            .collect();
        Self {
            // A validated config names an allow rule; were it missing, the
            // limit would apply to more requests, not fewer.
            rule: cfg.rule.and_then(|i| rules.get(i).cloned()),
            methods: cfg.methods.clone(),
            paths: cfg.paths.clone(),
            default,
            overrides,
            on_store_error: cfg.on_store_error,
        }
    }

    /// The tier charged for this request, if the limit applies to it.
    /// Paths are read widely (any ASCII case, a trailing `/`): choosing a
    /// limit is a match that refuses, so a respelled path must not escape it.
    fn tier(&self, id: &SpiffeId, port: u16, method: &str, path: &str) -> Option<&Arc<Tier>> {
        let selected =
            self.methods.is_empty() || self.methods.iter().any(|m| method_covers(m, method));
        let selected = selected
            && (self.paths.is_empty() || self.paths.iter().any(|p| p.matches_widely(path)))
            && self.rule.as_ref().is_none_or(|r| {
                let req = Request {
                    method: Some(method),
                    path: Some(path),
                };
                authz::matches(r, id, Some(port), req)
            });
        if !selected {
            return None;
        }
        self.overrides
            .iter()
            .find(|(from, _)| from.iter().any(|p| p.matches(id)))
            .map(|(_, t)| t)
            .or(self.default.as_ref())
    }
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl RateLimits {
    /// Compiles the rate limits of `policy` for listener `listener`, keeping
    /// their state in `store`.
    pub fn new(listener: &str, policy: &Policy, store: Arc<Store>) -> Self {
        let limits = policy
            .rate_limits
            .iter()
            .enumerate()
            .map(|(i, l)| Limit::new(listener, i, l, &policy.rules))
            .collect();
        Self { limits, store }
    }

    /// True when the policy has no rate limit (the stage can be left out).
    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// Charges the request (`method` and normalized `path`, from `peer`,
    /// on a connection accepted on `local_port`) against the first limit
    /// that applies. `Ok(None)`: no limit applies; `Ok(Some(info))`:
    /// admitted, with what remains; `Err`: refused.
    pub async fn check(
        &self,
        peer: &VerifiedPeer,
        local_port: u16,
        method: &str,
        path: &str,
    ) -> Result<Option<RateLimitInfo>, Limited> {
        self.check_id(peer.id(), local_port, method, path).await
    }

    async fn check_id(
        &self,
        id: &SpiffeId,
        port: u16,
        method: &str,
        path: &str,
    ) -> Result<Option<RateLimitInfo>, Limited> {
        let Some((limit, tier)) = self.select(id, port, method, path) else {
            return Ok(None);
        };
        let admitted = self
            .store
            .admit(&tier.plan, &Subjects::of(id), &Ask::default())
            .await;
        outcome(limit, tier, id, admitted).map(Some)
    }

    fn select(
        &self,
        id: &SpiffeId,
        port: u16,
        method: &str,
        path: &str,
    ) -> Option<(&Limit, &Arc<Tier>)> {
        self.limits
            .iter()
            .find_map(|l| l.tier(id, port, method, path).map(|t| (l, t)))
    }
}

/// The store's answer as the stage's answer.
fn outcome(
    limit: &Limit,
    tier: &Arc<Tier>,
    id: &SpiffeId,
    admitted: Result<Result<Hold, Denial>, StoreError>,
) -> Result<RateLimitInfo, Limited> {
    match admitted {
        Ok(Ok(hold)) => Ok(RateLimitInfo {
            tier: tier.clone(),
            headroom: hold.headroom,
            failed_open: false,
        }),
        Ok(Err(denial)) => Err(Limited::Exceeded(Exceeded {
            tier: tier.clone(),
            denial,
        })),
        Err(e) => {
            let open = limit.on_store_error == OnStoreError::Open;
            if LOG.allow() {
                let outcome = if open { "open" } else { "closed" };
                tracing::error!(limit = %tier.limit, peer = %id, error = %e, outcome, "rate limit store unavailable");
            }
            if open {
                Ok(RateLimitInfo {
                    tier: tier.clone(),
                    headroom: None,
                    failed_open: true,
                })
            } else {
                Err(Limited::StoreUnavailable(StoreUnavailable {
                    tier: tier.clone(),
                }))
            }
        }
    }
}

/// An admitted request: the limit that applied and what remains of it.
#[derive(Debug, Clone)]
pub struct RateLimitInfo {
    tier: Arc<Tier>,
    headroom: Option<Headroom>,
    failed_open: bool,
}

impl RateLimitInfo {
    /// The limit's name in the config.
    pub fn limit(&self) -> &str {
        &self.tier.limit
    }

    /// The limit's position in the policy's `rate_limits` (to index handles
    /// made once, such as metric counters).
    pub fn index(&self) -> usize {
        self.tier.index
    }

    /// True when the store could not be reached and the limit fails open:
    /// the request was let through unlimited.
    pub fn failed_open(&self) -> bool {
        self.failed_open
    }

    /// `RateLimit` for the answer: what remains of the tightest quota, as
    /// on model routes (rendered only when asked for).
    pub fn header(&self) -> Option<(HeaderName, HeaderValue)> {
        let v = answer::ratelimit_value(&self.tier.plan, self.headroom?)?;
        Some((RATELIMIT.clone(), v))
    }
}

/// A refused request.
#[derive(Debug, Clone)]
pub enum Limited {
    /// Over a quota: 429.
    Exceeded(Exceeded),
    /// The store is unreachable and the limit fails closed: 503.
    StoreUnavailable(StoreUnavailable),
}

impl Limited {
    /// The answer's status.
    pub fn status(&self) -> u16 {
        match self {
            Self::Exceeded(_) => 429,
            Self::StoreUnavailable(_) => 503,
        }
    }

    /// The problem type and metric reason: the ones model routes use.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Exceeded(_) => "quota_exceeded",
            Self::StoreUnavailable(_) => "limit_store_unavailable",
        }
    }

    /// The refusing limit's name in the config.
    pub fn limit(&self) -> &str {
        match self {
            Self::Exceeded(e) => &e.tier.limit,
            Self::StoreUnavailable(s) => &s.tier.limit,
        }
    }

    /// The refusing limit's position in the policy's `rate_limits`.
    pub fn index(&self) -> usize {
        match self {
            Self::Exceeded(e) => e.tier.index,
            Self::StoreUnavailable(s) => s.tier.index,
        }
    }

    /// The problem's detail.
    pub fn detail(&self) -> String {
        match self {
            Self::Exceeded(e) => e.detail(),
            Self::StoreUnavailable(_) => {
                "the shared limit store cannot be reached; this rate limit fails closed".into()
            }
        }
    }

    /// The answer's headers besides the problem's own.
    pub fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        match self {
            Self::Exceeded(e) => e.headers().into(),
            Self::StoreUnavailable(_) => {
                vec![(header::RETRY_AFTER, HeaderValue::from_static("1"))]
            }
        }
    }
}

/// Over a quota: the quota, and when the same request would be admitted.
#[derive(Debug, Clone)]
pub struct Exceeded {
    tier: Arc<Tier>,
    denial: Denial,
}

impl Exceeded {
    /// The quota that refused, as named in `RateLimit-Policy` (e.g. `api-identity`).
    pub fn quota(&self) -> &str {
        self.tier
            .plan
            .quotas
            .get(self.denial.quota)
            .map_or("", |q| q.name.as_str())
    }

    /// Seconds until the same request would be admitted.
    pub fn retry_after_s(&self) -> u64 {
        self.denial.retry_after_s
    }

    /// The problem's detail.
    pub fn detail(&self) -> String {
        format!(
            "the caller's {} rate limit is used up; retry after {} s",
            self.quota(),
            self.denial.retry_after_s
        )
    }

    /// `RateLimit-Policy`, `RateLimit` and `Retry-After`, in the format of
    /// the model routes' 429.
    pub fn headers(&self) -> [(HeaderName, HeaderValue); 3] {
        let room = Headroom {
            quota: self.denial.quota,
            remaining: 0,
            reset_s: self.denial.retry_after_s,
        };
        // The quota index comes from this plan: always Some.
        let ratelimit = answer::ratelimit_value(&self.tier.plan, room)
            .unwrap_or_else(|| HeaderValue::from_static(""));
        [
            (RATELIMIT_POLICY.clone(), self.tier.policy.clone()),
            (RATELIMIT.clone(), ratelimit),
            (
                header::RETRY_AFTER,
                HeaderValue::from(self.denial.retry_after_s),
            ),
        ]
    }
}

/// The store could not be reached and the limit fails closed.
#[derive(Debug, Clone)]
pub struct StoreUnavailable {
    tier: Arc<Tier>,
}

#[cfg(test)]
mod tests;
