//! What the UI knows about one run, built from worker events (no tensors here).

use std::time::{Duration, Instant};

use crate::decode::exact::Fate;
use crate::decode::{DecodeTrace, GenerateParams, Mode, PassReport};
use crate::model::palette::CodePalette;
use crate::model::{RgbImage, TokenAttention};
use crate::worker::JobId;

/// Which attention the Attention view shows: a layer (`None`: the mean of the layers) and,
/// in the layer whose heads were recorded, a head (`None`: the mean of the heads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AttentionPick {
    /// Layer.
    pub layer: Option<usize>,
    /// Head.
    pub head: Option<usize>,
}

/// Share of its attention a token's window must keep (the needed window's threshold).
pub const NEEDED_MASS: f32 = 0.95;

/// A run's Attention-view values for one pick, per cell (raster order).
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionMaps {
    /// What they were computed for.
    pub pick: AttentionPick,
    /// Share of the token's attention on what was final when its query ran.
    pub retained: Vec<Option<f32>>,
    /// NTP runs: the window that keeps [`NEEDED_MASS`] of the token's attention.
    pub needed: Vec<Option<usize>>,
}

/// Where a run is.
#[derive(Debug, Clone, PartialEq)]
pub enum RunStatus {
    /// Queued, not started.
    Queued,
    /// Passes are arriving.
    Running,
    /// Finished.
    Done,
    /// Stopped by the user.
    Cancelled,
    /// Failed with this message.
    Failed(String),
}

/// The live and final state of one generation.
#[derive(Debug, Clone)]
pub struct RunView {
    /// Job id.
    pub job: JobId,
    /// Short label ("ZipAR s=4").
    pub label: String,
    /// What was asked for.
    pub params: GenerateParams,
    /// Grid (rows, columns).
    pub grid: (usize, usize),
    /// Each row ends with an end-of-row token (Lumina-mGPT, Emu3-Gen): the grid shows their
    /// column.
    pub end_of_row: bool,
    /// Passes the schedule planned (an adaptive run may take more: see [`RunView::passes`]).
    pub planned_passes: usize,
    /// Token per cell (raster order).
    pub tokens: Vec<Option<u32>>,
    /// Pass per cell.
    pub pass_of: Vec<Option<usize>>,
    /// Window per cell.
    pub window_of: Vec<Option<usize>>,
    /// Rejected drafts per cell.
    pub rejections: Vec<u32>,
    /// Probability of each sampled token.
    pub probs: Vec<f32>,
    /// Exact mode: how each cell became final.
    pub fate_of: Vec<Option<Fate>>,
    /// With attention recorded: each token's attention over the condition's slots and then
    /// the image positions.
    pub attention_of: Vec<Option<TokenAttention>>,
    /// Condition slots at the start of each `attention_of` row.
    pub cond_len: usize,
    /// Time of each pass (ms).
    pub pass_ms: Vec<f64>,
    /// Tokens produced by each pass.
    pub tokens_per_pass: Vec<usize>,
    /// When it was asked for.
    pub queued_at: Instant,
    /// When the worker started it.
    pub started: Option<Instant>,
    /// Wall time so far (or in all).
    pub elapsed: Duration,
    /// Status.
    pub status: RunStatus,
    /// Final trace.
    pub trace: Option<DecodeTrace>,
    /// Final image.
    pub image: Option<RgbImage>,
    /// The partial image: each produced token's thumbnail (see [`CodePalette`]).
    pub preview: Option<RgbImage>,
    /// Bumped whenever `image` or `preview` changes, so textures are re-uploaded.
    pub image_version: u64,
}

impl RunView {
    /// A queued run.
    pub fn new(job: JobId, label: String, params: GenerateParams) -> Self {
        Self {
            job,
            label,
            params,
            grid: (0, 0),
            end_of_row: false,
            planned_passes: 0,
            tokens: Vec::new(),
            pass_of: Vec::new(),
            window_of: Vec::new(),
            rejections: Vec::new(),
            probs: Vec::new(),
            fate_of: Vec::new(),
            attention_of: Vec::new(),
            cond_len: 0,
            pass_ms: Vec::new(),
            tokens_per_pass: Vec::new(),
            queued_at: Instant::now(),
            started: None,
            elapsed: Duration::ZERO,
            status: RunStatus::Queued,
            trace: None,
            image: None,
            preview: None,
            image_version: 0,
        }
    }

    /// The pass that fed the end-of-row token closing row `r`: the one that drew the first
    /// token of row `r + 1` (the separator goes in with it). `None` for the last row, whose
    /// end-of-row token is never needed, before that pass, and in the exact mode, whose
    /// chains may feed it earlier with the drafts (the trace does not record when).
    pub fn end_of_row_pass(&self, r: usize) -> Option<usize> {
        let (h, w) = self.grid;
        if !self.end_of_row || r + 1 >= h || self.params.mode == crate::decode::Mode::Exact {
            return None;
        }
        self.pass_of.get((r + 1) * w).copied().flatten()
    }

