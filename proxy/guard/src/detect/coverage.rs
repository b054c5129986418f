//! Coverage of the input (or embedding) space, against what natural traffic
//! covers.
//!
//! Extraction wants answers everywhere, natural use asks where the data is:
//! uniformly random queries (Tramèr et al. 2016) and synthetic samples spread
//! over regions that the population of callers rarely visits. The space is
//! cut into cells by random hyperplanes (several independent tables; in each,
//! a few random directions each cut by three parallel planes, at the centre
//! and at two deviations either side, as in quantized locality-sensitive
//! hashing); the detector learns how
//! often natural traffic lands in each cell from callers that are not
//! suspected, and scores an identity by how much more of its recent queries
//! land in rare cells than natural traffic does.
//!
//! Feature vectors are standardized with the population's per-coordinate
//! mean and deviation, frozen after a warm-up so that cells stay fixed.
//! Texts use the top bits of their SimHash, which already is a
//! random-hyperplane hash of their trigram counts. An operator's reference
//! (vectors, or texts) defines the cells' natural counts at once, and live
//! callers teach nothing; without one, until the population has seen
//! enough queries the signal stays 0: it cannot know what is rare yet.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::lanes;
use super::natural::{Natural, lifted};
use super::window::{Flags, ramp};

/// Tuning of the coverage signal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CoverageSettings {
    /// Hyperplanes per table (cells per table = 2^bits).
    pub bits: u32,
    /// Independent tables.
    pub tables: usize,
    /// Natural feature queries used to learn the standardization.
    pub warmup: u64,
    /// Natural queries counted in cells before the signal is trusted.
    pub min_population: u64,
    /// A cell is rare when natural traffic lands in it with probability below
    /// this fraction of a uniform cell's (1 / 2^bits).
    pub rare: f64,
    /// Queries per identity over which the rare share is taken.
    pub window: usize,
    /// The share counts only once this many queries are in the window.
    pub min_queries: usize,
    /// Excess rare share (over natural traffic's) where the signal starts,
    /// and where it is 1.
    pub excess: (f64, f64),
    /// Queries one identity may contribute to the population.
    pub teach: u32,
    /// Share of a caller's queries that are outliers of the reference where
    /// the signal starts, and where it is 1 (raised above the reference's
    /// own rate).
    pub outliers: (f64, f64),
}

impl Default for CoverageSettings {
    fn default() -> Self {
        Self {
            bits: 10,
            tables: 4,
            warmup: 2048,
            min_population: 8192,
            rare: 2.0,
            window: 64,
            min_queries: 24,
            excess: (0.2, 0.6),
            teach: 256,
            outliers: (0.15, 0.45),
        }
    }
}

/// Feature spaces tracked at most (one per input width).
const MAX_SPACES: usize = 8;
/// Where the outer hyperplanes cut each direction, in deviations of the
/// standardized data: natural traffic is beyond it ~5% of the time per
/// direction, a query spread over the features' whole ranges far more often.
const TAIL: f64 = 2.0;
/// The key of the text space.
pub const TEXT_SPACE: usize = usize::MAX;

struct Frozen {
    mean: Vec<f64>,
    inv_std: Vec<f64>,
    /// tables * directions unit vectors of `k` coordinates, row-major.
    planes: Vec<f64>,
}

struct Warm {
    n: u64,
    mean: Vec<f64>,
    m2: Vec<f64>,
}

/// One space (an input width, or texts): how natural traffic fills its cells.
pub struct Space {
    key: usize,
    k: usize,
    settings: CoverageSettings,
    warm: Mutex<Warm>,
    frozen: OnceLock<Frozen>,
    counts: Box<[AtomicU32]>,
    total: AtomicU64,
    rare_mass: AtomicU64,
    /// The reference's median distance of a row to the nearest of the
    /// `history` rows before it (standardized); 0 until seeded.
    nearest_median: AtomicU64,
    /// Defined by an operator's reference: live traffic teaches nothing.
    fixed: AtomicBool,
    /// Natural traffic's rates, measured on the reference.
    natural: OnceLock<Natural>,
}

impl std::fmt::Debug for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Space")
            .field("key", &self.key)
            .field("k", &self.k)
            .field("frozen", &self.frozen.get().is_some())
            .field("total", &self.total.load(Ordering::Relaxed))
            .field("rare_mass", &self.rare_mass())
            .finish()
    }
}

