//! Admission and accounting for a model route: every limit of every level
//! (caller, namespace, trust domain) is checked and charged in one atomic
//! step, so concurrent requests can never overshoot a budget.
//!
//! - Request rates: GCRA (a burst, then a steady rate).
//! - Long quotas (tokens per minute or day, logprob tokens, logit_bias
//!   entries, vectors): a sliding window, estimated from two fixed windows.
//!   Tokens are reserved at admission from the most the request can use
//!   and settled from what the answer says it used; the rest is refunded.
//! - Concurrent requests: a slot per request until its answer has been sent.
//!
//! State lives in-process ([`local`], one store per route, sharded) or in
//! Redis ([`redis`]) with the same semantics, so several proxies can share
//! every limit.

pub mod local;
pub mod redis;

use std::sync::Arc;

use warden_config::SpiffeId;
use warden_config::model::{LimitSet, Limits};

/// Where a limit applies in the identity hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// The caller's SPIFFE ID.
    Identity,
    /// Its namespace.
    Namespace,
    /// Its trust domain.
    TrustDomain,
}

impl Level {
    /// Label for metrics and policy names.
    pub fn label(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::Namespace => "namespace",
            Self::TrustDomain => "trust_domain",
        }
    }
}

/// Units that long quotas count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Prompt plus completion tokens.
    Tokens,
    /// Generated tokens returned with logprobs.
    LogprobTokens,
    /// `logit_bias` entries sent.
    LogitBias,
    /// Embedding vectors returned or feature vectors submitted.
    Vectors,
}

/// How one limit counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// GCRA: one request per `interval_us`, `burst` at once.
    Rate {
        /// Microseconds between requests at the sustained rate.
        interval_us: u64,
        /// Requests allowed at once.
        burst: u32,
    },
    /// Sliding window over `window_ms`, at most `limit` units.
    Window {
        /// What is counted.
        unit: Unit,
        /// Window length.
        window_ms: u64,
        /// Most units per window.
        limit: u64,
    },
    /// At most `limit` requests in progress.
    Concurrent {
        /// Most requests at once.
        limit: u32,
    },
}

/// One limit of a route, compiled from config.
#[derive(Debug, Clone, PartialEq)]
pub struct Quota {
    /// The policy's name in `RateLimit-Policy` and metrics, e.g. `identity-tokens-per-minute`.
    pub name: String,
    /// Who it applies to.
    pub level: Level,
    /// How it counts.
    pub kind: Kind,
}

impl Quota {
    /// The quota in `RateLimit-Policy` terms: (quota, window seconds).
    pub fn quota_and_window(&self) -> (u64, u64) {
        match self.kind {
            Kind::Rate { interval_us, burst } => (
                u64::from(burst),
                interval_us
                    .saturating_mul(u64::from(burst))
                    .div_ceil(1_000_000)
                    .max(1),
            ),
            Kind::Window {
                window_ms, limit, ..
            } => (limit, window_ms / 1000),
            Kind::Concurrent { limit } => (u64::from(limit), 0),
        }
    }
}

/// Every limit of one route, in a fixed order (levels, then kinds).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// The route's name (part of every state key).
    pub route: String,
    /// The limits.
    pub quotas: Vec<Quota>,
}

const MINUTE_MS: u64 = 60_000;
const DAY_MS: u64 = 86_400_000;

impl Plan {
    /// Compiles a route's configured limits.
    pub fn new(route: &str, limits: &Limits) -> Self {
        let mut quotas = Vec::new();
        for (level, set) in [
            (Level::Identity, &limits.identity),
            (Level::Namespace, &limits.namespace),
            (Level::TrustDomain, &limits.trust_domain),
        ] {
            add_level(&mut quotas, level, set);
        }
        Self {
            route: route.to_owned(),
            quotas,
        }
    }

    /// True when the route sets no limit at all.
    pub fn is_empty(&self) -> bool {
        self.quotas.is_empty()
    }

    /// Splits into the gate (request rates and concurrency: checked before a
    /// body is read) and the budget (windows: charged from what the body asks).
    pub fn split(self) -> (Plan, Plan) {
        let (budget, gate) = self
            .quotas
            .into_iter()
            .partition(|q| matches!(q.kind, Kind::Window { .. }));
        (
            Plan {
                route: self.route.clone(),
                quotas: gate,
            },
            Plan {
                route: self.route,
                quotas: budget,
            },
        )
    }

    /// A window quota that `ask` exceeds on its own (it could never be admitted).
    pub fn larger_than_a_quota(&self, ask: &Ask) -> Option<&Quota> {
        self.quotas.iter().find(|q| match q.kind {
            Kind::Window { unit, limit, .. } => ask.get(unit) > limit,
            _ => false,
        })
    }
}

