//! Bounded per-identity state, shared by every connection of a route.
//!
//! Identities are spread over shards by a hash of the SPIFFE ID, each shard
//! behind its own short-held mutex. Each shard holds at most its share of
//! `max_identities` (the shares add up to it exactly) and evicts its least
//! recently seen identity to make room, in O(1) ([`LruMap`]). An identity
//! evicted above `Normal` leaves its step behind in a small per-shard table
//! (at most as many entries as the shard holds identities), so that a crowd
//! of new identities cannot wash out an escalation: the step stays sticky
//! for as long as it is remembered there. When that table is full, the
//! least recently evicted of its mildest steps is forgotten, also in O(1):
//! nothing here scans a table under its lock.

use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::Step;
use crate::lru::LruMap;

/// What the tracker needs to know of an identity's state.
pub trait Tracked {
    /// A fresh state starting at `step` (remembered from an earlier life).
    fn starting_at(step: Step) -> Self;
    /// Its current step.
    fn step(&self) -> Step;
}

/// The steps an evicted identity is remembered at, mildest first.
const REMEMBERED: [Step; 4] = [Step::Warn, Step::Degrade, Step::Refuse, Step::Deny];

struct Shard<T> {
    live: LruMap<T>,
    /// Escalated identities that were evicted, one table per step of
    /// [`REMEMBERED`], each in eviction order.
    remembered: [LruMap<()>; 4],
}

impl<T: Tracked> Shard<T> {
    fn new() -> Self {
        Self {
            live: LruMap::default(),
            remembered: Default::default(),
        }
    }

    /// The remembered step of `key`, forgetting it.
    fn recall(&mut self, key: &str) -> Option<Step> {
        for (table, step) in self.remembered.iter_mut().zip(REMEMBERED) {
            if let Some(i) = table.find(key) {
                table.remove(i);
                return Some(step);
            }
        }
        None
    }

    fn remembered_step(&self, key: &str) -> Option<Step> {
        self.remembered
            .iter()
            .zip(REMEMBERED)
            .find(|(t, _)| t.find(key).is_some())
            .map(|(_, s)| s)
    }

    fn remember(&mut self, key: std::sync::Arc<str>, step: Step, cap: usize) {
        let Some(at) = REMEMBERED.iter().position(|s| *s == step) else {
            return;
        };
        let held: usize = self.remembered.iter().map(LruMap::len).sum();
        if held >= cap {
            // Forget the least recently evicted of the mildest steps, if
            // none is above this one (rare: only when many escalated
            // identities are evicted).
            let Some(table) = self.remembered[..=at].iter_mut().find(|t| !t.is_empty()) else {
                return;
            };
            if let Some(i) = table.oldest() {
                table.remove(i);
            }
        }
        self.remembered[at].insert(key, ());
    }
}

/// Sharded, bounded map from identity to `T`, least recently seen evicted.
pub struct Tracker<T> {
    shards: Box<[Mutex<Shard<T>>]>,
    hasher: RandomState,
    /// Identities each shard may hold: `max` split evenly, so they add up
    /// to exactly `max`.
    caps: Box<[usize]>,
    tracked: AtomicUsize,
}

impl<T: Tracked> Tracker<T> {
    /// A tracker of at most `max` identities over `shards` shards.
    pub fn new(max: usize, shards: usize) -> Self {
        let max = max.max(1);
        let shards = shards.clamp(1, max);
        Self {
            shards: (0..shards).map(|_| Mutex::new(Shard::new())).collect(),
            hasher: RandomState::new(),
            caps: (0..shards)
                .map(|i| max / shards + usize::from(i < max % shards))
                .collect(),
            tracked: AtomicUsize::new(0),
        }
    }

    fn shard(&self, key: &str) -> (&Mutex<Shard<T>>, usize) {
        let i = (self.hasher.hash_one(key) % self.shards.len() as u64) as usize;
        (&self.shards[i], self.caps[i])
    }

    /// Runs `f` on the state of `key`, creating it (and evicting the shard's
    /// least recently seen identity when full) if needed; marks it seen.
    pub fn with<R>(&self, key: &str, f: impl FnOnce(&mut T) -> R) -> R {
        let (shard, cap) = self.shard(key);
        let mut shard = match shard.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let i = match shard.live.find(key) {
            Some(i) => {
                shard.live.touch(i);
                i
            }
            None => {
                let start = shard.recall(key).unwrap_or(Step::Normal);
                let fresh = T::starting_at(start);
                match shard.live.oldest().filter(|_| shard.live.len() >= cap) {
                    Some(victim) => {
                        let (old_key, old) = shard.live.replace(victim, key.into(), fresh);
                        shard.remember(old_key, old.step(), cap);
                        victim
                    }
                    None => {
                        self.tracked.fetch_add(1, Ordering::Relaxed);
                        shard.live.insert(key.into(), fresh)
                    }
                }
            }
        };
        f(shard.live.get_mut(i))
    }

