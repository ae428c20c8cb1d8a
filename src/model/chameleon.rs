//! Chameleon, the architecture of Lumina-mGPT, read from a Hugging Face folder (`config.json`
//! with `"model_type": "chameleon"`, safetensors weights under transformers' names).
//!
//! The transformer itself is the GPT of `llamagen::gpt` with [`Family::Chameleon`]: the same
//! slot-indexed KV cache and multi-input passes, with Chameleon's per-head query / key norms,
//! 1-D RoPE and a prompt of tokens as the condition. This module reads the configuration and
//! the image vocabulary: Chameleon's BPE vocabulary holds the 8192 VQGAN codes as tokens named
//! `IMGIMG<digits as letters A-J>Z`, in an order of their own.
//!
//! [`load_lumina`] opens a Lumina-mGPT folder as an [`EndOfRowLm`] (the end-of-row layout,
//! codes in and out) with Lumina-mGPT's prompt template ([`PromptTemplate`]) and
//! classifier-free guidance. The image decoder is `llamagen::VqDecoder` with
//! `VqStyle::Taming`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use super::end_of_row::{EndOfRowLm, TextPrompt};
use super::llamagen::{Family, Gpt, GptConfig};
use crate::weights::WeightsError;

/// The parts of a Hugging Face `ChameleonConfig` the product reads (the same fields serve
/// Llama-style decoders such as Emu3-Gen's language model, see [`ChameleonConfig::read_llama`]).
#[derive(Debug, Clone, Deserialize)]
pub struct ChameleonConfig {
    /// Must be `"chameleon"`.
    pub model_type: String,
    /// Hidden size.
    pub hidden_size: usize,
    /// FFN width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key / value heads (grouped-query attention when fewer than the query heads).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Vocabulary size (text and image tokens).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_theta")]
    pub rope_theta: f32,
    /// Longest sequence the model was trained for.
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    /// Chameleon-30B's norm placement (after attention and MLP), not supported.
    #[serde(default)]
    pub swin_norm: bool,
    /// Biases on the attention projections (not in the released models).
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP (not in the released models).
    #[serde(default)]
    pub mlp_bias: bool,
    /// Token names to ids, with the image tokens among them.
    #[serde(default)]
    pub vocabulary_map: HashMap<String, u32>,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f32 {
    10000.0
}

impl ChameleonConfig {
    /// Reads `dir/config.json`.
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        Self::read_as(dir, &["chameleon"])
    }

    /// Reads `dir/config.json` of a Llama-style decoder: Emu3-Gen's language model
    /// (`"Emu3"` in BAAI's release, `"emu3_text_model"` in transformers) or a Llama; its
    /// [`gpt_config`](Self::gpt_config) has [`Family::Llama`].
    pub fn read_llama(dir: &Path) -> anyhow::Result<Self> {
        Self::read_as(dir, &["Emu3", "emu3", "emu3_text_model", "llama"])
    }

