//! `zipar-studio bench`: NTP and ZipAR side by side in one process, warm-up excluded, so the
//! ratios are fair on a noisy machine.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use crate::decode::{Flow, GenerateParams, Mode, generate};
use crate::model::{Condition, ImageArModel};

/// The build profile of this binary ("release" or "debug"), printed with every benchmark.
pub const BUILD_PROFILE: &str = if cfg!(debug_assertions) {
    "debug"
} else {
    "release"
};

/// One decoding setting to measure.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Setting {
    /// Mode.
    pub mode: Mode,
    /// Window (grid width for NTP).
    pub window: usize,
}

/// Aggregated numbers of one setting.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SettingResult {
    /// What was run.
    pub setting: Setting,
    /// Mean forward passes per image.
    pub passes: f64,
    /// Median decoding wall time per image (ms).
    pub median_ms: f64,
    /// Image tokens per second at the median.
    pub tokens_per_s: f64,
    /// NTP median time over this setting's median time.
    pub speedup: f64,
    /// NTP passes over this setting's passes.
    pub pass_ratio: f64,
    /// Mean pass time (ms) by number of tokens the pass produced.
    pub ms_by_tokens_per_pass: BTreeMap<usize, f64>,
    /// Exact mode: accepted drafts over tested drafts.
    pub acceptance: Option<f64>,
}

/// Runs every setting for every condition and seed (after one unmeasured warm-up run).
pub fn run_bench(
    model: &mut dyn ImageArModel,
    conds: &[Condition],
    base: GenerateParams,
    settings: &[Setting],
    seeds: &[u64],
) -> anyhow::Result<Vec<SettingResult>> {
    let (h, w) = model.grid();
    let mut warm = base;
    warm.mode = Mode::Ntp;
    if let Some(c) = conds.first() {
        generate(model, c, &warm, &mut |_| Flow::Continue)?;
    }
    // Interleave settings inside each (condition, seed) so drift hits all of them alike.
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); settings.len()];
    let mut passes = vec![0usize; settings.len()];
    let mut runs = vec![0usize; settings.len()];
    let mut drafts = vec![(0usize, 0usize); settings.len()];
    let mut by_k: Vec<BTreeMap<usize, (f64, usize)>> = vec![BTreeMap::new(); settings.len()];
    for cond in conds {
        for &seed in seeds {
            for (i, s) in settings.iter().enumerate() {
                let params = GenerateParams {
                    mode: s.mode,
                    window: s.window,
                    seed,
                    ..base
                };
                let t0 = Instant::now();
                let trace = generate(model, cond, &params, &mut |_| Flow::Continue)?;
                times[i].push(t0.elapsed().as_secs_f64() * 1e3);
                passes[i] += trace.passes;
                runs[i] += 1;
                if let Some(rec) = &trace.exact {
                    drafts[i].0 += rec.accepted_per_pass.iter().sum::<usize>();
                    drafts[i].1 += rec.tested_per_pass.iter().sum::<usize>();
                }
                for (&k, &ms) in trace.tokens_per_pass.iter().zip(&trace.pass_ms) {
                    let e = by_k[i].entry(k).or_insert((0.0, 0));
                    e.0 += ms;
                    e.1 += 1;
                }
            }
        }
    }
    let medians: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
    let passes: Vec<f64> = passes
        .iter()
        .zip(&runs)
        .map(|(&p, &n)| p as f64 / n.max(1) as f64)
        .collect();
    let ntp = settings
        .iter()
        .position(|s| s.mode == Mode::Ntp)
        .map(|i| (medians[i], passes[i]));
    Ok(settings
        .iter()
        .enumerate()
        .map(|(i, &setting)| {
            let (ntp_ms, ntp_passes) = ntp.unwrap_or((f64::NAN, (h * w) as f64));
            SettingResult {
                setting,
                passes: passes[i],
                median_ms: medians[i],
                tokens_per_s: (h * w) as f64 / (medians[i] / 1e3),
                speedup: ntp_ms / medians[i],
                pass_ratio: ntp_passes / passes[i].max(1.0),
                ms_by_tokens_per_pass: by_k[i]
                    .iter()
                    .map(|(&k, &(sum, n))| (k, sum / n as f64))
                    .collect(),
                acceptance: (drafts[i].1 > 0).then(|| drafts[i].0 as f64 / drafts[i].1 as f64),
            }
        })
        .collect())
}

fn median(xs: &mut [f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// The results as a text table.
pub fn table(results: &[SettingResult]) -> String {
    let mut out = String::from(
        "mode      window  passes  pass-ratio  median-ms  tokens/s  speed-up  accept  ms/pass by tokens/pass\n",
    );
    for r in results {
        let per: Vec<String> = r
            .ms_by_tokens_per_pass
            .iter()
            .map(|(k, ms)| format!("{k}:{ms:.2}"))
            .collect();
        out.push_str(&format!(
            "{:<9} {:>6}  {:>6.1}  {:>9.2}x  {:>9.1}  {:>8.0}  {:>7.2}x  {:>6}  {}\n",
            r.setting.mode.to_string(),
            r.setting.window,
            r.passes,
            r.pass_ratio,
            r.median_ms,
            r.tokens_per_s,
            r.speedup,
            r.acceptance
                .map_or_else(|| "-".to_string(), |a| format!("{a:.3}")),
            per.join(" ")
        ));
    }
    out
}
