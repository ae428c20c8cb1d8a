//! Settings that persist between launches (eframe storage). Runtime state lives elsewhere.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::decode::{GenerateParams, Mode, Sampling};

/// What the central view shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ViewMode {
    /// The decoded image.
    Image,
    /// Cells coloured by the pass that produced them.
    PassMap,
    /// Cells coloured by the window they were decoded under.
    WindowMap,
    /// Rejected drafts per cell.
    Rejections,
    /// The pass map over the image.
    Overlay,
    /// Cells coloured by how many tokens their pass produced (rows that advanced together).
    Parallelism,
    /// Cells coloured by how many passes earlier than next-token decoding they were produced.
    Ahead,
    /// Exact mode: accepted draft, residual sample after a rejection, or plain sample.
    Fate,
    /// With attention recorded: each token's retained mass; hover a cell for its attention.
    Attention,
}

impl ViewMode {
    /// All modes, in menu order.
    pub const ALL: [ViewMode; 9] = [
        ViewMode::Image,
        ViewMode::PassMap,
        ViewMode::Parallelism,
        ViewMode::Ahead,
        ViewMode::WindowMap,
        ViewMode::Rejections,
        ViewMode::Fate,
        ViewMode::Attention,
        ViewMode::Overlay,
    ];

    /// Menu label.
    pub fn label(self) -> &'static str {
        match self {
            ViewMode::Image => "Image",
            ViewMode::PassMap => "Pass map",
            ViewMode::WindowMap => "Window map",
            ViewMode::Rejections => "Rejections",
            ViewMode::Overlay => "Overlay",
            ViewMode::Parallelism => "Parallelism",
            ViewMode::Ahead => "Ahead of NTP",
            ViewMode::Fate => "Fates",
            ViewMode::Attention => "Attention",
        }
    }

    /// What the view shows (tooltip).
    pub fn hint(self) -> &'static str {
        match self {
            ViewMode::Image => "the decoded image (dimmed where the replay has not reached)",
            ViewMode::PassMap => {
                "each cell coloured by the forward pass that produced it; alternate passes are \
                 shaded darker, so the cells of one pass show as one stripe"
            }
            ViewMode::WindowMap => {
                "how many tokens of the row above were written when the cell's row started"
            }
            ViewMode::Rejections => "adaptive and exact modes: drafts rejected at each cell",
            ViewMode::Overlay => "the pass map over the image",
            ViewMode::Parallelism => {
                "how many tokens the cell's pass produced: rows that advanced together share a colour"
            }
            ViewMode::Ahead => {
                "how many passes earlier than next-token decoding the cell was produced"
            }
            ViewMode::Attention => {
                "with \"Record attention\" on: each cell coloured by the share of its attention \
                 on what was written when it was decoded; hover a cell to see where it looked, \
                 with the cells written at that moment outlined"
            }
            ViewMode::Fate => {
                "exact mode: green, a draft that passed its test against the full-context \
                 distribution; red, a residual sample after a rejected draft; grey, a plain \
                 sample (no draft)"
            }
        }
    }
}

/// Persisted user settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Last prompt.
    pub prompt: String,
    /// Class chosen in the picker (overrides the prompt match until the prompt changes).
    pub class_override: Option<u32>,
    /// Decoding mode.
    pub mode: Mode,
    /// ZipAR window.
    pub window: usize,
    /// CFG scale.
    pub cfg: f32,
    /// Temperature.
    pub temperature: f32,
    /// Top-k (0 = off).
    pub top_k: usize,
    /// Top-p (1 = off).
    pub top_p: f32,
    /// Seed.
    pub seed: u64,
    /// Greedy decoding.
    pub greedy: bool,
    /// Hide never-written cache slots from attention.
    pub mask_unwritten: bool,
    /// Record each token's attention for the Attention view.
    pub record_attention: bool,
    /// Attention view: the layer shown (`None`: the mean of the layers); its heads are
    /// recorded one by one.
    pub attention_layer: Option<usize>,
    /// Attention view: the head shown in that layer (`None`: the mean of its heads).
    pub attention_head: Option<usize>,
    /// Model folder; `None` = the built-in model.
    pub model_dir: Option<PathBuf>,
    /// Device name.
    pub device: String,
    /// Central view.
    pub view: ViewMode,
    /// Folder for exports.
    pub export_dir: Option<PathBuf>,
    /// The model folder whose recommended decoding settings were last applied; a model
    /// loaded for the first time gets its own, later loads keep what the user set.
    pub defaults_applied_for: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            prompt: "red apple".into(),
            class_override: None,
            mode: Mode::Zipar,
            window: 4,
            cfg: 2.0,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            greedy: false,
            mask_unwritten: false,
            record_attention: false,
            attention_layer: None,
            attention_head: None,
            model_dir: None,
            device: "cpu".into(),
            view: ViewMode::PassMap,
            export_dir: None,
            defaults_applied_for: None,
        }
    }
}

impl Settings {
    /// Decoding parameters for a run in `mode`.
    pub fn params(&self, mode: Mode) -> GenerateParams {
        GenerateParams {
            mode,
            window: self.window,
            cfg_scale: self.cfg,
            sampling: Sampling::from_flags(self.greedy, self.temperature, self.top_k, self.top_p),
            seed: self.seed,
            mask_unwritten: self.mask_unwritten,
        }
    }

    /// Takes a model's recommended decoding settings (window clamped to `windows`).
    pub fn apply_defaults(
        &mut self,
        d: &crate::weights::SamplingDefaults,
        windows: &std::ops::RangeInclusive<usize>,
    ) {
        let r = d.resolve();
        self.cfg = r.cfg;
        self.temperature = r.temperature;
        self.top_k = r.top_k;
        self.top_p = r.top_p;
        self.window = r.window.clamp(*windows.start(), *windows.end());
        self.mask_unwritten = r.mask_unwritten;
        self.greedy = false;
    }

    /// Where exports go by default: the user's pictures folder, else the home folder.
    pub fn export_folder(&self) -> PathBuf {
        if let Some(d) = &self.export_dir {
            return d.clone();
        }
        directories::UserDirs::new()
            .and_then(|u| u.picture_dir().map(|p| p.join("ZipAR Studio")))
            .or_else(|| directories::UserDirs::new().map(|u| u.home_dir().to_path_buf()))
            .unwrap_or_else(|| PathBuf::from("."))
    }
}
