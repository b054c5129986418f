//! PRADA's signal (Juuti et al. 2019): the distribution of each query's
//! distance to the caller's earlier queries.
//!
//! Natural queries are independent draws from the data distribution, so the
//! minimum L2 distance of a new query to the earlier ones is roughly normally
//! distributed. Synthetic extraction queries (perturbations of a few seeds,
//! line searches towards a decision boundary) are placed deliberately close
//! to earlier ones, which skews the distances (a spike of tiny ones next to
//! the seeds' large ones). The Shapiro–Wilk statistic W over the recent
//! distances measures that: W near 1 is normal, a low W is an attack.
//!
//! W is computed with Royston's approximation (Statistics and Computing,
//! 1992; Applied Statistics algorithm AS R94, 1995), whose coefficients depend
//! only on the sample size, so they are computed once per size when the
//! detector is built and each query costs one pass over a sorted window.

use std::f64::consts::{FRAC_1_SQRT_2, PI};

use super::lanes;

/// Tuning of PRADA's signal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PradaSettings {
    /// Distances (most recent) over which W is computed.
    pub window: usize,
    /// W is not computed on fewer distances.
    pub min_distances: usize,
    /// W at or below which the signal is 1 (PRADA's delta).
    pub w_alarm: f64,
    /// W at or above which the signal is 0.
    pub w_ok: f64,
    /// Share of the largest distances left out of W (mode changes of
    /// natural traffic).
    pub trim: f64,
    /// Share of the smallest distances left out of W (a record resubmitted
    /// with one field edited now and then).
    pub trim_low: f64,
}

impl Default for PradaSettings {
    fn default() -> Self {
        Self {
            window: 64,
            min_distances: 32,
            w_alarm: 0.55,
            w_ok: 0.72,
            trim: 0.15,
            trim_low: 0.05,
        }
    }
}

/// Standard normal cumulative distribution function.
///
/// Through erf / erfc: a positive-term series below |z| = 3 (no
/// cancellation) and a continued fraction above, both accurate to ~1e-14.
pub fn normal_cdf(x: f64) -> f64 {
    let z = x * FRAC_1_SQRT_2;
    if z.abs() < 3.0 {
        0.5 * (1.0 + erf_series(z))
    } else if z > 0.0 {
        1.0 - 0.5 * erfc_fraction(z)
    } else {
        0.5 * erfc_fraction(-z)
    }
}

/// erf(z) = 2/sqrt(pi) exp(-z^2) sum_n 2^n z^(2n+1) / (1*3*...*(2n+1)).
fn erf_series(z: f64) -> f64 {
    let z2 = z * z;
    let mut term = z;
    let mut sum = z;
    let mut k = 1.0;
    while term.abs() > 1e-17 * sum.abs() {
        term *= 2.0 * z2 / (2.0 * k + 1.0);
        sum += term;
        k += 1.0;
        if k > 500.0 {
            break;
        }
    }
    2.0 / PI.sqrt() * (-z2).exp() * sum
}

/// erfc(z) for z >= 3 by its continued fraction
/// erfc(z) = exp(-z^2)/sqrt(pi) * 1/(z + (1/2)/(z + 1/(z + (3/2)/(z + ...)))),
/// evaluated bottom-up with enough terms for double precision at z >= 3.
fn erfc_fraction(z: f64) -> f64 {
    let mut f = z;
    for k in (1..=60).rev() {
        f = z + (k as f64 / 2.0) / f;
    }
    (-z * z).exp() / PI.sqrt() / f
}

/// Standard normal density.
fn normal_pdf(x: f64) -> f64 {
    (-0.5 * x * x).exp() / (2.0 * PI).sqrt()
}

/// Inverse of [`normal_cdf`] for `p` in (0, 1), by Newton's method.
///
/// On each side of 0 the CDF is convex (left) or concave (right), so
/// Newton's iterates from 0 approach the root monotonically; used only when
/// the detector is built, so a few dozen iterations do not matter.
pub fn normal_quantile(p: f64) -> f64 {
    if p.is_nan() || p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    let mut x = 0.0_f64;
    for _ in 0..200 {
        let step = (normal_cdf(x) - p) / normal_pdf(x);
        x -= step;
        if step.abs() < 1e-13 * (1.0 + x.abs()) {
            break;
        }
    }
    x
}

