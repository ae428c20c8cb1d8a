//! LlamaGen (Sun et al., "Autoregressive Model Beats Diffusion: Llama for Scalable Image
//! Generation", arXiv 2406.06525): the GPT and the VQ tokenizer's decoder.

pub mod config;
pub mod gpt;
pub mod manifest;
pub mod rope2d;
pub mod vq;

pub use config::{Family, GptConfig, VqConfig, VqStyle};
pub use gpt::{Gpt, Session};
pub use manifest::Manifest;
pub use vq::VqDecoder;

use crate::model::t5::TextEncoder;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};

use crate::decode::schedule::Layout;
use crate::model::{
    Condition, ImageArModel, ImageDecoder, ModelInput, PassLogits, RgbImage, RunOptions,
};
use crate::weights::{self, WeightsError, human_bytes};

/// A LlamaGen GPT with its VQ decoder, loaded from a model directory.
#[derive(Debug)]
pub struct LlamaGen {
    /// The manifest it was loaded from.
    pub manifest: Manifest,
    /// Directory it was loaded from.
    pub dir: PathBuf,
    gpt: Gpt,
    vq: Arc<VqDecoder>,
    /// The caption encoder of a text-to-image model whose manifest names one.
    text: Option<TextEncoder>,
    /// The run in progress.
    session: Option<Session>,
    /// Attention capture asked for (the layer whose heads are kept), for this and later runs.
    capture: Option<usize>,
}

/// The GPT's compute type: f32 on the CPU, bf16 on CUDA, f16 on Metal.
pub fn gpt_dtype(device: &Device) -> DType {
    match device {
        Device::Cpu => DType::F32,
        Device::Cuda(_) => DType::BF16,
        Device::Metal(_) => DType::F16,
    }
}

/// What loading a model folder will read and roughly take in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadSummary {
    /// Size of the GPT and VQ weight files together.
    pub weight_bytes: u64,
    /// One line for the user: "gpt.safetensors 1.4 GB + vq.safetensors 288 MB: GPT 343.2M
    /// parameters, about 686.4 MB as BF16 on cuda".
    pub text: String,
}

/// Every file a load of `dir` reads, shards one by one, in order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    let m = Manifest::read(dir)?;
    let mut files = Vec::new();
    let mut push = |p: PathBuf| -> Result<(), WeightsError> {
        match weights::shard_files(&p)? {
            Some(shards) => files.extend(shards),
            None => files.push(p),
        }
        Ok(())
    };
    push(dir.join(&m.gpt_weights))?;
    push(dir.join(&m.vq_weights))?;
    if let Some(folder) = &m.text_encoder {
        push(crate::model::t5::weight_file(&dir.join(folder)))?;
    }
    Ok(files)
}

/// The [`LoadSummary`] of loading `dir` onto `device`.
pub fn load_summary(dir: &Path, device: &Device) -> Result<LoadSummary, WeightsError> {
    let m = Manifest::read(dir)?;
    let size = |f: &str| weights::weight_bytes(&dir.join(f));
    let (gpt_bytes, vq_bytes) = (size(&m.gpt_weights), size(&m.vq_weights));
    let dtype = gpt_dtype(device);
    let params = m.gpt.num_params();
    let (text_bytes, text_line) = match &m.text_encoder {
        None => (0, String::new()),
        Some(folder) => {
            let t5_dir = dir.join(folder);
            let bytes = weights::weight_bytes(&crate::model::t5::weight_file(&t5_dir));
            let params = crate::model::t5::encoder_params(&t5_dir)?;
            (
                bytes,
                format!(
                    "; text encoder {folder} {} on disk, {:.1}M encoder parameters, about {}",
                    human_bytes(bytes as f64),
                    params as f64 / 1e6,
                    human_bytes(params as f64 * 4.0)
                ),
            )
        }
    };
    let text = format!(
        "{} {} + {} {}: GPT {:.1}M parameters, about {} as {:?} on {}",
        m.gpt_weights,
        human_bytes(gpt_bytes as f64),
        m.vq_weights,
        human_bytes(vq_bytes as f64),
        params as f64 / 1e6,
        human_bytes((params * dtype.size_in_bytes()) as f64),
        dtype,
        device_name(device),
    ) + &text_line;
    Ok(LoadSummary {
        weight_bytes: gpt_bytes + vq_bytes + text_bytes,
        text,
    })
}

