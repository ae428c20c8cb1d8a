//! `zipar-studio eval`: what parallel decoding costs in quality. Each sample is scored by one
//! teacher-forced raster-order pass of the same model (full causal context): the mean
//! negative log-likelihood of its tokens under the guided distribution NTP samples from.
//! NTP's own samples set the baseline; ZipAR's tokens were drawn with less context, and the
//! NLL gap measures what that missing context costs. Code-usage entropy (bits, per image) is
//! reported beside it as a simple image-space statistic: collapsed or repetitive images use
//! fewer distinct codes.

use serde::Serialize;

use crate::bench::Setting;
use crate::decode::sampling::{cfg_combine, softmax};
use crate::decode::{Flow, GenerateParams, generate};
use crate::model::{Condition, ImageArModel, ModelInput, PassLogits, RunOptions};

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
        let inputs: Vec<ModelInput> = tokens[..tokens.len() - 1]
            .iter()
            .enumerate()
            .map(|(pos, &token)| ModelInput {
                token,
                pos,
                wants_logits: true,
            })
            .collect();
        let rest = model.step(&inputs)?;
        out.cond.extend(rest.cond);
        if let (Some(u), Some(r)) = (out.uncond.as_mut(), rest.uncond) {
            u.extend(r);
        }
    }
    Ok(out)
}

/// Mean per-token NLL (nats) of `tokens` under the model's full-context, CFG-guided
/// distribution.
pub fn score_nll(
    model: &mut dyn ImageArModel,
    cond: &Condition,
    tokens: &[u32],
    cfg_scale: f32,
) -> anyhow::Result<f64> {
    let cfg = cfg_scale != 1.0;
    let logits = teacher_forced(model, cond, tokens, cfg)?;
    let mut total = 0.0f64;
    for (i, &t) in tokens.iter().enumerate() {
        let l = match &logits.uncond {
            Some(u) if cfg => cfg_combine(&logits.cond[i], &u[i], cfg_scale),
            _ => logits.cond[i].clone(),
        };
        let p = softmax(&l)[t as usize].max(1e-30);
        total -= (p as f64).ln();
    }
    Ok(total / tokens.len() as f64)
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
}

/// Generates every (condition, seed) in every setting and scores them.
pub fn run_eval(
    model: &mut dyn ImageArModel,
    conds: &[Condition],
    base: GenerateParams,
    settings: &[Setting],
    seeds: &[u64],
) -> anyhow::Result<Vec<EvalResult>> {
    let mut out = Vec::new();
    for s in settings {
        let (mut nll, mut passes, mut ent, mut n) = (0.0, 0.0, 0.0, 0usize);
        for cond in conds {
            for &seed in seeds {
                let params = GenerateParams {
                    mode: s.mode,
                    window: s.window,
                    seed,
                    ..base
                };
                let trace = generate(model, cond, &params, &mut |_| Flow::Continue)?;
                nll += score_nll(model, cond, &trace.tokens, base.cfg_scale)?;
                passes += trace.passes as f64;
                ent += code_entropy(&trace.tokens);
                n += 1;
            }
        }
        let k = n.max(1) as f64;
        out.push(EvalResult {
            setting: *s,
            samples: n,
            mean_passes: passes / k,
            nll: nll / k,
            nll_gap: 0.0,
            code_entropy: ent / k,
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
        "mode      window  samples  passes  NLL(nats)  gap-vs-NTP  code-entropy(bits)\n",
    );
    for r in results {
        s.push_str(&format!(
            "{:<9} {:>6}  {:>7}  {:>6.1}  {:>9.4}  {:>+10.4}  {:>8.3}\n",
            r.setting.mode.to_string(),
            r.setting.window,
            r.samples,
            r.mean_passes,
            r.nll,
            r.nll_gap,
            r.code_entropy
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
