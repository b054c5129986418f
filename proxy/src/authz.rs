//! Authorization (micro-segmentation): may this verified caller do this?
//!
//! Default deny. All rules are evaluated: any matching `deny` rule wins, else
//! any matching `allow` rule lets the request through, else it is refused by
//! the default rule. A rule matches (as in Istio's AuthorizationPolicy) when
//! every positive field it has matches (`from`, `methods`, `paths`, `ports`)
//! and none of its negative fields does (`not_from`, `not_methods`,
//! `not_paths`); a rule naming GET is about HEAD too, on either side. A
//! path that refuses (a deny's `paths`, an allow's `not_paths`) also
//! matches in other ASCII case and with a trailing `/`. In
//! audit mode a refusal is logged and counted as `audit_deny` and the
//! request goes through. Only a `VerifiedPeer`, which only the TLS verifiers
//! can make, can be authorized.

use std::path::Path;

use warden_config::pattern::{PathMatch, method_covers};
use warden_config::proxy::{Action, Policy, PolicyMode, Rule};
use warden_config::{SpiffeId, TrustDomain};
use warden_identity::tls::VerifiedPeer;

/// The outcome, with the rule that decided it (for metrics and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'p> {
    /// Let it through?
    pub allowed: bool,
    /// `allow`, `deny` or `audit_deny` (a denial let through in audit mode).
    pub result: &'static str,
    /// The deciding rule's name, or `default`.
    pub rule: &'p str,
    /// The deciding rule's position in the policy; `None` for the default rule.
    pub index: Option<usize>,
}

/// The request facts a rule can match, besides the connection's port.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// HTTP method; `None` for a TCP connection.
    pub method: Option<&'a str>,
    /// Normalized path; `None` for a TCP connection.
    pub path: Option<&'a str>,
}

type PathTest = fn(&PathMatch, &str) -> bool;

fn any_method(listed: &[String], method: &str) -> bool {
    listed.iter().any(|l| method_covers(l, method))
}

/// True when `rule` is about this request. `port`: the local port the
/// connection was accepted on; when it is not known, a rule naming ports
/// fails closed (an allow does not match, a deny does).
pub(crate) fn matches(rule: &Rule, id: &SpiffeId, port: Option<u16>, req: Request<'_>) -> bool {
    let from = rule.from.is_empty() || rule.from.iter().any(|p| p.matches(id));
    let not_from = rule.not_from.iter().any(|p| p.matches(id));
    let methods =
        rule.methods.is_empty() || req.method.is_some_and(|m| any_method(&rule.methods, m));
    let not_methods = req.method.is_some_and(|m| any_method(&rule.not_methods, m));
    // A path match that refuses is read widely, one that allows strictly
    // (see `PathMatch::matches_widely`): a respelled path fails closed.
    let (in_paths, in_not_paths): (PathTest, PathTest) = match rule.action {
        Action::Deny => (PathMatch::matches_widely, PathMatch::matches),
        Action::Allow => (PathMatch::matches, PathMatch::matches_widely),
    };
    let paths = rule.paths.is_empty()
        || req
            .path
            .is_some_and(|p| rule.paths.iter().any(|r| in_paths(r, p)));
    let not_paths = req
        .path
        .is_some_and(|p| rule.not_paths.iter().any(|r| in_not_paths(r, p)));
    let ports = rule.ports.is_empty()
        || match port {
            Some(p) => rule.ports.contains(&p),
            None => rule.action == Action::Deny,
        };
    from && !not_from && methods && !not_methods && paths && !not_paths && ports
}

/// Decides `req` from `peer`, on a connection accepted on `local_port`,
/// under `policy`.
pub fn decide_on<'p>(
    policy: &'p Policy,
    peer: &VerifiedPeer,
    local_port: u16,
    req: Request<'_>,
) -> Decision<'p> {
    decide_id(policy, peer.id(), Some(local_port), req)
}

/// [`decide_on`] when the connection's port is not known: rules that name
/// `ports` fail closed (an allow rule does not match, a deny rule does).
pub fn decide<'p>(policy: &'p Policy, peer: &VerifiedPeer, req: Request<'_>) -> Decision<'p> {
    decide_id(policy, peer.id(), None, req)
}

