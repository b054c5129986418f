//! Limit state in Redis, so that several proxies share every limit with the
//! semantics of [`super::local`]: one Lua script per operation (admit,
//! settle) checks and charges every quota of every level atomically, on the
//! server's clock, so replicas agree on windows and rates.
//!
//! Keys are `warden:` + the local state key (`route|quota|subject`):
//! - a rate: the GCRA theoretical arrival time (µs), expiring once it is past;
//! - a window: a hash of the fixed window index and the counts of it and of
//!   the one before, expiring two windows after that index began;
//! - concurrency: a sorted set of random slot ids scored by lease expiry, so
//!   the slots of a proxy that died before settling come back after
//!   [`SLOT_LEASE_MS`].
//!
//! Every call is bounded by a timeout (250 ms by default): a dead or stalled
//! Redis answers [`StoreError`] quickly, and the caller applies its
//! fail-open or fail-closed policy. The connection is re-established in the
//! background. A call that times out after Redis ran the script has charged
//! without a hold: its reservation lapses with its window, its slot with
//! its lease.
//!
//! Plain Redis (one primary, with replicas if any) only: the keys of one
//! admission span several subjects, so Redis Cluster would refuse them.

use std::sync::LazyLock;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, FromRedisValue, Script, ScriptInvocation};

use super::{
    Ask, Denial, Headroom, Hold, Kind, Plan, Reservation, StoreError, Subjects, state_key,
};

/// Prefix of every key the store writes.
pub const KEY_PREFIX: &str = "warden:";

/// How long one call may take before it fails.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);

/// How long a concurrency slot is held when it is never settled.
pub const SLOT_LEASE_MS: u64 = 600_000;

/// Largest limit, amount, interval or window passed to Lua (2^51, as in
/// `common.lua`): numbers there are doubles, exact below 2^53 with room for
/// sums. Anything larger is treated as this (about 71 years in µs).
const MAX_EXACT: u64 = 1 << 51;

static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/common.lua"),
        include_str!("lua/admit.lua")
    ))
});

static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/common.lua"),
        include_str!("lua/settle.lua")
    ))
});

/// Limit state shared through one Redis server.
#[derive(Clone, Debug)]
pub struct RedisStore {
    conn: ConnectionManager,
    timeout: Duration,
}

/// What the store needs, per admitted entry, to build the hold.
enum Entry {
    Rate,
    Window {
        quota: usize,
        key: String,
        amount: u64,
    },
    Slot {
        quota: usize,
        key: String,
        id: u64,
    },
}

impl RedisStore {
    /// A store for `url` (`redis://[user:password@]host:port[/db]`) with the
    /// default timeout. It connects on first use and reconnects by itself,
    /// so a proxy can start while Redis is down. Must be called inside a
    /// Tokio runtime.
    pub fn new(url: &str) -> Result<Self, StoreError> {
        Self::with_timeout(url, DEFAULT_TIMEOUT)
    }

