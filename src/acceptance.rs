//! `zipar-studio acceptance`: would ZipAR's tokens pass an exact test? The first measurement of
//! the lossless ZipAR-exact mode (shared/notes/zipar-exact.md, section 4.4).
//!
//! Take an NTP sample x. Each cell i has two laws: p_i, the full-context law NTP draws it from
//! (one teacher-forced raster pass), and q_i, the law ZipAR with window s draws it from when
//! its schedule feeds x's earlier tokens in ZipAR's order (auxiliary row starts included). A
//! ZipAR-exact draft drawn from q_i passes the test against p_i with probability
//! a_i = sum_x min(p_i(x), q_i(x)) = 1 - TV(p_i, q_i). Both laws are the ones the sampler
//! uses (CFG, temperature, top-k, top-p). The mean of a over the drafted rows predicts the
//! exact mode's pass count (the note's tables); per row and per column it shows where
//! rejections would cluster.
//!
//! Drafts are the cells ZipAR predicts in or before the pass that produces the last cell of
//! the row above. The exact mode samples a row's later cells in its verifying chain, with the
//! full context; lossy ZipAR predicts them over the stale K/V of the row's drafted cells, so
//! their a is close to, not exactly, 1 (`all` includes them).

use serde::Serialize;

use crate::decode::engine::{combine, run_pass};
use crate::decode::sampling::{argmax, distribution};
use crate::decode::{Flow, GenerateParams, Layout, Mode, Sampling, Schedule, generate};
use crate::eval::teacher_forced;
use crate::model::{Condition, ImageArModel, RunOptions};

/// Acceptance of one window's drafts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Acceptance {
    /// ZipAR window.
    pub window: usize,
    /// NTP samples teacher-forced.
    pub samples: usize,
    /// Mean a over the cells ZipAR drafts under partial context: those predicted no later
    /// than the last cell of the row above (later cells of a row see the row above complete).
    pub drafted: f64,
    /// Cells per image counted in `drafted`.
    pub drafted_cells: usize,
    /// Mean a over every cell (cells decoded with the full context have a = 1).
    pub all: f64,
    /// Share of drafted cells with a >= 0.9.
    pub share_above_90: f64,
    /// Mean a per row.
    pub per_row: Vec<f64>,
    /// Mean a per column, over the drafted cells (NaN where a column has none).
    pub per_col: Vec<f64>,
}

/// Whether each cell (raster order) is predicted under partial context by the schedule: in
/// or before the pass that produces the last cell of the row above.
pub fn drafted_cells(schedule: &Schedule) -> Vec<bool> {
    let w = schedule.w;
    let pass = schedule.pass_of();
    (0..pass.len())
        .map(|i| i >= w && pass[i] <= pass[(i / w) * w - 1])
        .collect()
}

/// The law a cell is drawn from: the sampler's distribution, or the one-hot argmax when
/// decoding is greedy (a draft then passes iff both argmaxes agree).
fn law(logits: &[f32], sampling: Sampling) -> Vec<f32> {
    if sampling == Sampling::Greedy {
        let mut p = vec![0.0; logits.len()];
        if !p.is_empty() {
            p[argmax(logits)] = 1.0;
        }
        return p;
    }
    distribution(logits, sampling)
}

/// sum_x min(p(x), q(x)): the probability that a draft from `q` passes the exact test
/// against `p`.
pub fn overlap(p: &[f32], q: &[f32]) -> f64 {
    p.iter().zip(q).map(|(&a, &b)| a.min(b) as f64).sum()
}

/// Per cell (raster order), the law the fixed `schedule` draws it from when every cell it
/// feeds holds `tokens` (teacher forcing along the schedule).
pub fn schedule_laws(
    model: &mut dyn ImageArModel,
    cond: &Condition,
    schedule: &Schedule,
    tokens: &[u32],
    cfg_scale: f32,
    sampling: Sampling,
    mask_unwritten: bool,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let w = schedule.w;
    anyhow::ensure!(
        tokens.len() == schedule.h * w,
        "{} tokens for a {}x{w} grid",
        tokens.len(),
        schedule.h
    );
    let cfg = (cfg_scale != 1.0).then_some(cfg_scale);
    let opts = RunOptions {
        cfg: cfg.is_some(),
        mask_unwritten,
    };
    let mut laws = vec![Vec::new(); tokens.len()];
    for pass in &schedule.passes {
        let logits = run_pass(model, cond, opts, pass, |c| {
            tokens.get(c.row * w + c.col).copied()
        })?;
        for (row, cell) in pass.predicted().enumerate() {
            anyhow::ensure!(row < logits.cond.len(), "too few rows of logits");
            laws[cell.row * w + cell.col] = law(&combine(&logits, row, cfg), sampling);
        }
    }
    Ok(laws)
}

