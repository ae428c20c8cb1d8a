//! `zipar-studio eval`: what parallel decoding costs in quality. Each sample is scored by one
//! teacher-forced raster-order pass of the same model (full causal context): the mean
//! negative log-likelihood of its tokens under the guided distribution NTP samples from.
//! NTP's own samples set the baseline; ZipAR's tokens were drawn with less context, and the
//! NLL gap measures what that missing context costs. Code-usage entropy (bits, per image) is
//! reported beside it as a simple image-space statistic: collapsed or repetitive images use
//! fewer distinct codes.
//!
//! When the model ships an image classifier ([`Classifier`]), every sample is also decoded to
//! pixels and scored in image space: top-1 / top-5 accuracy against the conditioning class,
//! and the Frechet distance between the classifier features of the samples and those of the
//! real images (the paper's FID-vs-window table, on this model).

use serde::Serialize;

use crate::bench::Setting;
use crate::decode::sampling::{cfg_combine, distribution, softmax};
use crate::decode::{Flow, GenerateParams, Sampling, generate};
use crate::model::classifier::{Classifier, FeatureStats, frechet_distance, in_top_k};
use crate::model::{Condition, ImageArModel, ModelInput, PassLogits, RgbImage, RunOptions};

/// Logits for every cell of a given token grid: the prefill plus one pass feeding every token
/// but the last at its own slot (full raster-causal context).
pub fn teacher_forced(
    model: &mut dyn ImageArModel,
    cond: &Condition,
    tokens: &[u32],
    cfg: bool,
) -> anyhow::Result<PassLogits> {
    anyhow::ensure!(!tokens.is_empty(), "nothing to score");
    let opts = RunOptions {
        cfg,
        mask_unwritten: false,
    };
    let mut out = model.prefill(cond, opts)?;
    if tokens.len() > 1 {
        let rest = model.step(&ModelInput::teacher_forced(&tokens[..tokens.len() - 1]))?;
        out.cond.extend(rest.cond);
        if let (Some(u), Some(r)) = (out.uncond.as_mut(), rest.uncond) {
            u.extend(r);
        }
    }
    Ok(out)
}

/// What one sample's teacher-forced pass says about it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleScore {
    /// Mean per-token NLL (nats) under the model's full-context, CFG-guided softmax.
    pub nll: f64,
    /// Sum over tokens of -log p_i(x_i) - H(p_i), with p_i the law NTP samples from (CFG,
    /// temperature, top-k, top-p): zero in expectation for an exact sampler.
    pub excess: f64,
    /// Sum over tokens of Var_{x ~ p_i}[-log p_i(x)]: the variance of `excess` under NTP.
    pub variance: f64,
}

/// Scores `tokens` with one teacher-forced raster pass: the NLL (the quality gap ZipAR pays)
/// and the terms of the NLL-minus-entropy z-test (shared/notes/zipar-exact.md, 3.4): for an
/// exact sampler, z = sum excess / sqrt(sum variance) over many images is ~N(0, 1); a lossy
/// one shows a large positive z. Meaningless for greedy decoding (its law is a point mass; the
/// terms are computed under the softmax then). A token just outside a top-k / top-p cut-off
/// because of rounding (f16 on a GPU) counts as probability 1e-30, about 69 nats of excess.
pub fn score_sample(
    model: &mut dyn ImageArModel,
    cond: &Condition,
    tokens: &[u32],
    cfg_scale: f32,
    sampling: Sampling,
) -> anyhow::Result<SampleScore> {
    let cfg = cfg_scale != 1.0;
    let logits = teacher_forced(model, cond, tokens, cfg)?;
    let (mut nll, mut excess, mut variance) = (0.0f64, 0.0f64, 0.0f64);
    for (i, &t) in tokens.iter().enumerate() {
        let l = match &logits.uncond {
            Some(u) if cfg => cfg_combine(&logits.cond[i], &u[i], cfg_scale),
            _ => logits.cond[i].clone(),
        };
        nll -= (softmax(&l)[t as usize].max(1e-30) as f64).ln();
        // The law NTP draws from; a token outside its support (top-k/top-p) counts as
        // probability 1e-30, a very large excess.
        let p = distribution(&l, sampling);
        let (mut h, mut second) = (0.0f64, 0.0f64);
        for &q in p.iter().filter(|&&q| q > 0.0) {
            let s = -(q as f64).ln();
            h += q as f64 * s;
            second += q as f64 * s * s;
        }
        excess += -(p[t as usize].max(1e-30) as f64).ln() - h;
        variance += (second - h * h).max(0.0);
    }
    Ok(SampleScore {
        nll: nll / tokens.len().max(1) as f64,
        excess,
        variance,
    })
}

/// Entropy (bits) of the code histogram of one image.
pub fn code_entropy(tokens: &[u32]) -> f64 {
    let mut counts = std::collections::HashMap::new();
    for &t in tokens {
        *counts.entry(t).or_insert(0usize) += 1;
    }
    let n = tokens.len() as f64;
    counts
        .values()
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// Quality numbers of one setting.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalResult {
    /// What was run.
    pub setting: Setting,
    /// Samples scored.
    pub samples: usize,
    /// Mean forward passes per image.
    pub mean_passes: f64,
    /// Mean per-token NLL (nats).
    pub nll: f64,
    /// NLL minus NTP's.
    pub nll_gap: f64,
    /// Mean code-usage entropy per image (bits).
    pub code_entropy: f64,
    /// Classifier top-1 accuracy against the conditioning class (with a classifier).
    pub top1: Option<f64>,
    /// Classifier top-5 accuracy.
    pub top5: Option<f64>,
    /// Frechet distance of the classifier features to the real images'.
    pub frechet: Option<f64>,
    /// NLL-minus-entropy z-score of the samples under the law NTP samples from: |z| < 4 for
    /// an exact sampler; `None` for greedy decoding (a point mass has no spread).
    pub z: Option<f64>,
}