impl Space {
    fn new(key: usize, k: usize, settings: CoverageSettings) -> Self {
        let cells = settings.tables * (1usize << settings.bits);
        let space = Self {
            key,
            k,
            settings,
            warm: Mutex::new(Warm {
                n: 0,
                mean: vec![0.0; k],
                m2: vec![0.0; k],
            }),
            frozen: OnceLock::new(),
            counts: (0..cells).map(|_| AtomicU32::new(0)).collect(),
            total: AtomicU64::new(0),
            rare_mass: AtomicU64::new(0f64.to_bits()),
            nearest_median: AtomicU64::new(0f64.to_bits()),
            fixed: AtomicBool::new(false),
            natural: OnceLock::new(),
        };
        if key == TEXT_SPACE {
            let _ = space.frozen.set(Frozen {
                mean: Vec::new(),
                inv_std: Vec::new(),
                planes: Vec::new(),
            });
        }
        space
    }

    fn bits(&self) -> u32 {
        self.settings.bits.clamp(1, 16)
    }

    fn tables(&self) -> usize {
        self.settings.tables.clamp(1, 8)
    }

    /// Random directions per table: each is cut by three parallel
    /// hyperplanes (at -TAIL, 0 and +TAIL deviations), two bits of the cell.
    fn directions(&self) -> usize {
        (self.bits() as usize / 2).max(1)
    }

    /// The cell of `v` in each table (indices into the shared count array);
    /// `None` until the standardization is learnt.
    pub fn cells(&self, v: &[f64], out: &mut [usize; 8]) -> Option<usize> {
        let f = self.frozen.get()?;
        let dirs = self.directions();
        let tables = self.tables();
        // Standardized once; each plane is then one dot product.
        let mut buf = [0f64; lanes::MAX_LANES];
        if v.len() != self.k || self.k > lanes::MAX_LANES {
            return None;
        }
        for (((z, x), m), s) in buf.iter_mut().zip(v).zip(&f.mean).zip(&f.inv_std) {
            *z = (x - m) * s;
        }
        let z = &buf[..self.k];
        for (t, slot) in out.iter_mut().enumerate().take(tables) {
            let mut cell = 0usize;
            for j in 0..dirs {
                let plane = (t * dirs + j) * self.k;
                let row = f.planes.get(plane..plane + self.k)?;
                let p = lanes::dot(row, z);
                // 0 below -TAIL, 1 below 0, 2 below TAIL, else 3: without
                // branches (where a query falls is not predictable).
                let bin = usize::from(p >= -TAIL) + usize::from(p >= 0.0) + usize::from(p >= TAIL);
                cell |= bin << (2 * j);
            }
            *slot = (t << self.bits()) | cell;
        }
        Some(tables)
    }

    /// The cells of a text by its SimHash (`bits` bits per table, taken from
    /// successive slices of the hash).
    pub fn text_cells(&self, h: u64, out: &mut [usize; 8]) -> usize {
        let bits = self.bits().min(16);
        let tables = self.tables().min((64 / bits) as usize).max(1);
        for (t, slot) in out.iter_mut().enumerate().take(tables) {
            let cell = (h >> (t as u32 * bits)) as usize & ((1 << bits) - 1);
            *slot = (t << bits) | cell;
        }
        tables
    }

    /// Learns from one natural query (already sketched to `k` coordinates);
    /// `cells` are its cells when known.
    pub fn learn(&self, v: &[f64], cells: Option<(&[usize; 8], usize)>) {
        if self.fixed.load(Ordering::Relaxed) {
            return;
        }
        let Some((cells, n)) = cells else {
            self.learn_standardization(v);
            return;
        };
        for &c in cells.iter().take(n) {
            if let Some(a) = self.counts.get(c) {
                a.fetch_add(1, Ordering::Relaxed);
            }
        }
        let total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        if total.is_multiple_of(1024) || total == self.settings.min_population {
            self.refresh_rare_mass(total);
        }
    }

