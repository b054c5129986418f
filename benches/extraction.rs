//! Evaluation harness of extraction detection: does `warden_guard::detect` stop
//! model-stealing identities without stopping honest ones, and how much of
//! the model has an attacker copied by the time it is stopped?
//!
//! Seeded and reproducible. A victim classifier (a small MLP) is trained
//! in-process on a generated Gaussian-mixture task; one simulated day of
//! benign traffic (feature-API and LLM users, one heavy honest user of each)
//! runs through one `Detector` interleaved with attackers of each kind:
//! uniformly random queries, Jacobian-based augmentation (Papernot et al.;
//! PRADA's T-RND), noise perturbations of seeds, decision-boundary
//! bisection, and an LLM logit_bias vocabulary sweep (Carlini et al. 2024).
//! The proxy's policy is applied to every answer: full probabilities at
//! `normal`/`warn`, the top label only from `degrade`, nothing from
//! `refuse`. The same attackers also run unprotected (full probabilities
//! for their whole budget) for comparison. Then `observe` is timed.
//!
//! `cargo bench --bench extraction` (`HARNESS_WIDTH=n`: a task n inputs wide)

#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmarks fail loudly by design
#![allow(clippy::needless_range_loop)] // the model's loops read as the maths does

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::hint::black_box;
use std::time::Instant;

use criterion::Criterion;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use warden_guard::detect::{Detector, LlmQuery, Query, Settings, Step};
use warden_guard::outputs::{Outputs, limit};
use warden_guard::request::predict::Shape;

/// Input width of the task (`HARNESS_WIDTH`, default 16): wide inputs are
/// folded by the detector, and its signals must hold at every width.
fn d() -> usize {
    static WIDTH: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *WIDTH.get_or_init(|| {
        std::env::var("HARNESS_WIDTH")
            .ok()
            .and_then(|w| w.parse().ok())
            .filter(|w| (2..=4096).contains(w))
            .unwrap_or(16)
    })
}
const K: usize = 4;
const H: usize = 32;
const DAY: f64 = 86_400.0;
/// Days simulated: the detector runs continuously, so the first day warms it
/// up (as the days before would have) and attackers come on the last.
const DAYS: usize = 2;
const SEEDS_PER_KIND: u64 = 10;
const BUDGET: usize = 2_000;
const VOCAB: u32 = 32_000;
/// What PRADA reports for the attacks it evaluated (queries until detection).
const PRADA_REPORTED: [(&str, &str); 3] = [
    ("Tramer et al. (random queries)", "5,650 / 5,300"),
    ("Papernot et al. (JbDA)", "120 / 430"),
    ("PRADA's own T-RND / I-FGSM", "130-140 / 440-650"),
];

/// Requests an LLM sweep sends at most in the simulated day.
const SWEEP_BUDGET: usize = 20_000;

fn gauss(rng: &mut StdRng) -> f64 {
    let u: f64 = rng.random_range(1e-12..1.0);
    let v: f64 = rng.random();
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
}

// ---------------------------------------------------------------- the task

/// K classes, each two Gaussian blobs, features on different scales.
struct Task {
    blobs: Vec<(usize, Vec<f64>, Vec<f64>)>,
    scale: Vec<f64>,
    offset: Vec<f64>,
}

impl Task {
    fn new(rng: &mut StdRng) -> Self {
        let mut blobs = Vec::new();
        for c in 0..K {
            for _ in 0..2 {
                let center = (0..d()).map(|_| 0.7 * gauss(rng)).collect();
                let sd = (0..d()).map(|_| rng.random_range(0.5..1.2)).collect();
                blobs.push((c, center, sd));
            }
        }
        Self {
            blobs,
            scale: (0..d())
                .map(|_| rng.random_range(-1.5f64..1.5).exp())
                .collect(),
            offset: (0..d()).map(|_| rng.random_range(-5.0..5.0)).collect(),
        }
    }

    fn sample_class(&self, rng: &mut StdRng, class: usize) -> Vec<f64> {
        let pick = 2 * class + rng.random_range(0..2);
        let (_, c, sd) = &self.blobs[pick];
        (0..d())
            .map(|j| (c[j] + sd[j] * gauss(rng)) * self.scale[j] + self.offset[j])
            .collect()
    }

    fn sample(&self, rng: &mut StdRng) -> (Vec<f64>, usize) {
        let c = rng.random_range(0..K);
        (self.sample_class(rng, c), c)
    }
}

// ---------------------------------------------------------------- the model

/// d() -> H (tanh) -> K (softmax), inputs standardized by the training data.
#[derive(Clone)]
struct Mlp {
    mean: Vec<f64>,
    inv_sd: Vec<f64>,
    w1: Vec<f64>,
    b1: Vec<f64>,
    w2: Vec<f64>,
    b2: Vec<f64>,
}

