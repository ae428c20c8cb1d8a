//! CPU kernels for the shape of a ZipAR pass: a few input rows (k tokens, times 2 with CFG)
//! against large weights, and attention of those rows over a slot cache.
//!
//! Why not candle's matmul: on the CPU it calls gemm, which for two or more rows takes its
//! blocked path and packs the right-hand side (the whole weight) into panels on every call,
//! and forks threads for every call; with one row it takes a gemv path that does neither. So
//! a pass with 2 inputs cost about twice a pass with 1 (perf: packing and thread hand-offs,
//! not the multiply), and ZipAR's saved passes did not reach the wall clock. Here the weight
//! is packed into panels once, at load time ([`PackedWeight`]), and each call streams every
//! panel once, applying it to all input rows from registers: a k-input pass reads the same
//! bytes as a 1-input pass.
//!
//! SIMD through `pulp` (runtime dispatch to AVX2/FMA, NEON, ...; no `unsafe` here). Two
//! threads split the panels when the work is large enough to pay for the fork. The kernels
//! are candle custom ops, so the model code stays candle tensors; on a GPU the ordinary
//! candle ops run instead.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// Output columns per panel of a packed weight.
const PANEL: usize = 16;

/// Multiply-adds below which the work stays on one thread.
const PARALLEL_MIN: usize = 1 << 17;

/// A `[k, n]` weight stored as panels of [`PANEL`] columns: panel `p` holds rows `0..k` of
/// columns `p*16 .. p*16 + 16` contiguously (zero-padded past `n`), so a pass reads each panel
/// front to back.
#[derive(Debug, Clone)]
pub struct PackedWeight {
    /// The panels, 1-D f32.
    pub panels: Tensor,
    /// Inner dimension.
    pub k: usize,
    /// Output columns.
    pub n: usize,
}

impl PackedWeight {
    /// Packs a `[k, n]` f32 CPU tensor.
    pub fn pack(w: &Tensor) -> Result<Self> {
        let (k, n) = w.dims2()?;
        let src = w.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let panels = pack_panels(&src, k, n);
        let len = panels.len();
        Ok(Self {
            panels: Tensor::from_vec(panels, len, w.device())?,
            k,
            n,
        })
    }

    /// `x [m, k] . W` as a `[m, n]` tensor.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op2_no_bwd(
            &self.panels,
            &PackedMatmul {
                k: self.k,
                n: self.n,
            },
        )
    }
}

/// The panel layout of [`PackedWeight`] for a row-major `[k, n]` slice.
pub fn pack_panels(w: &[f32], k: usize, n: usize) -> Vec<f32> {
    let panels = n.div_ceil(PANEL);
    let mut out = vec![0f32; panels * k * PANEL];
    for p in 0..panels {
        let cols = PANEL.min(n - p * PANEL);
        for j in 0..k {
            let dst = (p * k + j) * PANEL;
            out[dst..dst + cols].copy_from_slice(&w[j * n + p * PANEL..j * n + p * PANEL + cols]);
        }
    }
    out
}

/// `y[m, n] = x[m, k] . W` with `W` in the layout of [`pack_panels`].
pub fn matmul_packed(x: &[f32], panels: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let count = n.div_ceil(PANEL);
    let mut y = vec![0f32; m * n];
    if m * k * n >= PARALLEL_MIN && count >= 2 {
        let half = count / 2;
        let (mut left, mut right) = (vec![0f32; m * half * PANEL], vec![0f32; m * (count - half) * PANEL]);
        rayon::join(
            || run_panels(x, panels, m, k, 0..half, &mut left),
            || run_panels(x, panels, m, k, half..count, &mut right),
        );
        scatter_panels(&left, 0, half, m, n, &mut y);
        scatter_panels(&right, half, count - half, m, n, &mut y);
    } else {
        let mut all = vec![0f32; m * count * PANEL];
        run_panels(x, panels, m, k, 0..count, &mut all);
        scatter_panels(&all, 0, count, m, n, &mut y);
    }
    y
}

/// Copies `[panels][m][16]` results (panels `first..first + count`) into row-major `y [m, n]`.
fn scatter_panels(src: &[f32], first: usize, count: usize, m: usize, n: usize, y: &mut [f32]) {
    for p in 0..count {
        let col = (first + p) * PANEL;
        let cols = PANEL.min(n - col);
        for i in 0..m {
            let s = (p * m + i) * PANEL;
            y[i * n + col..i * n + col + cols].copy_from_slice(&src[s..s + cols]);
        }
    }
}

