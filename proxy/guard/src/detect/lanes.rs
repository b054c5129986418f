//! Sums over the short vectors the detector works on (a sketched query, a
//! hyperplane, a row of the whitening matrix), in independent lanes.
//!
//! A plain `iter().sum()` of floats is one chain of dependent additions:
//! its cost is the adder's latency times the length, whatever the CPU's
//! width. Four running sums let the additions overlap (and vectorize); the
//! order of summation differs from a plain loop only in rounding.

/// Coordinates a sketched query has at most (the stack buffers' size).
pub const MAX_LANES: usize = 64;

/// The sum of `term(i)` for `i` in `0..n`: four running sums over whole
/// chunks of four, then the rest in order, then `(s0 + s1) + (s2 + s3)`
/// plus the rest (one order of summation for every sum below).
#[inline(always)]
fn sum_by(n: usize, term: impl Fn(usize) -> f64) -> f64 {
    let mut acc = [0f64; 4];
    let whole = n / 4 * 4;
    for c in (0..whole).step_by(4) {
        for (i, a) in acc.iter_mut().enumerate() {
            *a += term(c + i);
        }
    }
    let tail: f64 = (whole..n).map(&term).sum();
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// The dot product of `a` and `b` (over the shorter of the two).
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    sum_by(n, |i| a[i] * b[i])
}

/// The sum of `a`.
pub fn sum(a: &[f64]) -> f64 {
    sum_by(a.len(), |i| a[i])
}

/// The sum of `(x - mean)^2` over `a`.
pub fn squared_deviations(a: &[f64], mean: f64) -> f64 {
    sum_by(a.len(), |i| (a[i] - mean) * (a[i] - mean))
}

/// `v - mean`, coordinate by coordinate, into `out` (the first
/// `v.len()` of it; `v` must not be longer than `out`).
pub fn centered<'a>(v: &[f64], mean: &[f64], out: &'a mut [f64; MAX_LANES]) -> &'a [f64] {
    let n = v.len().min(mean.len()).min(MAX_LANES);
    for ((o, x), m) in out.iter_mut().zip(v).zip(mean).take(n) {
        *o = x - m;
    }
    &out[..n]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_a_plain_sum_at_every_length() {
        for n in 0..=13 {
            let a: Vec<f64> = (0..n).map(|i| 0.5 + i as f64).collect();
            let b: Vec<f64> = (0..n).map(|i| 2.0 - 0.25 * i as f64).collect();
            let plain: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - plain).abs() < 1e-12, "{n}");
        }
        assert_eq!(dot(&[1.0, 2.0, 3.0], &[1.0]), 1.0);
        for n in 0..=9 {
            let a: Vec<f64> = (0..n).map(|i| 1.5 * i as f64 - 2.0).collect();
            let plain: f64 = a.iter().sum();
            assert!((sum(&a) - plain).abs() < 1e-12, "{n}");
            let m = plain / n.max(1) as f64;
            let ss: f64 = a.iter().map(|x| (x - m).powi(2)).sum();
            assert!((squared_deviations(&a, m) - ss).abs() < 1e-9, "{n}");
        }
    }
}