impl Mlp {
    fn new(rng: &mut StdRng, xs: &[Vec<f64>]) -> Self {
        let n = xs.len().max(1) as f64;
        let mean: Vec<f64> = (0..d())
            .map(|j| xs.iter().map(|x| x[j]).sum::<f64>() / n)
            .collect();
        let inv_sd = (0..d())
            .map(|j| {
                let v = xs.iter().map(|x| (x[j] - mean[j]).powi(2)).sum::<f64>() / n;
                if v > 1e-12 { 1.0 / v.sqrt() } else { 1.0 }
            })
            .collect();
        Self {
            mean,
            inv_sd,
            w1: (0..H * d())
                .map(|_| gauss(rng) / (d() as f64).sqrt())
                .collect(),
            b1: vec![0.0; H],
            w2: (0..K * H).map(|_| gauss(rng) / (H as f64).sqrt()).collect(),
            b2: vec![0.0; K],
        }
    }

    fn forward(&self, x: &[f64]) -> (Vec<f64>, [f64; H], [f64; K]) {
        let mut z = vec![0.0; d()];
        for j in 0..d() {
            z[j] = (x[j] - self.mean[j]) * self.inv_sd[j];
        }
        let mut h = [0.0; H];
        for i in 0..H {
            let a: f64 = self.b1[i] + (0..d()).map(|j| self.w1[i * d() + j] * z[j]).sum::<f64>();
            h[i] = a.tanh();
        }
        let mut p = [0.0; K];
        for k in 0..K {
            p[k] = self.b2[k] + (0..H).map(|i| self.w2[k * H + i] * h[i]).sum::<f64>();
        }
        let m = p.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = p
            .iter_mut()
            .map(|v| {
                *v = (*v - m).exp();
                *v
            })
            .sum();
        for v in &mut p {
            *v /= s;
        }
        (z, h, p)
    }

    fn probs(&self, x: &[f64]) -> Vec<f64> {
        self.forward(x).2.to_vec()
    }

    fn predict(&self, x: &[f64]) -> usize {
        argmax(&self.forward(x).2)
    }

    /// Plain SGD with momentum on cross-entropy against soft targets.
    fn train(&mut self, xs: &[Vec<f64>], ys: &[Vec<f64>], steps: usize, rng: &mut StdRng) {
        if xs.is_empty() {
            return;
        }
        let (mut v1, mut vb1) = (vec![0.0; H * d()], vec![0.0; H]);
        let (mut v2, mut vb2) = (vec![0.0; K * H], vec![0.0; K]);
        let mu = 0.9;
        for t in 0..steps {
            let lr = 0.02 * (1.0 - t as f64 / steps as f64) + 0.001;
            let i = rng.random_range(0..xs.len());
            let (z, h, p) = self.forward(&xs[i]);
            let mut dl = [0.0; K];
            for k in 0..K {
                dl[k] = p[k] - ys[i][k];
            }
            let mut dh = [0.0; H];
            for k in 0..K {
                for j in 0..H {
                    dh[j] += dl[k] * self.w2[k * H + j];
                    let g = dl[k] * h[j];
                    v2[k * H + j] = mu * v2[k * H + j] - lr * g;
                    self.w2[k * H + j] += v2[k * H + j];
                }
                vb2[k] = mu * vb2[k] - lr * dl[k];
                self.b2[k] += vb2[k];
            }
            for j in 0..H {
                let da = dh[j] * (1.0 - h[j] * h[j]);
                for q in 0..d() {
                    let g = da * z[q];
                    v1[j * d() + q] = mu * v1[j * d() + q] - lr * g;
                    self.w1[j * d() + q] += v1[j * d() + q];
                }
                vb1[j] = mu * vb1[j] - lr * da;
                self.b1[j] += vb1[j];
            }
        }
    }

    /// Sign of d p_class / d x (the Jacobian row used by augmentation).
    fn grad_sign(&self, x: &[f64], class: usize) -> Vec<f64> {
        let (_, h, p) = self.forward(x);
        let mut dh = [0.0; H];
        for k in 0..K {
            let dpk = p[class] * (f64::from(u8::from(k == class)) - p[k]);
            for j in 0..H {
                dh[j] += dpk * self.w2[k * H + j];
            }
        }
        (0..d())
            .map(|q| {
                let g: f64 = (0..H)
                    .map(|j| dh[j] * (1.0 - h[j] * h[j]) * self.w1[j * d() + q])
                    .sum::<f64>()
                    * self.inv_sd[q];
                if g >= 0.0 { 1.0 } else { -1.0 }
            })
            .collect()
    }
}

fn argmax(p: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in p.iter().enumerate() {
        if v > p[best] {
            best = i;
        }
    }
    best
}

fn one_hot(k: usize) -> Vec<f64> {
    (0..K).map(|i| f64::from(u8::from(i == k))).collect()
}

