//! Limit state in this process, sharded so that callers rarely wait for
//! one another and routes never do (each route owns its store: see
//! [`super::Store::for_route`]).
//!
//! A key's shard is chosen by a hash of its subject (the caller, its
//! namespace or its trust domain), so every quota of one level lives in one
//! shard and an admission locks at most three shards, always in ascending
//! order (no deadlock), holding them while it checks and charges every
//! quota: the step stays atomic.
//!
//! Each shard is bounded (its share of `capacity`) and makes room in O(1):
//! of the [`EVICTION_PROBES`] least recently used keys it drops the first
//! that is equivalent to no state (a full GCRA bucket, windows with nothing
//! counted, no slot held), else the least recently used. A key that holds a
//! concurrency slot is pinned, never dropped; there are at most three per
//! request in flight. What eviction forgets of one caller, its namespace
//! and trust-domain aggregates still hold.

use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{
    Ask, Denial, Headroom, Hold, Kind, Level, Plan, Reservation, Subjects, write_state_key,
};
use crate::lru::LruMap;

/// Keys kept by default, per route (about 150 bytes each).
pub const DEFAULT_CAPACITY: usize = 100_000;

/// Most shards of one store.
const MAX_SHARDS: usize = 64;

/// Fewest keys a shard is sized for (a small store has fewer shards).
const MIN_SHARD_KEYS: usize = 64;

/// Least recently used keys looked at, at most, to find one to drop.
pub const EVICTION_PROBES: usize = 8;

#[derive(Debug, Clone, Copy)]
enum State {
    /// GCRA theoretical arrival time, µs since the epoch.
    Tat(u64),
    /// Fixed window `idx` (window start = idx * length) and the one before.
    Window { idx: u64, cur: u64, prev: u64 },
    /// Requests in progress.
    Slots(u32),
}

impl State {
    fn holds_slots(self) -> bool {
        matches!(self, State::Slots(n) if n > 0)
    }
}

/// One shard: its keys in recency order, at most `cap` of them unpinned.
struct Shard {
    map: LruMap<State>,
    cap: usize,
}

impl Shard {
    fn state(&self, key: &str) -> Option<State> {
        self.map.find(key).map(|i| *self.map.get(i))
    }

    /// Writes `state` under `key` (marking it used), making room first.
    fn put(&mut self, key: &str, state: State, now_us: u64) {
        let i = match self.map.find(key) {
            Some(i) => {
                *self.map.get_mut(i) = state;
                self.map.touch(i);
                i
            }
            None => {
                match self.victim(now_us) {
                    Some(v) => {
                        self.map.replace(v, Arc::from(key), state);
                        v
                    }
                    // Room left, or every key holds a slot (bounded by the requests in flight).
                    None => self.map.insert(Arc::from(key), state),
                }
            }
        };
        if state.holds_slots() {
            self.map.pin(i);
        }
    }

    /// The key to drop: the first idle one of the least recently used few,
    /// else the least recently used (pinned keys are never offered).
    fn victim(&self, now_us: u64) -> Option<usize> {
        if self.map.len() < self.cap {
            return None;
        }
        let oldest = self.map.oldest()?;
        let mut at = Some(oldest);
        for _ in 0..EVICTION_PROBES {
            let Some(i) = at else { break };
            if is_idle(*self.map.get(i), now_us) {
                return Some(i);
            }
            at = self.map.newer(i);
        }
        Some(oldest)
    }
}

