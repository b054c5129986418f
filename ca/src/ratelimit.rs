//! Per-caller limits on what the CA does, in bounded memory: a fixed
//! window per key (a minute for a source address, a token's hash, a SPIFFE
//! ID, a pod's UID; a second for the TokenReviews one address may cause).
//! Keys come from clients, so the table is capped: when it is full,
//! windows that ended are dropped, and if none has, a new key is refused
//! (fail closed) until one does.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window every limit counts in.
pub const WINDOW: Duration = Duration::from_secs(60);

/// At most `limit` events per key per minute (or per `window`, see
/// [`PerMinute::per_window`]), for at most `max_keys` keys.
#[derive(Debug)]
pub struct PerMinute {
    limit: u32,
    window: Duration,
    max_keys: usize,
    windows: Mutex<HashMap<String, (Instant, u32)>>,
}

impl PerMinute {
    /// A limiter allowing `limit` per key per minute (0: no limit).
    pub fn new(limit: u32, max_keys: usize) -> Self {
        Self::per_window(limit, WINDOW, max_keys)
    }

    /// A limiter allowing `limit` per key per `window` (0: no limit).
    pub fn per_window(limit: u32, window: Duration, max_keys: usize) -> Self {
        Self {
            limit,
            window,
            max_keys,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one event for `key`; `Err(seconds)` to wait when over the limit.
    pub fn check(&self, key: &str) -> Result<(), u64> {
        if self.limit == 0 {
            return Ok(());
        }
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if windows.len() >= self.max_keys && !windows.contains_key(key) {
            windows.retain(|_, (start, _)| start.elapsed() < self.window);
            if windows.len() >= self.max_keys {
                return Err(self.window.as_secs().max(1));
            }
        }
        let w = windows.entry(key.to_owned()).or_insert((Instant::now(), 0));
        if w.0.elapsed() >= self.window {
            *w = (Instant::now(), 0);
        }
        if w.1 >= self.limit {
            return Err(self.window.saturating_sub(w.0.elapsed()).as_secs().max(1));
        }
        w.1 += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_gets_its_limit_and_a_full_table_refuses_new_keys() {
        let l = PerMinute::new(2, 2);
        assert!(l.check("a").is_ok());
        assert!(l.check("a").is_ok());
        let wait = l.check("a").unwrap_err();
        assert!((1..=60).contains(&wait), "{wait}");
        assert!(l.check("b").is_ok(), "another key has its own window");
        assert_eq!(l.check("c"), Err(60), "the table is full of live windows");
        assert!(PerMinute::new(0, 1).check("x").is_ok(), "0 means no limit");
    }

    #[test]
    fn a_short_window_opens_again_and_says_so() {
        let l = PerMinute::per_window(1, Duration::from_millis(50), 1);
        assert!(l.check("a").is_ok());
        assert_eq!(l.check("a"), Err(1), "at least a second to wait");
        assert_eq!(l.check("b"), Err(1), "full, and a's window is live");
        std::thread::sleep(Duration::from_millis(60));
        assert!(l.check("b").is_ok(), "a's window ended: dropped for b");
        assert!(l.check("b").is_err());
    }
}
