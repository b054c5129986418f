//! An inbound listener's policy: authorization rules and request-rate
//! limits, and the validation of each rule.
//!
//! Rules follow Istio's AuthorizationPolicy: a rule matches when every
//! positive field it has matches (`from`, `methods`, `paths`, `ports`) and no
//! negative field does (`not_from`, `not_methods`, `not_paths`). Default
//! deny; a matching deny wins over every allow. Unlike Istio, a rule must
//! say who it is about, with `from` or `not_from`, so that no rule matches
//! every caller by accident.

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

use crate::diagnostic::Collector;
use crate::model::OnStoreError;
use crate::pattern::{IdentityPattern, KNOWN_METHODS, PathMatch};
use crate::spiffe::TrustDomain;

/// Whether a policy's denials are enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    /// Denied requests are refused.
    #[default]
    Enforce,
    /// Denied requests are logged and counted, then let through.
    Audit,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let matching requests through (unless a deny rule also matches).
    Allow,
    /// Refuse matching requests; wins over allow.
    Deny,
}

/// One authorization rule: who (identity patterns) may do what (methods,
/// paths, ports). Every field given must match, no `not_` field may.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Name used in metrics and logs.
    pub name: String,
    /// Allow or deny.
    pub action: Action,
    /// Callers this rule is about; empty: every caller (only when `not_from` is set).
    pub from: Vec<IdentityPattern>,
    /// Callers this rule is never about.
    pub not_from: Vec<IdentityPattern>,
    /// Methods (upper case); empty: any. GET covers HEAD.
    pub methods: Vec<String>,
    /// Methods (upper case) this rule is never about. GET covers HEAD.
    pub not_methods: Vec<String>,
    /// Paths; empty: any.
    pub paths: Vec<PathMatch>,
    /// Paths this rule is never about.
    pub not_paths: Vec<PathMatch>,
    /// Local ports the connection was accepted on; empty: any.
    pub ports: Vec<u16>,
}

/// A sustained request rate with a burst (GCRA).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Requests per second, sustained.
    pub requests_per_second: f64,
    /// Requests allowed at once (default: one second's worth).
    pub burst: u32,
}

/// A rate for particular callers, instead of the per-identity one.
#[derive(Debug, Clone, PartialEq)]
pub struct RateOverride {
    /// The callers (each still has a bucket of its own).
    pub from: Vec<IdentityPattern>,
    /// Their rate.
    pub rate: Rate,
}

/// A request-rate limit on some of a listener's requests, in the shape of
/// Linkerd's HTTPLocalRateLimitPolicy: a total over every caller, a rate per
/// caller identity, and overrides for named callers. Keyed on the verified
/// SPIFFE ID only.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    /// Name used in `RateLimit-Policy`, metrics, logs and state keys.
    pub name: String,
    /// Index in [`Policy::rules`] of the allow rule whose requests this
    /// limits; None: requests of any rule.
    pub rule: Option<usize>,
    /// Methods it applies to (upper case, GET covers HEAD); empty: any.
    pub methods: Vec<String>,
    /// Paths it applies to; empty: any.
    pub paths: Vec<PathMatch>,
    /// Every caller together (callers of a listener are all in the proxy's
    /// trust domain: the total is kept per trust domain).
    pub total: Option<Rate>,
    /// Each caller identity, unless an override names it.
    pub identity: Option<Rate>,
    /// Rates for particular callers (the first whose `from` matches).
    pub overrides: Vec<RateOverride>,
    /// What to do when the shared state (Redis) cannot be reached.
    pub on_store_error: OnStoreError,
}

/// An inbound listener's authorization policy (default deny) and its
/// request-rate limits. Both are replaced together on reload.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policy {
    /// Enforce or audit.
    pub mode: PolicyMode,
    /// Rules, evaluated all together: any matching deny wins, else any matching allow.
    pub rules: Vec<Rule>,
    /// Rate limits on allowed requests; the first that applies is the one charged.
    pub rate_limits: Vec<RateLimit>,
}