/// In-process limit state.
pub struct LocalStore {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    capacity: usize,
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStore")
            .field("shards", &self.shards.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl Default for LocalStore {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

/// A window's counts as seen at `now`: (current index, current, previous).
fn roll(state: Option<State>, window_ms: u64, now_us: u64) -> (u64, u64, u64) {
    let idx = now_us / 1000 / window_ms;
    match state {
        Some(State::Window { idx: i, cur, prev }) if i == idx => (idx, cur, prev),
        Some(State::Window { idx: i, cur, .. }) if i + 1 == idx => (idx, 0, cur),
        _ => (idx, 0, 0),
    }
}

/// The sliding estimate: the previous window weighted by how much of it
/// still overlaps the last `window_ms`, plus the current one (rounded up).
fn estimate(cur: u64, prev: u64, window_ms: u64, now_us: u64) -> u64 {
    let w = u128::from(window_ms) * 1000;
    let elapsed = u128::from(now_us) % w;
    let weighted = (u128::from(prev) * (w - elapsed)).div_ceil(w);
    cur.saturating_add(u64::try_from(weighted).unwrap_or(u64::MAX))
}

/// Seconds until `amount` fits again, assuming nothing else is charged.
fn window_retry(cur: u64, prev: u64, amount: u64, limit: u64, window_ms: u64, now_us: u64) -> u64 {
    let w = window_ms * 1000;
    let elapsed = now_us % w;
    if amount > limit {
        return window_ms / 1000;
    }
    // Still this window: prev * (w - e) / w + cur + amount <= limit.
    let wait_us = if cur.saturating_add(amount) <= limit {
        let room = limit - cur - amount;
        let need = if prev == 0 {
            elapsed
        } else {
            w - (u128::from(room) * u128::from(w) / u128::from(prev)).min(u128::from(w)) as u64
        };
        need.saturating_sub(elapsed)
    } else {
        // The next window: cur * (w - e') / w + amount <= limit.
        let room = limit - amount;
        let need = w
            - (u128::from(room) * u128::from(w) / u128::from(cur.max(1))).min(u128::from(w)) as u64;
        (w - elapsed) + need
    };
    wait_us.div_ceil(1_000_000).max(1)
}

/// One planned change, applied only when every quota admits.
enum Change {
    Set(State),
    Reserve {
        idx: u64,
        cur: u64,
        prev: u64,
        amount: u64,
    },
    Take(u32),
}

impl LocalStore {
    /// A store that keeps at most `capacity` keys (besides those holding a
    /// concurrency slot), over up to 64 shards.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(16);
        let n = (capacity / MIN_SHARD_KEYS).clamp(1, MAX_SHARDS);
        Self {
            // The shares add up to `capacity` exactly.
            shards: (0..n)
                .map(|i| {
                    Mutex::new(Shard {
                        map: LruMap::default(),
                        cap: capacity / n + usize::from(i < capacity % n),
                    })
                })
                .collect(),
            hasher: RandomState::new(),
            capacity,
        }
    }

    /// The most keys it keeps.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Shards (each behind its own lock).
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|s| s.map.len()).unwrap_or(0))
            .sum()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Holds every lock of the store until dropped (to show what does not wait for it).
    #[cfg(test)]
    pub(crate) fn freeze(&self) -> Frozen<'_> {
        Frozen(self.shards.iter().filter_map(|s| s.lock().ok()).collect())
    }

    fn shard_of(&self, subject: &str) -> usize {
        (self.hasher.hash_one(subject) % self.shards.len() as u64) as usize
    }

    /// Locks the shards of `who`'s levels that `plan` uses, in ascending
    /// order; None when a lock is poisoned (a panic mid-update).
    fn lock(&self, plan: &Plan, who: &Subjects) -> Option<Locked<'_>> {
        let mut levels = [None; 3];
        for (slot, level) in
            levels
                .iter_mut()
                .zip([Level::Identity, Level::Namespace, Level::TrustDomain])
        {
            if plan.quotas.iter().any(|q| q.level == level)
                && let Some(subject) = who.get(level)
            {
                *slot = Some(self.shard_of(subject));
            }
        }
        // No allocation: at most three shards, distinct, in ascending order.
        let (mut order, mut n) = ([0usize; 3], 0);
        for &i in levels.iter().flatten() {
            if !order[..n].contains(&i) {
                order[n] = i;
                n += 1;
            }
        }
        order[..n].sort_unstable();
        let mut guards = [None, None, None];
        for (g, &i) in guards.iter_mut().zip(&order[..n]) {
            *g = Some((i, self.shards[i].lock().ok()?));
        }
        Some(Locked { levels, guards })
    }

    /// See [`super::Store::admit`].
    pub fn admit(
        &self,
        plan: &Plan,
        who: &Subjects,
        ask: &Ask,
        now_us: u64,
    ) -> Result<Hold, Denial> {
        let Some(mut locked) = self.lock(plan, who) else {
            // A poisoned lock means a panic mid-update: fail closed.
            return Err(Denial {
                quota: 0,
                retry_after_s: 1,
            });
        };
        let mut changes = Vec::with_capacity(plan.quotas.len());
        let mut denial: Option<Denial> = None;
        let mut headroom: Option<(u128, Headroom)> = None;
        let mut key = String::with_capacity(128);
        for (i, q) in plan.quotas.iter().enumerate() {
            let Some(subject) = who.get(q.level) else {
                continue;
            };
            write_state_key(&mut key, &plan.route, &q.name, subject);
            let state = locked.shard(q.level).and_then(|s| s.state(&key));
            let (change, remaining, reset_s, limit) = match q.kind {
                Kind::Rate { interval_us, burst } => {
                    let tau = interval_us.saturating_mul(u64::from(burst));
                    let tat = match state {
                        Some(State::Tat(t)) => t.max(now_us),
                        _ => now_us,
                    };
                    let next = tat.saturating_add(interval_us);
                    if next - now_us > tau {
                        let wait = next - now_us - tau;
                        deny(&mut denial, i, wait.div_ceil(1_000_000).max(1));
                        continue;
                    }
                    let remaining = (tau - (next - now_us)) / interval_us;
                    (
                        Change::Set(State::Tat(next)),
                        remaining,
                        (next - now_us).div_ceil(1_000_000),
                        u64::from(burst),
                    )
                }
                Kind::Window {
                    unit,
                    window_ms,
                    limit,
                } => {
                    let amount = ask.get(unit);
                    let (idx, cur, prev) = roll(state, window_ms, now_us);
                    let used = estimate(cur, prev, window_ms, now_us);
                    if used.saturating_add(amount) > limit {
                        deny(
                            &mut denial,
                            i,
                            window_retry(cur, prev, amount, limit, window_ms, now_us),
                        );
                        continue;
                    }
                    let elapsed_s = (now_us / 1000 % window_ms) / 1000;
                    (
                        Change::Reserve {
                            idx,
                            cur,
                            prev,
                            amount,
                        },
                        limit - used - amount,
                        window_ms / 1000 - elapsed_s,
                        limit,
                    )
                }
                Kind::Concurrent { limit } => {
                    let held = match state {
                        Some(State::Slots(n)) => n,
                        _ => 0,
                    };
                    if held >= limit {
                        deny(&mut denial, i, 1);
                        continue;
                    }
                    (
                        Change::Take(held + 1),
                        u64::from(limit - held - 1),
                        0,
                        u64::from(limit),
                    )
                }
            };
            // The tightest limit is the one with the least left, relative to its size.
            let frac = u128::from(remaining) * 1_000_000 / u128::from(limit.max(1));
            if headroom.as_ref().is_none_or(|(f, _)| frac < *f) {
                headroom = Some((
                    frac,
                    Headroom {
                        quota: i,
                        remaining,
                        reset_s,
                    },
                ));
            }
            changes.push((i, subject, change));
        }
        if let Some(d) = denial {
            return Err(d);
        }
        let mut hold = Hold {
            headroom: headroom.map(|(_, h)| h),
            ..Hold::default()
        };
        for (i, subject, change) in changes {
            write_state_key(&mut key, &plan.route, &plan.quotas[i].name, subject);
            let state = match change {
                Change::Set(s) => s,
                Change::Reserve {
                    idx,
                    cur,
                    prev,
                    amount,
                } => {
                    if amount > 0 {
                        hold.reservations.push(Reservation {
                            quota: i,
                            key: key.clone(),
                            window: idx,
                            amount,
                        });
                    }
                    State::Window {
                        idx,
                        cur: cur.saturating_add(amount),
                        prev,
                    }
                }
                Change::Take(n) => {
                    hold.slots.push((i, key.clone(), 0));
                    State::Slots(n)
                }
            };
            if let Some(shard) = locked.shard(plan.quotas[i].level) {
                shard.put(&key, state, now_us);
            }
        }
        Ok(hold)
    }

    /// See [`super::Store::settle`]. A refund needs no atomicity across
    /// keys: each shard is locked once, one at a time.
    pub fn settle(&self, plan: &Plan, hold: &Hold, used: &Ask, now_us: u64) {
        let mut items: Vec<(usize, Settled<'_>)> =
            Vec::with_capacity(hold.reservations.len() + hold.slots.len());
        for r in &hold.reservations {
            if let Some(subject) = key_subject(&r.key) {
                items.push((self.shard_of(subject), Settled::Reservation(r)));
            }
        }
        for (_, key, _) in &hold.slots {
            if let Some(subject) = key_subject(key) {
                items.push((self.shard_of(subject), Settled::Slot(key)));
            }
        }
        items.sort_by_key(|(shard, _)| *shard);
        let mut current: Option<(usize, MutexGuard<'_, Shard>)> = None;
        for (i, item) in items {
            if current.as_ref().is_none_or(|(c, _)| *c != i) {
                // One lock at a time: the last is released before the next is taken.
                drop(current.take());
                current = self.shards[i].lock().ok().map(|g| (i, g));
            }
            let Some((_, shard)) = current.as_mut() else {
                continue;
            };
            match item {
                Settled::Reservation(r) => settle_window(shard, plan, r, used, now_us),
                Settled::Slot(key) => {
                    if let Some(e) = shard.map.find(key)
                        && let State::Slots(n) = *shard.map.get(e)
                    {
                        let n = n.saturating_sub(1);
                        *shard.map.get_mut(e) = State::Slots(n);
                        if n == 0 {
                            // Nothing held any more: it may be dropped again.
                            shard.map.unpin(e);
                        }
                    }
                }
            }
        }
    }
}

/// One part of a hold to settle.
enum Settled<'h> {
    Reservation(&'h Reservation),
    Slot(&'h str),
}

/// Settles one reservation: what `used` says replaces what was reserved.
fn settle_window(shard: &mut Shard, plan: &Plan, r: &Reservation, used: &Ask, now_us: u64) {
    let Some(Kind::Window {
        unit, window_ms, ..
    }) = plan.quotas.get(r.quota).map(|q| q.kind)
    else {
        return;
    };
    let Some(e) = shard.map.find(&r.key) else {
        return;
    };
    let actual = used.get(unit);
    let (idx, mut cur, mut prev) = roll(Some(*shard.map.get(e)), window_ms, now_us);
    if actual >= r.amount {
        // More than reserved: charged now, where it is still counted.
        let extra = actual - r.amount;
        if r.window + 1 == idx {
            prev = prev.saturating_add(extra);
        } else {
            cur = cur.saturating_add(extra);
        }
    } else {
        // A refund goes back to the window that was charged, if it still counts.
        let refund = r.amount - actual;
        if r.window == idx {
            cur = cur.saturating_sub(refund);
        } else if r.window + 1 == idx {
            prev = prev.saturating_sub(refund);
        }
    }
    *shard.map.get_mut(e) = State::Window { idx, cur, prev };
}

/// Every lock of a store, held.
#[cfg(test)]
pub(crate) struct Frozen<'a>(#[allow(dead_code)] Vec<MutexGuard<'a, Shard>>);

/// The shards one admission holds, and which of them each level uses.
struct Locked<'a> {
    /// Shard index of each level (identity, namespace, trust domain).
    levels: [Option<usize>; 3],
    guards: [Option<(usize, MutexGuard<'a, Shard>)>; 3],
}

impl Locked<'_> {
    fn shard(&mut self, level: Level) -> Option<&mut Shard> {
        let want = self.levels[match level {
            Level::Identity => 0,
            Level::Namespace => 1,
            Level::TrustDomain => 2,
        }]?;
        self.guards
            .iter_mut()
            .flatten()
            .find(|(i, _)| *i == want)
            .map(|(_, g)| &mut **g)
    }
}

/// The subject part of a state key (`route|quota|subject`; route and quota
/// names have no `|`).
fn key_subject(key: &str) -> Option<&str> {
    let mut parts = key.splitn(3, '|');
    parts.next()?;
    parts.next()?;
    parts.next()
}

fn deny(denial: &mut Option<Denial>, quota: usize, retry_after_s: u64) {
    if denial
        .as_ref()
        .is_none_or(|d| retry_after_s > d.retry_after_s)
    {
        *denial = Some(Denial {
            quota,
            retry_after_s,
        });
    }
}

/// True when the state says nothing a missing key would not.
fn is_idle(state: State, now_us: u64) -> bool {
    match state {
        State::Tat(t) => t <= now_us,
        State::Slots(n) => n == 0,
        // Day windows are the longest: two of them behind, nothing counts.
        State::Window { cur, prev, .. } => cur == 0 && prev == 0,
    }
}

#[cfg(test)]
#[path = "local_tests.rs"]
mod tests;
