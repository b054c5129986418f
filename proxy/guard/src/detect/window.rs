//! Sliding windows of per-query flags, and the ramp that turns a share of
//! flagged queries into a signal: the small pieces every signal shares.

use std::collections::VecDeque;

/// Linear ramp: 0 at or below `lo`, 1 at or above `hi`.
pub fn ramp(x: f64, (lo, hi): (f64, f64)) -> f64 {
    if hi <= lo {
        return if x >= hi { 1.0 } else { 0.0 };
    }
    ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
}

/// A fixed-size window of per-query flags with running counts.
#[derive(Debug, Clone)]
pub struct Flags {
    ring: VecDeque<u8>,
    cap: usize,
    counts: [u32; 8],
}

impl Flags {
    /// An empty window of `cap` queries.
    pub fn new(cap: usize) -> Self {
        Self {
            ring: VecDeque::with_capacity(cap.max(1)),
            cap: cap.max(1),
            counts: [0; 8],
        }
    }

    /// Records one query's flag bits, dropping the oldest when full.
    pub fn push(&mut self, bits: u8) {
        if self.ring.len() == self.cap
            && let Some(old) = self.ring.pop_front()
        {
            for (b, c) in self.counts.iter_mut().enumerate() {
                if old & (1 << b) != 0 {
                    *c = c.saturating_sub(1);
                }
            }
        }
        for (b, c) in self.counts.iter_mut().enumerate() {
            if bits & (1 << b) != 0 {
                *c += 1;
            }
        }
        self.ring.push_back(bits);
    }

    /// Queries in the window.
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// Bytes held by the window.
    pub fn held_bytes(&self) -> usize {
        self.ring.capacity()
    }

    /// True when no query is in the window.
    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    /// Queries in the window with flag `bit` set.
    pub fn count(&self, bit: u8) -> u32 {
        self.counts.get(usize::from(bit)).copied().unwrap_or(0)
    }

    /// The share of the window with `bit` set, over at least `floor` queries.
    pub fn fraction(&self, bit: u8, floor: usize) -> f64 {
        f64::from(self.count(bit)) / self.len().max(floor).max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_window_counts() {
        let mut f = Flags::new(3);
        for bits in [1u8, 1, 0, 2] {
            f.push(bits);
        }
        assert_eq!(f.len(), 3);
        assert_eq!(f.count(0), 1);
        assert_eq!(f.count(1), 1);
        assert!((f.fraction(0, 10) - 0.1).abs() < 1e-12);
    }
}
