//! The LlamaGen GPT (autoregressive/models/gpt.py), with a slot-indexed KV cache so that one
//! forward pass can take several (token, slot) inputs, as ZipAR needs.
//!
//! `VarBuilder` paths mirror the original state-dict keys exactly.

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder};

use super::config::{Family, GptConfig};
use super::rope2d::{self, RopeTable};
use crate::model::cpu_kernels;
use crate::model::dense::Dense;
use crate::model::kv::{KeyLayout, LayerKv, SlotIndex};
use crate::model::{Condition, ModelInput, PassAttention, PassLogits, RunOptions};

#[derive(Debug)]
struct Attention {
    wqkv: Dense,
    wo: Dense,
    n_head: usize,
    /// Key/value heads, dividing `n_head` (fewer with grouped-query attention).
    n_kv_head: usize,
    head_dim: usize,
    /// Chameleon: the LayerNorms of each head's queries and keys.
    qk_norm: Option<(HeadNorm, HeadNorm)>,
    family: Family,
}

/// Chameleon's query / key norm: a LayerNorm over each head's `head_dim` values (no affine
/// part), then a scale and a shift of its own per head, `[n_head, head_dim]`
/// (transformers' `ChameleonLayerNorm`).
#[derive(Debug)]
struct HeadNorm {
    weight: Tensor,
    bias: Tensor,
}

impl HeadNorm {
    const EPS: f64 = 1e-5;

    /// Reads `weight` and `bias` as `[n_head, head_dim]` (Hugging Face's conversion) or as
    /// `[m, head_dim]` with one row per model-parallel shard shared by that shard's
    /// `n_head / m` heads (Lumina-mGPT's own checkpoints: `[1, head_dim]`).
    fn load(n_head: usize, head_dim: usize, vb: VarBuilder) -> Result<Self> {
        let read = |name: &str| -> Result<Tensor> {
            let t = vb.get_unchecked(name)?;
            let (m, d) = t.dims2()?;
            if d != head_dim || m == 0 || !n_head.is_multiple_of(m) {
                candle_core::bail!(
                    "{name} of a query/key norm is [{m}, {d}]: expected [{n_head}, {head_dim}] or one row per shard of heads"
                );
            }
            t.unsqueeze(1)?
                .broadcast_as((m, n_head / m, d))?
                .reshape((n_head, d))
        };
        Ok(Self {
            weight: read("weight")?,
            bias: read("bias")?,
        })
    }

    /// `x: [.., n_head, head_dim]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        centred
            .broadcast_div(&(var + Self::EPS)?.sqrt()?)?
            .to_dtype(dt)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

#[derive(Debug)]
struct FeedForward {
    w1: Dense,
    w2: Dense,
    w3: Dense,
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.w1.forward(x)?.silu()?;
        self.w2.forward(&(gate * self.w3.forward(x)?)?)
    }
}

#[derive(Debug)]
struct Block {
    attention: Attention,
    feed_forward: FeedForward,
    attention_norm: RmsNorm,
    ffn_norm: RmsNorm,
}

/// Per-pass tensors shared by every layer.
struct PassCtx {
    cos: Tensor,
    sin: Tensor,
    index: SlotIndex,
    len: usize,
    slots: Vec<usize>,
    /// Per batch entry, `len` values: 0 for slots a query may attend to at all, `-inf` for a
    /// prompt's padding and for never-written slots when masked.
    bias: Vec<f32>,
    /// Additive `[B, 1, k, len]` mask for candle's attention; `None` on the CPU fast path
    /// unless attention is captured.
    mask: Option<Tensor>,
    /// Whether the pass returns its attention probabilities.
    capture: bool,
}

/// The key layout of the cache: transposed for the CPU attention kernel of [`cpu_kernels`]
/// (f32 on the CPU), slot-major for candle's attention elsewhere.
fn key_layout(dev: &Device, dtype: DType) -> KeyLayout {
    if dev.is_cpu() && dtype == DType::F32 {
        KeyLayout::Transposed
    } else {
        KeyLayout::SlotMajor
    }
}

