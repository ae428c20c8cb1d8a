//! `DecodeTrace`: what happened in one run, per token and per pass. Serialises to the trace
//! JSON of DESIGN.md section 6.

use serde::{Deserialize, Serialize};

use super::exact::ExactRecord;
use super::sampling::Sampling;
use super::schedule::{Cell, Mode};

/// Per-token and per-pass record of one generation run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecodeTrace {
    /// Grid rows.
    pub grid_h: usize,
    /// Grid columns.
    pub grid_w: usize,
    /// Decoding mode.
    pub mode: Mode,
    /// Window asked for (the grid width for NTP).
    pub window: usize,
    /// Forward passes, prefill included.
    pub passes: usize,
    /// Passes plain next-token decoding would need.
    pub ntp_passes: usize,
    /// Tokens in raster order.
    pub tokens: Vec<u32>,
    /// Pass that produced each token (raster order).
    pub pass_of: Vec<usize>,
    /// Window each token was decoded under (raster order).
    pub window_of: Vec<usize>,
    /// Rejected drafts per token (raster order; zero outside the adaptive mode).
    pub rejections_of: Vec<u32>,
    /// Probability of each sampled token under the distribution it was drawn from.
    pub prob_of: Vec<f32>,
    /// Wall time of each pass in milliseconds.
    pub pass_ms: Vec<f64>,
    /// Inputs fed in each pass (both CFG halves count once).
    pub inputs_per_pass: Vec<usize>,
    /// Tokens produced by each pass.
    pub tokens_per_pass: Vec<usize>,
    /// Classifier-free guidance scale.
    pub cfg_scale: f32,
    /// Sampling rule.
    pub sampling: Sampling,
    /// RNG seed.
    pub seed: u64,
    /// Total decoding time in milliseconds (passes only, not image decoding).
    pub total_ms: f64,
    /// With attention capture: the share of each token's attention on what was written when
    /// it was decoded (the condition and the cells of earlier passes); empty without capture.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retained_mass_of: Vec<f32>,
    /// With attention capture, NTP runs only: the smallest window that keeps 95% of each
    /// token's attention (`zipar-studio locality`; row 0: 1).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needed_window_of: Vec<usize>,
    /// The exact mode's fates, draft passes and acceptance (absent for the other modes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<ExactRecord>,
}

impl DecodeTrace {
    /// An empty trace for an `h x w` grid.
    pub fn new(h: usize, w: usize, mode: Mode, window: usize) -> Self {
        let n = h * w;
        Self {
            grid_h: h,
            grid_w: w,
            mode,
            window,
            passes: 0,
            ntp_passes: n,
            tokens: vec![0; n],
            pass_of: vec![usize::MAX; n],
            window_of: vec![w; n],
            rejections_of: vec![0; n],
            prob_of: vec![0.0; n],
            pass_ms: Vec::new(),
            inputs_per_pass: Vec::new(),
            tokens_per_pass: Vec::new(),
            cfg_scale: 1.0,
            sampling: Sampling::Greedy,
            seed: 0,
            total_ms: 0.0,
            retained_mass_of: Vec::new(),
            needed_window_of: Vec::new(),
            exact: None,
        }
    }

    /// Records a produced token.
    pub fn record(&mut self, cell: Cell, token: u32, prob: f32, pass: usize) {
        let i = cell.row * self.grid_w + cell.col;
        self.tokens[i] = token;
        self.prob_of[i] = prob;
        self.pass_of[i] = pass;
    }

    /// Whether every cell has a token.
    pub fn is_complete(&self) -> bool {
        self.pass_of.iter().all(|&p| p != usize::MAX)
    }

    /// Fraction of passes saved against next-token decoding.
    pub fn pass_reduction(&self) -> f64 {
        1.0 - self.passes as f64 / self.ntp_passes.max(1) as f64
    }
}
