//! Evaluation harness of extraction detection: does `warden_guard::detect`
//! stop model-stealing identities without stopping honest ones, on models
//! and traffic it was not tuned on, and how much of the model has an
//! attacker copied by the time it is stopped?
//!
//! Seeded and reproducible. For every task (`task::all`: synthetic mixtures
//! and the classic datasets in `benches/data`, in a committed tune /
//! held-out split) and both victim kinds (softmax regression and an MLP),
//! one simulated day of a predict route runs through one `Detector`: honest
//! callers (`traffic`) interleaved with attackers (`attack`) that start in
//! the first second, every kind plain, paced and mixed. Each route runs
//! twice: with an operator's reference of natural inputs and 20 callers,
//! and bare (no reference, 3 callers: the first day of a new deployment).
//! The proxy's policy is applied to every answer: full probabilities at
//! `normal`/`warn`, the top label only from `degrade`, nothing from
//! `refuse`. The same attackers also run unprotected for comparison. Then
//! the LLM route (`llm`), the embeddings route with its crawlers, budgets
//! and sybils (`text`), then `observe` is timed.
//!
//! `cargo bench --bench extraction` (`HARNESS_TASKS=iris,wine` to run some
//! tasks only; `HARNESS_SEEDS=n` attackers per kind and variant, default 3).

#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmarks fail loudly by design
#![allow(clippy::needless_range_loop)] // the model's loops read as the maths does

mod attack;
mod llm;
mod model;
mod task;
mod text;
mod traffic;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use criterion::Criterion;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use warden_guard::detect::{Detector, Query, Settings, Step};
use warden_guard::outputs::{Outputs, limit};
use warden_guard::request::predict::Shape;

use attack::{Attack, BUDGET, Kind, Variant};
use model::{Net, agreement, one_hot, surrogate};
use task::{Split, Task};
use traffic::{Caller, Habit};

/// A standard normal draw (Box-Muller).
fn gauss(rng: &mut StdRng) -> f64 {
    let u: f64 = rng.random_range(1e-12..1.0);
    let v: f64 = rng.random();
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
}

/// Records the query count `n` at which each step up to `step` was first
/// reached.
fn mark(first: &mut [Option<usize>; 5], step: Step, n: usize) {
    for (i, f) in first.iter_mut().enumerate() {
        if step as usize >= i && f.is_none() {
            *f = Some(n);
        }
    }
}

fn seeds() -> u64 {
    std::env::var("HARNESS_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s| (1..=50).contains(s))
        .unwrap_or(3)
}

/// The victim's answer as the proxy lets it out, through `outputs::limit`.
fn answer(victim: &Net, x: &[f64], outputs: Outputs, classes: usize) -> Vec<f64> {
    let mut doc = json!({ "predictions": [victim.probs(x)] });
    limit(&mut doc, Shape::Rows, "", outputs);
    match &doc["predictions"][0] {
        Value::Array(a) => a.iter().map(|v| v.as_f64().unwrap()).collect(),
        v => one_hot(v.as_u64().unwrap() as usize, classes),
    }
}

/// The policy of the harness: what each step may see (`None`: refused).
fn policy(step: Step) -> Option<Outputs> {
    match step {
        Step::Normal | Step::Warn => Some(Outputs::Full),
        Step::Degrade => Some(Outputs::Label),
        Step::Refuse | Step::Deny => None,
    }
}

/// How a route is deployed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// An operator's reference of natural inputs; 20 honest callers.
    Reference,
    /// No reference; 3 honest callers: the first day of a new deployment.
    Bare,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Reference => "reference",
            Mode::Bare => "bare",
        }
    }

    fn callers(self) -> usize {
        match self {
            Mode::Reference => 20,
            Mode::Bare => 3,
        }
    }
}

/// One attacker's day.
struct Outcome {
    kind: Kind,
    variant: Variant,
    /// Query at which each step was first reached.
    first: [Option<usize>; 5],
    /// Surrogate agreement with the victim at the end (after the stop).
    agree: f64,
}

