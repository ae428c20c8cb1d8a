//! A bias-free linear layer that keeps its weight transposed, `[in, out]`, contiguous.
//!
//! `candle_nn::Linear` multiplies by a transposed *view* of the `[out, in]` weight. On the CPU
//! the gemm crate then repacks the whole weight on every call as soon as the input has more
//! than one row, which is exactly the shape of a ZipAR pass (several tokens) or of a CFG
//! batch (two halves): the repacking dominated the pass time of the built-in model. Taking
//! the transpose once at load time removes it. Weight files keep LlamaGen's `[out, in]`
//! layout and key names; only the in-memory copy differs.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// `y = x W^T` with `W` read as `[out, in]` from `{prefix}.weight`.
#[derive(Debug, Clone)]
pub struct Dense {
    wt: Tensor,
}

impl Dense {
    /// Loads `weight` (`[out, in]`) under `vb` and stores its transpose.
    pub fn load(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let w = vb.get((out_dim, in_dim), "weight")?;
        Ok(Self {
            wt: w.t()?.contiguous()?,
        })
    }
}

impl Module for Dense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match *x.dims() {
            [_, _] => x.matmul(&self.wt),
            [b, n, k] => x
                .reshape((b * n, k))?
                .matmul(&self.wt)?
                .reshape((b, n, self.wt.dim(1)?)),
            _ => x.broadcast_matmul(&self.wt),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    use super::*;

    #[test]
    fn matches_candle_linear_for_2d_and_3d_inputs() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let linear = candle_nn::linear_no_bias(6, 5, vb.pp("p"))?;
        let dense = Dense::load(6, 5, vb.pp("p"))?;
        for shape in [vec![3, 6], vec![2, 4, 6], vec![1, 1, 6]] {
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
