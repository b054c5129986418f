//! Rate-limited logging for events an attacker can trigger at will (refused
//! handshakes, malformed requests): the metric counts every one, the log
//! keeps only the first few each second so it cannot be flooded.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Lets through at most `per_second` log lines each second.
#[derive(Debug)]
pub struct LogLimiter {
    per_second: u64,
    /// High 32 bits: the current second (truncated); low 32: lines logged in it.
    state: AtomicU64,
}

impl LogLimiter {
    /// A limiter allowing `per_second` lines per second.
    pub const fn new(per_second: u64) -> Self {
        Self {
            per_second,
            state: AtomicU64::new(0),
        }
    }

    /// Whether one more line may be logged now.
    pub fn allow(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() & 0xffff_ffff)
            .unwrap_or(0);
        let mut cur = self.state.load(Ordering::Relaxed);
        loop {
            let (sec, n) = (cur >> 32, cur & 0xffff_ffff);
            let next = if sec == now {
                (sec << 32) | (n + 1)
            } else {
                (now << 32) | 1
            };
            if sec == now && n >= self.per_second {
                return false;
            }
            match self
                .state
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn allows_a_burst_then_refuses() {
        let l = super::LogLimiter::new(3);
        let allowed = (0..10).filter(|_| l.allow()).count();
        // A second boundary may fall inside the loop; then at most 6 pass.
        assert!((3..=6).contains(&allowed), "{allowed}");
    }
}