impl Attention {
    /// `x: [B * k, dim]` (rows of both CFG halves stacked): 2D projections are one GEMM each.
    /// With `ctx.capture`, also the attention probabilities `[B, H, k, len]`.
    fn forward(
        &self,
        x: &Tensor,
        b: usize,
        ctx: &PassCtx,
        kv: &mut LayerKv,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (rows, dim) = x.dims2()?;
        let k = rows / b;
        let qkv = self.wqkv.forward(x)?;
        let kv_dim = self.n_kv_head * self.head_dim;
        // q, then k and v with `n_kv_head` heads each
        let split = |i: usize| -> Result<Tensor> {
            let (start, heads) = match i {
                0 => (0, self.n_head),
                1 => (dim, self.n_kv_head),
                _ => (dim + kv_dim, self.n_kv_head),
            };
            let part = qkv
                .narrow(D::Minus1, start, heads * self.head_dim)?
                .reshape((b, k, heads, self.head_dim))?;
            let part = match (&self.qk_norm, i) {
                (Some((q_norm, _)), 0) => q_norm.forward(&part)?,
                (Some((_, k_norm)), 1) => k_norm.forward(&part)?,
                _ => part,
            };
            part.transpose(1, 2)
        };
        let rope = match self.family {
            Family::LlamaGen => rope2d::apply,
            Family::Chameleon | Family::Llama => rope2d::apply_rotate_half,
        };
        let q = rope(&split(0)?, &ctx.cos, &ctx.sin)?;
        let key = rope(&split(1)?, &ctx.cos, &ctx.sin)?;
        let value = split(2)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        if kv.layout() == KeyLayout::Transposed {
            kv.write(&ctx.index, &key, &value)?;
            let (keys, values) = kv.buffers();
            let op = cpu_kernels::SlotAttention {
                slots: &ctx.slots,
                bias: &ctx.bias,
                len: ctx.len,
                scale: scale as f32,
            };
            let q = q.contiguous()?;
            let out = q.apply_op3_no_bwd(keys, values, &op)?;
            // Capture recomputes the probabilities with candle's ops (keys are [B, Hkv, D, S]).
            let probs = match (&ctx.mask, ctx.capture) {
                (Some(mask), true) => {
                    let kt = self.repeat_kv(&keys.narrow(3, 0, ctx.len)?)?.contiguous()?;
                    let att = (q.matmul(&kt)? * scale)?.broadcast_add(mask)?;
                    Some(candle_nn::ops::softmax_last_dim(&att)?)
                }
                _ => None,
            };
            return Ok((self.wo.forward(&out.reshape((b * k, dim))?)?, probs));
        }
        let Some(mask) = &ctx.mask else {
            candle_core::bail!("the slot-major attention needs a mask");
        };
        let (keys, values) = kv.write_and_view(&ctx.index, &key, &value, ctx.len)?;
        let (keys, values) = (self.repeat_kv(&keys)?, self.repeat_kv(&values)?);
        let att = (q.matmul(&keys.t()?)? * scale)?.broadcast_add(&mask.to_dtype(q.dtype())?)?;
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let out = att
            .matmul(&values)?
            .transpose(1, 2)?
            .reshape((b * k, dim))?;
        let probs = ctx.capture.then(|| att.clone());
        Ok((self.wo.forward(&out)?, probs))
    }
}

impl Attention {
    /// `[B, Hkv, a, b]` -> `[B, H, a, b]`, each key/value head serving `H / Hkv` query heads
    /// in turn (transformers' `repeat_kv`).
    fn repeat_kv(&self, x: &Tensor) -> Result<Tensor> {
        let groups = self.n_head / self.n_kv_head;
        if groups == 1 {
            return Ok(x.clone());
        }
        let (b, hkv, a, c) = x.dims4()?;
        x.unsqueeze(2)?
            .broadcast_as((b, hkv, groups, a, c))?
            .reshape((b, hkv * groups, a, c))
    }
}

