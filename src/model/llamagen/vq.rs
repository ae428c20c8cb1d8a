//! The decoder half of LlamaGen's VQ tokenizer (tokenizer/tokenizer_image/vq_model.py):
//! codes -> l2-normalised codebook vectors -> post_quant_conv -> convolutional decoder. With
//! [`VqStyle::Taming`] the same code reads taming-transformers' VQGAN (Chameleon's image
//! tokenizer, which Lumina-mGPT decodes with): its key names, the codebook as stored, attention
//! only in the middle block.

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, VarBuilder};

use super::config::{VqConfig, VqStyle};
use crate::model::cpu_kernels::{GroupNormNhwc, PackedConv};

const GN_EPS: f64 = 1e-6;

/// A convolution in the form its device runs fastest: the packed CPU kernel for f32 on the
/// CPU (see `cpu_kernels::PackedConv`), candle's conv2d elsewhere.
#[derive(Debug)]
pub(crate) enum Conv {
    Candle(Conv2d),
    Packed(PackedConv),
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Conv::Candle(c) => c.forward(x),
            Conv::Packed(p) => p.forward(x),
        }
    }
}

impl Conv {
    /// Channels-last in and out (the CPU path; candle's conv goes through channels-first).
    fn forward_nhwc(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Conv::Packed(p) => p.forward_nhwc(x),
            Conv::Candle(c) => c
                .forward(&x.permute((0, 3, 1, 2))?)?
                .permute((0, 2, 3, 1))?
                .contiguous(),
        }
    }
}

/// A "same" convolution (stride 1, padding `k / 2`) read from `vb`.
pub(crate) fn conv(cin: usize, cout: usize, k: usize, vb: VarBuilder) -> Result<Conv> {
    let cfg = Conv2dConfig {
        padding: k / 2,
        ..Default::default()
    };
    let c = candle_nn::conv2d(cin, cout, k, cfg, vb)?;
    conv_from(c.weight().clone(), c.bias().cloned())
}

/// A "same" convolution from a `[cout, cin, k, k]` weight and an optional `[cout]` bias.
pub(crate) fn conv_from(weight: Tensor, bias: Option<Tensor>) -> Result<Conv> {
    if weight.device().is_cpu() && weight.dtype() == DType::F32 {
        return Ok(Conv::Packed(PackedConv::new(&weight, bias.as_ref())?));
    }
    let (_, _, k, _) = weight.dims4()?;
    let cfg = Conv2dConfig {
        padding: k / 2,
        ..Default::default()
    };
    Ok(Conv::Candle(Conv2d::new(weight, bias, cfg)))
}

/// A GroupNorm: candle's for channels-first tensors, plus its parameters for the CPU's
/// channels-last kernel.
#[derive(Debug)]
struct Norm {
    gn: GroupNorm,
    groups: usize,
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

impl Norm {
    /// GroupNorm, then SiLU when `silu`, channels-first.
    fn forward(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let y = self.gn.forward(x)?;
        if silu { y.silu() } else { Ok(y) }
    }

    /// The same, channels-last, fused in one kernel.
    fn forward_nhwc(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(&GroupNormNhwc {
            groups: self.groups,
            eps: GN_EPS,
            gamma: &self.gamma,
            beta: &self.beta,
            silu,
        })
    }
}

fn norm(groups: usize, ch: usize, vb: VarBuilder) -> Result<Norm> {
    let weight = vb.get(ch, "weight")?;
    let bias = vb.get(ch, "bias")?;
    Ok(Norm {
        gamma: weight.to_dtype(DType::F32)?.to_vec1()?,
        beta: bias.to_dtype(DType::F32)?.to_vec1()?,
        gn: GroupNorm::new(weight, bias, ch, groups, GN_EPS)?,
        groups,
    })
}

#[derive(Debug)]
struct ResBlock {
    norm1: Norm,
    conv1: Conv,
    norm2: Norm,
    conv2: Conv,
    nin_shortcut: Option<Conv>,
}

impl ResBlock {
    fn load(cin: usize, cout: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: norm(groups, cin, vb.pp("norm1"))?,
            conv1: conv(cin, cout, 3, vb.pp("conv1"))?,
            norm2: norm(groups, cout, vb.pp("norm2"))?,
            conv2: conv(cout, cout, 3, vb.pp("conv2"))?,
            nin_shortcut: if cin != cout {
                Some(conv(cin, cout, 1, vb.pp("nin_shortcut"))?)
            } else {
                None
            },
        })
    }
}

impl Module for ResBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x, true)?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h, true)?)?;
        match &self.nin_shortcut {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        }
    }
}

impl ResBlock {
    fn forward_nhwc(&self, x: &Tensor) -> Result<Tensor> {
        let h = self
            .conv1
            .forward_nhwc(&self.norm1.forward_nhwc(x, true)?)?;
        let h = self
            .conv2
            .forward_nhwc(&self.norm2.forward_nhwc(&h, true)?)?;
        match &self.nin_shortcut {
            Some(s) => s.forward_nhwc(x)? + h,
            None => x + h,
        }
    }
}

