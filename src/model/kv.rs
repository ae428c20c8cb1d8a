//! Slot-indexed KV cache: one preallocated `[B, H, S, D]` buffer per layer for K and for V.
//!
//! A pass writes its inputs' K/V at arbitrary slots in place (ZipAR feeds several rows at
//! once, and overwrites an auxiliary slot when a row completes); nothing is concatenated.
//! Never-written slots stay zero, as in LlamaGen's zero-initialised cache.

use candle_core::{DType, Device, Result, Tensor};

/// The cache of one layer.
#[derive(Debug)]
pub struct LayerKv {
    k: Tensor,
    v: Tensor,
}

impl LayerKv {
    /// A zeroed cache of `slots` positions.
    pub fn new(
        batch: usize,
        heads: usize,
        slots: usize,
        head_dim: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        Ok(Self {
            k: Tensor::zeros((batch, heads, slots, head_dim), dtype, dev)?,
            v: Tensor::zeros((batch, heads, slots, head_dim), dtype, dev)?,
        })
    }

    /// Writes `k, v: [B, H, n, D]` at the slots in `index` (u32, `[B, H, n, D]`, each entry the
    /// slot of its input).
    pub fn write(&mut self, index: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
        self.k.scatter_set(index, &k.contiguous()?, 2)?;
        self.v.scatter_set(index, &v.contiguous()?, 2)
    }

    /// The whole K and V buffers, `[B, H, S, D]`.
    pub fn buffers(&self) -> (&Tensor, &Tensor) {
        (&self.k, &self.v)
    }

    /// Writes as [`LayerKv::write`], then returns views of K and V over slots `0..len`.
    pub fn write_and_view(
        &mut self,
        index: &Tensor,
        k: &Tensor,
        v: &Tensor,
        len: usize,
    ) -> Result<(Tensor, Tensor)> {
        self.write(index, k, v)?;
        Ok((self.k.narrow(2, 0, len)?, self.v.narrow(2, 0, len)?))
    }
}

/// The scatter index for `slots` shaped like the pass's K/V: `[B, H, n, D]`.
pub fn slot_index(
    slots: &[usize],
    batch: usize,
    heads: usize,
    head_dim: usize,
    dev: &Device,
) -> Result<Tensor> {
    let s: Vec<u32> = slots.iter().map(|&x| x as u32).collect();
    Tensor::from_vec(s, (1, 1, slots.len(), 1), dev)?
        .broadcast_as((batch, heads, slots.len(), head_dim))?
        .contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_land_at_their_slots_and_others_stay_zero() -> Result<()> {
        let dev = Device::Cpu;
        let mut kv = LayerKv::new(2, 1, 6, 2, DType::F32, &dev)?;
        let k = Tensor::from_vec(vec![1f32, 1., 2., 2., 3., 3., 4., 4.], (2, 1, 2, 2), &dev)?;
        let idx = slot_index(&[4, 1], 2, 1, 2, &dev)?;
        let (kk, vv) = kv.write_and_view(&idx, &k, &k, 6)?;
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
        Ok(())
    }
}
