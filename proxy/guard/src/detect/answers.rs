//! What a caller was answered: its coverage of the embedding space (B4B).
//!
//! Stealing an encoder takes its embeddings of texts that cover the space
//! (Sha et al. 2023, StolenEncoder). Its input texts can look as natural
//! as any honest caller's, so the input side cannot tell a crawl of
//! real-looking text from an indexer's corpus. What differs is the breadth
//! of the answers: an honest caller's embeddings crowd in the part of the
//! space its topics live in, a crawler's spread over all of it. As in B4B
//! (Dziedzic et al. 2023), that breadth is the share of locality-sensitive
//! buckets of the answers: [`PLANES`] random hyperplanes through the
//! origin, drawn at start from the process's own randomness (a caller
//! cannot aim at them), give [`BUCKETS`] buckets, and each identity keeps
//! one bit per bucket it was answered in.
//!
//! Nothing here is learnt from callers: the hyperplanes pass through the
//! origin, not through a mean of live answers, so a caller cannot move
//! them. Embeddings that all lean one way use fewer buckets for everyone;
//! the operator's threshold (`max_coverage`, proposed by `warden limits`
//! from a recording of the same measure) absorbs that.
//!
//! Memory: the hyperplanes, 64 bytes per coordinate of an embedding width
//! (96 KiB at 1,536), at most [`MAX_WIDTHS`] widths of at most
//! [`MAX_WIDTH`] values (widths are the model's, not the caller's); 512
//! bytes per identity that was answered embeddings.

use std::sync::{Arc, Mutex};

use rand::Rng;

/// Hyperplanes per space: 2^12 = 4,096 buckets, as in B4B's evaluation.
pub const PLANES: usize = 12;
/// Buckets of the answer space.
pub const BUCKETS: usize = 1 << PLANES;
/// Widest embedding measured (wider answers are not measured).
pub const MAX_WIDTH: usize = 16_384;
/// Most embedding widths one route measures at once.
pub const MAX_WIDTHS: usize = 8;

/// Lanes of the projection: the `PLANES` dot products are computed side by
/// side, padded to a multiple of the SIMD width so the loop vectorizes.
const LANES: usize = 16;

/// The hyperplanes of one embedding width.
#[derive(Debug)]
pub struct AnswerSpace {
    width: usize,
    /// For each input coordinate, its component in each hyperplane's
    /// normal (`LANES` per coordinate, the ones past `PLANES` zero): one
    /// pass over an embedding computes every dot product.
    normals: Vec<[f32; LANES]>,
}

impl AnswerSpace {
    fn new(width: usize) -> Self {
        let mut rng = rand::rng();
        // Gaussian components (Box-Muller): the normals are uniformly
        // distributed directions, as random-hyperplane LSH needs.
        let normals = (0..width)
            .map(|_| {
                std::array::from_fn(|lane| {
                    if lane >= PLANES {
                        return 0.0;
                    }
                    let (u, v): (f64, f64) =
                        (rng.random::<f64>().max(f64::MIN_POSITIVE), rng.random());
                    ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
                })
            })
            .collect();
        Self { width, normals }
    }

    /// The bucket of one embedding of this space's width.
    pub fn bucket(&self, v: &[f32]) -> usize {
        let mut dot = [0f32; LANES];
        for (normal, x) in self.normals.iter().zip(v) {
            for (d, w) in dot.iter_mut().zip(normal) {
                *d += w * x;
            }
        }
        dot.iter()
            .take(PLANES)
            .enumerate()
            .fold(0, |b, (i, d)| if *d > 0.0 { b | 1 << i } else { b })
    }
}

/// The answer spaces of a route, one per embedding width seen.
#[derive(Debug, Default)]
pub struct AnswerSpaces(Mutex<Vec<Arc<AnswerSpace>>>);

impl AnswerSpaces {
    /// The space for embeddings of `width` values, made on first use; None
    /// for a width outside the bounds, or past [`MAX_WIDTHS`] widths.
    pub fn get(&self, width: usize) -> Option<Arc<AnswerSpace>> {
        if width == 0 || width > MAX_WIDTH {
            return None;
        }
        let mut spaces = self.0.lock().ok()?;
        if let Some(s) = spaces.iter().find(|s| s.width == width) {
            return Some(s.clone());
        }
        if spaces.len() >= MAX_WIDTHS {
            return None;
        }
        let s = Arc::new(AnswerSpace::new(width));
        spaces.push(s.clone());
        Some(s)
    }
}

/// The buckets one identity was answered in.
#[derive(Debug, Clone)]
pub struct Cover {
    bits: [u64; BUCKETS / 64],
    covered: u32,
}

impl Default for Cover {
    fn default() -> Self {
        Self {
            bits: [0; BUCKETS / 64],
            covered: 0,
        }
    }
}