fn agreement(a: &Mlp, b: &Mlp, eval: &[Vec<f64>]) -> f64 {
    eval.iter().filter(|x| a.predict(x) == b.predict(x)).count() as f64 / eval.len() as f64
}

/// The surrogate an attacker fits to what it was answered.
fn surrogate(data: &[(Vec<f64>, Vec<f64>)], seed: u64) -> Option<Mlp> {
    if data.len() < 2 {
        return None;
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let xs: Vec<Vec<f64>> = data.iter().map(|(x, _)| x.clone()).collect();
    let ys: Vec<Vec<f64>> = data.iter().map(|(_, y)| y.clone()).collect();
    let mut m = Mlp::new(&mut rng, &xs);
    m.train(&xs, &ys, (data.len() * 60).clamp(5_000, 60_000), &mut rng);
    Some(m)
}

/// The victim's answer as the proxy lets it out, through `outputs::limit`.
fn answer(victim: &Mlp, x: &[f64], outputs: Outputs) -> Vec<f64> {
    let mut doc = json!({ "predictions": [victim.probs(x)] });
    limit(&mut doc, Shape::Rows, "", outputs);
    match &doc["predictions"][0] {
        Value::Array(a) => a.iter().map(|v| v.as_f64().unwrap()).collect(),
        v => one_hot(v.as_u64().unwrap() as usize),
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

// ---------------------------------------------------------------- benign traffic

enum Request {
    Features(Vec<f64>),
    Llm {
        logprobs: bool,
        top: u32,
        bias: Vec<(u32, f64)>,
        max_tokens: u32,
    },
}

struct Benign {
    id: String,
    llm: bool,
    heavy: bool,
    max_step: Step,
    /// Highest value of each signal over the day, and when refuse was reached.
    max_signals: [f64; 5],
    refused_at: Option<usize>,
    sent: usize,
}

/// One day of honest traffic: (time, user, request), sorted by time.
fn benign_day(task: &Task, rng: &mut StdRng) -> (Vec<Benign>, Vec<(f64, usize, Request)>) {
    let mut users = Vec::new();
    let mut events = Vec::new();
    // Feature-API users: lognormal volume (median ~60 a day), one 30x heavy user.
    for u in 0..200 {
        let heavy = u == 0;
        let prefs: Vec<f64> = (0..K).map(|_| rng.random_range(0.05..1.0)).collect();
        let total: f64 = prefs.iter().sum();
        let mut recent: VecDeque<Vec<f64>> = VecDeque::new();
        for day in 0..DAYS {
            let volume = if heavy {
                1_800
            } else {
                (60.0 * (0.8 * gauss(rng)).exp()).clamp(3.0, 600.0) as usize
            };
            let start = day as f64 * DAY + rng.random_range(0.0..DAY * 0.6);
            let span = if heavy {
                DAY * 0.4
            } else {
                rng.random_range(DAY * 0.05..DAY * 0.4)
            };
            let mut sent = 0;
            while sent < volume {
                // Requests carry 1-4 instances.
                let batch = rng.random_range(1..=4).min(volume - sent);
                let t = start + rng.random_range(0.0..span);
                for _ in 0..batch {
                    let r: f64 = rng.random();
                    let x = if r < 0.10 && !recent.is_empty() {
                        // A retry or a cached page: an exact repeat.
                        recent[rng.random_range(0..recent.len())].clone()
                    } else if r < 0.13 && !recent.is_empty() {
                        // The same record with one field edited.
                        let mut x = recent[rng.random_range(0..recent.len())].clone();
                        let j = rng.random_range(0..d());
                        x[j] += task.scale[j] * gauss(rng);
                        x
                    } else {
                        let mut pick = rng.random_range(0.0..total);
                        let mut c = 0;
                        while c < K - 1 && pick > prefs[c] {
                            pick -= prefs[c];
                            c += 1;
                        }
                        task.sample_class(rng, c)
                    };
                    if recent.len() == 20 {
                        recent.pop_front();
                    }
                    recent.push_back(x.clone());
                    events.push((t, users.len(), Request::Features(x)));
                    sent += 1;
                }
            }
        }
        users.push(Benign {
            id: format!("spiffe://bench.test/ns/app/sa/predict-{u}"),
            llm: false,
            heavy,
            max_step: Step::Normal,
            max_signals: [0.0; 5],
            refused_at: None,
            sent: 0,
        });
    }
    // LLM users: chat, sometimes logprobs with a small top_logprobs, rarely a
    // fixed logit_bias; one heavy user classifying with logprobs every time.
    for u in 0..50 {
        let heavy = u == 0;
        let own_bias: Vec<(u32, f64)> = (0..rng.random_range(1..=3))
            .map(|_| (rng.random_range(0..VOCAB), -100.0))
            .collect();
        for day in 0..DAYS {
            let volume = if heavy {
                3_000
            } else {
                rng.random_range(20..300)
            };
            let start = day as f64 * DAY + rng.random_range(0.0..DAY * 0.6);
            for _ in 0..volume {
                let t = start + rng.random_range(0.0..DAY * 0.4);
                let req = if heavy {
                    Request::Llm {
                        logprobs: true,
                        top: 5,
                        bias: Vec::new(),
                        max_tokens: 1,
                    }
                } else {
                    let logprobs = rng.random::<f64>() < 0.2;
                    Request::Llm {
                        logprobs,
                        top: if logprobs { rng.random_range(1..=5) } else { 0 },
                        bias: if rng.random::<f64>() < 0.02 {
                            own_bias.clone()
                        } else {
                            Vec::new()
                        },
                        max_tokens: rng.random_range(50..800),
                    }
                };
                events.push((t, users.len(), req));
            }
        }
        users.push(Benign {
            id: format!("spiffe://bench.test/ns/chat/sa/assistant-{u}"),
            llm: true,
            heavy,
            max_step: Step::Normal,
            max_signals: [0.0; 5],
            refused_at: None,
            sent: 0,
        });
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0));
    (users, events)
}

// ---------------------------------------------------------------- attackers

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Uniform,
    Jbda,
    TRnd,
    Noise,
    Boundary,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Uniform => "uniform random",
            Kind::Jbda => "JbDA (Papernot)",
            Kind::TRnd => "T-RND (PRADA)",
            Kind::Noise => "seed + noise",
            Kind::Boundary => "boundary bisection",
        }
    }
}

