//! One day of honest traffic to a predict route.
//!
//! A deployment has `callers` identities: one heavy honest user (3,000
//! queries, all day), one class-skewed user (asks about one class only), and
//! regular users with lognormal volumes (median 60 a day). Every caller
//! retries now and then (an exact repeat) and resubmits a record with one
//! field edited now and then, as real clients of a predict API do.

use std::collections::VecDeque;

use rand::Rng;
use rand::rngs::StdRng;

use crate::gauss;
use crate::task::Task;

pub const DAY_MS: u64 = 86_400_000;

/// Who an honest caller is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Habit {
    Heavy,
    Skewed,
    Regular,
}

/// An honest caller and what the detector made of it.
pub struct Caller {
    pub id: String,
    pub habit: Habit,
    pub sent: usize,
    pub refused: usize,
    pub degraded: usize,
    pub warned: usize,
    /// Query at which refuse was first reached.
    pub refused_at: Option<usize>,
    /// Highest value of each signal (prada, duplicates, sweep, coverage).
    pub max_signals: [f64; 4],
}

/// One honest query: time (ms), caller index, input.
pub type Event = (u64, usize, Vec<f64>);

/// The callers and their queries, sorted by time.
pub fn day(task: &Task, callers: usize, rng: &mut StdRng) -> (Vec<Caller>, Vec<Event>) {
    let mut people = Vec::new();
    let mut events = Vec::new();
    for u in 0..callers {
        let habit = match u {
            0 => Habit::Heavy,
            1 => Habit::Skewed,
            _ => Habit::Regular,
        };
        let volume = match habit {
            Habit::Heavy => 3_000,
            Habit::Skewed => 600,
            Habit::Regular => (60.0 * (0.8 * gauss(rng)).exp()).clamp(3.0, 600.0) as usize,
        };
        let favourite = rng.random_range(0..task.classes);
        let (start, span) = match habit {
            Habit::Heavy => (0, DAY_MS),
            _ => {
                let span = rng.random_range(DAY_MS / 20..DAY_MS / 2);
                (rng.random_range(0..DAY_MS - span), span)
            }
        };
        let mut recent: VecDeque<Vec<f64>> = VecDeque::new();
        for _ in 0..volume {
            let t = start + rng.random_range(0..span);
            let r: f64 = rng.random();
            let x = if r < 0.10 && !recent.is_empty() {
                // A retry or a cached page: an exact repeat.
                recent[rng.random_range(0..recent.len())].clone()
            } else if r < 0.13 && !recent.is_empty() {
                // The same record with one field edited.
                let mut x = recent[rng.random_range(0..recent.len())].clone();
                let j = rng.random_range(0..task.width);
                x[j] = (x[j] + task.spread(j) * gauss(rng)).clamp(task.lo[j], task.hi[j]);
                x
            } else if habit == Habit::Skewed {
                task.sample_class(rng, favourite)
            } else {
                task.sample(rng).0
            };
            if recent.len() == 20 {
                recent.pop_front();
            }
            recent.push_back(x.clone());
            events.push((t, people.len(), x));
        }
        people.push(Caller {
            id: format!("spiffe://bench.test/ns/app/sa/{habit:?}-{u}").to_lowercase(),
            habit,
            sent: 0,
            refused: 0,
            degraded: 0,
            warned: 0,
            refused_at: None,
            max_signals: [0.0; 4],
        });
    }
    events.sort_by_key(|e| e.0);
    (people, events)
}
