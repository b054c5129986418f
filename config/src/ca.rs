//! The CA's config file (`<ca-dir>/ca.yaml`), written by `warden ca init` and
//! read by every other `warden ca` command.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::diagnostic::{Collector, Diagnostics, load_yaml, parse_yaml};
use crate::duration::HumanDuration;
use crate::kubernetes::{KubernetesConfig, RawKubernetes};
use crate::pattern::IdentityPattern;
use crate::spiffe::TrustDomain;

/// Leaf lifetime when a request does not ask for one (DESIGN.md: 1 h).
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(3600);
/// The longest leaf lifetime a CA signs unless configured otherwise.
pub const DEFAULT_MAX_LEAF_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long a join token stays usable unless the issuer says otherwise.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);
/// Shortest leaf lifetime worth issuing: renewal at half-life needs room.
pub const MIN_LEAF_TTL: Duration = Duration::from_secs(60);
/// Longest leaf lifetime that still counts as short-lived.
pub const MAX_LEAF_TTL_CEILING: Duration = Duration::from_secs(30 * 24 * 3600);
/// Path of the CA server's own SPIFFE ID (`spiffe://<td>/warden/ca`): reserved
/// for the CA, never issued to a workload, never a deny reporter.
pub const SERVER_ID_PATH: &str = "/warden/ca";

/// Validated CA settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaConfig {
    /// The trust domain this CA issues identities in.
    pub trust_domain: TrustDomain,
    /// Leaf lifetime when the request names none.
    pub default_ttl: Duration,
    /// Longest leaf lifetime this CA signs; longer requests are capped.
    pub max_ttl: Duration,
    /// Default join-token lifetime.
    pub token_ttl: Duration,
    /// Workloads that may ask the CA, over mTLS, to deny another identity
    /// (`POST /v1/deny`). Empty: nobody may.
    pub deny_reporters: Vec<IdentityPattern>,
    /// Attestation of pods by their projected ServiceAccount token; `None`:
    /// only join tokens bootstrap an identity.
    pub kubernetes: Option<KubernetesConfig>,
    /// Lifetime of each intermediate that rotation makes; `None`: as long
    /// as the one it replaces lived.
    pub intermediate_ttl: Option<Duration>,
    /// Shortest time a new root or intermediate is known to proxies (in the
    /// trust feed) before it signs anything.
    pub rotation_overlap: Duration,
    /// A shared PostgreSQL store (`postgres://...`) for replicas; `None`:
    /// the embedded SQLite store in the state directory.
    pub store: Option<String>,
    /// Per-caller limits on certify requests.
    pub rate_limits: IssuanceLimits,
}

/// Certify requests each caller may make per minute (0: no limit); more
/// are answered 429 with `Retry-After`. Each CA replica counts its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IssuanceLimits {
    /// From one source address (a whole node's pods, behind SNAT, share one).
    pub per_source: u32,
    /// With one join token (it works once; this bounds retries of bad CSRs).
    pub per_token: u32,
    /// Renewals of one SPIFFE ID over mTLS (one per half-life is normal).
    pub per_identity: u32,
}

impl Default for IssuanceLimits {
    fn default() -> Self {
        // Off per source by default: one address may be a whole node's
        // pods behind SNAT, or a load test; set it for gateways.
        Self {
            per_source: 0,
            per_token: 60,
            per_identity: 60,
        }
    }
}

/// Default [`CaConfig::rotation_overlap`].
pub const DEFAULT_ROTATION_OVERLAP: Duration = Duration::from_secs(3600);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCaConfig {
    trust_domain: TrustDomain,
    default_ttl: Option<Spanned<HumanDuration>>,
    max_ttl: Option<Spanned<HumanDuration>>,
    token_ttl: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    deny_reporters: Vec<Spanned<IdentityPattern>>,
    kubernetes: Option<RawKubernetes>,
    intermediate_ttl: Option<Spanned<HumanDuration>>,
    rotation_overlap: Option<Spanned<HumanDuration>>,
    store: Option<Spanned<String>>,
    #[serde(default)]
    rate_limits: IssuanceLimits,
}

impl CaConfig {
    /// Loads and validates a CA config file.
    pub fn load(path: &Path) -> Result<Self, Diagnostics> {
        Self::validate(path, load_yaml(path)?)
    }

