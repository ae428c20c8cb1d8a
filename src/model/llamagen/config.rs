//! Sizes of the LlamaGen GPT and VQ tokenizer, as read from a model's `config.json`.

use serde::{Deserialize, Serialize};

/// LlamaGen GPT hyper-parameters (autoregressive/models/gpt.py `ModelArgs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptConfig {
    /// Hidden size.
    pub dim: usize,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Attention heads (no grouped-query attention in LlamaGen).
    pub n_head: usize,
    /// Image-token vocabulary (the VQ codebook size).
    pub vocab_size: usize,
    /// Classes of a class-conditional model (the null class for CFG is `num_classes`).
    #[serde(default)]
    pub num_classes: usize,
    /// Condition length: 1 for class-conditional models, 120 for text-conditional ones.
    #[serde(default = "default_cls_token_num")]
    pub cls_token_num: usize,
    /// Width of caption embeddings (text-conditional models only; 2048 for FLAN-T5-XL).
    #[serde(default)]
    pub caption_dim: Option<usize>,
    /// FFN hidden width; derived from `dim` as LlamaGen does when absent.
    #[serde(default)]
    pub ffn_hidden: Option<usize>,
    /// Rounding of the derived FFN width.
    #[serde(default = "default_multiple_of")]
    pub multiple_of: usize,
    /// RoPE base.
    #[serde(default = "default_rope_base")]
    pub rope_base: f32,
    /// RMSNorm epsilon.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// The transformer family: how the weights are named and what attention does. Set by the
    /// loader of each family, never read from a LlamaGen manifest.
    #[serde(skip)]
    pub family: Family,
    /// Key/value heads (grouped-query attention), dividing `n_head`; `n_head` when absent.
    /// Set by the Chameleon loader; LlamaGen's fused `wqkv` has as many as query heads.
    #[serde(skip)]
    pub n_kv_head: Option<usize>,
}

/// The transformer families the GPT reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// LlamaGen: fused `wqkv`, 2-D RoPE (interleaved pairs) over the grid with zeroed condition
    /// positions, a class or caption condition.
    #[default]
    LlamaGen,
    /// Chameleon (the architecture of Lumina-mGPT), as Hugging Face names it
    /// (`model.layers.N.self_attn.q_proj`, `lm_head`): a LayerNorm over each head's queries
    /// and keys with per-head scale and shift, 1-D RoPE (rotate-half) by position, a prompt of
    /// tokens as the condition.
    Chameleon,
    /// A Llama decoder as Hugging Face names it (Emu3-Gen's language model): Chameleon's
    /// layout without the query/key norms.
    Llama,
}

fn default_cls_token_num() -> usize {
    1
}
fn default_multiple_of() -> usize {
    256
}
fn default_rope_base() -> f32 {
    10000.0
}
fn default_norm_eps() -> f64 {
    1e-5
}

impl GptConfig {
    /// The published LlamaGen sizes (GPT-B, -L, -XL, -XXL, -3B), class-conditional on
    /// ImageNet.
    pub fn preset(name: &str) -> Option<Self> {
        let (n_layer, n_head, dim) = match name.to_ascii_uppercase().as_str() {
            "GPT-B" => (12, 12, 768),
            "GPT-L" => (24, 16, 1024),
            "GPT-XL" => (36, 20, 1280),
            "GPT-XXL" => (48, 24, 1536),
            "GPT-3B" => (24, 32, 3200),
            _ => return None,
        };
        Some(Self {
            dim,
            n_layer,
            n_head,
            vocab_size: 16384,
            num_classes: 1000,
            cls_token_num: 1,
            caption_dim: None,
            ffn_hidden: None,
            multiple_of: 256,
            rope_base: 10000.0,
            norm_eps: 1e-5,
            family: Family::LlamaGen,
            n_kv_head: None,
        })
    }

    /// Key/value heads: `n_kv_head`, else one per query head.
    pub fn kv_heads(&self) -> usize {
        self.n_kv_head.unwrap_or(self.n_head)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_head
    }

    /// FFN hidden width: `find_multiple(int(2 * 4 * dim / 3), multiple_of)` unless given.
    pub fn ffn_hidden(&self) -> usize {
        self.ffn_hidden.unwrap_or_else(|| {
            let hidden = 2 * 4 * self.dim / 3;
            hidden.div_ceil(self.multiple_of) * self.multiple_of
        })
    }