    fn read_as(dir: &Path, types: &[&str]) -> anyhow::Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{} is not a {} config: {e}", path.display(), types[0]))?;
        anyhow::ensure!(
            types.contains(&cfg.model_type.as_str()),
            "{}: model_type is {:?}, not one of {types:?}",
            path.display(),
            cfg.model_type
        );
        Ok(cfg)
    }

    /// The GPT configuration for prompts of up to `max_prompt` tokens, refusing the variants
    /// the GPT does not implement.
    pub fn gpt_config(&self, max_prompt: usize) -> anyhow::Result<GptConfig> {
        let kv = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        anyhow::ensure!(
            kv > 0 && self.num_attention_heads.is_multiple_of(kv),
            "{kv} key/value heads do not divide the {} query heads",
            self.num_attention_heads
        );
        anyhow::ensure!(
            !self.swin_norm,
            "Chameleon-30B's swin_norm layers are not supported"
        );
        anyhow::ensure!(
            !self.attention_bias && !self.mlp_bias,
            "attention or MLP biases are not supported (the released models have none)"
        );
        anyhow::ensure!(
            self.num_attention_heads > 0
                && self.hidden_size.is_multiple_of(self.num_attention_heads),
            "hidden size {} is not a multiple of the {} heads",
            self.hidden_size,
            self.num_attention_heads
        );
        Ok(GptConfig {
            dim: self.hidden_size,
            n_layer: self.num_hidden_layers,
            n_head: self.num_attention_heads,
            vocab_size: self.vocab_size,
            num_classes: 0,
            cls_token_num: max_prompt,
            caption_dim: None,
            ffn_hidden: Some(self.intermediate_size),
            multiple_of: 1,
            rope_base: self.rope_theta,
            norm_eps: self.rms_norm_eps,
            family: if self.model_type == "chameleon" {
                Family::Chameleon
            } else {
                Family::Llama
            },
            n_kv_head: Some(kv),
        })
    }

    /// The image vocabulary from `vocabulary_map`.
    pub fn image_vocabulary(&self) -> anyhow::Result<ImageVocabulary> {
        ImageVocabulary::from_names(&self.vocabulary_map, image_code, "IMGIMG...")
    }
}

/// The VQGAN code of an image token's name (`IMGIMG` + the code's decimal digits written as
/// the letters A-J + one closing letter), as transformers' `ChameleonImageVocabularyMapping`
/// reads it; `None` for other names.
pub fn image_code(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("IMGIMG")?;
    let mut chars = digits.chars();
    chars.next_back()?;
    let code: String = chars
        .map(|c| match c {
            'A'..='J' => Some(char::from(b'0' + (c as u8 - b'A'))),
            _ => None,
        })
        .collect::<Option<String>>()?;
    code.parse().ok()
}

/// VQGAN codes to BPE token ids and back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageVocabulary {
    /// `to_bpe[code]`: the token id of each code.
    to_bpe: Vec<u32>,
    /// The code of each image token id.
    to_code: HashMap<u32, u32>,
}

impl ImageVocabulary {
    /// From token names to ids, with `code_of` reading the code of an image token's name
    /// (`what` names them in errors); the codes must be exactly `0..n`.
    pub fn from_names(
        map: &HashMap<String, u32>,
        code_of: fn(&str) -> Option<u32>,
        what: &str,
    ) -> anyhow::Result<Self> {
        let mut to_code = HashMap::new();
        for (name, &id) in map {
            if let Some(code) = code_of(name) {
                anyhow::ensure!(
                    to_code.insert(id, code).is_none(),
                    "token id {id} has two image names"
                );
            }
        }
        let n = to_code.len();
        anyhow::ensure!(n > 0, "the vocabulary map has no image tokens ({what})");
        let mut to_bpe = vec![u32::MAX; n];
        for (&id, &code) in &to_code {
            let slot = to_bpe.get_mut(code as usize).ok_or_else(|| {
                anyhow::anyhow!("image code {code} is out of the range 0..{n} of the image tokens")
            })?;
            anyhow::ensure!(*slot == u32::MAX, "image code {code} has two tokens");
            *slot = id;
        }
        Ok(Self { to_bpe, to_code })
    }

    /// Number of codes.
    pub fn len(&self) -> usize {
        self.to_bpe.len()
    }

    /// Whether there are no codes (never true once built).
    pub fn is_empty(&self) -> bool {
        self.to_bpe.is_empty()
    }

    /// The token id of a code.
    pub fn bpe(&self, code: u32) -> Option<u32> {
        self.to_bpe.get(code as usize).copied()
    }

    /// The code of a token id, if it is an image token.
    pub fn code(&self, bpe: u32) -> Option<u32> {
        self.to_code.get(&bpe).copied()
    }

    /// The logits of the image tokens in code order, from a row over the whole vocabulary
    /// (what the sampler draws a code from while the image is decoded).
    pub fn image_logits(&self, row: &[f32]) -> Vec<f32> {
        self.to_bpe
            .iter()
            .map(|&id| row.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY))
            .collect()
    }
}