/// The unprotected attacker: surrogate agreement after 50 queries and after
/// its whole budget.
#[derive(Clone, Copy, Default)]
struct Curve {
    at50: f64,
    at_budget: f64,
}

/// What one route's day produced.
struct Route {
    mode: Mode,
    outcomes: Vec<Outcome>,
    callers: Vec<Caller>,
    observe_ns: u128,
    observed: u64,
}

/// The attacker's seed: protected and unprotected runs match, and the
/// variants of one attacker are the same attack delivered differently.
fn attack_seed(kind: Kind, s: u64) -> u64 {
    1000 * kind as u64 + s
}

fn run_route(task: &Task, victim: &Net, mode: Mode, eval: &[Vec<f64>], seed: u64) -> Route {
    let mut rng = StdRng::seed_from_u64(seed);
    let detector = Detector::new(Settings::default());
    if mode == Mode::Reference {
        let mut refs = StdRng::seed_from_u64(seed ^ 0x4ef);
        let rows: Vec<Vec<f64>> = (0..1000).map(|_| task.sample(&mut refs).0).collect();
        detector.seed(&rows);
    }
    let (mut callers, benign) = traffic::day(task, mode.callers(), &mut rng);
    let mut attacks: Vec<(String, Attack, [Option<usize>; 5])> = Vec::new();
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
    for kind in Kind::ALL {
        for variant in Variant::ALL {
            for s in 0..seeds() {
                heap.push(Reverse((rng.random_range(0..1000), attacks.len())));
                attacks.push((
                    format!("spiffe://bench.test/ns/x/sa/{kind:?}-{variant:?}-{s}").to_lowercase(),
                    Attack::new(kind, variant, task, attack_seed(kind, s)),
                    [None; 5],
                ));
            }
        }
    }
    let (mut observe_ns, mut observed) = (0u128, 0u64);
    let mut observe = |id: &str, x: &[f64]| {
        let t = Instant::now();
        let a = detector.observe(id, Query::Features(x));
        observe_ns += t.elapsed().as_nanos();
        observed += 1;
        a
    };
    let mut b = 0;
    loop {
        let next_attack = heap.peek().map(|Reverse((t, _))| *t);
        let next_benign = benign.get(b).map(|e| e.0);
        let attack_first = match (next_attack, next_benign) {
            (None, None) => break,
            (Some(a), Some(bt)) => a < bt,
            (a, _) => a.is_some(),
        };
        if !attack_first {
            let (_, u, x) = &benign[b];
            b += 1;
            let a = observe(&callers[*u].id, x);
            let c = &mut callers[*u];
            c.sent += 1;
            match a.step {
                Step::Normal => {}
                Step::Warn => c.warned += 1,
                Step::Degrade => c.degraded += 1,
                Step::Refuse | Step::Deny => {
                    c.refused += 1;
                    c.refused_at.get_or_insert(c.sent);
                }
            }
            let s = &a.signals;
            for (m, v) in c
                .max_signals
                .iter_mut()
                .zip([s.prada, s.duplicates, s.sweep, s.coverage])
            {
                *m = m.max(v);
            }
            continue;
        }
        let Some(Reverse((t, i))) = heap.pop() else {
            break;
        };
        let (id, attack, first) = &mut attacks[i];
        let Some(x) = attack.next(task) else { continue };
        let a = observe(id, &x);
        mark(first, a.step, attack.sent);
        // From refuse on the attacker is cut and gets nothing more.
        if let Some(outputs) = policy(a.step) {
            let y = answer(victim, &x, outputs, task.classes);
            attack.receive(x, y);
            heap.push(Reverse((t + attack.variant.interval_ms(), i)));
        }
    }
    let outcomes = attacks
        .iter()
        .map(|(_, a, first)| Outcome {
            kind: a.kind,
            variant: a.variant,
            first: *first,
            agree: surrogate(&a.data, task.classes, 7).map_or(0.0, |s| agreement(&s, victim, eval)),
        })
        .collect();
    Route {
        mode,
        outcomes,
        callers,
        observe_ns,
        observed,
    }
}