    /// Number of weights the GPT loads (the state-dict entries the app reads): token and
    /// condition embeddings, the blocks, the final norm and the output head. Used for the
    /// memory estimate shown while a model loads.
    pub fn num_params(&self) -> usize {
        let (d, f) = (self.dim, self.ffn_hidden());
        let cond = match self.caption_dim {
            None => (self.num_classes + 1) * d,
            Some(c) => c * d + d * d + self.cls_token_num * c,
        };
        let block = d * 3 * d + d * d + 3 * d * f + 2 * d;
        self.vocab_size * d + cond + self.n_layer * block + d + d * self.vocab_size
    }

    /// Checks the sizes fit together and each is within reason (before anything is allocated:
    /// a typo like `dim: 1000000` must be an error, not an abort).
    pub fn validate(&self) -> Result<(), String> {
        if self.dim == 0 || self.n_head == 0 || self.n_layer == 0 || self.vocab_size == 0 {
            return Err("dim, n_head, n_layer and vocab_size must be positive".into());
        }
        bounded("dim", self.dim, 1, 16_384)?;
        bounded("n_layer", self.n_layer, 1, 512)?;
        bounded("n_head", self.n_head, 1, 512)?;
        let kv = self.kv_heads();
        if kv == 0 || !self.n_head.is_multiple_of(kv) {
            return Err(format!(
                "n_kv_head {kv} must divide the {} query heads",
                self.n_head
            ));
        }
        bounded("vocab_size", self.vocab_size, 1, 1 << 20)?;
        bounded("num_classes", self.num_classes, 0, 1 << 20)?;
        bounded("cls_token_num", self.cls_token_num, 1, 4096)?;
        bounded("multiple_of", self.multiple_of, 1, 1 << 16)?;
        if let Some(c) = self.caption_dim {
            bounded("caption_dim", c, 1, 65_536)?;
        }
        if let Some(f) = self.ffn_hidden {
            bounded("ffn_hidden", f, 1, 1 << 18)?;
        }
        if !(self.rope_base.is_finite() && self.rope_base > 1.0) {
            return Err(format!(
                "rope_base must be a finite number above 1, got {}",
                self.rope_base
            ));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0 && self.norm_eps < 1.0) {
            return Err(format!("norm_eps must be in (0, 1), got {}", self.norm_eps));
        }
        if !self.dim.is_multiple_of(self.n_head) {
            return Err(format!(
                "dim {} is not divisible by n_head {}",
                self.dim, self.n_head
            ));
        }
        if !self.head_dim().is_multiple_of(4) {
            return Err(format!(
                "head dim {} must be a multiple of 4 for the 2D RoPE",
                self.head_dim()
            ));
        }
        if self.caption_dim.is_none() && self.num_classes == 0 {
            return Err("a class-conditional model needs num_classes > 0".into());
        }
        Ok(())
    }
}

/// `Err` naming the field unless `lo <= value <= hi`.
pub fn bounded(name: &str, value: usize, lo: usize, hi: usize) -> Result<(), String> {
    if (lo..=hi).contains(&value) {
        Ok(())
    } else {
        Err(format!("{name} must be between {lo} and {hi}, got {value}"))
    }
}

/// LlamaGen VQ tokenizer hyper-parameters (tokenizer/tokenizer_image/vq_model.py).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VqConfig {
    /// Codebook entries.
    pub codebook_size: usize,
    /// Codebook vector width.
    #[serde(default = "default_codebook_dim")]
    pub codebook_embed_dim: usize,
    /// Latent channels fed to the decoder.
    #[serde(default = "default_z_channels")]
    pub z_channels: usize,
    /// Base channel count.
    #[serde(default = "default_ch")]
    pub ch: usize,
    /// Channel multipliers per resolution level (the decoder walks them in reverse).
    #[serde(default = "default_ch_mult")]
    pub ch_mult: Vec<usize>,
    /// Residual blocks per level in the encoder; the decoder has one more.
    #[serde(default = "default_res_blocks")]
    pub num_res_blocks: usize,
    /// GroupNorm groups.
    #[serde(default = "default_groups")]
    pub norm_groups: usize,
    /// Which VQ family the weights come from.
    #[serde(default)]
    pub style: VqStyle,
}

