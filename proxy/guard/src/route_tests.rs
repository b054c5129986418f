//! Routes in-process: what each route owns.

use std::path::Path;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use warden_config::{ProxyConfig, SpiffeId};

use super::*;
use crate::limits::local::LocalStore;

fn routes(store: &Arc<Store>) -> Routes {
    let limits = "        limits:\n          identity:\n            requests_per_second: 100\n            concurrent: 4\n            tokens_per_minute: 100000\n          namespace:\n            requests_per_second: 1000\n";
    let text = format!(
        "identity: {{cert: c, key: k, bundle: b}}\nadmin: 127.0.0.1:1\ninbound:\n  - name: models\n    listen: 127.0.0.1:2\n    app: 127.0.0.1:3\n    model_api:\n      - name: chat\n        paths: [/v1/chat/*]\n        api: openai\n{limits}      - name: embed\n        paths: [/v1/embeddings]\n        api: openai\n{limits}"
    );
    let cfg = ProxyConfig::parse(Path::new("t.yaml"), &text).unwrap();
    let metrics = ModelMetrics::new(&prometheus::Registry::new()).unwrap();
    Routes::new("models", &cfg.inbound[0].model_api, store, &metrics, None)
}

#[test]
fn each_route_owns_its_limit_state() {
    let store = Arc::new(Store::Local(LocalStore::new(5000)));
    let r = routes(&store);
    let (chat, embed) = (&r.0[0], &r.0[1]);
    // A store of its own, used by its gate and its budget alike, and not the proxy's.
    assert!(Arc::ptr_eq(&chat.gate.store, &chat.budget.store));
    assert!(!Arc::ptr_eq(&chat.budget.store, &embed.budget.store));
    assert!(!Arc::ptr_eq(&chat.budget.store, &store));
    let Store::Local(s) = &*chat.budget.store else {
        panic!("a local store makes local stores")
    };
    // As large as the proxy's, over many locks.
    assert_eq!(s.capacity(), 5000);
    assert!(s.shards() > 1);
}

#[test]
fn a_route_never_waits_for_another_routes_locks() {
    let store = Arc::new(Store::Local(LocalStore::default()));
    let r = Arc::new(routes(&store));
    let Store::Local(chat) = &*r.0[0].budget.store else {
        panic!("a local store makes local stores")
    };
    // Every lock of the chat route is held (as by a stuck admission) ...
    let held = chat.freeze();
    // ... and the embeddings route still admits and settles.
    let (tx, rx) = mpsc::channel();
    let other = r.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let peer = SpiffeId::parse("spiffe://example.org/ns/shop/sa/web").unwrap();
        for _ in 0..3 {
            let gate = rt.block_on(other.0[1].gate(&peer)).ok().unwrap();
            drop(gate);
        }
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the embeddings route waited for the chat route's locks");
    drop(held);
}

#[test]
fn refused_probes_are_evidence_and_refusals_to_a_suspect_carry_the_warning() {
    let text = "identity: {cert: c, key: k, bundle: b}\nadmin: 127.0.0.1:1\ninbound:\n  - name: models\n    listen: 127.0.0.1:2\n    app: 127.0.0.1:3\n    model_api:\n      - name: chat\n        paths: [/v1/chat/*]\n        api: openai\n        limits:\n          identity:\n            max_logit_bias: 2\n        detection:\n          hidden_size: 64\n";
    let cfg = ProxyConfig::parse(Path::new("t.yaml"), text).unwrap();
    let metrics = ModelMetrics::new(&prometheus::Registry::new()).unwrap();
    let store = Arc::new(Store::Local(LocalStore::default()));
    let routes = Routes::new("models", &cfg.inbound[0].model_api, &store, &metrics, None);
    let route = &routes.0[0];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let prober = SpiffeId::parse("spiffe://example.org/ns/shop/sa/prober").unwrap();
    let warning = |r: &GuardRefusal| {
        r.headers()
            .iter()
            .find(|(n, _)| n == USAGE_WARNING)
            .map(|(_, v)| v.to_str().unwrap().to_owned())
    };
    let mut warned = None;
    for i in 0..40u32 {
        // 40 token ids a request: every one over the cap of 2, refused with 400.
        let bias: serde_json::Map<String, serde_json::Value> = (0..40)
            .map(|k| ((i * 40 + k).to_string(), serde_json::json!(100)))
            .collect();
        let body = serde_json::json!({"messages": [{"role": "user", "content": "x"}], "logit_bias": bias, "max_tokens": 1});
        let answer = rt.block_on(async {
            let gate = route.gate(&prober).await?;
            let body = http_body_util::Full::new(Bytes::from(body.to_string()));
            route
                .admit(&prober, "/v1/chat/completions", body, gate)
                .await
        });
        let Err(refused) = answer else {
            panic!("a request over the logit_bias cap was admitted")
        };
        if warned.is_none() {
            warned = warning(&refused).map(|w| (i, w));
        }
    }
    // Never admitted once, and still seen: the sweep is flagged, and each
    // refusal says so.
    let (at, step) = warned.expect("refused probes were never shown to the detector");
    assert!(at < 20, "flagged after {at} refused probes");
    assert!(route.detector.as_ref().unwrap().step(prober.as_str()) >= Step::Refuse);
    assert_ne!(step, "normal");
    // An honest caller's refusal carries nothing.
    let honest = SpiffeId::parse("spiffe://example.org/ns/shop/sa/web").unwrap();
    let body = r#"{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 1, "2": 1, "3": 1}}"#;
    let refused = rt
        .block_on(async {
            let gate = route.gate(&honest).await?;
            let body = http_body_util::Full::new(Bytes::from(body));
            route
                .admit(&honest, "/v1/chat/completions", body, gate)
                .await
        })
        .err()
        .unwrap();
    assert_eq!(refused.status(), 400);
    assert_eq!(warning(&refused), None);
}