    /// The run's pass count, the one number every view uses: the actual count once the run
    /// has finished (adaptive rejections add passes to the plan), else the plan, or the passes
    /// done when they already exceed it.
    pub fn passes(&self) -> usize {
        match &self.trace {
            Some(t) => t.passes,
            None => self.planned_passes.max(self.passes_done()),
        }
    }

    /// The most tokens one pass produced.
    pub fn max_tokens_per_pass(&self) -> usize {
        self.tokens_per_pass.iter().copied().max().unwrap_or(0)
    }

    /// How many passes earlier than next-token decoding cell `i` was produced (NTP produces
    /// cell `i` of the raster order in pass `i`); 0 for a cell not produced yet.
    pub fn passes_ahead(&self, i: usize) -> usize {
        match self.pass_of.get(i) {
            Some(Some(p)) => i.saturating_sub(*p),
            _ => 0,
        }
    }

    /// The largest [`RunView::passes_ahead`] over the grid.
    pub fn max_passes_ahead(&self) -> usize {
        (0..self.pass_of.len())
            .map(|i| self.passes_ahead(i))
            .max()
            .unwrap_or(0)
    }

    /// Passes done so far.
    pub fn passes_done(&self) -> usize {
        self.pass_ms.len()
    }

    /// Whether passes are still to come.
    pub fn is_active(&self) -> bool {
        matches!(self.status, RunStatus::Queued | RunStatus::Running)
    }

    /// The generation started (`at`: by the worker's clock, which the UI may learn later).
    pub fn on_started(&mut self, planned_passes: usize, grid: (usize, usize), at: Instant) {
        let n = grid.0 * grid.1;
        self.grid = grid;
        self.planned_passes = planned_passes;
        self.tokens = vec![None; n];
        self.pass_of = vec![None; n];
        self.window_of = vec![None; n];
        self.rejections = vec![0; n];
        self.probs = vec![0.0; n];
        self.fate_of = vec![None; n];
        self.attention_of = vec![None; n];
        self.started = Some(at);
        self.status = RunStatus::Running;
    }

    /// One pass arrived; with a palette, its tokens are painted into the preview.
    pub fn on_pass(&mut self, r: &PassReport, palette: Option<&CodePalette>) {
        let (h, w) = self.grid;
        if h * w == 0 {
            return;
        }
        for (k, &(cell, token, prob)) in r.produced.iter().enumerate() {
            let i = cell.row * w + cell.col;
            if i >= self.tokens.len() {
                continue;
            }
            self.fate_of[i] = r.fates.get(k).copied();
            self.attention_of[i] = r.attention.get(k).cloned();
            if i == 0
                && let Some(a) = &self.attention_of[0]
            {
                // The prefill's pass spans exactly the condition's slots.
                self.cond_len = a.layers.first().map_or(0, Vec::len);
            }
            self.tokens[i] = Some(token);
            self.pass_of[i] = Some(r.index);
            self.probs[i] = prob;
            // The row's lag behind the row above, known when its first token arrives.
            let window = if cell.row == 0 {
                w
            } else if cell.col == 0 {
                (0..w)
                    .filter(
                        |&c| matches!(self.pass_of[(cell.row - 1) * w + c], Some(p) if p < r.index),
                    )
                    .count()
            } else {
                self.window_of[cell.row * w].unwrap_or(w)
            };
            self.window_of[i] = Some(window);
        }
        if let Some(p) = palette
            && self.image.is_none()
        {
            let preview = self.preview.get_or_insert_with(|| p.blank(h, w));
            for &(cell, token, _) in &r.produced {
                p.paint(preview, cell.row, cell.col, token);
            }
            self.image_version += 1;
        }
        self.pass_ms.push(r.elapsed.as_secs_f64() * 1e3);
        self.tokens_per_pass.push(r.produced.len());
        if let Some(s) = self.started {
            self.elapsed = s.elapsed();
        }
    }

    /// The run finished: the trace is the authority from now on, and the worker's `wall`
    /// time replaces the UI's estimate (which starts when the UI sees the run start, up to a
    /// frame late, and could read less than the decode time).
    pub fn on_finished(&mut self, trace: DecodeTrace, image: RgbImage, wall: Duration) {
        self.tokens = trace.tokens.iter().map(|&t| Some(t)).collect();
        self.pass_of = trace.pass_of.iter().map(|&p| Some(p)).collect();
        self.window_of = trace.window_of.iter().map(|&x| Some(x)).collect();
        self.rejections = trace.rejections_of.clone();
        self.probs = trace.prob_of.clone();
        self.fate_of = match &trace.exact {
            Some(rec) => rec.fate_of.iter().map(|&f| Some(f)).collect(),
            None => vec![None; trace.tokens.len()],
        };
        self.pass_ms = trace.pass_ms.clone();
        self.tokens_per_pass = trace.tokens_per_pass.clone();
        self.elapsed = wall;
        self.trace = Some(trace);
        self.image = Some(image);
        self.preview = None;
        self.image_version += 1;
        self.status = RunStatus::Done;
    }

