//! Emu3's vision tokenizer decoder (transformers' `Emu3VQVAE.decode`, a MoVQ-style decoder),
//! for one image.
//!
//! The VQ-VAE is built for video: the decoder runs temporal residual blocks and temporal
//! up-samplings (causal 3-D convolutions with `k_t = 3`, zero-padded by two frames in front)
//! on the latent frames before decoding each frame in 2-D. An image is one latent frame, and
//! transformers keeps the first decoded frame. Frame 0 of a causal convolution sees only its
//! own input frame through the kernel's last temporal tap, and a nearest temporal
//! up-sampling puts that frame first again, so every 3-D convolution here is the 2-D
//! convolution of its last tap, and the decoder runs on one frame (no 3-D convolution needed).
//!
//! The 2-D part is a taming-style decoder whose norms are MoVQ's spatially conditioned ones:
//! `GroupNorm(x) * conv_y(zq) + conv_b(zq)` with the quantised codes `zq` up-sampled to the
//! feature map (the codes also run through the temporal blocks, batched with the features,
//! as transformers does).

use candle_core::{D, DType, Module, ModuleT, Result, Tensor};
use candle_nn::{BatchNorm, GroupNorm, Linear, VarBuilder};
use serde::Deserialize;

use super::llamagen::vq::{Conv, check_codes, conv, conv_from, to_rgb8};
use super::{ImageDecoder, RgbImage};

/// transformers' `Emu3VQVAEConfig`, the fields the decoder reads (defaults: Emu3's).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MovqConfig {
    /// Codes in the codebook.
    #[serde(default = "default_codebook")]
    pub codebook_size: usize,
    /// Width of a code vector.
    #[serde(default = "default_four")]
    pub embed_dim: usize,
    /// Latent channels (equal to `embed_dim`: the decoder batches codes and features).
    #[serde(default = "default_four")]
    pub latent_channels: usize,
    /// Must be false (Emu3's is).
    #[serde(default)]
    pub double_latent: bool,
    /// Image channels.
    #[serde(default = "default_three")]
    pub out_channels: usize,
    /// Frames per latent frame; a power of two.
    #[serde(default = "default_four")]
    pub temporal_downsample_factor: usize,
    /// Channels of the first level.
    #[serde(default = "default_base")]
    pub base_channels: usize,
    /// Channel multiplier per level; `2^(levels - 1)` pixels per code.
    #[serde(default = "default_mult")]
    pub channel_multiplier: Vec<usize>,
    /// Residual blocks per level (the decoder has one more).
    #[serde(default = "default_two")]
    pub num_res_blocks: usize,
    /// Levels with attention after each residual block.
    #[serde(default = "default_attn")]
    pub attn_resolutions: Vec<usize>,
    /// Attention heads.
    #[serde(default = "default_one")]
    pub num_attention_heads: usize,
}

fn default_codebook() -> usize {
    32768
}
fn default_one() -> usize {
    1
}
fn default_two() -> usize {
    2
}
fn default_three() -> usize {
    3
}
fn default_four() -> usize {
    4
}
fn default_base() -> usize {
    256
}
fn default_mult() -> Vec<usize> {
    vec![1, 2, 2, 4]
}
fn default_attn() -> Vec<usize> {
    vec![3]
}

/// GroupNorm of the decoder: 32 groups.
const GROUPS: usize = 32;

impl MovqConfig {
    /// Pixels per code along each side.
    pub fn downsample(&self) -> usize {
        1 << (self.channel_multiplier.len().saturating_sub(1))
    }

    /// Why the decoder cannot be built from this configuration, if it cannot.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let levels = self.channel_multiplier.len();
        let chans = self
            .channel_multiplier
            .iter()
            .map(|m| m * self.base_channels);
        if levels == 0 || levels > 8 {
            return Err(format!("{levels} levels: expected 1 to 8"));
        }
        if self.codebook_size == 0 || self.embed_dim == 0 {
            return Err("an empty codebook".into());
        }
        if self.latent_channels != self.embed_dim {
            return Err(format!(
                "latent_channels {} differs from embed_dim {}: the decoder runs codes and features as one batch",
                self.latent_channels, self.embed_dim
            ));
        }
        if self.double_latent {
            return Err("double_latent is not supported".into());
        }
        if self.out_channels != 3 {
            return Err(format!("{} output channels: expected 3", self.out_channels));
        }
        if !self.temporal_downsample_factor.is_power_of_two() {
            return Err(format!(
                "temporal_downsample_factor {} is not a power of two",
                self.temporal_downsample_factor
            ));
        }
        if let Some(c) = chans.clone().find(|c| *c == 0 || c % GROUPS != 0) {
            return Err(format!(
                "{c} channels: the decoder's group norms need a multiple of {GROUPS}"
            ));
        }
        let heads = self.num_attention_heads;
        if let Some(c) = chans.clone().find(|c| heads == 0 || c % heads != 0) {
            return Err(format!(
                "{c} channels do not split into {heads} attention heads"
            ));
        }
        Ok(())
    }
}

