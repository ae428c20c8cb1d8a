//! Turning logits into tokens: classifier-free guidance, temperature, top-k, top-p, greedy.
//!
//! Works on plain `f32` slices (the engine copies each predicted row of logits to the CPU),
//! so it is independent of the model and of candle. A seeded [`Sampler`] reproduces a run
//! exactly: the RNG is consumed once per sampled token, in the schedule's order.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// How a token is chosen from a distribution.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Sampling {
    /// The most likely token (first one on ties).
    Greedy,
    /// Draw from softmax(logits / temperature) restricted by top-k then top-p.
    Random {
        /// Divides the logits; must be > 0.
        temperature: f32,
        /// Keep the tokens whose logit is at least the k-th largest (ties kept); 0 = off.
        top_k: usize,
        /// Keep the smallest prefix of the sorted distribution whose mass reaches p,
        /// including the token that crosses it; 1.0 = off.
        top_p: f32,
    },
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling::Random {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

impl std::fmt::Display for Sampling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Sampling::Greedy => write!(f, "greedy"),
            Sampling::Random {
                temperature,
                top_k,
                top_p,
            } => {
                write!(f, "temperature {temperature}")?;
                if top_k > 0 {
                    write!(f, ", top-k {top_k}")?;
                }
                if top_p < 1.0 {
                    write!(f, ", top-p {top_p}")?;
                }
                Ok(())
            }
        }
    }
}

/// Settings out of range.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplingError {
    /// Temperature must be positive and finite.
    #[error("temperature {0} is out of range: it must be greater than 0")]
    Temperature(f32),
    /// top-p must lie in (0, 1].
    #[error("top-p {0} is out of range: it must be in (0, 1]")]
    TopP(f32),
    /// CFG scale must be finite and >= 0.
    #[error("cfg scale {0} is out of range: it must be 0 or more")]
    Cfg(f32),
}

impl Sampling {
    /// The rule the command line and the app's settings describe.
    pub fn from_flags(greedy: bool, temperature: f32, top_k: usize, top_p: f32) -> Self {
        if greedy {
            Sampling::Greedy
        } else {
            Sampling::Random {
                temperature,
                top_k,
                top_p,
            }
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if let Sampling::Random {
            temperature, top_p, ..
        } = *self
        {
            if !(temperature > 0.0 && temperature.is_finite()) {
                return Err(SamplingError::Temperature(temperature));
            }
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(SamplingError::TopP(top_p));
            }
        }
        Ok(())
    }
}

/// Checks a CFG scale.
pub fn validate_cfg(scale: f32) -> Result<(), SamplingError> {
    if scale.is_finite() && scale >= 0.0 {
        Ok(())
    } else {
        Err(SamplingError::Cfg(scale))
    }
}

/// Classifier-free guidance as LlamaGen and Lumina apply it: `u + (c - u) * scale`.
pub fn cfg_combine(cond: &[f32], uncond: &[f32], scale: f32) -> Vec<f32> {
    cond.iter()
        .zip(uncond)
        .map(|(&c, &u)| u + (c - u) * scale)
        .collect()
}

/// Numerically stable softmax.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut out: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = out.iter().sum();
    out.iter_mut().for_each(|p| *p /= sum);
    out
}

/// Index of the largest value, the first one on ties.
pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// The distribution a token is drawn from: after temperature, top-k and top-p.
/// For greedy sampling it is the plain softmax (used to report the token's probability).
pub fn distribution(logits: &[f32], sampling: Sampling) -> Vec<f32> {
    let Sampling::Random {
        temperature,
        top_k,
        top_p,
    } = sampling
    else {
        return softmax(logits);
    };
    let mut l: Vec<f32> = logits.iter().map(|&x| x / temperature).collect();
    if top_k > 0 && top_k < l.len() {
        let mut sorted = l.clone();
        sorted.select_nth_unstable_by(top_k - 1, |a, b| b.total_cmp(a));
        let kth = sorted[top_k - 1];
        l.iter_mut()
            .filter(|x| **x < kth)
            .for_each(|x| *x = f32::NEG_INFINITY);
    }
    if top_p < 1.0 {
        let probs = softmax(&l);
        let mut order: Vec<usize> = (0..l.len()).collect();
        // Stable sort: equal logits keep index order, as torch.sort does on CPU.
        order.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
        let mut cum = 0.0f32;
        for (rank, &i) in order.iter().enumerate() {
            // A token is removed when the mass before it already exceeds p: this keeps the
            // token that crosses the threshold.
            if rank > 0 && cum > top_p {
                l[i] = f32::NEG_INFINITY;
            }
            cum += probs[i];
        }
    }
    softmax(&l)
}

/// A seeded token sampler.
#[derive(Debug, Clone)]
pub struct Sampler {
    sampling: Sampling,
    rng: ChaCha8Rng,
}

/// A sampled token and its probability under the distribution it was drawn from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampled {
    /// The token id.
    pub token: u32,
    /// Its probability.
    pub prob: f32,
}

