//! Emu3-Gen, read from a folder as transformers saves `Emu3ForConditionalGeneration`
//! (`config.json` with `"model_type": "emu3"`, its `text_config`, `vq_config` and
//! `vocabulary_map`; the language model and the vision tokenizer in one safetensors checkpoint,
//! possibly sharded; `tokenizer.json`). BAAI's converted `Emu3-Gen-hf` is such a folder; the
//! original `Emu3-Gen` + `Emu3-VisionTokenizer` pair converts to one with transformers'
//! `convert_emu3_weights_to_hf.py` (their tokenizer is a tiktoken file, which this product does
//! not read).
//!
//! - The language model is a Llama decoder (`Family::Llama` of `llamagen::gpt`) with
//!   grouped-query attention.
//! - Images are `<|visual token NNNNNN|>` tokens, each row closed by `<|extra_200|>`: the
//!   end-of-row layout of [`EndOfRowLm`].
//! - The generation template is transformers' `Emu3Processor` with
//!   `return_for_image_generation`: `<|extra_203|>` (BOS), the prompt, `<|image start|>`,
//!   `"{h}*{w}"`, `<|image token|>`; the official sampler appends a positive suffix to the
//!   prompt and guides against a negative prompt in the same template ([`Emu3Settings`]).
//! - Classifier-free guidance as the official sampler applies it (transformers'
//!   `UnbatchedClassifierFreeGuidanceLogitsProcessor`): on log-probabilities, which differs from
//!   guiding the logits by a constant per row, so it samples the same; the negative prompt is
//!   of another length than the prompt, and the GPT pads and hides the shorter one.
//! - The image decoder is [`MovqDecoder`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::chameleon::{ChameleonConfig, ImageVocabulary, MAX_PROMPT};
use super::end_of_row::{EndOfRowLm, TextPrompt};
use super::llamagen::{Gpt, LoadSummary};
use super::movq::{MovqConfig, MovqDecoder, MovqGridDecoder};
use crate::weights::{SamplingDefaults, WeightsError};

/// The official sampler's suffix to every prompt.
pub const POSITIVE_PROMPT: &str = " masterpiece, film grained, best quality.";
/// The official sampler's negative prompt, the unconditional half of guidance.
pub const NEGATIVE_PROMPT: &str = "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry.";

/// Emu3-Gen's recommended settings as its official sampler runs them (CFG 3, top-k 2048), with
/// ZipAR's window 8: 90x90 codes in 713 passes instead of 8,100 (the paper's headline).
pub const EMU3_DEFAULTS: SamplingDefaults = SamplingDefaults {
    cfg: Some(3.0),
    temperature: Some(1.0),
    top_k: Some(2048),
    top_p: None,
    window: Some(8),
    mask_unwritten: None,
};

/// transformers' `Emu3Config`: the parts the product reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Emu3Config {
    /// Must be `"emu3"`.
    pub model_type: String,
    /// The language model (`"emu3_text_model"`).
    pub text_config: ChameleonConfig,
    /// The vision tokenizer.
    pub vq_config: MovqConfig,
    /// Token names to ids, with the visual tokens among them.
    pub vocabulary_map: HashMap<String, u32>,
}

impl Emu3Config {
    /// Reads `dir/config.json`.
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{} is not an Emu3 config: {e}", path.display()))?;
        anyhow::ensure!(
            cfg.model_type == "emu3",
            "model_type is {:?}, not \"emu3\"",
            cfg.model_type
        );
        Ok(cfg)
    }
}

/// The code of a visual token's name, `<|visual token NNNNNN|>` (transformers'
/// `Emu3ImageVocabularyMapping`); `None` for other names.
pub fn visual_code(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("<|visual token ")?.strip_suffix("|>")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `zipar.json`, optional, next to an Emu3-Gen folder's Hugging Face files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Emu3Settings {
    /// Pixels of a square image (the official sampler's `image_area`, 720 x 720).
    #[serde(default = "default_area")]
    pub image_area: usize,
    /// Code grid (rows, columns); from `image_area` when absent.
    #[serde(default)]
    pub grid: Option<(usize, usize)>,
    /// Appended to every prompt.
    #[serde(default = "default_positive")]
    pub positive_prompt: String,
    /// The unconditional prompt of guidance.
    #[serde(default = "default_negative")]
    pub negative_prompt: String,
}