/// What checking a policy needs to know about its listener.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Listener<'a> {
    /// A `tcp` listener: rules can only be about callers and ports.
    pub tcp: bool,
    /// The listen port, unless 0 (known only once bound).
    pub port: Option<u16>,
    /// The trust domain every caller is in (the proxy's own), when known.
    pub trust_domain: Option<&'a TrustDomain>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    name: String,
    action: Action,
    #[serde(default)]
    from: Option<Vec<Spanned<IdentityPattern>>>,
    #[serde(default)]
    not_from: Vec<Spanned<IdentityPattern>>,
    #[serde(default)]
    methods: Vec<Spanned<String>>,
    #[serde(default)]
    not_methods: Vec<Spanned<String>>,
    #[serde(default)]
    paths: Vec<Spanned<String>>,
    #[serde(default)]
    not_paths: Vec<Spanned<String>>,
    #[serde(default)]
    ports: Vec<Spanned<u32>>,
}

/// Checks every rule of a listener; returns each with where it was written.
pub(crate) fn validate_rules(
    raw: Vec<Spanned<RawRule>>,
    on: &Listener<'_>,
    errors: &mut Collector<'_>,
) -> Vec<(Rule, Location)> {
    let mut names = std::collections::HashSet::new();
    let mut rules = Vec::new();
    for r in raw {
        let at = r.referenced;
        let r = r.value;
        if !names.insert(r.name.clone()) {
            errors.at_location(at, format!("rule name {:?} is used twice", r.name));
        }
        let from = match &r.from {
            Some(f) if f.is_empty() => {
                errors.at_location(at, "a rule needs at least one identity in `from`");
                Vec::new()
            }
            Some(f) => f.iter().map(|p| p.value.clone()).collect(),
            None if r.not_from.is_empty() => {
                errors.at_location(
                    at,
                    "a rule needs `from` (the callers it is about) or `not_from` (every caller but these)",
                );
                Vec::new()
            }
            None => Vec::new(),
        };
        let http_fields = [&r.methods, &r.not_methods, &r.paths, &r.not_paths];
        if on.tcp && http_fields.iter().any(|f| !f.is_empty()) {
            errors.at_location(
                at,
                "a tcp listener's rules can only match `from`, `not_from` and `ports`",
            );
        }
        for p in r.from.iter().flatten() {
            outside_trust_domain(p, on, "it never matches", errors);
        }
        for p in &r.not_from {
            outside_trust_domain(p, on, "it excludes no caller", errors);
        }
        let mut ports = Vec::new();
        for p in &r.ports {
            match u16::try_from(p.value) {
                Ok(n) if n != 0 => ports.push(n),
                _ => errors.at(p, format!("port {} must be between 1 and 65535", p.value)),
            }
        }
        if let Some(port) = on.port
            && !ports.is_empty()
            && !ports.contains(&port)
        {
            errors.warn_location(
                at,
                format!(
                    "rule {:?} can never match: this listener accepts connections on port {port} only",
                    r.name
                ),
            );
        }
        rules.push((
            Rule {
                name: r.name,
                action: r.action,
                from,
                not_from: r.not_from.into_iter().map(|p| p.value).collect(),
                methods: methods(&r.methods, true, errors),
                not_methods: methods(&r.not_methods, false, errors),
                paths: paths(&r.paths, errors),
                not_paths: paths(&r.not_paths, errors),
                ports,
            },
            at,
        ));
    }
    rules
}

/// Warns about a pattern no caller of this listener can match.
pub(crate) fn outside_trust_domain(
    p: &Spanned<IdentityPattern>,
    on: &Listener<'_>,
    consequence: &str,
    errors: &mut Collector<'_>,
) {
    if let Some(td) = on.trust_domain
        && !p.value.is_in(td)
    {
        errors.warn(
            p,
            format!(
                "{} is outside this proxy's trust domain {td}: callers are only accepted from {td}, so {consequence}",
                p.value
            ),
        );
    }
}