fn add_level(out: &mut Vec<Quota>, level: Level, set: &LimitSet) {
    let mut push = |what: &str, kind: Kind| {
        out.push(Quota {
            name: format!("{}-{what}", level.label().replace('_', "-")),
            level,
            kind,
        })
    };
    if let Some(rps) = set.requests_per_second {
        push(
            "requests",
            Kind::Rate {
                interval_us: ((1e6 / rps).round() as u64).max(1),
                burst: set.burst.max(1),
            },
        );
    }
    let windows = [
        (
            "tokens-per-minute",
            Unit::Tokens,
            MINUTE_MS,
            set.tokens_per_minute,
        ),
        ("tokens-per-day", Unit::Tokens, DAY_MS, set.tokens_per_day),
        (
            "logprob-tokens-per-day",
            Unit::LogprobTokens,
            DAY_MS,
            set.logprob_tokens_per_day,
        ),
        (
            "logit-bias-per-day",
            Unit::LogitBias,
            DAY_MS,
            set.logit_bias_per_day,
        ),
        (
            "vectors-per-day",
            Unit::Vectors,
            DAY_MS,
            set.vectors_per_day,
        ),
    ];
    for (what, unit, window_ms, limit) in windows {
        if let Some(limit) = limit {
            push(
                what,
                Kind::Window {
                    unit,
                    window_ms,
                    limit,
                },
            );
        }
    }
    if let Some(limit) = set.concurrent {
        push("concurrent", Kind::Concurrent { limit });
    }
}

/// The state keys of one caller, one per level. A level the ID has no
/// place in (a one-segment path has no namespace) is `None`. Every level's
/// key is a prefix of the ID, so one copy of it serves all three.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    id: String,
    namespace_len: Option<usize>,
    trust_domain_len: usize,
}

impl Subjects {
    /// The caller, its namespace and its trust domain.
    ///
    /// Namespace: `spiffe://td/ns/<ns>` for Kubernetes-style IDs
    /// (`/ns/<ns>/sa/<sa>`), otherwise the ID without its last segment.
    pub fn of(id: &SpiffeId) -> Self {
        let s = id.as_str();
        let path = id.path();
        let trust_domain_len = s.len() - path.len();
        let namespace_len = match path.strip_prefix("/ns/").and_then(|r| r.split('/').next()) {
            Some(ns) if !ns.is_empty() => Some(trust_domain_len + "/ns/".len() + ns.len()),
            _ => path
                .rsplit_once('/')
                .filter(|(parent, _)| !parent.is_empty())
                .map(|(parent, _)| trust_domain_len + parent.len()),
        };
        Self {
            id: s.to_owned(),
            namespace_len,
            trust_domain_len,
        }
    }

    /// The key for `level`.
    pub fn get(&self, level: Level) -> Option<&str> {
        match level {
            Level::Identity => Some(&self.id),
            Level::Namespace => self.namespace_len.and_then(|n| self.id.get(..n)),
            Level::TrustDomain => self.id.get(..self.trust_domain_len),
        }
    }
}

/// What a request asks for, in each unit (requests and concurrency count one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ask {
    /// Tokens (prompt upper bound plus most completion tokens).
    pub tokens: u64,
    /// Generated tokens that may come back with logprobs.
    pub logprob_tokens: u64,
    /// `logit_bias` entries.
    pub logit_bias: u64,
    /// Vectors.
    pub vectors: u64,
}

impl Ask {
    /// The amount of `unit`.
    pub fn get(&self, unit: Unit) -> u64 {
        match unit {
            Unit::Tokens => self.tokens,
            Unit::LogprobTokens => self.logprob_tokens,
            Unit::LogitBias => self.logit_bias,
            Unit::Vectors => self.vectors,
        }
    }
}

/// The limit that refused a request, and when to try again.
#[derive(Debug, Clone, PartialEq)]
pub struct Denial {
    /// Index of the quota in the plan.
    pub quota: usize,
    /// Seconds until the same request could be admitted (rounded up); for
    /// an ask larger than the whole quota, the window length.
    pub retry_after_s: u64,
}

/// What remains of the tightest limit after an admission, for the
/// `RateLimit` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headroom {
    /// Index of the quota in the plan.
    pub quota: usize,
    /// Units remaining.
    pub remaining: u64,
    /// Seconds until the quota is whole again.
    pub reset_s: u64,
}

/// One reserved amount in one window, to settle later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Index of the quota in the plan.
    pub quota: usize,
    /// The state key it was charged under.
    pub key: String,
    /// Which fixed window it was charged to.
    pub window: u64,
    /// How much.
    pub amount: u64,
}

