//! Authorization (micro-segmentation): may this verified caller do this?
//!
//! Default deny. All rules are evaluated: any matching `deny` rule wins, else
//! any matching `allow` rule lets the request through, else it is refused by
//! the default rule. In audit mode a refusal is logged and counted as
//! `audit_deny` and the request goes through. Only a `VerifiedPeer`, which
//! only the TLS verifiers can make, can be authorized.

use warden_config::SpiffeId;
use warden_config::proxy::{Action, Policy, PolicyMode, Rule};
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

/// The request facts a rule can match.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// HTTP method; `None` for a TCP connection.
    pub method: Option<&'a str>,
    /// Normalized path; `None` for a TCP connection.
    pub path: Option<&'a str>,
}

/// HEAD is answered by GET handlers in most frameworks, so a rule about
/// GET is about HEAD too (a deny on GET must not be bypassed with HEAD).
fn method_matches(rule_method: &str, method: &str) -> bool {
    rule_method == method || (method == "HEAD" && rule_method == "GET")
}

fn matches(rule: &Rule, id: &SpiffeId, req: Request<'_>) -> bool {
    rule.from.iter().any(|p| p.matches(id))
        && (rule.methods.is_empty()
            || req
                .method
                .is_some_and(|m| rule.methods.iter().any(|r| method_matches(r, m))))
        && (rule.paths.is_empty()
            || req
                .path
                .is_some_and(|p| rule.paths.iter().any(|r| r.matches(p))))
}

/// Decides `req` from `peer` under `policy`.
pub fn decide<'p>(policy: &'p Policy, peer: &VerifiedPeer, req: Request<'_>) -> Decision<'p> {
    decide_id(policy, peer.id(), req)
}

fn decide_id<'p>(policy: &'p Policy, id: &SpiffeId, req: Request<'_>) -> Decision<'p> {
    let mut allow: Option<usize> = None;
    for (i, rule) in policy.rules.iter().enumerate() {
        if !matches(rule, id, req) {
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
    use std::path::Path;
    use warden_config::ProxyConfig;

    fn policy(mode: &str) -> Policy {
        let text = format!(
            "identity: {{cert: c, key: k, bundle: b}}\nadmin: 127.0.0.1:1\ninbound:\n  - name: web\n    listen: 127.0.0.1:2\n    app: 127.0.0.1:3\n    policy:\n      mode: {mode}\n      rules:\n        - {{name: shop, action: allow, from: [spiffe://td/ns/shop/*], methods: [GET], paths: [/api/*]}}\n        - {{name: ops, action: allow, from: [spiffe://td/ops]}}\n        - {{name: no-admin, action: deny, from: [spiffe://td/*], paths: [/admin/*]}}\n"
        );
        ProxyConfig::parse(Path::new("t.yaml"), &text)
            .unwrap()
            .inbound
            .remove(0)
            .policy
    }

    fn d<'p>(p: &'p Policy, id: &str, method: &str, path: &str) -> Decision<'p> {
        let id = SpiffeId::parse(id).unwrap();
        decide_id(
            p,
            &id,
            Request {
                method: Some(method),
                path: Some(path),
            },
        )
    }

    #[test]
    fn allow_needs_identity_method_and_path_to_match() {
        let p = policy("enforce");
        assert_eq!(
            d(&p, "spiffe://td/ns/shop/web", "GET", "/api/x").rule,
            "shop"
        );
        assert!(d(&p, "spiffe://td/ns/shop/web", "GET", "/api/x").allowed);
        assert!(!d(&p, "spiffe://td/ns/shop/web", "POST", "/api/x").allowed);
        assert!(
            d(&p, "spiffe://td/ns/shop/web", "HEAD", "/api/x").allowed,
            "GET rules cover HEAD"
        );
        assert!(!d(&p, "spiffe://td/ns/shop/web", "GET", "/other").allowed);
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
        let id = SpiffeId::parse("spiffe://td/ops").unwrap();
        assert!(
            decide_id(
                &p,
                &id,
                Request {
                    method: None,
                    path: None
                }
            )
            .allowed
        );
        let id = SpiffeId::parse("spiffe://td/ns/shop/web").unwrap();
        assert!(
            !decide_id(
                &p,
                &id,
                Request {
                    method: None,
                    path: None
                }
            )
            .allowed,
            "shop's rule needs a method and path"
        );
    }
}
