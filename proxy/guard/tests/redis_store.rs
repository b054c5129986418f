#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The Redis limit store against a real `redis-server`, one per test, on a
//! free loopback port. Without `redis-server` installed these tests print a
//! notice and pass, except under CI (`CI=true`), where they fail.
//!
//! Tests on the server's clock check counts and bounds, never an instant;
//! tests that need exact instants pass their own clock (`admit_at`) and
//! compare with the in-process store.

use std::sync::Arc;
use std::time::{Duration, Instant};

#[macro_use]
#[path = "../../../tests/common/redis.rs"]
mod redis_server;
use redis_server::{RedisServer, free_port};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use warden_config::SpiffeId;
use warden_config::model::{LimitSet, Limits};
use warden_guard::limits::local::LocalStore;
use warden_guard::limits::redis::{RedisStore, SLOT_LEASE_MS};
use warden_guard::limits::{Ask, Hold, Level, Plan, Store, Subjects, now_us};

fn who(id: &str) -> Subjects {
    Subjects::of(&SpiffeId::parse(id).unwrap())
}

fn plan(identity: LimitSet, namespace: LimitSet) -> Plan {
    Plan::new(
        "r",
        &Limits {
            identity,
            namespace,
            ..Limits::default()
        },
    )
}

fn tokens(n: u64) -> Ask {
    Ask {
        tokens: n,
        ..Ask::default()
    }
}

async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// A day boundary one to two days ahead: for tests that pass their own
/// clock, so the keys' absolute expiry stays in the server's future.
fn day_ahead() -> u64 {
    const DAY_US: u64 = 86_400_000_000;
    (now_us() / DAY_US + 2) * DAY_US
}

