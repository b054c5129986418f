//! What natural traffic looks like, measured once on an operator's reference.
//!
//! Every per-caller signal has a rate at which honest queries trip it, and
//! that rate depends on the data, not the attacker: in four inputs recorded
//! to a tenth of a centimetre, the nearest earlier query often differs in
//! one field (a "sparse change"); in wide, smooth data it never does. A
//! fixed threshold is therefore either blind on one task or trigger-happy on
//! another. With a reference, the detector plays natural callers through the
//! same history code as real ones (the reference rows in random order, a
//! full history each) and measures those rates and the spread of PRADA's
//! statistic, then holds each signal's start above what natural traffic
//! reaches, by a binomial margin over the signal's window.
//!
//! The reference also gives an outlier test: the squared Mahalanobis
//! distance of a query (in the sketch) under the reference's covariance,
//! against its 99th percentile on reference rows that were not used to fit
//! it. Uniformly random queries and natural data from elsewhere leave the
//! data's correlations and land far out; honest queries do so about 1% of
//! the time.
//!
//! Nothing here learns from live callers: the figures are fixed when the
//! reference is loaded.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use warden_config::reference::ROWS_PER_COORDINATE;

use super::fingerprint::{FeatureHistory, FingerprintSettings};
use super::lanes;
use super::prada::{self, PradaSettings};

/// Natural callers played through the history (each over a shuffled pass).
const CALLERS: usize = 4;
/// Queries each plays at most.
const QUERIES: usize = 2048;
/// Binomial deviations above the natural rate where a signal may start.
const MARGIN_SD: f64 = 4.0;

/// The reference's covariance, for the outlier test.
#[derive(Debug, Clone)]
struct Outliers {
    mean: Vec<f64>,
    /// Inverse of the lower Cholesky factor, row-major `k` x `k`.
    whiten: Vec<f64>,
    /// Squared distance beyond which a query is an outlier.
    d2: f64,
}

/// Natural traffic's rates on one feature space.
#[derive(Debug, Clone)]
pub struct Natural {
    outliers: Option<Outliers>,
    /// Share of natural queries flagged as sweeps.
    pub sweep_rate: f64,
    /// Share of natural queries flagged as near duplicates.
    pub duplicate_rate: f64,
    /// Share of natural queries beyond the outlier distance.
    pub outlier_rate: f64,
    /// A low quantile (0.5%) of PRADA's W over natural callers' windows.
    pub w_floor: Option<f64>,
}

impl Natural {
    /// Measures `rows` (raw inputs) and `sketched` (the same rows in the
    /// sketch); `typical` is their typical nearest distance.
    pub fn measure(
        rows: &[&[f64]],
        sketched: &[Vec<f64>],
        history: usize,
        typical: Option<f64>,
        fp: &FingerprintSettings,
        ps: &PradaSettings,
        sw: &prada::Table,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(0x006e_6174_7572_616c);
        let (mut queries, mut sweeps, mut dups) = (0usize, 0usize, 0usize);
        let mut ws = Vec::new();
        let dim = rows.first().map_or(0, |r| r.len());
        for _ in 0..CALLERS {
            let mut order: Vec<usize> = (0..rows.len()).collect();
            order.shuffle(&mut rng);
            let mut h = FeatureHistory::new(dim, history, ps.window, fp);
            for &i in order.iter().take(QUERIES) {
                let Some(r) = h.observe(rows[i], typical, fp) else {
                    continue;
                };
                if h.seen() < 2 {
                    continue;
                }
                queries += 1;
                sweeps += usize::from(r.sweep);
                dups += usize::from(r.near_duplicate && h.seen() > 2);
                if let Some(w) = prada::trimmed_w(&h.distances, ps, sw) {
                    ws.push(w);
                }
            }
        }
        ws.sort_by(f64::total_cmp);
        let share = |n: usize| n as f64 / queries.max(1) as f64;
        let outliers = Outliers::fit(sketched);
        let outlier_rate = outliers.as_ref().map_or(0.0, |o| {
            let beyond = sketched.iter().filter(|v| o.outlying(v)).count();
            beyond as f64 / sketched.len().max(1) as f64
        });
        Self {
            outliers,
            sweep_rate: share(sweeps),
            duplicate_rate: share(dups),
            outlier_rate,
            w_floor: ws.get(ws.len() / 200).copied(),
        }
    }

    /// Whether the sketched query `v` is an outlier of the reference
    /// (`None` when the reference was too small to fit the test).
    pub fn outlying(&self, v: &[f64]) -> Option<bool> {
        self.outliers.as_ref().map(|o| o.outlying(v))
    }
}

/// `(lo, hi)` of a share ramp moved up so that natural traffic, at `rate`
/// per query, stays below its start over a window of `window` queries.
pub fn lifted((lo, hi): (f64, f64), rate: f64, window: usize) -> (f64, f64) {
    let sd = (rate * (1.0 - rate) / window.max(1) as f64).sqrt();
    let start = lo.max(rate + MARGIN_SD * sd);
    (start, start + (hi - lo))
}