/// The attacker alone, unprotected: full probabilities for its whole budget.
fn unprotected(
    kind: Kind,
    variant: Variant,
    s: u64,
    task: &Task,
    victim: &Net,
    eval: &[Vec<f64>],
) -> Curve {
    let mut a = Attack::new(kind, variant, task, attack_seed(kind, s));
    while let Some(x) = a.next(task) {
        let y = answer(victim, &x, Outputs::Full, task.classes);
        a.receive(x, y);
    }
    let at = |n: usize| {
        surrogate(&a.data[..n.min(a.data.len())], task.classes, 7)
            .map_or(0.0, |m| agreement(&m, victim, eval))
    };
    Curve {
        at50: at(50),
        at_budget: at(BUDGET),
    }
}

/// Everything measured on one task and victim.
struct Trial {
    task: usize,
    victim: model::Kind,
    accuracy: f64,
    routes: Vec<Route>,
    /// Unprotected curves by (kind, variant), averaged over seeds.
    curves: Vec<(Kind, Variant, Curve)>,
}

fn trial(t: usize, task: &Task, victim_kind: model::Kind) -> Trial {
    let mut rng = StdRng::seed_from_u64(0x7a5c + t as u64);
    let train: Vec<(Vec<f64>, usize)> = (0..3000).map(|_| task.sample(&mut rng)).collect();
    let xs: Vec<Vec<f64>> = train.iter().map(|(x, _)| x.clone()).collect();
    let ys: Vec<Vec<f64>> = train
        .iter()
        .map(|(_, c)| one_hot(*c, task.classes))
        .collect();
    let mut victim = Net::new(victim_kind, &mut rng, &xs, task.classes);
    victim.train(&xs, &ys, 100_000, &mut rng);
    let test: Vec<(Vec<f64>, usize)> = (0..1000).map(|_| task.sample(&mut rng)).collect();
    let accuracy = test.iter().filter(|(x, c)| victim.predict(x) == *c).count() as f64 / 1000.0;
    let eval: Vec<Vec<f64>> = test.into_iter().map(|(x, _)| x).collect();
    let routes = [Mode::Reference, Mode::Bare]
        .into_iter()
        .map(|m| run_route(task, &victim, m, &eval, 0xda7 + t as u64))
        .collect();
    let mut curves = Vec::new();
    for kind in Kind::ALL {
        for variant in [Variant::Plain, Variant::Mixed] {
            let mut sum = Curve::default();
            for s in 0..seeds() {
                let c = unprotected(kind, variant, s, task, &victim, &eval);
                sum.at50 += c.at50 / seeds() as f64;
                sum.at_budget += c.at_budget / seeds() as f64;
            }
            curves.push((kind, variant, sum));
            if variant == Variant::Plain {
                // Pacing changes when queries arrive, not which.
                curves.push((kind, Variant::Paced, sum));
            }
        }
    }
    Trial {
        task: t,
        victim: victim_kind,
        accuracy,
        routes,
        curves,
    }
}