/// The unconditional prompt of classifier-free guidance as the official Lumina-mGPT ZipAR code
/// builds it: the same length as the prompt, token 0 and then token 1 in place of every prompt
/// token before the image start, the image start and grid-size tokens kept (the official code
/// feeds them to both halves once generated).
pub fn unconditional_prompt(ids: &[u32], image_start: Option<u32>) -> Vec<u32> {
    let text = image_start
        .and_then(|s| ids.iter().rposition(|&t| t == s))
        .unwrap_or(ids.len());
    (0..ids.len())
        .map(|i| match i {
            0 if text > 0 => 0,
            i if i < text => 1,
            i => ids[i],
        })
        .collect()
}

/// The longest prompt (template included) a Lumina-mGPT run takes, in tokens.
pub const MAX_PROMPT: usize = 512;

/// Lumina-mGPT's recommended settings as its ZipAR code runs them: window 16, CFG 3, image
/// top-k 2000.
pub const LUMINA_DEFAULTS: crate::weights::SamplingDefaults = crate::weights::SamplingDefaults {
    cfg: Some(3.0),
    temperature: Some(1.0),
    top_k: Some(2000),
    top_p: None,
    window: Some(16),
    mask_unwritten: None,
};

/// Bytes a Lumina-mGPT run needs: the transformer's `params` at `dtype_bytes` each, its KV
/// cache for the longest prompt and an `h x w` grid with end-of-row tokens, both CFG halves,
/// and the VQGAN decoder's `vq_params` in f32.
pub fn memory_needed(
    cfg: &GptConfig,
    params: u64,
    dtype_bytes: u64,
    grid: (usize, usize),
    vq: (u64, &super::llamagen::VqConfig),
) -> u64 {
    let (vq_params, vq_cfg) = vq;
    // The decoder's largest activations: about three full-resolution maps of its last level.
    let side = vq_cfg.downsample() as u64;
    let pixels = grid.0 as u64 * side * grid.1 as u64 * side;
    let activations = 3 * pixels * (vq_cfg.ch * vq_cfg.ch_mult[0]) as u64 * 4;
    params * dtype_bytes + kv_cache_bytes(cfg, dtype_bytes, grid) + vq_params * 4 + activations
}

/// A CPU load that needs more than the memory available (`what` it counts), refused with both
/// numbers.
pub(crate) fn refuse_if_too_big(need: u64, what: &str, path: &Path) -> Result<(), WeightsError> {
    use crate::weights::human_bytes;
    match crate::weights::available_memory() {
        Some(have) if need > have => Err(WeightsError::BadManifest {
            path: path.to_path_buf(),
            msg: format!(
                "this model needs about {} ({what}) but only {} of memory is available",
                human_bytes(need as f64),
                human_bytes(have as f64)
            ),
        }),
        _ => Ok(()),
    }
}

/// The KV cache of an end-of-row run: both CFG halves, K and V, every layer, for the longest
/// prompt and an `h x w` grid with end-of-row tokens, sized by the key/value heads.
pub fn kv_cache_bytes(cfg: &GptConfig, dtype_bytes: u64, grid: (usize, usize)) -> u64 {
    let positions = (MAX_PROMPT + grid.0 * (grid.1 + 1)) as u64;
    let kv_width = (cfg.kv_heads() * cfg.head_dim()) as u64;
    2 * cfg.n_layer as u64 * 2 * positions * kv_width * dtype_bytes
}

/// The VQGAN decoder's parameters: from the safetensors header, or for a pickled checkpoint
/// (whose tensors are only known by reading it) a quarter of the file's bytes, an
/// overestimate since the file also holds the encoder.
fn vq_params(path: &Path, keep: crate::weights::Keep) -> u64 {
    crate::weights::count_elements_where(path, keep)
        .unwrap_or_else(|_| crate::weights::weight_bytes(path) / 4)
}

