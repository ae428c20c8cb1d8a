//! `zipar-studio locality`: does the model's attention justify ZipAR? The paper's Figures 3
//! and 5, measured on the model at hand.
//!
//! For an NTP sample, one teacher-forced raster pass with attention capture gives, for every
//! cell, the attention of the query that predicts it (the input at the cell's predecessor,
//! full causal context), averaged over heads and layers. Then:
//! - **Figure 3**: the share of that attention on the same column of the row above, against
//!   the share on the previous token in raster order.
//! - **Figure 5**: ZipAR with window s decodes cell (r, c) while row r holds columns < c, row
//!   r-1 columns < c + s, row r-2 columns < c + 2s, and so on (capped at the width). The
//!   *retained mass* at s is the share of the attention that falls on the condition and on
//!   those cells; the *needed window* is the smallest s whose retained mass reaches the
//!   threshold (0.95 by default). Row 0 has the whole context at any window and is left out.

use serde::Serialize;

use crate::colormap;
use crate::decode::{Cell, Flow, GenerateParams, Mode, generate};
use crate::eval::teacher_forced;
use crate::model::{Condition, ImageArModel, PassAttention, RgbImage, TokenAttention};

/// What one cell's attention says about locality.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CellLocality {
    /// The cell.
    pub cell: Cell,
    /// Retained mass at window s = 1..=w (index s - 1).
    pub retained: Vec<f32>,
    /// The smallest window whose retained mass reaches the threshold.
    pub needed_window: usize,
    /// Attention on the same column of the row above.
    pub above: f32,
    /// Attention on the previous token in raster order.
    pub previous: f32,
    /// Attention on the condition's slots.
    pub condition: f32,
}

/// Whether image position `q` is written when ZipAR with window `s` decodes `cell`.
fn written(q: usize, cell: Cell, w: usize, s: usize) -> bool {
    let (r, c) = (q / w, q % w);
    if r == cell.row {
        return c < cell.col;
    }
    let k = cell.row - r;
    c < (cell.col + k * s).min(w)
}

/// Locality of one cell from `att`: its predicting query's probabilities over the condition's
/// `cond_len` slots and then the image positions before it.
pub fn cell_locality(
    att: &[f32],
    cond_len: usize,
    cell: Cell,
    w: usize,
    threshold: f32,
) -> CellLocality {
    let p = cell.row * w + cell.col;
    let cond: f32 = att[..cond_len.min(att.len())].iter().sum();
    let image = |q: usize| att.get(cond_len + q).copied().unwrap_or(0.0);
    let total: f32 = att.iter().sum::<f32>().max(f32::MIN_POSITIVE);
    let retained: Vec<f32> = (1..=w)
        .map(|s| {
            let kept: f32 = (0..p).filter(|&q| written(q, cell, w, s)).map(image).sum();
            (cond + kept) / total
        })
        .collect();
    let needed_window = retained
        .iter()
        .position(|&m| m >= threshold)
        .map_or(w, |i| i + 1);
    CellLocality {
        cell,
        retained,
        needed_window,
        above: if cell.row > 0 { image(p - w) } else { 0.0 },
        previous: if p > 0 { image(p - 1) } else { 0.0 },
        condition: cond / total,
    }
}

/// The share of `att` (over the condition's slots, then the image positions) on the condition
/// and on the cells final before pass `moment` (`pass_of`: each cell's final pass).
pub fn retained_at(att: &[f32], cond_len: usize, pass_of: &[usize], moment: usize) -> f32 {
    let total: f32 = att.iter().sum::<f32>().max(f32::MIN_POSITIVE);
    let cond: f32 = att.iter().take(cond_len).sum();
    let kept: f32 = att
        .iter()
        .skip(cond_len)
        .enumerate()
        .filter(|(q, _)| pass_of.get(*q).is_some_and(|&p| p < moment))
        .map(|(_, a)| a)
        .sum();
    (cond + kept) / total
}

/// For a run with attention captured (one per cell, raster order): the share of each token's
/// attention on what was written when its query ran.
pub fn retained_in_run(
    attention_of: &[TokenAttention],
    cond_len: usize,
    pass_of: &[usize],
) -> Vec<f32> {
    attention_of
        .iter()
        .map(|a| retained_at(&a.mean(), cond_len, pass_of, a.pass))
        .collect()
}