#[tokio::test]
async fn gcra_allows_the_burst_then_the_rate() {
    let server = redis_or_skip!();
    let s = RedisStore::connect(&server.url()).await.unwrap();
    let p = plan(
        LimitSet {
            requests_per_second: Some(1.0),
            burst: 2,
            ..LimitSet::default()
        },
        LimitSet::default(),
    );
    let a = who("spiffe://td/ns/a/sa/x");
    for _ in 0..2 {
        s.admit(&p, &a, &Ask::default()).await.unwrap().unwrap();
    }
    let d = s.admit(&p, &a, &Ask::default()).await.unwrap().unwrap_err();
    assert_eq!(d.retry_after_s, 1, "{d:?}");
    // Over a second later one more request is allowed, and only one.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    s.admit(&p, &a, &Ask::default()).await.unwrap().unwrap();
    assert!(s.admit(&p, &a, &Ask::default()).await.unwrap().is_err());
    // Another caller has its own bucket.
    s.admit(&p, &who("spiffe://td/ns/a/sa/y"), &Ask::default())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn reservations_never_overshoot_and_refunds_come_back() {
    let server = redis_or_skip!();
    let s = RedisStore::connect(&server.url()).await.unwrap();
    // A day window: no boundary to cross while the test runs.
    let p = plan(
        LimitSet {
            tokens_per_day: Some(1000),
            ..LimitSet::default()
        },
        LimitSet::default(),
    );
    let a = who("spiffe://td/ns/a/sa/x");
    let mut holds = Vec::new();
    for _ in 0..10 {
        if let Ok(h) = s.admit(&p, &a, &tokens(300)).await.unwrap() {
            holds.push(h);
        }
    }
    assert_eq!(holds.len(), 3, "3 x 300 fit in 1000, a fourth does not");
    let h = &holds[2];
    assert_eq!(h.reservations.len(), 1);
    assert_eq!(h.reservations[0].amount, 300);
    assert_eq!(h.headroom.unwrap().remaining, 100);
    // Each used only 100: 600 come back, so two more fit.
    for h in &holds {
        s.settle(&p, h, &tokens(100)).await.unwrap();
    }
    s.admit(&p, &a, &tokens(300)).await.unwrap().unwrap();
    s.admit(&p, &a, &tokens(300)).await.unwrap().unwrap();
    let d = s.admit(&p, &a, &tokens(300)).await.unwrap().unwrap_err();
    assert!((1..=86_400 * 2).contains(&d.retry_after_s), "{d:?}");
}

#[tokio::test]
async fn the_aggregate_level_binds_many_identities() {
    let server = redis_or_skip!();
    let s = RedisStore::connect(&server.url()).await.unwrap();
    let p = plan(
        LimitSet {
            tokens_per_day: Some(1000),
            ..LimitSet::default()
        },
        LimitSet {
            tokens_per_day: Some(1500),
            ..LimitSet::default()
        },
    );
    let mut admitted = 0;
    for n in 0..10 {
        let w = who(&format!("spiffe://td/ns/a/sa/w{n}"));
        if s.admit(&p, &w, &tokens(500)).await.unwrap().is_ok() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 3);
    let d = s
        .admit(&p, &who("spiffe://td/ns/a/sa/w0"), &tokens(500))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(p.quotas[d.quota].level, Level::Namespace);
    // The refused identities were charged nothing at their own level.
    let mut conn = raw(&server).await;
    let key = "warden:r|identity-tokens-per-day|spiffe://td/ns/a/sa/w5";
    let exists: bool = redis::cmd("EXISTS")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!exists, "a refused request charged {key}");
    // Another namespace is untouched.
    s.admit(&p, &who("spiffe://td/ns/b/sa/w0"), &tokens(500))
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_refusal_charges_nothing_anywhere() {
    let server = redis_or_skip!();
    let s = RedisStore::connect(&server.url()).await.unwrap();
    // One request per 100 s, and 100 tokens a day.
    let p = plan(
        LimitSet {
            requests_per_second: Some(0.01),
            burst: 1,
            tokens_per_day: Some(100),
            ..LimitSet::default()
        },
        LimitSet::default(),
    );
    let a = who("spiffe://td/ns/a/sa/x");
    // Too many tokens: refused by the window, for the window's length ...
    let d = s.admit(&p, &a, &tokens(200)).await.unwrap().unwrap_err();
    assert_eq!(p.quotas[d.quota].name, "identity-tokens-per-day");
    assert_eq!(d.retry_after_s, 86_400);
    // ... and the rate's only request is still there.
    s.admit(&p, &a, &tokens(50)).await.unwrap().unwrap();
    let d = s.admit(&p, &a, &tokens(50)).await.unwrap().unwrap_err();
    assert_eq!(p.quotas[d.quota].name, "identity-requests");
    assert!((1..=100).contains(&d.retry_after_s), "{d:?}");
}

#[tokio::test]
async fn concurrency_slots_are_released_at_settle() {
    let server = redis_or_skip!();
    let s = RedisStore::connect(&server.url()).await.unwrap();
    let p = plan(
        LimitSet {
            concurrent: Some(2),
            ..LimitSet::default()
        },
        LimitSet::default(),
    );
    let a = who("spiffe://td/ns/a/sa/x");
    let h1 = s.admit(&p, &a, &Ask::default()).await.unwrap().unwrap();
    let h2 = s.admit(&p, &a, &Ask::default()).await.unwrap().unwrap();
    assert_ne!(h1.slots[0].2, h2.slots[0].2, "slot ids are random");
    assert!(s.admit(&p, &a, &Ask::default()).await.unwrap().is_err());
    s.settle(&p, &h1, &Ask::default()).await.unwrap();
    // Settling twice frees nobody else's slot.
    s.settle(&p, &h1, &Ask::default()).await.unwrap();
    s.admit(&p, &a, &Ask::default()).await.unwrap().unwrap();
    assert!(s.admit(&p, &a, &Ask::default()).await.unwrap().is_err());
}

#[tokio::test]
async fn a_slot_never_settled_comes_back_when_its_lease_ends() {
    let server = redis_or_skip!();
    let s = RedisStore::connect(&server.url()).await.unwrap();
    let p = plan(
        LimitSet {
            concurrent: Some(1),
            ..LimitSet::default()
        },
        LimitSet::default(),
    );
    let a = who("spiffe://td/ns/a/sa/x");
    let t0 = day_ahead();
    // A proxy admits and dies before it settles.
    s.admit_at(&p, &a, &Ask::default(), t0)
        .await
        .unwrap()
        .unwrap();
    let lease_us = SLOT_LEASE_MS * 1000;
    assert!(
        s.admit_at(&p, &a, &Ask::default(), t0 + lease_us - 1000)
            .await
            .unwrap()
            .is_err()
    );
    s.admit_at(&p, &a, &Ask::default(), t0 + lease_us)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn every_key_expires() {
    let server = redis_or_skip!();
    let s = RedisStore::connect(&server.url()).await.unwrap();
    let p = plan(
        LimitSet {
            requests_per_second: Some(1.0),
            burst: 5,
            tokens_per_minute: Some(1000),
            tokens_per_day: Some(10_000),
            concurrent: Some(3),
            ..LimitSet::default()
        },
        LimitSet::default(),
    );
    let a = who("spiffe://td/ns/a/sa/x");
    s.admit(&p, &a, &tokens(10)).await.unwrap().unwrap();
    let mut conn = raw(&server).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 4, "{keys:?}");
    for key in keys {
        assert!(key.starts_with("warden:r|identity-"), "{key}");
        let ttl_ms: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let most = if key.contains("per-day") {
            2 * 86_400_000
        } else if key.contains("per-minute") {
            120_000
        } else if key.contains("concurrent") {
            i64::try_from(SLOT_LEASE_MS).unwrap()
        } else {
            5_000
        };
        assert!(ttl_ms > 0 && ttl_ms <= most, "{key}: {ttl_ms} ms");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_never_overshoot_a_budget_with_64_concurrent_requests() {
    let server = redis_or_skip!();
    let stores = [
        RedisStore::connect(&server.url()).await.unwrap(),
        RedisStore::connect(&server.url()).await.unwrap(),
    ];
    const BUDGET: u64 = 10_000;
    const RESERVED: u64 = 300;
    // A namespace budget shared by 8 identities behind 2 proxies.
    let p = Arc::new(plan(
        LimitSet::default(),
        LimitSet {
            tokens_per_day: Some(BUDGET),
            ..LimitSet::default()
        },
    ));
    let round = |stores: [RedisStore; 2]| {
        let p = p.clone();
        async move {
            let barrier = Arc::new(tokio::sync::Barrier::new(64));
            let mut tasks = Vec::new();
            for i in 0..64 {
                let (s, p, barrier) = (stores[i % 2].clone(), p.clone(), barrier.clone());
                tasks.push(tokio::spawn(async move {
                    let w = who(&format!("spiffe://td/ns/a/sa/w{}", i % 8));
                    barrier.wait().await;
                    (i % 2, s.admit(&p, &w, &tokens(RESERVED)).await.unwrap())
                }));
            }
            let mut holds = Vec::new();
            for t in tasks {
                match t.await.unwrap() {
                    (proxy, Ok(h)) => holds.push((proxy, h)),
                    (_, Err(d)) => assert_eq!(p.quotas[d.quota].level, Level::Namespace),
                }
            }
            holds
        }
    };
    let holds = round(stores.clone()).await;
    let admitted = u64::try_from(holds.len()).unwrap();
    assert!(admitted * RESERVED <= BUDGET);
    assert_eq!(admitted, BUDGET / RESERVED, "every reservation that fits");
    assert!(
        holds.iter().any(|(proxy, _)| *proxy == 0) && holds.iter().any(|(proxy, _)| *proxy == 1)
    );
    // Proxy 0 settles every request at 100 tokens; proxy 1 sees the refund.
    for (_, h) in &holds {
        stores[0].settle(&p, h, &tokens(100)).await.unwrap();
    }
    let counted = admitted * 100;
    let mut more = 0;
    let w = who("spiffe://td/ns/a/sa/w0");
    while stores[1]
        .admit(&p, &w, &tokens(RESERVED))
        .await
        .unwrap()
        .is_ok()
    {
        more += 1;
    }
    assert_eq!(more, (BUDGET - counted) / RESERVED);
    // And once full, 64 more concurrent requests get nothing.
    assert!(round(stores.clone()).await.is_empty());
}

#[tokio::test]
async fn a_dead_redis_answers_an_error_quickly() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let s = RedisStore::new(&url).unwrap();
    let p = plan(
        LimitSet {
            tokens_per_day: Some(10),
            ..LimitSet::default()
        },
        LimitSet::default(),
    );
    let a = who("spiffe://td/ns/a/sa/x");
    for _ in 0..3 {
        let start = Instant::now();
        let e = s.admit(&p, &a, &tokens(1)).await.unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(1), "{e}");
    }
    assert!(RedisStore::connect(&url).await.is_err());
}

#[tokio::test]
async fn a_silent_redis_answers_an_error_quickly() {
    // Accepts connections and never answers, like a stalled server.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            open.push(sock);
        }
    });
    let s = RedisStore::new(&url).unwrap();
    let p = plan(
        LimitSet {
            concurrent: Some(1),
            ..LimitSet::default()
        },
        LimitSet::default(),
    );
    let a = who("spiffe://td/ns/a/sa/x");
    for _ in 0..3 {
        let start = Instant::now();
        let e = s.admit(&p, &a, &Ask::default()).await.unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(1), "{e}");
    }
    held.abort();
}

