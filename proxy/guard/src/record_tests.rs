//! Recording volumes and proposing limits from them.

use super::*;

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn tokens(n: u64) -> Ask {
    Ask {
        tokens: n,
        ..Ask::default()
    }
}

/// 2026-12-01 at `h:m` UTC.
fn at(h: u64, m: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(20_788 * 86_400 + h * 3600 + m * 60)
}

#[test]
fn days_and_busiest_minutes_are_kept_per_caller_and_namespace() {
    let mut b = Book::default();
    let (a, c) = (
        id("spiffe://td/ns/shop/sa/a"),
        id("spiffe://td/ns/shop/sa/c"),
    );
    // Ten requests in one minute, then one in the next.
    for _ in 0..10 {
        b.add(&a, 1, &tokens(100), at(9, 0));
    }
    b.add(&a, 1, &tokens(5000), at(9, 1));
    b.add(&c, 1, &tokens(7), at(23, 59));
    let day = &b.callers["spiffe://td/ns/shop/sa/a"][0];
    assert_eq!(day.day, 20_788);
    assert_eq!((day.requests, day.tokens), (11, 6000));
    assert_eq!(
        (day.peak_requests_per_minute, day.peak_tokens_per_minute),
        (10, 5000)
    );
    // The namespace adds its callers up.
    let ns = &b.namespaces["spiffe://td/ns/shop"][0];
    assert_eq!((ns.requests, ns.tokens), (12, 6007));
    // A new day is a new entry; at most MAX_DAYS are kept.
    for d in 1..=20 {
        b.add(&a, 1, &tokens(1), at(24 * d, 0));
    }
    assert_eq!(b.callers["spiffe://td/ns/shop/sa/a"].len(), MAX_DAYS);
}

#[test]
fn callers_past_the_bound_are_counted_not_kept() {
    let mut b = Book::default();
    for i in 0..MAX_SUBJECTS + 10 {
        b.add(
            &id(&format!("spiffe://td/ns/n{i}/sa/x")),
            1,
            &tokens(1),
            at(1, 0),
        );
    }
    assert_eq!(b.callers.len(), MAX_SUBJECTS);
    assert_eq!(b.namespaces.len(), MAX_SUBJECTS);
    assert_eq!(b.unrecorded, 20);
}

#[test]
fn limits_are_proposed_from_the_heaviest_with_the_evidence() {
    let mut b = Book {
        route: "chat".into(),
        ..Book::default()
    };
    let heavy = id("spiffe://td/ns/ml/sa/trainer");
    let light = id("spiffe://td/ns/web/sa/front");
    for m in 0..30 {
        b.add(&heavy, 1, &tokens(1000), at(10, m));
    }
    b.add(&light, 1, &tokens(10), at(11, 0));
    let yaml = propose(&[b.clone(), b], 2.0);
    // Two proxies' files of one route add up: 60 requests of 1000 tokens.
    assert!(
        yaml.starts_with("# route chat: 2 callers, 2 namespaces over 1 days; 2x the heaviest"),
        "{yaml}"
    );
    assert!(
        yaml.contains(
            "tokens_per_day: 120000  # 2x 60000: spiffe://td/ns/ml/sa/trainer on 2026-12-01"
        ),
        "{yaml}"
    );
    assert!(
        yaml.contains("tokens_per_minute: 4000  # 2x 2000"),
        "{yaml}"
    );
    // Two requests in its busiest minute (one per proxy), twice, per second.
    assert!(
        yaml.contains("requests_per_second: 0.067  # 2x 2 in a minute"),
        "{yaml}"
    );
    assert!(yaml.contains("    namespace:\n"), "{yaml}");
    assert!(
        !yaml.contains("vectors_per_day"),
        "nothing seen, nothing proposed: {yaml}"
    );
    // The proposal is a config the route accepts.
    let cfg = format!(
        "identity: {{cert: c, key: k, bundle: b}}\nadmin: 127.0.0.1:1\ninbound:\n  - name: m\n    listen: 127.0.0.1:2\n    app: 127.0.0.1:3\n    model_api:\n{}",
        yaml.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                if l.starts_with("- name") {
                    format!("      {l}\n        paths: [/v1/*]\n        api: openai\n")
                } else {
                    format!("      {l}\n")
                }
            })
            .collect::<String>()
    );
    warden_config::ProxyConfig::parse(Path::new("p.yaml"), &cfg)
        .unwrap_or_else(|e| panic!("{e}\n{cfg}"));
}

#[test]
fn a_recording_survives_a_restart() {
    let dir = std::env::temp_dir().join(format!("warden-record-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("chat.json");
    let r = Recorder::new("chat", &file);
    r.record(&id("spiffe://td/ns/a/sa/b"), 1, &tokens(42));
    r.flush().unwrap();
    let again = Recorder::new("chat", &file);
    again.record(&id("spiffe://td/ns/a/sa/b"), 1, &tokens(8));
    let b = again.book.lock().unwrap().clone();
    assert_eq!(b.callers["spiffe://td/ns/a/sa/b"][0].tokens, 50);
    // Another route's file is not continued.
    let other = Recorder::new("embed", &file);
    assert!(other.book.lock().unwrap().callers.is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn max_coverage_is_proposed_from_the_widest_caller_in_breadth() {
    let mut b = Book {
        route: "embed".into(),
        ..Book::default()
    };
    let (wide, narrow) = (
        id("spiffe://td/ns/search/sa/indexer"),
        id("spiffe://td/ns/web/sa/front"),
    );
    for (who, share) in [(&wide, 0.30), (&narrow, 0.02)] {
        b.add(who, 1, &Ask::default(), at(10, 0));
        b.cover(who, share, at(10, 1));
        // A share is the caller's widest that day, never a sum.
        b.cover(who, share / 2.0, at(10, 2));
    }
    let out = propose(std::slice::from_ref(&b), 2.0);
    assert!(
        out.contains(
            "  detection:\n    max_coverage: 0.510  # 2x the breadth of 0.300 of the embedding space: spiffe://td/ns/search/sa/indexer on 2026-12-01"
        ),
        "{out}"
    );
    // Shares saturate: five times the breadth is not the whole space.
    assert!(propose(&[b], 5.0).contains("max_coverage: 0.832"));
    // A caller not recorded that day is not covered (nothing to size from).
    let mut empty = Book::default();
    empty.cover(&wide, 0.5, at(10, 0));
    assert!(empty.callers.is_empty());
}
