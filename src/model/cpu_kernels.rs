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
//! SIMD through `pulp` (runtime dispatch to AVX-512, AVX2/FMA, NEON, ...; no `unsafe` here). Two
//! threads split the panels when the work is large enough to pay for the fork. The kernels
//! are candle custom ops, so the model code stays candle tensors; on a GPU the ordinary
//! candle ops run instead.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// Output columns per panel of a packed weight.
pub(crate) const PANEL: usize = 16;

/// Multiply-adds below which the work stays on one thread. Lowered from 2^17 once the tiles
/// got faster: the 1-row 256 x 256 projections and the attention of 2-4 queries now split
/// too (`pass_cost`, min of 4 alternated runs: a 1-input CFG pass 388 -> 272 us, 4 inputs
/// without CFG 370 -> 313 us; 2^14 gained nothing more).
const PARALLEL_MIN: usize = 1 << 15;

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
        let src = w
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
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
        let (mut left, mut right) = (
            vec![0f32; m * half * PANEL],
            vec![0f32; m * (count - half) * PANEL],
        );
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

/// [`matmul_packed`] on the calling thread only (for callers that parallelise outside).
fn matmul_packed_serial(x: &[f32], panels: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let count = n.div_ceil(PANEL);
    let mut all = vec![0f32; m * count * PANEL];
    run_panels(x, panels, m, k, 0..count, &mut all);
    let mut y = vec![0f32; m * n];
    scatter_panels(&all, 0, count, m, n, &mut y);
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
pub(crate) fn run_panels(
    x: &[f32],
    panels: &[f32],
    m: usize,
    k: usize,
    range: std::ops::Range<usize>,
    out: &mut [f32],
) {
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
        let a = (x, k);
        // Panel `p` of the range: its rows of the weight, and its `[m][16]` block of `out`.
        let b = Side {
            at: range.start * k * PANEL,
            stride: PANEL,
            step: k * PANEL,
        };
        let c = Side {
            at: 0,
            stride: PANEL,
            step: m * PANEL,
        };
        product(simd, a, m, (panels, b), k, (out, c), range.len());
    }
}

/// Where a tile's panels lie in a slice: panel `q` of the tile, row `j`, starts at
/// `at + q * step + j * stride`.
#[derive(Clone, Copy)]
struct Side {
    at: usize,
    stride: usize,
    step: usize,
}

impl Side {
    /// The side of the `p`-th panel after this one's.
    fn panel(self, p: usize) -> Side {
        Side {
            at: self.at + p * self.step,
            ..self
        }
    }
}

/// All `m` rows of panels `0..count` of a product `c = a . b` (`b` and `c` laid out as their
/// sides say), in register tiles of R rows x C panels. The shapes keep at least eight
/// independent multiply-add chains in flight, each of which waits on the latency of its last
/// multiply-add: a 16-column panel is two vectors on AVX2, one on AVX-512, so AVX-512 takes
/// twice the panels per tile. AVX-512's 32 registers hold up to 16 accumulators (AVX2's 16
/// hold 8): from three rows on, its tiles are four panels wide, so each row of weights loaded
/// feeds more multiply-adds and more panels stream from memory at once (a pass of 2-8 inputs
/// 6-14% faster than with two-panel tiles, on the built-in and the LlamaGen-B-sized model).
/// With four rows or more, panels are the outer loop: each is read from memory once and
/// stays in L1 for the row groups after the first.
#[inline(always)]
fn product<S: pulp::Simd>(
    simd: S,
    a: (&[f32], usize),
    m: usize,
    (b, bs): (&[f32], Side),
    k: usize,
    (c, cs): (&mut [f32], Side),
    count: usize,
) {
    if m == 0 {
        return;
    }
    let per_panel = PANEL / S::F32_LANES;
    let accumulators = if S::F32_LANES == 16 { 16 } else { 8 };
    // (At most four panels: a wider tile's accumulator array no longer stays in registers.)
    let panels_for = |rows: usize| (accumulators / (rows * per_panel)).clamp(1, 4);
    let wide = panels_for(m.min(4));
    let mut p = 0;
    while p < count {
        let cols = if p + wide <= count { wide } else { 1 };
        let mut i = 0;
        while i < m {
            let rows = (m - i).min(4);
            tile_shape(
                simd,
                (rows, cols),
                a,
                i,
                (b, bs.panel(p)),
                k,
                (&mut *c, cs.panel(p)),
            );
            i += rows;
        }
        p += cols;
    }
}

