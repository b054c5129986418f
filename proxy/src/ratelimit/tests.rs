//! Rate limits on the in-process store, at instants the tests choose.

use std::path::Path;
use std::sync::Arc;

use warden_config::ProxyConfig;

use super::*;
use warden_guard::limits::local::LocalStore;

const T0: u64 = 1_700_000_000_000_000;
const SECOND: u64 = 1_000_000;

const WEB: &str = "spiffe://td/ns/shop/sa/web";
const CART: &str = "spiffe://td/ns/shop/sa/cart";
const BATCH: &str = "spiffe://td/ns/batch/sa/a";

/// The rate limits of a listener whose policy has these rules and `limits`
/// (YAML list items indented by eight spaces).
fn limits(limits: &str) -> RateLimits {
    let text = format!(
        "identity: {{cert: c, key: k, bundle: b}}\nadmin: 127.0.0.1:1\ninbound:\n  - name: web\n    listen: 127.0.0.1:8443\n    app: 127.0.0.1:3\n    policy:\n      rules:\n        - {{name: shop, action: allow, from: [spiffe://td/ns/shop/*]}}\n        - {{name: all, action: allow, from: [spiffe://td/*]}}\n      rate_limits:\n{limits}"
    );
    let policy = ProxyConfig::parse(Path::new("t.yaml"), &text)
        .unwrap()
        .inbound
        .remove(0)
        .policy;
    let store = Arc::new(Store::Local(LocalStore::default()));
    RateLimits::new("web", &policy, store)
}