/// The two decoders of the same taming-transformers lineage the product reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VqStyle {
    /// LlamaGen's VQ tokenizer: l2-normalised codebook, attention in every block of the
    /// lowest-resolution decoder level, keys `decoder.conv_blocks.L.res.J` (lowest resolution
    /// first), `decoder.mid.0/1/2`.
    #[default]
    LlamaGen,
    /// taming-transformers' VQGAN, Chameleon's (and so Lumina-mGPT's) image tokenizer:
    /// codebook used as stored, attention only in the middle block (`attn_resolutions: []`),
    /// keys `decoder.up.I.block.J` (highest resolution first), `decoder.mid.block_1`,
    /// `attn_1`, `block_2`.
    Taming,
}

fn default_codebook_dim() -> usize {
    8
}
fn default_z_channels() -> usize {
    256
}
fn default_ch() -> usize {
    128
}
fn default_ch_mult() -> Vec<usize> {
    vec![1, 1, 2, 2, 4]
}
fn default_res_blocks() -> usize {
    2
}
fn default_groups() -> usize {
    32
}

impl VqConfig {
    /// The published VQ-16 tokenizer.
    pub fn vq16() -> Self {
        Self {
            codebook_size: 16384,
            codebook_embed_dim: 8,
            z_channels: 256,
            ch: 128,
            ch_mult: default_ch_mult(),
            num_res_blocks: 2,
            norm_groups: 32,
            style: VqStyle::LlamaGen,
        }
    }

    /// Chameleon's VQGAN (Lumina-mGPT's image tokenizer): 8192 codes of 256, 16x down-sampling,
    /// taming-transformers' layout.
    pub fn chameleon_vqgan() -> Self {
        Self {
            codebook_size: 8192,
            codebook_embed_dim: 256,
            z_channels: 256,
            ch: 128,
            ch_mult: default_ch_mult(),
            num_res_blocks: 2,
            norm_groups: 32,
            style: VqStyle::Taming,
        }
    }

    /// Pixels per token side.
    pub fn downsample(&self) -> usize {
        1 << self.ch_mult.len().saturating_sub(1)
    }

    /// Checks the sizes fit together and each is within reason.
    pub fn validate(&self) -> Result<(), String> {
        bounded("VQ codebook_size", self.codebook_size, 1, 1 << 20)?;
        bounded("VQ codebook_embed_dim", self.codebook_embed_dim, 1, 4096)?;
        bounded("VQ z_channels", self.z_channels, 1, 4096)?;
        bounded("VQ ch", self.ch, 1, 4096)?;
        bounded("VQ ch_mult levels", self.ch_mult.len(), 1, 8)?;
        for &m in &self.ch_mult {
            bounded("VQ ch_mult entries", m, 1, 64)?;
        }
        bounded("VQ num_res_blocks", self.num_res_blocks, 0, 16)?;
        bounded("VQ norm_groups", self.norm_groups, 1, 4096)?;
        if self.ch_mult.is_empty() || self.codebook_size == 0 || self.codebook_embed_dim == 0 {
            return Err(
                "VQ ch_mult, codebook_size and codebook_embed_dim must be non-empty".into(),
            );
        }
        let g = self.norm_groups.max(1);
        for m in &self.ch_mult {
            if !(self.ch * m).is_multiple_of(g) {
                return Err(format!(
                    "VQ channels {} are not divisible by {} GroupNorm groups",
                    self.ch * m,
                    g
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ffn_width_matches_llamagen_table() {
        let widths: Vec<usize> = ["GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-3B"]
            .iter()
            .map(|n| GptConfig::preset(n).unwrap().ffn_hidden())
            .collect();
        assert_eq!(widths, vec![2048, 2816, 3584, 4096, 8704]);
        assert_eq!(GptConfig::preset("GPT-3B").unwrap().head_dim(), 100);
    }

    #[test]
    fn parameter_count_matches_the_published_sizes() {
        // LlamaGen's README: GPT-B 111M, GPT-L 343M, GPT-XL 775M (c2i, 1000 classes, 16384
        // codes).
        for (name, millions) in [("GPT-B", 111.0), ("GPT-L", 343.0), ("GPT-XL", 775.0)] {
            let n = GptConfig::preset(name).unwrap().num_params() as f64 / 1e6;
            assert!((n - millions).abs() / millions < 0.01, "{name}: {n:.1}M");
        }
    }
}