/// Panels `range` of `x . W` into `out` laid out `[panel][m][16]`.
fn run_panels(x: &[f32], panels: &[f32], m: usize, k: usize, range: std::ops::Range<usize>, out: &mut [f32]) {
    pulp::Arch::new().dispatch(Panels {
        x,
        panels,
        m,
        k,
        range,
        out,
    });
}

struct Panels<'a> {
    x: &'a [f32],
    panels: &'a [f32],
    m: usize,
    k: usize,
    range: std::ops::Range<usize>,
    out: &'a mut [f32],
}

impl pulp::WithSimd for Panels<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let Panels {
            x,
            panels,
            m,
            k,
            range,
            out,
        } = self;
        for (slot, p) in range.enumerate() {
            let panel = &panels[p * k * PANEL..(p + 1) * k * PANEL];
            let dst = &mut out[slot * m * PANEL..(slot + 1) * m * PANEL];
            // Register tiles of up to 4 rows x one panel: the accumulators stay in registers
            // over the whole inner dimension, and each panel row loaded feeds every row.
            let mut i = 0;
            while i < m {
                i += match m - i {
                    1 => tile::<S, 1>(simd, x, panel, k, i, dst),
                    2 => tile::<S, 2>(simd, x, panel, k, i, dst),
                    3 => tile::<S, 3>(simd, x, panel, k, i, dst),
                    _ => tile::<S, 4>(simd, x, panel, k, i, dst),
                };
            }
        }
    }
}

/// Rows `i0..i0 + R` of one panel; returns R.
#[inline(always)]
fn tile<S: pulp::Simd, const R: usize>(
    simd: S,
    x: &[f32],
    panel: &[f32],
    k: usize,
    i0: usize,
    dst: &mut [f32],
) -> usize {
    let mut acc = [[simd.splat_f32s(0.0); PANEL]; R];
    let vecs = {
        let (v, t) = S::as_simd_f32s(&panel[..PANEL]);
        debug_assert!(t.is_empty(), "a panel is a whole number of vectors");
        v.len()
    };
    for j in 0..k {
        let (wv, _) = S::as_simd_f32s(&panel[j * PANEL..(j + 1) * PANEL]);
        for r in 0..R {
            let a = simd.splat_f32s(x[(i0 + r) * k + j]);
            for v in 0..vecs {
                acc[r][v] = simd.mul_add_f32s(a, wv[v], acc[r][v]);
            }
        }
    }
    for r in 0..R {
        let (d, _) = S::as_mut_simd_f32s(&mut dst[(i0 + r) * PANEL..(i0 + r + 1) * PANEL]);
        d.copy_from_slice(&acc[r][..vecs]);
    }
    R
}

/// candle custom op: `x [m, k]` times a packed weight (f32, CPU); see [`PackedWeight`].
pub struct PackedMatmul {
    /// Inner dimension.
    pub k: usize,
    /// Output columns.
    pub n: usize,
}

impl CustomOp2 for PackedMatmul {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (Some((x0, x1)), Some((w0, w1))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            candle_core::bail!("packed-matmul needs contiguous inputs");
        };
        let (m, k) = xl.shape().dims2()?;
        if k != self.k || w1 - w0 != self.n.div_ceil(PANEL) * k * PANEL {
            candle_core::bail!("packed-matmul: [{m}, {k}] x packed [{}, {}]", self.k, self.n);
        }
        let x = &xs.as_slice::<f32>()?[x0..x1];
        let w = &ws.as_slice::<f32>()?[w0..w1];
        Ok((CpuStorage::F32(matmul_packed(x, w, m, k, self.n)), Shape::from((m, self.n))))
    }
}

/// Dot product with 16 independent accumulators, so that it vectorises (a single running sum
/// is a dependency chain the compiler may not reorder).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// candle custom op: attention of a pass's queries over the slot cache (f32, CPU).
///
/// Inputs: `q [B, H, k, D]`, and the caches `K, V [B, H, S, D]` (the first `len` slots are
/// used). Query `i` sees slot `j` when `j <= slots[i]` and `visible[j]`. Output `[B, k, H * D]`,
/// the layout the output projection takes, so no transpose copy follows.
pub struct SlotAttention<'a> {
    /// Slot of each query.
    pub slots: &'a [usize],
    /// Slots a query may see at all (never-written ones hidden when masking is on).
    pub visible: &'a [bool],
    /// Slots in use: `max(slots) + 1`.
    pub len: usize,
    /// Softmax scale, `1 / sqrt(D)`.
    pub scale: f32,
}