    fn learn_standardization(&self, v: &[f64]) {
        if self.frozen.get().is_some() || v.len() != self.k {
            return;
        }
        let Ok(mut w) = self.warm.lock() else {
            return;
        };
        w.n += 1;
        let n = w.n;
        let Warm { mean, m2, .. } = &mut *w;
        welford(mean, m2, n, v);
        if w.n >= self.settings.warmup.max(2) {
            self.freeze(w.n, w.mean.clone(), &w.m2);
        }
    }

    /// Fixes the standardization (from `n` queries' means and sums of
    /// squared deviations) and cuts the space.
    fn freeze(&self, n: u64, mean: Vec<f64>, m2: &[f64]) {
        let n = n as f64;
        let inv_std = m2
            .iter()
            .map(|s| {
                let sd = (s / (n - 1.0).max(1.0)).sqrt();
                if sd > 0.0 { 1.0 / sd } else { 0.0 }
            })
            .collect();
        let dirs = self.directions();
        let tables = self.tables();
        // Seeded by the space, so every detector cuts a space the same way.
        let mut rng = StdRng::seed_from_u64(0x636f_7665_7261_6765 ^ self.k as u64);
        let mut planes = Vec::with_capacity(tables * dirs * self.k);
        for _ in 0..tables * dirs {
            let row: Vec<f64> = (0..self.k).map(|_| gaussian(&mut rng)).collect();
            let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            planes.extend(row.iter().map(|x| x / norm));
        }
        let _ = self.frozen.set(Frozen {
            mean,
            inv_std,
            planes,
        });
    }

    /// Defines natural traffic by an operator's reference (vectors sketched
    /// to this space's width), at once and for good: the standardization is
    /// the reference's, its cells count as a whole population (weighted up
    /// to `min_population`), the typical nearest distance is taken within
    /// it, and live callers teach nothing from then on. No-op on a space
    /// that was already cut by live traffic, or for an empty reference.
    pub fn seed(&self, rows: &[Vec<f64>], history: usize) {
        let rows: Vec<&Vec<f64>> = rows.iter().filter(|r| r.len() == self.k).collect();
        if rows.len() < 2 || self.frozen.get().is_some() {
            return;
        }
        let (mut mean, mut m2) = (vec![0.0; self.k], vec![0.0; self.k]);
        for (i, r) in rows.iter().enumerate() {
            welford(&mut mean, &mut m2, i as u64 + 1, r);
        }
        // Distances as a caller's history measures them: in the reference's
        // standard units, to the nearest of the `history` vectors before.
        let inv: Vec<f64> = m2
            .iter()
            .map(|s| {
                let sd = (s / (rows.len() - 1) as f64).sqrt();
                if sd > 0.0 { 1.0 / sd } else { 1.0 }
            })
            .collect();
        self.freeze(rows.len() as u64, mean, &m2);
        self.count_reference(&rows, |r, cells| self.cells(r, cells));
        let mut nearest: Vec<f64> = (1..rows.len())
            .filter_map(|i| {
                rows[i.saturating_sub(history.max(1))..i]
                    .iter()
                    .map(|p| {
                        p.iter()
                            .zip(rows[i].iter())
                            .zip(&inv)
                            .map(|((a, b), s)| ((a - b) * s).powi(2))
                            .sum::<f64>()
                            .sqrt()
                    })
                    .filter(|d| *d > 0.0)
                    .reduce(f64::min)
            })
            .collect();
        if !nearest.is_empty() {
            nearest.sort_by(f64::total_cmp);
            let m = nearest[nearest.len() / 2];
            self.nearest_median.store(m.to_bits(), Ordering::Relaxed);
        }
        self.fixed.store(true, Ordering::Relaxed);
    }

    /// Defines natural texts by an operator's reference (their SimHashes):
    /// their cells count as a whole population and live callers teach
    /// nothing from then on. No-op on a feature space, on a text space
    /// already taught by live traffic, or for fewer than two texts.
    pub fn seed_texts(&self, hashes: &[u64]) {
        if self.key != TEXT_SPACE || hashes.len() < 2 || self.total.load(Ordering::Relaxed) > 0 {
            return;
        }
        self.count_reference(hashes, |h, cells| Some(self.text_cells(*h, cells)));
        self.fixed.store(true, Ordering::Relaxed);
    }