#[tokio::test]
async fn the_store_reconnects_when_redis_comes_back() {
    let mut server = redis_or_skip!();
    let s = RedisStore::connect(&server.url()).await.unwrap();
    let p = plan(
        LimitSet {
            tokens_per_day: Some(1000),
            ..LimitSet::default()
        },
        LimitSet::default(),
    );
    let a = who("spiffe://td/ns/a/sa/x");
    s.admit(&p, &a, &tokens(1)).await.unwrap().unwrap();
    let port = server.port;
    server.stop();
    assert!(s.admit(&p, &a, &tokens(1)).await.is_err());
    let _server = RedisServer::start_on(port, &[])
        .unwrap()
        .expect("redis-server restarts on its port");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match s.admit(&p, &a, &tokens(1)).await {
            Ok(r) => {
                r.unwrap();
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "still failing: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_unix_socket_url_works() {
    let sock = std::env::temp_dir().join(format!("warden-redis-{}.sock", std::process::id()));
    let sock = sock.to_str().unwrap().to_owned();
    let _server = match RedisServer::start_with(&["--unixsocket", &sock]) {
        Some(server) => server,
        None => return,
    };
    let s = RedisStore::connect(&format!("unix://{sock}"))
        .await
        .unwrap();
    let p = plan(
        LimitSet {
            concurrent: Some(1),
            ..LimitSet::default()
        },
        LimitSet::default(),
    );
    let a = who("spiffe://td/ns/a/sa/x");
    let h = s.admit(&p, &a, &Ask::default()).await.unwrap().unwrap();
    assert!(s.admit(&p, &a, &Ask::default()).await.unwrap().is_err());
    s.settle(&p, &h, &Ask::default()).await.unwrap();
    let _ = std::fs::remove_file(&sock);
}

#[tokio::test]
async fn the_store_enum_dispatches_to_redis() {
    let server = redis_or_skip!();
    let store = Store::Redis(RedisStore::connect(&server.url()).await.unwrap());
    let p = plan(
        LimitSet {
            tokens_per_day: Some(100),
            ..LimitSet::default()
        },
        LimitSet::default(),
    );
    let a = who("spiffe://td/ns/a/sa/x");
    let h = store.admit(&p, &a, &tokens(100)).await.unwrap().unwrap();
    assert!(store.admit(&p, &a, &tokens(1)).await.unwrap().is_err());
    store.settle(&p, &h, &tokens(50)).await.unwrap();
    store.admit(&p, &a, &tokens(50)).await.unwrap().unwrap();
}

#[tokio::test]
async fn the_local_store_figures_hold_at_fixed_instants() {
    let server = redis_or_skip!();
    let s = RedisStore::connect(&server.url()).await.unwrap();
    let t0 = day_ahead();
    let a = who("spiffe://td/ns/a/sa/x");
    // The rate: one per 10 s, 3 at once (a slow rate, so that its key
    // outlives any stall of the test).
    let p = plan(
        LimitSet {
            requests_per_second: Some(0.1),
            burst: 3,
            ..LimitSet::default()
        },
        LimitSet::default(),
    );
    for _ in 0..3 {
        s.admit_at(&p, &a, &Ask::default(), t0)
            .await
            .unwrap()
            .unwrap();
    }
    let d = s
        .admit_at(&p, &a, &Ask::default(), t0)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(d.retry_after_s, 10);
    // 10 s later one more request is allowed, and only one.
    s.admit_at(&p, &a, &Ask::default(), t0 + 10_000_000)
        .await
        .unwrap()
        .unwrap();
    assert!(
        s.admit_at(&p, &a, &Ask::default(), t0 + 10_000_000)
            .await
            .unwrap()
            .is_err()
    );
    // 900 counted: a refused 300 fits once 2/9 of the next minute has passed.
    let p = plan(
        LimitSet {
            tokens_per_minute: Some(1000),
            ..LimitSet::default()
        },
        LimitSet::default(),
    );
    let holds: Vec<Hold> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(s.admit_at(&p, &a, &tokens(300), t0).await.unwrap().unwrap());
        }
        v
    };
    for h in &holds {
        s.settle_at(&p, h, &tokens(100), t0 + 1).await.unwrap();
    }
    s.admit_at(&p, &a, &tokens(300), t0 + 2)
        .await
        .unwrap()
        .unwrap();
    s.admit_at(&p, &a, &tokens(300), t0 + 3)
        .await
        .unwrap()
        .unwrap();
    let d = s
        .admit_at(&p, &a, &tokens(300), t0 + 4)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(d.retry_after_s, 74, "{d:?}");
    // A sliding window forgets gradually: half-way through the next
    // minute, half of the last one still counts.
    let b = who("spiffe://td/ns/a/sa/y");
    let p = plan(
        LimitSet {
            tokens_per_minute: Some(100),
            ..LimitSet::default()
        },
        LimitSet::default(),
    );
    s.admit_at(&p, &b, &tokens(100), t0).await.unwrap().unwrap();
    let half = t0 + 90_000_000;
    assert!(
        s.admit_at(&p, &b, &tokens(51), half)
            .await
            .unwrap()
            .is_err()
    );
    s.admit_at(&p, &b, &tokens(50), half)
        .await
        .unwrap()
        .unwrap();
    let d = s
        .admit_at(&p, &b, &tokens(101), half)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(d.retry_after_s, 60);
}