struct Attack {
    kind: Kind,
    rng: StdRng,
    lo: Vec<f64>,
    hi: Vec<f64>,
    seeds: Vec<Vec<f64>>,
    pending: VecDeque<Vec<f64>>,
    data: Vec<(Vec<f64>, Vec<f64>)>,
    /// Boundary search: (lo, lo label, hi, steps left).
    search: Option<(Vec<f64>, usize, Vec<f64>, u32)>,
    sent: usize,
    /// prada, duplicates, sweep, coverage after each query (diagnostics).
    trace: Vec<[f64; 4]>,
}

impl Attack {
    fn new(kind: Kind, task: &Task, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        // What an attacker knows: a handful of natural samples and the
        // features' documented ranges.
        let seeds: Vec<Vec<f64>> = (0..20).map(|_| task.sample(&mut rng).0).collect();
        let mut probe = StdRng::seed_from_u64(1);
        let range: Vec<Vec<f64>> = (0..2000).map(|_| task.sample(&mut probe).0).collect();
        let lo = (0..d())
            .map(|j| range.iter().map(|x| x[j]).fold(f64::INFINITY, f64::min))
            .collect();
        let hi = (0..d())
            .map(|j| range.iter().map(|x| x[j]).fold(f64::NEG_INFINITY, f64::max))
            .collect();
        let n_seeds = match kind {
            Kind::Uniform => 0,
            Kind::Jbda | Kind::TRnd | Kind::Noise => 10,
            Kind::Boundary => 20,
        };
        let pending = seeds.iter().take(n_seeds).cloned().collect();
        Self {
            kind,
            rng,
            lo,
            hi,
            seeds,
            pending,
            data: Vec::new(),
            search: None,
            sent: 0,
            trace: Vec::new(),
        }
    }

    fn step_sizes(&self) -> Vec<f64> {
        let n = self.seeds.len() as f64;
        (0..d())
            .map(|j| {
                let m = self.seeds.iter().map(|x| x[j]).sum::<f64>() / n;
                let v = self.seeds.iter().map(|x| (x[j] - m).powi(2)).sum::<f64>() / n;
                0.3 * v.sqrt()
            })
            .collect()
    }

    fn next(&mut self) -> Option<Vec<f64>> {
        if self.sent >= BUDGET {
            return None;
        }
        if let Some(x) = self.pending.pop_front() {
            self.sent += 1;
            return Some(x);
        }
        let x = match self.kind {
            Kind::Uniform => (0..d())
                .map(|j| self.rng.random_range(self.lo[j]..self.hi[j]))
                .collect(),
            Kind::Jbda | Kind::TRnd => {
                // A new augmentation round over everything answered so far.
                let sub = surrogate(&self.data, self.rng.random())?;
                let lambda = self.step_sizes();
                let mut round: Vec<Vec<f64>> = self
                    .data
                    .iter()
                    .map(|(x, y)| {
                        let class = if self.kind == Kind::Jbda {
                            argmax(y)
                        } else {
                            self.rng.random_range(0..K)
                        };
                        let g = sub.grad_sign(x, class);
                        x.iter()
                            .zip(&g)
                            .zip(&lambda)
                            .map(|((v, s), l)| v + s * l)
                            .collect()
                    })
                    .collect();
                round.shuffle(&mut self.rng);
                self.pending.extend(round);
                self.pending.pop_front()?
            }
            Kind::Noise => {
                let lambda = self.step_sizes();
                let base = self.data[self.rng.random_range(0..self.data.len())]
                    .0
                    .clone();
                base.iter()
                    .zip(&lambda)
                    .map(|(v, l)| v + l * gauss(&mut self.rng))
                    .collect()
            }
            Kind::Boundary => {
                if self.search.is_none() {
                    // Two answered points with different labels.
                    for _ in 0..100 {
                        let a = self.rng.random_range(0..self.data.len());
                        let b = self.rng.random_range(0..self.data.len());
                        let (la, lb) = (argmax(&self.data[a].1), argmax(&self.data[b].1));
                        if la != lb {
                            self.search =
                                Some((self.data[a].0.clone(), la, self.data[b].0.clone(), 10));
                            break;
                        }
                    }
                }
                let (lo, _, hi, _) = self.search.as_ref()?;
                lo.iter().zip(hi).map(|(a, b)| (a + b) / 2.0).collect()
            }
        };
        self.sent += 1;
        Some(x)
    }