fn median(v: &mut [usize]) -> Option<usize> {
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

fn show(v: Option<usize>) -> String {
    v.map_or("-".into(), |n| n.to_string())
}

/// Totals of one group of attackers.
#[derive(Default, Clone, Copy)]
struct Tally {
    attackers: usize,
    detected: usize,
    /// Groups (task, victim) of these attackers.
    groups: usize,
    /// Groups whose mean agreement at the stop is no higher than the
    /// unprotected attacker's after 50 queries (within a point: surrogate
    /// training noise).
    bounded: usize,
}

fn report(tasks: &[Task], trials: &[Trial]) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "# Extraction detection: held-out evaluation\n");
    let _ = writeln!(
        w,
        "policy: full probabilities at normal/warn, top label only from degrade, 429 from refuse (default ladder)"
    );
    let _ = writeln!(
        w,
        "attackers start in the first second, {} per kind and variant, budget {BUDGET} queries; agreement = surrogate vs victim top-1 on 1000 natural samples",
        seeds()
    );
    let _ = writeln!(
        w,
        "columns: detected = reached refuse within the budget; warn/refuse = median query count at which the step was reached (max after /);"
    );
    let _ = writeln!(
        w,
        "agree@stop = the protected attacker's surrogate at the end; free@50 and free@{BUDGET} = the same attacker unprotected after 50 and {BUDGET} queries\n"
    );
    let mut by_split: Vec<((Split, Kind, Variant), Tally)> = Vec::new();
    let mut benign_split: Vec<(Split, usize, usize, usize, usize)> = Vec::new();
    for tr in trials {
        let task = &tasks[tr.task];
        let _ = writeln!(
            w,
            "## {} ({}), {} inputs, {} classes, victim {} (accuracy {:.1}%)\n",
            task.name,
            task.split.label(),
            task.width,
            task.classes,
            tr.victim.label(),
            100.0 * tr.accuracy
        );
        let _ = writeln!(
            w,
            "{:<10} {:<20} {:<7} {:>8} {:>6} {:>10} {:>10} {:>8} {:>9}",
            "route",
            "attack",
            "variant",
            "detected",
            "warn",
            "refuse",
            "agree@stop",
            "free@50",
            format!("free@{BUDGET}")
        );
        for route in &tr.routes {
            for kind in Kind::ALL {
                for variant in Variant::ALL {
                    let os: Vec<&Outcome> = route
                        .outcomes
                        .iter()
                        .filter(|o| o.kind == kind && o.variant == variant)
                        .collect();
                    let curve = tr
                        .curves
                        .iter()
                        .find(|c| c.0 == kind && c.1 == variant)
                        .map(|c| c.2)
                        .unwrap_or_default();
                    let mut warn: Vec<usize> = os.iter().filter_map(|o| o.first[1]).collect();
                    let mut refuse: Vec<usize> = os.iter().filter_map(|o| o.first[3]).collect();
                    let detected = refuse.len();
                    let max = refuse.iter().max().copied();
                    let agree = os.iter().map(|o| o.agree).sum::<f64>() / os.len() as f64;
                    let bounded = usize::from(agree <= curve.at50 + 0.01);
                    if route.mode == Mode::Reference {
                        let key = (task.split, kind, variant);
                        let tally = match by_split.iter_mut().find(|e| e.0 == key) {
                            Some(e) => &mut e.1,
                            None => {
                                by_split.push((key, Tally::default()));
                                &mut by_split.last_mut().unwrap().1
                            }
                        };
                        tally.attackers += os.len();
                        tally.detected += detected;
                        tally.groups += 1;
                        tally.bounded += bounded;
                    }
                    let _ = writeln!(
                        w,
                        "{:<10} {:<20} {:<7} {:>6}/{:<1} {:>6} {:>10} {:>9.1}% {:>7.1}% {:>8.1}%",
                        route.mode.label(),
                        kind.label(),
                        variant.label(),
                        detected,
                        os.len(),
                        show(median(&mut warn)),
                        format!("{}/{}", show(median(&mut refuse)), show(max)),
                        100.0 * agree,
                        100.0 * curve.at50,
                        100.0 * curve.at_budget
                    );
                }
            }
        }
        let _ = writeln!(w);
        for route in &tr.routes {
            let sent: usize = route.callers.iter().map(|c| c.sent).sum();
            let refused: usize = route.callers.iter().map(|c| c.refused).sum();
            let degraded: usize = route.callers.iter().map(|c| c.degraded).sum();
            let flagged = route.callers.iter().filter(|c| c.refused > 0).count();
            if route.mode == Mode::Reference {
                benign_split.push((task.split, sent, refused, degraded, flagged));
            }
            let _ = writeln!(
                w,
                "honest callers ({} route): {} identities, {} queries; refused {} ({:.2}%), degraded {} ({:.2}%), identities ever refused {}; goodput {:.2}%; observe {:.2} us mean",
                route.mode.label(),
                route.callers.len(),
                sent,
                refused,
                100.0 * refused as f64 / sent.max(1) as f64,
                degraded,
                100.0 * degraded as f64 / sent.max(1) as f64,
                flagged,
                100.0 * (sent - refused - degraded) as f64 / sent.max(1) as f64,
                route.observe_ns as f64 / route.observed.max(1) as f64 / 1000.0
            );
            for c in route
                .callers
                .iter()
                .filter(|c| c.refused > 0 || c.habit != Habit::Regular)
            {
                let _ = writeln!(
                    w,
                    "  {:<44} {:>5} queries, warned {} degraded {} refused {} (from query {}), highest prada/dup/sweep/coverage {:.2}/{:.2}/{:.2}/{:.2}",
                    c.id,
                    c.sent,
                    c.warned,
                    c.degraded,
                    c.refused,
                    show(c.refused_at),
                    c.max_signals[0],
                    c.max_signals[1],
                    c.max_signals[2],
                    c.max_signals[3]
                );
            }
        }
        let _ = writeln!(w);
    }
    let _ = writeln!(w, "## Summary (reference routes)\n");
    for split in [Split::Tune, Split::HeldOut] {
        let names: Vec<&str> = tasks
            .iter()
            .filter(|t| t.split == split)
            .map(|t| t.name.as_str())
            .collect();
        let _ = writeln!(w, "### {} tasks: {}\n", split.label(), names.join(", "));
        let _ = writeln!(
            w,
            "{:<20} {:>14} {:>14} {:>14} {:>22}",
            "attack", "plain", "paced", "mixed", "agree@stop <= free@50"
        );
        let _ = writeln!(
            w,
            "{:<20} {:>14} {:>14} {:>14} {:>22}",
            "", "detected", "detected", "detected", "groups (task, victim)"
        );
        let mut total = Tally::default();
        for kind in Kind::ALL {
            let mut cells = Vec::new();
            let mut bounded = (0, 0);
            for variant in Variant::ALL {
                let t = by_split
                    .iter()
                    .find(|e| e.0 == (split, kind, variant))
                    .map(|e| e.1)
                    .unwrap_or_default();
                cells.push(format!("{}/{}", t.detected, t.attackers));
                bounded.0 += t.bounded;
                bounded.1 += t.groups;
                total.attackers += t.attackers;
                total.detected += t.detected;
                total.groups += t.groups;
                total.bounded += t.bounded;
            }
            let _ = writeln!(
                w,
                "{:<20} {:>14} {:>14} {:>14} {:>22}",
                kind.label(),
                cells[0],
                cells[1],
                cells[2],
                format!("{}/{}", bounded.0, bounded.1)
            );
        }
        let (sent, refused, degraded, flagged) = benign_split
            .iter()
            .filter(|b| b.0 == split)
            .fold((0, 0, 0, 0), |a, b| {
                (a.0 + b.1, a.1 + b.2, a.2 + b.3, a.3 + b.4)
            });
        let _ = writeln!(
            w,
            "detected {}/{} ({:.1}%); mean agreement at the stop no higher than free@50 in {}/{} groups",
            total.detected,
            total.attackers,
            100.0 * total.detected as f64 / total.attackers.max(1) as f64,
            total.bounded,
            total.groups
        );
        let _ = writeln!(
            w,
            "honest queries {sent}: refused {refused} ({:.3}%), degraded {degraded} ({:.3}%), honest identities ever refused: {flagged}\n",
            100.0 * refused as f64 / sent.max(1) as f64,
            100.0 * degraded as f64 / sent.max(1) as f64
        );
    }
    out
}

