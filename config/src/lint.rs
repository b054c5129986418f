//! Warnings about rules that can never match, found by comparing a rule's
//! positive fields with its own negative ones and with the deny rules.
//! Each check is conservative: it warns only when it is sure.

use serde_saphyr::Location;

use crate::diagnostic::Collector;
use crate::pattern::{IdentityPattern, PathMatch, method_covers};
use crate::policy::{Action, Listener, Rule};

/// Warns about every rule of a listener that can never match, or never
/// lets a request through.
pub(crate) fn never_matching(
    rules: &[(Rule, Location)],
    on: &Listener<'_>,
    errors: &mut Collector<'_>,
) {
    for (r, at) in rules {
        if let Some(why) = excluded_by_itself(r, on) {
            errors.warn_location(*at, format!("rule {:?} can never match: {why}", r.name));
            continue;
        }
        if r.action == Action::Deny {
            continue;
        }
        if let Some((d, _)) = rules
            .iter()
            .find(|(d, _)| d.action == Action::Deny && denies_all_of(d, r, on))
        {
            errors.warn_location(
                *at,
                format!(
                    "rule {:?} never lets a request through: deny rule {:?} matches every request it matches",
                    r.name, d.name
                ),
            );
        }
    }
}

/// Every pattern of `narrow` is covered by some pattern of `wide`.
fn all_covered<T>(narrow: &[T], wide: &[T], covers: impl Fn(&T, &T) -> bool) -> bool {
    !narrow.is_empty() && narrow.iter().all(|n| wide.iter().any(|w| covers(w, n)))
}

/// The callers a rule is about, as patterns: its `from`, or every caller of
/// the trust domain when it has none (None when that is not known).
fn callers(r: &Rule, on: &Listener<'_>) -> Option<Vec<IdentityPattern>> {
    if r.from.is_empty() {
        on.trust_domain
            .map(|td| vec![IdentityPattern::TrustDomain(td.clone())])
    } else {
        Some(r.from.clone())
    }
}