    fn receive(&mut self, x: Vec<f64>, y: Vec<f64>) {
        if let Some((lo, la, hi, left)) = self.search.as_mut() {
            if argmax(&y) == *la {
                *lo = x.clone();
            } else {
                *hi = x.clone();
            }
            *left -= 1;
            if *left == 0 {
                self.search = None;
            }
        }
        self.data.push((x, y));
    }
}

/// An attacker in the day: identity, kind, seed, its state, the query at
/// which each step was first reached, queries answered.
type Attacker = (String, Kind, u64, Attack, [Option<usize>; 5], usize);

struct Outcome {
    kind: Kind,
    seed: u64,
    first: [Option<usize>; 5],
    answered: usize,
    with: f64,
    without: f64,
}

/// The attacker alone, unprotected: full probabilities for its whole budget.
fn unprotected(kind: Kind, task: &Task, victim: &Mlp, seed: u64, eval: &[Vec<f64>]) -> f64 {
    let mut a = Attack::new(kind, task, seed);
    while let Some(x) = a.next() {
        let y = answer(victim, &x, Outputs::Full);
        a.receive(x, y);
    }
    surrogate(&a.data, seed).map_or(0.0, |s| agreement(&s, victim, eval))
}

// ---------------------------------------------------------------- LLM sweep

struct Sweep {
    id: String,
    order: Vec<u32>,
    per_request: usize,
    top: u32,
    pos: usize,
    sent: usize,
    revealing: usize,
    first: [Option<usize>; 5],
}

impl Sweep {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut order: Vec<u32> = (0..VOCAB).collect();
        if seed.is_multiple_of(2) {
            order.shuffle(&mut rng);
        }
        let top = if seed.is_multiple_of(3) { 5 } else { 20 };
        Self {
            id: format!("spiffe://bench.test/ns/x/sa/llm-sweep-{seed}"),
            order,
            per_request: top as usize,
            top,
            pos: 0,
            sent: 0,
            revealing: 0,
            first: [None; 5],
        }
    }

    /// Logit values a request reveals for the chosen tokens.
    fn values(&self) -> usize {
        self.revealing * self.per_request
    }
}

/// Full logit vectors (more than `hidden` entries each) that `values` make.
fn vectors(values: usize, hidden: u32) -> usize {
    values / (hidden as usize + 1)
}

// ---------------------------------------------------------------- the day

fn mark(first: &mut [Option<usize>; 5], step: Step, n: usize) {
    for (i, f) in first.iter_mut().enumerate() {
        if step as usize >= i && f.is_none() {
            *f = Some(n);
        }
    }
}

