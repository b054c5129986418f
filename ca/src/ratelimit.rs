//! Per-caller limits on what the CA does, in bounded memory: a fixed
//! one-minute window per key (a source address, a token's hash, a SPIFFE
//! ID, a pod's UID). Keys come from clients, so the table is capped: when
//! it is full, windows that ended are dropped, and if none has, a new key
//! is refused (fail closed) until one does.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window every limit counts in.
pub const WINDOW: Duration = Duration::from_secs(60);

/// At most `limit` events per key per minute, for at most `max_keys` keys.
#[derive(Debug)]
pub struct PerMinute {
    limit: u32,
    max_keys: usize,
    windows: Mutex<HashMap<String, (Instant, u32)>>,
}

impl PerMinute {
    /// A limiter allowing `limit` per key per minute (0: no limit).
    pub fn new(limit: u32, max_keys: usize) -> Self {
        Self {
            limit,
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
            windows.retain(|_, (start, _)| start.elapsed() < WINDOW);
            if windows.len() >= self.max_keys {
                return Err(WINDOW.as_secs());
            }
        }
        let w = windows.entry(key.to_owned()).or_insert((Instant::now(), 0));
        if w.0.elapsed() >= WINDOW {
            *w = (Instant::now(), 0);
        }
        if w.1 >= self.limit {
            return Err(WINDOW.saturating_sub(w.0.elapsed()).as_secs().max(1));
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
}