/// What loading a Lumina-mGPT folder reads and roughly takes in memory (from the safetensors
/// headers; the VQ encoder's weights are not counted, they are not read).
pub fn load_summary(
    dir: &Path,
    device: &candle_core::Device,
) -> Result<super::llamagen::LoadSummary, WeightsError> {
    use crate::weights::{count_elements_where, human_bytes, weight_bytes};
    let files = LuminaFiles::find(dir)?;
    let keep = |name: &str| !name.starts_with("model.vqmodel.");
    let params = count_elements_where(&files.weights, &keep)?;
    let dtype = super::llamagen::gpt_dtype(device);
    let cfg_path = dir.join("config.json");
    let gpt_cfg = ChameleonConfig::read(dir)
        .and_then(|c| c.gpt_config(MAX_PROMPT))
        .map_err(|e| WeightsError::BadManifest {
            path: cfg_path,
            msg: format!("{e:#}"),
        })?;
    let settings = LuminaSettings::read(dir)?;
    let grid = settings.grid(dir)?;
    let decoder = |name: &str| !name.starts_with("encoder.") && !name.starts_with("loss.");
    let vq_cfg = settings
        .vq
        .unwrap_or_else(super::llamagen::VqConfig::chameleon_vqgan);
    let need = memory_needed(
        &gpt_cfg,
        params,
        dtype.size_in_bytes() as u64,
        grid,
        (vq_params(&files.vqgan, &decoder), &vq_cfg),
    );
    let (w, v) = (weight_bytes(&files.weights), weight_bytes(&files.vqgan));
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    Ok(super::llamagen::LoadSummary {
        weight_bytes: w + v,
        text: format!(
            "{} {} + {} {}: Chameleon {:.1}M parameters, about {} as {:?} on {}; {} in all with the KV cache of a {}x{} image and the VQGAN",
            name(&files.weights),
            human_bytes(w as f64),
            name(&files.vqgan),
            human_bytes(v as f64),
            params as f64 / 1e6,
            human_bytes(params as f64 * dtype.size_in_bytes() as f64),
            dtype,
            if device.is_cpu() { "cpu" } else { "gpu" },
            human_bytes(need as f64),
            grid.0,
            grid.1,
        ),
    })
}

/// `zipar.json`, optional, next to a Lumina-mGPT folder's Hugging Face files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LuminaSettings {
    /// Image side in pixels, as the prompt template states it (768 for Lumina-mGPT-7B-768).
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    /// Code grid (rows, columns); `image_size / 16` square when absent.
    #[serde(default)]
    pub grid: Option<(usize, usize)>,
    /// The image decoder; Chameleon's VQGAN when absent.
    #[serde(default)]
    pub vq: Option<super::llamagen::VqConfig>,
}

fn default_image_size() -> usize {
    768
}

/// `dir/zipar.json`, the product's settings next to a Hugging Face folder, or the defaults
/// when there is none.
pub fn read_zipar_json<T: serde::de::DeserializeOwned + Default>(
    dir: &Path,
) -> Result<T, WeightsError> {
    let path = dir.join("zipar.json");
    if !path.is_file() {
        return Ok(T::default());
    }
    let bad = |msg: String| WeightsError::BadManifest {
        path: path.clone(),
        msg,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| bad(e.to_string()))
}

impl LuminaSettings {
    /// `dir/zipar.json`, or the defaults when there is none.
    pub fn read(dir: &Path) -> Result<Self, WeightsError> {
        read_zipar_json(dir)
    }

    /// The code grid (rows, columns).
    pub fn grid(&self, dir: &Path) -> Result<(usize, usize), WeightsError> {
        let grid = self
            .grid
            .unwrap_or((self.image_size / 16, self.image_size / 16));
        if !(1..=512).contains(&grid.0) || !(1..=512).contains(&grid.1) {
            return Err(WeightsError::BadManifest {
                path: dir.join("zipar.json"),
                msg: format!(
                    "a {}x{} code grid: each side must be 1 to 512 codes (image_size {})",
                    grid.0, grid.1, self.image_size
                ),
            });
        }
        Ok(grid)
    }
}