/// [`tile`] for a shape known at run time.
#[inline(always)]
fn tile_shape<S: pulp::Simd>(
    simd: S,
    shape: (usize, usize),
    a: (&[f32], usize),
    i0: usize,
    b: (&[f32], Side),
    k: usize,
    c: (&mut [f32], Side),
) {
    match shape {
        (1, 4) => tile::<S, 1, 4>(simd, a, i0, b, k, c),
        (1, 2) => tile::<S, 1, 2>(simd, a, i0, b, k, c),
        (2, 4) => tile::<S, 2, 4>(simd, a, i0, b, k, c),
        (2, 2) => tile::<S, 2, 2>(simd, a, i0, b, k, c),
        (3, 4) => tile::<S, 3, 4>(simd, a, i0, b, k, c),
        (4, 4) => tile::<S, 4, 4>(simd, a, i0, b, k, c),
        (3, 2) => tile::<S, 3, 2>(simd, a, i0, b, k, c),
        (4, 2) => tile::<S, 4, 2>(simd, a, i0, b, k, c),
        (1, 1) => tile::<S, 1, 1>(simd, a, i0, b, k, c),
        (2, 1) => tile::<S, 2, 1>(simd, a, i0, b, k, c),
        (3, 1) => tile::<S, 3, 1>(simd, a, i0, b, k, c),
        (4, 1) => tile::<S, 4, 1>(simd, a, i0, b, k, c),
        (rows, cols) => {
            // a shape without a tile of its own: one panel at a time
            let ((bv, bs), (cv, cs)) = (b, c);
            for q in 0..cols {
                let (b, c) = ((bv, bs.panel(q)), (&mut *cv, cs.panel(q)));
                match rows {
                    1 => tile::<S, 1, 1>(simd, a, i0, b, k, c),
                    2 => tile::<S, 2, 1>(simd, a, i0, b, k, c),
                    3 => tile::<S, 3, 1>(simd, a, i0, b, k, c),
                    _ => tile::<S, 4, 1>(simd, a, i0, b, k, c),
                };
            }
            rows
        }
    };
}

/// Rows `i0..i0 + R` of `C` 16-column panels of a product `c = a . b`; returns R.
///
/// Row `i` of `a` starts at `i * a_stride`; `b` and `c` are laid out as their [`Side`]s say.
/// The R x C x 16 accumulators stay in registers over the whole inner dimension `k`, and
/// each row of `b` loaded feeds every row of `a`.
#[inline(always)]
fn tile<S: pulp::Simd, const R: usize, const C: usize>(
    simd: S,
    (a, a_stride): (&[f32], usize),
    i0: usize,
    (b, bs): (&[f32], Side),
    k: usize,
    (c, cs): (&mut [f32], Side),
) -> usize {
    let vecs = PANEL / S::F32_LANES;
    let mut acc = [[[simd.splat_f32s(0.0); PANEL]; C]; R];
    for j in 0..k {
        let w: [&[S::f32s]; C] = std::array::from_fn(|q| {
            let at = bs.at + q * bs.step + j * bs.stride;
            S::as_simd_f32s(&b[at..at + PANEL]).0
        });
        for r in 0..R {
            let x = simd.splat_f32s(a[(i0 + r) * a_stride + j]);
            for q in 0..C {
                for v in 0..vecs {
                    acc[r][q][v] = simd.mul_add_f32s(x, w[q][v], acc[r][q][v]);
                }
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (q, panel) in row.iter().enumerate() {
            let at = cs.at + q * cs.step + (i0 + r) * cs.stride;
            let (d, _) = S::as_mut_simd_f32s(&mut c[at..at + PANEL]);
            d.copy_from_slice(&panel[..vecs]);
        }
    }
    R
}

/// `c [m, n] = a [m, k] . b [k, n]` for operands in place: row `i` of `a` starts at
/// `i * a_stride`, row `j` of `b` at `j * b_stride`; `c` is dense. Whole 16-column panels go
/// through [`tile`], the last partial one through a zero-padded copy. For the attention's two small
/// products, whose operands are cache rows that are not worth packing.
#[inline(always)]
fn strided_product<S: pulp::Simd>(
    simd: S,
    a: (&[f32], usize),
    (b, b_stride): (&[f32], usize),
    (m, k, n): (usize, usize, usize),
    c: &mut [f32],
) {
    let whole = n / PANEL;
    let bs = Side {
        at: 0,
        stride: b_stride,
        step: PANEL,
    };
    let cs = Side {
        at: 0,
        stride: n,
        step: PANEL,
    };
    product(simd, a, m, (b, bs), k, (&mut *c, cs), whole);
    // The last, partial panel: its columns copied into a zero-padded one.
    let (first, cols) = (whole * PANEL, n - whole * PANEL);
    if cols > 0 {
        let mut pb = vec![0f32; k * PANEL];
        for (j, row) in pb.chunks_exact_mut(PANEL).enumerate() {
            row[..cols].copy_from_slice(&b[j * b_stride + first..j * b_stride + n]);
        }
        let mut pc = vec![0f32; m * PANEL];
        let dense = Side {
            at: 0,
            stride: PANEL,
            step: PANEL,
        };
        product(simd, a, m, (&pb, dense), k, (&mut pc, dense), 1);
        for (i, row) in pc.chunks_exact(PANEL).enumerate() {
            c[i * n + first..(i + 1) * n].copy_from_slice(&row[..cols]);
        }
    }
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
            candle_core::bail!(
                "packed-matmul: [{m}, {k}] x packed [{}, {}]",
                self.k,
                self.n
            );
        }
        let x = &xs.as_slice::<f32>()?[x0..x1];
        let w = &ws.as_slice::<f32>()?[w0..w1];
        Ok((
            CpuStorage::F32(matmul_packed(x, w, m, k, self.n)),
            Shape::from((m, self.n)),
        ))
    }
}