fn decide_id<'p>(
    policy: &'p Policy,
    id: &SpiffeId,
    port: Option<u16>,
    req: Request<'_>,
) -> Decision<'p> {
    let mut allow: Option<usize> = None;
    for (i, rule) in policy.rules.iter().enumerate() {
        if !matches(rule, id, port, req) {
            continue;
        }
        match rule.action {
            Action::Deny => return refuse(policy, &rule.name, Some(i)),
            Action::Allow => allow = allow.or(Some(i)),
        }
    }
    match allow {
        Some(i) => Decision {
            allowed: true,
            result: "allow",
            rule: &policy.rules[i].name,
            index: Some(i),
        },
        None => refuse(policy, "default", None),
    }
}

/// The trust domain of the SPIFFE ID in the first certificate of a PEM
/// file: for `warden check`, the proxy's own trust domain when its identity
/// comes from certificate files. Every caller is in it, since the inbound
/// handshake accepts only IDs of the proxy's trust domain. None when the
/// file cannot be read or holds no SPIFFE ID.
pub fn cert_trust_domain(cert: &Path) -> Option<TrustDomain> {
    let text = std::fs::read_to_string(cert).ok()?;
    let certs = warden_identity::pem::parse_certs(&text).ok()?;
    let leaf = certs.first()?;
    warden_identity::tls::peer_id(leaf)
        .ok()
        .map(|id| id.trust_domain())
        // A bundle: the trust domain its signing certificates name.
        .or_else(|| warden_identity::tls::bundle_trust_domain(&certs))
}