impl Sampler {
    /// A sampler whose draws are fixed by `seed`.
    pub fn new(sampling: Sampling, seed: u64) -> Self {
        Self {
            sampling,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The sampling rule.
    pub fn sampling(&self) -> Sampling {
        self.sampling
    }

    /// Chooses a token from one row of (already CFG-combined) logits.
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        self.sample_with_distribution(logits).0
    }

    /// Like [`Sampler::sample`], also returning the distribution drawn from.
    pub fn sample_with_distribution(&mut self, logits: &[f32]) -> (Sampled, Vec<f32>) {
        let probs = distribution(logits, self.sampling);
        let token = match self.sampling {
            Sampling::Greedy => argmax(logits),
            Sampling::Random { .. } => self.draw(&probs),
        };
        let s = Sampled {
            token: token as u32,
            prob: probs[token],
        };
        (s, probs)
    }

    /// Draws an index from a distribution (which need not be normalised).
    pub fn draw(&mut self, probs: &[f32]) -> usize {
        let total: f32 = probs.iter().sum();
        let u = self.rng.random::<f32>() * total;
        let mut cum = 0.0;
        let mut last = 0;
        for (i, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                cum += p;
                last = i;
                if u < cum {
                    return i;
                }
            }
        }
        last
    }

    /// A uniform number in [0, 1), for acceptance tests.
    pub fn uniform(&mut self) -> f32 {
        self.rng.random::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cfg_matches_formula() {
        let c = [1.0, 2.0, -1.0];
        let u = [0.5, 0.0, 1.0];
        assert_eq!(cfg_combine(&c, &u, 1.0), c.to_vec());
        assert_eq!(cfg_combine(&c, &u, 0.0), u.to_vec());
        assert_eq!(cfg_combine(&c, &u, 2.0), vec![1.5, 4.0, -3.0]);
    }

    #[test]
    fn top_k_keeps_ties() {
        let logits = [3.0, 1.0, 2.0, 2.0, 0.0];
        let d = distribution(
            &logits,
            Sampling::Random {
                temperature: 1.0,
                top_k: 2,
                top_p: 1.0,
            },
        );
        assert!(d[0] > 0.0 && d[2] > 0.0 && d[3] > 0.0);
        assert_eq!(d[1], 0.0);
        assert_eq!(d[4], 0.0);
    }

    #[test]
    fn top_p_keeps_the_crossing_token() {
        // softmax(ln p) = p: masses 0.5, 0.3, 0.15, 0.05.
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let d = distribution(
            &logits,
            Sampling::Random {
                temperature: 1.0,
                top_k: 0,
                top_p: 0.6,
            },
        );
        // 0.5 alone does not reach 0.6; 0.3 crosses it and is kept; the rest go.
        assert!(d[0] > 0.0 && d[1] > 0.0);
        assert_eq!(d[2], 0.0);
        assert_eq!(d[3], 0.0);
        assert!((d[0] - 0.625).abs() < 1e-5);
        // A tiny p still keeps the most likely token.
        let d = distribution(
            &logits,
            Sampling::Random {
                temperature: 1.0,
                top_k: 0,
                top_p: 0.01,
            },
        );
        assert_eq!(d[0], 1.0);
    }

    #[test]
    fn temperature_sharpens() {
        let logits = [1.0, 0.0];
        let hot = distribution(&logits, Sampling::default());
        let cold = distribution(
            &logits,
            Sampling::Random {
                temperature: 0.5,
                top_k: 0,
                top_p: 1.0,
            },
        );
        assert!(cold[0] > hot[0]);
        assert!((cold[0] - 1.0 / (1.0 + (-2.0f32).exp())).abs() < 1e-6);
    }

    #[test]
    fn greedy_takes_first_max() {
        let mut s = Sampler::new(Sampling::Greedy, 0);
        assert_eq!(s.sample(&[0.0, 5.0, 5.0, 1.0]).token, 1);
    }

    #[test]
    fn seed_reproduces_and_draws_follow_the_distribution() {
        let logits: Vec<f32> = [0.1f32, 0.2, 0.7].iter().map(|p| p.ln()).collect();
        let run = |seed| {
            let mut s = Sampler::new(Sampling::default(), seed);
            (0..4000)
                .map(|_| s.sample(&logits).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let draws = run(7);
        let frac = draws.iter().filter(|&&t| t == 2).count() as f32 / draws.len() as f32;
        assert!((frac - 0.7).abs() < 0.03, "{frac}");
    }

    #[test]
    fn bad_settings_are_rejected() {
        let bad = Sampling::Random {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        };
        assert_eq!(bad.validate(), Err(SamplingError::Temperature(0.0)));
        let bad = Sampling::Random {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.5,
        };
        assert!(bad.validate().is_err());
        assert!(validate_cfg(-1.0).is_err());
        assert!(validate_cfg(f32::NAN).is_err());
        assert!(validate_cfg(4.0).is_ok());
    }
}