    /// Counts a reference's cells as a population of `min_population`
    /// queries (each row weighted alike).
    fn count_reference<T>(
        &self,
        rows: &[T],
        cells_of: impl Fn(&T, &mut [usize; 8]) -> Option<usize>,
    ) {
        let weight = self
            .settings
            .min_population
            .div_ceil(rows.len() as u64)
            .max(1);
        let add = u32::try_from(weight).unwrap_or(u32::MAX);
        let mut cells = [0usize; 8];
        for r in rows {
            if let Some(n) = cells_of(r, &mut cells) {
                for &c in cells.iter().take(n) {
                    if let Some(a) = self.counts.get(c) {
                        a.fetch_add(add, Ordering::Relaxed);
                    }
                }
            }
        }
        let total = weight * rows.len() as u64;
        self.total.store(total, Ordering::Relaxed);
        self.refresh_rare_mass(total);
    }

    /// Keeps what the reference says of natural traffic (once).
    pub fn calibrate(&self, natural: Natural) {
        let _ = self.natural.set(natural);
    }

    /// Natural traffic's rates, when a reference measured them.
    pub fn natural(&self) -> Option<&Natural> {
        self.natural.get()
    }

    fn rare_threshold(&self, total: u64) -> f64 {
        self.settings.rare * total as f64 / f64::from(1u32 << self.bits())
    }

    fn refresh_rare_mass(&self, total: u64) {
        let threshold = self.rare_threshold(total);
        let rare: u64 = self
            .counts
            .iter()
            .map(|c| u64::from(c.load(Ordering::Relaxed)))
            .filter(|&c| (c as f64) < threshold)
            .sum();
        let mass = rare as f64 / (total as f64 * self.tables() as f64);
        self.rare_mass.store(mass.to_bits(), Ordering::Relaxed);
    }

    /// Whether the query with these cells is in a rare region (rare in most
    /// tables); `None` while the population is too small to say.
    pub fn is_rare(&self, cells: &[usize; 8], n: usize) -> Option<bool> {
        let total = self.total.load(Ordering::Relaxed);
        if total < self.settings.min_population.max(1) || n == 0 {
            return None;
        }
        let threshold = self.rare_threshold(total);
        let rare = cells
            .iter()
            .take(n)
            .filter(|&&c| {
                self.counts
                    .get(c)
                    .is_some_and(|a| f64::from(a.load(Ordering::Relaxed)) < threshold)
            })
            .count();
        Some(rare * 2 > n)
    }

    /// The median distance of a natural query to its caller's nearest
    /// earlier one, when a reference gave it.
    pub fn typical_nearest(&self) -> Option<f64> {
        let m = f64::from_bits(self.nearest_median.load(Ordering::Relaxed));
        (m > 0.0).then_some(m)
    }

    /// Share of natural traffic in rare cells (per table, averaged).
    pub fn rare_mass(&self) -> f64 {
        f64::from_bits(self.rare_mass.load(Ordering::Relaxed))
    }
}

/// Adds the `n`-th vector `x` to running means and sums of squared
/// deviations (Welford's update).
pub(crate) fn welford(mean: &mut [f64], m2: &mut [f64], n: u64, x: &[f64]) {
    let n = n as f64;
    for ((m, s), &v) in mean.iter_mut().zip(m2.iter_mut()).zip(x) {
        let d = v - *m;
        *m += d / n;
        *s += d * (v - *m);
    }
}

fn gaussian(rng: &mut StdRng) -> f64 {
    let u: f64 = rng.random_range(1e-12..1.0);
    let v: f64 = rng.random();
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
}

/// Every space the detector has seen, shared by all identities.
#[derive(Debug, Default)]
pub struct Population {
    spaces: RwLock<Vec<Arc<Space>>>,
}

impl Population {
    /// The space for inputs of width `key` (sketched to `k`), made on first
    /// use; `None` when too many widths are already tracked.
    pub fn space(&self, key: usize, k: usize, settings: &CoverageSettings) -> Option<Arc<Space>> {
        if let Ok(spaces) = self.spaces.read()
            && let Some(s) = spaces.iter().find(|s| s.key == key)
        {
            return Some(s.clone());
        }
        let mut spaces = self.spaces.write().ok()?;
        if let Some(s) = spaces.iter().find(|s| s.key == key) {
            return Some(s.clone());
        }
        if spaces.len() >= MAX_SPACES {
            return None;
        }
        let s = Arc::new(Space::new(key, k, *settings));
        spaces.push(s.clone());
        Some(s)
    }