    /// Whether the run's output has NTP's law (NTP itself, or the exact mode).
    pub fn is_lossless(&self) -> bool {
        let cells = self.grid.0 * self.grid.1;
        match self.params.mode {
            Mode::Ntp | Mode::Exact => true,
            // A window that leaves nothing to decode in parallel (s = w + 1 on an end-of-row
            // layout) is next-token decoding: one token a pass, each with its whole context.
            Mode::Zipar => cells > 0 && self.planned_passes == cells,
            Mode::Adaptive => false,
        }
    }

    /// Exact mode, finished: (accepted, tested) drafts.
    pub fn drafts(&self) -> Option<(usize, usize)> {
        let rec = self.trace.as_ref()?.exact.as_ref()?;
        Some((
            rec.accepted_per_pass.iter().sum(),
            rec.tested_per_pass.iter().sum(),
        ))
    }

    /// Each cell's final pass (`usize::MAX` where there is none yet).
    fn final_passes(&self) -> Vec<usize> {
        self.pass_of
            .iter()
            .map(|p| p.unwrap_or(usize::MAX))
            .collect()
    }

    fn retained_with(&self, i: usize, pick: AttentionPick, pass_of: &[usize]) -> Option<f32> {
        let token = self.attention_of.get(i)?.as_ref()?;
        let att = token.select(pick.layer, pick.head)?;
        Some(crate::locality::retained_at(
            &att,
            self.cond_len,
            pass_of,
            token.pass,
        ))
    }

    /// The share of cell `i`'s attention on the condition and on the cells final before the
    /// pass its query ran in (for a draft, the pass that drew it).
    pub fn retained_mass(
        &self,
        i: usize,
        layer: Option<usize>,
        head: Option<usize>,
    ) -> Option<f32> {
        self.retained_with(i, AttentionPick { layer, head }, &self.final_passes())
    }

    /// The Attention view's per-cell values for one pick, computed once per frame.
    pub fn attention_maps(&self, pick: AttentionPick) -> AttentionMaps {
        let n = self.attention_of.len();
        let pass_of = self.final_passes();
        AttentionMaps {
            pick,
            retained: (0..n)
                .map(|i| self.retained_with(i, pick, &pass_of))
                .collect(),
            needed: (0..n)
                .map(|i| self.needed_window(i, pick.layer, pick.head, NEEDED_MASS))
                .collect(),
        }
    }

    /// The window cell `i` needs to keep `threshold` of its attention (NTP runs, whose
    /// tokens saw the full context; see `zipar-studio locality`).
    pub fn needed_window(
        &self,
        i: usize,
        layer: Option<usize>,
        head: Option<usize>,
        threshold: f32,
    ) -> Option<usize> {
        if self.params.mode != Mode::Ntp {
            return None;
        }
        let att = self.attention_of.get(i)?.as_ref()?.select(layer, head)?;
        let w = self.grid.1;
        let cell = crate::decode::Cell::new(i / w.max(1), i % w.max(1));
        Some(if cell.row == 0 {
            1
        } else {
            crate::locality::cell_locality(&att, self.cond_len, cell, w, threshold).needed_window
        })
    }

    /// Decoding time of the passes (ms).
    pub fn decode_ms(&self) -> f64 {
        self.pass_ms.iter().sum()
    }

    /// Tokens per second over the passes so far.
    pub fn tokens_per_s(&self) -> f64 {
        let n: usize = self.tokens_per_pass.iter().sum();
        let ms = self.decode_ms();
        if ms > 0.0 { n as f64 / (ms / 1e3) } else { 0.0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zipar_window_with_nothing_in_parallel_is_lossless() {
        let params = |mode, window| GenerateParams {
            mode,
            window,
            ..GenerateParams::default()
        };
        // end-of-row layout, 3 x 4: s = 5 takes 12 passes (next-token decoding), s = 2 takes 6
        let mut ntp_like = RunView::new(1, "ZipAR s=5".into(), params(Mode::Zipar, 5));
        ntp_like.on_started(12, (3, 4), Instant::now());
        assert!(ntp_like.is_lossless());
        let mut zipar = RunView::new(2, "ZipAR s=2".into(), params(Mode::Zipar, 2));
        zipar.on_started(6, (3, 4), Instant::now());
        assert!(!zipar.is_lossless());
        // queued, not started: not known yet
        assert!(!RunView::new(3, "q".into(), params(Mode::Zipar, 5)).is_lossless());
        assert!(RunView::new(4, "n".into(), params(Mode::Ntp, 5)).is_lossless());
    }
}
