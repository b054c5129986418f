#![allow(clippy::unwrap_used, clippy::expect_used)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

fn gauss(rng: &mut StdRng) -> f64 {
    let u: f64 = rng.random_range(1e-12..1.0);
    let v: f64 = rng.random();
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
}

fn natural(rng: &mut StdRng) -> Vec<f64> {
    let c = f64::from(rng.random_range(0..4u8)) * 3.0;
    (0..16).map(|_| c + gauss(rng)).collect()
}

#[test]
fn step_labels() {
    let labels: Vec<_> = [
        Step::Normal,
        Step::Warn,
        Step::Degrade,
        Step::Refuse,
        Step::Deny,
    ]
    .iter()
    .map(|s| s.label())
    .collect();
    assert_eq!(labels, ["normal", "warn", "degrade", "refuse", "deny"]);
    assert!(Step::Normal < Step::Warn && Step::Refuse < Step::Deny);
}

#[test]
fn ladder_maps_scores_to_steps() {
    let l = Ladder::default();
    assert_eq!(l.step_for(0.0), Step::Normal);
    assert_eq!(l.step_for(l.warn), Step::Warn);
    assert_eq!(l.step_for(l.degrade), Step::Degrade);
    assert_eq!(l.step_for(l.refuse), Step::Refuse);
    assert_eq!(l.step_for(1.0), Step::Deny);
}

#[test]
fn signals_combine_as_independent_evidence() {
    let s = Signals {
        prada: 0.5,
        sweep: 0.5,
        ..Signals::default()
    };
    assert!((s.combined() - 0.75).abs() < 1e-12);
    assert_eq!(Signals::default().combined(), 0.0);
    let nan = Signals {
        prada: f64::NAN,
        ..Signals::default()
    };
    assert_eq!(nan.combined(), 0.0);
}

#[test]
fn natural_feature_traffic_stays_normal() {
    let d = Detector::new(Settings::default());
    let mut rng = StdRng::seed_from_u64(11);
    let mut last = None;
    for _ in 0..2000 {
        let x = natural(&mut rng);
        last = Some(d.observe("spiffe://td/honest", Query::Features(&x)));
    }
    let a = last.unwrap();
    assert_eq!(a.step, Step::Normal, "{a:?}");
}

#[test]
fn perturbation_attack_is_refused_quickly() {
    let d = Detector::new(Settings::default());
    let mut rng = StdRng::seed_from_u64(12);
    let seeds: Vec<Vec<f64>> = (0..10).map(|_| natural(&mut rng)).collect();
    let mut set = seeds.clone();
    let mut n = 0;
    for x in &seeds {
        d.observe("spiffe://td/thief", Query::Features(x));
        n += 1;
    }
    'rounds: for _ in 0..6 {
        let round: Vec<Vec<f64>> = set
            .iter()
            .map(|x| {
                x.iter()
                    .map(|v| v + if rng.random::<bool>() { 0.1 } else { -0.1 })
                    .collect()
            })
            .collect();
        for x in &round {
            n += 1;
            if d.observe("spiffe://td/thief", Query::Features(x)).step >= Step::Refuse {
                break 'rounds;
            }
        }
        set.extend(round);
    }
    assert!(d.step("spiffe://td/thief") >= Step::Refuse);
    assert!(n < 120, "refused after {n} queries");
}

#[test]
fn steps_are_sticky() {
    let d = Detector::new(Settings::default());
    let mut next = 0u32;
    let id = "spiffe://td/llm";
    loop {
        let bias: Vec<(u32, f64)> = (next..next + 20).map(|t| (t, 100.0)).collect();
        next += 20;
        let a = d.observe(
            id,
            Query::Llm(LlmQuery {
                prompt: "x",
                logprobs: true,
                top_logprobs: 20,
                logit_bias: &bias,
                max_tokens: 1,
            }),
        );
        if a.step >= Step::Refuse {
            break;
        }
        assert!(next < 20_000);
    }
    let reached = d.step(id);
    // Harmless requests afterwards do not lower the step.
    let mut rng = StdRng::seed_from_u64(13);
    for _ in 0..500 {
        let x = natural(&mut rng);
        let a = d.observe(id, Query::Features(&x));
        assert!(a.step >= reached);
    }
    assert!(d.step(id) >= reached);
}

#[test]
fn identities_are_bounded_and_least_recent_evicted() {
    let settings = Settings {
        max_identities: 64,
        shards: 4,
        ..Settings::default()
    };
    let d = Detector::new(settings);
    let x = [1.0, 2.0, 3.0];
    for i in 0..1000 {
        d.observe(&format!("spiffe://td/w/{i}"), Query::Features(&x));
        assert!(d.tracked() <= 64);
    }
    assert!(d.tracked() >= 60);
    assert_eq!(d.step("spiffe://td/w/0"), Step::Normal);
}