#[derive(Debug)]
struct AttnBlock {
    norm: Norm,
    q: Conv,
    k: Conv,
    v: Conv,
    proj_out: Conv,
}

impl AttnBlock {
    fn load(ch: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: norm(groups, ch, vb.pp("norm"))?,
            q: conv(ch, ch, 1, vb.pp("q"))?,
            k: conv(ch, ch, 1, vb.pp("k"))?,
            v: conv(ch, ch, 1, vb.pp("v"))?,
            proj_out: conv(ch, ch, 1, vb.pp("proj_out"))?,
        })
    }
}

impl Module for AttnBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = self.norm.forward(x, false)?;
        let q = self
            .q
            .forward(&n)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?;
        let k = self.k.forward(&n)?.reshape((b, c, h * w))?;
        let v = self.v.forward(&n)?.reshape((b, c, h * w))?;
        let att = (q.contiguous()?.matmul(&k)? * (1.0 / (c as f64).sqrt()))?;
        let att = candle_nn::ops::softmax(&att, D::Minus1)?;
        let out = v.matmul(&att.t()?)?.reshape((b, c, h, w))?;
        x + self.proj_out.forward(&out)?
    }
}

#[derive(Debug)]
enum Layer {
    Res(ResBlock),
    Attn(AttnBlock),
    Upsample(Conv),
}

impl Module for Layer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Layer::Res(r) => r.forward(x),
            Layer::Attn(a) => a.forward(x),
            Layer::Upsample(c) => {
                let (_, _, h, w) = x.dims4()?;
                c.forward(&x.upsample_nearest2d(h * 2, w * 2)?)
            }
        }
    }
}

impl Layer {
    /// Channels-last. Attention runs at the lowest resolution only: it goes through the
    /// channels-first code there (two small copies).
    fn forward_nhwc(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Layer::Res(r) => r.forward_nhwc(x),
            Layer::Attn(a) => a
                .forward(&x.permute((0, 3, 1, 2))?.contiguous()?)?
                .permute((0, 2, 3, 1))?
                .contiguous(),
            Layer::Upsample(c) => {
                // Nearest neighbour: each pixel repeated 2 x 2, one copy.
                let (b, h, w, ch) = x.dims4()?;
                let up = x
                    .reshape((b, h, 1, w, 1, ch))?
                    .broadcast_as((b, h, 2, w, 2, ch))?
                    .contiguous()?
                    .reshape((b, h * 2, w * 2, ch))?;
                c.forward_nhwc(&up)
            }
        }
    }
}

/// The stored name of a decoder weight in taming-transformers' layout, from the name this
/// module asks for (LlamaGen's): `decoder.mid.0/1/2` -> `decoder.mid.block_1/attn_1/block_2`,
/// `decoder.conv_blocks.L.res.J` -> `decoder.up.{levels - 1 - L}.block.J` (LlamaGen counts
/// levels from the lowest resolution, taming from the highest), `.attn.J` and `.upsample` the
/// same way. Other names are shared.
fn taming_name(name: &str, levels: usize) -> String {
    let mut parts: Vec<String> = name.split('.').map(str::to_string).collect();
    match parts.get(1).map(String::as_str) {
        Some("mid") if parts[0] == "decoder" && parts.len() > 2 => {
            let block = match parts[2].as_str() {
                "0" => Some("block_1"),
                "1" => Some("attn_1"),
                "2" => Some("block_2"),
                _ => None,
            };
            if let Some(b) = block {
                parts[2] = b.to_string();
            }
        }
        Some("conv_blocks") if parts[0] == "decoder" && parts.len() > 3 => {
            if let Ok(level) = parts[2].parse::<usize>()
                && level < levels
            {
                parts[1] = "up".into();
                parts[2] = (levels - 1 - level).to_string();
                if parts[3] == "res" {
                    parts[3] = "block".into();
                }
            }
        }
        _ => {}
    }
    parts.join(".")
}

/// Codes to pixels.
#[derive(Debug)]
pub struct VqDecoder {
    cfg: VqConfig,
    codebook: Tensor,
    post_quant_conv: Conv,
    conv_in: Conv,
    layers: Vec<Layer>,
    norm_out: Norm,
    conv_out: Conv,
}

