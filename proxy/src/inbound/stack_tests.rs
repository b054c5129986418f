//! The authorize and rate-limit stages in memory (tower `oneshot`), with a
//! peer verified from a real chain and a stand-in app.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::RootCertStore;
use rustls_pki_types::UnixTime;
use tower::{Layer, ServiceExt};

use warden_config::{ProxyConfig, TrustDomain};
use warden_guard::limits::Store;
use warden_guard::limits::local::LocalStore;
use warden_identity::tls::{VerifiedPeer, verify_client_chain};

use super::authorize::{AuthorizeLayer, CompiledPolicy};
use super::rate_limit::RateLimitLayer;
use crate::metrics::{Direction, ProxyMetrics};
use crate::respond::{RefusalCounters, RespondLayer};
use crate::stack::body::Body;
use crate::stack::{Req, ReqBody, Resp};

/// A peer `spiffe://td/<path>`, verified the way a handshake verifies it.
fn peer(path: &str) -> Arc<VerifiedPeer> {
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let root = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![SanType::URI(
        format!("spiffe://td{path}").try_into().unwrap(),
    )];
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    leaf.not_before = now - Duration::from_secs(60);
    leaf.not_after = now + Duration::from_secs(3600);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(root.der().clone()).unwrap();
    let td = TrustDomain::parse("spiffe://td").unwrap();
    Arc::new(verify_client_chain(cert.der(), &[], &roots, &td, UnixTime::now()).unwrap())
}

/// respond -> authorize -> rate limit -> an app that answers 200, for `policy`
/// (the `policy:` block of a listener, indented 4).
fn stack(
    policy: &str,
    peer: Arc<VerifiedPeer>,
) -> impl tower::Service<Req, Response = Resp, Error = std::convert::Infallible> + Clone {
    let text = format!(
        "identity: {{cert: c, key: k, bundle: b}}\nadmin: 127.0.0.1:1\ninbound:\n  - name: l\n    listen: 127.0.0.1:8443\n    app: 127.0.0.1:3\n{policy}"
    );
    let policy = ProxyConfig::parse(std::path::Path::new("t.yaml"), &text)
        .unwrap()
        .inbound
        .remove(0)
        .policy;
    let metrics = ProxyMetrics::new().unwrap();
    let store = Arc::new(Store::Local(LocalStore::default()));
    let compiled = CompiledPolicy::new(policy, &metrics.authz, "l", store);
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(compiled));
    std::mem::forget(tx);
    let app = tower::util::BoxCloneService::new(tower::service_fn(|_req: Req| async {
        Ok::<_, crate::respond::Refusal>(http::Response::new(Body::Full(Default::default())))
    }));
    let limited = tower::util::BoxCloneService::new(
        RateLimitLayer::new(rx.clone(), peer.clone(), 8443).layer(app),
    );
    let authorized = tower::util::BoxCloneService::new(
        AuthorizeLayer::new("l".into(), rx, peer, 8443).layer(limited),
    );
    RespondLayer::new(RefusalCounters::for_listener(
        &metrics,
        Direction::Inbound,
        "l",
    ))
    .layer(authorized)
}

fn get(path: &str) -> Req {
    http::Request::get(path)
        .body(ReqBody::read(bytes::Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn only_ops_admin_reaches_admin_and_a_denial_names_no_more_than_403() {
    let policy = "    policy:\n      rules:\n        - {name: all, action: allow, from: [spiffe://td/*], not_paths: [/admin/*]}\n        - {name: ops, action: allow, from: [spiffe://td/ns/ops/sa/admin]}\n";
    let web = stack(policy, peer("/ns/shop/sa/web"));
    assert_eq!(
        web.clone().oneshot(get("/api")).await.unwrap().status(),
        200
    );
    assert_eq!(
        web.clone().oneshot(get("/admin/x")).await.unwrap().status(),
        403
    );
    assert_eq!(web.oneshot(get("/ADMIN/x")).await.unwrap().status(), 403);
    let ops = stack(policy, peer("/ns/ops/sa/admin"));
    assert_eq!(ops.oneshot(get("/admin/x")).await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_rate_limited_caller_gets_429_with_its_headers_after_its_burst() {
    let policy = "    policy:\n      rules:\n        - {name: all, action: allow, from: [spiffe://td/*]}\n      rate_limits:\n        - {name: api, paths: [/api/*], identity: {requests_per_second: 0.01, burst: 2}}\n";
    let svc = stack(policy, peer("/web"));
    for _ in 0..2 {
        let ok = svc.clone().oneshot(get("/api/x")).await.unwrap();
        assert_eq!(ok.status(), 200);
        assert!(ok.headers().contains_key("ratelimit"));
    }
    let refused = svc.clone().oneshot(get("/API/y")).await.unwrap();
    assert_eq!(refused.status(), 429);
    for h in ["ratelimit-policy", "ratelimit", "retry-after"] {
        assert!(refused.headers().contains_key(h), "{h}");
    }
    assert_eq!(svc.oneshot(get("/other")).await.unwrap().status(), 200);
}