impl Cover {
    /// Upper bound of the bytes one cover holds.
    pub const BYTES: usize = std::mem::size_of::<Self>();

    /// Marks `bucket` as answered.
    pub fn add(&mut self, bucket: usize) {
        let (word, bit) = (bucket / 64 % self.bits.len(), bucket % 64);
        if self.bits[word] >> bit & 1 == 0 {
            self.bits[word] |= 1 << bit;
            self.covered += 1;
        }
    }

    /// The share of the buckets answered, in [0, 1].
    pub fn share(&self) -> f64 {
        f64::from(self.covered) / BUCKETS as f64
    }
}

/// How broad a share of the buckets is, in answers spread uniformly: `n`
/// answers in `B` buckets cover `1 - exp(-n/B)` of them, so a share `c`
/// takes `-B ln(1 - c)`. Coverage saturates, breadth does not: "twice the
/// breadth" means what "twice the volume" does for a uniform crawl.
pub fn breadth(share: f64) -> f64 {
    -(1.0 - share.clamp(0.0, 0.999_999)).ln()
}

/// The share that is `times` the breadth of `share`.
pub fn widened(share: f64, times: f64) -> f64 {
    1.0 - (1.0 - share.clamp(0.0, 1.0)).powf(times.max(0.0))
}

/// The signal of a caller that was answered `share` of the buckets on a
/// route that allows `max`: 0 up to half of `max`'s breadth, rising to
/// `at_max` (the ladder's refuse threshold) at `max`, so that the caller is
/// warned on the way and refused when it reaches the share the operator
/// allows.
pub fn signal(share: f64, max: f64, at_max: f64) -> f64 {
    if max.is_nan() || max <= 0.0 {
        return 0.0;
    }
    let full = breadth(max);
    at_max * super::window::ramp(breadth(share), (full / 2.0, full))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A unit vector near `centre` (a topic) or anywhere (`spread` 1).
    fn around(centre: &[f32], spread: f32, state: &mut u64) -> Vec<f32> {
        let mut next = || {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            (*state >> 11) as f32 / (1u64 << 53) as f32 - 0.5
        };
        let v: Vec<f32> = centre.iter().map(|c| c + spread * next()).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-9);
        v.into_iter().map(|x| x / n).collect()
    }

    #[test]
    fn a_narrow_caller_covers_few_buckets_and_a_broad_one_many() {
        // (Below 12 values, 12 hyperplanes cut fewer than 4,096 regions.)
        for width in [16, 64, 384, 1536] {
            let space = AnswerSpace::new(width);
            let mut state = 0x9e37_79b9_7f4a_7c15u64;
            let topic: Vec<f32> = around(&vec![0.0; width], 1.0, &mut state);
            let (mut narrow, mut broad) = (Cover::default(), Cover::default());
            for _ in 0..4000 {
                // A topic: a spread of a fifth of a unit vector around its centre.
                narrow.add(space.bucket(&around(&topic, 0.7 / (width as f32).sqrt(), &mut state)));
                broad.add(space.bucket(&around(&vec![0.0; width], 1.0, &mut state)));
            }
            // Uniform draws would cover 1 - e^(-4000/4096) = 0.62; regions
            // differ in size, so a crawl covers less, a topic far less.
            let (n, b) = (narrow.share(), broad.share());
            assert!(n < 0.1, "width {width}: one topic covers {n}");
            assert!(b > 0.35 && b > 5.0 * n, "width {width}: a crawl covers {b}");
        }
    }

    #[test]
    fn the_signal_reaches_the_refuse_threshold_at_the_allowed_share() {
        // 0.75 is twice the breadth of 0.5.
        assert!((widened(0.5, 2.0) - 0.75).abs() < 1e-12);
        assert!((breadth(0.75) - 2.0 * breadth(0.5)).abs() < 1e-9);
        assert_eq!(signal(0.5, 0.75, 0.8), 0.0, "half the breadth: nothing");
        assert!((signal(widened(0.5, 1.5), 0.75, 0.8) - 0.4).abs() < 1e-9);
        assert!(signal(0.75, 0.75, 0.8) >= 0.8 - 1e-9);
        assert_eq!(signal(0.9, 0.0, 0.8), 0.0, "no threshold, no signal");
        assert!(signal(1.0, 1.0, 0.8).is_finite());
    }

    #[test]
    fn widths_are_bounded() {
        let spaces = AnswerSpaces::default();
        assert!(spaces.get(0).is_none() && spaces.get(MAX_WIDTH + 1).is_none());
        for w in 1..=MAX_WIDTHS {
            assert!(spaces.get(w).is_some());
        }
        assert!(spaces.get(MAX_WIDTHS + 1).is_none());
        assert!(Arc::ptr_eq(
            &spaces.get(3).unwrap(),
            &spaces.get(3).unwrap()
        ));
    }
}
