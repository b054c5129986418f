//! Embedding inputs (texts): near-duplicates by SimHash.
//!
//! A 64-bit SimHash over character trigrams (Charikar 2002) puts texts that
//! share most of their trigrams a few bits apart, so a templated sweep
//! ("Represent this word: X" for many X) shows up as near duplicates, while
//! an exact repeat (a retry, a cache miss) is ignored like for features.

use std::collections::VecDeque;

use super::fingerprint::FingerprintSettings;
use super::window::Flags;

const DUP: u8 = 0;

/// 64-bit SimHash of a text over its lowercase character trigrams.
pub fn simhash(text: &str) -> u64 {
    let mut acc = [0i32; 64];
    let chars: Vec<char> = text.chars().flat_map(char::to_lowercase).collect();
    let mut any = false;
    let mut add = |gram: &[char]| {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &c in gram {
            h ^= u64::from(c);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        for (b, a) in acc.iter_mut().enumerate() {
            *a += if h >> b & 1 == 1 { 1 } else { -1 };
        }
    };
    if chars.len() < 3 {
        add(&chars);
        any = true;
    } else {
        for g in chars.windows(3) {
            add(g);
            any = true;
        }
    }
    if !any {
        return 0;
    }
    acc.iter()
        .enumerate()
        .fold(0u64, |h, (b, &a)| if a > 0 { h | 1 << b } else { h })
}

/// The embedding inputs of one identity: recent SimHashes and flags.
#[derive(Debug, Clone)]
pub struct TextHistory {
    ring: VecDeque<u64>,
    cap: usize,
    /// Per-text near-duplicate flags.
    pub flags: Flags,
    /// Exact repeats seen (ignored by the signals).
    pub repeats: u64,
}

impl TextHistory {
    /// A history remembering `cap` texts.
    pub fn new(cap: usize, fp: &FingerprintSettings) -> Self {
        Self {
            ring: VecDeque::new(),
            cap: cap.max(1),
            flags: Flags::new(fp.window),
            repeats: 0,
        }
    }

    /// Upper bound of the bytes one history holds.
    pub fn max_bytes(cap: usize, fp: &FingerprintSettings) -> usize {
        std::mem::size_of::<Self>() + cap * 8 + fp.window
    }

    /// Records one text by its SimHash.
    pub fn observe(&mut self, h: u64, fp: &FingerprintSettings) {
        let nearest = self
            .ring
            .iter()
            .map(|&o| (o ^ h).count_ones())
            .min()
            .unwrap_or(u32::MAX);
        if nearest == 0 {
            self.repeats += 1;
            return;
        }
        if !self.ring.is_empty() {
            self.flags.push(u8::from(nearest <= fp.text_bits) << DUP);
        }
        if self.ring.len() == self.cap {
            self.ring.pop_front();
        }
        self.ring.push_back(h);
    }

    /// Near-duplicate fraction of the window.
    pub fn duplicate_fraction(&self, floor: usize) -> f64 {
        self.flags.fraction(DUP, floor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simhash_near_duplicates_are_close() {
        let a = simhash("The quick brown fox jumps over the lazy dog");
        let b = simhash("The quick brown fox jumps over the lazy dog!");
        let c = simhash("Completely different sentence about tax law.");
        assert!((a ^ b).count_ones() <= 8);
        assert!((a ^ c).count_ones() > 16);
    }
}