fn refuse<'p>(policy: &Policy, rule: &'p str, index: Option<usize>) -> Decision<'p> {
    match policy.mode {
        PolicyMode::Enforce => Decision {
            allowed: false,
            result: "deny",
            rule,
            index,
        },
        PolicyMode::Audit => Decision {
            allowed: true,
            result: "audit_deny",
            rule,
            index,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warden_config::ProxyConfig;

    /// A policy of `rules` (YAML flow mappings, one a line) on a listener on port 8443.
    fn rules(mode: &str, rules: &[&str]) -> Policy {
        let mut text = format!(
            "identity: {{cert: c, key: k, bundle: b}}\nadmin: 127.0.0.1:1\ninbound:\n  - name: web\n    listen: 127.0.0.1:8443\n    app: 127.0.0.1:3\n    policy:\n      mode: {mode}\n      rules:\n"
        );
        for r in rules {
            text.push_str(&format!("        - {r}\n"));
        }
        ProxyConfig::parse(Path::new("t.yaml"), &text)
            .unwrap()
            .inbound
            .remove(0)
            .policy
    }

    fn policy(mode: &str) -> Policy {
        rules(
            mode,
            &[
                "{name: shop, action: allow, from: [spiffe://td/ns/shop/*], methods: [GET], paths: [/api/*]}",
                "{name: ops, action: allow, from: [spiffe://td/ops]}",
                "{name: no-admin, action: deny, from: [spiffe://td/*], paths: [/admin/*]}",
            ],
        )
    }

    fn at<'p>(
        p: &'p Policy,
        id: &str,
        port: Option<u16>,
        method: &str,
        path: &str,
    ) -> Decision<'p> {
        let id = SpiffeId::parse(id).unwrap();
        decide_id(
            p,
            &id,
            port,
            Request {
                method: Some(method),
                path: Some(path),
            },
        )
    }

    fn d<'p>(p: &'p Policy, id: &str, method: &str, path: &str) -> Decision<'p> {
        at(p, id, Some(8443), method, path)
    }

    fn tcp<'p>(p: &'p Policy, id: &str) -> Decision<'p> {
        let id = SpiffeId::parse(id).unwrap();
        let none = Request {
            method: None,
            path: None,
        };
        decide_id(p, &id, Some(8443), none)
    }

    const ADMIN: &str = "spiffe://td/ns/ops/sa/admin";
    const WEB: &str = "spiffe://td/ns/shop/sa/web";

    #[test]
    fn allow_needs_identity_method_and_path_to_match() {
        let p = policy("enforce");
        assert_eq!(d(&p, WEB, "GET", "/api/x").rule, "shop");
        assert!(d(&p, WEB, "GET", "/api/x").allowed);
        assert!(!d(&p, WEB, "POST", "/api/x").allowed);
        assert!(d(&p, WEB, "HEAD", "/api/x").allowed, "GET rules cover HEAD");
        assert!(!d(&p, WEB, "GET", "/other").allowed);
        assert!(!d(&p, "spiffe://td/ns/bank/web", "GET", "/api/x").allowed);
        assert!(!d(&p, "spiffe://other/ns/shop/web", "GET", "/api/x").allowed);
    }

    #[test]
    fn deny_wins_over_allow_and_the_default_is_deny() {
        let p = policy("enforce");
        let ops_admin = d(&p, "spiffe://td/ops", "GET", "/admin/users");
        assert_eq!(
            (ops_admin.allowed, ops_admin.rule, ops_admin.result),
            (false, "no-admin", "deny")
        );
        assert!(d(&p, "spiffe://td/ops", "DELETE", "/anything").allowed);
        let none = d(&p, "spiffe://td/stranger", "GET", "/");
        assert_eq!((none.allowed, none.rule), (false, "default"));
    }

    #[test]
    fn audit_mode_lets_denials_through_but_names_them() {
        let p = policy("audit");
        let x = d(&p, "spiffe://td/stranger", "GET", "/");
        assert_eq!(
            (x.allowed, x.result, x.rule),
            (true, "audit_deny", "default")
        );
        assert_eq!(d(&p, "spiffe://td/ops", "GET", "/x").result, "allow");
    }

    #[test]
    fn tcp_connections_match_on_identity_only() {
        let p = policy("enforce");
        assert!(tcp(&p, "spiffe://td/ops").allowed);
        assert!(!tcp(&p, WEB).allowed, "shop's rule needs a method and path");
    }

    #[test]
    fn only_ops_admin_may_use_admin_paths_with_a_deny_not_from() {
        let p = rules(
            "enforce",
            &[
                "{name: everyone, action: allow, from: [spiffe://td/*]}",
                "{name: admin-only-ops, action: deny, not_from: [spiffe://td/ns/ops/sa/admin], paths: [/admin/*]}",
            ],
        );
        assert!(d(&p, ADMIN, "DELETE", "/admin/users").allowed);
        assert!(d(&p, ADMIN, "GET", "/admin").allowed);
        assert!(d(&p, WEB, "GET", "/api/x").allowed);
        for path in ["/admin", "/admin/", "/admin/users"] {
            let x = d(&p, WEB, "GET", path);
            assert_eq!((x.allowed, x.rule), (false, "admin-only-ops"), "{path}");
        }
        assert!(
            !d(&p, "spiffe://td/ns/ops/sa/admin2", "GET", "/admin/x").allowed,
            "an exact ID excludes only itself"
        );
    }

    #[test]
    fn only_ops_admin_may_use_admin_paths_with_allows_and_not_paths() {
        let p = rules(
            "enforce",
            &[
                "{name: everyone, action: allow, from: [spiffe://td/*], not_paths: [/admin/*]}",
                "{name: ops-admin, action: allow, from: [spiffe://td/ns/ops/sa/admin], paths: [/admin/*]}",
            ],
        );
        assert!(d(&p, WEB, "POST", "/api/orders").allowed);
        assert_eq!(d(&p, WEB, "GET", "/admin/users").rule, "default");
        assert!(!d(&p, WEB, "GET", "/admin").allowed);
        assert_eq!(d(&p, ADMIN, "GET", "/admin/users").rule, "ops-admin");
    }

    #[test]
    fn a_respelled_path_cannot_slip_past_a_refusing_match() {
        let p = rules(
            "enforce",
            &[
                "{name: everyone, action: allow, from: [spiffe://td/*], not_paths: [/admin/*]}",
                "{name: no-export, action: deny, from: [spiffe://td/*], paths: [/export]}",
            ],
        );
        for path in ["/ADMIN/users", "/Admin", "/export/", "/EXPORT"] {
            assert!(!d(&p, WEB, "GET", path).allowed, "{path}");
        }
        assert!(d(&p, WEB, "GET", "/exports").allowed);
        // An allow's own paths stay strict: another case is not allowed by it.
        let strict = rules(
            "enforce",
            &["{name: api, action: allow, from: [spiffe://td/*], paths: [/api/*]}"],
        );
        assert!(d(&strict, WEB, "GET", "/api/x").allowed);
        assert!(!d(&strict, WEB, "GET", "/API/x").allowed);
    }

    #[test]
    fn not_from_excludes_callers_and_from_is_still_required_to_match() {
        let p = rules(
            "enforce",
            &[
                "{name: shop-but-batch, action: allow, from: [spiffe://td/ns/shop/*], not_from: [spiffe://td/ns/shop/sa/batch]}",
            ],
        );
        assert!(d(&p, WEB, "GET", "/").allowed);
        assert!(!d(&p, "spiffe://td/ns/shop/sa/batch", "GET", "/").allowed);
        assert!(!d(&p, ADMIN, "GET", "/").allowed);
    }

    #[test]
    fn not_methods_get_cannot_be_bypassed_with_head() {
        let p = rules(
            "enforce",
            &["{name: writes, action: allow, from: [spiffe://td/*], not_methods: [GET]}"],
        );
        assert!(d(&p, WEB, "POST", "/x").allowed);
        assert!(!d(&p, WEB, "GET", "/x").allowed);
        assert!(!d(&p, WEB, "HEAD", "/x").allowed, "HEAD is a GET");
        // A deny of everything but GET lets HEAD through as it lets GET.
        let p = rules(
            "enforce",
            &[
                "{name: all, action: allow, from: [spiffe://td/*]}",
                "{name: reads-only, action: deny, from: [spiffe://td/*], not_methods: [GET]}",
            ],
        );
        assert!(d(&p, WEB, "GET", "/x").allowed && d(&p, WEB, "HEAD", "/x").allowed);
        assert_eq!(d(&p, WEB, "DELETE", "/x").rule, "reads-only");
        assert!(!d(&p, WEB, "DELETE", "/x").allowed);
    }

    #[test]
    fn not_paths_exclude_exact_and_prefix_paths() {
        let p = rules(
            "enforce",
            &[
                "{name: r, action: allow, from: [spiffe://td/*], paths: [/api/*], not_paths: [/api/internal/*, /api/debug]}",
            ],
        );
        assert!(d(&p, WEB, "GET", "/api/orders").allowed);
        assert!(
            d(&p, WEB, "GET", "/api/debug/x").allowed,
            "exact excludes only itself"
        );
        for path in ["/api/internal", "/api/internal/x", "/api/debug"] {
            assert!(!d(&p, WEB, "GET", path).allowed, "{path}");
        }
    }

    #[test]
    fn ports_match_the_local_port_the_connection_was_accepted_on() {
        let p = rules(
            "enforce",
            &[
                "{name: tls-port, action: allow, from: [spiffe://td/*], ports: [8443, 9443]}",
                "{name: no-metrics-port, action: deny, from: [spiffe://td/*], ports: [9090]}",
            ],
        );
        assert!(at(&p, WEB, Some(8443), "GET", "/").allowed);
        assert!(at(&p, WEB, Some(9443), "GET", "/").allowed);
        assert_eq!(at(&p, WEB, Some(9444), "GET", "/").rule, "default");
        assert_eq!(at(&p, WEB, Some(9090), "GET", "/").rule, "no-metrics-port");
    }

    #[test]
    fn an_unknown_port_fails_closed() {
        let p = rules(
            "enforce",
            &[
                "{name: tls-port, action: allow, from: [spiffe://td/*], ports: [8443]}",
                "{name: anyone, action: allow, from: [spiffe://td/ns/ops/*]}",
                "{name: no-9090, action: deny, from: [spiffe://td/ns/ops/sa/*], ports: [9090]}",
            ],
        );
        assert_eq!(at(&p, WEB, None, "GET", "/").rule, "default");
        assert_eq!(at(&p, ADMIN, None, "GET", "/").rule, "no-9090");
    }

    #[test]
    fn the_trust_domain_of_a_missing_or_bad_certificate_is_unknown() {
        assert_eq!(cert_trust_domain(Path::new("/nonexistent/cert.pem")), None);
        assert_eq!(cert_trust_domain(Path::new("Cargo.toml")), None);
    }
}