impl CustomOp3 for SlotAttention<'_> {
    fn name(&self) -> &'static str {
        "slot-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (Some((q0, q1)), Some((k0, k1)), Some((v0, v1))) = (
            ql.contiguous_offsets(),
            kl.contiguous_offsets(),
            vl.contiguous_offsets(),
        ) else {
            candle_core::bail!("slot-attention needs contiguous inputs");
        };
        let (b, h, k, d) = ql.shape().dims4()?;
        let (_, _, s, _) = kl.shape().dims4()?;
        if kl.shape() != vl.shape() || self.slots.len() != k || self.len > s || self.visible.len() < self.len {
            candle_core::bail!("slot-attention: inconsistent shapes");
        }
        let q = &qs.as_slice::<f32>()?[q0..q1];
        let kc = &ks.as_slice::<f32>()?[k0..k1];
        let vc = &vs.as_slice::<f32>()?[v0..v1];
        let heads: Vec<(usize, usize)> = (0..b).flat_map(|bi| (0..h).map(move |hi| (bi, hi))).collect();
        let one = |&(bi, hi): &(usize, usize)| -> Vec<f32> {
            let base = (bi * h + hi) * s * d;
            let keys = &kc[base..base + self.len * d];
            let values = &vc[base..base + self.len * d];
            let mut out = vec![0f32; k * d];
            let mut scores = vec![0f32; self.len];
            pulp::Arch::new().dispatch(|| {
                for (i, &slot) in self.slots.iter().enumerate() {
                    let qi = &q[((bi * h + hi) * k + i) * d..][..d];
                    let mut max = f32::NEG_INFINITY;
                    for (j, sc) in scores.iter_mut().enumerate() {
                        *sc = if j <= slot && self.visible[j] {
                            dot(qi, &keys[j * d..(j + 1) * d]) * self.scale
                        } else {
                            f32::NEG_INFINITY
                        };
                        max = max.max(*sc);
                    }
                    let mut sum = 0f32;
                    for sc in scores.iter_mut() {
                        *sc = if *sc == f32::NEG_INFINITY { 0.0 } else { (*sc - max).exp() };
                        sum += *sc;
                    }
                    let oi = &mut out[i * d..(i + 1) * d];
                    for (j, &p) in scores.iter().enumerate() {
                        if p != 0.0 {
                            let p = p / sum;
                            for (o, &v) in oi.iter_mut().zip(&values[j * d..(j + 1) * d]) {
                                *o += v * p;
                            }
                        }
                    }
                }
            });
            out
        };
        let per_head: Vec<Vec<f32>> = if b * h * k * self.len * d >= PARALLEL_MIN {
            use rayon::prelude::*;
            heads.par_iter().map(one).collect()
        } else {
            heads.iter().map(one).collect()
        };
        // [B, H, k, D] pieces -> [B, k, H * D]
        let mut y = vec![0f32; b * k * h * d];
        for (&(bi, hi), o) in heads.iter().zip(&per_head) {
            for i in 0..k {
                let dst = ((bi * k + i) * h + hi) * d;
                y[dst..dst + d].copy_from_slice(&o[i * d..(i + 1) * d]);
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((b, k, h * d))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for c in 0..n {
                y[i * n + c] = (0..k).map(|j| x[i * k + j] as f64 * w[j * n + c] as f64).sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn packed_product_matches_the_naive_one_on_odd_shapes_and_both_thread_paths() {
        let mut seed = 1u32;
        let mut next = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for &(m, k, n) in &[(1, 7, 5), (3, 13, 33), (2, 256, 768), (16, 64, 1024), (5, 257, 100), (70, 9, 40)] {
            let x: Vec<f32> = (0..m * k).map(|_| next()).collect();
            let w: Vec<f32> = (0..k * n).map(|_| next()).collect();
            let got = matmul_packed(&x, &pack_panels(&w, k, n), m, k, n);
            let want = naive(&x, &w, m, k, n);
            let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 1e-4, "{m}x{k}x{n}: {err}");
        }
    }
}
