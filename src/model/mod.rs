//! The models: the [`ImageArModel`] trait that the decoder drives, and its implementations.

pub mod chameleon;
pub mod classifier;
pub mod cpu_kernels;
pub mod dense;
pub mod emu3;
pub mod end_of_row;
pub mod kv;
pub mod llamagen;
pub mod movq;
pub mod palette;
pub mod registry;
pub mod t5;
pub mod winograd;

use crate::decode::schedule::Layout;

/// What an image is conditioned on.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// A class id of a class-conditional model.
    Class(u32),
    /// The text encoder's rows `[len, caption_dim]` (row-major) for a caption of `len`
    /// tokens, at most the model's caption length; the model places and masks them.
    Caption {
        /// Rows of the embedding.
        len: usize,
        /// Row-major values.
        values: Vec<f32>,
    },
    /// A free-text caption for a text-conditional model, which encodes it itself.
    Text(String),
    /// A prompt already tokenized, for models conditioned on tokens of their own vocabulary
    /// (Chameleon / Lumina-mGPT).
    Tokens(Vec<u32>),
    /// A tokenized prompt with its unconditional counterpart for classifier-free guidance; the
    /// shorter is padded on the left and the padding hidden, so that the two halves of the
    /// batch end at the same slot and share the image's positions.
    TokenPair {
        /// The prompt.
        cond: Vec<u32>,
        /// The unconditional prompt.
        uncond: Vec<u32>,
    },
}

/// One input of a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelInput {
    /// Token id fed.
    pub token: u32,
    /// Position in the image region (slot minus the condition length).
    pub pos: usize,
    /// Whether this input's logits are needed.
    pub wants_logits: bool,
}

impl ModelInput {
    /// `tokens` fed at positions `0..`, each wanting its logits: a teacher-forced pass.
    pub fn teacher_forced(tokens: &[u32]) -> Vec<ModelInput> {
        tokens
            .iter()
            .enumerate()
            .map(|(pos, &token)| ModelInput {
                token,
                pos,
                wants_logits: true,
            })
            .collect()
    }
}

/// Logits of one pass: one row per input that wanted them, in input order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PassLogits {
    /// Conditional logits.
    pub cond: Vec<Vec<f32>>,
    /// Unconditional logits, present when the run uses classifier-free guidance.
    pub uncond: Option<Vec<Vec<f32>>>,
}

/// Attention probabilities of one pass, recorded when capture is on (the conditional half of
/// a CFG batch).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PassAttention {
    /// Slot of each input (the condition's slots come first, then the image positions).
    pub slots: Vec<usize>,
    /// Number of condition slots before the image region.
    pub cond_len: usize,
    /// Per layer, per input: the mean over heads of the probabilities over slots `0..len`.
    pub mean: Vec<Vec<Vec<f32>>>,
    /// The layer whose heads are kept one by one in `heads`.
    pub head_layer: usize,
    /// Per head of `head_layer`, per input, over slots `0..len`.
    pub heads: Vec<Vec<Vec<f32>>>,
}

/// One token's attention, as the UI and the trace use it: over the condition's slots and
/// then the image positions before the query.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenAttention {
    /// Per layer, the mean over heads.
    pub layers: Vec<Vec<f32>>,
    /// The layer whose heads are in `heads`.
    pub head_layer: usize,
    /// Per head of `head_layer`.
    pub heads: Vec<Vec<f32>>,
    /// The pass whose query this is: what was written then is what it could see (for an
    /// adaptive draft, the pass that drew it, not the one that accepted it).
    pub pass: usize,
}

impl TokenAttention {
    /// Input `i` of a pass captured in pass `pass`.
    pub fn of_input(a: &PassAttention, i: usize, pass: usize) -> Self {
        Self {
            layers: a.mean.iter().map(|l| l[i].clone()).collect(),
            head_layer: a.head_layer,
            heads: a.heads.iter().map(|h| h[i].clone()).collect(),
            pass,
        }
    }