/// What a run against the local store did.
#[derive(Debug, Default)]
struct Tally {
    admitted: u32,
    refused: std::collections::BTreeMap<String, u32>,
    settled_over: u32,
    settled_under: u32,
}

/// Two routes: token windows and slots at every level; rates.
fn mixed_plans(scale: u64, rps: f64) -> [Plan; 2] {
    let chat = Plan::new(
        "chat",
        &Limits {
            identity: LimitSet {
                tokens_per_minute: Some(2000 * scale),
                tokens_per_day: Some(8000 * scale),
                logprob_tokens_per_day: Some(1500 * scale),
                concurrent: Some(2),
                ..LimitSet::default()
            },
            namespace: LimitSet {
                tokens_per_minute: Some(3000 * scale),
                concurrent: Some(3),
                ..LimitSet::default()
            },
            trust_domain: LimitSet {
                vectors_per_day: Some(300 * scale),
                ..LimitSet::default()
            },
        },
    );
    let rated = Plan::new(
        "rated",
        &Limits {
            identity: LimitSet {
                requests_per_second: Some(rps),
                burst: 4,
                ..LimitSet::default()
            },
            namespace: LimitSet {
                requests_per_second: Some(rps * 1.5),
                burst: 5,
                tokens_per_minute: Some(2500 * scale),
                ..LimitSet::default()
            },
            ..Limits::default()
        },
    );
    [chat, rated]
}