fn default_area() -> usize {
    720 * 720
}
fn default_positive() -> String {
    POSITIVE_PROMPT.into()
}
fn default_negative() -> String {
    NEGATIVE_PROMPT.into()
}

impl Default for Emu3Settings {
    fn default() -> Self {
        Self {
            image_area: default_area(),
            grid: None,
            positive_prompt: default_positive(),
            negative_prompt: default_negative(),
        }
    }
}

impl Emu3Settings {
    /// `dir/zipar.json`, or the defaults when there is none.
    pub fn read(dir: &Path) -> Result<Self, WeightsError> {
        super::chameleon::read_zipar_json(dir)
    }

    /// The code grid (rows, columns): a square of `image_area` pixels at `downsample` pixels
    /// per code, as the processor's `calculate_generate_size` with ratio 1:1.
    pub fn grid(&self, dir: &Path, downsample: usize) -> Result<(usize, usize), WeightsError> {
        let side = ((self.image_area as f64).sqrt() / downsample.max(1) as f64).round() as usize;
        let grid = self.grid.unwrap_or((side, side));
        if !(1..=512).contains(&grid.0) || !(1..=512).contains(&grid.1) {
            return Err(WeightsError::BadManifest {
                path: dir.join("zipar.json"),
                msg: format!(
                    "a {}x{} code grid: each side must be 1 to 512 codes",
                    grid.0, grid.1
                ),
            });
        }
        Ok(grid)
    }
}

/// Emu3's generation template (see the module's notes).
pub struct Emu3Template {
    tokenizer: tokenizers::Tokenizer,
    /// `<|image start|>{h}*{w}<|image token|>`.
    image_prefix: String,
    positive: String,
    negative: String,
}

/// The special tokens the template and the layout need.
const BOS: &str = "<|extra_203|>";
const IMAGE_START: &str = "<|image start|>";
const IMAGE_WRAPPER: &str = "<|image token|>";
const END_OF_ROW: &str = "<|extra_200|>";

impl Emu3Template {
    /// Checks that `tokenizer` reads the special tokens whole, as the vocabulary numbers them.
    pub fn new(
        tokenizer: tokenizers::Tokenizer,
        vocab: &HashMap<String, u32>,
        grid: (usize, usize),
        settings: &Emu3Settings,
    ) -> anyhow::Result<Self> {
        let t = Self {
            tokenizer,
            image_prefix: format!("{IMAGE_START}{}*{}{IMAGE_WRAPPER}", grid.0, grid.1),
            positive: settings.positive_prompt.clone(),
            negative: settings.negative_prompt.clone(),
        };
        for name in [BOS, IMAGE_START, IMAGE_WRAPPER] {
            let want = vocab
                .get(name)
                .ok_or_else(|| anyhow::anyhow!("the vocabulary has no {name} token"))?;
            let got = t.tokenize(name)?;
            anyhow::ensure!(
                got == [*want],
                "the tokenizer reads {name} as {got:?}, the vocabulary numbers it {want}"
            );
        }
        Ok(t)
    }

    fn tokenize(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }
}

impl TextPrompt for Emu3Template {
    fn encode(&self, prompt: &str) -> anyhow::Result<Vec<u32>> {
        self.tokenize(&format!(
            "{BOS}{prompt}{}{}",
            self.positive, self.image_prefix
        ))
    }

    fn unconditional(&self, _ids: &[u32]) -> anyhow::Result<Vec<u32>> {
        self.tokenize(&format!("{BOS}{}{}", self.negative, self.image_prefix))
    }
}

/// The files of an Emu3-Gen folder.
#[derive(Debug, Clone)]
pub struct Emu3Files {
    /// `model.safetensors` or `model.safetensors.index.json`: the language model and the
    /// vision tokenizer.
    pub weights: PathBuf,
    /// `tokenizer.json`.
    pub tokenizer: PathBuf,
}

impl Emu3Files {
    /// Finds them in `dir`, naming the first one missing.
    pub fn find(dir: &Path) -> Result<Self, WeightsError> {
        let single = dir.join("model.safetensors");
        let files = Self {
            weights: if single.is_file() {
                single
            } else {
                dir.join("model.safetensors.index.json")
            },
            tokenizer: dir.join("tokenizer.json"),
        };
        for f in [&files.weights, &files.tokenizer] {
            if !f.is_file() {
                return Err(WeightsError::MissingFile(f.clone()));
            }
        }
        Ok(files)
    }