/// The needed window (threshold 0.95) of every cell of an NTP run from its captured attention.
pub fn needed_windows(attention_of: &[TokenAttention], cond_len: usize, w: usize) -> Vec<usize> {
    attention_of
        .iter()
        .map(TokenAttention::mean)
        .enumerate()
        .map(|(i, att)| {
            let cell = Cell::new(i / w, i % w);
            if cell.row == 0 {
                1
            } else {
                cell_locality(&att, cond_len, cell, w, 0.95).needed_window
            }
        })
        .collect()
}

/// The attention that predicts each cell of a teacher-forced pass (the prefill predicts cell
/// 0, the input at position p - 1 cell p), averaged over the layers.
pub fn predicting_attention(prefill: &PassAttention, pass: &PassAttention) -> Vec<Vec<f32>> {
    let mean = |a: &PassAttention, i: usize| TokenAttention::of_input(a, i, 0).mean();
    let mut out = vec![mean(prefill, prefill.slots.len() - 1)];
    out.extend((0..pass.slots.len()).map(|i| mean(pass, i)));
    out
}

/// Summary over many cells.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LocalitySummary {
    /// Cells measured (rows 1 and below).
    pub cells: usize,
    /// Retained-mass threshold of the needed window.
    pub threshold: f32,
    /// Mean attention on the same column of the row above (Figure 3).
    pub mean_above: f64,
    /// Mean attention on the previous token in raster order (Figure 3).
    pub mean_previous: f64,
    /// Mean attention on the condition's slots (always written).
    pub mean_condition: f64,
    /// Cells per needed window s = 1..=w (index s - 1).
    pub needed_histogram: Vec<usize>,
    /// The smallest window that covers 90% of the cells.
    pub window_for_90: usize,
    /// Mean retained mass at s = 1..=w.
    pub mean_retained: Vec<f64>,
    /// Mean attention by offset from the cell: rows -`rows_up`..=0 (top first), columns
    /// -(w-1)..=(w-1); NaN where no earlier cell sits at that offset.
    pub mean_by_offset: Vec<Vec<f64>>,
}

/// Rows above the cell kept in [`LocalitySummary::mean_by_offset`].
pub const ROWS_UP: usize = 3;

/// Summarises cells (rows >= 1) with their attention rows (as from [`predicting_attention`]).
pub fn summarize(
    cells: &[(CellLocality, Vec<f32>)],
    cond_len: usize,
    w: usize,
    threshold: f32,
) -> LocalitySummary {
    let n = cells.len().max(1) as f64;
    let mut hist = vec![0usize; w];
    let mut retained = vec![0f64; w];
    let (mut above, mut previous, mut condition) = (0f64, 0f64, 0f64);
    let mut sums = vec![vec![0f64; 2 * w - 1]; ROWS_UP + 1];
    let mut counts = vec![vec![0usize; 2 * w - 1]; ROWS_UP + 1];
    for (l, att) in cells {
        hist[l.needed_window - 1] += 1;
        for (m, r) in retained.iter_mut().zip(&l.retained) {
            *m += f64::from(*r) / n;
        }
        above += f64::from(l.above) / n;
        previous += f64::from(l.previous) / n;
        condition += f64::from(l.condition) / n;
        let p = l.cell.row * w + l.cell.col;
        for q in 0..p {
            let (r, c) = (q / w, q % w);
            let dr = l.cell.row - r;
            if dr > ROWS_UP {
                continue;
            }
            let dc = c + w - 1 - l.cell.col;
            sums[ROWS_UP - dr][dc] += f64::from(att.get(cond_len + q).copied().unwrap_or(0.0));
            counts[ROWS_UP - dr][dc] += 1;
        }
    }
    let mut cum = 0;
    let total: usize = hist.iter().sum();
    let window_for_90 = hist
        .iter()
        .position(|&k| {
            cum += k;
            cum as f64 >= 0.9 * total as f64
        })
        .map_or(w, |i| i + 1);
    let mean_by_offset = sums
        .iter()
        .zip(&counts)
        .map(|(s, c)| {
            s.iter()
                .zip(c)
                .map(|(&s, &c)| if c > 0 { s / c as f64 } else { f64::NAN })
                .collect()
        })
        .collect();
    LocalitySummary {
        cells: cells.len(),
        threshold,
        mean_above: above,
        mean_previous: previous,
        mean_condition: condition,
        needed_histogram: hist,
        window_for_90,
        mean_retained: retained,
        mean_by_offset,
    }
}

