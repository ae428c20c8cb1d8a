//! Rotary position embeddings: LlamaGen's 2D one, and the 1-D one of Chameleon.
//!
//! Interleaved pairs, as `apply_rotary_emb` in LlamaGen's gpt.py (candle's `rope_i`): of the
//! head_dim/2 rotation pairs, the first quarter of the head rotates by the row, the second by
//! the column. The condition positions get cos = sin = 0, which zeroes their q and k.

use candle_core::{Device, Result, Tensor};

/// Precomputed cos / sin tables over every slot: `[T + h*w, head_dim/2]`.
#[derive(Debug, Clone)]
pub struct RopeTable {
    cos: Tensor,
    sin: Tensor,
}

impl RopeTable {
    /// Tables for a condition of `cond_len` slots followed by an `h x w` grid.
    pub fn new(
        head_dim: usize,
        base: f32,
        cond_len: usize,
        h: usize,
        w: usize,
        dev: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let quarter = half / 2;
        let freqs: Vec<f32> = (0..quarter)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / half as f32))
            .collect();
        let slots = cond_len + h * w;
        let mut cos = vec![0f32; slots * half];
        let mut sin = vec![0f32; slots * half];
        for r in 0..h {
            for c in 0..w {
                let row = (cond_len + r * w + c) * half;
                for (i, f) in freqs.iter().enumerate() {
                    let (a, b) = (r as f32 * f, c as f32 * f);
                    cos[row + i] = a.cos();
                    sin[row + i] = a.sin();
                    cos[row + quarter + i] = b.cos();
                    sin[row + quarter + i] = b.sin();
                }
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (slots, half), dev)?,
            sin: Tensor::from_vec(sin, (slots, half), dev)?,
        })
    }

    /// Chameleon's 1-D tables over positions `0..len` (Hugging Face's `LlamaRotaryEmbedding`:
    /// pair `i` turns by `position / base^(2i / head_dim)`), for [`apply_rotate_half`].
    pub fn one_d(head_dim: usize, base: f32, len: usize, dev: &Device) -> Result<Self> {
        let half = head_dim / 2;
        // in f32 as transformers computes them (inv_freq in f32, position * inv_freq in f32)
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let (mut cos, mut sin) = (
            Vec::with_capacity(len * half),
            Vec::with_capacity(len * half),
        );
        for p in 0..len {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (len, half), dev)?,
            sin: Tensor::from_vec(sin, (len, half), dev)?,
        })
    }

    /// The cos / sin rows of the slots fed in one pass (`slots`: a u32 tensor of length k).
    pub fn select(&self, slots: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(slots, 0)?,
            self.sin.index_select(slots, 0)?,
        ))
    }
}

/// Rotates `x: [B, H, k, D]` by the rows returned by [`RopeTable::select`].
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let dt = x.dtype();
    candle_nn::rotary_emb::rope_i(&x.contiguous()?, &cos.to_dtype(dt)?, &sin.to_dtype(dt)?)
}

/// Rotates `x: [B, H, k, D]` the rotate-half way (first and second halves of the head paired,
/// Hugging Face's `apply_rotary_pos_emb`; candle's `rope`) by rows of [`RopeTable::one_d`].
pub fn apply_rotate_half(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let dt = x.dtype();
    candle_nn::rotary_emb::rope(&x.contiguous()?, &cos.to_dtype(dt)?, &sin.to_dtype(dt)?)
}