/// A 2-D convolution (stride 1, square kernel, zero padding `k / 2`) for the CPU: im2col in
/// channels-last order (each patch row is a few contiguous copies) in chunks of output pixels,
/// times the kernel packed once at load time with [`matmul_packed`]. candle's own CPU conv2d
/// reorders the kernel on every call and scatters its im2col writes with a stride of the tile
/// size, which made the VQ decoder several times slower than PyTorch's.
#[derive(Debug, Clone)]
pub struct PackedConv {
    weight: PackedWeight,
    bias: Option<Vec<f32>>,
    ksize: usize,
    cin: usize,
    cout: usize,
}

/// Output pixels per im2col chunk (bounds the scratch memory at `CHUNK * k * k * cin` floats).
const CONV_CHUNK: usize = 256;

impl PackedConv {
    /// From candle's `[cout, cin, k, k]` weight and optional `[cout]` bias.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (cout, cin, kh, kw) = weight.dims4()?;
        if kh != kw || kh % 2 == 0 {
            candle_core::bail!("PackedConv takes odd square kernels, got {kh}x{kw}");
        }
        // [cout, cin, kh, kw] -> [(kh, kw, cin), cout]
        let w = weight
            .to_dtype(candle_core::DType::F32)?
            .permute((2, 3, 1, 0))?
            .reshape((kh * kw * cin, cout))?
            .contiguous()?;
        Ok(Self {
            weight: PackedWeight::pack(&w)?,
            bias: bias
                .map(|b| b.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>())
                .transpose()?,
            ksize: kh,
            cin,
            cout,
        })
    }

    /// `x [B, cin, H, W]` -> `[B, cout, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let nhwc = x.permute((0, 2, 3, 1))?.contiguous()?;
        self.forward_nhwc(&nhwc)?.permute((0, 3, 1, 2))
    }

    /// Channels-last: `x [B, H, W, cin]` -> `[B, H, W, cout]`, no layout copies.
    pub fn forward_nhwc(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        if c != self.cin {
            candle_core::bail!("conv expects {} channels, got {c}", self.cin);
        }
        let out = x
            .contiguous()?
            .apply_op2_no_bwd(&self.weight.panels, &ConvOp { conv: self, h, w })?;
        out.reshape((b, h, w, self.cout))
    }
}

/// Whether a 3x3 convolution over an `h x w` image runs as Winograd F(4x4, 3x3) rather than
/// im2col. Measured with `vq_ops decode` on the LlamaGen-B-sized decoder: Winograd is faster
/// down to its 16 x 16 level (512 channels, 16 tiles: 10.8 against 12.5 ms a residual block),
/// and on the built-in model's 16-64 channels (8.1 against 9.0 ms an image);
/// below a few tiles the per-call kernel transform is not repaid.
fn winograd_pays(h: usize, w: usize) -> bool {
    h >= 8 && w >= 8
}

struct ConvOp<'a> {
    conv: &'a PackedConv,
    h: usize,
    w: usize,
}