/// Checks method names and upper-cases them. `positive`: a list of methods
/// a rule is about (where a method that never reaches authorization means
/// the entry never matches).
pub(crate) fn methods(
    raw: &[Spanned<String>],
    positive: bool,
    errors: &mut Collector<'_>,
) -> Vec<String> {
    let mut out = Vec::new();
    for m in raw {
        let name = &m.value;
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphabetic()) {
            errors.at(m, format!("method {name:?} is not an HTTP method"));
            continue;
        }
        let upper = name.to_ascii_uppercase();
        if *name != upper {
            // Upper-cased rather than kept: a deny on `delete` must keep denying DELETE.
            errors.warn(
                m,
                format!(
                    "method {name:?} is read as {upper:?}: methods are case-sensitive, clients send them in upper case and warden refuses lower-case ones"
                ),
            );
        }
        if positive && upper == "CONNECT" {
            errors.warn(
                m,
                "CONNECT never reaches authorization (warden answers it 405), so this never matches",
            );
        } else if !KNOWN_METHODS.contains(&upper.as_str()) {
            errors.warn(
                m,
                format!("{upper:?} is not a standard HTTP method: check its spelling"),
            );
        }
        out.push(upper);
    }
    out
}

/// Parses path patterns.
pub(crate) fn paths(raw: &[Spanned<String>], errors: &mut Collector<'_>) -> Vec<PathMatch> {
    let mut out = Vec::new();
    for p in raw {
        match PathMatch::parse(&p.value) {
            Ok(m) => out.push(m),
            Err(e) => errors.at(p, e),
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;

    use super::*;
    use crate::diagnostic::{Diagnostics, Warnings};
    use crate::proxy::ProxyConfig;

    /// A config with an identity from a CA in trust domain `td` and one
    /// listener on port 8443; `policy` is the listener's `policy:` block,
    /// indented by six spaces.
    pub(crate) fn config(protocol: &str, policy: &str) -> String {
        format!(
            "identity:\n  ca_url: https://ca:8443\n  token_file: /run/token\n  spiffe_id: spiffe://td/ns/web/sa/web\n  bundle: b.pem\nadmin: 127.0.0.1:9901\ninbound:\n  - name: web\n    listen: 0.0.0.0:8443\n    app: 127.0.0.1:8080\n    protocol: {protocol}\n    policy:\n{policy}"
        )
    }

    pub(crate) fn check(text: &str) -> Result<(ProxyConfig, Warnings), Diagnostics> {
        ProxyConfig::check_text(Path::new("p.yaml"), text, |_| None)
    }

    pub(crate) fn policy(rules: &str) -> Policy {
        check(&config("http", rules))
            .unwrap()
            .0
            .inbound
            .remove(0)
            .policy
    }

    pub(crate) fn errors(rules: &str) -> String {
        check(&config("http", rules)).unwrap_err().to_string()
    }

    fn id(s: &str) -> IdentityPattern {
        IdentityPattern::parse(s).unwrap()
    }

    #[test]
    fn negative_fields_and_ports_are_read() {
        let p = policy(
            "      rules:
        - name: all-but-admin
          action: allow
          from: [spiffe://td/*]
          not_from: [spiffe://td/ns/ops/sa/admin]
          not_methods: [DELETE, GET]
          not_paths: [/admin/*]
          ports: [8443]
",
        );
        let r = &p.rules[0];
        assert_eq!(r.not_from, vec![id("spiffe://td/ns/ops/sa/admin")]);
        assert_eq!(r.not_methods, vec!["DELETE", "GET"]);
        assert_eq!(r.not_paths, vec![PathMatch::Prefix("/admin/".into())]);
        assert_eq!(r.ports, vec![8443]);
    }

    #[test]
    fn not_from_alone_is_about_every_caller_but_those() {
        let p = policy(
            "      rules:
        - {name: only-admin, action: deny, not_from: [spiffe://td/ns/ops/sa/admin], paths: [/admin/*]}
",
        );
        assert!(p.rules[0].from.is_empty());
    }

    #[test]
    fn a_rule_must_say_who_it_is_about() {
        let e = errors("      rules:\n        - {name: anyone, action: allow, paths: [/x]}\n");
        assert!(
            e.contains("p.yaml:14:11: a rule needs `from` (the callers it is about) or `not_from`"),
            "{e}"
        );
        let e = errors("      rules:\n        - {name: none, action: allow, from: []}\n");
        assert!(e.contains("at least one identity in `from`"), "{e}");
    }

    #[test]
    fn ports_must_be_1_to_65535_and_are_located() {
        let e = errors(
            "      rules:\n        - {name: p, action: allow, from: [spiffe://td/*], ports: [8443, 0, 70000]}\n",
        );
        assert!(
            e.contains("p.yaml:14:73: port 0 must be between 1 and 65535"),
            "{e}"
        );
        assert!(
            e.contains("p.yaml:14:76: port 70000 must be between 1 and 65535"),
            "{e}"
        );
    }

    #[test]
    fn tcp_rules_may_use_callers_and_ports_only() {
        let ok = config(
            "tcp",
            "      rules:\n        - {name: db, action: allow, not_from: [spiffe://td/ns/x/*], ports: [8443]}\n",
        );
        assert!(check(&ok).is_ok());
        let bad = config(
            "tcp",
            "      rules:\n        - {name: db, action: allow, from: [spiffe://td/*], not_paths: [/x]}\n",
        );
        let e = check(&bad).unwrap_err().to_string();
        assert!(
            e.contains("can only match `from`, `not_from` and `ports`"),
            "{e}"
        );
    }

    #[test]
    fn methods_are_upper_cased_with_a_warning() {
        let (c, w) = check(&config(
            "http",
            "      rules:\n        - {name: m, action: deny, from: [spiffe://td/*], methods: [delete], not_methods: [get]}\n",
        ))
        .unwrap();
        let r = &c.inbound[0].policy.rules[0];
        assert_eq!(
            (r.methods.as_slice(), r.not_methods.as_slice()),
            (&["DELETE".to_owned()][..], &["GET".to_owned()][..])
        );
        let w = w.to_string();
        assert!(
            w.contains("p.yaml:14:68: warning: method \"delete\" is read as \"DELETE\""),
            "{w}"
        );
        assert!(w.contains("method \"get\" is read as \"GET\""), "{w}");
    }

    #[test]
    fn methods_no_client_can_get_authorized_are_warned_about() {
        let (_, w) = check(&config(
            "http",
            "      rules:\n        - {name: m, action: allow, from: [spiffe://td/*], methods: [CONNECT, GTE, PROPFIND]}\n",
        ))
        .unwrap();
        let w = w.to_string();
        assert!(w.contains("CONNECT never reaches authorization"), "{w}");
        assert!(w.contains("\"GTE\" is not a standard HTTP method"), "{w}");
        assert!(!w.contains("PROPFIND"), "{w}");
    }

    #[test]
    fn patterns_outside_the_proxys_trust_domain_are_warned_about() {
        let (_, w) = check(&config(
            "http",
            "      rules:\n        - {name: m, action: allow, from: [spiffe://other/*], not_from: [spiffe://other/x]}\n",
        ))
        .unwrap();
        let w = w.to_string();
        assert!(
            w.contains("p.yaml:14:43: warning: spiffe://other/* is outside this proxy's trust domain td: callers are only accepted from td, so it never matches"),
            "{w}"
        );
        assert!(w.contains("spiffe://other/x is outside this proxy's trust domain td: callers are only accepted from td, so it excludes no caller"), "{w}");
    }

    #[test]
    fn with_certificate_files_the_trust_domain_is_read_from_the_certificate() {
        let text = config(
            "http",
            "      rules:\n        - {name: m, action: allow, from: [spiffe://other/*]}\n",
        )
        .replace(
            "  ca_url: https://ca:8443\n  token_file: /run/token\n  spiffe_id: spiffe://td/ns/web/sa/web\n",
            "  cert: c.pem\n  key: k.pem\n",
        );
        let mut asked = None;
        let (_, w) = ProxyConfig::check_text(Path::new("/etc/p.yaml"), &text, |cert| {
            asked = Some(cert.to_path_buf());
            TrustDomain::parse("td").ok()
        })
        .unwrap();
        assert_eq!(asked.as_deref(), Some(Path::new("/etc/c.pem")));
        assert!(
            w.to_string()
                .contains("outside this proxy's trust domain td"),
            "{w}"
        );
        let (_, w) = ProxyConfig::check_text(Path::new("/etc/p.yaml"), &text, |_| None).unwrap();
        assert!(w.0.is_empty(), "unknown trust domain: no such warning: {w}");
    }

    #[test]
    fn warnings_do_not_make_a_config_invalid() {
        let text = config(
            "http",
            "      rules:\n        - {name: m, action: allow, from: [spiffe://other/*], methods: [get]}\n",
        );
        let (_, w) = check(&text).unwrap();
        assert_eq!(w.0.len(), 2, "{w}");
        assert!(ProxyConfig::parse(Path::new("p.yaml"), &text).is_ok());
    }
}
