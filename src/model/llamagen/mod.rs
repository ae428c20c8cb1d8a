//! LlamaGen (Sun et al., "Autoregressive Model Beats Diffusion: Llama for Scalable Image
//! Generation", arXiv 2406.06525): the GPT and the VQ tokenizer's decoder.

pub mod config;
pub mod gpt;
pub mod rope2d;
pub mod vq;

pub use config::{GptConfig, VqConfig};
pub use gpt::Gpt;
pub use vq::VqDecoder;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};

use crate::decode::schedule::Layout;
use crate::model::{
    Condition, ImageArModel, ImageDecoder, ModelInput, PassLogits, RgbImage, RunOptions,
};
use crate::weights::{self, Manifest, WeightsError};

/// A LlamaGen GPT with its VQ decoder, loaded from a model directory.
#[derive(Debug)]
pub struct LlamaGen {
    /// The manifest it was loaded from.
    pub manifest: Manifest,
    /// Directory it was loaded from.
    pub dir: PathBuf,
    gpt: Gpt,
    vq: Arc<VqDecoder>,
}

impl LlamaGen {
    /// Loads the model directory `dir` onto `device` (f32 on the CPU, f16 elsewhere).
    pub fn load(dir: &Path, device: &Device) -> Result<Self, WeightsError> {
        let manifest = Manifest::read(dir)?;
        let dtype = if device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        };
        let gpt_path = dir.join(&manifest.gpt_weights);
        let vb = weights::var_builder(&gpt_path, dtype, device)?;
        let gpt = Gpt::load(&manifest.gpt, manifest.grid_h, manifest.grid_w, vb)
            .map_err(|e| weights::mismatch(&gpt_path, e))?;
        let vq_path = dir.join(&manifest.vq_weights);
        // The VQ decoder runs in f32 everywhere: it is small and its GroupNorms are sensitive.
        let vb = weights::var_builder(&vq_path, DType::F32, device)?;
        let vq = VqDecoder::load(&manifest.vq, vb).map_err(|e| weights::mismatch(&vq_path, e))?;
        Ok(Self {
            manifest,
            dir: dir.to_path_buf(),
            gpt,
            vq: Arc::new(vq),
        })
    }

    /// The GPT.
    pub fn gpt(&self) -> &Gpt {
        &self.gpt
    }

    /// The VQ decoder.
    pub fn vq(&self) -> &VqDecoder {
        &self.vq
    }
}

impl ImageArModel for LlamaGen {
    fn grid(&self) -> (usize, usize) {
        self.gpt.grid()
    }

    fn layout(&self) -> Layout {
        Layout::Raster
    }

    fn vocab_size(&self) -> usize {
        self.gpt.config().vocab_size
    }

    fn prefill(&mut self, cond: &Condition, opts: RunOptions) -> anyhow::Result<PassLogits> {
        self.gpt.prefill(cond, opts)
    }

    fn step(&mut self, inputs: &[ModelInput]) -> anyhow::Result<PassLogits> {
        self.gpt.step(inputs)
    }

    fn image_decoder(&self) -> Arc<dyn ImageDecoder> {
        Arc::new(GridDecoder {
            vq: self.vq.clone(),
            grid: self.gpt.grid(),
        })
    }
}

/// The VQ decoder bound to a grid size.
struct GridDecoder {
    vq: Arc<VqDecoder>,
    grid: (usize, usize),
}

impl ImageDecoder for GridDecoder {
    fn decode(&self, tokens: &[u32]) -> anyhow::Result<RgbImage> {
        Ok(self.vq.decode_rgb(tokens, self.grid.0, self.grid.1)?)
    }
}