fn poly(c: &[f64], x: f64) -> f64 {
    c.iter().rev().fold(0.0, |acc, &k| acc * x + k)
}

/// Shapiro–Wilk coefficients `a_1..a_n` for one sample size (Royston 1992).
pub fn coefficients(n: usize) -> Vec<f64> {
    if n < 3 {
        return Vec::new();
    }
    if n == 3 {
        return vec![-FRAC_1_SQRT_2, 0.0, FRAC_1_SQRT_2];
    }
    let nf = n as f64;
    let m: Vec<f64> = (1..=n)
        .map(|i| normal_quantile((i as f64 - 0.375) / (nf + 0.25)))
        .collect();
    let summ2: f64 = m.iter().map(|v| v * v).sum();
    let ssumm2 = summ2.sqrt();
    let u = 1.0 / nf.sqrt();
    // Royston's polynomial corrections of the two extreme coefficients.
    let c1 = [0.0, 0.221157, -0.147981, -2.071190, 4.434685, -2.706056];
    let c2 = [0.0, 0.042981, -0.293762, -1.752461, 5.682633, -3.582633];
    let an = poly(&c1, u) + m[n - 1] / ssumm2;
    let mut a = vec![0.0; n];
    if n > 5 {
        let an1 = poly(&c2, u) + m[n - 2] / ssumm2;
        let phi = (summ2 - 2.0 * m[n - 1].powi(2) - 2.0 * m[n - 2].powi(2))
            / (1.0 - 2.0 * an.powi(2) - 2.0 * an1.powi(2));
        let s = phi.sqrt();
        for i in 2..n - 2 {
            a[i] = m[i] / s;
        }
        a[0] = -an;
        a[1] = -an1;
        a[n - 2] = an1;
        a[n - 1] = an;
    } else {
        let phi = (summ2 - 2.0 * m[n - 1].powi(2)) / (1.0 - 2.0 * an.powi(2));
        let s = phi.sqrt();
        for i in 1..n - 1 {
            a[i] = m[i] / s;
        }
        a[0] = -an;
        a[n - 1] = an;
    }
    a
}

/// W for `sorted` (ascending) with the coefficients for its length; `None`
/// when the sample is too small or has no spread (W is undefined there).
pub fn statistic(sorted: &[f64], a: &[f64]) -> Option<f64> {
    let n = sorted.len();
    if n < 3 || a.len() != n {
        return None;
    }
    // On the request path for every query: sums in lanes.
    let mean = lanes::sum(sorted) / n as f64;
    let ss = lanes::squared_deviations(sorted, mean);
    if ss <= f64::EPSILON * mean.abs().max(1e-300) * n as f64 || ss <= 0.0 {
        return None;
    }
    let b = lanes::dot(sorted, a);
    Some((b * b / ss).min(1.0))
}

/// The p-value of W under normality (Royston 1995); small means non-normal.
pub fn p_value(w: f64, n: usize) -> f64 {
    if n < 3 {
        return 1.0;
    }
    let nf = n as f64;
    if n == 3 {
        // Exact for n = 3.
        let p = 6.0 / PI * (w.sqrt().asin() - 0.75_f64.sqrt().asin());
        return p.clamp(0.0, 1.0);
    }
    if w >= 1.0 {
        return 1.0;
    }
    let (y, mu, sigma) = if n <= 11 {
        let gamma = poly(&[-2.273, 0.459], nf);
        let y = -(gamma - (1.0 - w).ln()).ln();
        let mu = poly(&[0.5440, -0.39978, 0.025054, -0.0006714], nf);
        let sigma = poly(&[1.3822, -0.77857, 0.062767, -0.0020322], nf).exp();
        (y, mu, sigma)
    } else {
        let ln = nf.ln();
        let y = (1.0 - w).ln();
        let mu = poly(&[-1.5861, -0.31082, -0.083751, 0.0038915], ln);
        let sigma = poly(&[-0.4803, -0.082676, 0.0030302], ln).exp();
        (y, mu, sigma)
    };
    1.0 - normal_cdf((y - mu) / sigma)
}

