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