    /// The mean over heads and layers.
    pub fn mean(&self) -> Vec<f32> {
        let n = self.layers.len().max(1) as f32;
        let len = self.layers.first().map_or(0, Vec::len);
        (0..len)
            .map(|j| self.layers.iter().map(|l| l[j]).sum::<f32>() / n)
            .collect()
    }

    /// One view: `layer` `None` is the mean of the layers; `head` applies to `head_layer` only
    /// (`None`: the mean of its heads).
    pub fn select(&self, layer: Option<usize>, head: Option<usize>) -> Option<Vec<f32>> {
        match (layer, head) {
            (None, _) => Some(self.mean()),
            (Some(l), Some(h)) if l == self.head_layer => self.heads.get(h).cloned(),
            (Some(l), _) => self.layers.get(l).cloned(),
        }
    }
}

/// An RGB image, 8 bits per channel, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width * height * 3` bytes.
    pub pixels: Vec<u8>,
}

/// Options of one generation run that the model must know.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RunOptions {
    /// Batch the unconditional half for classifier-free guidance.
    pub cfg: bool,
    /// Mask never-written slots (the official code leaves them visible as zero K/V).
    pub mask_unwritten: bool,
}

/// An autoregressive image model with a slot-indexed KV cache.
pub trait ImageArModel: Send {
    /// Token grid (rows, columns).
    fn grid(&self) -> (usize, usize);
    /// How image tokens are laid out.
    fn layout(&self) -> Layout;
    /// Size of the image-token vocabulary.
    fn vocab_size(&self) -> usize;
    /// Starts a new image: resets the cache, feeds the condition and returns the logits that
    /// predict the first token.
    fn prefill(&mut self, cond: &Condition, opts: RunOptions) -> anyhow::Result<PassLogits>;
    /// One forward pass over several inputs at once; attention is causal over slots.
    fn step(&mut self, inputs: &[ModelInput]) -> anyhow::Result<PassLogits>;
    /// Whether a pass with many inputs costs about as much as a one-input pass (a GPU, where
    /// passes are memory-bound). On a CPU each input adds arithmetic, and the exact mode then
    /// feeds fewer inputs per pass at the price of a few more passes.
    fn wide_passes_are_cheap(&self) -> bool {
        !self.on_cpu()
    }
    /// Whether the model computes on the CPU with candle's thread pool; a run then goes inside
    /// that pool as a whole (see [`crate::decode::engine::generate`]).
    fn on_cpu(&self) -> bool {
        false
    }
    /// Starts (`Some(layer)`: that layer's heads are kept one by one) or stops recording the
    /// attention probabilities of every pass. Off, it costs nothing. Returns whether the model
    /// can record them.
    fn set_attention_capture(&mut self, _head_layer: Option<usize>) -> bool {
        false
    }
    /// The attention of the last pass, when capture is on.
    fn take_attention(&mut self) -> Option<PassAttention> {
        None
    }
    /// The end-of-row token, for models whose layout has one.
    fn separator_token(&self) -> Option<u32> {
        None
    }
    /// Decodes a full grid of tokens (raster order) to pixels.
    fn decode_image(&self, tokens: &[u32]) -> anyhow::Result<RgbImage> {
        self.image_decoder().decode(tokens)
    }
    /// A handle on the image decoder that another thread can use (live previews).
    fn image_decoder(&self) -> std::sync::Arc<dyn ImageDecoder>;
}

/// Tokens to pixels; shareable between threads.
pub trait ImageDecoder: Send + Sync {
    /// Decodes a full grid of tokens (raster order).
    fn decode(&self, tokens: &[u32]) -> anyhow::Result<RgbImage>;
    /// The token grid it decodes (rows, columns).
    fn grid(&self) -> (usize, usize);
    /// Number of codes.
    fn codebook_size(&self) -> usize;
}