impl Default for LuminaSettings {
    fn default() -> Self {
        Self {
            image_size: default_image_size(),
            grid: None,
            vq: None,
        }
    }
}

/// The files of a Lumina-mGPT folder: the transformer's weights (one file or shards), the
/// VQGAN decoder (`vqgan.safetensors` with taming-transformers' key names, or Chameleon's
/// Lightning checkpoint `vqgan.ckpt` as released), the tokenizer.
#[derive(Debug, Clone)]
pub struct LuminaFiles {
    /// `model.safetensors` or `model.safetensors.index.json`.
    pub weights: std::path::PathBuf,
    /// `vqgan.safetensors`, else `vqgan.ckpt`.
    pub vqgan: std::path::PathBuf,
    /// `tokenizer.json`.
    pub tokenizer: std::path::PathBuf,
}

impl LuminaFiles {
    /// Finds them in `dir`, naming the first one missing.
    pub fn find(dir: &Path) -> Result<Self, WeightsError> {
        let either = |a: &str, b: &str| {
            let a = dir.join(a);
            if a.is_file() { a } else { dir.join(b) }
        };
        let files = Self {
            weights: either("model.safetensors", "model.safetensors.index.json"),
            vqgan: either("vqgan.safetensors", "vqgan.ckpt"),
            tokenizer: dir.join("tokenizer.json"),
        };
        if !files.vqgan.is_file() {
            return Err(WeightsError::MissingFile(
                dir.join("vqgan.safetensors (or vqgan.ckpt, Chameleon's VQGAN)"),
            ));
        }
        for f in [&files.weights, &files.tokenizer] {
            if !f.is_file() {
                return Err(WeightsError::MissingFile(f.clone()));
            }
        }
        Ok(files)
    }

    /// Every file a load reads, shards one by one.
    pub fn all(&self) -> Result<Vec<std::path::PathBuf>, WeightsError> {
        let mut out = match crate::weights::shard_files(&self.weights)? {
            Some(shards) => shards,
            None => vec![self.weights.clone()],
        };
        out.push(self.vqgan.clone());
        Ok(out)
    }
}

/// The text-to-image prompt of Lumina-mGPT (its `generate_examples/generate.py` and
/// `data/item_processor.py`): the request as one conversation turn ending with
/// `<reserved08706>`, encoded with the tokenizer's own special-token rules (a BOS first for
/// Chameleon's), then the image start `<racm3:break>` and the grid-size tokens
/// `<reserved{8800 + n}>` with `n` 32-pixel patches per side, so that the prefill predicts the
/// first image token.
pub struct PromptTemplate {
    tokenizer: tokenizers::Tokenizer,
    image_size: usize,
    image_start: u32,
    grid_tokens: (u32, u32),
}

impl PromptTemplate {
    fn new(
        tokenizer: tokenizers::Tokenizer,
        vocab: &HashMap<String, u32>,
        image_size: usize,
        grid: (usize, usize),
    ) -> anyhow::Result<Self> {
        let id = |name: &str| {
            vocab
                .get(name)
                .copied()
                .ok_or_else(|| anyhow::anyhow!("the vocabulary has no {name} token"))
        };
        anyhow::ensure!(
            grid.0.is_multiple_of(2) && grid.1.is_multiple_of(2),
            "a {}x{} code grid is not a whole number of 32-pixel patches",
            grid.0,
            grid.1
        );
        let size = |n: usize| id(&format!("<reserved{:05}>", 8800 + n / 2));
        Ok(Self {
            tokenizer,
            image_size,
            image_start: id("<racm3:break>")?,
            grid_tokens: (size(grid.0)?, size(grid.1)?),
        })
    }