    /// Every file a load reads, shards one by one.
    pub fn all(&self) -> Result<Vec<PathBuf>, WeightsError> {
        Ok(crate::weights::shard_files(&self.weights)?
            .unwrap_or_else(|| vec![self.weights.clone()]))
    }
}

/// Where the checkpoint keeps the two models: transformers saves `text_model.model.*`,
/// `text_model.lm_head.*` and `vqmodel.*`; its modules are named `model.text_model.*`,
/// `lm_head.*` and `model.vqmodel.*`, and either may be on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyStyle {
    Saved,
    Modules,
}

impl KeyStyle {
    fn detect(weights: &Path) -> Result<Self, WeightsError> {
        let saved =
            crate::weights::count_elements_where(weights, &|n: &str| n.starts_with("text_model."))?;
        Ok(if saved > 0 {
            Self::Saved
        } else {
            Self::Modules
        })
    }

    fn vq_prefix(self) -> &'static str {
        match self {
            Self::Saved => "vqmodel",
            Self::Modules => "model.vqmodel",
        }
    }

    /// The stored name of a language-model tensor the GPT asks for by its Hugging Face
    /// causal-LM name (`model.*`, `lm_head.*`).
    fn lm_name(self, name: &str) -> String {
        match (self, name.strip_prefix("model.")) {
            (Self::Saved, Some(rest)) => format!("text_model.model.{rest}"),
            (Self::Saved, None) => format!("text_model.{name}"),
            (Self::Modules, Some(rest)) => format!("model.text_model.{rest}"),
            (Self::Modules, None) => name.to_string(),
        }
    }

    /// Parameters of the language model and of the VQ decoder (the encoder is not counted),
    /// from the safetensors headers.
    fn parameters(self, weights: &Path) -> Result<(u64, u64), WeightsError> {
        let vq = self.vq_prefix();
        let lm = crate::weights::count_elements_where(weights, &|n: &str| !n.starts_with(vq))?;
        let decoder = crate::weights::count_elements_where(weights, &|n: &str| {
            n.starts_with(vq) && self.keep(n)
        })?;
        Ok((lm, decoder))
    }

    /// Whether a stored tensor is read: the language model and the VQ decoder, not the VQ
    /// encoder.
    fn keep(self, name: &str) -> bool {
        let vq = self.vq_prefix();
        match name.strip_prefix(vq).and_then(|r| r.strip_prefix('.')) {
            Some(rest) => {
                rest.starts_with("decoder.")
                    || rest.starts_with("quantize.")
                    || rest.starts_with("post_quant_conv.")
            }
            None => !name.contains("vqmodel."),
        }
    }
}

/// Bytes an Emu3-Gen run needs: the language model at `dtype_bytes`, its KV cache for the
/// longest prompt and the grid with end-of-row tokens (both CFG halves), and the decoder in f32
/// with its largest activations (three full-resolution maps of its first level).
pub fn memory_needed(
    cfg: &super::llamagen::GptConfig,
    params: u64,
    dtype_bytes: u64,
    grid: (usize, usize),
    vq: (u64, &MovqConfig),
) -> u64 {
    let (vq_params, vq_cfg) = vq;
    let side = vq_cfg.downsample() as u64;
    let pixels = grid.0 as u64 * side * grid.1 as u64 * side;
    let channels =
        (vq_cfg.base_channels * vq_cfg.channel_multiplier.first().copied().unwrap_or(1)) as u64;
    super::chameleon::kv_cache_bytes(cfg, dtype_bytes, grid)
        + params * dtype_bytes
        + vq_params * 4
        + 3 * pixels * channels * 4
}