/// A causal 3-D convolution applied to frame 0: the 2-D convolution of its last temporal
/// tap (`weight [cout, cin, kt, k, k]`).
fn last_tap(vb: VarBuilder) -> Result<Conv> {
    let w = vb.get_unchecked("weight")?;
    let (_, _, kt, kh, kw) = w.dims5()?;
    if kh != kw || kh % 2 == 0 {
        candle_core::bail!("a {kh}x{kw} spatial kernel: expected an odd square one");
    }
    let w = w.narrow(2, kt - 1, 1)?.squeeze(2)?.contiguous()?;
    conv_from(w, Some(vb.get_unchecked("bias")?))
}

/// MoVQ's spatially conditioned norm.
#[derive(Debug)]
struct SpatialNorm {
    norm: GroupNorm,
    conv_y: Conv,
    conv_b: Conv,
}

impl SpatialNorm {
    fn load(ch: usize, zq_ch: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: candle_nn::group_norm(GROUPS, ch, 1e-6, vb.pp("norm_layer"))?,
            conv_y: conv(zq_ch, ch, 1, vb.pp("conv_y"))?,
            conv_b: conv(zq_ch, ch, 1, vb.pp("conv_b"))?,
        })
    }

    /// `x [1, C, H, W]`, `zq [1, E, h, w]` up-sampled to `H x W` (nearest).
    fn forward(&self, x: &Tensor, zq: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let zq = if zq.dims4()?.2 == h && zq.dims4()?.3 == w {
            zq.clone()
        } else {
            zq.upsample_nearest2d(h, w)?
        };
        self.norm
            .forward(x)?
            .mul(&self.conv_y.forward(&zq)?)?
            .add(&self.conv_b.forward(&zq)?)
    }
}

#[derive(Debug)]
struct ResBlock {
    norm1: SpatialNorm,
    conv1: Conv,
    norm2: SpatialNorm,
    conv2: Conv,
    nin_shortcut: Option<Conv>,
}

impl ResBlock {
    fn load(cin: usize, cout: usize, zq_ch: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: SpatialNorm::load(cin, zq_ch, vb.pp("norm1"))?,
            conv1: conv(cin, cout, 3, vb.pp("conv1"))?,
            norm2: SpatialNorm::load(cout, zq_ch, vb.pp("norm2"))?,
            conv2: conv(cout, cout, 3, vb.pp("conv2"))?,
            nin_shortcut: (cin != cout)
                .then(|| conv(cin, cout, 1, vb.pp("nin_shortcut")))
                .transpose()?,
        })
    }

    fn forward(&self, x: &Tensor, zq: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x, zq)?.silu()?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h, zq)?.silu()?)?;
        match &self.nin_shortcut {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        }
    }
}

