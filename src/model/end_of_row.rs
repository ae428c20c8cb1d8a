//! The image models that are language models: Lumina-mGPT ([`super::chameleon`]) and
//! Emu3-Gen ([`super::emu3`]) write an image as tokens of their text vocabulary, row by row,
//! each row closed by an end-of-row token ([`Layout::EndOfRow`]). [`EndOfRowLm`] drives either
//! one through the GPT of `llamagen::gpt` (its `Family` picks the architecture); the model
//! modules read their folders, vocabularies and templates.

use std::sync::Arc;

use super::chameleon::ImageVocabulary;
use super::llamagen::{Gpt, Session};
use super::{Condition, ImageArModel, ImageDecoder, ModelInput, PassLogits, RunOptions};
use crate::decode::schedule::Layout;

/// A language model that writes images as tokens of its own vocabulary (Lumina-mGPT's
/// Chameleon, Emu3-Gen's Llama) as an [`ImageArModel`]: conditioned on a prompt of tokens
/// (ending with the image prefix, so that the prefill predicts the first image token), an
/// `h x w` grid whose rows each end with an end-of-row token, and the image tokens exposed as
/// VQ codes (the model maps them to and from its BPE ids, and returns the logits of the image
/// tokens only, in code order: both models sample only image tokens inside the image).
///
/// Unwritten positions are always hidden: the official Lumina-mGPT ZipAR keeps a compact cache
/// of the entries written so far, so a query sees exactly the written entries at positions up
/// to its own (tests/chameleon.rs checks greedy tokens against that reference). Emu3-Gen has no
/// official ZipAR; it follows the same rule.
pub struct EndOfRowLm {
    gpt: Gpt,
    session: Option<Session>,
    vocab: ImageVocabulary,
    eol: u32,
    grid: (usize, usize),
    decoder: Arc<dyn ImageDecoder>,
    /// Turns a text prompt into tokens (a model opened from a folder has one).
    template: Option<Box<dyn TextPrompt>>,
}

/// A model's generation template: a text prompt to the tokens of a run, and the unconditional
/// prompt of classifier-free guidance.
pub trait TextPrompt: Send {
    /// The prompt's token ids, ending with the image prefix.
    fn encode(&self, prompt: &str) -> anyhow::Result<Vec<u32>>;
    /// The unconditional prompt for the run whose prompt is `ids` (of any length: the shorter
    /// of the two is padded and hidden).
    fn unconditional(&self, ids: &[u32]) -> anyhow::Result<Vec<u32>>;
}

impl EndOfRowLm {
    /// From a GPT loaded for `h` rows of `w + 1` positions (image tokens and the
    /// end-of-row token), its image vocabulary, the end-of-row token id and the image decoder.
    pub fn new(
        gpt: Gpt,
        vocab: ImageVocabulary,
        eol: u32,
        decoder: Arc<dyn ImageDecoder>,
    ) -> anyhow::Result<Self> {
        let (h, w1) = gpt.grid();
        anyhow::ensure!(
            w1 >= 2,
            "the GPT must be loaded for rows of w + 1 positions"
        );
        let grid = (h, w1 - 1);
        anyhow::ensure!(
            decoder.grid() == grid,
            "the image decoder is for a {:?} grid, the model for {grid:?}",
            decoder.grid()
        );
        anyhow::ensure!(
            decoder.codebook_size() == vocab.len(),
            "the image decoder has {} codes, the model's vocabulary {} image tokens",
            decoder.codebook_size(),
            vocab.len()
        );
        anyhow::ensure!(
            vocab.code(eol).is_none(),
            "the end-of-row token {eol} is an image token"
        );
        Ok(Self {
            gpt,
            session: None,
            vocab,
            eol,
            grid,
            decoder,
            template: None,
        })
    }

    /// With the generation template that turns text prompts into tokens.
    pub fn with_template(mut self, template: Box<dyn TextPrompt>) -> Self {
        self.template = Some(template);
        self
    }

    fn image_logits(&self, out: PassLogits) -> PassLogits {
        let map = |rows: Vec<Vec<f32>>| -> Vec<Vec<f32>> {
            rows.iter().map(|r| self.vocab.image_logits(r)).collect()
        };
        PassLogits {
            cond: map(out.cond),
            uncond: out.uncond.map(map),
        }
    }
}

impl ImageArModel for EndOfRowLm {
    fn grid(&self) -> (usize, usize) {
        self.grid
    }

    fn layout(&self) -> Layout {
        Layout::EndOfRow
    }

    fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    fn separator_token(&self) -> Option<u32> {
        // One past the codes: mapped to the end-of-row token id when fed.
        Some(self.vocab.len() as u32)
    }

    fn prefill(&mut self, cond: &Condition, opts: RunOptions) -> anyhow::Result<PassLogits> {
        self.session = None;
        let opts = RunOptions {
            mask_unwritten: true,
            ..opts
        };
        let ids = match (cond, &self.template) {
            (Condition::Text(prompt), Some(t)) => t.encode(prompt)?,
            (Condition::Text(_), None) => {
                anyhow::bail!("this model has no tokenizer to encode the prompt with")
            }
            (Condition::Tokens(ids), _) => ids.clone(),
            _ => anyhow::bail!("this model takes a text prompt"),
        };
        let cond = if opts.cfg {
            Condition::TokenPair {
                uncond: match &self.template {
                    Some(t) => t.unconditional(&ids)?,
                    None => super::chameleon::unconditional_prompt(&ids, None),
                },
                cond: ids,
            }
        } else {
            Condition::Tokens(ids)
        };
        let cond = &cond;
        let (session, out) = self.gpt.start(cond, opts, None)?;
        self.session = Some(session);
        Ok(self.image_logits(out))
    }

    fn step(&mut self, inputs: &[ModelInput]) -> anyhow::Result<PassLogits> {
        let sep = self.vocab.len() as u32;
        let inputs = inputs
            .iter()
            .map(|i| {
                let token = if i.token == sep {
                    self.eol
                } else {
                    self.vocab.bpe(i.token).ok_or_else(|| {
                        anyhow::anyhow!("code {} is outside the {} image codes", i.token, sep)
                    })?
                };
                Ok(ModelInput { token, ..*i })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let Some(session) = self.session.as_mut() else {
            anyhow::bail!("step called before prefill");
        };
        let out = self.gpt.step(session, &inputs)?;
        Ok(self.image_logits(out))
    }

    fn on_cpu(&self) -> bool {
        self.gpt.device().is_cpu()
    }

    fn image_decoder(&self) -> Arc<dyn ImageDecoder> {
        self.decoder.clone()
    }
}