    /// Runs `f` on the state of `key` if tracked, without marking it seen.
    pub fn peek<R>(&self, key: &str, f: impl FnOnce(&T) -> R) -> Option<R> {
        let shard = match self.shard(key).0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        shard.live.find(key).map(|i| f(shard.live.get(i)))
    }

    /// The step of `key`: its state's, else the one remembered at eviction,
    /// else `Normal`.
    pub fn step(&self, key: &str) -> Step {
        let shard = match self.shard(key).0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        match shard.live.find(key) {
            Some(i) => shard.live.get(i).step(),
            None => shard.remembered_step(key).unwrap_or(Step::Normal),
        }
    }

    /// Identities with full state now.
    pub fn len(&self) -> usize {
        self.tracked.load(Ordering::Relaxed)
    }

    /// True when no identity is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most identities ever held with full state.
    pub fn capacity(&self) -> usize {
        self.caps.iter().sum()
    }

    /// Evicted identities whose step is remembered now (for tests).
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .map(|s| s.remembered.iter().map(LruMap::len).sum::<usize>())
                    .unwrap_or(0)
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct S {
        step: Step,
        hits: u32,
    }

    impl Tracked for S {
        fn starting_at(step: Step) -> Self {
            Self { step, hits: 0 }
        }
        fn step(&self) -> Step {
            self.step
        }
    }

    #[test]
    fn least_recently_seen_is_evicted() {
        let t: Tracker<S> = Tracker::new(3, 1);
        for k in ["a", "b", "c"] {
            t.with(k, |s| s.hits += 1);
        }
        t.with("a", |s| s.hits += 1); // b is now the least recent
        t.with("d", |s| s.hits += 1);
        assert_eq!(t.len(), 3);
        assert!(t.peek("b", |_| ()).is_none());
        assert_eq!(t.peek("a", |s| s.hits), Some(2));
        assert!(t.peek("c", |_| ()).is_some());
        assert!(t.peek("d", |_| ()).is_some());
    }

    #[test]
    fn tracked_count_never_exceeds_the_cap() {
        let t: Tracker<S> = Tracker::new(100, 8);
        for i in 0..10_000 {
            t.with(&format!("spiffe://td/w/{i}"), |s| s.hits += 1);
        }
        assert!(t.len() <= 100);
        assert_eq!(t.capacity(), 100);
    }

    #[test]
    fn peek_does_not_refresh_recency() {
        let t: Tracker<S> = Tracker::new(2, 1);
        t.with("a", |_| ());
        t.with("b", |_| ());
        t.peek("a", |_| ());
        t.with("c", |_| ());
        assert!(t.peek("a", |_| ()).is_none());
    }

    #[test]
    fn evicted_escalation_is_remembered() {
        let t: Tracker<S> = Tracker::new(2, 1);
        t.with("bad", |s| s.step = Step::Refuse);
        t.with("x", |_| ());
        t.with("y", |_| ());
        assert!(t.peek("bad", |_| ()).is_none());
        assert_eq!(t.step("bad"), Step::Refuse);
        assert_eq!(t.with("bad", |s| s.step), Step::Refuse);
        assert_eq!(t.step("never-seen"), Step::Normal);
    }

    #[test]
    fn remembered_steps_stay_bounded_and_the_mildest_go_first() {
        let t: Tracker<S> = Tracker::new(4, 1);
        t.with("deny", |s| s.step = Step::Deny);
        // Many escalated identities pass through, each evicted in turn.
        for i in 0..1000 {
            t.with(&format!("warn{i}"), |s| s.step = Step::Warn);
        }
        assert!(t.remembered() <= 4, "{}", t.remembered());
        // The worst one is not washed out by a crowd of milder ones.
        assert_eq!(t.step("deny"), Step::Deny);
        // A milder step never pushes out a worse one.
        let full: Tracker<S> = Tracker::new(1, 1);
        full.with("a", |s| s.step = Step::Refuse);
        full.with("b", |s| s.step = Step::Warn);
        full.with("c", |_| ());
        assert_eq!(full.step("a"), Step::Refuse);
        assert_eq!(full.step("b"), Step::Normal);
    }
}