    /// The token ids of a run for `prompt`.
    pub fn encode(&self, prompt: &str) -> anyhow::Result<Vec<u32>> {
        let n = self.image_size;
        let text = format!(
            "Generate an image of {n}x{n} according to the following prompt:\n{prompt}<reserved08706>"
        );
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        ids.extend([self.image_start, self.grid_tokens.0, self.grid_tokens.1]);
        Ok(ids)
    }
}

impl TextPrompt for PromptTemplate {
    fn encode(&self, prompt: &str) -> anyhow::Result<Vec<u32>> {
        PromptTemplate::encode(self, prompt)
    }

    fn unconditional(&self, ids: &[u32]) -> anyhow::Result<Vec<u32>> {
        Ok(unconditional_prompt(ids, Some(self.image_start)))
    }
}

/// Loads a Lumina-mGPT folder onto `device`: Hugging Face's `config.json`, weights and
/// `tokenizer.json`, the VQGAN as `vqgan.safetensors`, and the optional `zipar.json`
/// ([`LuminaSettings`]). The VQ encoder's weights in the checkpoint are not read.
pub fn load_lumina(
    dir: &Path,
    device: &candle_core::Device,
    on_file: crate::weights::OnFile,
) -> Result<EndOfRowLm, WeightsError> {
    use crate::weights::{mismatch, var_builder_where};
    let bad = |path: &Path, msg: String| WeightsError::BadManifest {
        path: path.to_path_buf(),
        msg,
    };
    let cfg_path = dir.join("config.json");
    let cfg = ChameleonConfig::read(dir).map_err(|e| bad(&cfg_path, format!("{e:#}")))?;
    let settings = LuminaSettings::read(dir)?;
    let grid = settings.grid(dir)?;
    let files = LuminaFiles::find(dir)?;
    let gpt_cfg = cfg
        .gpt_config(MAX_PROMPT)
        .map_err(|e| bad(&cfg_path, format!("{e:#}")))?;
    // The cheap checks first: a bad tokenizer, vocabulary or grid is named before gigabytes
    // of weights are read.
    let tokenizer =
        tokenizers::Tokenizer::from_file(&files.tokenizer).map_err(|e| WeightsError::Corrupt {
            path: files.tokenizer.clone(),
            msg: format!("not a tokenizer: {e}"),
        })?;
    let template = PromptTemplate::new(tokenizer, &cfg.vocabulary_map, settings.image_size, grid)
        .map_err(|e| bad(&cfg_path, format!("{e:#}")))?;
    let vocab = cfg
        .image_vocabulary()
        .map_err(|e| bad(&cfg_path, format!("{e:#}")))?;
    let eol = *cfg.vocabulary_map.get("<reserved08799>").ok_or_else(|| {
        bad(
            &cfg_path,
            "the vocabulary has no end-of-row token <reserved08799>".into(),
        )
    })?;
    let vq_cfg = settings
        .vq
        .clone()
        .unwrap_or_else(super::llamagen::VqConfig::chameleon_vqgan);
    vq_cfg
        .validate()
        .map_err(|e| bad(&dir.join("zipar.json"), e))?;
    let dtype = super::llamagen::gpt_dtype(device);
    let keep = |name: &str| !name.starts_with("model.vqmodel.");
    let decoder_only = |name: &str| !name.starts_with("encoder.") && !name.starts_with("loss.");
    if device.is_cpu() {
        let need = memory_needed(
            &gpt_cfg,
            crate::weights::count_elements_where(&files.weights, &keep)?,
            dtype.size_in_bytes() as u64,
            grid,
            (vq_params(&files.vqgan, &decoder_only), &vq_cfg),
        );
        refuse_if_too_big(
            need,
            &format!("weights as {dtype:?}, KV cache, VQGAN"),
            &cfg_path,
        )?;
    }
    let vb = var_builder_where(&files.weights, Some(&keep), dtype, device, on_file)?;
    let gpt = Gpt::load_chameleon(&gpt_cfg, grid.0, grid.1 + 1, vb)
        .map_err(|e| mismatch(&files.weights, e))?;
    let vb = var_builder_where(
        &files.vqgan,
        Some(&decoder_only),
        candle_core::DType::F32,
        device,
        on_file,
    )?;
    let vq =
        super::llamagen::VqDecoder::load(&vq_cfg, vb).map_err(|e| mismatch(&files.vqgan, e))?;
    let decoder = Arc::new(super::llamagen::GridDecoder {
        vq: Arc::new(vq),
        grid,
    });
    let model =
        EndOfRowLm::new(gpt, vocab, eol, decoder).map_err(|e| bad(&cfg_path, format!("{e:#}")))?;
    Ok(model.with_template(Box::new(template)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lumina_7b_needs_what_its_sizes_say() {
        // Lumina-mGPT-7B-768: 32 layers of 4096, about 7.0e9 parameters in bf16, 48 x 48 codes.
        let cfg = ChameleonConfig {
            model_type: "chameleon".into(),
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: Some(32),
            vocab_size: 65536,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            max_position_embeddings: Some(10240),
            swin_norm: false,
            attention_bias: false,
            mlp_bias: false,
            vocabulary_map: HashMap::new(),
        }
        .gpt_config(MAX_PROMPT)
        .expect("config");
        let vq = crate::model::llamagen::VqConfig::chameleon_vqgan();
        let need = memory_needed(&cfg, 7_000_000_000, 2, (48, 48), (70_000_000, &vq));
        // 14 GB of weights, 2 x 32 x 2 x (512 + 2352) x 4096 x 2 B = 3.0 GB of cache, 0.28 GB
        // of VQGAN, 3 maps of 768 x 768 x 128 f32 = 0.91 GB of decoder activations
        let kv = 2 * 32 * 2 * (512 + 48 * 49) * 4096 * 2;
        let act = 3 * 768 * 768 * 128 * 4;
        assert_eq!(need, 14_000_000_000 + kv + 280_000_000 + act);
        assert!((18.1e9..18.3e9).contains(&(need as f64)), "{need}");
        // grouped-query attention shrinks the cache: 8 key/value heads of 32
        let gqa = GptConfig {
            n_kv_head: Some(8),
            ..cfg.clone()
        };
        let less = memory_needed(&gqa, 7_000_000_000, 2, (48, 48), (70_000_000, &vq));
        assert_eq!(need - less, kv - kv / 4);
    }

    #[test]
    fn image_token_names_map_to_codes() {
        assert_eq!(image_code("IMGIMGAZ"), Some(0));
        assert_eq!(image_code("IMGIMGBJEZ"), Some(194));
        assert_eq!(image_code("IMGIMGHBJCZ"), Some(7192));
        assert_eq!(image_code("IMGIMG"), None);
        assert_eq!(image_code("IMGIMGKZ"), None);
        assert_eq!(image_code("<racm3:break>"), None);
        let map: HashMap<String, u32> = [("IMGIMGBZ", 9), ("IMGIMGAZ", 7), ("hello", 3)]
            .into_iter()
            .map(|(n, i)| (n.to_string(), i))
            .collect();
        let v = ImageVocabulary::from_names(&map, image_code, "IMGIMG").expect("vocabulary");
        assert_eq!(
            (v.len(), v.bpe(0), v.bpe(1), v.code(9)),
            (2, Some(7), Some(9), Some(1))
        );
        assert_eq!(v.code(3), None);
        let row: Vec<f32> = (0..10).map(|i| i as f32).collect();
        assert_eq!(v.image_logits(&row), vec![7.0, 9.0]);
        // a gap in the codes is refused
        let gap: HashMap<String, u32> = [("IMGIMGAZ", 1), ("IMGIMGCZ", 2)]
            .into_iter()
            .map(|(n, i)| (n.to_string(), i))
            .collect();
        assert!(ImageVocabulary::from_names(&gap, image_code, "IMGIMG").is_err());
    }
}
