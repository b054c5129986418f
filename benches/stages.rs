//! The per-request and per-handshake stages of the data path, one by one:
//! what each costs on its own.
//!
//! `cargo bench --bench stages`

#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmarks fail loudly by design

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use rustls_pki_types::UnixTime;
use time::OffsetDateTime;

use warden_ca::{Authority, CaService, InitOptions};
use warden_config::model::{LimitSet, Limits, ModelApi};
use warden_config::{ProxyConfig, SpiffeId, TrustDomain};
use warden_guard::limits::local::LocalStore;
use warden_guard::limits::{Ask, Plan, Store, Subjects, now_us};
use warden_guard::request::ModelRequest;
use warden_proxy::{authz, headers, normalize};

fn stages(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let td = TrustDomain::parse("bench.test").unwrap();
    let svc = CaService::open(
        Authority::init(
            &tmp.path().join("ca"),
            &td,
            &InitOptions::default(),
            OffsetDateTime::now_utc(),
        )
        .unwrap(),
    )
    .unwrap();
    let id = SpiffeId::parse("spiffe://bench.test/ns/shop/sa/web").unwrap();
    let (issued, _) = svc
        .issue_local(&id, None, "offline", OffsetDateTime::now_utc())
        .unwrap();
    let chain = warden_ca::authority::parse_certs(&issued.svid.chain_pem).unwrap();
    let roots = warden_ca::tls::root_store(&svc.authority.bundle()).unwrap();

    let mut g = c.benchmark_group("handshake");
    g.bench_function("spiffe id parse", |b| {
        b.iter(|| SpiffeId::parse(black_box("spiffe://bench.test/ns/shop/sa/web")).unwrap())
    });
    g.bench_function("peer id from certificate (one URI SAN)", |b| {
        b.iter(|| warden_ca::tls::peer_id(black_box(&chain[0])).unwrap())
    });
    g.bench_function("client chain verification + SPIFFE checks", |b| {
        b.iter(|| {
            warden_ca::tls::verify_client_chain(
                &chain[0],
                &chain[1..],
                &roots,
                &td,
                UnixTime::now(),
            )
            .unwrap()
        })
    });
    g.finish();

    let peer =
        warden_ca::tls::verify_client_chain(&chain[0], &chain[1..], &roots, &td, UnixTime::now())
            .unwrap();
    let rules: String = (0..10)
        .map(|i| format!("        - {{name: r{i}, action: allow, from: [spiffe://bench.test/ns/team{i}/*], methods: [GET, POST], paths: [/api/v{i}/*, /health]}}\n"))
        .chain(std::iter::once("        - {name: shop, action: allow, from: [spiffe://bench.test/ns/shop/*], methods: [GET], paths: [/api/*]}\n        - {name: no-admin, action: deny, from: [spiffe://bench.test/*], paths: [/api/admin/*]}\n".to_owned()))
        .collect();
    let text = format!(
        "identity: {{cert: c, key: k, bundle: b}}\nadmin: 127.0.0.1:1\ninbound:\n  - name: app\n    listen: 127.0.0.1:2\n    app: 127.0.0.1:3\n    policy:\n      rules:\n{rules}"
    );
    let policy = ProxyConfig::parse(Path::new("bench.yaml"), &text)
        .unwrap()
        .inbound
        .remove(0)
        .policy;

    let mut g = c.benchmark_group("request");
    g.bench_function("path normalization (plain)", |b| {
        b.iter(|| normalize::normalize(black_box("/api/v1/orders/12345/items")).unwrap())
    });
    g.bench_function("path normalization (escapes, dots)", |b| {
        b.iter(|| {
            normalize::normalize(black_box("/api/./v1//orders/%61bc/../12345/items")).unwrap()
        })
    });
    g.bench_function("authorization (12 rules)", |b| {
        b.iter(|| {
            let d = authz::decide(
                &policy,
                &peer,
                authz::Request {
                    method: Some("GET"),
                    path: Some(black_box("/api/orders/1")),
                },
            );
            assert!(d.allowed);
        })
    });
    let xfcc = headers::xfcc_value("spiffe://bench.test/ns/shop/sa/app", id.as_str()).unwrap();
    let mut base = HeaderMap::new();
    for (k, v) in [
        ("host", "orders.shop.svc"),
        ("user-agent", "curl/8.0"),
        ("accept", "*/*"),
        ("content-type", "application/json"),
        ("content-length", "42"),
        ("x-request-id", "a1b2c3d4"),
        (
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
        ("x-forwarded-client-cert", "URI=spiffe://evil"),
    ] {
        base.insert(k, HeaderValue::from_static(v));
    }
    g.bench_function("identity header rewrite (8 headers)", |b| {
        b.iter_batched(
            || base.clone(),
            |mut h| headers::set_identity(&mut h, &xfcc),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();

    let mut g = c.benchmark_group("model");
    let per_level = LimitSet {
        requests_per_second: Some(1e6),
        burst: 1_000_000,
        tokens_per_minute: Some(u64::MAX / 4),
        concurrent: Some(1_000_000),
        ..LimitSet::default()
    };
    let limits = Limits {
        identity: per_level,
        namespace: per_level,
        trust_domain: per_level,
    };
    let plan = Plan::new("chat", &limits);
    let store = LocalStore::default();
    let ids: Vec<SpiffeId> = (0..1000)
        .map(|i| {
            SpiffeId::parse(&format!("spiffe://bench.test/ns/team{}/sa/w{i}", i % 10)).unwrap()
        })
        .collect();
    let mut n = 0usize;
    g.bench_function(
        "rate-limit decision: admit + settle, 3 levels x 3 limits",
        |b| {
            b.iter(|| {
                n = (n + 1) % ids.len();
                let who = Subjects::of(&ids[n]);
                let ask = Ask {
                    tokens: 300,
                    ..Ask::default()
                };
                let hold = store.admit(&plan, &who, &ask, now_us()).unwrap();
                store.settle(
                    &plan,
                    &hold,
                    &Ask {
                        tokens: 120,
                        ..Ask::default()
                    },
                    now_us(),
                );
                black_box(hold)
            })
        },
    );
    limits_contention(&mut g, &plan, &ids);
    let body = br#"{"model":"m","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Summarize the attached quarterly report in three bullet points."}],"max_tokens":256,"temperature":0.2}"#;
    g.bench_function("chat request body parse (220 B)", |b| {
        b.iter(|| {
            ModelRequest::parse(
                ModelApi::Openai,
                "/v1/chat/completions",
                black_box(body),
                1024,
            )
            .unwrap()
        })
    });
    g.finish();
}

/// Two routes admitting and settling at once, one thread each: what a
/// lock shared between them costs (each iteration is one admit + settle
/// on each route, in parallel).
fn limits_contention(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    plan: &Plan,
    ids: &[SpiffeId],
) {
    let plans = [
        Plan {
            route: "chat".into(),
            ..plan.clone()
        },
        Plan {
            route: "embed".into(),
            ..plan.clone()
        },
    ];
    let [a, b] = route_stores();
    let own = [std::sync::Arc::new(a), std::sync::Arc::new(b)];
    // For comparison: both routes on one (sharded) store, as a caller of
    // `Store::admit` with the proxy's store would have them.
    let one = std::sync::Arc::new(LocalStore::default());
    for (name, stores) in [
        (
            "limits: 2 routes on 2 threads, admit + settle each, 3 levels x 3 limits",
            own,
        ),
        (
            "limits: 2 routes on 2 threads, one sharded store for both",
            [one.clone(), one],
        ),
    ] {
        contend(g, name, &stores, &plans, ids);
    }

    // A full store, a new caller on every admission: what eviction costs,
    // with the evicted state idle (all refunded) or live (tokens counted).
    for (name, used) in [
        ("limits: admit of a new caller into a full store", 0),
        (
            "limits: admit of a new caller into a store full of live state",
            100,
        ),
    ] {
        let store = LocalStore::new(100_000);
        let mut n = 0u64;
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = std::time::Duration::ZERO;
                for _ in 0..iters {
                    n += 1;
                    let id =
                        SpiffeId::parse(&format!("spiffe://bench.test/ns/t{}/sa/w{n}", n % 64))
                            .unwrap();
                    let who = Subjects::of(&id);
                    let ask = Ask {
                        tokens: 300,
                        ..Ask::default()
                    };
                    let start = std::time::Instant::now();
                    let hold = store.admit(plan, &who, &ask, now_us()).unwrap();
                    let took = start.elapsed();
                    store.settle(
                        plan,
                        &hold,
                        &Ask {
                            tokens: used,
                            ..Ask::default()
                        },
                        now_us(),
                    );
                    total += took;
                    black_box(hold);
                }
                total
            })
        });
    }
}

/// Runs one admit + settle per iteration on each of `stores`, each on its
/// own thread with its own plan.
fn contend(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    stores: &[std::sync::Arc<LocalStore>; 2],
    plans: &[Plan; 2],
    ids: &[SpiffeId],
) {
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let start = std::time::Instant::now();
            std::thread::scope(|s| {
                for (store, plan) in stores.iter().zip(plans) {
                    s.spawn(move || {
                        for i in 0..iters {
                            let who = Subjects::of(&ids[i as usize % ids.len()]);
                            let ask = Ask {
                                tokens: 300,
                                ..Ask::default()
                            };
                            let hold = store.admit(plan, &who, &ask, now_us()).unwrap();
                            store.settle(plan, &hold, &Ask::default(), now_us());
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
}

/// The limit state each of two routes uses, as the proxy gives it to them:
/// a store of its own ([`Store::for_route`]).
fn route_stores() -> [LocalStore; 2] {
    let proxy = Store::Local(LocalStore::default());
    let own = || match proxy.for_route() {
        Store::Local(s) => s,
        Store::Redis(_) => unreachable!("a local store makes local stores"),
    };
    [own(), own()]
}

criterion_group!(benches, stages);
criterion_main!(benches);
