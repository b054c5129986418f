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
//! one bit per bucket it was answered in, in each of [`TABLES`]
//! independent tables (the share is their mean).
//!
//! Nothing here is learnt from callers: the hyperplanes pass through the
//! origin, not through a mean of live answers, so a caller cannot move
//! them. Embeddings that all lean one way use fewer buckets for everyone;
//! the operator's threshold (`max_coverage`, proposed by `warden limits`
//! from a recording of the same measure) absorbs that.
//!
//! Memory: the hyperplanes, 192 bytes per coordinate of an embedding
//! width (288 KiB at 1,536), at most [`MAX_WIDTHS`] widths of at most
//! [`MAX_WIDTH`] values (widths are the model's, not the caller's); 2 KiB
//! per identity that was answered embeddings.

use std::sync::{Arc, RwLock};

use rand::Rng;

/// Hyperplanes per table: 2^12 = 4,096 buckets, as in B4B's evaluation.
pub const PLANES: usize = 12;
/// Buckets of one table.
pub const BUCKETS: usize = 1 << PLANES;
/// Independent tables: a share is their mean, so that what one random
/// draw of hyperplanes makes of the same answers (the recording's draw and
/// the enforcing proxy's are different processes) varies half as much.
pub const TABLES: usize = 4;
/// Widest embedding measured (wider answers are not measured).
pub const MAX_WIDTH: usize = 8_192;

/// Lanes of the projection: every table's dot products side by side, so
/// the loop over an embedding vectorizes.
pub const LANES: usize = PLANES * TABLES;

/// The hyperplanes of a route, one set for every embedding width: an
/// answer of `width` values is projected on the first `width` components
/// of each normal. Callers choose the width (`dimensions`), so widths must
/// not be a resource they can use up; and a shortened embedding
/// (Matryoshka, as OpenAI's `dimensions` gives) is the prefix of the full
/// one, so its buckets stay close to the full one's.
#[derive(Debug, Default)]
pub struct AnswerSpace {
    /// For each input coordinate, its component in each hyperplane's
    /// normal (`LANES` per coordinate): one pass over an embedding computes
    /// every dot product. Grown to the widest answer seen, the prefix kept.
    normals: RwLock<Arc<Vec<[f32; LANES]>>>,
}

impl AnswerSpace {
    /// The normals for answers of `width` values (at least `width` of
    /// them), grown on first need; None past [`MAX_WIDTH`].
    pub fn normals(&self, width: usize) -> Option<Arc<Vec<[f32; LANES]>>> {
        if width == 0 || width > MAX_WIDTH {
            return None;
        }
        if let Ok(n) = self.normals.read()
            && n.len() >= width
        {
            return Some(n.clone());
        }
        let mut n = self.normals.write().ok()?;
        if n.len() < width {
            let mut rng = rand::rng();
            let mut grown = Vec::with_capacity(width);
            grown.extend_from_slice(&n);
            // Gaussian components (Box-Muller): the normals are uniformly
            // distributed directions, as random-hyperplane LSH needs.
            grown.resize_with(width, || {
                std::array::from_fn(|_| {
                    let (u, v): (f64, f64) =
                        (rng.random::<f64>().max(f64::MIN_POSITIVE), rng.random());
                    ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
                })
            });
            *n = Arc::new(grown);
        }
        Some(n.clone())
    }
}

/// The bucket of one embedding in each table, projected on the first
/// `v.len()` components of `normals` (at least that many).
pub fn buckets(normals: &[[f32; LANES]], v: &[f32]) -> [u16; TABLES] {
    let mut dot = [0f32; LANES];
    for (normal, x) in normals.iter().zip(v) {
        for (d, w) in dot.iter_mut().zip(normal) {
            *d += w * x;
        }
    }
    let mut out = [0u16; TABLES];
    for (b, planes) in out.iter_mut().zip(dot.chunks_exact(PLANES)) {
        *b = planes
            .iter()
            .enumerate()
            .fold(0, |b, (i, d)| if *d > 0.0 { b | 1 << i } else { b });
    }
    out
}

/// The buckets one identity was answered in on one UTC day, in each
/// table: the share is per day, as it is recorded and proposed.
#[derive(Debug, Clone)]
pub struct Cover {
    day: u64,
    bits: [[u64; BUCKETS / 64]; TABLES],
    covered: [u32; TABLES],
}

impl Default for Cover {
    fn default() -> Self {
        Self {
            day: 0,
            bits: [[0; BUCKETS / 64]; TABLES],
            covered: [0; TABLES],
        }
    }
}

impl Cover {
    /// Upper bound of the bytes one cover holds.
    pub const BYTES: usize = std::mem::size_of::<Self>();

    /// Starts the cover over when `day` (days since 1970, UTC) is not its own.
    pub fn on(&mut self, day: u64) {
        if self.day != day {
            *self = Self {
                day,
                ..Self::default()
            };
        }
    }

    /// Marks an answer's buckets (one per table) as answered.
    pub fn add(&mut self, buckets: [u16; TABLES]) {
        for ((bits, covered), b) in self.bits.iter_mut().zip(&mut self.covered).zip(buckets) {
            let (word, bit) = (usize::from(b) / 64 % bits.len(), b % 64);
            if bits[word] >> bit & 1 == 0 {
                bits[word] |= 1 << bit;
                *covered += 1;
            }
        }
    }

    /// The share of the buckets answered, in [0, 1].
    pub fn share(&self) -> f64 {
        let covered: u32 = self.covered.iter().sum();
        f64::from(covered) / (BUCKETS * TABLES) as f64
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
            let space = AnswerSpace::default();
            let normals = space.normals(width).unwrap();
            let mut state = 0x9e37_79b9_7f4a_7c15u64;
            let topic: Vec<f32> = around(&vec![0.0; width], 1.0, &mut state);
            let (mut narrow, mut broad) = (Cover::default(), Cover::default());
            for _ in 0..4000 {
                // A topic: a spread of a fifth of a unit vector around its centre.
                narrow.add(buckets(
                    &normals,
                    &around(&topic, 0.7 / (width as f32).sqrt(), &mut state),
                ));
                broad.add(buckets(
                    &normals,
                    &around(&vec![0.0; width], 1.0, &mut state),
                ));
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
    fn one_set_of_normals_serves_every_width_and_keeps_its_prefix() {
        let space = AnswerSpace::default();
        assert!(space.normals(0).is_none() && space.normals(MAX_WIDTH + 1).is_none());
        let short = space.normals(256).unwrap();
        let long = space.normals(1536).unwrap();
        assert_eq!((short.len(), long.len()), (256, 1536));
        assert_eq!(&long[..256], &short[..], "growing keeps the prefix");
        assert!(Arc::ptr_eq(&space.normals(300).unwrap(), &long));
    }

    #[test]
    fn a_cover_starts_over_each_day() {
        let mut c = Cover::default();
        c.on(20_000);
        c.add([1, 2, 3, 4]);
        c.add([1, 2, 3, 4]);
        assert!((c.share() - 1.0 / 4096.0).abs() < 1e-12);
        c.on(20_000);
        assert!(c.share() > 0.0);
        c.on(20_001);
        assert_eq!(c.share(), 0.0);
    }
}
