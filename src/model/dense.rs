//! A bias-free linear layer that keeps its weight in the layout its device multiplies fastest:
//! packed panels on the CPU (see `cpu_kernels`), the `[in, out]` transpose elsewhere.
//!
//! `candle_nn::Linear` multiplies by a transposed *view* of the `[out, in]` weight, which makes
//! gemm repack the whole weight on every call with more than one row: exactly the shape of a
//! ZipAR pass (several tokens) or of a CFG batch (two halves). Weight files keep LlamaGen's
//! `[out, in]` layout and key names; only the in-memory copy differs.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::cpu_kernels;

/// `y = x W^T` with `W` read as `[out, in]` from `{prefix}.weight`.
#[derive(Debug, Clone)]
pub enum Dense {
    /// f32 on the CPU: packed for [`cpu_kernels::PackedMatmul`].
    Packed(cpu_kernels::PackedWeight),
    /// Elsewhere: the `[in, out]` transpose for candle's matmul.
    Transposed(Tensor),
}

impl Dense {
    /// Loads `weight` (`[out, in]`) under `vb` and stores it in the form its device runs best.
    pub fn load(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let wt = vb.get((out_dim, in_dim), "weight")?.t()?.contiguous()?;
        if wt.device().is_cpu() && wt.dtype() == DType::F32 {
            Ok(Self::Packed(cpu_kernels::PackedWeight::pack(&wt)?))
        } else {
            Ok(Self::Transposed(wt))
        }
    }

    /// Several `[out_i, in]` weights stacked into one layer (`Σ out_i` outputs, in order):
    /// separate q, k and v projections multiplied as one, as LlamaGen's fused `wqkv` is.
    pub fn load_stacked(in_dim: usize, parts: &[(usize, VarBuilder)]) -> Result<Self> {
        let ws = parts
            .iter()
            .map(|(out_dim, vb)| vb.get((*out_dim, in_dim), "weight"))
            .collect::<Result<Vec<_>>>()?;
        let wt = Tensor::cat(&ws, 0)?.t()?.contiguous()?;
        if wt.device().is_cpu() && wt.dtype() == DType::F32 {
            Ok(Self::Packed(cpu_kernels::PackedWeight::pack(&wt)?))
        } else {
            Ok(Self::Transposed(wt))
        }
    }

    /// `x [m, in]` times the weight.
    fn matmul_2d(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Packed(p) => p.matmul(x),
            Self::Transposed(wt) => x.matmul(wt),
        }
    }

    fn out_dim(&self) -> usize {
        match self {
            Self::Packed(p) => p.n,
            Self::Transposed(wt) => wt.dims().get(1).copied().unwrap_or(0),
        }
    }
}

impl Module for Dense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match *x.dims() {
            [_, _] => self.matmul_2d(x),
            [b, n, k] => self
                .matmul_2d(&x.reshape((b * n, k))?)?
                .reshape((b, n, self.out_dim())),
            _ => candle_core::bail!("Dense takes [m, in] or [b, n, in], got {:?}", x.dims()),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use candle_nn::VarMap;

    use super::*;

    #[test]
    fn matches_candle_linear_for_2d_and_3d_inputs() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let linear = candle_nn::linear_no_bias(6, 5, vb.pp("p"))?;
        let dense = Dense::load(6, 5, vb.pp("p"))?;
        for shape in [vec![3, 6], vec![2, 4, 6], vec![1, 1, 6], vec![70, 6]] {
            let x = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev)?;
            let want = linear.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
            let got = dense.forward(&x)?;
            assert_eq!(got.dims()[..shape.len() - 1], shape[..shape.len() - 1]);
            let got = got.flatten_all()?.to_vec1::<f32>()?;
            let diff = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "{diff}");
        }
        Ok(())
    }
}
