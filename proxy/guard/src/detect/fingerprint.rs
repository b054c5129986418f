//! Near-duplicate and systematic-sweep queries, by comparing each query with
//! the caller's recent ones.
//!
//! Extraction needs queries placed relative to earlier ones: finite
//! differences change one coordinate at a time, Jacobian-based augmentation
//! (Papernot et al. 2017; PRADA's T-RND) adds the same small step to every
//! coordinate, decision-boundary probing bisects the segment between two
//! differently-labelled points. Natural traffic is independent draws, so the
//! difference to the nearest earlier query is dense and unstructured. For
//! each query the nearest remembered one gives:
//!
//! - a *near duplicate*: closer than a small fraction of the caller's own
//!   spread, but not identical (an exact repeat teaches nothing new and is
//!   what retries and caches look like, so it is ignored);
//! - a *sweep step*: the difference touches one or few coordinates, or has
//!   the same magnitude on nearly all of them (a sign step), or the query
//!   lies on the line through two earlier ones (a line search).
//!
//! Inputs wider than the sketch are folded into it by a fixed signed
//! hashing of coordinates (a count sketch): distances are kept on average,
//! a one-coordinate change stays a one-coordinate change, lines stay lines.
//! A sign step does not stay equal magnitudes: a coordinate of the sketch
//! sums the steps of its `n` inputs, so it moves by the step times an
//! integer of `n`'s parity, at most `n`. That is what is tested, with each
//! coordinate's `n` known from the hashing, so a sign step is seen at every
//! input width, and integer-valued natural inputs (pixels, counts), whose
//! sums have no such parity, are not taken for one.

use std::collections::VecDeque;

use super::lanes::MAX_LANES;
use super::prada::Distances;
use super::window::Flags;

/// How one feature query relates to the caller's earlier ones.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Relation {
    /// L2 distance to the nearest earlier query (in the sketch).
    pub min_distance: f64,
    /// Closer than the near-duplicate fraction of the caller's spread.
    pub near_duplicate: bool,
    /// A sparse change, a sign step or a point on a line through earlier ones.
    pub sweep: bool,
}

/// Tuning of the fingerprint signals.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FingerprintSettings {
    /// Inputs wider than this are folded into this many coordinates; memory
    /// per identity grows with it (at most 64).
    pub sketch_dim: usize,
    /// A query nearer than this fraction of the caller's spread (root of the
    /// summed per-coordinate variances) to an earlier one is a near duplicate.
    pub near_fraction: f64,
    /// Once natural traffic's median distance to the nearest earlier query
    /// is known, a query nearer than this fraction of it is a near duplicate
    /// (a perturbation of an earlier query, however the step was drawn).
    pub near_typical: f64,
    /// Queries over which the duplicate and sweep fractions are taken.
    pub window: usize,
    /// A fraction counts only once this many queries are in the window
    /// (the denominator never goes below it).
    pub min_queries: usize,
    /// Near-duplicate fraction at which the signal starts, and where it is 1.
    pub duplicates: (f64, f64),
    /// Sweep-step fraction at which the signal starts, and where it is 1.
    pub sweeps: (f64, f64),
    /// SimHash bits two texts may differ in and still be near duplicates.
    pub text_bits: u32,
}

impl Default for FingerprintSettings {
    fn default() -> Self {
        Self {
            sketch_dim: 32,
            near_fraction: 0.05,
            near_typical: 0.5,
            window: 64,
            min_queries: 24,
            duplicates: (0.15, 0.45),
            sweeps: (0.15, 0.40),
            text_bits: 4,
        }
    }
}

impl FingerprintSettings {
    /// Coordinates an input of `dim` values is kept in: itself when it
    /// fits the sketch, else the sketch (at most 64 coordinates).
    pub fn width(&self, dim: usize) -> usize {
        dim.min(self.sketch_dim.clamp(1, MAX_LANES))
    }
}

/// Step patterns remembered per identity.
const STEP_PATTERNS: usize = 16;

const DUP: u8 = 0;
const SWEEP: u8 = 1;

/// Signed bucket of input `i` in a sketch of `rem.k` coordinates, from a
/// multiplicative hash: the bucket (`(h >> 20) % k`), and the sign as a bit
/// to put on the value (the hash's top bit), so that folding needs no
/// multiply.
fn bucket(i: usize, rem: &Remainder) -> (usize, u64) {
    let h = hash(i);
    (rem.of(h >> 20), h & (1 << 63))
}