/// Why the rule's negative fields exclude everything its positive ones name.
fn excluded_by_itself(r: &Rule, on: &Listener<'_>) -> Option<&'static str> {
    if callers(r, on).is_some_and(|c| all_covered(&c, &r.not_from, IdentityPattern::covers)) {
        return Some("every caller in `from` is excluded by `not_from`");
    }
    if all_covered(&r.methods, &r.not_methods, |w, n| method_covers(w, n)) {
        return Some("every method in `methods` is excluded by `not_methods`");
    }
    let every_path = [PathMatch::Prefix("/".into())];
    let paths = if r.paths.is_empty() {
        &every_path[..]
    } else {
        &r.paths[..]
    };
    if all_covered(paths, &r.not_paths, PathMatch::covers) {
        return Some("every path in `paths` is excluded by `not_paths`");
    }
    None
}

/// True when deny rule `d` surely matches every request allow rule `r` matches:
/// `d`'s positive fields cover `r`'s, and `d`'s exclusions exclude nothing `r` matches.
fn denies_all_of(d: &Rule, r: &Rule, on: &Listener<'_>) -> bool {
    let Some(callers) = callers(r, on) else {
        return false;
    };
    let from = d.from.is_empty() || all_covered(&callers, &d.from, IdentityPattern::covers);
    let not_from = callers
        .iter()
        .all(|c| d.not_from.iter().all(|n| !n.overlaps(c)));
    let methods =
        d.methods.is_empty() || all_covered(&r.methods, &d.methods, |w, n| method_covers(w, n));
    // `r`'s methods, with the HEAD that a GET brings.
    let excluded = |m: &str| d.not_methods.iter().any(|n| method_covers(n, m));
    let not_methods = d.not_methods.is_empty()
        || (!r.methods.is_empty()
            && r.methods
                .iter()
                .all(|m| !(excluded(m) || (m == "GET" && excluded("HEAD")))));
    let paths = d.paths.is_empty() || all_covered(&r.paths, &d.paths, PathMatch::covers);
    let not_paths = d.not_paths.is_empty()
        || (!r.paths.is_empty()
            && r.paths
                .iter()
                .all(|p| d.not_paths.iter().all(|n| !n.overlaps(p))));
    let ports = d.ports.is_empty() || all_covered(&r.ports, &d.ports, |w, n| w == n);
    from && not_from && methods && not_methods && paths && not_paths && ports
}

#[cfg(test)]
mod tests {
    use crate::policy::tests::{check, config};

    fn warnings(rules: &str) -> String {
        check(&config("http", rules)).unwrap().1.to_string()
    }

    #[test]
    fn not_paths_equal_to_paths_can_never_match() {
        let w = warnings(
            "      rules:\n        - {name: r, action: allow, from: [spiffe://td/*], paths: [/a/*, /b], not_paths: [/b, /a/*]}\n",
        );
        assert!(
            w.contains("p.yaml:14:11: warning: rule \"r\" can never match: every path in `paths` is excluded by `not_paths`"),
            "{w}"
        );
    }

    #[test]
    fn wider_not_paths_not_methods_or_not_from_exclude_everything() {
        let w = warnings(
            "      rules:
        - {name: p, action: allow, from: [spiffe://td/*], paths: [/a/b/*], not_paths: [/a/*]}
        - {name: all, action: allow, from: [spiffe://td/*], not_paths: [/*]}
        - {name: m, action: allow, from: [spiffe://td/*], methods: [GET, HEAD], not_methods: [GET]}
        - {name: f, action: allow, from: [spiffe://td/ns/a/*], not_from: [spiffe://td/ns/*]}
        - {name: td, action: allow, not_from: [spiffe://td/*]}
        - {name: fine, action: allow, from: [spiffe://td/*], paths: [/a/*], not_paths: [/a/b/*], methods: [HEAD], not_methods: [POST]}
",
        );
        for name in ["p", "all", "m", "f", "td"] {
            assert!(
                w.contains(&format!("rule \"{name}\" can never match")),
                "{name}: {w}"
            );
        }
        assert!(!w.contains("\"fine\""), "{w}");
    }

    #[test]
    fn an_allow_rule_inside_a_deny_is_shadowed() {
        let w = warnings(
            "      rules:
        - {name: reads, action: allow, from: [spiffe://td/ns/shop/*], methods: [HEAD], paths: [/admin/users]}
        - {name: everyone, action: allow, not_from: [spiffe://td/ns/x/*]}
        - {name: shop-any, action: allow, from: [spiffe://td/ns/shop/*], paths: [/admin/x]}
        - {name: ops-any, action: allow, from: [spiffe://td/ns/ops/*], paths: [/admin/x]}
        - {name: no-admin, action: deny, from: [spiffe://td/*], methods: [GET], paths: [/admin/*]}
        - {name: no-ops, action: deny, from: [spiffe://td/*], not_from: [spiffe://td/ns/ops/*]}
",
        );
        assert!(
            w.contains("p.yaml:14:11: warning: rule \"reads\" never lets a request through: deny rule \"no-admin\" matches every request it matches"),
            "{w}"
        );
        // shop is surely not in ns/ops; ops-any is not denied a POST; everyone includes ns/ops.
        assert!(
            w.contains("rule \"shop-any\" never lets a request through: deny rule \"no-ops\""),
            "{w}"
        );
        assert!(
            !w.contains("\"ops-any\" never") && !w.contains("\"everyone\" never"),
            "{w}"
        );
    }

    #[test]
    fn a_deny_with_exclusions_shadows_what_it_surely_does_not_exclude() {
        let w = warnings(
            "      rules:
        - {name: shop-admin, action: allow, from: [spiffe://td/ns/shop/*], paths: [/admin/*]}
        - {name: ops-admin, action: allow, from: [spiffe://td/ns/ops/*], paths: [/admin/*]}
        - {name: shop-posts, action: allow, from: [spiffe://td/ns/shop/*], methods: [POST], paths: [/api/orders]}
        - {name: shop-gets, action: allow, from: [spiffe://td/ns/shop/*], methods: [GET], paths: [/api/*]}
        - {name: shop-public, action: allow, from: [spiffe://td/ns/shop/*], paths: [/api/public/x]}
        - {name: admin-only-ops, action: deny, not_from: [spiffe://td/ns/ops/sa/admin], paths: [/admin/*]}
        - {name: reads-only, action: deny, from: [spiffe://td/ns/shop/*], not_methods: [HEAD], not_paths: [/api/public/*]}
",
        );
        for name in ["shop-admin", "shop-posts"] {
            let want = format!("rule \"{name}\" never lets a request through");
            assert!(w.contains(&want), "{name}: {w}");
        }
        // ops/* holds ops/sa/admin; a GET brings HEAD, which reads-only excludes; so is /api/public/x.
        for name in ["ops-admin", "shop-gets", "shop-public"] {
            assert!(!w.contains(&format!("\"{name}\"")), "{name}: {w}");
        }
    }

    #[test]
    fn ports_that_exclude_the_listeners_port_can_never_match() {
        let w = warnings(
            "      rules:\n        - {name: r, action: allow, from: [spiffe://td/*], ports: [9443]}\n        - {name: ok, action: allow, from: [spiffe://td/*], ports: [9443, 8443]}\n",
        );
        assert!(
            w.contains(
                "rule \"r\" can never match: this listener accepts connections on port 8443 only"
            ),
            "{w}"
        );
        assert!(!w.contains("\"ok\""), "{w}");
        let any_port = config(
            "http",
            "      rules:\n        - {name: r, action: allow, from: [spiffe://td/*], ports: [9443]}\n",
        )
        .replace("0.0.0.0:8443", "0.0.0.0:0");
        assert!(check(&any_port).unwrap().1.0.is_empty());
    }

    #[test]
    fn the_only_x_may_use_admin_policy_has_no_warnings() {
        let w = warnings(
            "      rules:
        - {name: everyone, action: allow, from: [spiffe://td/*]}
        - {name: admin-only-ops, action: deny, not_from: [spiffe://td/ns/ops/sa/admin], paths: [/admin/*]}
",
        );
        assert!(w.is_empty(), "{w}");
    }
}
