//! The victims and the attackers' surrogates: small feed-forward classifiers
//! (no hidden layer: softmax regression; one tanh layer: an MLP), inputs
//! standardized by the data they were trained on, trained by SGD with
//! momentum on cross-entropy against soft targets.

use rand::Rng;
use rand::rngs::StdRng;

use crate::gauss;

/// Which model a victim is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Linear,
    Mlp,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Linear => "linear",
            Kind::Mlp => "mlp",
        }
    }

    fn hidden(self) -> &'static [usize] {
        match self {
            Kind::Linear => &[],
            Kind::Mlp => &[32],
        }
    }
}

/// One dense layer, `out` x `inp` weights row-major.
#[derive(Clone)]
struct Dense {
    inp: usize,
    out: usize,
    w: Vec<f64>,
    b: Vec<f64>,
}

/// A classifier of `classes` classes.
#[derive(Clone)]
pub struct Net {
    mean: Vec<f64>,
    inv_sd: Vec<f64>,
    layers: Vec<Dense>,
}

impl Net {
    /// An untrained net of `kind` for inputs like `xs`.
    pub fn new(kind: Kind, rng: &mut StdRng, xs: &[Vec<f64>], classes: usize) -> Self {
        let width = xs[0].len();
        let n = xs.len().max(1) as f64;
        let mean: Vec<f64> = (0..width)
            .map(|j| xs.iter().map(|x| x[j]).sum::<f64>() / n)
            .collect();
        let inv_sd = (0..width)
            .map(|j| {
                let v = xs.iter().map(|x| (x[j] - mean[j]).powi(2)).sum::<f64>() / n;
                if v > 1e-12 { 1.0 / v.sqrt() } else { 1.0 }
            })
            .collect();
        let mut sizes = vec![width];
        sizes.extend_from_slice(kind.hidden());
        sizes.push(classes);
        let layers = sizes
            .windows(2)
            .map(|s| Dense {
                inp: s[0],
                out: s[1],
                w: (0..s[0] * s[1])
                    .map(|_| gauss(rng) / (s[0] as f64).sqrt())
                    .collect(),
                b: vec![0.0; s[1]],
            })
            .collect();
        Self {
            mean,
            inv_sd,
            layers,
        }
    }

    /// Every layer's activations: the standardized input first, the class
    /// probabilities last.
    fn forward(&self, x: &[f64]) -> Vec<Vec<f64>> {
        let mut acts = vec![
            x.iter()
                .zip(&self.mean)
                .zip(&self.inv_sd)
                .map(|((v, m), s)| (v - m) * s)
                .collect::<Vec<f64>>(),
        ];
        for (l, layer) in self.layers.iter().enumerate() {
            let a = &acts[l];
            let mut z: Vec<f64> = (0..layer.out)
                .map(|o| {
                    layer.b[o]
                        + layer.w[o * layer.inp..(o + 1) * layer.inp]
                            .iter()
                            .zip(a)
                            .map(|(w, v)| w * v)
                            .sum::<f64>()
                })
                .collect();
            if l + 1 < self.layers.len() {
                z.iter_mut().for_each(|v| *v = v.tanh());
            } else {
                let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let s: f64 = z
                    .iter_mut()
                    .map(|v| {
                        *v = (*v - m).exp();
                        *v
                    })
                    .sum();
                z.iter_mut().for_each(|v| *v /= s);
            }
            acts.push(z);
        }
        acts
    }

    pub fn probs(&self, x: &[f64]) -> Vec<f64> {
        self.forward(x).pop().unwrap_or_default()
    }

    pub fn predict(&self, x: &[f64]) -> usize {
        argmax(&self.probs(x))
    }