fn hash(i: usize) -> u64 {
    (i as u64 ^ 0x5851_f42d_4c95_7f2d).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// A remainder by `k` without a division, which would cost more than
/// everything else a query's fold does: with `m = ceil(2^64 / k)`,
/// `(a * m) >> 64` is `a / k` exactly for `a < 2^44` and `k <= 2^20` (the
/// quotient's error stays below `a * k / 2^64 / k <= 2^-20 < 1 / k`).
struct Remainder {
    k: u64,
    m: u128,
}

impl Remainder {
    fn new(k: usize) -> Self {
        debug_assert!(k <= 1 << 20, "a sketch is at most MAX_LANES wide");
        let k = k.clamp(1, 1 << 20) as u64;
        Self {
            k,
            m: u128::from(u64::MAX / k) + 1,
        }
    }

    fn of(&self, a: u64) -> usize {
        let q = ((u128::from(a) * self.m) >> 64) as u64;
        (a - q * self.k) as usize
    }
}

/// Folds `x` into `k` coordinates (the identity when it already fits).
pub fn sketch(x: &[f64], k: usize, out: &mut Vec<f64>) {
    out.clear();
    if x.len() <= k {
        out.extend_from_slice(x);
        return;
    }
    out.resize(k, 0.0);
    let rem = Remainder::new(k);
    for (i, &v) in x.iter().enumerate() {
        let (b, sign) = bucket(i, &rem);
        if let Some(o) = out.get_mut(b) {
            *o += f64::from_bits(v.to_bits() ^ sign);
        }
    }
}

/// The feature queries of one identity: a ring of recent (sketched) inputs,
/// their running per-coordinate spread, PRADA's distance window and the
/// flag window for the duplicate and sweep fractions.
#[derive(Debug, Clone)]
pub struct FeatureHistory {
    dim: usize,
    k: usize,
    cap: usize,
    ring: Vec<f32>,
    len: usize,
    head: usize,
    mean: Vec<f64>,
    m2: Vec<f64>,
    seen: u64,
    scratch: Vec<f64>,
    inv_sd: Vec<f64>,
    /// Inputs folded into each sketch coordinate (all 1 when none are).
    folded: Vec<u32>,
    /// Magnitude patterns of the most recent steps.
    steps: VecDeque<u64>,
    /// PRADA's minimum distances.
    pub distances: Distances,
    /// Per-query near-duplicate and sweep flags.
    pub flags: Flags,
    /// Exact repeats seen (ignored by the signals).
    pub repeats: u64,
}

impl FeatureHistory {
    /// A history for inputs of `dim` features, remembering `cap` of them.
    pub fn new(dim: usize, cap: usize, prada_window: usize, fp: &FingerprintSettings) -> Self {
        let k = fp.width(dim);
        let mut folded = vec![u32::from(dim <= k); k];
        if dim > k {
            let rem = Remainder::new(k);
            for i in 0..dim {
                folded[bucket(i, &rem).0] += 1;
            }
        }
        Self {
            dim,
            k,
            folded,
            cap: cap.max(2),
            ring: Vec::new(),
            len: 0,
            head: 0,
            mean: vec![0.0; k],
            m2: vec![0.0; k],
            seen: 0,
            scratch: Vec::with_capacity(k),
            inv_sd: Vec::with_capacity(k),
            steps: VecDeque::with_capacity(STEP_PATTERNS),
            distances: Distances::new(prada_window),
            flags: Flags::new(fp.window),
            repeats: 0,
        }
    }

    /// Upper bound of the bytes one history holds.
    pub fn max_bytes(
        dim_cap: usize,
        cap: usize,
        prada_window: usize,
        fp: &FingerprintSettings,
    ) -> usize {
        let k = fp.width(dim_cap);
        std::mem::size_of::<Self>()
            + cap * k * std::mem::size_of::<f32>()
            + 4 * k * std::mem::size_of::<f64>()
            + k * std::mem::size_of::<u32>()
            + STEP_PATTERNS * 8
            + Distances::max_bytes(prada_window)
            + 2 * fp.window
    }

    /// Bytes held now (allocations included).
    pub fn held_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.ring.capacity() * std::mem::size_of::<f32>()
            + (self.mean.capacity()
                + self.m2.capacity()
                + self.scratch.capacity()
                + self.inv_sd.capacity())
                * std::mem::size_of::<f64>()
            + self.folded.capacity() * std::mem::size_of::<u32>()
            + self.steps.capacity() * 8
            + self.distances.held_bytes()
            + self.flags.held_bytes()
    }

    /// Whether the ring holds `cap` queries.
    pub fn is_full(&self) -> bool {
        self.len == self.cap
    }

    /// The last query as compared: folded into the sketch, at the ring's
    /// precision.
    pub fn sketched(&self) -> &[f64] {
        &self.scratch
    }

    /// Queries recorded so far (exact repeats excluded).
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// The input width this history is for.
    pub fn dim(&self) -> usize {
        self.dim
    }

    fn row(&self, slot: usize) -> &[f32] {
        &self.ring[slot * self.k..(slot + 1) * self.k]
    }

    /// Slot of the query `back` places before the newest (0 = newest).
    fn recent(&self, back: usize) -> Option<usize> {
        (back < self.len).then(|| (self.head + self.cap - 1 - back) % self.cap)
    }

    /// Per-coordinate 1/deviation of the caller's queries so far, so that
    /// distances do not depend on the units of each feature (1 until known).
    fn update_scale(&mut self) {
        self.inv_sd.clear();
        let n = self.seen;
        self.inv_sd.extend(self.m2.iter().map(|&m2| {
            let var = if n >= 2 { m2 / (n - 1) as f64 } else { 0.0 };
            if var > 0.0 { 1.0 / var.sqrt() } else { 1.0 }
        }));
    }

    /// Records `x` and says how it relates to the earlier queries; `None`
    /// for an exact repeat of a remembered query (not recorded again).
    /// `typical` is natural traffic's median nearest distance when known.
    pub fn observe(
        &mut self,
        x: &[f64],
        typical: Option<f64>,
        fp: &FingerprintSettings,
    ) -> Option<Relation> {
        let mut v = std::mem::take(&mut self.scratch);
        sketch(x, self.k, &mut v);
        // Compared at the precision it is remembered in, so that an exact
        // repeat is found exactly.
        for c in &mut v {
            *c = f64::from(*c as f32);
        }
        self.update_scale();
        let rel = self.relate(&v, typical, fp);
        if rel.is_some() {
            self.remember(&v);
        } else {
            self.repeats += 1;
        }
        self.scratch = v;
        if let Some(r) = rel
            && self.len > 1
        {
            self.distances.push(r.min_distance);
            self.flags
                .push(u8::from(r.near_duplicate) << DUP | u8::from(r.sweep) << SWEEP);
        }
        rel
    }

    fn relate(
        &mut self,
        v: &[f64],
        typical: Option<f64>,
        fp: &FingerprintSettings,
    ) -> Option<Relation> {
        let mut best = (f64::INFINITY, usize::MAX);
        let mut second = (f64::INFINITY, usize::MAX);
        // The scan over the ring is most of a query's cost: in f32 (what the
        // ring holds), in lanes the compiler can vectorize.
        let mut query = [0f32; MAX_LANES];
        let mut scale = [0f32; MAX_LANES];
        let k = self.k.min(MAX_LANES);
        for i in 0..k {
            query[i] = v[i] as f32;
            scale[i] = self.inv_sd[i] as f32;
        }
        let mut keep = |d2: f32, slot: usize| {
            let d2 = f64::from(d2);
            if d2 < best.0 {
                second = best;
                best = (d2, slot);
            } else if d2 < second.0 {
                second = (d2, slot);
            }
        };
        // Four rows at a time: each chunk of the query and its scale is
        // loaded once for four rows, and the four sums are independent.
        let held = &self.ring[..self.len * self.k];
        let mut blocks = held.chunks_exact(4 * self.k.max(1));
        let mut slot = 0;
        for block in &mut blocks {
            for d2 in distances::<4>(block, &query[..k], &scale[..k]) {
                keep(d2, slot);
                slot += 1;
            }
        }
        for row in blocks.remainder().chunks_exact(self.k.max(1)) {
            let [d2] = distances::<1>(row, &query[..k], &scale[..k]);
            keep(d2, slot);
            slot += 1;
        }
        if best.1 == usize::MAX {
            return Some(Relation::default());
        }
        if best.0 == 0.0 {
            return None;
        }
        let near = best.1;
        let mut sweep = self.structured(v, near);
        if !sweep && second.1 != usize::MAX {
            sweep = collinear(v, self.row(near), self.row(second.1));
        }
        if !sweep && let (Some(p), Some(pp)) = (self.recent(0), self.recent(1)) {
            sweep = collinear(v, self.row(p), self.row(pp));
        }
        // Near: a fraction of natural traffic's typical nearest distance when
        // the population knows it, else of the caller's own spread
        // (standardized coordinates have unit variance: sqrt(k)).
        let near = match typical {
            Some(t) => fp.near_typical * t,
            None => fp.near_fraction * (self.k as f64).sqrt() * self.spacing(),
        };
        Some(Relation {
            min_distance: best.0.sqrt(),
            near_duplicate: self.seen >= 2 && best.0.sqrt() < near,
            sweep,
        })
    }

    /// How natural nearest-neighbour distances shrink at this width relative
    /// to the sketch's full width: among `cap` independent draws in `k`
    /// dimensions they scale as cap^(-1/k), so in few dimensions honest
    /// queries land much closer to each other than in many, and a fixed
    /// fraction of the spread would call them near duplicates.
    fn spacing(&self) -> f64 {
        let full = 32f64.max(self.k as f64);
        (self.cap as f64).powf(1.0 / full - 1.0 / self.k as f64)
    }

    /// A sparse change, a sign step, or a step of the same per-coordinate
    /// magnitudes as a recent step (an augmentation with a fixed step
    /// vector), from the remembered query in `near` to `v`.
    fn structured(&mut self, v: &[f64], near: usize) -> bool {
        let k = v.len();
        let mut mags = [0.0f64; MAX_LANES];
        let mut max_abs = 0.0f64;
        for (i, ((&a, &b), &s)) in self.row(near).iter().zip(v).zip(&self.inv_sd).enumerate() {
            let d = ((b - f64::from(a)) * s).abs();
            if let Some(m) = mags.get_mut(i) {
                *m = d;
            }
            max_abs = max_abs.max(d);
        }
        let m = &mut mags[..k.min(MAX_LANES)];
        // Coordinates that moved by more than float noise of the largest move.
        let tol = max_abs * 1e-4;
        let changed = m.iter().filter(|&&d| d > tol).count();
        if changed == 0 {
            return false;
        }
        // The step's magnitudes, coarsely rounded (about 3 significant
        // digits of the unstandardized step, which the attacker chose: the
        // exponent and the top 10 mantissa bits, rounded), as a pattern.
        let mut pattern: u64 = 0xcbf2_9ce4_8422_2325;
        for (&d, &s) in m.iter().zip(&self.inv_sd) {
            let raw = if s > 0.0 { d / s } else { d };
            let q = if raw > tol {
                ((raw as f32).to_bits() + (1 << 12)) >> 13
            } else {
                0
            };
            pattern = (pattern ^ u64::from(q)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A repeat means a fixed step vector only when enough coordinates
        // moved: on a coarse grid (values to one decimal) natural steps over
        // two or three coordinates take few distinct values and repeat by
        // chance; over four or more, 16 remembered patterns rarely meet one.
        let repeated = changed >= 4 && self.steps.contains(&pattern);
        if self.steps.len() == STEP_PATTERNS {
            self.steps.pop_front();
        }
        self.steps.push_back(pattern);
        if repeated {
            return true;
        }
        // Sparse: at most an eighth of the coordinates moved. Below 8 inputs
        // one moved coordinate is a quarter or more of them, which natural
        // neighbours in coarsely recorded data share all the time; and a
        // model that narrow is solved from width + 1 queries, before any
        // share of a window means anything (budgets stop that, not this).
        if k >= 8 && changed <= k / 8 {
            return true;
        }
        // Sign step: every input moved by the same raw amount (coordinates
        // that fold an even number of inputs may not move at all).
        if changed >= 4 {
            let mut raw = [0.0f64; MAX_LANES];
            for ((r, &d), &s) in raw.iter_mut().zip(m.iter()).zip(&self.inv_sd) {
                *r = if s > 0.0 { d / s } else { d };
            }
            return sign_step(&raw[..m.len()], &self.folded, tol);
        }
        false
    }

    fn remember(&mut self, v: &[f64]) {
        if self.ring.len() < self.cap * self.k {
            if self.ring.len() + self.k > self.ring.capacity() {
                // Grow by doubling, but never past the ring's size.
                let want = (self.ring.len() * 2).max(self.k * 8).min(self.cap * self.k);
                self.ring.reserve_exact(want - self.ring.len());
            }
            self.ring.extend(v.iter().map(|&x| x as f32));
            self.len += 1;
            self.head = self.len % self.cap;
        } else {
            let at = self.head * self.k;
            for (dst, &x) in self.ring[at..at + self.k].iter_mut().zip(v) {
                *dst = x as f32;
            }
            self.head = (self.head + 1) % self.cap;
        }
        self.seen += 1;
        super::coverage::welford(&mut self.mean, &mut self.m2, self.seen, v);
    }

    /// Near-duplicate fraction of the window.
    pub fn duplicate_fraction(&self, floor: usize) -> f64 {
        self.flags.fraction(DUP, floor)
    }

    /// Sweep-step fraction of the window.
    pub fn sweep_fraction(&self, floor: usize) -> f64 {
        self.flags.fraction(SWEEP, floor)
    }
}

/// Squared distances between `R` consecutive remembered rows (`rows` holds
/// `R * query.len()` values) and the query, each coordinate scaled, each
/// summed in eight independent lanes: every chunk of the query and its
/// scale is loaded once for the `R` rows, and their sums overlap.
fn distances<const R: usize>(rows: &[f32], query: &[f32], scale: &[f32]) -> [f32; R] {
    let k = query.len();
    let rows: [&[f32]; R] = std::array::from_fn(|r| rows.get(r * k..(r + 1) * k).unwrap_or(&[]));
    let mut acc = [[0f32; 8]; R];
    let chunks = query.chunks_exact(8).zip(scale.chunks_exact(8));
    for (c, (q, s)) in chunks.enumerate() {
        let (Ok(q), Ok(s)) = (<&[f32; 8]>::try_from(q), <&[f32; 8]>::try_from(s)) else {
            continue;
        };
        for (a, row) in acc.iter_mut().zip(rows) {
            if let Some(Ok(x)) = row.get(c * 8..c * 8 + 8).map(<&[f32; 8]>::try_from) {
                *a = lanes8(*a, x, q, s);
            }
        }
    }
    let whole = k / 8 * 8;
    std::array::from_fn(|r| {
        let mut tail = 0f32;
        for c in whole..k.min(rows[r].len()) {
            let d = (rows[r][c] - query[c]) * scale[c];
            tail += d * d;
        }
        acc[r].iter().sum::<f32>() + tail
    })
}

/// One chunk of eight coordinates added to a row's eight running sums.
#[inline(always)]
fn lanes8(acc: [f32; 8], row: &[f32; 8], q: &[f32; 8], s: &[f32; 8]) -> [f32; 8] {
    std::array::from_fn(|i| {
        let d = (row[i] - q[i]) * s[i];
        acc[i] + d * d
    })
}

/// Whether a step whose sketch coordinates moved by `raw` (each summing
/// `folded` inputs) moved every input by one amount `u`: each coordinate by
/// `u` times an integer of its count's parity and at most its count, for at
/// least 85% of the coordinates. `u` is the smallest move of a coordinate
/// of odd count (an odd sum of +-1 is never 0), else half the smallest move.
fn sign_step(raw: &[f64], folded: &[u32], tol: f64) -> bool {
    let smallest = |odd: bool| {
        raw.iter()
            .zip(folded)
            .filter(|&(&d, &n)| n > 0 && (!odd || n % 2 == 1) && (odd || d > tol))
            .map(|(&d, _)| d)
            .fold(f64::INFINITY, f64::min)
    };
    let u = match smallest(true) {
        u if u.is_finite() => u,
        _ => smallest(false) / 2.0,
    };
    if !(u.is_finite() && u > tol) {
        return false;
    }
    let coords = raw.iter().zip(folded).filter(|&(_, &n)| n > 0).count();
    if coords < 4 {
        return false;
    }
    // At least 85% must fit: stop at the first misfit too many (natural
    // steps get there within a few coordinates).
    let may_miss = coords - (coords * 85).div_ceil(100);
    let mut missed = 0;
    for (&d, &n) in raw.iter().zip(folded) {
        if n == 0 {
            continue;
        }
        let m = d / u;
        // m >= 0: rounded by a saturating cast (no libm call on the
        // baseline x86-64, which has no rounding instruction).
        let r = (m + 0.5) as i64;
        let fits = (m - r as f64).abs() <= 0.01 * (r as f64).max(1.0)
            && r <= i64::from(n)
            && r % 2 == i64::from(n % 2);
        if !fits {
            missed += 1;
            if missed > may_miss {
                return false;
            }
        }
    }
    true
}

/// `v` on the line through `a` and `b` (within float noise).
fn collinear(v: &[f64], a: &[f32], b: &[f32]) -> bool {
    let (mut uu, mut ww, mut uw) = (0.0, 0.0, 0.0);
    for ((&x, &p), &q) in v.iter().zip(a).zip(b) {
        let u = x - f64::from(p);
        let w = f64::from(q) - f64::from(p);
        uu += u * u;
        ww += w * w;
        uw += u * w;
    }
    uu > 0.0 && ww > 0.0 && uw * uw >= 0.9999 * uu * ww
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn fp() -> FingerprintSettings {
        FingerprintSettings::default()
    }

    #[test]
    fn the_fold_places_every_input_where_bucket_says() {
        for k in 1..=MAX_LANES {
            let rem = Remainder::new(k);
            // Every hash of an input a route may have (max_features is at
            // most 65,536) has its remainder by k.
            for i in (0..65_536).chain([usize::MAX / 3, usize::MAX]) {
                let a = hash(i) >> 20;
                assert_eq!(rem.of(a), (a % k as u64) as usize, "input {i}, k {k}");
            }
        }
        let x: Vec<f64> = (0..100).map(|i| f64::from(i) - 40.5).collect();
        let mut out = Vec::new();
        sketch(&x, 7, &mut out);
        let mut want = vec![0.0; 7];
        for (i, v) in x.iter().enumerate() {
            let (b, sign) = bucket(i, &Remainder::new(7));
            want[b] += if sign == 0 { *v } else { -v };
        }
        assert_eq!(out, want);
    }

    fn gauss(rng: &mut StdRng, d: usize) -> Vec<f64> {
        (0..d)
            .map(|_| {
                // Box-Muller.
                let u: f64 = rng.random_range(1e-12..1.0);
                let v: f64 = rng.random();
                (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
            })
            .collect()
    }

    #[test]
    fn natural_queries_are_neither_duplicates_nor_sweeps() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut h = FeatureHistory::new(16, 128, 64, &fp());
        for _ in 0..300 {
            let x = gauss(&mut rng, 16);
            h.observe(&x, None, &fp()).unwrap();
        }
        assert!(h.duplicate_fraction(24) < 0.02);
        assert!(h.sweep_fraction(24) < 0.02);
    }

    #[test]
    fn exact_repeats_are_ignored() {
        let mut h = FeatureHistory::new(4, 16, 16, &fp());
        assert!(h.observe(&[1.0, 2.0, 3.0, 4.0], None, &fp()).is_some());
        assert!(h.observe(&[1.0, 2.0, 3.0, 4.0], None, &fp()).is_none());
        assert_eq!(h.repeats, 1);
        assert_eq!(h.flags.len(), 0);
    }

    #[test]
    fn one_coordinate_changes_are_sweeps() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut h = FeatureHistory::new(16, 128, 64, &fp());
        let base = gauss(&mut rng, 16);
        h.observe(&base, None, &fp());
        for i in 0..16 {
            let mut x = base.clone();
            x[i] += 0.37;
            assert!(h.observe(&x, None, &fp()).unwrap().sweep, "coordinate {i}");
        }
    }

    #[test]
    fn sign_steps_are_sweeps_and_near_duplicates() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut h = FeatureHistory::new(16, 128, 64, &fp());
        for _ in 0..20 {
            h.observe(&gauss(&mut rng, 16), None, &fp());
        }
        let base = gauss(&mut rng, 16);
        h.observe(&base, None, &fp());
        let x: Vec<f64> = base
            .iter()
            .enumerate()
            .map(|(i, v)| v + if i % 3 == 0 { 0.02 } else { -0.02 })
            .collect();
        let r = h.observe(&x, None, &fp()).unwrap();
        assert!(r.sweep);
        assert!(r.near_duplicate);
    }

    #[test]
    fn bisection_is_a_line_search() {
        let mut rng = StdRng::seed_from_u64(4);
        let mut h = FeatureHistory::new(16, 128, 64, &fp());
        let (a, b) = (gauss(&mut rng, 16), gauss(&mut rng, 16));
        h.observe(&a, None, &fp());
        h.observe(&b, None, &fp());
        let (mut lo, mut hi) = (0.0, 1.0);
        for step in 0..8 {
            let t = (lo + hi) / 2.0;
            let x: Vec<f64> = a.iter().zip(&b).map(|(p, q)| p + t * (q - p)).collect();
            assert!(h.observe(&x, None, &fp()).unwrap().sweep, "step {step}");
            if step % 2 == 0 { lo = t } else { hi = t }
        }
    }

    #[test]
    fn wide_inputs_are_sketched_and_keep_sparse_changes() {
        let mut rng = StdRng::seed_from_u64(5);
        let f = fp();
        let mut h = FeatureHistory::new(784, 64, 64, &f);
        let base: Vec<f64> = (0..784).map(|_| rng.random()).collect();
        h.observe(&base, None, &f);
        let mut x = base.clone();
        x[300] += 0.5;
        assert!(h.observe(&x, None, &f).unwrap().sweep);
        assert!(
            FeatureHistory::max_bytes(784, 64, 64, &f) < 64 * 32 * 4 + 4096,
            "memory follows the sketch, not the input width"
        );
    }

    /// Widths from a handful to thousands: folded or not.
    const WIDTHS: [usize; 9] = [4, 8, 16, 32, 33, 64, 256, 1024, 4096];

    #[test]
    fn sign_steps_are_sweeps_at_every_input_width() {
        let f = fp();
        for d in WIDTHS {
            let mut rng = StdRng::seed_from_u64(d as u64);
            let mut h = FeatureHistory::new(d, 128, 64, &f);
            let seeds: Vec<Vec<f64>> = (0..10).map(|_| gauss(&mut rng, d)).collect();
            for x in &seeds {
                h.observe(x, None, &f);
            }
            // JbDA / T-RND: each seed plus lambda times a sign vector.
            let mut swept = 0;
            for x in &seeds {
                let step: Vec<f64> = x
                    .iter()
                    .map(|v| v + if rng.random::<bool>() { 0.05 } else { -0.05 })
                    .collect();
                swept += usize::from(h.observe(&step, None, &f).unwrap().sweep);
            }
            assert!(swept >= 9, "width {d}: {swept} of 10 sign steps seen");
        }
    }

    #[test]
    fn natural_queries_are_not_sweeps_at_any_width_real_or_integer_valued() {
        // Integer-valued inputs (pixels, counts) fold into sums of integers:
        // the sign-step test must not take them for steps.
        let f = fp();
        for d in WIDTHS {
            let mut rng = StdRng::seed_from_u64(100 + d as u64);
            let mut real = FeatureHistory::new(d, 128, 64, &f);
            let mut ints = FeatureHistory::new(d, 128, 64, &f);
            let (mut real_sweeps, mut int_sweeps) = (0, 0);
            for _ in 0..300 {
                let x = gauss(&mut rng, d);
                real_sweeps += usize::from(real.observe(&x, None, &f).unwrap().sweep);
                // Pixels or counts: small integers, mostly 0.
                let x: Vec<f64> = (0..d)
                    .map(|_| {
                        if rng.random::<f64>() < 0.6 {
                            0.0
                        } else {
                            f64::from(rng.random_range(1..=16u8))
                        }
                    })
                    .collect();
                if let Some(r) = ints.observe(&x, None, &f) {
                    int_sweeps += usize::from(r.sweep);
                }
            }
            assert!(
                real_sweeps <= 3,
                "width {d}: {real_sweeps} of 300 natural queries were sweeps"
            );
            // Below the sweep signal's start (15% of the window).
            {
                assert!(
                    int_sweeps < 45,
                    "width {d}: {int_sweeps} of 300 integer queries were sweeps"
                );
            }
        }
    }
}