/// An admitted request's hold on its limits: reservations to settle and
/// concurrency slots to release.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hold {
    /// Reserved amounts.
    pub reservations: Vec<Reservation>,
    /// Concurrency slots: (quota, key, slot id).
    pub slots: Vec<(usize, String, u64)>,
    /// What remains of the tightest limit.
    pub headroom: Option<Headroom>,
}

/// The shared state could not be reached or answered nonsense.
#[derive(Debug, thiserror::Error)]
#[error("limit store: {0}")]
pub struct StoreError(pub String);

/// The key of one quota's state for one subject: `route|quota|subject`.
fn state_key(route: &str, quota: &str, subject: &str) -> String {
    let mut k = String::with_capacity(route.len() + quota.len() + subject.len() + 2);
    write_state_key(&mut k, route, quota, subject);
    k
}

/// Writes the state key into `buf` (reused across lookups: no allocation
/// per quota on the request path).
fn write_state_key(buf: &mut String, route: &str, quota: &str, subject: &str) {
    buf.clear();
    buf.push_str(route);
    buf.push('|');
    buf.push_str(quota);
    buf.push('|');
    buf.push_str(subject);
}

/// Where limit state lives.
pub enum Store {
    /// In this process.
    Local(local::LocalStore),
    /// In Redis, shared with every proxy that uses the same server.
    Redis(self::redis::RedisStore),
}

impl Store {
    /// A store for one route's own use: in-process state shares no lock
    /// and no bound with any other route's; with Redis the state is the
    /// server's (keys carry the route's name) and the connection is shared.
    pub fn for_route(&self) -> Store {
        match self {
            Self::Local(s) => Self::Local(local::LocalStore::new(s.capacity())),
            Self::Redis(s) => Self::Redis(s.clone()),
        }
    }

    /// Admits `ask` against every quota of `plan` for `who`, atomically:
    /// either everything is charged and a hold returned, or nothing is.
    pub async fn admit(
        &self,
        plan: &Plan,
        who: &Subjects,
        ask: &Ask,
    ) -> Result<Result<Hold, Denial>, StoreError> {
        match self {
            Self::Local(s) => Ok(s.admit(plan, who, ask, now_us())),
            Self::Redis(s) => s.admit(plan, who, ask).await,
        }
    }

    /// Settles a hold: each reservation becomes what `used` says (a refund
    /// when less, a charge when more), and its slots are released.
    pub async fn settle(&self, plan: &Plan, hold: &Hold, used: &Ask) -> Result<(), StoreError> {
        match self {
            Self::Local(s) => {
                s.settle(plan, hold, used, now_us());
                Ok(())
            }
            Self::Redis(s) => s.settle(plan, hold, used).await,
        }
    }
}

/// Microseconds since the Unix epoch (windows align to wall-clock time so
/// that replicas agree).
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A store handed to the routes of a proxy (each takes its own with
/// [`Store::for_route`]).
pub type SharedStore = Arc<Store>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_the_identity_hierarchy() {
        let id = SpiffeId::parse("spiffe://example.org/ns/ml/sa/trainer").unwrap();
        let s = Subjects::of(&id);
        assert_eq!(
            s.get(Level::Identity),
            Some("spiffe://example.org/ns/ml/sa/trainer")
        );
        assert_eq!(s.get(Level::Namespace), Some("spiffe://example.org/ns/ml"));
        assert_eq!(s.get(Level::TrustDomain), Some("spiffe://example.org"));
        let id = SpiffeId::parse("spiffe://example.org/team/a/web").unwrap();
        assert_eq!(
            Subjects::of(&id).get(Level::Namespace),
            Some("spiffe://example.org/team/a")
        );
        let id = SpiffeId::parse("spiffe://example.org/web").unwrap();
        assert_eq!(Subjects::of(&id).get(Level::Namespace), None);
    }

    #[test]
    fn plans_name_each_limit_by_level_and_unit() {
        let limits = Limits {
            identity: LimitSet {
                requests_per_second: Some(2.0),
                burst: 4,
                tokens_per_minute: Some(1000),
                concurrent: Some(3),
                ..LimitSet::default()
            },
            trust_domain: LimitSet {
                tokens_per_day: Some(10),
                ..LimitSet::default()
            },
            ..Limits::default()
        };
        let plan = Plan::new("chat", &limits);
        let names: Vec<_> = plan.quotas.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "identity-requests",
                "identity-tokens-per-minute",
                "identity-concurrent",
                "trust-domain-tokens-per-day"
            ]
        );
        assert_eq!(plan.quotas[0].quota_and_window(), (4, 2));
    }
}