/// Per cell, the full-context law NTP draws it from.
pub fn ntp_laws(
    model: &mut dyn ImageArModel,
    cond: &Condition,
    tokens: &[u32],
    cfg_scale: f32,
    sampling: Sampling,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let cfg = (cfg_scale != 1.0).then_some(cfg_scale);
    let logits = teacher_forced(model, cond, tokens, cfg.is_some())?;
    Ok((0..tokens.len())
        .map(|i| law(&combine(&logits, i, cfg), sampling))
        .collect())
}

/// For every window: NTP samples (one per condition and seed, drawn with `base`) are
/// teacher-forced through the window's ZipAR schedule and each cell's overlap with the
/// full-context law is averaged. `progress` is called after each sample.
pub fn measure(
    model: &mut dyn ImageArModel,
    conds: &[Condition],
    base: GenerateParams,
    windows: &[usize],
    seeds: &[u64],
    progress: &mut dyn FnMut(),
) -> anyhow::Result<Vec<Acceptance>> {
    let (h, w) = model.grid();
    let layout = model.layout();
    // Teacher forcing feeds the raster order without separators.
    anyhow::ensure!(
        layout == Layout::Raster,
        "acceptance is measured for the raster layout only"
    );
    let schedules = windows
        .iter()
        .map(|&s| Schedule::zipar(h, w, layout, s))
        .collect::<Result<Vec<_>, _>>()?;
    // sums[window][cell]
    let mut sums = vec![vec![0.0f64; h * w]; windows.len()];
    let mut n = 0usize;
    for (k, cond) in conds.iter().enumerate() {
        for &seed in seeds {
            let params = GenerateParams {
                mode: Mode::Ntp,
                seed: crate::eval::sample_seed(seed, k),
                ..base
            };
            let x = generate(model, cond, &params, &mut |_| Flow::Continue)?.tokens;
            let p = ntp_laws(model, cond, &x, base.cfg_scale, base.sampling)?;
            for (k, schedule) in schedules.iter().enumerate() {
                let q = schedule_laws(
                    model,
                    cond,
                    schedule,
                    &x,
                    base.cfg_scale,
                    base.sampling,
                    base.mask_unwritten,
                )?;
                for (i, sum) in sums[k].iter_mut().enumerate() {
                    *sum += overlap(&p[i], &q[i]);
                }
            }
            n += 1;
            progress();
        }
    }
    let k = n.max(1) as f64;
    Ok(windows
        .iter()
        .zip(&schedules)
        .zip(&sums)
        .map(|((&window, schedule), sum)| {
            let a: Vec<f64> = sum.iter().map(|v| v / k).collect();
            let per_row: Vec<f64> = a.chunks(w).map(mean).collect();
            let is_drafted = drafted_cells(schedule);
            let drafted: Vec<f64> = (0..a.len())
                .filter(|&i| is_drafted[i])
                .map(|i| a[i])
                .collect();
            let per_col = (0..w)
                .map(|c| {
                    let col: Vec<f64> = (c..a.len())
                        .step_by(w)
                        .filter(|&i| is_drafted[i])
                        .map(|i| a[i])
                        .collect();
                    mean(&col)
                })
                .collect();
            Acceptance {
                window,
                samples: n,
                drafted: mean(&drafted),
                drafted_cells: drafted.len(),
                all: mean(&a),
                share_above_90: drafted.iter().filter(|&&v| v >= 0.9).count() as f64
                    / drafted.len().max(1) as f64,
                per_row,
                per_col,
            }
        })
        .collect())
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// The results as text: one line per window, then the per-row and per-column means.
pub fn table(results: &[Acceptance]) -> String {
    let mut s = String::from(
        "window  samples  drafts/image  a(drafts)  a(all cells)  drafts with a>=0.9\n",
    );
    for r in results {
        s.push_str(&format!(
            "{:>6}  {:>7}  {:>12}  {:>9.4}  {:>12.4}  {:>18.3}\n",
            r.window, r.samples, r.drafted_cells, r.drafted, r.all, r.share_above_90
        ));
    }
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| {
                if x.is_nan() {
                    "-".to_string()
                } else {
                    format!("{x:.2}")
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    for r in results {
        s.push_str(&format!("s={} per row:    {}\n", r.window, fmt(&r.per_row)));
        s.push_str(&format!("s={} per column: {}\n", r.window, fmt(&r.per_col)));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_is_one_minus_total_variation() {
        assert!((overlap(&[0.5, 0.5], &[0.5, 0.5]) - 1.0).abs() < 1e-9);
        assert_eq!(overlap(&[1.0, 0.0], &[0.0, 1.0]), 0.0);
        assert!((overlap(&[0.7, 0.3], &[0.4, 0.6]) - 0.7).abs() < 1e-6);
    }
}