    /// As [`RedisStore::new`], with each call bounded by `timeout`.
    pub fn with_timeout(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(StoreError("redis: the store needs a Tokio runtime".into()));
        }
        let client = Client::open(url).map_err(|e| StoreError(format!("redis: bad url: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            // Few, quick retries: while Redis is down every call fails fast
            // anyway, and a new attempt starts on the next call.
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let conn = client
            .get_connection_manager_lazy(config)
            .map_err(|e| StoreError(format!("redis: {e}")))?;
        Ok(Self { conn, timeout })
    }

    /// A store for `url` that has answered a PING.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let store = Self::new(url)?;
        store.ping().await?;
        Ok(store)
    }

    /// Checks that Redis answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let cmd = ::redis::cmd("PING");
        let pong: String = self.bounded(cmd.query_async(&mut conn)).await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(StoreError(format!("redis: PING answered {pong:?}")))
        }
    }

    /// See [`super::Store::admit`]; the clock is the Redis server's.
    pub async fn admit(
        &self,
        plan: &Plan,
        who: &Subjects,
        ask: &Ask,
    ) -> Result<Result<Hold, Denial>, StoreError> {
        self.admit_clocked(plan, who, ask, None).await
    }

    /// See [`super::Store::settle`]; the clock is the Redis server's.
    pub async fn settle(&self, plan: &Plan, hold: &Hold, used: &Ask) -> Result<(), StoreError> {
        self.settle_clocked(plan, hold, used, None).await
    }

    /// [`RedisStore::admit`] at `now_us` instead of the server's clock, so
    /// tests can compare decisions with [`super::local::LocalStore`] exactly.
    #[doc(hidden)]
    pub async fn admit_at(
        &self,
        plan: &Plan,
        who: &Subjects,
        ask: &Ask,
        now_us: u64,
    ) -> Result<Result<Hold, Denial>, StoreError> {
        self.admit_clocked(plan, who, ask, Some(now_us)).await
    }

    /// [`RedisStore::settle`] at `now_us` instead of the server's clock.
    #[doc(hidden)]
    pub async fn settle_at(
        &self,
        plan: &Plan,
        hold: &Hold,
        used: &Ask,
        now_us: u64,
    ) -> Result<(), StoreError> {
        self.settle_clocked(plan, hold, used, Some(now_us)).await
    }

    async fn admit_clocked(
        &self,
        plan: &Plan,
        who: &Subjects,
        ask: &Ask,
        now_us: Option<u64>,
    ) -> Result<Result<Hold, Denial>, StoreError> {
        let mut call = ADMIT.prepare_invoke();
        call.arg(clock_arg(now_us)).arg(SLOT_LEASE_MS);
        let mut entries = Vec::with_capacity(plan.quotas.len());
        for (i, q) in plan.quotas.iter().enumerate() {
            let Some(subject) = who.get(q.level) else {
                continue;
            };
            let key = state_key(&plan.route, &q.name, subject);
            call.key(format!("{KEY_PREFIX}{key}")).arg(i);
            match q.kind {
                Kind::Rate { interval_us, burst } => {
                    let interval = interval_us.clamp(1, MAX_EXACT);
                    let tau = interval.saturating_mul(u64::from(burst)).min(MAX_EXACT);
                    call.arg("r").arg(interval).arg(tau).arg(burst);
                    entries.push(Entry::Rate);
                }
                Kind::Window {
                    unit,
                    window_ms,
                    limit,
                } => {
                    let amount = ask.get(unit);
                    call.arg("w")
                        .arg(clamp_window(window_ms))
                        .arg(limit.min(MAX_EXACT))
                        .arg(amount.min(MAX_EXACT));
                    entries.push(Entry::Window {
                        quota: i,
                        key,
                        amount,
                    });
                }
                Kind::Concurrent { limit } => {
                    let id = rand::random::<u64>();
                    call.arg("c").arg(limit).arg(id).arg(0);
                    entries.push(Entry::Slot { quota: i, key, id });
                }
            }
        }
        if entries.is_empty() {
            return Ok(Ok(Hold::default()));
        }
        let reply: Vec<i64> = self.run(&call).await?;
        let n = plan.quotas.len();
        match reply.as_slice() {
            [0, quota, retry] => Ok(Err(Denial {
                quota: index(*quota, n)?,
                retry_after_s: number(*retry)?,
            })),
            [1, head, remaining, reset, windows @ ..] if windows.len() == entries.len() => {
                let headroom = if *head < 0 {
                    None
                } else {
                    Some(Headroom {
                        quota: index(*head, n)?,
                        remaining: number(*remaining)?,
                        reset_s: number(*reset)?,
                    })
                };
                let mut hold = Hold {
                    headroom,
                    ..Hold::default()
                };
                for (entry, window) in entries.into_iter().zip(windows) {
                    match entry {
                        Entry::Rate => {}
                        Entry::Window { quota, key, amount } => {
                            if amount > 0 {
                                hold.reservations.push(Reservation {
                                    quota,
                                    key,
                                    window: number(*window)?,
                                    amount,
                                });
                            }
                        }
                        Entry::Slot { quota, key, id } => hold.slots.push((quota, key, id)),
                    }
                }
                Ok(Ok(hold))
            }
            _ => Err(StoreError("redis: admit answered nonsense".into())),
        }
    }

    async fn settle_clocked(
        &self,
        plan: &Plan,
        hold: &Hold,
        used: &Ask,
        now_us: Option<u64>,
    ) -> Result<(), StoreError> {
        let mut call = SETTLE.prepare_invoke();
        call.arg(clock_arg(now_us));
        let mut entries = 0;
        for r in &hold.reservations {
            let Some(Kind::Window {
                unit, window_ms, ..
            }) = plan.quotas.get(r.quota).map(|q| q.kind)
            else {
                continue;
            };
            call.key(format!("{KEY_PREFIX}{}", r.key))
                .arg("w")
                .arg(clamp_window(window_ms))
                .arg(r.window)
                .arg(r.amount.min(MAX_EXACT))
                .arg(used.get(unit).min(MAX_EXACT));
            entries += 1;
        }
        for (_, key, id) in &hold.slots {
            call.key(format!("{KEY_PREFIX}{key}"))
                .arg("s")
                .arg(*id)
                .arg(0)
                .arg(0)
                .arg(0);
            entries += 1;
        }
        if entries == 0 {
            return Ok(());
        }
        let _: i64 = self.run(&call).await?;
        Ok(())
    }

    async fn run<T: FromRedisValue>(&self, call: &ScriptInvocation<'_>) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        self.bounded(call.invoke_async(&mut conn)).await
    }

    async fn bounded<T>(
        &self,
        call: impl Future<Output = ::redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError(format!("redis: {e}"))),
            Err(_) => Err(StoreError(format!(
                "redis: no answer within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }
}

fn clock_arg(now_us: Option<u64>) -> String {
    now_us.map(|t| t.to_string()).unwrap_or_default()
}

fn clamp_window(window_ms: u64) -> u64 {
    window_ms.clamp(1, MAX_EXACT / 1000)
}

fn index(v: i64, len: usize) -> Result<usize, StoreError> {
    usize::try_from(v)
        .ok()
        .filter(|i| *i < len)
        .ok_or_else(|| StoreError(format!("redis: quota index {v} out of range")))
}

fn number(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError(format!("redis: negative count {v}")))
}