impl VqDecoder {
    /// Builds the decoder from weights with LlamaGen's key names.
    pub fn load(cfg: &VqConfig, vb: VarBuilder) -> Result<Self> {
        let g = cfg.norm_groups;
        let levels = cfg.ch_mult.len();
        let vb = match cfg.style {
            VqStyle::LlamaGen => vb,
            VqStyle::Taming => vb.rename_f(move |name| taming_name(name, levels)),
        };
        let codebook = vb.get(
            (cfg.codebook_size, cfg.codebook_embed_dim),
            "quantize.embedding.weight",
        )?;
        let codebook = match cfg.style {
            // F.normalize(p=2, dim=-1, eps=1e-12)
            VqStyle::LlamaGen => {
                let norms = codebook
                    .sqr()?
                    .sum_keepdim(1)?
                    .sqrt()?
                    .clamp(1e-12, f64::INFINITY)?;
                codebook.broadcast_div(&norms)?
            }
            VqStyle::Taming => codebook,
        };
        let post_quant_conv = conv(
            cfg.codebook_embed_dim,
            cfg.z_channels,
            1,
            vb.pp("post_quant_conv"),
        )?;
        let dec = vb.pp("decoder");
        let mut block_in = cfg.ch * cfg.ch_mult[levels - 1];
        let conv_in = conv(cfg.z_channels, block_in, 3, dec.pp("conv_in"))?;
        let mut layers = vec![
            Layer::Res(ResBlock::load(block_in, block_in, g, dec.pp("mid.0"))?),
            Layer::Attn(AttnBlock::load(block_in, g, dec.pp("mid.1"))?),
            Layer::Res(ResBlock::load(block_in, block_in, g, dec.pp("mid.2"))?),
        ];
        for level in 0..levels {
            let vb = dec.pp(format!("conv_blocks.{level}"));
            let block_out = cfg.ch * cfg.ch_mult[levels - level - 1];
            for j in 0..=cfg.num_res_blocks {
                layers.push(Layer::Res(ResBlock::load(
                    block_in,
                    block_out,
                    g,
                    vb.pp(format!("res.{j}")),
                )?));
                block_in = block_out;
                if level == 0 && cfg.style == VqStyle::LlamaGen {
                    layers.push(Layer::Attn(AttnBlock::load(
                        block_in,
                        g,
                        vb.pp(format!("attn.{j}")),
                    )?));
                }
            }
            if level + 1 != levels {
                layers.push(Layer::Upsample(conv(
                    block_in,
                    block_in,
                    3,
                    vb.pp("upsample.conv"),
                )?));
            }
        }
        Ok(Self {
            cfg: cfg.clone(),
            codebook,
            post_quant_conv,
            conv_in,
            layers,
            norm_out: norm(g, block_in, dec.pp("norm_out"))?,
            conv_out: conv(block_in, 3, 3, dec.pp("conv_out"))?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &VqConfig {
        &self.cfg
    }

    /// The device its weights live on.
    pub fn device(&self) -> &candle_core::Device {
        self.codebook.device()
    }

    /// Decodes `[h * w]` codes (raster order) to `[1, 3, H, W]` values in about [-1, 1].
    pub fn decode(&self, codes: &[u32], h: usize, w: usize) -> Result<Tensor> {
        check_codes(codes, h, w, self.cfg.codebook_size)?;
        let ids = Tensor::new(codes, self.codebook.device())?;
        let z =
            self.codebook
                .index_select(&ids, 0)?
                .reshape((1, h, w, self.cfg.codebook_embed_dim))?;
        if matches!(self.conv_in, Conv::Packed(_)) {
            // The CPU path keeps activations channels-last from the codes to the pixels: the
            // packed convolutions work that way, and each layout change is a full copy.
            let mut x = self
                .conv_in
                .forward_nhwc(&self.post_quant_conv.forward_nhwc(&z)?)?;
            for layer in &self.layers {
                x = layer.forward_nhwc(&x)?;
            }
            let x = self.norm_out.forward_nhwc(&x, true)?;
            return self.conv_out.forward_nhwc(&x)?.permute((0, 3, 1, 2));
        }
        let z = z.permute((0, 3, 1, 2))?.contiguous()?;
        let mut x = self.conv_in.forward(&self.post_quant_conv.forward(&z)?)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        self.conv_out.forward(&self.norm_out.forward(&x, true)?)
    }

    /// Decodes codes to 8-bit RGB, mapping [-1, 1] to [0, 255] as LlamaGen's samplers do.
    pub fn decode_rgb(&self, codes: &[u32], h: usize, w: usize) -> Result<crate::model::RgbImage> {
        to_rgb8(&self.decode(codes, h, w)?)
    }
}

/// That `codes` fill an `h x w` grid with codes of a codebook of `n`.
pub(crate) fn check_codes(codes: &[u32], h: usize, w: usize, n: usize) -> Result<()> {
    if codes.len() != h * w {
        candle_core::bail!(
            "expected {} codes for a {h}x{w} grid, got {}",
            h * w,
            codes.len()
        );
    }
    if let Some(&bad) = codes.iter().find(|&&c| c as usize >= n) {
        candle_core::bail!("code {bad} is outside the codebook of {n}");
    }
    Ok(())
}

/// `[1, 3, H, W]` values in [-1, 1] to 8-bit RGB (rounded, clamped).
pub(crate) fn to_rgb8(x: &Tensor) -> Result<crate::model::RgbImage> {
    {
        let (_, _, ph, pw) = x.dims4()?;
        let x = ((x.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?;
        let x = (x + 0.5)?.clamp(0f32, 255f32)?;
        let pixels = x
            .squeeze(0)?
            .permute((1, 2, 0))?
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|v| v as u8)
            .collect();
        Ok(crate::model::RgbImage {
            width: pw,
            height: ph,
            pixels,
        })
    }
}