    /// Parses and validates CA config text (`path` is used in messages only).
    pub fn parse(path: &Path, text: &str) -> Result<Self, Diagnostics> {
        Self::validate(path, parse_yaml(path, text)?)
    }

    fn validate(path: &Path, raw: RawCaConfig) -> Result<Self, Diagnostics> {
        let mut errors = Collector::new(path);
        let value = |d: &Option<Spanned<HumanDuration>>, default| {
            d.as_ref().map(|s| s.value.0).unwrap_or(default)
        };
        let default_ttl = value(&raw.default_ttl, DEFAULT_LEAF_TTL);
        let max_ttl = value(&raw.max_ttl, DEFAULT_MAX_LEAF_TTL);
        let token_ttl = value(&raw.token_ttl, DEFAULT_TOKEN_TTL);
        for d in [&raw.default_ttl, &raw.max_ttl].into_iter().flatten() {
            if d.value.0 < MIN_LEAF_TTL || d.value.0 > MAX_LEAF_TTL_CEILING {
                errors.at(
                    d,
                    format!(
                        "leaf lifetime {} is outside {} ..= {}",
                        d.value,
                        HumanDuration(MIN_LEAF_TTL),
                        HumanDuration(MAX_LEAF_TTL_CEILING)
                    ),
                );
            }
        }
        if let Some(d) = &raw.default_ttl
            && default_ttl > max_ttl
        {
            errors.at(
                d,
                format!(
                    "default_ttl {} is longer than max_ttl {}",
                    d.value,
                    HumanDuration(max_ttl)
                ),
            );
        }
        if let Some(t) = &raw.token_ttl
            && (t.value.0.is_zero() || t.value.0 > Duration::from_secs(7 * 24 * 3600))
        {
            errors.at(t, "token_ttl must be between 1s and 7d");
        }
        for p in &raw.deny_reporters {
            if !p.value.is_in(&raw.trust_domain) {
                errors.at(
                    p,
                    format!(
                        "deny reporter {} is not in this CA's trust domain {}",
                        p.value, raw.trust_domain
                    ),
                );
            } else if matches!(&p.value, IdentityPattern::TrustDomain(_)) {
                errors.at(
                    p,
                    "deny reporter must not be the whole trust domain: list the proxies that may report",
                );
            } else if matches!(&p.value, IdentityPattern::Exact(id) if id.path() == SERVER_ID_PATH)
            {
                errors.at(
                    p,
                    format!("deny reporter {} is the CA server's own identity", p.value),
                );
            }
        }
        let rotation_overlap = value(&raw.rotation_overlap, DEFAULT_ROTATION_OVERLAP);
        let intermediate_ttl = raw.intermediate_ttl.as_ref().map(|d| d.value.0);
        if let (Some(o), Some(ttl)) = (&raw.rotation_overlap, intermediate_ttl)
            && o.value.0 * 3 > ttl
        {
            errors.at(
                o,
                format!(
                    "rotation_overlap {} is over a third of intermediate_ttl {}: the next intermediate would start signing after five sixths of the current one's life",
                    o.value,
                    HumanDuration(ttl)
                ),
            );
        }
        if let Some(url) = &raw.store
            && !(url.value.starts_with("postgres://") || url.value.starts_with("postgresql://"))
        {
            errors.at(
                url,
                "store must be a postgres:// URL (leave it out for the embedded SQLite store)",
            );
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let kubernetes = raw
            .kubernetes
            .map(|k| k.validate(&raw.trust_domain, base, &mut errors));
        errors.finish(CaConfig {
            kubernetes,
            intermediate_ttl,
            rotation_overlap,
            store: raw.store.map(|s| s.value),
            rate_limits: raw.rate_limits,
            trust_domain: raw.trust_domain,
            default_ttl,
            max_ttl,
            token_ttl,
            deny_reporters: raw.deny_reporters.into_iter().map(|p| p.value).collect(),
        })
    }

    /// The config file text `warden ca init` writes, with every setting explained.
    pub fn initial_text(trust_domain: &TrustDomain) -> String {
        format!(
            "# warden CA settings; every `warden ca` command reads this file.\n\
             trust_domain: {trust_domain}\n\
             # Leaf (X.509-SVID) lifetime when a request names none.\n\
             default_ttl: {}\n\
             # Longest leaf lifetime this CA signs; longer requests are capped to it.\n\
             max_ttl: {}\n\
             # Default lifetime of a join token from `warden ca token`.\n\
             token_ttl: {}\n\
             # Workloads that may ask this CA to deny an identity (POST /v1/deny),\n\
             # as SPIFFE IDs or patterns such as spiffe://{trust_domain}/ns/security/*.\n\
             # Nobody may unless listed.\n\
             deny_reporters: []\n\
             # Intermediates rotate by themselves: the next one is made at half of the\n\
             # current one's life and signs from five sixths on (intermediate_ttl: the\n\
             # life of each new one, default: the current one's). A new root or\n\
             # intermediate is in the trust feed at least rotation_overlap before it signs.\n\
             # intermediate_ttl: 365d\n\
             # rotation_overlap: {}\n\
             # Pods get spiffe://{trust_domain}/ns/<namespace>/sa/<service account> from\n\
             # their projected ServiceAccount token (audience warden); see README.\n\
             # kubernetes:\n\
             #   allow: [spiffe://{trust_domain}/ns/shop/*]   # nobody unless listed\n\
             #   verify: tokenreview                          # or jwks (with issuer:)\n",
            HumanDuration(DEFAULT_LEAF_TTL),
            HumanDuration(DEFAULT_MAX_LEAF_TTL),
            HumanDuration(DEFAULT_TOKEN_TTL),
            HumanDuration(DEFAULT_ROTATION_OVERLAP),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<CaConfig, Diagnostics> {
        CaConfig::parse(Path::new("ca.yaml"), text)
    }

    #[test]
    fn initial_text_parses_to_defaults() {
        let td = TrustDomain::parse("example.org").unwrap();
        let c = parse(&CaConfig::initial_text(&td)).unwrap();
        assert_eq!(c.trust_domain, td);
        assert_eq!(c.default_ttl, DEFAULT_LEAF_TTL);
        assert_eq!(c.max_ttl, DEFAULT_MAX_LEAF_TTL);
        assert_eq!(c.token_ttl, DEFAULT_TOKEN_TTL);
        assert!(c.deny_reporters.is_empty());
    }

    #[test]
    fn deny_reporters_are_patterns_in_this_trust_domain() {
        let c = parse(
            "trust_domain: td\ndeny_reporters:\n  - spiffe://td/ns/sec/sa/guard\n  - spiffe://td/ns/ops/*\n",
        )
        .unwrap();
        assert_eq!(
            c.deny_reporters,
            [
                IdentityPattern::parse("spiffe://td/ns/sec/sa/guard").unwrap(),
                IdentityPattern::parse("spiffe://td/ns/ops/*").unwrap(),
            ]
        );
        assert!(
            parse("trust_domain: td\n")
                .unwrap()
                .deny_reporters
                .is_empty()
        );
    }

    #[test]
    fn deny_reporters_outside_the_trust_domain_or_the_ca_itself_are_located() {
        let e = parse(
            "trust_domain: td\ndeny_reporters:\n  - spiffe://other/ns/a\n  - spiffe://td/warden/ca\n  - spiffe://td.evil/*\n  - spiffe://td/*\n",
        )
        .unwrap_err();
        assert_eq!(e.0.len(), 4, "{e}");
        assert_eq!((e.0[0].line, e.0[0].column), (3, 5), "{e}");
        assert!(
            e.0[0].message.contains("not in this CA's trust domain"),
            "{e}"
        );
        assert_eq!((e.0[1].line, e.0[1].column), (4, 5), "{e}");
        assert!(e.0[1].message.contains("CA server's own identity"), "{e}");
        assert_eq!((e.0[2].line, e.0[2].column), (5, 5), "{e}");
        assert_eq!((e.0[3].line, e.0[3].column), (6, 5), "{e}");
        assert!(e.0[3].message.contains("whole trust domain"), "{e}");
    }

    #[test]
    fn a_malformed_deny_reporter_is_located() {
        let e = parse("trust_domain: td\ndeny_reporters: [spiffe://td/a, spiffe://td/*/b]\n")
            .unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("ca.yaml:2:"), "{s}");
        assert!(s.contains("'*' is only allowed"), "{s}");
        assert_eq!(e.0[0].column, 33, "{e}");
    }

    #[test]
    fn bad_trust_domain_names_line_and_column() {
        let e = parse("default_ttl: 1h\ntrust_domain: Example.org\n").unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("ca.yaml:2:15: "), "{s}");
        assert!(s.contains("trust domain has the character 'E'"), "{s}");
    }

    #[test]
    fn unknown_field_is_an_error() {
        let e = parse("trust_domain: td\nmax_tll: 2h\n").unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("ca.yaml:2:1: "), "{s}");
        assert!(s.contains("max_tll"), "{s}");
    }