fn device_name(d: &Device) -> &'static str {
    match d {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        Device::Metal(_) => "metal",
    }
}

impl LlamaGen {
    /// Loads the model directory `dir` onto `device` (GPT in [`gpt_dtype`], VQ in f32).
    pub fn load(dir: &Path, device: &Device) -> Result<Self, WeightsError> {
        Self::load_with(dir, device, &mut |_| {})
    }

    /// [`LlamaGen::load`], telling `on_file` of each file (see [`weight_files`]) before it is
    /// read.
    pub fn load_with(
        dir: &Path,
        device: &Device,
        on_file: weights::OnFile,
    ) -> Result<Self, WeightsError> {
        let manifest = Manifest::read(dir)?;
        let dtype = gpt_dtype(device);
        let gpt_path = dir.join(&manifest.gpt_weights);
        let vb = weights::var_builder_where(&gpt_path, None, dtype, device, on_file)?;
        let gpt = Gpt::load(&manifest.gpt, manifest.grid_h, manifest.grid_w, vb)
            .map_err(|e| weights::mismatch(&gpt_path, e))?;
        let vq_path = dir.join(&manifest.vq_weights);
        // The VQ decoder runs in f32 everywhere: it is small and its GroupNorms are sensitive.
        let vb = weights::var_builder_where(&vq_path, None, DType::F32, device, on_file)?;
        let vq = VqDecoder::load(&manifest.vq, vb).map_err(|e| weights::mismatch(&vq_path, e))?;
        let text = match &manifest.text_encoder {
            None => None,
            Some(folder) => {
                let t5_dir = dir.join(folder);
                let enc =
                    TextEncoder::load_with(&t5_dir, manifest.gpt.cls_token_num, device, on_file)?;
                if manifest.gpt.caption_dim != Some(enc.dim) {
                    return Err(WeightsError::Mismatch {
                        path: t5_dir,
                        msg: format!(
                            "the text encoder gives rows of {} values but caption_dim is {:?}",
                            enc.dim, manifest.gpt.caption_dim
                        ),
                    });
                }
                Some(enc)
            }
        };
        Ok(Self {
            manifest,
            dir: dir.to_path_buf(),
            gpt,
            vq: Arc::new(vq),
            text,
            session: None,
            capture: None,
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
        self.session = None;
        let encoded;
        let cond = match (cond, &mut self.text) {
            (Condition::Text(caption), Some(enc)) => {
                encoded = enc.encode(caption)?;
                &encoded
            }
            _ => cond,
        };
        let (session, logits) = self.gpt.start(cond, opts, self.capture)?;
        self.session = Some(session);
        Ok(logits)
    }

    fn step(&mut self, inputs: &[ModelInput]) -> anyhow::Result<PassLogits> {
        let Some(session) = self.session.as_mut() else {
            anyhow::bail!("step called before prefill");
        };
        self.gpt.step(session, inputs)
    }

    fn set_attention_capture(&mut self, head_layer: Option<usize>) -> bool {
        self.capture = head_layer;
        if let Some(s) = &mut self.session {
            s.set_attention_capture(head_layer);
        }
        true
    }

    fn take_attention(&mut self) -> Option<crate::model::PassAttention> {
        self.session.as_mut()?.take_attention()
    }

    fn on_cpu(&self) -> bool {
        self.gpt.device().is_cpu()
    }

    fn image_decoder(&self) -> Arc<dyn ImageDecoder> {
        Arc::new(GridDecoder {
            vq: self.vq.clone(),
            grid: self.gpt.grid(),
        })
    }
}

/// The VQ decoder bound to a grid size.
pub struct GridDecoder {
    /// The decoder.
    pub vq: Arc<VqDecoder>,
    /// The token grid (rows, columns).
    pub grid: (usize, usize),
}

impl ImageDecoder for GridDecoder {
    fn decode(&self, tokens: &[u32]) -> anyhow::Result<RgbImage> {
        // Inside candle's thread pool, like the GPT's passes (see `Gpt::forward_embeds`).
        let dev = self.vq.device().clone();
        Ok(dev.with_context(|| self.vq.decode_rgb(tokens, self.grid.0, self.grid.1))?)
    }

    fn grid(&self) -> (usize, usize) {
        self.grid
    }

    fn codebook_size(&self) -> usize {
        self.vq.config().codebook_size
    }
}
