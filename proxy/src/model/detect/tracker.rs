//! Bounded per-identity state, shared by every connection.
//!
//! Identities are spread over shards by a hash of the SPIFFE ID, each shard
//! behind its own short-held mutex. Each shard holds at most its share of
//! `max_identities` (the shares add up to it exactly) and evicts its least
//! recently seen identity to make room
//! (an O(1) doubly linked list over a slab). An identity evicted above
//! `Normal` leaves its step behind in a small per-shard table, so that a
//! crowd of new identities cannot wash out an escalation: the step stays
//! sticky for as long as it is remembered there.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::Step;

const NIL: usize = usize::MAX;

/// What the tracker needs to know of an identity's state.
pub trait Tracked {
    /// A fresh state starting at `step` (remembered from an earlier life).
    fn starting_at(step: Step) -> Self;
    /// Its current step.
    fn step(&self) -> Step;
}

struct Slot<T> {
    key: Arc<str>,
    value: T,
    prev: usize,
    next: usize,
}

struct Shard<T> {
    index: HashMap<Arc<str>, usize>,
    slots: Vec<Slot<T>>,
    /// Most recently seen.
    head: usize,
    /// Least recently seen.
    tail: usize,
    /// Steps of escalated identities that were evicted.
    remembered: HashMap<Arc<str>, Step>,
}

impl<T: Tracked> Shard<T> {
    fn new() -> Self {
        Self {
            index: HashMap::new(),
            slots: Vec::new(),
            head: NIL,
            tail: NIL,
            remembered: HashMap::new(),
        }
    }

    fn unlink(&mut self, i: usize) {
        let (prev, next) = (self.slots[i].prev, self.slots[i].next);
        if prev == NIL {
            self.head = next;
        } else {
            self.slots[prev].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.slots[next].prev = prev;
        }
    }

    fn push_front(&mut self, i: usize) {
        self.slots[i].prev = NIL;
        self.slots[i].next = self.head;
        if self.head != NIL {
            self.slots[self.head].prev = i;
        }
        self.head = i;
        if self.tail == NIL {
            self.tail = i;
        }
    }

    fn remember(&mut self, key: Arc<str>, step: Step, cap: usize) {
        if step == Step::Normal {
            return;
        }
        if self.remembered.len() >= cap && !self.remembered.contains_key(&key) {
            // Forget the mildest to make room (rare: only when many escalated
            // identities are evicted).
            let mildest = self
                .remembered
                .iter()
                .min_by_key(|(_, s)| **s)
                .map(|(k, s)| (k.clone(), *s));
            match mildest {
                Some((k, s)) if s <= step => {
                    self.remembered.remove(&k);
                }
                _ => return,
            }
        }
        self.remembered.insert(key, step);
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
        let i = self.hasher.hash_one(key) as usize % self.shards.len();
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
        let i = if let Some(&i) = shard.index.get(key) {
            shard.unlink(i);
            i
        } else {
            let key: Arc<str> = Arc::from(key);
            let start = shard.remembered.remove(&key).unwrap_or(Step::Normal);
            let slot = Slot {
                key: key.clone(),
                value: T::starting_at(start),
                prev: NIL,
                next: NIL,
            };
            let i = if shard.slots.len() < cap {
                shard.slots.push(slot);
                self.tracked.fetch_add(1, Ordering::Relaxed);
                shard.slots.len() - 1
            } else {
                let victim = shard.tail;
                shard.unlink(victim);
                let old = std::mem::replace(&mut shard.slots[victim], slot);
                shard.index.remove(&old.key);
                shard.remember(old.key, old.value.step(), cap);
                victim
            };
            shard.index.insert(key, i);
            i
        };
        shard.push_front(i);
        f(&mut shard.slots[i].value)
    }

    /// Runs `f` on the state of `key` if tracked, without marking it seen.
    pub fn peek<R>(&self, key: &str, f: impl FnOnce(&T) -> R) -> Option<R> {
        let shard = match self.shard(key).0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        shard.index.get(key).map(|&i| f(&shard.slots[i].value))
    }

    /// The step of `key`: its state's, else the one remembered at eviction,
    /// else `Normal`.
    pub fn step(&self, key: &str) -> Step {
        let shard = match self.shard(key).0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        match shard.index.get(key) {
            Some(&i) => shard.slots[i].value.step(),
            None => shard.remembered.get(key).copied().unwrap_or(Step::Normal),
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
}