    #[test]
    fn all_semantic_errors_are_reported_at_once() {
        let e =
            parse("trust_domain: td\ndefault_ttl: 48h\nmax_ttl: 2h\ntoken_ttl: 30d\n").unwrap_err();
        assert_eq!(e.0.len(), 2, "{e}");
        assert_eq!((e.0[0].line, e.0[0].column), (2, 14), "{e}");
        assert!(e.0[0].message.contains("longer than max_ttl"), "{e}");
        assert_eq!(e.0[1].line, 4, "{e}");
    }

    #[test]
    fn kubernetes_section_defaults_and_located_errors() {
        let c = parse("trust_domain: td\nkubernetes:\n  allow: [spiffe://td/ns/shop/*]\n").unwrap();
        let k = c.kubernetes.unwrap();
        assert_eq!(k.audience, "warden");
        assert_eq!(k.verify, crate::kubernetes::Verify::TokenReview);
        assert!(k.api.token_file.ends_with("serviceaccount/token"));
        assert_eq!(
            k.reviews_per_source,
            crate::kubernetes::DEFAULT_REVIEWS_PER_SOURCE
        );
        assert!(parse("trust_domain: td\n").unwrap().kubernetes.is_none());
        let e = parse("trust_domain: td\nkubernetes:\n  reviews_per_source: 51\n").unwrap_err();
        assert_eq!((e.0[0].line, e.0[0].column), (3, 23), "{e}");
        assert!(e.0[0].message.contains("reviews_per_source"), "{e}");
        let e = parse(
            "trust_domain: td\nkubernetes:\n  verify: jwks\n  allow: [spiffe://other/ns/a/*, spiffe://td/web/*]\n  max_token_lifetime: 30d\n",
        )
        .unwrap_err();
        assert_eq!(e.0.len(), 4, "{e}");
        let at: Vec<(u64, u64)> = e.0.iter().map(|d| (d.line, d.column)).collect();
        assert!(at.contains(&(3, 11)), "jwks without an issuer: {e}");
        assert!(at.contains(&(4, 11)), "another trust domain: {e}");
        assert!(at.contains(&(4, 34)), "not a pod path: {e}");
        assert!(at.contains(&(5, 23)), "lifetime: {e}");
    }