impl Outliers {
    /// Fits on even rows, sets the cut at the 99th percentile of the odd
    /// ones (with 25% headroom); `None` with fewer than
    /// `ROWS_PER_COORDINATE` rows per coordinate (`warden check` warns).
    fn fit(rows: &[Vec<f64>]) -> Option<Self> {
        let k = rows.first()?.len();
        if k == 0 || k > lanes::MAX_LANES || rows.len() < ROWS_PER_COORDINATE * k {
            return None;
        }
        let fit: Vec<&Vec<f64>> = rows.iter().step_by(2).collect();
        let n = fit.len() as f64;
        let mut mean = vec![0.0; k];
        for r in &fit {
            for (m, v) in mean.iter_mut().zip(r.iter()) {
                *m += v / n;
            }
        }
        let mut cov = vec![0.0; k * k];
        for r in &fit {
            for i in 0..k {
                let di = r[i] - mean[i];
                for j in 0..=i {
                    cov[i * k + j] += di * (r[j] - mean[j]) / (n - 1.0);
                }
            }
        }
        // Ridge: a tenth of a percent of the average variance, so constant
        // or collinear inputs (blank pixels, derived fields) stay invertible.
        let avg = (0..k).map(|i| cov[i * k + i]).sum::<f64>() / k as f64;
        let ridge = 1e-3 * avg.max(f64::MIN_POSITIVE);
        for i in 0..k {
            cov[i * k + i] += ridge;
        }
        let l = cholesky(&cov, k)?;
        let whiten = invert_lower(&l, k)?;
        let mut o = Self {
            mean,
            whiten,
            d2: f64::INFINITY,
        };
        let mut held: Vec<f64> = rows.iter().skip(1).step_by(2).map(|r| o.d2(r)).collect();
        held.sort_by(f64::total_cmp);
        o.d2 = 1.25 * held.get(held.len() * 99 / 100)?;
        Some(o)
    }

    fn d2(&self, v: &[f64]) -> f64 {
        let k = self.mean.len();
        let mut buf = [0f64; lanes::MAX_LANES];
        let c = lanes::centered(v, &self.mean, &mut buf);
        if c.len() < k {
            return f64::INFINITY;
        }
        (0..k)
            .map(|i| {
                let z = lanes::dot(&self.whiten[i * k..i * k + i + 1], c);
                z * z
            })
            .sum()
    }

    fn outlying(&self, v: &[f64]) -> bool {
        v.len() == self.mean.len() && self.d2(v) > self.d2
    }
}

/// Lower Cholesky factor of the symmetric positive definite `k` x `k`
/// matrix `a` (row-major, lower triangle read), `None` when it is not
/// (public for the evaluation harness, which draws correlated data with it).
pub fn cholesky(a: &[f64], k: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0; k * k];
    for i in 0..k {
        for j in 0..=i {
            let s: f64 = (0..j).map(|p| l[i * k + p] * l[j * k + p]).sum();
            if i == j {
                let d = a[i * k + i] - s;
                if d <= 0.0 || !d.is_finite() {
                    return None;
                }
                l[i * k + i] = d.sqrt();
            } else {
                l[i * k + j] = (a[i * k + j] - s) / l[j * k + j];
            }
        }
    }
    Some(l)
}

/// Inverse of a lower-triangular matrix (itself lower-triangular).
fn invert_lower(l: &[f64], k: usize) -> Option<Vec<f64>> {
    let mut inv = vec![0.0; k * k];
    for c in 0..k {
        inv[c * k + c] = 1.0 / l[c * k + c];
        for i in c + 1..k {
            let s: f64 = (c..i).map(|p| l[i * k + p] * inv[p * k + c]).sum();
            inv[i * k + c] = -s / l[i * k + i];
        }
    }
    inv.iter().all(|v| v.is_finite()).then_some(inv)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use rand::Rng;

    fn gauss(rng: &mut StdRng) -> f64 {
        let u: f64 = rng.random_range(1e-12..1.0);
        let v: f64 = rng.random();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    #[test]
    fn whitening_inverts_the_covariance() {
        let a = [4.0, 0.0, 2.0, 3.0];
        let l = cholesky(&a, 2).unwrap();
        let w = invert_lower(&l, 2).unwrap();
        // w * l = identity.
        let p = [w[0] * l[0], w[2] * l[0] + w[3] * l[2], w[3] * l[3]];
        assert!((p[0] - 1.0).abs() < 1e-12 && p[1].abs() < 1e-12 && (p[2] - 1.0).abs() < 1e-12);
        assert!(
            cholesky(&[1.0, 0.0, 2.0, 1.0], 2).is_none(),
            "not positive definite"
        );
    }

    #[test]
    fn correlated_data_leaves_random_points_outlying() {
        // Eight inputs driven by two latent factors.
        let mut rng = StdRng::seed_from_u64(3);
        let map: Vec<f64> = (0..16).map(|_| gauss(&mut rng)).collect();
        let sample = |rng: &mut StdRng| -> Vec<f64> {
            let z = [gauss(rng), gauss(rng)];
            (0..8)
                .map(|j| map[2 * j] * z[0] + map[2 * j + 1] * z[1] + 0.1 * gauss(rng))
                .collect()
        };
        let rows: Vec<Vec<f64>> = (0..1000).map(|_| sample(&mut rng)).collect();
        let o = Outliers::fit(&rows).unwrap();
        let fresh = (0..2000).filter(|_| o.outlying(&sample(&mut rng))).count();
        assert!(fresh < 30, "{fresh} of 2000 natural rows outlying");
        let random = (0..200)
            .filter(|_| {
                let v: Vec<f64> = (0..8).map(|_| rng.random_range(-3.0..3.0)).collect();
                o.outlying(&v)
            })
            .count();
        assert!(random > 190, "{random} of 200 random rows outlying");
        assert!(Outliers::fit(&rows[..40]).is_none(), "too few rows");
    }

    #[test]
    fn lifted_ramps_clear_the_natural_rate() {
        assert_eq!(lifted((0.15, 0.40), 0.0, 64), (0.15, 0.40));
        let (lo, hi) = lifted((0.15, 0.40), 0.3, 64);
        assert!(lo > 0.3 + 3.0 * (0.21f64 / 64.0).sqrt() && (hi - lo - 0.25).abs() < 1e-12);
    }
}