fn main() {
    let seed = std::env::var("HARNESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let mut rng = StdRng::seed_from_u64(seed);
    let task = Task::new(&mut rng);
    let train: Vec<(Vec<f64>, usize)> = (0..4000).map(|_| task.sample(&mut rng)).collect();
    let eval: Vec<Vec<f64>> = (0..2000).map(|_| task.sample(&mut rng).0).collect();
    let xs: Vec<Vec<f64>> = train.iter().map(|(x, _)| x.clone()).collect();
    let ys: Vec<Vec<f64>> = train.iter().map(|(_, c)| one_hot(*c)).collect();
    let mut victim = Mlp::new(&mut rng, &xs);
    victim.train(&xs, &ys, 120_000, &mut rng);
    let mut erng = StdRng::seed_from_u64(99);
    let acc = (0..2000)
        .filter(|_| {
            let (x, c) = task.sample(&mut erng);
            victim.predict(&x) == c
        })
        .count() as f64
        / 2000.0;

    let mut settings = Settings::default();
    if std::env::var_os("HARNESS_RAW_W").is_some() {
        // Diagnostics: the prada signal becomes 1 - W, nothing escalates.
        settings.prada.w_alarm = 0.0;
        settings.prada.w_ok = 1.0;
        settings.ladder.warn = 2.0;
        settings.ladder.degrade = 2.0;
        settings.ladder.refuse = 2.0;
        settings.ladder.deny = 2.0;
    }
    let hidden = settings.hidden_size;
    let detector = Detector::new(settings.clone());
    let (mut users, benign) = benign_day(&task, &mut rng);

    // Attackers start at random times of the last day, one query a second.
    let last_day = (DAYS as u64 - 1) * 86_400_000;
    let kinds = [
        Kind::Uniform,
        Kind::Jbda,
        Kind::TRnd,
        Kind::Noise,
        Kind::Boundary,
    ];
    let mut attacks: Vec<Attacker> = Vec::new();
    let mut sweeps: Vec<Sweep> = (0..SEEDS_PER_KIND).map(|s| Sweep::new(1000 + s)).collect();
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
    for (ki, &kind) in kinds.iter().enumerate() {
        for s in 0..SEEDS_PER_KIND {
            let seed = 100 * ki as u64 + s;
            heap.push(Reverse((
                last_day + rng.random_range(3_600_000..82_800_000),
                attacks.len(),
            )));
            attacks.push((
                format!("spiffe://bench.test/ns/x/sa/{kind:?}-{s}").to_lowercase(),
                kind,
                seed,
                Attack::new(kind, &task, seed),
                [None; 5],
                0,
            ));
        }
    }
    let n_feature_attacks = attacks.len();
    for i in 0..sweeps.len() {
        heap.push(Reverse((
            last_day + rng.random_range(3_600_000..82_800_000),
            n_feature_attacks + i,
        )));
    }

    let mut observe_ns = 0u128;
    let mut observed = 0u64;
    let mut observe = |id: &str, q: Query<'_>| {
        let t = Instant::now();
        let a = detector.observe(id, q);
        observe_ns += t.elapsed().as_nanos();
        observed += 1;
        a
    };
    let mut b = 0;
    loop {
        let next_attack = heap.peek().map(|Reverse((t, _))| *t as f64 / 1000.0);
        let next_benign = benign.get(b).map(|e| e.0);
        let attack_first = match (next_attack, next_benign) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(a), Some(bt)) => a < bt,
        };
        if !attack_first {
            let (_, u, req) = &benign[b];
            b += 1;
            let user = &mut users[*u];
            let a = match req {
                Request::Features(x) => observe(&user.id, Query::Features(x)),
                Request::Llm {
                    logprobs,
                    top,
                    bias,
                    max_tokens,
                } => observe(
                    &user.id,
                    Query::Llm(LlmQuery {
                        prompt: "Summarize the following support ticket for the on-call engineer.",
                        logprobs: *logprobs,
                        top_logprobs: *top,
                        logit_bias: bias,
                        max_tokens: *max_tokens,
                    }),
                ),
            };
            user.max_step = user.max_step.max(a.step);
            user.sent += 1;
            let sig = [
                a.signals.prada,
                a.signals.duplicates,
                a.signals.sweep,
                a.signals.probing,
                a.signals.coverage,
            ];
            for (m, v) in user.max_signals.iter_mut().zip(sig) {
                *m = m.max(v);
            }
            if a.step >= Step::Refuse && user.refused_at.is_none() {
                user.refused_at = Some(user.sent);
            }
            continue;
        }
        let Some(Reverse((t, i))) = heap.pop() else {
            break;
        };
        if i < n_feature_attacks {
            let (id, _, _, attack, first, answered) = &mut attacks[i];
            let Some(x) = attack.next() else { continue };
            let a = observe(id, Query::Features(&x));
            attack.trace.push([
                a.signals.prada,
                a.signals.duplicates,
                a.signals.sweep,
                a.signals.coverage,
            ]);
            mark(first, a.step, attack.sent);
            // From refuse on the attacker is cut and gets nothing more.
            if let Some(outputs) = policy(a.step) {
                let y = answer(&victim, &x, outputs);
                attack.receive(x, y);
                *answered += 1;
                heap.push(Reverse((t + 1000, i)));
            }
        } else {
            let s = &mut sweeps[i - n_feature_attacks];
            let bias: Vec<(u32, f64)> = (0..s.per_request)
                .map(|k| (s.order[(s.pos + k) % s.order.len()], 100.0))
                .collect();
            s.pos += s.per_request;
            s.sent += 1;
            let a = observe(
                &s.id,
                Query::Llm(LlmQuery {
                    prompt: "The",
                    logprobs: true,
                    top_logprobs: s.top,
                    logit_bias: &bias,
                    max_tokens: 1,
                }),
            );
            mark(&mut s.first, a.step, s.sent);
            if a.step >= Step::Refuse {
                continue;
            }
            if a.step < Step::Degrade {
                // From degrade on logprobs are stripped: nothing is revealed.
                s.revealing += 1;
            }
            if s.sent < SWEEP_BUDGET {
                heap.push(Reverse((t + 1000, i)));
            }
        }
    }

    println!("# Extraction detection: evaluation harness");
    println!(
        "victim: MLP {}-{H}-{K} on a {K}-class Gaussian mixture, test accuracy {:.1}%",
        d(),
        100.0 * acc
    );
    println!(
        "policy: full probabilities at normal/warn, top label only from degrade, 429 from refuse; ladder warn {} degrade {} refuse {} deny {}",
        settings.ladder.warn, settings.ladder.degrade, settings.ladder.refuse, settings.ladder.deny
    );
    println!(
        "attack budget {BUDGET} queries; agreement = surrogate vs victim top-1 on {} held-out natural samples\n",
        eval.len()
    );

    let mut outcomes = Vec::new();
    for (_, kind, seed, attack, first, answered) in &attacks {
        let with = surrogate(&attack.data, *seed).map_or(0.0, |s| agreement(&s, &victim, &eval));
        let without = unprotected(*kind, &task, &victim, *seed, &eval);
        outcomes.push(Outcome {
            kind: *kind,
            seed: *seed,
            first: *first,
            answered: *answered,
            with,
            without,
        });
    }
    let show = |f: Option<usize>| f.map_or("-".to_string(), |n| n.to_string());
    println!(
        "{:<20} {:>4} {:>8} {:>6} {:>8} {:>7} {:>9} {:>13} {:>16}",
        "attacker",
        "seed",
        "detected",
        "warn",
        "degrade",
        "refuse",
        "answered",
        "agree warden",
        "agree no warden"
    );
    for o in &outcomes {
        println!(
            "{:<20} {:>4} {:>8} {:>6} {:>8} {:>7} {:>9} {:>12.1}% {:>15.1}%",
            o.kind.name(),
            o.seed,
            if o.first[3].is_some() { "yes" } else { "NO" },
            show(o.first[1]),
            show(o.first[2]),
            show(o.first[3]),
            o.answered,
            100.0 * o.with,
            100.0 * o.without
        );
    }
    println!();
    println!(
        "{:<20} {:>9} {:>18} {:>18} {:>15} {:>17}",
        "summary",
        "detected",
        "median to refuse",
        "max to refuse",
        "agree warden",
        "agree no warden"
    );
    let mut all_detected = 0;
    for kind in kinds {
        let os: Vec<&Outcome> = outcomes.iter().filter(|o| o.kind == kind).collect();
        let mut q: Vec<usize> = os.iter().filter_map(|o| o.first[3]).collect();
        q.sort_unstable();
        all_detected += q.len();
        let mean =
            |f: &dyn Fn(&Outcome) -> f64| os.iter().map(|o| f(o)).sum::<f64>() / os.len() as f64;
        println!(
            "{:<20} {:>6}/{:<2} {:>18} {:>18} {:>14.1}% {:>16.1}%",
            kind.name(),
            q.len(),
            os.len(),
            q.get(q.len() / 2).map_or("-".into(), |v| v.to_string()),
            q.last().map_or("-".into(), |v| v.to_string()),
            100.0 * mean(&|o| o.with),
            100.0 * mean(&|o| o.without)
        );
    }
    println!(
        "feature-API attackers detected: {all_detected}/{} ({:.0}%)",
        outcomes.len(),
        100.0 * all_detected as f64 / outcomes.len() as f64
    );

    println!(
        "\nLLM logit_bias sweep (max_tokens 1, logit_bias on the next top_logprobs token ids), hidden size {hidden}:"
    );
    println!(
        "{:<6} {:>4} {:>8} {:>6} {:>8} {:>7} {:>16} {:>22} {:>26}",
        "seed",
        "top",
        "order",
        "warn",
        "degrade",
        "refuse",
        "values revealed",
        "full vectors (warden)",
        format!("queries for {} vectors", hidden + 1)
    );
    let mut sweeps_stopped = 0;
    for (i, s) in sweeps.iter().enumerate() {
        let v = vectors(s.values(), hidden);
        if s.first[3].is_some() && v < hidden as usize {
            sweeps_stopped += 1;
        }
        let needed = (hidden as usize + 1) * (hidden as usize + 1) / s.per_request;
        println!(
            "{:<6} {:>4} {:>8} {:>6} {:>8} {:>7} {:>16} {:>14} of {:<5} {:>26}",
            i,
            s.top,
            if (1000 + i).is_multiple_of(2) {
                "random"
            } else {
                "in order"
            },
            show(s.first[1]),
            show(s.first[2]),
            show(s.first[3]),
            s.values(),
            v,
            hidden,
            needed
        );
    }
    println!(
        "LLM sweeps stopped before {hidden} full vectors: {sweeps_stopped}/{}",
        sweeps.len()
    );

    println!("\nbenign identities over the day:");
    let count = |llm: bool, at: Step| {
        users
            .iter()
            .filter(|u| u.llm == llm && u.max_step >= at)
            .count()
    };
    for (llm, name) in [(false, "predict API"), (true, "LLM API")] {
        let n = users.iter().filter(|u| u.llm == llm).count();
        println!(
            "  {name:<12} {n:>4} identities: warn {} degrade {} refuse {} deny {}",
            count(llm, Step::Warn),
            count(llm, Step::Degrade),
            count(llm, Step::Refuse),
            count(llm, Step::Deny)
        );
    }
    for u in users.iter().filter(|u| u.heavy) {
        println!(
            "  heavy honest {} user ({}): highest step {}",
            if u.llm { "LLM" } else { "predict" },
            u.id,
            u.max_step.label()
        );
    }
    for (i, name) in ["prada", "duplicates", "sweep", "probing", "coverage"]
        .iter()
        .enumerate()
    {
        let n = users.iter().filter(|u| u.max_signals[i] >= 0.5).count();
        let worst = users.iter().map(|u| u.max_signals[i]).fold(0.0, f64::max);
        println!("  signal {name:<10}: {n} benign identities ever at >= 0.5 (highest {worst:.2})");
    }
    if std::env::var_os("HARNESS_DEBUG").is_some() {
        for u in users.iter().filter(|u| u.max_step >= Step::Refuse) {
            println!(
                "  flagged {} after {:?} of {} queries: {:?}",
                u.id, u.refused_at, u.sent, u.max_signals
            );
        }
    }
    if std::env::var_os("HARNESS_DEBUG").is_some() {
        let mut w: Vec<f64> = users
            .iter()
            .filter(|u| !u.llm)
            .map(|u| u.max_signals[0])
            .collect();
        w.sort_by(f64::total_cmp);
        println!(
            "  benign max prada signal quantiles 50/90/95/99/max: {:.3} {:.3} {:.3} {:.3} {:.3}",
            w[w.len() / 2],
            w[w.len() * 9 / 10],
            w[w.len() * 95 / 100],
            w[w.len() * 99 / 100],
            w[w.len() - 1]
        );
        for (_, kind, seed, attack, _, _) in &attacks {
            let at = |n: usize| {
                attack.trace.get(n - 1).map_or("-".to_string(), |t| {
                    format!("{:.2}/{:.2}/{:.2}/{:.2}", t[0], t[1], t[2], t[3])
                })
            };
            println!(
                "  {:<20} {seed:>4} signals p/d/s/c at 30: {} 40: {} 64: {} 100: {} 400: {}",
                kind.name(),
                at(30),
                at(40),
                at(64),
                at(100),
                at(400)
            );
        }
    }
    if std::env::var_os("HARNESS_DEBUG").is_some() {
        println!("{detector:?}");
    }
    let fp = users.iter().filter(|u| u.max_step >= Step::Refuse).count();
    println!(
        "benign false positives (ever reached refuse): {fp}/{} = {:.2}%",
        users.len(),
        100.0 * fp as f64 / users.len() as f64
    );
    println!(
        "queries observed: {observed} (benign {}), identities tracked at the end: {}",
        benign.len(),
        detector.tracked()
    );
    println!(
        "mean observe() cost over the day: {:.2} us",
        observe_ns as f64 / observed as f64 / 1000.0
    );

    println!("\nPRADA (Juuti et al., EuroS&P 2019), queries until detection as reported there");
    println!("(MNIST / GTSRB; recalled from the paper, not re-verified here):");
    for (attack, figures) in PRADA_REPORTED {
        println!("  {attack:<32} {figures}");
    }
    let worst = outcomes
        .iter()
        .filter_map(|o| o.first[3])
        .max()
        .unwrap_or(0);
    println!("here: every detected feature-API attacker within {worst} queries\n");

    // observe() in isolation, with a full history.
    let mut c = Criterion::default().configure_from_args();
    bench_observe(&mut c, &task);
    c.final_summary();
}

fn bench_observe(c: &mut Criterion, task: &Task) {
    let d = Detector::new(Settings::default());
    let mut rng = StdRng::seed_from_u64(7);
    let xs: Vec<Vec<f64>> = (0..4096).map(|_| task.sample(&mut rng).0).collect();
    for x in &xs {
        d.observe("spiffe://bench.test/ns/a/sa/warm", Query::Features(x));
    }
    let mut g = c.benchmark_group("detect");
    let mut i = 0;
    g.bench_function("observe features (16-d, full history)", |b| {
        b.iter(|| {
            i = (i + 1) % xs.len();
            d.observe(
                black_box("spiffe://bench.test/ns/a/sa/warm"),
                Query::Features(&xs[i]),
            )
        })
    });
    let bias = [(50256u32, -100.0)];
    g.bench_function("observe chat completion", |b| {
        b.iter(|| {
            d.observe(
                black_box("spiffe://bench.test/ns/a/sa/chat"),
                Query::Llm(LlmQuery {
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