    /// Back-propagates `delta` (d loss / d logits of the last layer) from
    /// layer `top` down, calling `update` with each layer's gradient; returns
    /// d loss / d standardized input.
    fn backward(
        &self,
        acts: &[Vec<f64>],
        mut delta: Vec<f64>,
        mut update: impl FnMut(usize, &[f64], &[f64]),
    ) -> Vec<f64> {
        for l in (0..self.layers.len()).rev() {
            let layer = &self.layers[l];
            let below = &acts[l];
            let mut down = vec![0.0; layer.inp];
            for o in 0..layer.out {
                let row = &layer.w[o * layer.inp..(o + 1) * layer.inp];
                for (d, w) in down.iter_mut().zip(row) {
                    *d += delta[o] * w;
                }
            }
            update(l, &delta, below);
            if l > 0 {
                for (d, a) in down.iter_mut().zip(below) {
                    *d *= 1.0 - a * a;
                }
            }
            delta = down;
        }
        delta
    }

    /// Plain SGD with momentum on cross-entropy against soft targets.
    pub fn train(&mut self, xs: &[Vec<f64>], ys: &[Vec<f64>], steps: usize, rng: &mut StdRng) {
        if xs.is_empty() {
            return;
        }
        let mut vel: Vec<(Vec<f64>, Vec<f64>)> = self
            .layers
            .iter()
            .map(|l| (vec![0.0; l.w.len()], vec![0.0; l.b.len()]))
            .collect();
        let mu = 0.9;
        for t in 0..steps {
            let lr = 0.02 * (1.0 - t as f64 / steps as f64) + 0.001;
            let i = rng.random_range(0..xs.len());
            let acts = self.forward(&xs[i]);
            let p = &acts[acts.len() - 1];
            let delta: Vec<f64> = p.iter().zip(&ys[i]).map(|(p, y)| p - y).collect();
            let mut deltas: Vec<(usize, Vec<f64>)> = Vec::with_capacity(self.layers.len());
            self.backward(&acts, delta, |l, d, _| deltas.push((l, d.to_vec())));
            for (l, d) in deltas {
                let below = &acts[l];
                let layer = &mut self.layers[l];
                let (vw, vb) = &mut vel[l];
                for o in 0..layer.out {
                    for q in 0..layer.inp {
                        let k = o * layer.inp + q;
                        vw[k] = mu * vw[k] - lr * d[o] * below[q];
                        layer.w[k] += vw[k];
                    }
                    vb[o] = mu * vb[o] - lr * d[o];
                    layer.b[o] += vb[o];
                }
            }
        }
    }

    /// Sign of d p_class / d x (the Jacobian row used by augmentation).
    pub fn grad_sign(&self, x: &[f64], class: usize) -> Vec<f64> {
        let acts = self.forward(x);
        let p = &acts[acts.len() - 1];
        let delta = (0..p.len())
            .map(|k| p[class] * (f64::from(u8::from(k == class)) - p[k]))
            .collect();
        let g = self.backward(&acts, delta, |_, _, _| {});
        g.iter()
            .zip(&self.inv_sd)
            .map(|(g, s)| if g * s >= 0.0 { 1.0 } else { -1.0 })
            .collect()
    }
}

pub fn argmax(p: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in p.iter().enumerate() {
        if v > p[best] {
            best = i;
        }
    }
    best
}

pub fn one_hot(k: usize, classes: usize) -> Vec<f64> {
    (0..classes).map(|i| f64::from(u8::from(i == k))).collect()
}

/// Top-1 agreement of two models on `eval`.
pub fn agreement(a: &Net, b: &Net, eval: &[Vec<f64>]) -> f64 {
    eval.iter().filter(|x| a.predict(x) == b.predict(x)).count() as f64 / eval.len() as f64
}

/// The surrogate an attacker fits to what it was answered (an MLP: the
/// attacker does not know the victim's architecture).
pub fn surrogate(data: &[(Vec<f64>, Vec<f64>)], classes: usize, seed: u64) -> Option<Net> {
    use rand::SeedableRng;
    if data.len() < 2 {
        return None;
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let xs: Vec<Vec<f64>> = data.iter().map(|(x, _)| x.clone()).collect();
    let ys: Vec<Vec<f64>> = data.iter().map(|(_, y)| y.clone()).collect();
    let mut m = Net::new(Kind::Mlp, &mut rng, &xs, classes);
    m.train(&xs, &ys, (data.len() * 30).clamp(3_000, 30_000), &mut rng);
    Some(m)
}
