//! The in-process store at fixed instants.

use super::super::{Level, Unit};
use super::*;
use warden_config::SpiffeId;
use warden_config::model::{LimitSet, Limits};

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

const T0: u64 = 1_800_000_000_000_000 + 30_000_000 * 60; // a minute boundary, plus 0

#[test]
fn gcra_allows_the_burst_then_the_rate() {
    let p = plan(
        LimitSet {
            requests_per_second: Some(10.0),
            burst: 3,
            ..LimitSet::default()
        },
        LimitSet::default(),
    );
    let s = LocalStore::default();
    let a = who("spiffe://td/ns/a/sa/x");
    for _ in 0..3 {
        s.admit(&p, &a, &Ask::default(), T0).unwrap();
    }
    let d = s.admit(&p, &a, &Ask::default(), T0).unwrap_err();
    assert_eq!(d.retry_after_s, 1);
    // 100 ms later one more request is allowed, and only one.
    s.admit(&p, &a, &Ask::default(), T0 + 100_000).unwrap();
    assert!(s.admit(&p, &a, &Ask::default(), T0 + 100_000).is_err());
    // Another caller has its own bucket.
    s.admit(&p, &who("spiffe://td/ns/a/sa/y"), &Ask::default(), T0)
        .unwrap();
}

#[test]
fn reservations_never_overshoot_and_refunds_come_back() {
    let p = plan(
        LimitSet {
            tokens_per_minute: Some(1000),
            ..LimitSet::default()
        },
        LimitSet::default(),
    );
    let s = LocalStore::default();
    let a = who("spiffe://td/ns/a/sa/x");
    let ask = Ask {
        tokens: 300,
        ..Ask::default()
    };
    let holds: Vec<_> = (0..10)
        .filter_map(|_| s.admit(&p, &a, &ask, T0).ok())
        .collect();
    assert_eq!(holds.len(), 3, "3 x 300 fit in 1000, a fourth does not");
    // Each used only 100: 600 come back, so two more fit.
    for h in &holds {
        s.settle(
            &p,
            h,
            &Ask {
                tokens: 100,
                ..Ask::default()
            },
            T0 + 1,
        );
    }
    assert!(s.admit(&p, &a, &ask, T0 + 2).is_ok());
    assert!(s.admit(&p, &a, &ask, T0 + 3).is_ok());
    let d = s.admit(&p, &a, &ask, T0 + 4).unwrap_err();
    // 900 counted now: the ask fits once 2/9 of the next minute has passed.
    assert_eq!(d.retry_after_s, 74, "{d:?}");
}

