//! The LLM route: honest chat users (one heavy user classifying with
//! logprobs every time) next to logit_bias vocabulary sweeps that try to
//! recover full logit vectors (Carlini et al. 2024; Finlayson et al. 2024).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use warden_guard::detect::{Detector, LlmQuery, Query, Settings, Step};

use crate::mark;
use crate::traffic::DAY_MS;

const VOCAB: u32 = 32_000;
/// Requests a sweep sends at most in the day.
const SWEEP_BUDGET: usize = 20_000;
const SWEEPS: u64 = 10;

struct Sweep {
    id: String,
    order: Vec<u32>,
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
        Self {
            id: format!("spiffe://bench.test/ns/x/sa/llm-sweep-{seed}"),
            order,
            top: if seed.is_multiple_of(3) { 5 } else { 20 },
            pos: 0,
            sent: 0,
            revealing: 0,
            first: [None; 5],
        }
    }

    /// Logit values its answers revealed for the chosen tokens.
    fn values(&self) -> usize {
        self.revealing * self.top as usize
    }
}

struct Chat {
    logprobs: bool,
    top: u32,
    bias: Vec<(u32, f64)>,
    max_tokens: u32,
}

/// Runs the day and prints the report.
pub fn run(settings: &Settings) {
    let mut rng = StdRng::seed_from_u64(0x11a);
    let detector = Detector::new(settings.clone());
    let hidden = settings.hidden_size;
    // (time, user, request); user 0 is the heavy classifier.
    let mut events: Vec<(u64, usize, Chat)> = Vec::new();
    let users = 50;
    for u in 0..users {
        let own_bias: Vec<(u32, f64)> = (0..rng.random_range(1..=3))
            .map(|_| (rng.random_range(0..VOCAB), -100.0))
            .collect();
        let volume = if u == 0 {
            3_000
        } else {
            rng.random_range(20..300)
        };
        for _ in 0..volume {
            let t = rng.random_range(0..DAY_MS);
            let chat = if u == 0 {
                Chat {
                    logprobs: true,
                    top: 5,
                    bias: Vec::new(),
                    max_tokens: 1,
                }
            } else {
                let logprobs = rng.random::<f64>() < 0.2;
                Chat {
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
            events.push((t, u, chat));
        }
    }
    events.sort_by_key(|e| e.0);
    let mut highest = vec![Step::Normal; users];
    let mut sweeps: Vec<Sweep> = (0..SWEEPS).map(|s| Sweep::new(1000 + s)).collect();
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = (0..sweeps.len())
        .map(|i| Reverse((rng.random_range(0..DAY_MS / 2), i)))
        .collect();
    let mut b = 0;
    loop {
        let next_sweep = heap.peek().map(|Reverse((t, _))| *t);
        let next_user = events.get(b).map(|e| e.0);
        match (next_sweep, next_user) {
            (None, None) => break,
            (Some(s), Some(u)) if u <= s => {}
            (None, Some(_)) => {}
            _ => {
                let Some(Reverse((t, i))) = heap.pop() else {
                    break;
                };
                let s = &mut sweeps[i];
                let bias: Vec<(u32, f64)> = (0..s.top as usize)
                    .map(|k| (s.order[(s.pos + k) % s.order.len()], 100.0))
                    .collect();
                s.pos += s.top as usize;
                s.sent += 1;
                let a = detector.observe(
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
                continue;
            }
        }
        let (_, u, c) = &events[b];
        b += 1;
        let a = detector.observe(
            &format!("spiffe://bench.test/ns/chat/sa/assistant-{u}"),
            Query::Llm(LlmQuery {
                prompt: "Summarize the following support ticket for the on-call engineer.",
                logprobs: c.logprobs,
                top_logprobs: c.top,
                logit_bias: &c.bias,
                max_tokens: c.max_tokens,
            }),
        );
        highest[*u] = highest[*u].max(a.step);
    }

    println!(
        "\n## LLM route: logit_bias sweeps (max_tokens 1, logit_bias on the next top_logprobs token ids), hidden size {hidden}\n"
    );
    println!(
        "{:<6} {:>4} {:>8} {:>6} {:>8} {:>7} {:>16} {:>22}",
        "sweep", "top", "order", "warn", "degrade", "refuse", "values revealed", "full vectors"
    );
    let show = |f: Option<usize>| f.map_or("-".to_string(), |n| n.to_string());
    let mut stopped = 0;
    for (i, s) in sweeps.iter().enumerate() {
        // A full logit vector takes hidden + 1 values.
        let vectors = s.values() / (hidden as usize + 1);
        if s.first[3].is_some() && vectors < hidden as usize {
            stopped += 1;
        }
        println!(
            "{:<6} {:>4} {:>8} {:>6} {:>8} {:>7} {:>16} {:>14} of {:<5}",
            i,
            s.top,
            if i % 2 == 0 { "random" } else { "in order" },
            show(s.first[1]),
            show(s.first[2]),
            show(s.first[3]),
            s.values(),
            vectors,
            hidden
        );
    }
    println!(
        "sweeps stopped before {hidden} full vectors (the hidden size is never recovered): {stopped}/{}",
        sweeps.len()
    );
    let at = |s: Step| highest.iter().filter(|h| **h >= s).count();
    println!(
        "honest chat users: {users}, at warn {} degrade {} refuse {}; heavy logprobs classifier's highest step: {}",
        at(Step::Warn),
        at(Step::Degrade),
        at(Step::Refuse),
        highest[0].label()
    );
}