impl CustomOp2 for ConvOp<'_> {
    fn name(&self) -> &'static str {
        "packed-conv"
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
            candle_core::bail!("packed-conv needs contiguous inputs");
        };
        let x = &xs.as_slice::<f32>()?[x0..x1];
        let panels = &ws.as_slice::<f32>()?[w0..w1];
        let PackedConv {
            ksize, cin, cout, ..
        } = *self.conv;
        let (h, w) = (self.h, self.w);
        let k = ksize * ksize * cin;
        let pixels = h * w;
        let images = x.len() / (pixels * cin);
        let mut out = vec![0f32; images * pixels * cout];
        if ksize == 3 && winograd_pays(h, w) {
            let u = super::winograd::transform_kernel(panels, cin, cout);
            let shape = super::winograd::Shape { h, w, cin, cout };
            for (src, dst) in x
                .chunks_exact(pixels * cin)
                .zip(out.chunks_exact_mut(pixels * cout))
            {
                super::winograd::conv3x3(src, &u, self.conv.bias.as_deref(), shape, dst);
            }
            return Ok((CpuStorage::F32(out), Shape::from((images * pixels, cout))));
        }
        let chunk = |src: &[f32], start: usize, col: &mut Vec<f32>, dst: &mut [f32], serial| {
            let end = (start + CONV_CHUNK).min(pixels);
            let rows = end - start;
            col.resize(rows * k, 0.0);
            im2col(src, &mut col[..rows * k], start, end, (h, w, cin, ksize));
            let y = if serial {
                matmul_packed_serial(&col[..rows * k], panels, rows, k, cout)
            } else {
                matmul_packed(&col[..rows * k], panels, rows, k, cout)
            };
            dst.copy_from_slice(&y);
            if let Some(bias) = &self.conv.bias {
                for row in dst.chunks_exact_mut(cout) {
                    row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
                }
            }
        };
        for img in 0..images {
            let src = &x[img * pixels * cin..(img + 1) * pixels * cin];
            let dst = &mut out[img * pixels * cout..(img + 1) * pixels * cout];
            if pixels > CONV_CHUNK {
                // Chunks of output pixels in parallel, each with its own im2col scratch and a
                // single-threaded product: the copy into the scratch is parallel too.
                use rayon::prelude::*;
                dst.par_chunks_mut(CONV_CHUNK * cout)
                    .enumerate()
                    .for_each_init(Vec::new, |col, (i, d)| {
                        chunk(src, i * CONV_CHUNK, col, d, true)
                    });
            } else {
                // One chunk: the product splits its column panels between the threads.
                chunk(src, 0, &mut Vec::new(), dst, false);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((images * pixels, cout))))
    }
}

/// GroupNorm (optionally followed by SiLU) over a channels-last `[B, H, W, C]` f32 tensor:
/// one pass for each group's mean and variance (f64 sums, pixel chunks in parallel), one for
/// `x * scale + shift` per channel. candle's GroupNorm wants channels first and runs as a
/// dozen separate passes; the VQ decoder calls this twice per residual block at full
/// resolution.
pub struct GroupNormNhwc<'a> {
    /// Number of groups (divides C).
    pub groups: usize,
    /// Added to the variance.
    pub eps: f64,
    /// Per-channel scale.
    pub gamma: &'a [f32],
    /// Per-channel shift.
    pub beta: &'a [f32],
    /// Apply SiLU to the result.
    pub silu: bool,
}

