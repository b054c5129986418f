//! Limit state in this process: one map behind one lock, so every quota of
//! every level is checked and charged in one step. The map is bounded:
//! past `capacity` keys, state that is equivalent to no state (a full
//! GCRA bucket, windows with nothing counted, no slot held) is dropped
//! first, then the least recently used. What eviction forgets of one
//! caller, its namespace and trust-domain aggregates still hold.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{Ask, Denial, Headroom, Hold, Kind, Plan, Reservation, Subjects, write_state_key};

/// Keys kept by default (about 100 bytes each).
pub const DEFAULT_CAPACITY: usize = 100_000;

#[derive(Debug, Clone, Copy)]
enum State {
    /// GCRA theoretical arrival time, µs since the epoch.
    Tat(u64),
    /// Fixed window `idx` (window start = idx * length) and the one before.
    Window { idx: u64, cur: u64, prev: u64 },
    /// Requests in progress.
    Slots(u32),
}

#[derive(Debug)]
struct Entry {
    state: State,
    touched_us: u64,
}

/// In-process limit state.
#[derive(Debug)]
pub struct LocalStore {
    map: Mutex<HashMap<String, Entry>>,
    capacity: usize,
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
    /// A store that keeps at most about `capacity` keys.
    pub fn new(capacity: usize) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            capacity: capacity.max(16),
        }
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// See [`super::Store::admit`].
    pub fn admit(
        &self,
        plan: &Plan,
        who: &Subjects,
        ask: &Ask,
        now_us: u64,
    ) -> Result<Hold, Denial> {
        let Ok(mut map) = self.map.lock() else {
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
            let state = map.get(key.as_str()).map(|e| e.state);
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
        if map.len() + changes.len() > self.capacity {
            evict(&mut map, self.capacity, now_us);
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
            let entry = Entry {
                state,
                touched_us: now_us,
            };
            match map.get_mut(key.as_str()) {
                Some(e) => *e = entry,
                None => {
                    map.insert(key.clone(), entry);
                }
            }
        }
        Ok(hold)
    }

    /// See [`super::Store::settle`].
    pub fn settle(&self, plan: &Plan, hold: &Hold, used: &Ask, now_us: u64) {
        let Ok(mut map) = self.map.lock() else {
            return;
        };
        for r in &hold.reservations {
            let Some(Kind::Window {
                unit, window_ms, ..
            }) = plan.quotas.get(r.quota).map(|q| q.kind)
            else {
                continue;
            };
            let actual = used.get(unit);
            let Some(e) = map.get_mut(&r.key) else {
                continue;
            };
            let (idx, mut cur, mut prev) = roll(Some(e.state), window_ms, now_us);
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
            e.state = State::Window { idx, cur, prev };
        }
        for (_, key, _) in &hold.slots {
            if let Some(e) = map.get_mut(key)
                && let State::Slots(n) = e.state
            {
                e.state = State::Slots(n.saturating_sub(1));
            }
        }
    }
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

fn evict(map: &mut HashMap<String, Entry>, capacity: usize, now_us: u64) {
    map.retain(|_, e| !is_idle(e.state, now_us));
    let target = capacity - capacity / 10;
    if map.len() <= target {
        return;
    }
    // Still full of live state: drop the least recently used, never a held slot.
    let mut ages: Vec<u64> = map
        .values()
        .filter(|e| !matches!(e.state, State::Slots(n) if n > 0))
        .map(|e| e.touched_us)
        .collect();
    let excess = map.len() - target;
    if excess >= ages.len() {
        map.retain(|_, e| matches!(e.state, State::Slots(n) if n > 0));
        return;
    }
    let (_, cutoff, _) = ages.select_nth_unstable(excess);
    let cutoff = *cutoff;
    map.retain(|_, e| matches!(e.state, State::Slots(n) if n > 0) || e.touched_us > cutoff);
}

#[cfg(test)]
mod tests {
    use super::super::{Level, Unit};
    use super::*;
    use warden_config::SpiffeId;
    use warden_config::model::{LimitSet, Limits};

    fn who(id: &str) -> Subjects {
        Subjects::of(&SpiffeId::parse(id).unwrap())
    }

    fn plan(identity: LimitSet, namespace: LimitSet) -> Plan {
        Plan::new(
            "r",
            &Limits {
                identity,
                namespace,
                ..Limits::default()
            },
        )
    }

    const T0: u64 = 1_800_000_000_000_000 + 30_000_000 * 60; // a minute boundary, plus 0

    #[test]
    fn gcra_allows_the_burst_then_the_rate() {
        let p = plan(
            LimitSet {
                requests_per_second: Some(10.0),
                burst: 3,
                ..LimitSet::default()
            },
            LimitSet::default(),
        );
        let s = LocalStore::default();
        let a = who("spiffe://td/ns/a/sa/x");
        for _ in 0..3 {
            s.admit(&p, &a, &Ask::default(), T0).unwrap();
        }
        let d = s.admit(&p, &a, &Ask::default(), T0).unwrap_err();
        assert_eq!(d.retry_after_s, 1);
        // 100 ms later one more request is allowed, and only one.
        s.admit(&p, &a, &Ask::default(), T0 + 100_000).unwrap();
        assert!(s.admit(&p, &a, &Ask::default(), T0 + 100_000).is_err());
        // Another caller has its own bucket.
        s.admit(&p, &who("spiffe://td/ns/a/sa/y"), &Ask::default(), T0)
            .unwrap();
    }

    #[test]
    fn reservations_never_overshoot_and_refunds_come_back() {
        let p = plan(
            LimitSet {
                tokens_per_minute: Some(1000),
                ..LimitSet::default()
            },
            LimitSet::default(),
        );
        let s = LocalStore::default();
        let a = who("spiffe://td/ns/a/sa/x");
        let ask = Ask {
            tokens: 300,
            ..Ask::default()
        };
        let holds: Vec<_> = (0..10)
            .filter_map(|_| s.admit(&p, &a, &ask, T0).ok())
            .collect();
        assert_eq!(holds.len(), 3, "3 x 300 fit in 1000, a fourth does not");
        // Each used only 100: 600 come back, so two more fit.
        for h in &holds {
            s.settle(
                &p,
                h,
                &Ask {
                    tokens: 100,
                    ..Ask::default()
                },
                T0 + 1,
            );
        }
        assert!(s.admit(&p, &a, &ask, T0 + 2).is_ok());
        assert!(s.admit(&p, &a, &ask, T0 + 3).is_ok());
        let d = s.admit(&p, &a, &ask, T0 + 4).unwrap_err();
        // 900 counted now: the ask fits once 2/9 of the next minute has passed.
        assert_eq!(d.retry_after_s, 74, "{d:?}");
    }

    #[test]
    fn the_aggregate_level_binds_many_identities() {
        let p = plan(
            LimitSet {
                tokens_per_minute: Some(1000),
                ..LimitSet::default()
            },
            LimitSet {
                tokens_per_minute: Some(1500),
                ..LimitSet::default()
            },
        );
        let s = LocalStore::default();
        let ask = Ask {
            tokens: 500,
            ..Ask::default()
        };
        let mut admitted = 0;
        for n in 0..10 {
            if s.admit(&p, &who(&format!("spiffe://td/ns/a/sa/w{n}")), &ask, T0)
                .is_ok()
            {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 3);
        // A refused request charged nothing anywhere: another namespace is untouched.
        let d = s
            .admit(&p, &who("spiffe://td/ns/a/sa/w0"), &ask, T0)
            .unwrap_err();
        assert_eq!(p.quotas[d.quota].level, Level::Namespace);
        assert!(
            s.admit(&p, &who("spiffe://td/ns/b/sa/w0"), &ask, T0)
                .is_ok()
        );
    }

    #[test]
    fn a_sliding_window_forgets_gradually() {
        let p = plan(
            LimitSet {
                tokens_per_minute: Some(100),
                ..LimitSet::default()
            },
            LimitSet::default(),
        );
        let s = LocalStore::default();
        let a = who("spiffe://td/ns/a/sa/x");
        let ask = |n| Ask {
            tokens: n,
            ..Ask::default()
        };
        s.admit(&p, &a, &ask(100), T0).unwrap();
        // Half-way through the next minute, half of the last one still counts.
        let half = T0 + 90_000_000;
        assert!(s.admit(&p, &a, &ask(51), half).is_err());
        assert!(s.admit(&p, &a, &ask(50), half).is_ok());
        // An ask larger than the whole quota can never fit.
        let d = s.admit(&p, &a, &ask(101), half).unwrap_err();
        assert_eq!(d.retry_after_s, 60);
        assert_eq!(
            p.quotas[0].kind,
            Kind::Window {
                unit: Unit::Tokens,
                window_ms: 60_000,
                limit: 100
            }
        );
    }

    #[test]
    fn concurrency_slots_are_released_at_settle() {
        let p = plan(
            LimitSet {
                concurrent: Some(2),
                ..LimitSet::default()
            },
            LimitSet::default(),
        );
        let s = LocalStore::default();
        let a = who("spiffe://td/ns/a/sa/x");
        let h1 = s.admit(&p, &a, &Ask::default(), T0).unwrap();
        let _h2 = s.admit(&p, &a, &Ask::default(), T0).unwrap();
        assert!(s.admit(&p, &a, &Ask::default(), T0).is_err());
        s.settle(&p, &h1, &Ask::default(), T0);
        assert!(s.admit(&p, &a, &Ask::default(), T0).is_ok());
    }

    #[test]
    fn the_map_stays_bounded() {
        let p = plan(
            LimitSet {
                requests_per_second: Some(1.0),
                tokens_per_day: Some(10),
                ..LimitSet::default()
            },
            LimitSet::default(),
        );
        let s = LocalStore::new(1000);
        for n in 0..20_000u64 {
            let ask = Ask {
                tokens: 1,
                ..Ask::default()
            };
            let _ = s.admit(&p, &who(&format!("spiffe://td/w{n}")), &ask, T0 + n);
            assert!(s.len() <= 1000, "{} keys", s.len());
        }
    }
}