/// Image-space scores of one setting's samples.
struct ImageScores {
    top1: f64,
    top5: f64,
    frechet: f64,
}

fn score_images(
    classifier: &Classifier,
    images: &[(u32, RgbImage)],
) -> anyhow::Result<ImageScores> {
    let (mut top1, mut top5) = (0usize, 0usize);
    let mut features = Vec::with_capacity(images.len());
    for chunk in images.chunks(64) {
        let refs: Vec<&RgbImage> = chunk.iter().map(|(_, im)| im).collect();
        let scored = classifier.run(&refs)?;
        for ((class, _), l) in chunk.iter().zip(&scored.logits) {
            top1 += in_top_k(l, *class, 1) as usize;
            top5 += in_top_k(l, *class, 5) as usize;
        }
        features.extend(scored.features);
    }
    let n = images.len().max(1) as f64;
    Ok(ImageScores {
        top1: top1 as f64 / n,
        top5: top5 as f64 / n,
        frechet: frechet_distance(&FeatureStats::of(&features)?, &classifier.real)?,
    })
}

/// The RNG seed of sample `seed` of the `k`-th condition: every (condition, seed) pair draws
/// its own random stream, so samples are independent across conditions (the z-test's sum
/// assumes it; with one shared stream the same uniforms pick the same ranks in every image).
pub fn sample_seed(seed: u64, k: usize) -> u64 {
    seed.wrapping_mul(1_000_003).wrapping_add(k as u64)
}

/// Generates every (condition, seed) in every setting and scores them; with a classifier,
/// also in image space. `progress` is called after each sample.
pub fn run_eval(
    model: &mut dyn ImageArModel,
    conds: &[Condition],
    base: GenerateParams,
    settings: &[Setting],
    seeds: &[u64],
    classifier: Option<&Classifier>,
    progress: &mut dyn FnMut(),
) -> anyhow::Result<Vec<EvalResult>> {
    let mut out = Vec::new();
    for s in settings {
        let (mut nll, mut passes, mut ent, mut n) = (0.0, 0.0, 0.0, 0usize);
        let (mut excess, mut variance) = (0.0, 0.0);
        let mut images = Vec::new();
        for (k, cond) in conds.iter().enumerate() {
            for &seed in seeds {
                let params = GenerateParams {
                    mode: s.mode,
                    window: s.window,
                    seed: sample_seed(seed, k),
                    ..base
                };
                let trace = generate(model, cond, &params, &mut |_| Flow::Continue)?;
                let score =
                    score_sample(model, cond, &trace.tokens, base.cfg_scale, base.sampling)?;
                nll += score.nll;
                excess += score.excess;
                variance += score.variance;
                passes += trace.passes as f64;
                ent += code_entropy(&trace.tokens);
                n += 1;
                if let (Some(_), Condition::Class(class)) = (classifier, cond) {
                    images.push((*class, model.decode_image(&trace.tokens)?));
                }
                progress();
            }
        }
        let k = n.max(1) as f64;
        let scores = match classifier {
            Some(c) if images.len() >= 2 => Some(score_images(c, &images)?),
            _ => None,
        };
        out.push(EvalResult {
            setting: *s,
            samples: n,
            mean_passes: passes / k,
            nll: nll / k,
            nll_gap: 0.0,
            code_entropy: ent / k,
            top1: scores.as_ref().map(|x| x.top1),
            top5: scores.as_ref().map(|x| x.top5),
            frechet: scores.as_ref().map(|x| x.frechet),
            z: (base.sampling != Sampling::Greedy && variance > 0.0)
                .then(|| excess / variance.sqrt()),
        });
    }
    let base_nll = out
        .iter()
        .find(|r| r.setting.mode == crate::decode::Mode::Ntp)
        .map(|r| r.nll);
    if let Some(b) = base_nll {
        for r in &mut out {
            r.nll_gap = r.nll - b;
        }
    }
    Ok(out)
}

/// The results as a text table.
pub fn table(results: &[EvalResult]) -> String {
    let mut s = String::from(
        "mode      window  samples  passes  NLL(nats)  gap-vs-NTP  code-entropy(bits)  top-1   top-5   Frechet  z(NLL-H)\n",
    );
    let opt = |x: Option<f64>, prec: usize| x.map_or("-".to_string(), |v| format!("{v:.prec$}"));
    for r in results {
        s.push_str(&format!(
            "{:<9} {:>6}  {:>7}  {:>6.1}  {:>9.4}  {:>+10.4}  {:>18.3}  {:>5}  {:>6}  {:>8}  {:>8}\n",
            r.setting.mode.to_string(),
            r.setting.window,
            r.samples,
            r.mean_passes,
            r.nll,
            r.nll_gap,
            r.code_entropy,
            opt(r.top1, 3),
            opt(r.top5, 3),
            opt(r.frechet, 2),
            opt(r.z, 1),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_of_uniform_and_constant_grids() {
        assert_eq!(code_entropy(&[5, 5, 5, 5]), 0.0);
        assert!((code_entropy(&[1, 2, 3, 4]) - 2.0).abs() < 1e-12);
    }
}