/// What loading an Emu3-Gen folder reads and roughly takes in memory.
pub fn load_summary(dir: &Path, device: &candle_core::Device) -> Result<LoadSummary, WeightsError> {
    use crate::weights::{human_bytes, weight_bytes};
    let cfg_path = dir.join("config.json");
    let bad = |msg: String| WeightsError::BadManifest {
        path: cfg_path.clone(),
        msg,
    };
    let cfg = Emu3Config::read(dir).map_err(|e| bad(format!("{e:#}")))?;
    let gpt_cfg = cfg
        .text_config
        .gpt_config(MAX_PROMPT)
        .map_err(|e| bad(format!("{e:#}")))?;
    let files = Emu3Files::find(dir)?;
    let style = KeyStyle::detect(&files.weights)?;
    let grid = Emu3Settings::read(dir)?.grid(dir, cfg.vq_config.downsample())?;
    let (params, vq_params) = style.parameters(&files.weights)?;
    let dtype = super::llamagen::gpt_dtype(device);
    let need = memory_needed(
        &gpt_cfg,
        params,
        dtype.size_in_bytes() as u64,
        grid,
        (vq_params, &cfg.vq_config),
    );
    let w = weight_bytes(&files.weights);
    Ok(LoadSummary {
        weight_bytes: w,
        text: format!(
            "{}: Emu3 {:.1}M parameters + vision decoder {:.1}M, about {} as {dtype:?} on {}; {} in all with the KV cache of a {}x{} image",
            human_bytes(w as f64),
            params as f64 / 1e6,
            vq_params as f64 / 1e6,
            human_bytes(params as f64 * dtype.size_in_bytes() as f64),
            if device.is_cpu() { "cpu" } else { "gpu" },
            human_bytes(need as f64),
            grid.0,
            grid.1,
        ),
    })
}

