//! The tasks a victim model is trained on, and what natural traffic to it
//! looks like.
//!
//! A dataset task draws natural queries from a kernel density estimate of
//! each class: a real row of the class plus Gaussian noise with the class's
//! covariance scaled by Scott's bandwidth factor n^(-1/(d+4)), so draws are
//! new points that keep the inputs' correlations (honest callers ask about
//! new records, not jittered copies of a few); then rounded to the input's
//! own resolution and kept within its observed range, so that integer
//! pixels stay integers and measurements keep their precision. A
//! synthetic task is a mixture of Gaussian blobs, optionally living in a
//! low-dimensional latent space mapped linearly into many inputs (as wide
//! real data does).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::gauss;

/// Tune or held-out: the detector's settings were chosen on the first kind
/// only; the figures that count are the second's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Tune,
    HeldOut,
}

impl Split {
    pub fn label(self) -> &'static str {
        match self {
            Split::Tune => "tune",
            Split::HeldOut => "held-out",
        }
    }
}

enum Source {
    /// Rows of a dataset: inputs and class.
    Rows {
        rows: Vec<(Vec<f64>, usize)>,
        by_class: Vec<Vec<usize>>,
        /// Per class: the kernel's lower Cholesky factor, `width` x `width`.
        kernel: Vec<Vec<f64>>,
        resolution: Vec<f64>,
    },
    /// Blobs `(class, centre, sd)` in a latent space of `latent` coordinates,
    /// mapped into the inputs by `map` (`width` x `latent`; none when the
    /// latent space is the input space), then scaled and offset per input.
    Mixture {
        blobs: Vec<(usize, Vec<f64>, Vec<f64>)>,
        latent: usize,
        map: Vec<f64>,
        scale: Vec<f64>,
        offset: Vec<f64>,
    },
}

/// One task: its inputs, classes and natural distribution.
pub struct Task {
    pub name: String,
    pub split: Split,
    pub width: usize,
    pub classes: usize,
    /// Per-input minimum and maximum of natural data (what an API documents).
    pub lo: Vec<f64>,
    pub hi: Vec<f64>,
    /// Classes weighted as natural traffic asks for them.
    prior: Vec<f64>,
    source: Source,
}