fn main() {
    let only: Option<Vec<String>> = std::env::var("HARNESS_TASKS")
        .ok()
        .map(|s| s.split(',').map(str::to_string).collect());
    let tasks: Vec<Task> = task::all()
        .into_iter()
        .filter(|t| only.as_ref().is_none_or(|o| o.contains(&t.name)))
        .collect();
    let jobs: Vec<(usize, model::Kind)> = (0..tasks.len())
        .flat_map(|t| [(t, model::Kind::Linear), (t, model::Kind::Mlp)])
        .collect();
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<Trial>> = Mutex::new(Vec::new());
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(t, kind)) = jobs.get(i) else { break };
                    let tr = trial(t, &tasks[t], kind);
                    eprintln!(
                        "{} {} done at {:?}",
                        tasks[t].name,
                        kind.label(),
                        started.elapsed()
                    );
                    done.lock().unwrap().push(tr);
                }
            });
        }
    });
    let mut trials = done.into_inner().unwrap();
    trials.sort_by_key(|t| (t.task, t.victim as usize));
    print!("{}", report(&tasks, &trials));
    llm::run(&Settings::default());
    text::run(&Settings::default(), seeds());
    println!("\nharness ran in {:.0} s", started.elapsed().as_secs_f64());

    // observe() in isolation, with a full history, at several widths.
    let mut c = Criterion::default().configure_from_args();
    bench_observe(&mut c);
    c.final_summary();
}

