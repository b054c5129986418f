//! Logprob and logit_bias probing of an LLM API.
//!
//! Carlini et al. (2024, "Stealing part of a production language model")
//! recover a model's hidden size, and its final projection up to a linear
//! map, from a matrix of logit vectors: with more than `h` prompts and more
//! than `h` tokens per vector the matrix has rank `h`. An API that returns
//! only the top-k logprobs still leaks full vectors when `logit_bias` lets the
//! caller push chosen tokens into the top k: a sweep over the vocabulary, k
//! tokens per request, usually with `max_tokens` 1 and `top_logprobs` at the
//! maximum. Three things give it away:
//!
//! - the share of recent requests asking for the maximum `top_logprobs`;
//! - the number of distinct token ids given a `logit_bias` (a vocabulary
//!   sweep), estimated by linear counting on a fixed bitmap;
//! - the logprob values the caller chose to see (biased tokens made visible),
//!   counted in logit vectors of `hidden_size` entries: the identity must be
//!   stopped well before it holds `hidden_size` of them.

use super::window::{Flags, ramp};

/// Tuning of the probing signal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbingSettings {
    /// The API's maximum `top_logprobs` (20 for OpenAI's chat completions).
    pub max_top_logprobs: u32,
    /// Requests over which the share asking for the maximum is taken.
    pub window: usize,
    /// That share counts only once this many requests are in the window.
    pub min_requests: usize,
    /// Share of max-`top_logprobs` requests where the signal starts, and where
    /// it reaches its cap.
    pub max_top_share: (f64, f64),
    /// The cap of that part: asking for many logprobs is legitimate use, so
    /// alone it may warn but not refuse.
    pub max_top_cap: f64,
    /// Distinct `logit_bias` token ids where the sweep part starts, and where
    /// it is 1.
    pub bias_ids: (f64, f64),
    /// Chosen logprob values, in logit vectors of `hidden_size` entries, as a
    /// fraction of `hidden_size`: where the vector part starts and where it is
    /// 1 (so at the default the identity is refused after collecting ~1/64 of
    /// what the attack needs).
    pub vectors: (f64, f64),
}

impl Default for ProbingSettings {
    fn default() -> Self {
        Self {
            max_top_logprobs: 20,
            window: 64,
            min_requests: 16,
            max_top_share: (0.5, 0.9),
            max_top_cap: 0.5,
            bias_ids: (48.0, 320.0),
            vectors: (1.0 / 512.0, 1.0 / 64.0),
        }
    }
}

const BITMAP_WORDS: usize = 32;
const BITMAP_BITS: f64 = (BITMAP_WORDS * 64) as f64;

const MAX_TOP: u8 = 0;

/// The LLM requests of one identity.
#[derive(Debug, Clone)]
pub struct Probing {
    flags: Flags,
    bias_ids: [u64; BITMAP_WORDS],
    chosen_values: f64,
    requests: u64,
}

impl Probing {
    /// No requests yet.
    pub fn new(s: &ProbingSettings) -> Self {
        Self {
            flags: Flags::new(s.window),
            bias_ids: [0; BITMAP_WORDS],
            chosen_values: 0.0,
            requests: 0,
        }
    }

    /// Upper bound of the bytes one state holds.
    pub fn max_bytes(s: &ProbingSettings) -> usize {
        std::mem::size_of::<Self>() + s.window
    }

    /// Records one request.
    pub fn observe(
        &mut self,
        logprobs: bool,
        top_logprobs: u32,
        logit_bias: &[(u32, f64)],
        max_tokens: u32,
        s: &ProbingSettings,
    ) {
        self.requests += 1;
        let top = if logprobs { top_logprobs } else { 0 };
        self.flags
            .push(u8::from(logprobs && top >= s.max_top_logprobs.max(1)) << MAX_TOP);
        for &(id, _) in logit_bias {
            let h = u64::from(id)
                .wrapping_add(0x9e37_79b9_7f4a_7c15)
                .wrapping_mul(0xbf58_476d_1ce4_e5b9);
            let bit = (h >> 40) as usize % (BITMAP_WORDS * 64);
            self.bias_ids[bit / 64] |= 1 << (bit % 64);
        }
        if logit_bias.is_empty() {
            return;
        }
        // Values the caller chose to see: biased tokens made visible among the
        // returned logprobs, at every generated position. Without logprobs a
        // biased token still leaks through which token is sampled (the
        // logprob-free attack needs ~10 requests per value).
        let positions = f64::from(max_tokens.clamp(1, 16));
        let biased = logit_bias.len() as f64;
        self.chosen_values += if logprobs {
            biased.min(f64::from(top.max(1)) + 1.0) * positions
        } else {
            biased.min(1.0) / 10.0
        };
    }