/// Loads an Emu3-Gen folder onto `device`: `config.json`, the checkpoint (the VQ encoder's
/// weights are not read), `tokenizer.json` and the optional `zipar.json` ([`Emu3Settings`]).
pub fn load_emu3(
    dir: &Path,
    device: &candle_core::Device,
    on_file: crate::weights::OnFile,
) -> Result<EndOfRowLm, WeightsError> {
    use crate::weights::{mismatch, read_tensors_placed};
    let cfg_path = dir.join("config.json");
    let bad = |path: &Path, msg: String| WeightsError::BadManifest {
        path: path.to_path_buf(),
        msg,
    };
    let cfg = Emu3Config::read(dir).map_err(|e| bad(&cfg_path, format!("{e:#}")))?;
    cfg.vq_config
        .validate()
        .map_err(|e| bad(&cfg_path, format!("vq_config: {e}")))?;
    let settings = Emu3Settings::read(dir)?;
    let grid = settings.grid(dir, cfg.vq_config.downsample())?;
    let files = Emu3Files::find(dir)?;
    let gpt_cfg = cfg
        .text_config
        .gpt_config(MAX_PROMPT)
        .map_err(|e| bad(&cfg_path, format!("text_config: {e:#}")))?;
    // The cheap checks first: a bad tokenizer, vocabulary or grid is named before gigabytes of
    // weights are read.
    let tokenizer =
        tokenizers::Tokenizer::from_file(&files.tokenizer).map_err(|e| WeightsError::Corrupt {
            path: files.tokenizer.clone(),
            msg: format!("not a tokenizer: {e}"),
        })?;
    let template = Emu3Template::new(tokenizer, &cfg.vocabulary_map, grid, &settings)
        .map_err(|e| bad(&files.tokenizer, format!("{e:#}")))?;
    let vocab = ImageVocabulary::from_names(&cfg.vocabulary_map, visual_code, "<|visual token N|>")
        .map_err(|e| bad(&cfg_path, format!("{e:#}")))?;
    let eol = *cfg.vocabulary_map.get(END_OF_ROW).ok_or_else(|| {
        bad(
            &cfg_path,
            format!("the vocabulary has no end-of-row token {END_OF_ROW}"),
        )
    })?;
    let style = KeyStyle::detect(&files.weights)?;
    let dtype = super::llamagen::gpt_dtype(device);
    if device.is_cpu() {
        let (params, vq_params) = style.parameters(&files.weights)?;
        let need = memory_needed(
            &gpt_cfg,
            params,
            dtype.size_in_bytes() as u64,
            grid,
            (vq_params, &cfg.vq_config),
        );
        super::chameleon::refuse_if_too_big(
            need,
            &format!("weights as {dtype:?}, KV cache, vision decoder"),
            &cfg_path,
        )?;
    }
    // One read of the checkpoint serves both models (tensors are shared, not copied): the
    // language model in the device's dtype, the decoder in f32.
    let vq_prefix = style.vq_prefix();
    let dtype_of = |n: &str| {
        if n.starts_with(vq_prefix) {
            candle_core::DType::F32
        } else {
            dtype
        }
    };
    let tensors = read_tensors_placed(
        &files.weights,
        Some(&|n: &str| style.keep(n)),
        &dtype_of,
        device,
        on_file,
    )?;
    let lm = candle_nn::VarBuilder::from_tensors(tensors.clone(), dtype, device)
        .rename_f(move |name| style.lm_name(name));
    let gpt = Gpt::load_chameleon(&gpt_cfg, grid.0, grid.1 + 1, lm)
        .map_err(|e| mismatch(&files.weights, e))?;
    let vq = candle_nn::VarBuilder::from_tensors(tensors, candle_core::DType::F32, device)
        .pp(style.vq_prefix());
    let movq = MovqDecoder::load(&cfg.vq_config, vq).map_err(|e| mismatch(&files.weights, e))?;
    let decoder = Arc::new(MovqGridDecoder { movq, grid });
    let model =
        EndOfRowLm::new(gpt, vocab, eol, decoder).map_err(|e| bad(&cfg_path, format!("{e:#}")))?;
    Ok(model.with_template(Box::new(template)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visual_token_names_map_to_codes() {
        assert_eq!(visual_code("<|visual token 000000|>"), Some(0));
        assert_eq!(visual_code("<|visual token 032767|>"), Some(32767));
        assert_eq!(visual_code("<|visual token |>"), None);
        assert_eq!(visual_code("<|visual token 12a|>"), None);
        assert_eq!(visual_code("<|extra_200|>"), None);
    }

    #[test]
    fn both_key_layouts_of_a_checkpoint_are_read() {
        let saved = KeyStyle::Saved;
        assert_eq!(
            saved.lm_name("model.layers.0.self_attn.q_proj.weight"),
            "text_model.model.layers.0.self_attn.q_proj.weight"
        );
        assert_eq!(saved.lm_name("lm_head.weight"), "text_model.lm_head.weight");
        assert!(saved.keep("vqmodel.decoder.conv_in.weight"));
        assert!(saved.keep("vqmodel.quantize.embedding.weight"));
        assert!(!saved.keep("vqmodel.encoder.conv_in.weight"));
        assert!(saved.keep("text_model.model.norm.weight"));
        let modules = KeyStyle::Modules;
        assert_eq!(
            modules.lm_name("model.embed_tokens.weight"),
            "model.text_model.embed_tokens.weight"
        );
        assert_eq!(modules.lm_name("lm_head.weight"), "lm_head.weight");
        assert!(modules.keep("model.vqmodel.post_quant_conv.conv.weight"));
        assert!(!modules.keep("model.vqmodel.quant_conv.conv.weight"));
        assert!(!modules.keep("model.vqmodel.encoder.x"));
    }

    #[test]
    fn the_default_grid_is_the_official_720_pixel_square() {
        let s = Emu3Settings::default();
        assert_eq!(s.grid(Path::new("."), 8).expect("grid"), (90, 90));
        let huge = Emu3Settings {
            grid: Some((600, 10)),
            ..Emu3Settings::default()
        };
        assert!(huge.grid(Path::new("."), 8).is_err());
    }

    #[test]
    fn emu3_gen_needs_what_its_sizes_say() {
        // Emu3-Gen: 32 layers of 4096, 8 key/value heads of 128, 8.0e9 parameters in bf16,
        // 90 x 90 codes; the MoVQ decoder about 0.1e9 parameters, 256 channels at 720 px.
        let cfg: ChameleonConfig = serde_json::from_str(
            r#"{"model_type": "emu3_text_model", "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "vocab_size": 184622, "rope_theta": 1000000.0}"#,
        )
        .expect("config");
        let gpt = cfg.gpt_config(MAX_PROMPT).expect("gpt");
        let vq: MovqConfig = serde_json::from_str("{}").expect("vq");
        let need = memory_needed(&gpt, 8_000_000_000, 2, (90, 90), (100_000_000, &vq));
        // 2 halves x 32 layers x K and V x (512 + 90 x 91) positions x 1024 x 2 B = 2.3 GB
        let kv = 2 * 32 * 2 * (512 + 90 * 91) * 1024 * 2;
        let act = 3 * 720 * 720 * 256 * 4;
        assert_eq!(need, 16_000_000_000 + kv + 400_000_000 + act);
        // 16 GB + 2.3 GB + 0.4 GB + 1.6 GB of decoder activations at 720 x 720
        assert!((20.1e9..20.4e9).contains(&(need as f64)), "{need}");
    }
}
