//! `rate_limits:` in a listener's policy: the file's shape and its checks.
//! See [`crate::policy::RateLimit`] for what a limit means.

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

use crate::diagnostic::Collector;
use crate::model::OnStoreError;
use crate::pattern::{IdentityPattern, PathMatch};
use crate::policy::{
    Action, Listener, Rate, RateLimit, RateOverride, Rule, methods, outside_trust_domain, paths,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRateLimit {
    name: Spanned<String>,
    #[serde(default)]
    rule: Option<Spanned<String>>,
    #[serde(default)]
    methods: Vec<Spanned<String>>,
    #[serde(default)]
    paths: Vec<Spanned<String>>,
    #[serde(default)]
    total: Option<Spanned<RawRate>>,
    #[serde(default)]
    identity: Option<Spanned<RawRate>>,
    #[serde(default)]
    overrides: Vec<Spanned<RawOverride>>,
    #[serde(default)]
    on_redis_error: OnStoreError,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    requests_per_second: f64,
    #[serde(default)]
    burst: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOverride {
    from: Vec<Spanned<IdentityPattern>>,
    requests_per_second: f64,
    #[serde(default)]
    burst: Option<u32>,
}

/// Most requests per second a limit may name (as for model routes).
const MAX_RPS: f64 = 1e6;

fn rate(rps: f64, burst: Option<u32>, at: Location, errors: &mut Collector<'_>) -> Option<Rate> {
    if !(rps.is_finite() && rps > 0.0 && rps <= MAX_RPS) {
        errors.at_location(
            at,
            "requests_per_second must be above 0 and at most 1000000",
        );
        return None;
    }
    if burst == Some(0) {
        errors.at_location(at, "burst must be at least 1");
        return None;
    }
    Some(Rate {
        requests_per_second: rps,
        burst: burst.unwrap_or(rps.ceil().clamp(1.0, MAX_RPS) as u32),
    })
}

/// Checks a listener's rate limits against its (already checked) rules.
pub(crate) fn validate_rate_limits(
    raw: Vec<Spanned<RawRateLimit>>,
    rules: &[(Rule, Location)],
    on: &Listener<'_>,
    errors: &mut Collector<'_>,
) -> Vec<RateLimit> {
    let mut names = std::collections::HashSet::new();
    let mut out: Vec<(RateLimit, Location)> = Vec::new();
    for l in raw {
        let at = l.referenced;
        let l = l.value;
        let n = &l.name.value;
        if n.is_empty()
            || n.len() > 64
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            errors.at(
                &l.name,
                "rate limit name must be 1-64 letters, digits, '-' or '_'",
            );
        } else if !names.insert(n.clone()) {
            errors.at(&l.name, format!("rate limit name {n:?} is used twice"));
        }
        if on.tcp {
            errors.at_location(at, "rate_limits only apply to protocol: http");
        }
        if l.total.is_none() && l.identity.is_none() && l.overrides.is_empty() {
            errors.at_location(
                at,
                "a rate limit needs `total`, `identity` or `overrides` (leave it out for no limit)",
            );
        }
        let rule = l.rule.as_ref().and_then(|r| {
            match rules.iter().position(|(rule, _)| rule.name == r.value) {
                Some(i) if rules[i].0.action == Action::Allow => Some(i),
                Some(_) => {
                    errors.at(
                        r,
                        format!(
                            "rule {:?} is a deny rule: only allowed requests are rate limited",
                            r.value
                        ),
                    );
                    None
                }
                None => {
                    errors.at(r, format!("no rule is named {:?}", r.value));
                    None
                }
            }
        });
        let total = l.total.as_ref().and_then(|t| {
            rate(
                t.value.requests_per_second,
                t.value.burst,
                t.referenced,
                errors,
            )
        });
        let identity = l.identity.as_ref().and_then(|t| {
            rate(
                t.value.requests_per_second,
                t.value.burst,
                t.referenced,
                errors,
            )
        });
        let mut overrides = Vec::new();
        for o in &l.overrides {
            if o.value.from.is_empty() {
                errors.at(o, "an override needs at least one identity in `from`");
            }
            for p in &o.value.from {
                outside_trust_domain(p, on, "it never matches", errors);
            }
            if let Some(rate) = rate(
                o.value.requests_per_second,
                o.value.burst,
                o.referenced,
                errors,
            ) {
                overrides.push(RateOverride {
                    from: o.value.from.iter().map(|p| p.value.clone()).collect(),
                    rate,
                });
            }
        }
        if let Some(t) = total {
            let above = |r: &Rate| r.requests_per_second > t.requests_per_second;
            if let Some(i) = l
                .identity
                .as_ref()
                .filter(|_| identity.as_ref().is_some_and(above))
            {
                errors.warn(i, "the identity rate is above the total, which caps it");
            }
            for (o, r) in l.overrides.iter().zip(&overrides) {
                if above(&r.rate) {
                    errors.warn(o, "this override's rate is above the total, which caps it");
                }
            }
        }
        let limit = RateLimit {
            name: l.name.value,
            rule,
            methods: methods(&l.methods, true, errors),
            paths: paths(&l.paths, errors),
            total,
            identity,
            overrides,
            on_store_error: l.on_redis_error,
        };
        if let Some((earlier, _)) = out.iter().find(|(e, _)| shadows(e, &limit)) {
            errors.warn_location(
                at,
                format!(
                    "rate limit {:?} never applies: {:?} before it applies to all of its requests (the first that applies is charged)",
                    limit.name, earlier.name
                ),
            );
        }
        out.push((limit, at));
    }
    out.into_iter().map(|(l, _)| l).collect()
}

/// True when every request `later` applies to is already charged to `earlier`.
fn shadows(earlier: &RateLimit, later: &RateLimit) -> bool {
    let covered = |wide: &[PathMatch], narrow: &[PathMatch]| {
        wide.is_empty()
            || (!narrow.is_empty() && narrow.iter().all(|n| wide.iter().any(|w| w.covers(n))))
    };
    let methods = earlier.methods.is_empty()
        || (!later.methods.is_empty()
            && later.methods.iter().all(|m| {
                earlier
                    .methods
                    .iter()
                    .any(|e| crate::pattern::method_covers(e, m))
            }));
    // An earlier limit with overrides only lets other callers through to later limits.
    let limits_everyone = earlier.identity.is_some() || earlier.total.is_some();
    limits_everyone
        && (earlier.rule.is_none() || earlier.rule == later.rule)
        && methods
        && covered(&earlier.paths, &later.paths)
}

#[cfg(test)]
mod tests {
    use crate::model::OnStoreError;
    use crate::pattern::{IdentityPattern, PathMatch};
    use crate::policy::tests::{check, config, errors, policy};
    use crate::policy::{Rate, RateOverride};

    const RULES: &str = "      rules:
        - {name: shop, action: allow, from: [spiffe://td/ns/shop/*]}
        - {name: no-admin, action: deny, from: [spiffe://td/*], paths: [/admin/*]}
";

    #[test]
    fn a_linkerd_style_limit_parses() {
        let p = policy(&format!(
            "{RULES}      rate_limits:
        - name: api
          rule: shop
          methods: [post]
          paths: [/api/*]
          total: {{requests_per_second: 100, burst: 200}}
          identity: {{requests_per_second: 2.5}}
          overrides:
            - {{from: [spiffe://td/ns/shop/sa/batch], requests_per_second: 50, burst: 10}}
          on_redis_error: open
"
        ));
        let l = &p.rate_limits[0];
        assert_eq!(l.name, "api");
        assert_eq!(l.rule, Some(0));
        assert_eq!(l.methods, ["POST"]);
        assert_eq!(l.paths, [PathMatch::Prefix("/api/".into())]);
        assert_eq!(
            (l.total, l.identity),
            (
                Some(Rate {
                    requests_per_second: 100.0,
                    burst: 200
                }),
                Some(Rate {
                    requests_per_second: 2.5,
                    burst: 3
                })
            ),
            "burst defaults to one second's worth"
        );
        assert_eq!(
            l.overrides,
            [RateOverride {
                from: vec![IdentityPattern::parse("spiffe://td/ns/shop/sa/batch").unwrap()],
                rate: Rate {
                    requests_per_second: 50.0,
                    burst: 10
                },
            }]
        );
        assert_eq!(l.on_store_error, OnStoreError::Open);
    }

    #[test]
    fn a_limit_fails_closed_by_default_and_may_cover_every_request() {
        let p = policy(&format!(
            "{RULES}      rate_limits:\n        - {{name: all, identity: {{requests_per_second: 1}}}}\n"
        ));
        let l = &p.rate_limits[0];
        assert_eq!((l.rule, l.paths.len(), l.methods.len()), (None, 0, 0));
        assert_eq!(l.on_store_error, OnStoreError::Closed);
    }

    #[test]
    fn bad_limits_are_located_and_all_reported() {
        let e = errors(&format!(
            "{RULES}      rate_limits:
        - {{name: a, rule: nope, identity: {{requests_per_second: 1}}}}
        - {{name: b, rule: no-admin, identity: {{requests_per_second: 1}}}}
        - {{name: c}}
        - {{name: d, identity: {{requests_per_second: 0}}}}
        - {{name: e, total: {{requests_per_second: 1, burst: 0}}}}
        - {{name: a, identity: {{requests_per_second: 1}}}}
        - {{name: 'x y', overrides: [{{from: [], requests_per_second: 1}}]}}
"
        ));
        for want in [
            "p.yaml:17:27: no rule is named \"nope\"",
            "p.yaml:18:27: rule \"no-admin\" is a deny rule",
            "p.yaml:19:11: a rate limit needs `total`, `identity` or `overrides`",
            "p.yaml:20:31: requests_per_second must be above 0",
            "p.yaml:21:28: burst must be at least 1",
            "p.yaml:22:18: rate limit name \"a\" is used twice",
            "p.yaml:23:18: rate limit name must be 1-64",
            "an override needs at least one identity in `from`",
        ] {
            assert!(e.contains(want), "{want}\n{e}");
        }
    }

    #[test]
    fn tcp_listeners_have_no_rate_limits() {
        let text = config(
            "tcp",
            "      rules:\n        - {name: db, action: allow, from: [spiffe://td/*]}\n      rate_limits:\n        - {name: x, total: {requests_per_second: 1}}\n",
        );
        let e = check(&text).unwrap_err().to_string();
        assert!(
            e.contains("rate_limits only apply to protocol: http"),
            "{e}"
        );
    }

    #[test]
    fn limits_that_never_apply_or_exceed_the_total_are_warned_about() {
        let (_, w) = check(&config(
            "http",
            &format!(
                "{RULES}      rate_limits:
        - name: api
          paths: [/api/*]
          total: {{requests_per_second: 10}}
          identity: {{requests_per_second: 20}}
          overrides: [{{from: [spiffe://other/x], requests_per_second: 30}}]
        - {{name: orders, paths: [/api/orders], identity: {{requests_per_second: 1}}}}
        - {{name: login, paths: [/login], identity: {{requests_per_second: 1}}}}
        - {{name: batch, overrides: [{{from: [spiffe://td/ns/b/*], requests_per_second: 1}}]}}
        - {{name: rest, identity: {{requests_per_second: 1}}}}
"
            ),
        ))
        .unwrap();
        let w = w.to_string();
        for want in [
            "the identity rate is above the total, which caps it",
            "this override's rate is above the total, which caps it",
            "spiffe://other/x is outside this proxy's trust domain td",
            "rate limit \"orders\" never applies: \"api\" before it applies to all of its requests",
        ] {
            assert!(w.contains(want), "{want}\n{w}");
        }
        assert!(!w.contains("\"login\"") && !w.contains("\"rest\""), "{w}");
    }
}
