//! Slot-indexed KV cache: one preallocated buffer per layer for K and for V.
//!
//! A pass writes its inputs' K/V at arbitrary slots in place (ZipAR feeds several rows at
//! once, and overwrites an auxiliary slot when a row completes); nothing is concatenated.
//! Never-written slots stay zero, as in LlamaGen's zero-initialised cache.
//!
//! Two layouts: `[B, H, S, D]` for K and V (candle's attention), or, for the CPU attention
//! kernel, K transposed to `[B, H, D, S]` so that a query's scores over the slots are
//! contiguous multiply-adds instead of one short dot product per slot.

use candle_core::{DType, Device, Result, Tensor};

/// How K is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayout {
    /// `[B, H, S, D]`, like V.
    SlotMajor,
    /// `[B, H, D, S]`.
    Transposed,
}

/// The cache of one layer.
#[derive(Debug)]
pub struct LayerKv {
    k: Tensor,
    v: Tensor,
    layout: KeyLayout,
}

/// Where a pass writes: scatter indices shaped like its K and V (`u32`, each entry the slot
/// of its input).
#[derive(Debug)]
pub struct SlotIndex {
    k: Tensor,
    v: Tensor,
}

impl SlotIndex {
    /// Indices for `slots`, for a cache of `layout`.
    pub fn new(
        slots: &[usize],
        batch: usize,
        heads: usize,
        head_dim: usize,
        layout: KeyLayout,
        dev: &Device,
    ) -> Result<Self> {
        let s: Vec<u32> = slots.iter().map(|&x| x as u32).collect();
        let n = slots.len();
        let v = Tensor::from_vec(s.clone(), (1, 1, n, 1), dev)?
            .broadcast_as((batch, heads, n, head_dim))?
            .contiguous()?;
        let k = match layout {
            KeyLayout::SlotMajor => v.clone(),
            KeyLayout::Transposed => Tensor::from_vec(s, (1, 1, 1, n), dev)?
                .broadcast_as((batch, heads, head_dim, n))?
                .contiguous()?,
        };
        Ok(Self { k, v })
    }
}

impl LayerKv {
    /// A zeroed cache of `slots` positions.
    pub fn new(
        batch: usize,
        heads: usize,
        slots: usize,
        head_dim: usize,
        layout: KeyLayout,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let k = match layout {
            KeyLayout::SlotMajor => Tensor::zeros((batch, heads, slots, head_dim), dtype, dev)?,
            KeyLayout::Transposed => Tensor::zeros((batch, heads, head_dim, slots), dtype, dev)?,
        };
        Ok(Self {
            k,
            v: Tensor::zeros((batch, heads, slots, head_dim), dtype, dev)?,
            layout,
        })
    }

    /// Writes `k, v: [B, H, n, D]` at the slots of `index`.
    pub fn write(&mut self, index: &SlotIndex, k: &Tensor, v: &Tensor) -> Result<()> {
        match self.layout {
            KeyLayout::SlotMajor => self.k.scatter_set(&index.k, &k.contiguous()?, 2)?,
            KeyLayout::Transposed => {
                self.k
                    .scatter_set(&index.k, &k.transpose(2, 3)?.contiguous()?, 3)?
            }
        }
        self.v.scatter_set(&index.v, &v.contiguous()?, 2)
    }

    /// The key layout.
    pub fn layout(&self) -> KeyLayout {
        self.layout
    }

    /// The whole K and V buffers.
    pub fn buffers(&self) -> (&Tensor, &Tensor) {
        (&self.k, &self.v)
    }

    /// Writes as [`LayerKv::write`], then returns `[B, H, len, D]` views of K and V over slots
    /// `0..len` (slot-major layout only).
    pub fn write_and_view(
        &mut self,
        index: &SlotIndex,
        k: &Tensor,
        v: &Tensor,
        len: usize,
    ) -> Result<(Tensor, Tensor)> {
        if self.layout != KeyLayout::SlotMajor {
            candle_core::bail!("views of a transposed key cache are not supported");
        }
        self.write(index, k, v)?;
        Ok((self.k.narrow(2, 0, len)?, self.v.narrow(2, 0, len)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_land_at_their_slots_and_others_stay_zero() -> Result<()> {
        let dev = Device::Cpu;
        let k = Tensor::from_vec(vec![1f32, 1., 2., 2., 3., 3., 4., 4.], (2, 1, 2, 2), &dev)?;
        for layout in [KeyLayout::SlotMajor, KeyLayout::Transposed] {
            let mut kv = LayerKv::new(2, 1, 6, 2, layout, DType::F32, &dev)?;
            let idx = SlotIndex::new(&[4, 1], 2, 1, 2, layout, &dev)?;
            kv.write(&idx, &k, &k)?;
            let (kk, vv) = kv.buffers();
            let kk = match layout {
                KeyLayout::SlotMajor => kk.clone(),
                KeyLayout::Transposed => kk.transpose(2, 3)?,
            };
            let got: Vec<Vec<f32>> = kk.get(0)?.get(0)?.to_vec2()?;
            assert_eq!(
                got,
                vec![
                    vec![0., 0.],
                    vec![2., 2.],
                    vec![0., 0.],
                    vec![0., 0.],
                    vec![1., 1.],
                    vec![0., 0.]
                ]
            );
            assert_eq!(vv.get(1)?.get(0)?.get(4)?.to_vec1::<f32>()?, vec![3., 3.]);
        }
        Ok(())
    }
}