impl Block {
    fn load(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.family != Family::LlamaGen {
            return Self::load_chameleon(cfg, vb);
        }
        let dim = cfg.dim;
        let hidden = cfg.ffn_hidden();
        let attn = vb.pp("attention");
        let ffn = vb.pp("feed_forward");
        Ok(Self {
            attention: Attention {
                wqkv: Dense::load(dim, 3 * dim, attn.pp("wqkv"))?,
                wo: Dense::load(dim, dim, attn.pp("wo"))?,
                n_head: cfg.n_head,
                n_kv_head: cfg.n_head,
                head_dim: cfg.head_dim(),
                qk_norm: None,
                family: Family::LlamaGen,
            },
            feed_forward: FeedForward {
                w1: Dense::load(dim, hidden, ffn.pp("w1"))?,
                w2: Dense::load(hidden, dim, ffn.pp("w2"))?,
                w3: Dense::load(dim, hidden, ffn.pp("w3"))?,
            },
            attention_norm: candle_nn::rms_norm(dim, cfg.norm_eps, vb.pp("attention_norm"))?,
            ffn_norm: candle_nn::rms_norm(dim, cfg.norm_eps, vb.pp("ffn_norm"))?,
        })
    }

    /// A Chameleon or Llama decoder layer under Hugging Face's names
    /// (`self_attn.{q,k,v,o}_proj`, Chameleon's `self_attn.{q,k}_norm`,
    /// `mlp.{gate,up,down}_proj`, `input_layernorm`, `post_attention_layernorm`); q, k and v
    /// are stacked into one projection.
    fn load_chameleon(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        let (dim, hidden, hd) = (cfg.dim, cfg.ffn_hidden(), cfg.head_dim());
        let kv_dim = cfg.kv_heads() * hd;
        let attn = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        Ok(Self {
            attention: Attention {
                wqkv: Dense::load_stacked(
                    dim,
                    &[
                        (dim, attn.pp("q_proj")),
                        (kv_dim, attn.pp("k_proj")),
                        (kv_dim, attn.pp("v_proj")),
                    ],
                )?,
                wo: Dense::load(dim, dim, attn.pp("o_proj"))?,
                n_head: cfg.n_head,
                n_kv_head: cfg.kv_heads(),
                head_dim: hd,
                qk_norm: match cfg.family {
                    Family::Chameleon => Some((
                        HeadNorm::load(cfg.n_head, hd, attn.pp("q_norm"))?,
                        HeadNorm::load(cfg.kv_heads(), hd, attn.pp("k_norm"))?,
                    )),
                    _ => None,
                },
                family: cfg.family,
            },
            feed_forward: FeedForward {
                w1: Dense::load(dim, hidden, mlp.pp("gate_proj"))?,
                w2: Dense::load(hidden, dim, mlp.pp("down_proj"))?,
                w3: Dense::load(dim, hidden, mlp.pp("up_proj"))?,
            },
            attention_norm: candle_nn::rms_norm(dim, cfg.norm_eps, vb.pp("input_layernorm"))?,
            ffn_norm: candle_nn::rms_norm(dim, cfg.norm_eps, vb.pp("post_attention_layernorm"))?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        b: usize,
        ctx: &PassCtx,
        kv: &mut LayerKv,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (attn, probs) = self
            .attention
            .forward(&self.attention_norm.forward(x)?, b, ctx, kv)?;
        let h = (x + attn)?;
        let out = (&h + self.feed_forward.forward(&self.ffn_norm.forward(&h)?)?)?;
        Ok((out, probs))
    }
}

/// How the condition is embedded.
#[derive(Debug)]
enum CondEmbedding {
    /// `cls_embedding.embedding_table`: `num_classes + 1` rows, the last one the null class.
    Class(Embedding),
    /// `cls_embedding.cap_proj` (fc1, GELU-tanh, fc2, no bias) and the learned
    /// unconditional caption `cls_embedding.uncond_embedding`.
    Caption {
        fc1: Dense,
        fc2: Dense,
        uncond: Tensor,
    },
    /// Chameleon: the condition is a prompt of tokens, embedded like any other token.
    Tokens,
}

/// One run's state: its KV cache and what it has written, made by [`Gpt::start`] and advanced
/// by [`Gpt::step`]. The GPT itself does not change during a run (candle's way: the cache is
/// passed next to the model), so one loaded GPT can serve several sessions.
#[derive(Debug)]
pub struct Session {
    kv: Vec<LayerKv>,
    batch: usize,
    opts: RunOptions,
    written: Vec<bool>,
    /// Per batch entry, slots `0..hidden` are padding: a short caption's (never fed), or the
    /// left padding of the shorter of two prompts (fed, so that both halves of a CFG batch
    /// share positions, but never attended to).
    hidden: Vec<usize>,
    /// Slots before the image region: the model's condition length, or a prompt's length.
    cond_len: usize,
    /// Record attention probabilities in each pass, keeping this layer's heads one by one
    /// (`None`: nothing is computed).
    capture: Option<usize>,
    captured: Option<PassAttention>,
}

impl Session {
    /// Starts (`Some(layer)`) or stops recording attention from the next pass on.
    pub fn set_attention_capture(&mut self, head_layer: Option<usize>) {
        let layers = self.kv.len().max(1);
        self.capture = head_layer.map(|l| l.min(layers - 1));
        self.captured = None;
    }

    /// The last pass's attention, when capture is on.
    pub fn take_attention(&mut self) -> Option<PassAttention> {
        self.captured.take()
    }
}

/// The LlamaGen transformer.
#[derive(Debug)]
pub struct Gpt {
    cfg: GptConfig,
    grid: (usize, usize),
    tok_embeddings: Embedding,
    cond: CondEmbedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    output: Dense,
    rope: RopeTable,
    device: Device,
    dtype: DType,
}

/// The conditional half of each layer's probabilities `[B, H, k, len]`: the mean over heads
/// per layer, and `head_layer`'s heads one by one.
fn pass_attention(
    probs: &[Tensor],
    slots: &[usize],
    cond_len: usize,
    head_layer: usize,
) -> Result<PassAttention> {
    let mut mean = Vec::with_capacity(probs.len());
    let mut heads = Vec::new();
    for (l, p) in probs.iter().enumerate() {
        let p = p.get(0)?.to_dtype(DType::F32)?;
        mean.push(p.mean(0)?.to_vec2::<f32>()?);
        if l == head_layer {
            heads = p.to_vec3::<f32>()?;
        }
    }
    Ok(PassAttention {
        slots: slots.to_vec(),
        cond_len,
        mean,
        head_layer: head_layer.min(probs.len().saturating_sub(1)),
        heads,
    })
}

impl Gpt {
    /// Builds the model for an `h x w` grid from weights with LlamaGen's key names.
    pub fn load(cfg: &GptConfig, h: usize, w: usize, vb: VarBuilder) -> Result<Self> {
        if cfg.family != Family::LlamaGen {
            return Self::load_chameleon(cfg, h, w, vb);
        }
        let dim = cfg.dim;
        let cond = match cfg.caption_dim {
            None => CondEmbedding::Class(candle_nn::embedding(
                cfg.num_classes + 1,
                dim,
                vb.pp("cls_embedding.embedding_table"),
            )?),
            Some(cap) => {
                let vb = vb.pp("cls_embedding");
                CondEmbedding::Caption {
                    fc1: Dense::load(cap, dim, vb.pp("cap_proj.fc1"))?,
                    fc2: Dense::load(dim, dim, vb.pp("cap_proj.fc2"))?,
                    uncond: vb.get((cfg.cls_token_num, cap), "uncond_embedding")?,
                }
            }
        };
        let layers = (0..cfg.n_layer)
            .map(|i| Block::load(cfg, vb.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            grid: (h, w),
            tok_embeddings: candle_nn::embedding(cfg.vocab_size, dim, vb.pp("tok_embeddings"))?,
            cond,
            layers,
            norm: candle_nn::rms_norm(dim, cfg.norm_eps, vb.pp("norm"))?,
            output: Dense::load(dim, cfg.vocab_size, vb.pp("output"))?,
            rope: RopeTable::new(
                cfg.head_dim(),
                cfg.rope_base,
                cfg.cls_token_num,
                h,
                w,
                vb.device(),
            )?,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// A Chameleon or Llama language model (`cfg.family`) under Hugging Face's names
    /// (`model.embed_tokens`, `model.layers.N`, `model.norm`, `lm_head`), for prompts of up to
    /// `cfg.cls_token_num` tokens followed by `h x w` positions. Other weights in the file (the
    /// VQ encoder's) are not read.
    pub fn load_chameleon(cfg: &GptConfig, h: usize, w: usize, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.dim;
        let m = vb.pp("model");
        let layers = (0..cfg.n_layer)
            .map(|i| Block::load_chameleon(cfg, m.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            grid: (h, w),
            tok_embeddings: candle_nn::embedding(cfg.vocab_size, dim, m.pp("embed_tokens"))?,
            cond: CondEmbedding::Tokens,
            layers,
            norm: candle_nn::rms_norm(dim, cfg.norm_eps, m.pp("norm"))?,
            output: Dense::load(dim, cfg.vocab_size, vb.pp("lm_head"))?,
            rope: RopeTable::one_d(
                cfg.head_dim(),
                cfg.rope_base,
                cfg.cls_token_num + h * w,
                vb.device(),
            )?,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Token grid (rows, columns).
    pub fn grid(&self) -> (usize, usize) {
        self.grid
    }

    /// A prompt of token ids as a `[1, n, dim]` condition.
    fn embed_prompt(&self, ids: &[u32]) -> anyhow::Result<Tensor> {
        let n = self.cfg.cls_token_num;
        anyhow::ensure!(
            (1..=n).contains(&ids.len()),
            "a prompt of {} tokens: this model takes 1 to {n}",
            ids.len()
        );
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            anyhow::bail!(
                "token {bad} is outside the vocabulary of {}",
                self.cfg.vocab_size
            );
        }
        let ids = Tensor::new(ids, &self.device)?;
        Ok(self
            .tok_embeddings
            .forward(&ids)?
            .reshape((1, ids.dim(0)?, self.cfg.dim))?)
    }

    /// The condition's rows `[B, rows, dim]` and, per batch entry, how many of its first rows
    /// are padding.
    fn cond_embeddings(&self, cond: &Condition, cfg: bool) -> anyhow::Result<(Tensor, Vec<usize>)> {
        let dim = self.cfg.dim;
        let mut pads = vec![0, 0];
        let x = match (&self.cond, cond) {
            (CondEmbedding::Class(table), Condition::Class(id)) => {
                let n = self.cfg.num_classes as u32;
                anyhow::ensure!(
                    *id < n,
                    "class id {id} is out of range: this model has classes 0..{}",
                    n.saturating_sub(1)
                );
                let ids: Vec<u32> = if cfg { vec![*id, n] } else { vec![*id] };
                let ids = Tensor::new(ids.as_slice(), &self.device)?;
                table.forward(&ids)?.reshape((ids.dim(0)?, 1, dim))?
            }
            (CondEmbedding::Caption { fc1, fc2, uncond }, Condition::Caption { len, values }) => {
                // LlamaGen's sampler moves the caption's padding to the left and masks it
                // (for the unconditional caption too): the `len` rows go to the last slots.
                let t = self.cfg.cls_token_num;
                let cap = uncond.dim(1)?;
                anyhow::ensure!(
                    (1..=t).contains(len) && values.len() == len * cap,
                    "caption embedding must be 1 to {t} rows of {cap} values, got {len} rows and {} values",
                    values.len()
                );
                let c = Tensor::from_slice(values, (1, *len, cap), &self.device)?
                    .to_dtype(self.dtype)?;
                let c = if cfg {
                    Tensor::cat(&[c, uncond.narrow(0, t - len, *len)?.unsqueeze(0)?], 0)?
                } else {
                    c
                };
                let h = fc1.forward(&c)?.gelu()?;
                fc2.forward(&h)?
            }
            (CondEmbedding::Tokens, Condition::Tokens(ids)) => {
                anyhow::ensure!(
                    !cfg,
                    "classifier-free guidance needs an unconditional prompt as well"
                );
                self.embed_prompt(ids)?
            }
            (CondEmbedding::Tokens, Condition::TokenPair { cond, uncond }) => {
                if cfg {
                    // The shorter prompt is padded on the left and the padding hidden: both
                    // halves end at the same slot and the image follows at the same positions.
                    // RoPE depends only on the distance between a query and a key, so the
                    // shorter prompt attends as if it started at position 0 (transformers'
                    // unbatched guidance feeds it to a cache of its own).
                    let n = cond.len().max(uncond.len());
                    pads = vec![n - cond.len(), n - uncond.len()];
                    let padded = |ids: &[u32]| -> Vec<u32> {
                        std::iter::repeat_n(0, n - ids.len())
                            .chain(ids.iter().copied())
                            .collect()
                    };
                    anyhow::ensure!(!cond.is_empty() && !uncond.is_empty(), "an empty prompt");
                    Tensor::cat(
                        &[
                            self.embed_prompt(&padded(cond))?,
                            self.embed_prompt(&padded(uncond))?,
                        ],
                        0,
                    )?
                } else {
                    self.embed_prompt(cond)?
                }
            }
            (CondEmbedding::Tokens, _) => {
                anyhow::bail!("this model is conditioned on a prompt of tokens")
            }
            (_, Condition::Tokens(_) | Condition::TokenPair { .. }) => {
                anyhow::bail!("this model is not conditioned on a prompt of tokens")
            }
            (CondEmbedding::Class(_), _) => {
                anyhow::bail!("this model is class-conditional: give a class, not a caption")
            }
            (CondEmbedding::Caption { .. }, Condition::Text(_)) => {
                anyhow::bail!("this model has no text encoder to encode the caption with")
            }
            (CondEmbedding::Caption { .. }, _) => {
                anyhow::bail!("this model is text-conditional: give a caption, not a class")
            }
        };
        pads.truncate(x.dim(0)?);
        Ok((x, pads))
    }

    /// Starts a run: a session with a fresh zeroed cache, the condition fed at slots
    /// `T - rows..T` (a short caption leaves the slots before it hidden, as LlamaGen's padding
    /// mask does), and the logits predicting the first token. `capture` as in
    /// [`Session::set_attention_capture`].
    pub fn start(
        &self,
        cond: &Condition,
        opts: RunOptions,
        capture: Option<usize>,
    ) -> anyhow::Result<(Session, PassLogits)> {
        let (x, pads) = self.cond_embeddings(cond, opts.cfg)?;
        let (batch, rows) = (x.dim(0)?, x.dim(1)?);
        // A prompt of tokens takes exactly its own slots; LlamaGen's conditions are padded to
        // the model's condition length.
        let t = match self.cond {
            CondEmbedding::Tokens => rows,
            _ => self.cfg.cls_token_num,
        };
        anyhow::ensure!(rows <= t, "the condition has {rows} rows for {t} slots");
        let first = t - rows;
        let hidden: Vec<usize> = pads.iter().map(|p| first + p).collect();
        let slots_total = t + self.grid.0 * self.grid.1;
        let kv = (0..self.cfg.n_layer)
            .map(|_| {
                LayerKv::new(
                    batch,
                    self.cfg.kv_heads(),
                    slots_total,
                    self.cfg.head_dim(),
                    key_layout(&self.device, self.dtype),
                    self.dtype,
                    &self.device,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let mut session = Session {
            kv,
            batch,
            opts,
            written: vec![false; slots_total],
            hidden,
            cond_len: t,
            capture: None,
            captured: None,
        };
        session.set_attention_capture(capture);
        let slots: Vec<usize> = (first..t).collect();
        let logits = self.forward_embeds(&mut session, &x, &slots, &[rows - 1])?;
        Ok((session, logits))
    }

    /// One pass of `session` over several inputs at once.
    pub fn step(&self, session: &mut Session, inputs: &[ModelInput]) -> anyhow::Result<PassLogits> {
        anyhow::ensure!(!inputs.is_empty(), "a pass needs at least one input");
        let t = session.cond_len;
        let cells = self.grid.0 * self.grid.1;
        let mut ids = Vec::with_capacity(inputs.len());
        let mut slots = Vec::with_capacity(inputs.len());
        let mut want = Vec::new();
        for (i, inp) in inputs.iter().enumerate() {
            anyhow::ensure!(
                (inp.token as usize) < self.cfg.vocab_size,
                "token {} is outside the vocabulary of {}",
                inp.token,
                self.cfg.vocab_size
            );
            anyhow::ensure!(inp.pos < cells, "position {} is outside the grid", inp.pos);
            ids.push(inp.token);
            slots.push(t + inp.pos);
            if inp.wants_logits {
                want.push(i);
            }
        }
        let k = ids.len();
        let ids = Tensor::from_vec(ids, (1, k), &self.device)?;
        let x = self
            .tok_embeddings
            .forward(&ids)?
            .broadcast_as((session.batch, k, self.cfg.dim))?
            .contiguous()?;
        self.forward_embeds(session, &x, &slots, &want)
    }

    fn forward_embeds(
        &self,
        state: &mut Session,
        x: &Tensor,
        slots: &[usize],
        want: &[usize],
    ) -> anyhow::Result<PassLogits> {
        let dev = &self.device;
        for &s in slots {
            state.written[s] = true;
        }
        let len = slots.iter().copied().max().unwrap_or(0) + 1;
        // Raster-causal over slots; hide padding, and optionally slots never written in this
        // run. Per batch entry, 0 for slots a query may attend to at all, -inf for the others.
        let bias: Vec<f32> = state
            .hidden
            .iter()
            .flat_map(|&hidden| {
                let written = &state.written;
                let mask = state.opts.mask_unwritten;
                (0..len).map(move |j| {
                    if j < hidden || (mask && !written[j]) {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let layout = key_layout(dev, self.dtype);
        let capture = state.capture.is_some();
        let mask = if layout == KeyLayout::Transposed && !capture {
            None
        } else {
            // Raster-causal over slots, plus the bias above; a padding slot's own query sees
            // itself (as no other query does), so that its softmax stays finite.
            let mut mask = Vec::with_capacity(state.batch * slots.len() * len);
            for row in bias.chunks(len) {
                for &s in slots {
                    let blind = row[..=s].iter().all(|&b| b == f32::NEG_INFINITY);
                    mask.extend(row.iter().enumerate().map(|(j, &b)| match j {
                        j if j > s => f32::NEG_INFINITY,
                        j if j == s && blind => 0.0,
                        _ => b,
                    }));
                }
            }
            Some(
                Tensor::from_vec(mask, (state.batch, 1, slots.len(), len), dev)?
                    .to_dtype(self.dtype)?,
            )
        };
        let slot_ids: Vec<u32> = slots.iter().map(|&s| s as u32).collect();
        let slot_t = Tensor::new(slot_ids.as_slice(), dev)?;
        let (cos, sin) = self.rope.select(&slot_t)?;
        let ctx = PassCtx {
            cos,
            sin,
            index: SlotIndex::new(
                slots,
                state.batch,
                self.cfg.kv_heads(),
                self.cfg.head_dim(),
                layout,
                dev,
            )?,
            len,
            slots: slots.to_vec(),
            bias,
            mask,
            capture,
        };
        let (b, k, dim) = x.dims3()?;
        let h = x.to_dtype(self.dtype)?.reshape((b * k, dim))?;
        // On the CPU the whole pass runs inside candle's thread pool, so that the many short
        // parallel sections in it fork and join between warm workers instead of handing work
        // from this thread to the pool and back on every op.
        let layers = &self.layers;
        let kvs = &mut state.kv;
        let mut probs = Vec::new();
        let h = dev.with_context(|| -> Result<Tensor> {
            let mut h = h;
            for (layer, kv) in layers.iter().zip(kvs.iter_mut()) {
                let (out, p) = layer.forward(&h, b, &ctx, kv)?;
                h = out;
                probs.extend(p);
            }
            h.reshape((b, k, dim))
        })?;
        if let Some(head_layer) = state.capture {
            state.captured = Some(pass_attention(&probs, slots, state.cond_len, head_layer)?);
        }
        if want.is_empty() {
            return Ok(PassLogits {
                cond: vec![],
                uncond: state.opts.cfg.then(Vec::new),
            });
        }
        let want_ids: Vec<u32> = want.iter().map(|&i| i as u32).collect();
        let h = h.index_select(&Tensor::new(want_ids.as_slice(), dev)?, 1)?;
        let logits = self
            .output
            .forward(&self.norm.forward(&h)?)?
            .to_dtype(DType::F32)?
            .to_vec3::<f32>()?;
        if logits.iter().flatten().flatten().any(|x| !x.is_finite()) {
            anyhow::bail!(
                "the model produced NaN or infinite logits in this pass (slots {slots:?}): its weights or settings are out of range"
            );
        }
        let mut it = logits.into_iter();
        let cond = it.next().unwrap_or_default();
        let uncond = it.next();
        Ok(PassLogits { cond, uncond })
    }
}