#[test]
fn the_aggregate_level_binds_many_identities() {
    let p = plan(
        LimitSet {
            tokens_per_minute: Some(1000),
            ..LimitSet::default()
        },
        LimitSet {
            tokens_per_minute: Some(1500),
            ..LimitSet::default()
        },
    );
    let s = LocalStore::default();
    let ask = Ask {
        tokens: 500,
        ..Ask::default()
    };
    let mut admitted = 0;
    for n in 0..10 {
        if s.admit(&p, &who(&format!("spiffe://td/ns/a/sa/w{n}")), &ask, T0)
            .is_ok()
        {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 3);
    // A refused request charged nothing anywhere: another namespace is untouched.
    let d = s
        .admit(&p, &who("spiffe://td/ns/a/sa/w0"), &ask, T0)
        .unwrap_err();
    assert_eq!(p.quotas[d.quota].level, Level::Namespace);
    assert!(
        s.admit(&p, &who("spiffe://td/ns/b/sa/w0"), &ask, T0)
            .is_ok()
    );
}

#[test]
fn a_sliding_window_forgets_gradually() {
    let p = plan(
        LimitSet {
            tokens_per_minute: Some(100),
            ..LimitSet::default()
        },
        LimitSet::default(),
    );
    let s = LocalStore::default();
    let a = who("spiffe://td/ns/a/sa/x");
    let ask = |n| Ask {
        tokens: n,
        ..Ask::default()
    };
    s.admit(&p, &a, &ask(100), T0).unwrap();
    // Half-way through the next minute, half of the last one still counts.
    let half = T0 + 90_000_000;
    assert!(s.admit(&p, &a, &ask(51), half).is_err());
    assert!(s.admit(&p, &a, &ask(50), half).is_ok());
    // An ask larger than the whole quota can never fit.
    let d = s.admit(&p, &a, &ask(101), half).unwrap_err();
    assert_eq!(d.retry_after_s, 60);
    assert_eq!(
        p.quotas[0].kind,
        Kind::Window {
            unit: Unit::Tokens,
            window_ms: 60_000,
            limit: 100
        }
    );
}

#[test]
fn concurrency_slots_are_released_at_settle() {
    let p = plan(
        LimitSet {
            concurrent: Some(2),
            ..LimitSet::default()
        },
        LimitSet::default(),
    );
    let s = LocalStore::default();
    let a = who("spiffe://td/ns/a/sa/x");
    let h1 = s.admit(&p, &a, &Ask::default(), T0).unwrap();
    let _h2 = s.admit(&p, &a, &Ask::default(), T0).unwrap();
    assert!(s.admit(&p, &a, &Ask::default(), T0).is_err());
    s.settle(&p, &h1, &Ask::default(), T0);
    assert!(s.admit(&p, &a, &Ask::default(), T0).is_ok());
}

#[test]
fn the_map_stays_bounded() {
    let p = plan(
        LimitSet {
            requests_per_second: Some(1.0),
            tokens_per_day: Some(10),
            ..LimitSet::default()
        },
        LimitSet::default(),
    );
    let s = LocalStore::new(1000);
    for n in 0..20_000u64 {
        let ask = Ask {
            tokens: 1,
            ..Ask::default()
        };
        let _ = s.admit(&p, &who(&format!("spiffe://td/w{n}")), &ask, T0 + n);
        assert!(s.len() <= 1000, "{} keys", s.len());
    }
}

#[test]
fn a_held_slot_is_never_evicted() {
    let p = plan(
        LimitSet {
            requests_per_second: Some(1000.0),
            concurrent: Some(1),
            ..LimitSet::default()
        },
        LimitSet::default(),
    );
    let s = LocalStore::new(16);
    let a = who("spiffe://td/a");
    let hold = s.admit(&p, &a, &Ask::default(), T0).unwrap();
    // A crowd of callers passes through the full store ...
    for n in 0..1000u64 {
        let h = s
            .admit(
                &p,
                &who(&format!("spiffe://td/w{n}")),
                &Ask::default(),
                T0 + n,
            )
            .unwrap();
        s.settle(&p, &h, &Ask::default(), T0 + n);
        assert!(s.len() <= 17, "{} keys", s.len());
    }
    // ... and the slot a holds is still counted, until it is released.
    assert!(s.admit(&p, &a, &Ask::default(), T0 + 2000).is_err());
    s.settle(&p, &hold, &Ask::default(), T0 + 2000);
    assert!(s.admit(&p, &a, &Ask::default(), T0 + 2000).is_ok());
}

#[test]
fn idle_state_is_dropped_before_live_state() {
    let p = plan(
        LimitSet {
            tokens_per_day: Some(1000),
            ..LimitSet::default()
        },
        LimitSet::default(),
    );
    let s = LocalStore::new(16);
    let ask = |n| Ask {
        tokens: n,
        ..Ask::default()
    };
    // One caller with tokens counted, then callers whose reservations
    // are all refunded (their state is as good as none).
    let heavy = who("spiffe://td/heavy");
    s.admit(&p, &heavy, &ask(900), T0).unwrap();
    for n in 0..100u64 {
        let w = who(&format!("spiffe://td/w{n}"));
        let h = s.admit(&p, &w, &ask(10), T0).unwrap();
        s.settle(&p, &h, &ask(0), T0);
    }
    // The heavy caller's count is still there.
    assert!(s.admit(&p, &heavy, &ask(200), T0).is_err());
}