/// Multi-head self-attention over the pixels of a feature map, after a spatial norm.
#[derive(Debug)]
struct Attention {
    norm: SpatialNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl Attention {
    fn load(ch: usize, heads: usize, norm: SpatialNorm, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm,
            q: candle_nn::linear(ch, ch, vb.pp("q_proj"))?,
            k: candle_nn::linear(ch, ch, vb.pp("k_proj"))?,
            v: candle_nn::linear(ch, ch, vb.pp("v_proj"))?,
            out: candle_nn::linear(ch, ch, vb.pp("out_proj"))?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, zq: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (n, hd) = (h * w, c / self.heads);
        let t = self
            .norm
            .forward(x, zq)?
            .reshape((b, c, n))?
            .transpose(1, 2)?
            .contiguous()?;
        let split = |l: &Linear| -> Result<Tensor> {
            l.forward(&t)?
                .reshape((b, n, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(&self.q)?, split(&self.k)?, split(&self.v)?);
        let att = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let att = candle_nn::ops::softmax(&att, D::Minus1)?;
        let o = att.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        let o = self
            .out
            .forward(&o)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        x + o
    }
}

/// A temporal residual block on frame 0: batch norms (inference statistics) and the last taps
/// of its 3-D convolutions.
#[derive(Debug)]
struct TemporalResBlock {
    norm1: BatchNorm,
    conv1: Conv,
    norm2: BatchNorm,
    conv2: Conv,
    nin_shortcut: Option<Conv>,
}

impl TemporalResBlock {
    fn load(ch: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: candle_nn::batch_norm(ch, 1e-5, vb.pp("norm1"))?,
            conv1: last_tap(vb.pp("conv1.conv"))?,
            norm2: candle_nn::batch_norm(ch, 1e-5, vb.pp("norm2"))?,
            conv2: last_tap(vb.pp("conv2.conv"))?,
            nin_shortcut: if vb.contains_tensor("nin_shortcut.weight") {
                Some(last_tap(vb.pp("nin_shortcut"))?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self
            .conv1
            .forward(&self.norm1.forward_t(x, false)?.silu()?)?;
        let h = self
            .conv2
            .forward(&self.norm2.forward_t(&h, false)?.silu()?)?;
        match &self.nin_shortcut {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        }
    }
}

#[derive(Debug)]
enum Layer {
    Res(Box<ResBlock>),
    Attn(Box<Attention>),
    Upsample(Conv),
}

/// Emu3's VQ-VAE decoder for one image: codes to pixels.
#[derive(Debug)]
pub struct MovqDecoder {
    cfg: MovqConfig,
    codebook: Tensor,
    post_quant_conv: Conv,
    time_res_stack: Vec<TemporalResBlock>,
    time_conv: Vec<Conv>,
    conv_in: Conv,
    layers: Vec<Layer>,
    norm_out: SpatialNorm,
    conv_out: Conv,
}

impl MovqDecoder {
    /// Builds the decoder from `vb` at the VQ-VAE's root (`quantize`, `post_quant_conv`,
    /// `decoder` under it, transformers' names).
    pub fn load(cfg: &MovqConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let levels = cfg.channel_multiplier.len();
        let e = cfg.embed_dim;
        let dec = vb.pp("decoder");
        let mut block_in = cfg.base_channels * cfg.channel_multiplier[levels - 1];
        let conv_in = conv(cfg.latent_channels, block_in, 3, dec.pp("conv_in"))?;
        let mid = dec.pp("middle_block");
        let mut layers = vec![
            Layer::Res(Box::new(ResBlock::load(
                block_in,
                block_in,
                e,
                mid.pp("block_1"),
            )?)),
            Layer::Attn(Box::new(Attention::load(
                block_in,
                cfg.num_attention_heads,
                SpatialNorm::load(block_in, e, mid.pp("attn_norm"))?,
                mid.pp("attn_1"),
            )?)),
            Layer::Res(Box::new(ResBlock::load(
                block_in,
                block_in,
                e,
                mid.pp("block_2"),
            )?)),
        ];
        for level in (0..levels).rev() {
            let up = dec.pp(format!("up_block.up.{level}"));
            let block_out = cfg.base_channels * cfg.channel_multiplier[level];
            for j in 0..=cfg.num_res_blocks {
                layers.push(Layer::Res(Box::new(ResBlock::load(
                    block_in,
                    block_out,
                    e,
                    up.pp(format!("block.{j}")),
                )?)));
                block_in = block_out;
                if cfg.attn_resolutions.contains(&level) {
                    layers.push(Layer::Attn(Box::new(Attention::load(
                        block_in,
                        cfg.num_attention_heads,
                        SpatialNorm::load(block_in, e, up.pp(format!("attn_norms.{j}")))?,
                        up.pp(format!("attn.{j}")),
                    )?)));
                }
            }
            if level != 0 {
                layers.push(Layer::Upsample(conv(
                    block_in,
                    block_in,
                    3,
                    up.pp("upsample.conv"),
                )?));
            }
        }
        let time_res_stack = (0..cfg.num_res_blocks)
            .map(|i| {
                TemporalResBlock::load(cfg.latent_channels, dec.pp(format!("time_res_stack.{i}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let time_conv = (0..cfg.temporal_downsample_factor.trailing_zeros())
            .map(|i| last_tap(dec.pp(format!("time_conv.{i}.conv.conv"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            codebook: vb.get((cfg.codebook_size, e), "quantize.embedding.weight")?,
            post_quant_conv: last_tap(vb.pp("post_quant_conv.conv"))?,
            time_res_stack,
            time_conv,
            conv_in,
            layers,
            norm_out: SpatialNorm::load(block_in, e, dec.pp("norm_out"))?,
            conv_out: conv(block_in, cfg.out_channels, 3, dec.pp("conv_out"))?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MovqConfig {
        &self.cfg
    }

    /// Decodes `[h * w]` codes (raster order) to `[1, 3, H, W]` values in about [-1, 1].
    pub fn decode(&self, codes: &[u32], h: usize, w: usize) -> Result<Tensor> {
        check_codes(codes, h, w, self.cfg.codebook_size)?;
        let ids = Tensor::new(codes, self.codebook.device())?;
        let quant = self
            .codebook
            .index_select(&ids, 0)?
            .reshape((1, h, w, self.cfg.embed_dim))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        // The features and the codes run through the temporal blocks as one batch.
        let mut x = Tensor::cat(&[self.post_quant_conv.forward(&quant)?, quant], 0)?;
        for block in &self.time_res_stack {
            x = block.forward(&x)?;
        }
        for c in &self.time_conv {
            x = c.forward(&x)?.silu()?;
        }
        let (x, zq) = (x.narrow(0, 0, 1)?, x.narrow(0, 1, 1)?.contiguous()?);
        let mut x = self.conv_in.forward(&x.contiguous()?)?;
        for layer in &self.layers {
            x = match layer {
                Layer::Res(r) => r.forward(&x, &zq)?,
                Layer::Attn(a) => a.forward(&x, &zq)?,
                Layer::Upsample(c) => {
                    let (_, _, h, w) = x.dims4()?;
                    c.forward(&x.upsample_nearest2d(h * 2, w * 2)?)?
                }
            };
        }
        let x = self.norm_out.forward(&x, &zq)?.silu()?;
        self.conv_out.forward(&x)?.to_dtype(DType::F32)
    }
}

/// A [`MovqDecoder`] for one grid size, as the decoder seam takes it.
#[derive(Debug)]
pub struct MovqGridDecoder {
    /// The decoder.
    pub movq: MovqDecoder,
    /// Rows and columns of codes.
    pub grid: (usize, usize),
}

impl ImageDecoder for MovqGridDecoder {
    fn decode(&self, tokens: &[u32]) -> anyhow::Result<RgbImage> {
        let x = self.movq.decode(tokens, self.grid.0, self.grid.1)?;
        Ok(to_rgb8(&x)?)
    }

    fn grid(&self) -> (usize, usize) {
        self.grid
    }

    fn codebook_size(&self) -> usize {
        self.movq.cfg.codebook_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> MovqConfig {
        serde_json::from_str(
            r#"{"codebook_size": 8, "base_channels": 32, "channel_multiplier": [1, 2],
                "num_res_blocks": 1, "attn_resolutions": [1], "num_attention_heads": 2}"#,
        )
        .expect("config")
    }

    #[test]
    fn configurations_the_decoder_cannot_build_are_named() {
        assert_eq!(tiny().validate(), Ok(()));
        assert_eq!(tiny().downsample(), 2);
        let emu3: MovqConfig = serde_json::from_str("{}").expect("defaults");
        assert_eq!((emu3.downsample(), emu3.codebook_size), (8, 32768));
        assert_eq!(emu3.validate(), Ok(()));
        let bad = [
            MovqConfig {
                latent_channels: 8,
                ..tiny()
            },
            MovqConfig {
                base_channels: 24,
                ..tiny()
            },
            MovqConfig {
                num_attention_heads: 3,
                ..tiny()
            },
            MovqConfig {
                temporal_downsample_factor: 3,
                ..tiny()
            },
            MovqConfig {
                channel_multiplier: vec![],
                ..tiny()
            },
        ];
        for cfg in bad {
            assert!(cfg.validate().is_err(), "{cfg:?}");
        }
    }
}