    /// Distinct `logit_bias` token ids so far (linear-counting estimate).
    pub fn distinct_bias_ids(&self) -> f64 {
        let set: u32 = self.bias_ids.iter().map(|w| w.count_ones()).sum();
        let zeros = BITMAP_BITS - f64::from(set);
        if zeros < 1.0 {
            return BITMAP_BITS * BITMAP_BITS.ln();
        }
        BITMAP_BITS * (BITMAP_BITS / zeros).ln()
    }

    /// Logit vectors of `hidden_size` entries the chosen values add up to.
    pub fn vectors(&self, hidden_size: u32) -> f64 {
        self.chosen_values / f64::from(hidden_size.max(1))
    }

    /// The probing signal in [0, 1].
    pub fn signal(&self, hidden_size: u32, s: &ProbingSettings) -> f64 {
        let share = if self.flags.len() >= s.min_requests {
            self.flags.fraction(MAX_TOP, s.min_requests)
        } else {
            0.0
        };
        let top = s.max_top_cap * ramp(share, s.max_top_share);
        let sweep = ramp(self.distinct_bias_ids(), s.bias_ids);
        let h = f64::from(hidden_size.max(1));
        let vectors = ramp(
            self.vectors(hidden_size),
            (s.vectors.0 * h, s.vectors.1 * h),
        );
        1.0 - (1.0 - top) * (1.0 - sweep) * (1.0 - vectors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_chat_is_not_probing() {
        let s = ProbingSettings::default();
        let mut p = Probing::new(&s);
        for i in 0..500u32 {
            let logprobs = i % 5 == 0;
            let bias: &[(u32, f64)] = if i % 50 == 0 { &[(50256, -100.0)] } else { &[] };
            p.observe(logprobs, if logprobs { 3 } else { 0 }, bias, 400, &s);
        }
        assert_eq!(p.signal(4096, &s), 0.0);
    }

    #[test]
    fn vocabulary_sweep_is_probing() {
        let s = ProbingSettings::default();
        let mut p = Probing::new(&s);
        let mut next = 0u32;
        let mut requests = 0;
        while p.signal(4096, &s) < 0.99 {
            let bias: Vec<(u32, f64)> = (next..next + 20).map(|t| (t, 100.0)).collect();
            next += 20;
            p.observe(true, 20, &bias, 1, &s);
            requests += 1;
            assert!(requests < 40, "a sweep is caught within a few hundred ids");
        }
        assert!(p.vectors(4096) < 1.0);
    }

    #[test]
    fn distinct_ids_estimate_is_close() {
        let s = ProbingSettings::default();
        let mut p = Probing::new(&s);
        let ids: Vec<(u32, f64)> = (1000..1300).map(|t| (t, 1.0)).collect();
        p.observe(false, 0, &ids, 10, &s);
        p.observe(false, 0, &ids, 10, &s);
        let n = p.distinct_bias_ids();
        assert!((n - 300.0).abs() < 30.0, "{n}");
    }

    #[test]
    fn always_max_logprobs_alone_only_warns() {
        let s = ProbingSettings::default();
        let mut p = Probing::new(&s);
        for _ in 0..200 {
            p.observe(true, 20, &[], 200, &s);
        }
        let v = p.signal(4096, &s);
        assert!((v - s.max_top_cap).abs() < 1e-9, "{v}");
    }

    #[test]
    fn collected_vectors_are_counted_against_hidden_size() {
        let s = ProbingSettings::default();
        let mut p = Probing::new(&s);
        // The same 20 ids every time: no sweep, but 21 values per request.
        let bias: Vec<(u32, f64)> = (0..20).map(|t| (t, 100.0)).collect();
        for _ in 0..4096 {
            p.observe(true, 20, &bias, 1, &s);
        }
        assert!((p.vectors(4096) - 20.0).abs() < 1e-9);
        let part = p.signal(4096, &s);
        for _ in 0..4096 * 3 {
            p.observe(true, 20, &bias, 1, &s);
        }
        assert!(p.signal(4096, &s) > part);
        assert_eq!(p.signal(4096, &s), 1.0, "80 vectors: past 1/64 of 4096");
    }
}