#[test]
fn history_is_bounded_per_identity() {
    let settings = Settings {
        history: 16,
        ..Settings::default()
    };
    let bound = settings.max_bytes_per_identity();
    let d = Detector::new(settings);
    let mut rng = StdRng::seed_from_u64(14);
    for _ in 0..5000 {
        let x = natural(&mut rng);
        d.observe("spiffe://td/a", Query::Features(&x));
    }
    let held = d
        .tracker
        .peek("spiffe://td/a", |id| {
            id.features.as_ref().map_or(0, |h| h.held_bytes())
        })
        .unwrap();
    assert!(held <= bound, "{held} > {bound}");
    assert!(Settings::default().max_bytes_per_identity() < 24 * 1024);
}

#[test]
fn embeddings_near_duplicate_sweep_is_flagged() {
    let d = Detector::new(Settings::default());
    let words = [
        "apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "piano", "lemon", "comet",
    ];
    let mut last = None;
    for i in 0..200 {
        let t = format!("Represent this word for retrieval: {}{}", words[i % 10], i);
        last = Some(d.observe("spiffe://td/emb", Query::Embeddings(&[t.as_str()])));
    }
    assert!(last.unwrap().signals.duplicates > 0.5);
}

#[test]
fn with_a_reference_of_texts_a_templated_crawl_is_refused_in_its_first_batch() {
    let d = Detector::new(Settings::default());
    let mut rng = StdRng::seed_from_u64(21);
    let topics = [
        "invoice payment overdue",
        "router firmware upgrade",
        "patient discharge summary",
    ];
    let natural = |rng: &mut StdRng| {
        let t = topics[rng.random_range(0..topics.len())];
        format!(
            "{t} for account {} filed on day {}",
            rng.random_range(0..5000),
            rng.random_range(1..29)
        )
    };
    let reference: Vec<String> = (0..2000).map(|_| natural(&mut rng)).collect();
    d.seed_texts(&reference);
    let honest: Vec<String> = (0..32).map(|_| natural(&mut rng)).collect();
    let honest: Vec<&str> = honest.iter().map(String::as_str).collect();
    let h = d.observe("spiffe://td/ns/docs/sa/indexer", Query::Embeddings(&honest));
    assert_eq!(h.step, Step::Normal, "{h:?}");
    let crawl: Vec<String> = (0..32)
        .map(|i| {
            format!(
                "Represent this sentence for searching relevant passages: w{}",
                i * 7919
            )
        })
        .collect();
    let crawl: Vec<&str> = crawl.iter().map(String::as_str).collect();
    let a = d.observe("spiffe://td/ns/x/sa/crawler", Query::Embeddings(&crawl));
    assert!(a.step >= Step::Refuse, "{a:?}");
    // The reference defines natural: live callers teach nothing.
    let space = d
        .population
        .space(TEXT_SPACE, 0, &d.settings.coverage)
        .unwrap();
    let before = format!("{space:?}");
    for _ in 0..10 {
        d.observe("spiffe://td/ns/x/sa/crawler-2", Query::Embeddings(&crawl));
    }
    assert_eq!(format!("{space:?}"), before);
}

#[test]
fn detector_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Detector>();
}

#[test]
fn uniform_random_queries_raise_coverage() {
    let d = Detector::new(Settings::default());
    let mut rng = StdRng::seed_from_u64(15);
    for i in 0..12_000 {
        let x = natural(&mut rng);
        d.observe(&format!("spiffe://td/user-{}", i % 50), Query::Features(&x));
    }
    let mut last = None;
    for _ in 0..200 {
        let x: Vec<f64> = (0..16).map(|_| rng.random_range(-4.0..13.0)).collect();
        last = Some(d.observe("spiffe://td/random", Query::Features(&x)));
    }
    let a = last.unwrap();
    assert!(a.signals.coverage > 0.5, "{a:?}");
}