fn sid(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// [`RateLimits::check`] at `now` on the local store.
fn at(
    rl: &RateLimits,
    now: u64,
    id: &str,
    method: &str,
    path: &str,
) -> Result<Option<RateLimitInfo>, Limited> {
    let id = sid(id);
    let Some((limit, tier)) = rl.select(&id, 8443, method, path) else {
        return Ok(None);
    };
    let Store::Local(s) = &*rl.store else {
        panic!("tests use the local store")
    };
    let admitted = s.admit(&tier.plan, &Subjects::of(&id), &Ask::default(), now);
    outcome(limit, tier, &id, Ok(admitted)).map(Some)
}

fn refused_by(r: Result<Option<RateLimitInfo>, Limited>) -> (String, u64) {
    match r {
        Err(Limited::Exceeded(e)) => (e.quota().to_owned(), e.retry_after_s()),
        other => panic!("not refused: {other:?}"),
    }
}

fn admitted(r: Result<Option<RateLimitInfo>, Limited>) -> bool {
    matches!(r, Ok(Some(_)))
}

#[test]
fn a_caller_gets_its_burst_then_429_until_the_rate_lets_it_in_again() {
    let rl = limits("        - {name: api, identity: {requests_per_second: 1, burst: 2}}\n");
    assert!(admitted(at(&rl, T0, WEB, "GET", "/")));
    assert!(admitted(at(&rl, T0, WEB, "GET", "/")));
    assert_eq!(
        refused_by(at(&rl, T0, WEB, "GET", "/")),
        ("api-identity".into(), 1)
    );
    assert!(admitted(at(&rl, T0 + SECOND, WEB, "GET", "/")));
    assert!(at(&rl, T0 + SECOND, WEB, "GET", "/").is_err());
}

#[test]
fn each_identity_has_its_own_bucket_whatever_the_path() {
    let rl = limits("        - {name: api, identity: {requests_per_second: 1, burst: 1}}\n");
    assert!(admitted(at(&rl, T0, WEB, "GET", "/a")));
    assert!(
        at(&rl, T0, WEB, "POST", "/b/c").is_err(),
        "one bucket per caller, not per path"
    );
    assert!(admitted(at(&rl, T0, CART, "GET", "/a")));
}

#[test]
fn the_total_is_shared_by_every_caller() {
    let rl = limits(
        "        - {name: api, total: {requests_per_second: 1, burst: 3}, identity: {requests_per_second: 10}}\n",
    );
    for id in [WEB, CART, BATCH] {
        assert!(admitted(at(&rl, T0, id, "GET", "/")), "{id}");
    }
    assert_eq!(
        refused_by(at(&rl, T0, "spiffe://td/ns/x/sa/y", "GET", "/")).0,
        "api-total"
    );
}

#[test]
fn a_request_refused_by_its_callers_rate_does_not_use_up_the_total() {
    let rl = limits(
        "        - {name: api, total: {requests_per_second: 1, burst: 2}, identity: {requests_per_second: 1, burst: 1}}\n",
    );
    assert!(admitted(at(&rl, T0, WEB, "GET", "/")));
    for _ in 0..5 {
        assert_eq!(refused_by(at(&rl, T0, WEB, "GET", "/")).0, "api-identity");
    }
    assert!(
        admitted(at(&rl, T0, CART, "GET", "/")),
        "the total has one left"
    );
}

#[test]
fn overrides_replace_the_identity_rate_for_the_callers_they_name() {
    let rl = limits(
        "        - name: api
          identity: {requests_per_second: 1, burst: 1}
          overrides:
            - {from: [spiffe://td/ns/batch/*], requests_per_second: 1, burst: 3}
",
    );
    for other in [BATCH, "spiffe://td/ns/batch/sa/b"] {
        for _ in 0..3 {
            assert!(admitted(at(&rl, T0, other, "GET", "/")), "{other}");
        }
        assert_eq!(
            refused_by(at(&rl, T0, other, "GET", "/")).0,
            "api-override-1",
            "each named caller has a bucket of its own"
        );
    }
    assert!(admitted(at(&rl, T0, WEB, "GET", "/")));
    assert_eq!(refused_by(at(&rl, T0, WEB, "GET", "/")).0, "api-identity");
}

#[test]
fn a_limit_applies_only_to_its_rule_methods_and_paths_and_get_covers_head() {
    let rl = limits(
        "        - {name: reads, rule: shop, methods: [GET], paths: [/api/*], identity: {requests_per_second: 1, burst: 1}}\n",
    );
    assert!(at(&rl, T0, WEB, "POST", "/api/x").unwrap().is_none());
    assert!(at(&rl, T0, WEB, "GET", "/other").unwrap().is_none());
    assert!(
        at(&rl, T0, BATCH, "GET", "/api/x").unwrap().is_none(),
        "batch is not allowed by rule shop"
    );
    assert!(admitted(at(&rl, T0, WEB, "GET", "/api")));
    assert!(at(&rl, T0, WEB, "HEAD", "/api/x").is_err(), "HEAD is a GET");
}

#[test]
fn the_first_limit_that_applies_is_charged() {
    let rl = limits(
        "        - {name: login, paths: [/login], identity: {requests_per_second: 1, burst: 1}}
        - {name: batch, overrides: [{from: [spiffe://td/ns/batch/*], requests_per_second: 1, burst: 1}]}
        - {name: rest, identity: {requests_per_second: 1, burst: 2}}
",
    );
    assert!(admitted(at(&rl, T0, WEB, "POST", "/login")));
    assert_eq!(
        refused_by(at(&rl, T0, WEB, "POST", "/login")).0,
        "login-identity"
    );
    assert_eq!(
        at(&rl, T0, WEB, "GET", "/").unwrap().unwrap().limit(),
        "rest"
    );
    assert_eq!(
        at(&rl, T0, BATCH, "GET", "/").unwrap().unwrap().limit(),
        "batch"
    );
    assert!(at(&rl, T0, BATCH, "GET", "/").is_err());
}

#[test]
fn refusals_carry_the_same_headers_as_the_model_routes() {
    let rl = limits(
        "        - {name: api, total: {requests_per_second: 100, burst: 200}, identity: {requests_per_second: 2, burst: 2}}\n",
    );
    let first = at(&rl, T0, WEB, "GET", "/").unwrap().unwrap();
    assert_eq!(
        first.header().unwrap(),
        (
            RATELIMIT.clone(),
            HeaderValue::from_static("\"api-identity\";r=1;t=1")
        )
    );
    at(&rl, T0, WEB, "GET", "/").unwrap();
    let Err(refused) = at(&rl, T0, WEB, "GET", "/") else {
        panic!("the third request is over the burst")
    };
    assert_eq!(
        (
            refused.status(),
            refused.reason(),
            refused.limit(),
            refused.index()
        ),
        (429, "quota_exceeded", "api", 0)
    );
    let Limited::Exceeded(e) = &refused else {
        panic!("{refused:?}")
    };
    let h = e.headers();
    assert_eq!(
        h.iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
            .collect::<Vec<_>>(),
        [
            "ratelimit-policy: \"api-identity\";q=2;w=1, \"api-total\";q=200;w=2",
            "ratelimit: \"api-identity\";r=0;t=1",
            "retry-after: 1",
        ]
    );
    // The model routes' 429 for the same plan and denial has the same headers.
    let tier = &e.tier;
    let model =
        warden_guard::refusal::quota_exceeded(&tier.plan, &Some(tier.policy.clone()), &e.denial);
    for (k, v) in &h {
        let theirs = model.headers().iter().find(|(n, _)| n == k).map(|(_, v)| v);
        assert_eq!(theirs, Some(v), "{k}");
    }
    assert!(
        refused
            .detail()
            .contains("api-identity rate limit is used up")
    );
}

#[test]
fn a_store_error_fails_closed_by_default_and_open_when_configured() {
    let id = sid(WEB);
    for (cfg, open) in [("", false), (", on_redis_error: open", true)] {
        let rl = limits(&format!(
            "        - {{name: api, identity: {{requests_per_second: 1}}{cfg}}}\n"
        ));
        let (limit, tier) = rl.select(&id, 8443, "GET", "/").unwrap();
        let r = outcome(limit, tier, &id, Err(StoreError("redis down".into())));
        if open {
            let info = r.unwrap();
            assert!(info.failed_open() && info.header().is_none());
        } else {
            let l = r.unwrap_err();
            assert_eq!((l.status(), l.reason()), (503, "limit_store_unavailable"));
            assert_eq!(
                l.headers(),
                [(header::RETRY_AFTER, HeaderValue::from_static("1"))]
            );
        }
    }
}

#[tokio::test]
async fn check_charges_the_store_the_listener_was_built_with() {
    let rl = limits("        - {name: api, identity: {requests_per_second: 0.001, burst: 1}}\n");
    let id = sid(WEB);
    assert!(rl.check_id(&id, 8443, "GET", "/").await.unwrap().is_some());
    assert_eq!(
        rl.check_id(&id, 8443, "GET", "/")
            .await
            .unwrap_err()
            .reason(),
        "quota_exceeded"
    );
    assert!(
        limits("        - {name: api, paths: [/x], identity: {requests_per_second: 1}}\n")
            .check_id(&id, 8443, "GET", "/")
            .await
            .unwrap()
            .is_none()
    );
    assert!(!rl.is_empty());
}