impl CustomOp1 for GroupNormNhwc<'_> {
    fn name(&self) -> &'static str {
        "group-norm-nhwc"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let Some((o0, o1)) = l.contiguous_offsets() else {
            candle_core::bail!("group-norm-nhwc needs a contiguous input");
        };
        let (b, h, w, c) = l.shape().dims4()?;
        let g = self.groups;
        if g == 0 || c % g != 0 || self.gamma.len() != c || self.beta.len() != c {
            candle_core::bail!("group-norm-nhwc: {c} channels, {g} groups");
        }
        let x = &s.as_slice::<f32>()?[o0..o1];
        let (pixels, cpg) = (h * w, c / g);
        let mut out = vec![0f32; x.len()];
        const PIX: usize = 1024;
        for img in 0..b {
            let src = &x[img * pixels * c..(img + 1) * pixels * c];
            // Sums of `x - shift` with each group's first-pixel mean as the shift: a large mean
            // does not cancel the variance out of `E[x^2] - E[x]^2`.
            let shifts: Vec<f32> = src[..c]
                .chunks_exact(cpg)
                .map(|grp| grp.iter().sum::<f32>() / cpg as f32)
                .collect();
            let sums = src
                .par_chunks(PIX * c)
                .map(|chunk| {
                    let mut acc = vec![(0f64, 0f64); g];
                    for px in chunk.chunks_exact(c) {
                        for ((a, grp), &k) in acc.iter_mut().zip(px.chunks_exact(cpg)).zip(&shifts)
                        {
                            let (s1, s2) = grp.iter().fold((0f32, 0f32), |(s1, s2), &v| {
                                let d = v - k;
                                (s1 + d, s2 + d * d)
                            });
                            a.0 += s1 as f64;
                            a.1 += s2 as f64;
                        }
                    }
                    acc
                })
                .reduce(
                    || vec![(0f64, 0f64); g],
                    |mut a, b| {
                        a.iter_mut().zip(b).for_each(|(x, y)| {
                            x.0 += y.0;
                            x.1 += y.1;
                        });
                        a
                    },
                );
            let n = (pixels * cpg) as f64;
            let mut scale = vec![0f32; c];
            let mut shift = vec![0f32; c];
            for ch in 0..c {
                let (s1, s2) = sums[ch / cpg];
                let shifted = s1 / n;
                let var = (s2 / n - shifted * shifted).max(0.0);
                let mean = shifts[ch / cpg] as f64 + shifted;
                let inv = 1.0 / (var + self.eps).sqrt();
                scale[ch] = (self.gamma[ch] as f64 * inv) as f32;
                shift[ch] = (self.beta[ch] as f64 - mean * self.gamma[ch] as f64 * inv) as f32;
            }
            let silu = self.silu;
            out[img * pixels * c..(img + 1) * pixels * c]
                .par_chunks_mut(PIX * c)
                .zip(src.par_chunks(PIX * c))
                .for_each(|(dst, chunk)| {
                    for (dpx, px) in dst.chunks_exact_mut(c).zip(chunk.chunks_exact(c)) {
                        for (((d, &v), &sc), &sh) in dpx.iter_mut().zip(px).zip(&scale).zip(&shift)
                        {
                            let y = v * sc + sh;
                            *d = if silu { y / (1.0 + (-y).exp()) } else { y };
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// The channels-last im2col rows of output pixels `start..end` of an `h x w x cin` image for
/// a `ksize x ksize` kernel with zero padding `ksize / 2`: row `r` holds the patch of pixel
/// `start + r` as `(kh, kw, cin)`.
fn im2col(
    src: &[f32],
    col: &mut [f32],
    start: usize,
    end: usize,
    (h, w, cin, ksize): (usize, usize, usize, usize),
) {
    let pad = ksize / 2;
    let k = ksize * ksize * cin;
    if ksize == 1 {
        col.copy_from_slice(&src[start * cin..end * cin]);
        return;
    }
    col.fill(0.0);
    for (r, p) in (start..end).enumerate() {
        let (y, xx) = (p / w, p % w);
        for kh in 0..ksize {
            let Some(iy) = (y + kh).checked_sub(pad).filter(|&iy| iy < h) else {
                continue;
            };
            for kw in 0..ksize {
                let Some(ix) = (xx + kw).checked_sub(pad).filter(|&ix| ix < w) else {
                    continue;
                };
                let d = r * k + (kh * ksize + kw) * cin;
                let s = (iy * w + ix) * cin;
                col[d..d + cin].copy_from_slice(&src[s..s + cin]);
            }
        }
    }
}

/// A reduction over eight interleaved lanes, so that it vectorises (a single running value is
/// a dependency chain the compiler may not reorder for floats).
#[inline(always)]
fn lanes_fold(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32 + Copy) -> f32 {
    let mut acc = [init; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(init, |a, &b| f(a, b));
    for c in chunks {
        for l in 0..8 {
            acc[l] = f(acc[l], c[l]);
        }
    }
    acc.iter().fold(tail, |a, &b| f(a, b))
}

/// `e^x` for `x <= 0` (softmax after subtracting the maximum), written with plain arithmetic
/// so that a loop of it vectorises: Cody-Waite range reduction and a degree-6 polynomial,
/// within a few ulps of `f32::exp`. Very negative inputs flush to 0.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// candle custom op: attention of a pass's queries over the slot cache (f32, CPU).
///
/// Inputs: `q [B, H, k, D]`, the key cache transposed, `K [B, Hkv, D, S]`, and the value cache
/// `V [B, Hkv, S, D]` (the first `len` slots are used), where `Hkv` divides `H` (grouped-query
/// attention: key/value head `g` serves query heads `g * H / Hkv ..`). Query `i` sees slot `j` when
/// `j <= slots[i]` and `bias[j]` is 0 (it is `-inf` for hidden slots). Output `[B, k, H * D]`, the layout the output projection
/// takes, so no transpose copy follows.
pub struct SlotAttention<'a> {
    /// Slot of each query.
    pub slots: &'a [usize],
    /// Additive mask over the slots, `len` values per batch entry: 0, or `-inf` for slots no
    /// query of that entry may see (a prompt's padding, never-written slots when masking is on).
    /// A query that sees no slot at all (a padding slot's own) gets zeros.
    pub bias: &'a [f32],
    /// Slots in use: `max(slots) + 1`.
    pub len: usize,
    /// Softmax scale, `1 / sqrt(D)`.
    pub scale: f32,
}

impl SlotAttention<'_> {
    /// One (batch, head): `q [k, D]`, `kt [D, S]`, `v [S, D]` -> `[k, D]`, with that batch
    /// entry's `bias`.
    fn head(&self, bias: &[f32], q: &[f32], kt: &[f32], v: &[f32], s: usize, d: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.slots.len() * d];
        pulp::Arch::new().dispatch(Head {
            op: self,
            bias,
            q,
            kt,
            v,
            s,
            d,
            out: &mut out,
        });
        out
    }
}

/// One (batch, head) of [`SlotAttention`], as a `pulp` kernel: the loops below are compiled
/// for the SIMD level found at run time (a closure would not be inlined into it).
struct Head<'a, 'b> {
    op: &'a SlotAttention<'b>,
    bias: &'a [f32],
    q: &'a [f32],
    kt: &'a [f32],
    v: &'a [f32],
    s: usize,
    d: usize,
    out: &'a mut [f32],
}

impl pulp::WithSimd for Head<'_, '_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let Head {
            op,
            bias,
            q,
            kt,
            v,
            s,
            d,
            out,
        } = self;
        // Two small products through the register tile, all of the pass's queries at once:
        // scores = q . K over the widest prefix, then probabilities . V. Each key and value
        // row is loaded once per pass, not once per query, and the products run on fused
        // multiply-adds.
        let (rows, len) = (op.slots.len(), op.len);
        let seen_of = |slot: usize| (slot + 1).min(len);
        let widest = op.slots.iter().map(|&t| seen_of(t)).max().unwrap_or(0);
        let mut p = vec![0f32; rows * widest];
        strided_product(simd, (q, d), (kt, s), (rows, d, widest), &mut p);
        for (row, &slot) in p.chunks_exact_mut(widest.max(1)).zip(op.slots) {
            // Causal: the slots a query can see are a prefix; past it, probability 0.
            let (seen, unseen) = row.split_at_mut(seen_of(slot));
            unseen.fill(0.0);
            for (sc, &b) in seen.iter_mut().zip(bias) {
                *sc = *sc * op.scale + b;
            }
            let max = lanes_fold(seen, f32::NEG_INFINITY, f32::max);
            if max == f32::NEG_INFINITY {
                // Nothing visible (a padding slot's own query): zeros, not 0 / 0.
                seen.fill(0.0);
                continue;
            }
            for sc in seen.iter_mut() {
                *sc = exp_nonpositive(*sc - max);
            }
            let inv = 1.0 / lanes_fold(seen, 0.0, |a, b| a + b);
            for sc in seen.iter_mut() {
                *sc *= inv;
            }
        }
        strided_product(simd, (&p, widest), (v, d), (rows, widest, d), out);
    }
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
        let (vb, hkv, s, vd) = vl.shape().dims4()?;
        // Grouped-query attention: each of the `hkv` key/value heads serves `h / hkv` query
        // heads in turn.
        if kl.shape().dims() != [b, hkv, d, s]
            || (vb, vd) != (b, d)
            || hkv == 0
            || !h.is_multiple_of(hkv)
            || self.slots.len() != k
            || self.len > s
            || self.bias.len() != b * self.len
        {
            candle_core::bail!("slot-attention: inconsistent shapes");
        }
        let q = &qs.as_slice::<f32>()?[q0..q1];
        let kc = &ks.as_slice::<f32>()?[k0..k1];
        let vc = &vs.as_slice::<f32>()?[v0..v1];
        let one = |bh: usize| {
            let kvh = (bh / h) * hkv + (bh % h) / (h / hkv);
            let bias = &self.bias[(bh / h) * self.len..(bh / h + 1) * self.len];
            self.head(
                bias,
                &q[bh * k * d..(bh + 1) * k * d],
                &kc[kvh * d * s..(kvh + 1) * d * s],
                &vc[kvh * s * d..(kvh + 1) * s * d],
                s,
                d,
            )
        };
        let per_head: Vec<Vec<f32>> = if b * h * k * self.len * d >= 2 * PARALLEL_MIN {
            use rayon::prelude::*;
            (0..b * h).into_par_iter().map(one).collect()
        } else {
            (0..b * h).map(one).collect()
        };
        // [B, H, k, D] pieces -> [B, k, H * D]
        let mut y = vec![0f32; b * k * h * d];
        for (bh, o) in per_head.iter().enumerate() {
            let (bi, hi) = (bh / h, bh % h);
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

    #[test]
    fn channels_last_group_norm_matches_candles() -> Result<()> {
        use candle_core::{Device, Module};
        let dev = Device::Cpu;
        // 12 channels in 3 groups of 4: the statistics span several channels; a mean of 1000
        // against a spread of 0.05 would cancel in `E[x^2] - E[x]^2` without the shift.
        // Fixed pseudo-random values (candle's CPU randn cannot be seeded): a test that drew
        // fresh ones failed about once in hundreds of runs on the far case's rounding.
        let mut seed = 7u32;
        let mut normal = |n: usize, mean: f32, std: f32| -> Result<Tensor> {
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    // the sum of 4 uniforms, centred and scaled to unit variance
                    let u: f32 = (0..4)
                        .map(|_| {
                            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                            (seed >> 8) as f32 / (1u32 << 24) as f32
                        })
                        .sum();
                    mean + std * (u - 2.0) * 3f32.sqrt()
                })
                .collect();
            Tensor::from_vec(v, n, &dev)
        };
        let x = normal(2 * 12 * 5 * 7, 0.5, 2.0)?.reshape((2, 12, 5, 7))?;
        let far = normal(2 * 12 * 5 * 7, 1000.0, 0.05)?.reshape((2, 12, 5, 7))?;
        let gamma = normal(12, 1.0, 0.3)?;
        let beta = normal(12, 0.0, 0.3)?;
        let gn = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), 12, 3, 1e-6)?;
        let (g, b) = (gamma.to_vec1::<f32>()?, beta.to_vec1::<f32>()?);
        // (The far case compares at 1e-2: f32 holds 1000 + 0.05 to about 6e-5, so even candle's
        // two-pass result carries ~1e-3 of rounding there; a cancelled variance is off by far
        // more.)
        for (x, silu, tol) in [(&x, false, 1e-4), (&x, true, 1e-4), (&far, false, 1e-2)] {
            let want = gn.forward(x)?;
            let want = if silu { want.silu()? } else { want };
            let got = x
                .permute((0, 2, 3, 1))?
                .contiguous()?
                .apply_op1_no_bwd(&GroupNormNhwc {
                    groups: 3,
                    eps: 1e-6,
                    gamma: &g,
                    beta: &b,
                    silu,
                })?;
            let got = got.permute((0, 3, 1, 2))?;
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < tol, "silu {silu}: {diff}");
        }
        Ok(())
    }

    fn naive(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for c in 0..n {
                y[i * n + c] = (0..k)
                    .map(|j| x[i * k + j] as f64 * w[j * n + c] as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn packed_conv_matches_candles_conv2d() -> Result<()> {
        use candle_core::{Device, Module, Tensor};
        let dev = Device::Cpu;
        // im2col (7x6, and 1x1), Winograd with whole tiles (20x20) and with partial tiles and
        // channel counts off the 16-lane width (9x13, 5 -> 19 channels), two images.
        for (cin, cout, ksize, h, w) in [
            (3, 5, 3, 7, 6),
            (16, 32, 3, 20, 20),
            (8, 4, 1, 5, 9),
            (5, 19, 3, 9, 13),
        ] {
            let x = Tensor::randn(0f32, 1.0, (2, cin, h, w), &dev)?;
            let weight = Tensor::randn(0f32, 0.3, (cout, cin, ksize, ksize), &dev)?;
            let bias = Tensor::randn(0f32, 1.0, cout, &dev)?;
            let cfg = candle_nn::Conv2dConfig {
                padding: ksize / 2,
                ..Default::default()
            };
            let want =
                candle_nn::Conv2d::new(weight.clone(), Some(bias.clone()), cfg).forward(&x)?;
            let got = PackedConv::new(&weight, Some(&bias))?.forward(&x)?;
            let diff = (want - got)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-4, "{cin}->{cout} k{ksize} {h}x{w}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn fast_exp_is_close_to_exp() {
        for i in 0..1740 {
            let x = -(i as f32) * 0.05; // down to -86.95; below -87 the result is clamped
            let (got, want) = (exp_nonpositive(x), x.exp());
            assert!(
                (got - want).abs() <= 4.0 * f32::EPSILON * want.max(f32::MIN_POSITIVE),
                "{x}: {got} vs {want}"
            );
        }
        let floor = (-87f32).exp();
        assert!((exp_nonpositive(-1000.0) - floor).abs() <= 4.0 * f32::EPSILON * floor);
    }

    /// Slot attention against a softmax written out in f64, for queries at `slots` with
    /// per-batch-entry visibility `visible` (each `len` long).
    fn check_slot_attention(
        (b, h, d, s): (usize, usize, usize, usize),
        slots: &[usize],
        visible: &[Vec<bool>],
        scale: f32,
    ) -> Result<()> {
        use candle_core::{Device, Tensor};
        let dev = Device::Cpu;
        let (k, len) = (slots.len(), visible[0].len());
        let q = Tensor::randn(0f32, 1.0, (b, h, k, d), &dev)?;
        let kc = Tensor::randn(0f32, 1.0, (b, h, s, d), &dev)?;
        let vc = Tensor::randn(0f32, 1.0, (b, h, s, d), &dev)?;
        let bias: Vec<f32> = visible
            .iter()
            .flatten()
            .map(|&v| if v { 0.0 } else { f32::NEG_INFINITY })
            .collect();
        let op = SlotAttention {
            slots,
            bias: &bias,
            len,
            scale,
        };
        let got = q.apply_op3_no_bwd(&kc.transpose(2, 3)?.contiguous()?, &vc, &op)?;
        let q4: Vec<f32> = q.flatten_all()?.to_vec1()?;
        let k4: Vec<f32> = kc.flatten_all()?.to_vec1()?;
        let v4: Vec<f32> = vc.flatten_all()?.to_vec1()?;
        let got: Vec<f32> = got.flatten_all()?.to_vec1()?;
        for (bi, visible) in visible.iter().enumerate().take(b) {
            for hi in 0..h {
                for (i, &slot) in slots.iter().enumerate() {
                    let bh = bi * h + hi;
                    let qi = &q4[(bh * k + i) * d..][..d];
                    let w: Vec<f64> = (0..=slot)
                        .map(|j| {
                            if !visible[j] {
                                return 0.0;
                            }
                            let kj = &k4[(bh * s + j) * d..][..d];
                            let dot: f64 = qi.iter().zip(kj).map(|(a, b)| (a * b) as f64).sum();
                            (dot * scale as f64).exp()
                        })
                        .collect();
                    let z: f64 = w.iter().sum();
                    for c in 0..d {
                        let want: f64 = (0..=slot)
                            .map(|j| w[j] / z * v4[(bh * s + j) * d + c] as f64)
                            .sum();
                        let at = ((bi * k + i) * h + hi) * d + c;
                        let err = (got[at] as f64 - want).abs();
                        assert!(err < 1e-5, "{bi} {hi} {i} {c}: {err}");
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn slot_attention_matches_a_direct_softmax() -> Result<()> {
        // A head dimension below one 16-wide panel, one row of visibility per batch entry.
        let visible = [
            vec![true, false, true, true, true, true],
            vec![false, false, true, false, true, true],
        ];
        check_slot_attention((2, 3, 5, 7), &[3, 5], &visible, 0.4)?;
        // Head dimension 64 and 37 slots: whole panels and a partial one in both products,
        // for 1, 2, 3 and 5 queries (each register-tile shape), queries out of slot order.
        let visible: Vec<Vec<bool>> = (0..2)
            .map(|e| (0..37).map(|j| (j * 7 + e) % 5 != 0).collect())
            .collect();
        for slots in [&[36][..], &[20, 36], &[5, 36, 17], &[30, 2, 36, 18, 25]] {
            check_slot_attention((2, 2, 64, 40), slots, &visible, 0.125)?;
        }
        Ok(())
    }

    #[test]
    fn packed_product_matches_the_naive_one_on_odd_shapes_and_both_thread_paths() {
        let mut seed = 1u32;
        let mut next = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for &(m, k, n) in &[
            (0, 8, 20),
            (1, 7, 5),
            (3, 13, 33),
            (2, 256, 768),
            (3, 40, 96),
            (4, 31, 64),
            (16, 64, 1024),
            (5, 257, 100),
            (70, 9, 40),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| next()).collect();
            let w: Vec<f32> = (0..k * n).map(|_| next()).collect();
            let got = matmul_packed(&x, &pack_panels(&w, k, n), m, k, n);
            let want = naive(&x, &w, m, k, n);
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-4, "{m}x{k}x{n}: {err}");
        }
    }
}