    #[test]
    fn kubernetes_dns_names_are_granted_per_pod_identity_and_located_when_bad() {
        let c = parse(
            "trust_domain: td\nkubernetes:\n  dns_names:\n    - spiffe_id: spiffe://td/ns/warden/sa/webhook\n      names: [webhook.warden.svc, webhook.warden.svc.cluster.local]\n",
        )
        .unwrap();
        let k = c.kubernetes.unwrap();
        let id = |s: &str| crate::SpiffeId::parse(s).unwrap();
        assert_eq!(
            k.dns_names_of(&id("spiffe://td/ns/warden/sa/webhook")),
            ["webhook.warden.svc", "webhook.warden.svc.cluster.local"]
        );
        assert!(k.dns_names_of(&id("spiffe://td/ns/shop/sa/web")).is_empty());
        let e = parse(
            "trust_domain: td\nkubernetes:\n  dns_names:\n    - spiffe_id: spiffe://td/web\n      names: ['*.warden.svc']\n    - {spiffe_id: spiffe://other/ns/a/sa/b, names: []}\n",
        )
        .unwrap_err();
        let at: Vec<(u64, u64)> = e.0.iter().map(|d| (d.line, d.column)).collect();
        assert!(at.contains(&(4, 18)), "not a pod identity: {e}");
        assert!(at.contains(&(5, 15)), "a wildcard: {e}");
        assert!(at.contains(&(6, 19)), "another trust domain, no names: {e}");
        assert_eq!(e.0.len(), 4, "{e}");
    }

    #[test]
    fn bad_duration_is_located() {
        let e = parse("trust_domain: td\nmax_ttl: soon\n").unwrap_err();
        assert_eq!((e.0[0].line, e.0[0].column), (2, 10), "{e}");
        assert!(e.0[0].message.contains("invalid duration"), "{e}");
    }
}