/// Coefficients for every sample size the detector uses, computed once.
#[derive(Debug)]
pub struct Table {
    by_n: Vec<Vec<f64>>,
}

impl Table {
    /// Coefficients for sizes 0..=`max_n`.
    pub fn new(max_n: usize) -> Self {
        Self {
            by_n: (0..=max_n).map(coefficients).collect(),
        }
    }

    /// The coefficients for `n`, empty when out of range.
    pub fn get(&self, n: usize) -> &[f64] {
        self.by_n.get(n).map_or(&[], Vec::as_slice)
    }
}

/// The last `window` minimum distances of one identity, kept both in
/// arrival order (to drop the oldest) and sorted (for W without sorting).
#[derive(Debug, Clone)]
pub struct Distances {
    ring: Vec<f64>,
    head: usize,
    sorted: Vec<f64>,
    window: usize,
}

impl Distances {
    /// An empty window of `window` distances.
    pub fn new(window: usize) -> Self {
        Self {
            ring: Vec::new(),
            head: 0,
            sorted: Vec::new(),
            window: window.max(3),
        }
    }

    /// Adds one distance, dropping the oldest when full.
    pub fn push(&mut self, d: f64) {
        if self.ring.capacity() == 0 {
            self.ring.reserve_exact(self.window);
            self.sorted.reserve_exact(self.window);
        }
        if self.ring.len() < self.window {
            self.ring.push(d);
        } else {
            let old = std::mem::replace(&mut self.ring[self.head], d);
            self.head = (self.head + 1) % self.window;
            let i = self.sorted.partition_point(|&x| x < old);
            if i < self.sorted.len() {
                self.sorted.remove(i);
            }
        }
        let j = self.sorted.partition_point(|&x| x < d);
        self.sorted.insert(j, d);
    }

    /// How many distances are held.
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// True when none are held.
    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// The held distances, ascending.
    pub fn sorted(&self) -> &[f64] {
        &self.sorted
    }

    /// The median distance (0 when empty).
    pub fn median(&self) -> f64 {
        self.sorted
            .get(self.sorted.len() / 2)
            .copied()
            .unwrap_or(0.0)
    }

    /// Bytes held now.
    pub fn held_bytes(&self) -> usize {
        (self.ring.capacity() + self.sorted.capacity()) * std::mem::size_of::<f64>()
    }

    /// Bytes held at most (for the memory bound).
    pub fn max_bytes(window: usize) -> usize {
        2 * window * std::mem::size_of::<f64>()
    }
}

/// How far below natural traffic's lowest W (a reference's `w_floor`) the
/// signal starts.
pub const FLOOR_MARGIN: f64 = 0.03;

/// Distances below this fraction of the median are isolated spikes when
/// few (an edited record), the attack's mark when many.
const SPIKE: f64 = 0.25;
/// Share of the distances that may be trimmed as spikes at most.
const MAX_SPIKES: f64 = 0.2;

/// W over `d` with both tails trimmed, once there are enough distances.
///
/// Natural traffic from a multimodal distribution jumps between modes now
/// and then (a few large distances) and resubmits an edited record now and
/// then (a few small ones), while the attack's mark is a mass of small,
/// deliberate steps. Among concentrated distances (wide inputs) a single
/// edit is far below the rest, so the low trim takes every spike under a
/// quarter of the median, up to a fifth of the window: a mass of small
/// steps is more than that and stays.
pub fn trimmed_w(d: &Distances, s: &PradaSettings, table: &Table) -> Option<f64> {
    let n = d.len() as f64;
    let sorted = d.sorted();
    let spikes = sorted.partition_point(|&x| x < SPIKE * d.median());
    let low =
        ((n * s.trim_low.clamp(0.0, 0.25)) as usize).max(spikes.min((n * MAX_SPIKES) as usize));
    let high = d.len() - (n * s.trim.clamp(0.0, 0.5)) as usize;
    if d.len() < s.min_distances.max(3) || low + 3 > high {
        return None;
    }
    statistic(&sorted[low..high], table.get(high - low))
}