fn bench_observe(c: &mut Criterion) {
    let mut g = c.benchmark_group("detect");
    // Bare, and with a reference of 1,000 rows (the deployment the README
    // recommends: its outlier test and calibrated ramps run too).
    for (width, reference) in [
        (4, false),
        (64, false),
        (256, false),
        (64, true),
        (256, true),
    ] {
        let task = Task::mixture("timing", Split::Tune, width, 4, 0, 9);
        let d = Detector::new(Settings::default());
        let mut rng = StdRng::seed_from_u64(7);
        if reference {
            let rows: Vec<Vec<f64>> = (0..1000).map(|_| task.sample(&mut rng).0).collect();
            d.seed(&rows);
        }
        let xs: Vec<Vec<f64>> = (0..4096).map(|_| task.sample(&mut rng).0).collect();
        for x in &xs {
            d.observe("spiffe://bench.test/ns/a/sa/warm", Query::Features(x));
        }
        let mut i = 0;
        let with = if reference { ", reference" } else { "" };
        g.bench_function(
            format!("observe features ({width} inputs, full history{with})"),
            |b| {
                b.iter(|| {
                    i = (i + 1) % xs.len();
                    d.observe(
                        black_box("spiffe://bench.test/ns/a/sa/warm"),
                        Query::Features(&xs[i]),
                    )
                })
            },
        );
    }
    // An embeddings answer measured: 32 vectors of 1,536 values (the
    // width of OpenAI's text-embedding-3-small).
    let mut rng = StdRng::seed_from_u64(9);
    let batch: Vec<Vec<f32>> = (0..32)
        .map(|_| (0..1536).map(|_| rng.random::<f32>() - 0.5).collect())
        .collect();
    let d = Detector::new(Settings::default());
    g.bench_function("observe embeddings answer (32 x 1536)", |b| {
        b.iter(|| d.observe_answer(black_box("spiffe://bench.test/ns/a/sa/index"), &batch))
    });
    let bias = [(50256u32, -100.0)];
    let d = Detector::new(Settings::default());
    g.bench_function("observe chat completion", |b| {
        b.iter(|| {
            d.observe(
                black_box("spiffe://bench.test/ns/a/sa/chat"),
                Query::Llm(warden_guard::detect::LlmQuery {
                    prompt: "hello",
                    logprobs: true,
                    top_logprobs: 3,
                    logit_bias: &bias,
                    max_tokens: 200,
                }),
            )
        })
    });
    g.finish();
}