impl Task {
    /// A dataset from `benches/data` (last column the class).
    pub fn dataset(name: &str, split: Split) -> Self {
        let path = format!("{}/benches/data/{name}.csv", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let rows: Vec<(Vec<f64>, usize)> = text
            .lines()
            .filter_map(|line| {
                let v: Vec<f64> = line
                    .split(',')
                    .map(|c| c.trim().parse().ok())
                    .collect::<Option<_>>()?;
                let (class, x) = v.split_last()?;
                Some((x.to_vec(), *class as usize))
            })
            .collect();
        let width = rows[0].0.len();
        let classes = rows.iter().map(|r| r.1).max().unwrap_or(0) + 1;
        let mut resolution = Vec::with_capacity(width);
        let (mut lo, mut hi) = (Vec::new(), Vec::new());
        for j in 0..width {
            let mut col: Vec<f64> = rows.iter().map(|r| r.0[j]).collect();
            col.sort_by(f64::total_cmp);
            col.dedup();
            lo.push(col[0]);
            hi.push(col[col.len() - 1]);
            let step = col
                .windows(2)
                .map(|w| w[1] - w[0])
                .fold(f64::INFINITY, f64::min);
            resolution.push(if step.is_finite() { step } else { 1.0 });
        }
        let mut by_class = vec![Vec::new(); classes];
        for (i, r) in rows.iter().enumerate() {
            by_class[r.1].push(i);
        }
        let prior = by_class.iter().map(|c| c.len() as f64).collect();
        let kernel = by_class
            .iter()
            .map(|members| {
                let m = members.len().max(2) as f64;
                let h2 = m.powf(-2.0 / (width as f64 + 4.0));
                let mean: Vec<f64> = (0..width)
                    .map(|j| members.iter().map(|&i| rows[i].0[j]).sum::<f64>() / m)
                    .collect();
                let mut cov = vec![0.0; width * width];
                for &i in members {
                    let x = &rows[i].0;
                    for a in 0..width {
                        for b in 0..=a {
                            cov[a * width + b] +=
                                h2 * (x[a] - mean[a]) * (x[b] - mean[b]) / (m - 1.0);
                        }
                    }
                }
                // Constant inputs of a class (blank pixels) get a tenth of
                // their resolution, so the factor exists.
                for a in 0..width {
                    cov[a * width + a] += (0.1 * resolution[a]).powi(2);
                }
                warden_guard::detect::natural::cholesky(&cov, width).expect("kernel")
            })
            .collect();

        Self {
            name: name.to_string(),
            split,
            width,
            classes,
            lo,
            hi,
            prior,
            source: Source::Rows {
                rows,
                by_class,
                kernel,
                resolution,
            },
        }
    }

    /// A Gaussian mixture of `classes` x 2 blobs, `width` inputs on
    /// different scales; `latent` > 0 puts the blobs in that many
    /// coordinates and maps them linearly into the inputs.
    pub fn mixture(
        name: &str,
        split: Split,
        width: usize,
        classes: usize,
        latent: usize,
        seed: u64,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let space = if latent == 0 { width } else { latent };
        let spread = if latent == 0 { 0.7 } else { 1.6 };
        let mut blobs = Vec::new();
        for c in 0..classes {
            for _ in 0..2 {
                let centre = (0..space).map(|_| spread * gauss(&mut rng)).collect();
                let sd = (0..space).map(|_| rng.random_range(0.5..1.2)).collect();
                blobs.push((c, centre, sd));
            }
        }
        let map = if latent == 0 {
            Vec::new()
        } else {
            (0..width * latent)
                .map(|_| gauss(&mut rng) / (latent as f64).sqrt())
                .collect()
        };
        let scale = (0..width)
            .map(|_| rng.random_range(-1.5f64..1.5).exp())
            .collect();
        let offset = (0..width).map(|_| rng.random_range(-5.0..5.0)).collect();
        let mut task = Self {
            name: name.to_string(),
            split,
            width,
            classes,
            lo: Vec::new(),
            hi: Vec::new(),
            prior: vec![1.0; classes],
            source: Source::Mixture {
                blobs,
                latent,
                map,
                scale,
                offset,
            },
        };
        let mut probe = StdRng::seed_from_u64(seed ^ 1);
        let range: Vec<Vec<f64>> = (0..2000).map(|_| task.sample(&mut probe).0).collect();
        task.lo = (0..width)
            .map(|j| range.iter().map(|x| x[j]).fold(f64::INFINITY, f64::min))
            .collect();
        task.hi = (0..width)
            .map(|j| range.iter().map(|x| x[j]).fold(f64::NEG_INFINITY, f64::max))
            .collect();
        task
    }

    /// A natural query of class `class`.
    pub fn sample_class(&self, rng: &mut StdRng, class: usize) -> Vec<f64> {
        match &self.source {
            Source::Rows {
                rows,
                by_class,
                kernel,
                resolution,
            } => {
                let of_class = &by_class[class];
                let row = &rows[of_class[rng.random_range(0..of_class.len())]];
                let z: Vec<f64> = (0..self.width).map(|_| gauss(rng)).collect();
                let l = &kernel[class];
                (0..self.width)
                    .map(|j| {
                        let noise: f64 = (0..=j).map(|q| l[j * self.width + q] * z[q]).sum();
                        let v = row.0[j] + noise;
                        ((v / resolution[j]).round() * resolution[j]).clamp(self.lo[j], self.hi[j])
                    })
                    .collect()
            }
            Source::Mixture {
                blobs,
                latent,
                map,
                scale,
                offset,
            } => {
                let (_, c, sd) = &blobs[2 * class + rng.random_range(0..2)];
                let z: Vec<f64> = c.iter().zip(sd).map(|(c, s)| c + s * gauss(rng)).collect();
                (0..self.width)
                    .map(|j| {
                        let v = if *latent == 0 {
                            z[j]
                        } else {
                            let row = &map[j * latent..(j + 1) * latent];
                            row.iter().zip(&z).map(|(a, b)| a * b).sum::<f64>() + 0.3 * gauss(rng)
                        };
                        v * scale[j] + offset[j]
                    })
                    .collect()
            }
        }
    }

    /// A class as natural traffic asks for it.
    pub fn class(&self, rng: &mut StdRng) -> usize {
        let total: f64 = self.prior.iter().sum();
        let mut pick = rng.random_range(0.0..total);
        for (c, &p) in self.prior.iter().enumerate() {
            if pick < p {
                return c;
            }
            pick -= p;
        }
        self.classes - 1
    }

    /// A natural query and its true class.
    pub fn sample(&self, rng: &mut StdRng) -> (Vec<f64>, usize) {
        let c = self.class(rng);
        (self.sample_class(rng, c), c)
    }

    /// Per-input spread of natural data (for a caller's edits of a record).
    pub fn spread(&self, j: usize) -> f64 {
        (self.hi[j] - self.lo[j]) / 6.0
    }
}

/// Every task, in the committed split: the detector's defaults were chosen on
/// the `Tune` ones; the `HeldOut` ones were not looked at while tuning.
pub fn all() -> Vec<Task> {
    vec![
        Task::mixture("mixture-16", Split::Tune, 16, 4, 0, 0x5eed),
        Task::mixture("mixture-64", Split::Tune, 64, 4, 0, 0x5eee),
        Task::dataset("wine", Split::Tune),
        Task::dataset("iris", Split::HeldOut),
        Task::dataset("breast_cancer", Split::HeldOut),
        Task::dataset("digits", Split::HeldOut),
        Task::mixture("latent-128", Split::HeldOut, 128, 5, 6, 0x1a7e),
    ]
}