/// Draws NTP samples (seeds `0..samples` per condition), captures their teacher-forced
/// attention, and summarises locality over every cell of rows 1 and below.
pub fn measure(
    model: &mut dyn ImageArModel,
    conds: &[Condition],
    base: GenerateParams,
    samples: u64,
    threshold: f32,
    tick: &mut dyn FnMut(),
) -> anyhow::Result<LocalitySummary> {
    let (h, w) = model.grid();
    anyhow::ensure!(
        model.layout() == crate::decode::Layout::Raster,
        "the locality measure supports the raster layout only"
    );
    let mut cells = Vec::new();
    let mut cond_len = 0;
    let result = (|| -> anyhow::Result<()> {
        for cond in conds {
            for seed in 0..samples {
                let params = GenerateParams {
                    mode: Mode::Ntp,
                    seed,
                    ..base
                };
                let trace = generate(model, cond, &params, &mut |_| Flow::Continue)?;
                anyhow::ensure!(
                    model.set_attention_capture(Some(0)),
                    "this model cannot record its attention"
                );
                let forced = teacher_forced_attention(model, cond, &trace.tokens, base.cfg_scale);
                model.set_attention_capture(None);
                let (prefill, pass) = forced?;
                cond_len = pass.cond_len;
                let rows = predicting_attention(&prefill, &pass);
                for (p, att) in rows.into_iter().enumerate().skip(w).take((h - 1) * w) {
                    let cell = Cell::new(p / w, p % w);
                    cells.push((cell_locality(&att, cond_len, cell, w, threshold), att));
                }
                tick();
            }
        }
        Ok(())
    })();
    model.set_attention_capture(None);
    result?;
    Ok(summarize(&cells, cond_len, w, threshold))
}

/// The prefill's and the teacher-forced pass's attention for `tokens`.
fn teacher_forced_attention(
    model: &mut dyn ImageArModel,
    cond: &Condition,
    tokens: &[u32],
    cfg_scale: f32,
) -> anyhow::Result<(PassAttention, PassAttention)> {
    // teacher_forced runs the prefill and one step; capture keeps only the last pass, so the
    // prefill is run once more on its own to read its attention.
    let opts = crate::model::RunOptions {
        cfg: cfg_scale != 1.0,
        mask_unwritten: false,
    };
    model.prefill(cond, opts)?;
    let prefill = model
        .take_attention()
        .ok_or_else(|| anyhow::anyhow!("the model recorded no attention"))?;
    teacher_forced(model, cond, tokens, cfg_scale != 1.0)?;
    let pass = model
        .take_attention()
        .ok_or_else(|| anyhow::anyhow!("the model recorded no attention"))?;
    Ok((prefill, pass))
}

/// The needed-window histogram as a bar chart (one bar per window, viridis by window).
pub fn histogram_image(s: &LocalitySummary) -> RgbImage {
    let (bar, gap, height) = (24usize, 4usize, 160usize);
    let n = s.needed_histogram.len().max(1);
    let width = n * (bar + gap) + gap;
    let mut pixels = vec![255u8; width * height * 3];
    let max = s.needed_histogram.iter().copied().max().unwrap_or(1).max(1) as f32;
    for (i, &k) in s.needed_histogram.iter().enumerate() {
        let top = height - ((k as f32 / max) * (height - 4) as f32).round() as usize;
        let color = colormap::viridis(i as f32 / (n - 1).max(1) as f32);
        for y in top..height {
            for x in gap + i * (bar + gap)..gap + i * (bar + gap) + bar {
                pixels[(y * width + x) * 3..(y * width + x) * 3 + 3].copy_from_slice(&color);
            }
        }
    }
    RgbImage {
        width,
        height,
        pixels,
    }
}

