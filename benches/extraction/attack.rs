//! The extraction attacks: what each sends next, given what it was answered.
//!
//! Uniform random queries over the documented ranges (Tramèr et al. 2016);
//! Jacobian-based augmentation (Papernot et al. 2017) and PRADA's T-RND
//! variant (random target class); noise perturbations of known samples;
//! decision-boundary bisection between differently-labelled points; and
//! natural data from another distribution (Knockoff Nets' idea, Orekondy et
//! al. 2019). Each runs plain, paced (one query a minute instead of a
//! second) or mixed (every other query a natural one, to dilute the
//! signals).

use std::collections::VecDeque;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::gauss;
use crate::model::{argmax, surrogate};
use crate::task::{Split, Task};

/// Queries an attacker sends at most.
pub const BUDGET: usize = 1_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Uniform,
    Jbda,
    TRnd,
    Noise,
    Boundary,
    OutOfDistribution,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Uniform,
        Kind::Jbda,
        Kind::TRnd,
        Kind::Noise,
        Kind::Boundary,
        Kind::OutOfDistribution,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Uniform => "uniform random",
            Kind::Jbda => "JbDA (Papernot)",
            Kind::TRnd => "T-RND (PRADA)",
            Kind::Noise => "seed + noise",
            Kind::Boundary => "boundary bisection",
            Kind::OutOfDistribution => "natural, other data",
        }
    }
}

/// How the attack is delivered.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Variant {
    Plain,
    /// One query a minute.
    Paced,
    /// Every other query a natural sample.
    Mixed,
}

impl Variant {
    pub const ALL: [Variant; 3] = [Variant::Plain, Variant::Paced, Variant::Mixed];

    pub fn label(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::Paced => "paced",
            Variant::Mixed => "mixed",
        }
    }

    /// Milliseconds between two queries.
    pub fn interval_ms(self) -> u64 {
        match self {
            Variant::Paced => 60_000,
            _ => 1_000,
        }
    }
}

/// Another natural distribution of the same width, mapped into the task's
/// documented ranges.
struct Elsewhere {
    source: Task,
    to_lo: Vec<f64>,
    to_hi: Vec<f64>,
}

impl Elsewhere {
    fn sample(&self, rng: &mut StdRng) -> Vec<f64> {
        let x = self.source.sample(rng).0;
        x.iter()
            .enumerate()
            .map(|(j, v)| {
                let (a, b) = (self.source.lo[j], self.source.hi[j]);
                let t = if b > a { (v - a) / (b - a) } else { 0.5 };
                self.to_lo[j] + t.clamp(0.0, 1.0) * (self.to_hi[j] - self.to_lo[j])
            })
            .collect()
    }
}

pub struct Attack {
    pub kind: Kind,
    pub variant: Variant,
    classes: usize,
    rng: StdRng,
    lo: Vec<f64>,
    hi: Vec<f64>,
    seeds: Vec<Vec<f64>>,
    pending: VecDeque<Vec<f64>>,
    elsewhere: Option<Elsewhere>,
    /// Query-answer pairs it has.
    pub data: Vec<(Vec<f64>, Vec<f64>)>,
    /// Boundary search: (lo, lo label, hi, steps left).
    search: Option<(Vec<f64>, usize, Vec<f64>, u32)>,
    pub sent: usize,
    /// Whether the query in flight is a mixed-in natural one.
    natural_in_flight: bool,
}

impl Attack {
    pub fn new(kind: Kind, variant: Variant, task: &Task, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        // What an attacker knows: a handful of natural samples and the
        // inputs' documented ranges.
        let seeds: Vec<Vec<f64>> = (0..20).map(|_| task.sample(&mut rng).0).collect();
        let n_seeds = match kind {
            Kind::Uniform | Kind::OutOfDistribution => 0,
            Kind::Jbda | Kind::TRnd | Kind::Noise => 10,
            Kind::Boundary => 20,
        };
        let elsewhere = (kind == Kind::OutOfDistribution).then(|| Elsewhere {
            source: Task::mixture("elsewhere", Split::Tune, task.width, 3, 0, seed ^ 0xe15e),
            to_lo: task.lo.clone(),
            to_hi: task.hi.clone(),
        });
        Self {
            kind,
            variant,
            classes: task.classes,
            rng,
            lo: task.lo.clone(),
            hi: task.hi.clone(),
            pending: seeds.iter().take(n_seeds).cloned().collect(),
            seeds,
            elsewhere,
            data: Vec::new(),
            search: None,
            sent: 0,
            natural_in_flight: false,
        }
    }

    fn step_sizes(&self) -> Vec<f64> {
        let n = self.seeds.len() as f64;
        (0..self.lo.len())
            .map(|j| {
                let m = self.seeds.iter().map(|x| x[j]).sum::<f64>() / n;
                let v = self.seeds.iter().map(|x| (x[j] - m).powi(2)).sum::<f64>() / n;
                0.3 * v.sqrt()
            })
            .collect()
    }

    /// The next query, `None` once the budget is spent or nothing is left.
    pub fn next(&mut self, task: &Task) -> Option<Vec<f64>> {
        if self.sent >= BUDGET {
            return None;
        }
        self.natural_in_flight = self.variant == Variant::Mixed && self.sent % 2 == 1;
        if self.natural_in_flight {
            self.sent += 1;
            return Some(task.sample(&mut self.rng).0);
        }
        if let Some(x) = self.pending.pop_front() {
            self.sent += 1;
            return Some(x);
        }
        let x = match self.kind {
            Kind::Uniform => (0..self.lo.len())
                .map(|j| {
                    if self.hi[j] > self.lo[j] {
                        self.rng.random_range(self.lo[j]..self.hi[j])
                    } else {
                        self.lo[j]
                    }
                })
                .collect(),
            Kind::OutOfDistribution => self.elsewhere.as_ref()?.sample(&mut self.rng),
            Kind::Jbda | Kind::TRnd => {
                // A new augmentation round over everything answered so far.
                let sub = surrogate(&self.data, self.classes, self.rng.random())?;
                let lambda = self.step_sizes();
                let mut round: Vec<Vec<f64>> = Vec::with_capacity(self.data.len());
                for (x, y) in &self.data {
                    let class = if self.kind == Kind::Jbda {
                        argmax(y)
                    } else {
                        self.rng.random_range(0..self.classes)
                    };
                    let g = sub.grad_sign(x, class);
                    round.push(
                        x.iter()
                            .zip(&g)
                            .zip(&lambda)
                            .map(|((v, s), l)| v + s * l)
                            .collect(),
                    );
                }
                round.shuffle(&mut self.rng);
                self.pending.extend(round);
                self.pending.pop_front()?
            }
            Kind::Noise => {
                let lambda = self.step_sizes();
                let base = &self
                    .data
                    .get(self.rng.random_range(0..self.data.len().max(1)))?
                    .0;
                base.iter()
                    .zip(&lambda)
                    .map(|(v, l)| v + l * gauss(&mut self.rng))
                    .collect()
            }
            Kind::Boundary => {
                if self.search.is_none() && !self.data.is_empty() {
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

    /// The answer to the query `next` returned.
    pub fn receive(&mut self, x: Vec<f64>, y: Vec<f64>) {
        if !self.natural_in_flight
            && let Some((lo, la, hi, left)) = self.search.as_mut()
        {
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
