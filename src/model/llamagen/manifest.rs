//! The LlamaGen model folder's manifest (`config.json`): weight files, sizes, classes,
//! classifier and recommended settings, checked before anything is allocated.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::config::{GptConfig, VqConfig, bounded};
use crate::weights::{
    ModelKind, SamplingDefaults, WeightsError, available_memory, human_bytes, manifest_path,
};

/// The manifest `config.json` of a model directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Architecture.
    pub kind: ModelKind,
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
    /// GPT weights, relative to the directory (`.pt`, `.pth` or `.safetensors`).
    pub gpt_weights: String,
    /// VQ tokenizer weights, relative to the directory.
    pub vq_weights: String,
    /// Token grid rows.
    pub grid_h: usize,
    /// Token grid columns.
    pub grid_w: usize,
    /// GPT sizes, at the top level of the manifest.
    #[serde(flatten)]
    pub gpt: GptConfig,
    /// VQ sizes.
    pub vq: VqConfig,
    /// Class names for prompt matching (`classes.json`), when the model has them.
    #[serde(default)]
    pub classes: Option<String>,
    /// The image classifier `eval` scores images with (`classifier.safetensors`), when the
    /// model ships one.
    #[serde(default)]
    pub classifier: Option<String>,
    /// The text encoder's folder (FLAN-T5 in Hugging Face layout: `config.json`,
    /// `tokenizer.json`, `model.safetensors` or its shard index), relative to the directory or
    /// absolute; text-to-image models only.
    #[serde(default)]
    pub text_encoder: Option<String>,
    /// Decoding settings the model's authors recommend (used until the user sets others).
    #[serde(default, skip_serializing_if = "SamplingDefaults::is_empty")]
    pub defaults: SamplingDefaults,
}

impl Manifest {
    /// Reads `dir/config.json` and checks it.
    pub fn read(dir: &Path) -> Result<Self, WeightsError> {
        let path = manifest_path(dir)?;
        let bad = |msg: String| WeightsError::BadManifest {
            path: path.clone(),
            msg,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        m.gpt.validate().map_err(&bad)?;
        m.vq.validate().map_err(&bad)?;
        bounded("grid_h", m.grid_h, 1, 512)
            .and_then(|()| bounded("grid_w", m.grid_w, 1, 512))
            .map_err(&bad)?;
        let text_params = match &m.text_encoder {
            Some(folder) if !dir.join(folder).is_dir() => {
                return Err(bad(format!(
                    "text_encoder: the folder {} does not exist (it should hold FLAN-T5's config.json, tokenizer.json and weights)",
                    dir.join(folder).display()
                )));
            }
            Some(folder) => crate::model::t5::encoder_params(&dir.join(folder))?,
            None => 0,
        };
        if let Some(need) = m
            .memory_needed()
            .and_then(|n| n.checked_add(text_params.checked_mul(4)?))
            && let Some(have) = available_memory()
            && need > have
        {
            return Err(bad(format!(
                "this model needs about {} (weights in f32, KV cache, VQ decoder, text encoder) but only {} of memory is available",
                human_bytes(need as f64),
                human_bytes(have as f64)
            )));
        }
        if m.gpt.vocab_size != m.vq.codebook_size {
            return Err(bad(format!(
                "vocab_size {} differs from the VQ codebook size {}",
                m.gpt.vocab_size, m.vq.codebook_size
            )));
        }
        let d = m.defaults.resolve();
        crate::decode::sampling::Sampling::from_flags(false, d.temperature, d.top_k, d.top_p)
            .validate()
            .and_then(|()| crate::decode::sampling::validate_cfg(d.cfg))
            .map_err(|e| bad(format!("defaults: {e}")))?;
        let windows = crate::decode::schedule::window_range(
            crate::decode::schedule::Layout::Raster,
            m.grid_w,
        );
        if !windows.contains(&d.window) {
            return Err(bad(format!(
                "defaults: window {} is out of range: it must be between {} and {}",
                d.window,
                windows.start(),
                windows.end()
            )));
        }
        match (m.kind, m.gpt.caption_dim) {
            (ModelKind::LlamagenT2i, None) => {
                return Err(bad("a llamagen-t2i model needs caption_dim".into()));
            }
            (ModelKind::LlamagenC2i, Some(_)) => {
                return Err(bad("a llamagen-c2i model has no caption_dim".into()));
            }
            (ModelKind::LlamagenC2i, None) if m.text_encoder.is_some() => {
                return Err(bad(
                    "a llamagen-c2i model has no text encoder: text_encoder is for llamagen-t2i"
                        .into(),
                ));
            }
            _ => {}
        }
        Ok(m)
    }
}

impl Manifest {
    /// Rough memory a CPU run needs, in bytes: the GPT in f32, its KV cache (both CFG
    /// halves), and the VQ decoder's largest activations; `None` on overflow.
    pub fn memory_needed(&self) -> Option<u64> {
        let g = &self.gpt;
        let slots = (g.cls_token_num as u64)
            .checked_add((self.grid_h as u64).checked_mul(self.grid_w as u64)?)?;
        let weights = (g.num_params() as u64).checked_mul(4)?;
        let kv = 2u64 * 2 * g.n_layer as u64 * slots * g.dim as u64 * 4;
        let ds = self.vq.downsample() as u64;
        let (ph, pw) = (self.grid_h as u64 * ds, self.grid_w as u64 * ds);
        let widest = self.vq.ch as u64 * self.vq.ch_mult.iter().copied().max().unwrap_or(1) as u64;
        // a few live activation maps at full resolution, plus im2col scratch
        let vq = ph
            .checked_mul(pw)?
            .checked_mul(widest)?
            .checked_mul(4 * 6)?;
        weights.checked_add(kv)?.checked_add(vq)
    }
}