/// The mean attention by offset from the cell as a heatmap (viridis, log scale; the cell
/// itself white, offsets with no earlier cell grey), `cell` pixels per offset.
pub fn heatmap_image(s: &LocalitySummary, cell: usize) -> RgbImage {
    let rows = s.mean_by_offset.len();
    let cols = s.mean_by_offset.first().map_or(0, Vec::len);
    let (width, height) = (cols * cell, rows * cell);
    let values: Vec<f64> = s
        .mean_by_offset
        .iter()
        .flatten()
        .copied()
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let hi = values
        .iter()
        .copied()
        .fold(f64::MIN_POSITIVE, f64::max)
        .ln();
    let lo = values
        .iter()
        .copied()
        .fold(f64::MAX, f64::min)
        .ln()
        .max(hi - 9.0);
    let mut pixels = vec![0u8; width * height * 3];
    for y in 0..height {
        for x in 0..width {
            let (r, c) = (y / cell, x / cell);
            let v = s.mean_by_offset[r][c];
            let color = if r == rows - 1 && c == cols / 2 {
                [255, 255, 255]
            } else if !v.is_finite() {
                [90, 90, 90]
            } else {
                let t = if hi > lo {
                    (v.max(1e-30).ln() - lo) / (hi - lo)
                } else {
                    1.0
                };
                colormap::viridis(t.clamp(0.0, 1.0) as f32)
            };
            pixels[(y * width + x) * 3..(y * width + x) * 3 + 3].copy_from_slice(&color);
        }
    }
    RgbImage {
        width,
        height,
        pixels,
    }
}

/// The summary as text.
pub fn table(s: &LocalitySummary) -> String {
    let mut out = format!(
        "{} cells; mean attention on the same column of the row above {:.3}, on the previous \
         token {:.3}, on the condition {:.3}\n",
        s.cells, s.mean_above, s.mean_previous, s.mean_condition
    );
    out.push_str(&format!(
        "needed window (retained mass >= {:.2}); 90% of cells need at most {}\n",
        s.threshold, s.window_for_90
    ));
    out.push_str("window  cells  share   mean retained mass\n");
    let total = s.needed_histogram.iter().sum::<usize>().max(1) as f64;
    for (i, (&k, m)) in s.needed_histogram.iter().zip(&s.mean_retained).enumerate() {
        out.push_str(&format!(
            "{:>6}  {:>5}  {:>5.3}   {:.4}\n",
            i + 1,
            k,
            k as f64 / total,
            m
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retained_mass_follows_the_zipar_staircase() {
        // 4 wide; cell (2, 1): row 2 holds column 0, row 1 columns < 1 + s, row 0 < 1 + 2s.
        let w = 4;
        let cell = Cell::new(2, 1);
        let p = 2 * w + 1;
        // One condition slot with mass 0.1; the rest spread over the 9 earlier cells.
        let mut att = vec![0.1];
        att.extend(vec![0.1; p]);
        let l = cell_locality(&att, 1, cell, w, 0.95);
        // s = 1: row 2 col 0, row 1 cols 0-1, row 0 cols 0-2: 6 cells + condition.
        assert!((l.retained[0] - 0.7).abs() < 1e-6, "{:?}", l.retained);
        // s = 2: row 1 cols 0-2, row 0 all: 1 + 3 + 4 = 8 cells.
        assert!((l.retained[1] - 0.9).abs() < 1e-6);
        // s = 3: everything.
        assert!((l.retained[2] - 1.0).abs() < 1e-6);
        assert_eq!(l.needed_window, 3);
        assert!((l.above - 0.1).abs() < 1e-6 && (l.previous - 0.1).abs() < 1e-6);
    }

    #[test]
    fn attention_on_the_cell_above_needs_window_one() {
        let w = 4;
        let cell = Cell::new(1, 2);
        let mut att = vec![0.0; 1 + 6];
        att[1 + 2] = 1.0; // (0, 2): the same column, row above
        let l = cell_locality(&att, 1, cell, w, 0.95);
        assert_eq!(l.needed_window, 1);
        assert_eq!(l.above, 1.0);
        assert_eq!(l.previous, 0.0);
        // All on the last cell of the row above: needed s with 2 + s > 3, so s = 2.
        let mut att = vec![0.0; 1 + 6];
        att[1 + 3] = 1.0;
        assert_eq!(cell_locality(&att, 1, cell, w, 0.95).needed_window, 2);
        let s = summarize(&[(cell_locality(&att, 1, cell, w, 0.95), att)], 1, w, 0.95);
        assert_eq!(s.needed_histogram, vec![0, 1, 0, 0]);
        assert_eq!(s.window_for_90, 2);
        // Offset (-1, +1) holds it; the centre row's later columns have no cells.
        assert_eq!(s.mean_by_offset[ROWS_UP - 1][w - 1 + 1], 1.0);
        assert!(s.mean_by_offset[ROWS_UP][w - 1 + 1].is_nan());
    }
}