    /// Bytes held by the population at most.
    pub fn max_bytes(settings: &CoverageSettings, k: usize) -> usize {
        let per_space = settings.tables.clamp(1, 8) * (1usize << settings.bits.clamp(1, 16)) * 4
            + settings.tables.clamp(1, 8) * settings.bits.clamp(1, 16) as usize * (k + 1) * 8
            + 4 * k * 8
            // A reference's outlier test: its mean and whitening factor.
            + (k * k + k) * 8;
        MAX_SPACES * per_space
    }
}

/// One identity's recent queries: whether each landed in a rare cell.
#[derive(Debug, Clone)]
pub struct Tally {
    flags: Flags,
}

impl Tally {
    /// No queries yet.
    pub fn new(s: &CoverageSettings) -> Self {
        Self {
            flags: Flags::new(s.window),
        }
    }

    /// Records whether one query was in a rare cell, and whether it was an
    /// outlier of the reference.
    pub fn push(&mut self, rare: bool, outlying: bool) {
        self.flags.push(u8::from(rare) | u8::from(outlying) << 1);
    }

    /// The coverage signal: the share in rare cells beyond the space's
    /// natural rare share, or the share of outliers beyond the reference's
    /// own rate.
    pub fn signal(
        &self,
        natural_rare: f64,
        natural: Option<&Natural>,
        s: &CoverageSettings,
    ) -> f64 {
        if self.flags.len() < s.min_queries {
            return 0.0;
        }
        let cells = ramp(
            self.flags.fraction(0, s.min_queries) - natural_rare,
            s.excess,
        );
        let outliers = natural.map_or(0.0, |n| {
            ramp(
                self.flags.fraction(1, s.min_queries),
                lifted(s.outliers, n.outlier_rate, s.window),
            )
        });
        cells.max(outliers)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn natural(rng: &mut StdRng) -> Vec<f64> {
        // Two tight clusters in 8 dimensions.
        let c = if rng.random::<bool>() { 2.0 } else { -2.0 };
        (0..8).map(|_| c + 0.5 * gaussian(rng)).collect()
    }

    #[test]
    fn random_queries_cover_rare_cells_and_natural_ones_do_not() {
        let s = CoverageSettings::default();
        let pop = Population::default();
        let space = pop.space(8, 8, &s).unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let mut cells = [0usize; 8];
        for _ in 0..(s.warmup + s.min_population) {
            let v = natural(&mut rng);
            let c = space.cells(&v, &mut cells);
            space.learn(&v, c.map(|n| (&cells, n)));
        }
        let natural_rare = space.rare_mass();
        assert!(natural_rare < 0.05, "{natural_rare}");

        let (mut honest, mut random) = (Tally::new(&s), Tally::new(&s));
        for _ in 0..64 {
            let v = natural(&mut rng);
            let n = space.cells(&v, &mut cells).unwrap();
            honest.push(space.is_rare(&cells, n).unwrap(), false);
            let v: Vec<f64> = (0..8).map(|_| rng.random_range(-4.0..4.0)).collect();
            let n = space.cells(&v, &mut cells).unwrap();
            random.push(space.is_rare(&cells, n).unwrap(), false);
        }
        assert_eq!(honest.signal(natural_rare, None, &s), 0.0);
        assert!(random.signal(natural_rare, None, &s) > 0.9);
    }

    #[test]
    fn signal_waits_for_a_population() {
        let s = CoverageSettings::default();
        let pop = Population::default();
        let space = pop.space(4, 4, &s).unwrap();
        let mut cells = [0usize; 8];
        assert!(space.cells(&[0.0; 4], &mut cells).is_none());
        space.learn(&[0.0; 4], None);
        let n = space.text_cells(0xdead_beef, &mut cells);
        assert!(space.is_rare(&cells, n).is_none());
    }

    #[test]
    fn spaces_are_bounded() {
        let s = CoverageSettings::default();
        let pop = Population::default();
        for k in 0..MAX_SPACES {
            assert!(pop.space(k + 1, k + 1, &s).is_some());
        }
        assert!(pop.space(100, 32, &s).is_none());
        assert!(
            pop.space(1, 1, &s).is_some(),
            "known spaces are found again"
        );
    }
}