#[test]
fn connections_share_one_detector_across_threads() {
    let settings = Settings {
        max_identities: 100,
        ..Settings::default()
    };
    let d = std::sync::Arc::new(Detector::new(settings));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(100 + t);
                for i in 0..3000 {
                    let x = natural(&mut rng);
                    let id = format!("spiffe://td/w/{}", (i * 7 + t as usize) % 300);
                    d.observe(&id, Query::Features(&x));
                    let _ = d.step(&id);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(d.tracked() <= 100);
    assert!(d.tracked() >= 80);
}

/// Natural inputs of a task `d` wide: four clusters, features on their own scales.
fn natural_wide(rng: &mut StdRng, d: usize) -> Vec<f64> {
    let c = f64::from(rng.random_range(0..4u8));
    (0..d)
        .map(|i| (1.0 + (i % 5) as f64) * (c + 0.4 * gauss(rng)))
        .collect()
}

/// Without the reference, the random attacker here is never stopped (the
/// population signals wait for ~10,000 natural queries).
#[test]
fn with_a_reference_a_first_day_attacker_is_stopped_and_honest_callers_are_not() {
    for d in [4, 16, 64, 512] {
        let mut rng = StdRng::seed_from_u64(40 + d as u64);
        let reference: Vec<Vec<f64>> = (0..500).map(|_| natural_wide(&mut rng, d)).collect();
        let det = Detector::new(Settings::default());
        det.seed(&reference);
        // A new deployment: one honest caller and one attacker, both from
        // their first query; nothing else has ever been seen.
        let mut stopped_at = None;
        for q in 0..400 {
            let honest = natural_wide(&mut rng, d);
            assert_eq!(
                det.observe("spiffe://td/ns/app/sa/honest", Query::Features(&honest))
                    .step,
                Step::Normal,
                "width {d}: the honest caller was flagged at query {q}"
            );
            // Uniform random over the features' ranges (Tramer et al.).
            let random: Vec<f64> = (0..d)
                .map(|i| rng.random_range(-2.0..5.0) * (1.0 + (i % 5) as f64))
                .collect();
            let a = det.observe("spiffe://td/ns/app/sa/thief", Query::Features(&random));
            if a.step >= Step::Refuse && stopped_at.is_none() {
                stopped_at = Some(q);
            }
        }
        let at = stopped_at
            .unwrap_or_else(|| panic!("width {d}: the random attacker was never stopped"));
        assert!(at < 100, "width {d}: stopped after {at} queries");
    }
}

#[test]
fn live_callers_teach_a_seeded_reference_nothing() {
    let mut rng = StdRng::seed_from_u64(9);
    let reference: Vec<Vec<f64>> = (0..200).map(|_| natural(&mut rng)).collect();
    let det = Detector::new(Settings::default());
    det.seed(&reference);
    let space = det
        .population
        .space(16, 16, &det.settings.coverage)
        .unwrap();
    let before = space.rare_mass();
    for _ in 0..3000 {
        let random: Vec<f64> = (0..16).map(|_| rng.random_range(-5.0..15.0)).collect();
        det.observe("spiffe://td/ns/app/sa/thief", Query::Features(&random));
    }
    assert_eq!(
        space.rare_mass(),
        before,
        "live traffic moved the reference"
    );
}

/// Four inputs recorded to a coarse grid, in three clusters: honest
/// neighbours often share fields exactly.
fn coarse(rng: &mut StdRng, class: usize) -> Vec<f64> {
    let centre = [
        [5.0, 3.4, 1.5, 0.2],
        [5.9, 2.8, 4.3, 1.3],
        [6.6, 3.0, 5.5, 2.0],
    ][class];
    let sd = [0.4, 0.3, 0.4, 0.2];
    (0..4)
        .map(|j| ((centre[j] + sd[j] * gauss(rng)) * 10.0).round() / 10.0)
        .collect()
}

#[test]
fn honest_callers_of_coarse_narrow_data_are_not_taken_for_sweeps() {
    // Bare and with a reference; a heavy caller of every class and one that
    // asks about a single class only.
    for seeded in [false, true] {
        let d = Detector::new(Settings::default());
        let mut rng = StdRng::seed_from_u64(21);
        if seeded {
            let rows: Vec<Vec<f64>> = (0..1000).map(|i| coarse(&mut rng, i % 3)).collect();
            d.seed(&rows);
        }
        let mut worst = Step::Normal;
        for i in 0..3000 {
            let heavy = d.observe(
                "spiffe://t/ns/a/sa/heavy",
                Query::Features(&coarse(&mut rng, i % 3)),
            );
            let skewed = d.observe(
                "spiffe://t/ns/a/sa/skewed",
                Query::Features(&coarse(&mut rng, 1)),
            );
            worst = worst.max(heavy.step).max(skewed.step);
        }
        assert!(worst < Step::Degrade, "seeded {seeded}: {worst:?}");
    }
}

/// Sixteen inputs driven by three latent factors, as real features are.
fn correlated(rng: &mut StdRng, map: &[f64]) -> Vec<f64> {
    let z = [gauss(rng), gauss(rng), gauss(rng)];
    (0..16)
        .map(|j| (0..3).map(|f| map[3 * j + f] * z[f]).sum::<f64>() + 0.2 * gauss(rng))
        .collect()
}

#[test]
fn with_a_reference_queries_that_ignore_the_data_s_correlations_are_refused() {
    let mut rng = StdRng::seed_from_u64(22);
    let map: Vec<f64> = (0..48).map(|_| gauss(&mut rng)).collect();
    let d = Detector::new(Settings::default());
    let rows: Vec<Vec<f64>> = (0..1000).map(|_| correlated(&mut rng, &map)).collect();
    d.seed(&rows);
    let (lo, hi) = (-3.0, 3.0);
    let mut refused_at = None;
    for n in 1..=200 {
        // Each input within its natural range, the inputs independent.
        let x: Vec<f64> = (0..16).map(|_| rng.random_range(lo..hi)).collect();
        let a = d.observe("spiffe://t/ns/x/sa/random", Query::Features(&x));
        if a.step >= Step::Refuse {
            refused_at = Some(n);
            break;
        }
    }
    assert!(refused_at.is_some_and(|n| n <= 30), "{refused_at:?}");
    for _ in 0..2000 {
        let a = d.observe(
            "spiffe://t/ns/a/sa/honest",
            Query::Features(&correlated(&mut rng, &map)),
        );
        assert!(a.step < Step::Warn, "{a:?}");
    }
}