/// PRADA's signal in [0, 1] from W: 0 at or above `w_ok`, 1 at or below
/// `w_alarm`, linear between.
pub fn signal(w: f64, w_alarm: f64, w_ok: f64) -> f64 {
    if w_ok <= w_alarm {
        return if w < w_ok { 1.0 } else { 0.0 };
    }
    ((w_ok - w) / (w_ok - w_alarm)).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sw(x: &[f64]) -> (f64, f64) {
        let mut s = x.to_vec();
        s.sort_by(f64::total_cmp);
        let a = coefficients(s.len());
        let w = statistic(&s, &a).unwrap();
        (w, p_value(w, s.len()))
    }

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol, "{a} vs {b} (tol {tol})");
    }

    #[test]
    fn normal_cdf_and_quantile_match_tables() {
        close(normal_cdf(0.0), 0.5, 1e-15);
        close(normal_cdf(1.959963984540054), 0.975, 1e-12);
        close(normal_cdf(-5.0), 2.866515718791939e-7, 1e-18);
        close(normal_cdf(6.0), 1.0 - 9.865876450377e-10, 1e-15);
        for (p, q) in [
            (0.001, -3.090232306167813),
            (0.025, -1.959963984540054),
            (0.3, -0.5244005127080407),
            (0.5, 0.0),
            (0.9, 1.2815515655446004),
        ] {
            close(normal_quantile(p), q, 1e-9);
        }
    }

    // Reference values from an independent implementation of AS R94.
    #[test]
    fn shapiro_wilk_matches_known_values() {
        let (w, p) = sw(&[
            148.0, 154.0, 158.0, 160.0, 161.0, 162.0, 166.0, 170.0, 182.0, 195.0, 236.0,
        ]);
        close(w, 0.7888146948631716, 1e-4);
        close(p, 0.006703814061898823, 5e-4);

        let (w, p) = sw(&[2.1, 3.4, 1.9, 5.6, 4.4, 3.3, 2.8, 3.9, 4.1, 3.0]);
        close(w, 0.9713906031045022, 1e-4);
        close(p, 0.9034305013349915, 5e-3);

        let squares: Vec<f64> = (1..=20).map(|i| f64::from(i * i)).collect();
        let (w, p) = sw(&squares);
        close(w, 0.9061306286053874, 1e-4);
        close(p, 0.053809589128654696, 2e-3);

        let exp: Vec<f64> = (0..50).map(|i| (f64::from(i) / 10.0).exp()).collect();
        let (w, p) = sw(&exp);
        close(w, 0.7640651516946759, 1e-4);
        close(p, 1.4308685623558908e-07, 1e-7);

        let saw: Vec<f64> = (0..128)
            .map(|i| f64::from(i % 7) + f64::from(i) / 100.0)
            .collect();
        let (w, p) = sw(&saw);
        close(w, 0.9580318265065283, 1e-4);
        close(p, 0.0005550712575662949, 2e-4);
    }

    #[test]
    fn shapiro_wilk_small_samples() {
        let (w, p) = sw(&[1.0, 2.0, 3.0]);
        close(w, 1.0, 1e-12);
        close(p, 1.0, 1e-9);
        let (w, p) = sw(&[0.0, 0.0, 1.0]);
        close(w, 0.75, 1e-12);
        close(p, 0.0, 1e-9);
        assert!(statistic(&[2.0, 2.0, 2.0], &coefficients(3)).is_none());
        assert!(statistic(&[1.0, 2.0], &coefficients(2)).is_none());
    }

    #[test]
    fn distances_window_stays_sorted_and_bounded() {
        let mut d = Distances::new(5);
        for x in [5.0, 1.0, 4.0, 2.0, 3.0, 0.5, 9.0] {
            d.push(x);
        }
        assert_eq!(d.len(), 5);
        // 5.0 and 1.0 were dropped as the oldest.
        assert_eq!(d.sorted(), &[0.5, 2.0, 3.0, 4.0, 9.0]);
        assert_eq!(d.median(), 3.0);
    }

    #[test]
    fn signal_ramps_between_thresholds() {
        assert_eq!(signal(0.99, 0.8, 0.9), 0.0);
        assert_eq!(signal(0.7, 0.8, 0.9), 1.0);
        close(signal(0.85, 0.8, 0.9), 0.5, 1e-12);
    }
}