/// Runs the same seeded random admissions and settlements through both
/// stores at the same instants, asserting every decision and hold equal.
/// Amounts are multiplied by `scale`.
async fn compare_with_local(redis: &RedisStore, plans: &[Plan], scale: u64, seed: u64) -> Tally {
    let local = LocalStore::default();
    let callers = [
        who("spiffe://td/ns/a/sa/x"),
        who("spiffe://td/ns/a/sa/y"),
        who("spiffe://td/ns/b/sa/z"),
        who("spiffe://td/web"),
    ];
    let mut rng = StdRng::seed_from_u64(seed);
    let mut now = day_ahead() - 3_600_000_000;
    // (admitted at, plan, local hold, redis hold)
    let mut open: Vec<(u64, &Plan, Hold, Hold)> = Vec::new();
    let mut tally = Tally::default();
    for step in 0..1500 {
        now += match rng.random_range(0..100) {
            0..75 => rng.random_range(0..300_000),
            75..97 => rng.random_range(300_000..5_000_000),
            _ => rng.random_range(30_000_000..10_800_000_000),
        };
        // Settle before the slot lease could end: the local store has none.
        let mut i = 0;
        while i < open.len() {
            if now - open[i].0 > SLOT_LEASE_MS / 2 * 1000 {
                let (_, p, l, r) = open.swap_remove(i);
                local.settle(p, &l, &Ask::default(), now);
                redis.settle_at(p, &r, &Ask::default(), now).await.unwrap();
            } else {
                i += 1;
            }
        }
        if open.is_empty() || rng.random_bool(0.6) {
            let p = &plans[rng.random_range(0..plans.len())];
            let caller = &callers[rng.random_range(0..callers.len())];
            let ask = Ask {
                tokens: rng.random_range(0..900 * scale),
                logprob_tokens: rng.random_range(0..200 * scale),
                logit_bias: 0,
                vectors: rng.random_range(0..12 * scale),
            };
            let l = local.admit(p, caller, &ask, now);
            let r = redis.admit_at(p, caller, &ask, now).await.unwrap();
            match (l, r) {
                (Ok(l), Ok(r)) => {
                    assert_eq!(l.reservations, r.reservations, "step {step}");
                    assert_eq!(l.headroom, r.headroom, "step {step}");
                    let slots = |h: &Hold| {
                        h.slots
                            .iter()
                            .map(|(q, k, _)| (*q, k.clone()))
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(slots(&l), slots(&r), "step {step}");
                    tally.admitted += 1;
                    open.push((now, p, l, r));
                }
                (Err(l), Err(r)) => {
                    assert_eq!(l, r, "step {step}");
                    *tally
                        .refused
                        .entry(p.quotas[l.quota].name.clone())
                        .or_insert(0) += 1;
                }
                (l, r) => panic!("step {step}: local {l:?}, redis {r:?}"),
            }
        } else {
            let (_, p, l, r) = open.swap_remove(rng.random_range(0..open.len()));
            let reserved = l.reservations.first().map(|r| r.amount).unwrap_or(0);
            let used = Ask {
                tokens: rng.random_range(0..1200 * scale),
                logprob_tokens: rng.random_range(0..250 * scale),
                logit_bias: 0,
                vectors: rng.random_range(0..12 * scale),
            };
            if used.tokens > reserved {
                tally.settled_over += 1;
            } else {
                tally.settled_under += 1;
            }
            local.settle(p, &l, &used, now);
            redis.settle_at(p, &r, &used, now).await.unwrap();
        }
    }
    eprintln!("run against the local store, x{scale}: {tally:?}");
    assert!(tally.admitted > 150 && tally.settled_over > 40 && tally.settled_under > 40);
    assert!(
        tally.refused.len() >= 5,
        "most kinds of quota refuse: {:?}",
        tally.refused
    );
    tally
}

/// Every decision and every hold of a seeded random run over two routes,
/// at the same instants, is the in-process store's.
#[tokio::test]
async fn decisions_are_exactly_those_of_the_local_store() {
    let server = redis_or_skip!();
    let redis = RedisStore::connect(&server.url()).await.unwrap();
    // Slow rates: their keys outlive any stall of the test (see PX in admit.lua).
    let tally = compare_with_local(&redis, &mixed_plans(1, 0.2), 1, 7).await;
    assert!(tally.refused.contains_key("identity-requests"));
}

/// The same with amounts near 10^14 and a rate of one request per 28
/// hours, whose products pass 2^53: Lua's doubles must stay exact.
#[tokio::test]
async fn large_amounts_stay_exact() {
    let server = redis_or_skip!();
    let redis = RedisStore::connect(&server.url()).await.unwrap();
    compare_with_local(
        &redis,
        &mixed_plans(100_000_000_000, 1e-5),
        100_000_000_000,
        11,
    )
    .await;
}

#[tokio::test]
async fn one_admission_is_one_round_trip() {
    let server = redis_or_skip!();
    let s = RedisStore::connect(&server.url()).await.unwrap();
    // A typical route: a rate, two token windows and a concurrency cap at
    // the identity, a token window at the namespace.
    let p = plan(
        LimitSet {
            requests_per_second: Some(1e6),
            burst: 1_000_000,
            tokens_per_minute: Some(u64::MAX / 4),
            tokens_per_day: Some(u64::MAX / 4),
            concurrent: Some(1_000_000),
            ..LimitSet::default()
        },
        LimitSet {
            tokens_per_minute: Some(u64::MAX / 4),
            ..LimitSet::default()
        },
    );
    let a = who("spiffe://td/ns/a/sa/x");
    for _ in 0..100 {
        let h = s.admit(&p, &a, &tokens(10)).await.unwrap().unwrap();
        s.settle(&p, &h, &tokens(5)).await.unwrap();
    }
    const N: u32 = 2000;
    let mut holds = Vec::with_capacity(N as usize);
    let start = Instant::now();
    for _ in 0..N {
        holds.push(s.admit(&p, &a, &tokens(10)).await.unwrap().unwrap());
    }
    let admit = start.elapsed() / N;
    let start = Instant::now();
    for h in &holds {
        s.settle(&p, h, &tokens(5)).await.unwrap();
    }
    let settle = start.elapsed() / N;
    eprintln!(
        "redis store, {} quotas: admit {} us, settle {} us (mean of {N}, sequential, loopback)",
        p.quotas.len(),
        admit.as_micros(),
        settle.as_micros()
    );
    // Of which the scripts themselves, on the server:
    let mut conn = raw(&server).await;
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    for line in stats.lines().filter(|l| l.starts_with("cmdstat_evalsha:")) {
        eprintln!("redis server, both scripts: {line}");
    }
}
