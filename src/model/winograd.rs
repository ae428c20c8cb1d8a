//! Winograd F(4x4, 3x3) for the 3x3 convolutions of the VQ decoder on the CPU, channels-last.
//!
//! A direct (im2col) 3x3 convolution needs 9 multiply-adds per output pixel, input channel and
//! output channel; [`PackedConv`](super::cpu_kernels::PackedConv) already runs those at about
//! 93% of this machine's matrix-multiply peak, and the VQ decoder still took 1.7x PyTorch's
//! time, because PyTorch (NNPACK / oneDNN) transforms the convolution. Winograd's minimal
//! filtering (Lavin & Gray 2016) computes each 4x4 block of outputs from a 6x6 block of inputs
//! with 36 multiply-adds per channel pair instead of 144:
//!
//! - each 6x6 input tile `d` becomes `V = Bᵀ d B` (per input channel),
//! - each 3x3 kernel `g` becomes `U = G g Gᵀ` (per channel pair),
//! - for each of the 36 positions `e` of the 6x6 tile, `M_e = V_e · U_e` is an ordinary matrix
//!   product over the input channels ([tiles, cin] x [cin, cout]), run by the packed kernel,
//! - each output tile is `Y = Aᵀ M A` (per output channel).
//!
//! Every transform is a few additions and multiplications by small constants, applied to 16
//! channels at once. The kernel transform runs on each call from the packed im2col weight (no
//! second copy of the weights is kept); it costs about as much as a few output tiles. Results
//! differ from the direct convolution by float rounding only (tests: within 1e-5 relative).

use super::cpu_kernels::{PANEL, run_panels};

/// Lanes of one vector of channels in the transforms (one weight panel's width).
const L: usize = PANEL;
/// Positions of the 6x6 input tile, i.e. matrix products per tile.
const E: usize = 36;

/// `Bᵀ` of F(4x4, 3x3) with interpolation points 0, ±1, ±2 (and infinity); [`bt`] writes it
/// out (test: the two agree).
#[cfg(test)]
const BT: [[f32; 6]; 6] = [
    [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
    [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
    [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
    [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
    [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
    [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
];

/// `G` (6x3), the kernel transform.
const G: [[f32; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// `Aᵀ` (4x6), the output transform, written out in [`at`].
#[cfg(test)]
const AT: [[f32; 6]; 4] = [
    [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
    [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
    [0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
    [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
];

type Lanes = [f32; L];

/// `dst[..src.len()] = src` for up to 16 lanes; the whole-vector case is a fixed-size copy
/// (a variable-length `copy_from_slice` is a `memmove` call per vector).
#[inline(always)]
fn load(dst: &mut Lanes, src: &[f32]) {
    match <&Lanes>::try_from(src) {
        Ok(all) => *dst = *all,
        Err(_) => dst[..src.len()].copy_from_slice(src),
    }
}

/// `dst = src[..dst.len()]` for up to 16 lanes (see [`load`]).
#[inline(always)]
fn store(dst: &mut [f32], src: &Lanes) {
    match <&mut Lanes>::try_from(&mut *dst) {
        Ok(all) => *all = *src,
        Err(_) => {
            let n = dst.len();
            dst.copy_from_slice(&src[..n]);
        }
    }
}

/// `out = m · x` for a constant matrix `m` over vectors of lanes. The zero coefficients are
/// skipped; once inlined with a constant `m`, the branches fold away. (Out-parameters, not
/// returned arrays: the returned blocks were copied with `memmove`.)
#[inline(always)]
fn apply<const R: usize, const C: usize>(m: &[[f32; C]; R], x: &[Lanes; C], out: &mut [Lanes; R]) {
    for (o, row) in out.iter_mut().zip(m) {
        *o = [0f32; L];
        for (xj, &c) in x.iter().zip(row) {
            if c == 0.0 {
                continue;
            }
            if c == 1.0 {
                o.iter_mut().zip(xj).for_each(|(o, v)| *o += v);
            } else if c == -1.0 {
                o.iter_mut().zip(xj).for_each(|(o, v)| *o -= v);
            } else {
                o.iter_mut().zip(xj).for_each(|(o, v)| *o += c * v);
            }
        }
    }
}

/// `out = Bᵀ · x`, written out with shared terms (what [`apply`] with [`BT`] computes).
#[inline(always)]
fn bt(x: &[Lanes; 6], out: &mut [Lanes; 6]) {
    for l in 0..L {
        let [d0, d1, d2, d3, d4, d5] = [x[0][l], x[1][l], x[2][l], x[3][l], x[4][l], x[5][l]];
        out[0][l] = 4.0 * d0 - 5.0 * d2 + d4;
        out[1][l] = -4.0 * (d1 + d2) + (d3 + d4);
        out[2][l] = 4.0 * (d1 - d2) + (d4 - d3);
        out[3][l] = 2.0 * (d3 - d1) + (d4 - d2);
        out[4][l] = 2.0 * (d1 - d3) + (d4 - d2);
        out[5][l] = 4.0 * d1 - 5.0 * d3 + d5;
    }
}

/// `out = Aᵀ · x`, written out with shared terms (what [`apply`] with [`AT`] computes).
#[inline(always)]
fn at(x: &[Lanes; 6], out: &mut [Lanes; 4]) {
    for l in 0..L {
        let (a, b) = (x[1][l] + x[2][l], x[1][l] - x[2][l]);
        let (c, d) = (x[3][l] + x[4][l], x[3][l] - x[4][l]);
        out[0][l] = x[0][l] + a + c;
        out[1][l] = b + 2.0 * d;
        out[2][l] = a + 4.0 * c;
        out[3][l] = b + 8.0 * d + x[5][l];
    }
}

/// The 2-D transform `m · x · mᵀ` of a block `x [C][C]`, where `f` applies `m` to a column
/// of lane vectors; each result `(i, j)` goes to `emit`, `t` is scratch.
#[inline(always)]
fn sandwich<const R: usize, const C: usize>(
    f: impl Fn(&[Lanes; C], &mut [Lanes; R]),
    x: &[[Lanes; C]; C],
    t: &mut [[Lanes; R]; C],
    mut emit: impl FnMut(usize, usize, &Lanes),
) {
    // Rows first: t[a] = m · x[a] (row a of x, transformed along its columns), then columns.
    for (ta, xa) in t.iter_mut().zip(x) {
        f(xa, ta);
    }
    let mut col = [[0f32; L]; C];
    let mut y = [[0f32; L]; R];
    for j in 0..R {
        for (c, ta) in col.iter_mut().zip(t.iter()) {
            *c = ta[j];
        }
        f(&col, &mut y);
        for (i, yi) in y.iter().enumerate() {
            emit(i, j, yi);
        }
    }
}

/// The convolution's sizes.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub h: usize,
    pub w: usize,
    pub cin: usize,
    pub cout: usize,
}

/// The 36 transformed kernels from a 3x3 kernel packed as `PackedConv` packs it (panels of 16
/// output channels over rows `(kh, kw, cin)`), laid out `[panel][e][cin][16]`.
pub fn transform_kernel(panels: &[f32], cin: usize, cout: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let count = cout.div_ceil(L);
    let k = 9 * cin;
    let mut u = vec![0f32; count * E * cin * L];
    u.par_chunks_mut(E * cin * L)
        .enumerate()
        .for_each(|(p, dst)| {
            let panel = &panels[p * k * L..(p + 1) * k * L];
            for ci in 0..cin {
                let g: [[Lanes; 3]; 3] = std::array::from_fn(|kh| {
                    std::array::from_fn(|kw| {
                        let at = ((kh * 3 + kw) * cin + ci) * L;
                        panel[at..at + L]
                            .try_into()
                            .expect("a panel row is 16 lanes")
                    })
                });
                // U = G g Gᵀ: G down the columns of g, then along the rows.
                let mut rows = [[[0f32; L]; 3]; 6];
                let (mut col, mut y) = ([[0f32; L]; 3], [[0f32; L]; 6]);
                for v in 0..3 {
                    for (c, gu) in col.iter_mut().zip(&g) {
                        *c = gu[v];
                    }
                    apply(&G, &col, &mut y);
                    for (r, yi) in rows.iter_mut().zip(&y) {
                        r[v] = *yi;
                    }
                }
                for (i, row) in rows.iter().enumerate() {
                    apply(&G, row, &mut y);
                    for (j, lanes) in y.iter().enumerate() {
                        let at = ((i * 6 + j) * cin + ci) * L;
                        dst[at..at + L].copy_from_slice(lanes);
                    }
                }
            }
        });
    u
}

/// Tiles per group: the products of one group read each transformed kernel once, so a group
/// should be large; one position's inputs (`tiles x cin`) stay in the L2 cache.
const GROUP: usize = 64;

/// A block of tiles processed together: tile rows `ty0..ty0 + rows`, tile columns
/// `tx0..tx0 + n`; tile `t = r * n + c` is at `(ty0 + r, tx0 + c)`. `tb` is the scratch
/// buffers' capacity in tiles.
#[derive(Clone, Copy)]
struct Group {
    ty0: usize,
    rows: usize,
    tx0: usize,
    n: usize,
    tb: usize,
}

/// `y [h, w, cout] = conv3x3(x [h, w, cin])` with zero padding 1, for one image, from the
/// transformed kernel `u` of [`transform_kernel`]; `bias` is added.
pub fn conv3x3(x: &[f32], u: &[f32], bias: Option<&[f32]>, s: Shape, y: &mut [f32]) {
    use rayon::prelude::*;
    let Shape { h, w, cin, cout } = s;
    debug_assert_eq!(x.len(), h * w * cin);
    debug_assert_eq!(y.len(), h * w * cout);
    let (tiles_h, tiles_w) = (h.div_ceil(4), w.div_ceil(4));
    // Groups of whole tile rows on narrow images, pieces of one tile row on wide ones.
    let (rows_per, n_max) = if tiles_w >= GROUP {
        (1, GROUP)
    } else {
        ((GROUP / tiles_w).max(1), tiles_w)
    };
    let tb = rows_per * n_max;
    let count = cout.div_ceil(L);
    // Fewer groups than threads (small images): the groups' products split their panels.
    let split = tiles_h.div_ceil(rows_per) < rayon::current_num_threads();
    // One task per group of tile rows: each writes its own rows of `y`.
    y.par_chunks_mut(rows_per * 4 * w * cout)
        .enumerate()
        .for_each_init(
            || (vec![0f32; E * tb * cin], vec![0f32; count * E * tb * L]),
            |(v, m), (task, out)| {
                let ty0 = task * rows_per;
                let rows = rows_per.min(tiles_h - ty0);
                let mut tx0 = 0;
                while tx0 < tiles_w {
                    let n = n_max.min(tiles_w - tx0);
                    let g = Group {
                        ty0,
                        rows,
                        tx0,
                        n,
                        tb,
                    };
                    input_transform(x, s, g, v);
                    products(v, u, s, g, m, split);
                    output_transform(m, bias, s, g, out);
                    tx0 += n;
                }
            },
        );
}

/// `M[p][e] = V_e [tiles, cin] · U[p][e] [cin, 16]` for every panel `p` and position `e`:
/// position-major, so that one position's inputs stay in cache across the panels.
fn products(v: &[f32], u: &[f32], s: Shape, g: Group, m: &mut [f32], split: bool) {
    let (cin, tb, tiles) = (s.cin, g.tb, g.rows * g.n);
    let count = s.cout.div_ceil(L);
    let run = |panels: std::ops::Range<usize>, m: &mut [f32]| {
        for e in 0..E {
            let ve = &v[e * tb * cin..e * tb * cin + tiles * cin];
            for (i, p) in panels.clone().enumerate() {
                let at = (p * E + e) * cin * L;
                let o = (i * E + e) * tb * L;
                run_panels(
                    ve,
                    &u[at..at + cin * L],
                    tiles,
                    cin,
                    0..1,
                    &mut m[o..o + tiles * L],
                );
            }
        }
    };
    if split && count >= 2 {
        let half = count / 2;
        let (a, b) = m.split_at_mut(half * E * tb * L);
        rayon::join(|| run(0..half, a), || run(half..count, b));
    } else {
        run(0..count, m);
    }
}

/// `V[e][t][cin]` for the tiles of group `g`.
fn input_transform(x: &[f32], s: Shape, g: Group, v: &mut [f32]) {
    let Shape { h, w, cin, .. } = s;
    let mut d = [[[0f32; L]; 6]; 6];
    let mut scratch = [[[0f32; L]; 6]; 6];
    for t in 0..g.rows * g.n {
        let (ty, tx) = (g.ty0 + t / g.n, g.tx0 + t % g.n);
        let (y0, x0) = ((4 * ty) as isize - 1, (4 * tx) as isize - 1);
        for c0 in (0..cin).step_by(L) {
            let lanes = L.min(cin - c0);
            for (a, row) in d.iter_mut().enumerate() {
                for (b, px) in row.iter_mut().enumerate() {
                    let (iy, ix) = (y0 + a as isize, x0 + b as isize);
                    *px = [0f32; L];
                    if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                        let at = (iy as usize * w + ix as usize) * cin + c0;
                        load(px, &x[at..at + lanes]);
                    }
                }
            }
            sandwich(bt, &d, &mut scratch, |i, j, lane| {
                let at = ((i * 6 + j) * g.tb + t) * cin + c0;
                store(&mut v[at..at + lanes], lane);
            });
        }
    }
}

/// `Y = Aᵀ M A` (+ bias) for the tiles of group `g`, into the output rows of its task (`out`
/// starts at output row `4 * ty0` of the task's first tile row).
fn output_transform(m: &[f32], bias: Option<&[f32]>, s: Shape, g: Group, out: &mut [f32]) {
    let Shape { h, w, cout, .. } = s;
    for p in 0..cout.div_ceil(L) {
        let c0 = p * L;
        let lanes = L.min(cout - c0);
        let mut b = [0f32; L];
        if let Some(bias) = bias {
            b[..lanes].copy_from_slice(&bias[c0..c0 + lanes]);
        }
        let mut mt = [[[0f32; L]; 6]; 6];
        let mut scratch = [[[0f32; L]; 4]; 6];
        for t in 0..g.rows * g.n {
            let (r, tx) = (t / g.n, g.tx0 + t % g.n);
            for (i, row) in mt.iter_mut().enumerate() {
                for (j, lanes) in row.iter_mut().enumerate() {
                    let at = ((p * E + i * 6 + j) * g.tb + t) * L;
                    load(lanes, &m[at..at + L]);
                }
            }
            // Output rows of this tile, relative to the task's first row.
            let (y0, x0) = (4 * r, 4 * tx);
            let out_rows = 4.min(h - 4 * (g.ty0 + r));
            let cols = 4.min(w - x0);
            sandwich(at, &mt, &mut scratch, |i, j, lane| {
                if i < out_rows && j < cols {
                    let o = ((y0 + i) * w + x0 + j) * cout + c0;
                    let mut px = *lane;
                    px.iter_mut().zip(&b).for_each(|(v, b)| *v += b);
                    store(&mut out[o..o + lanes], &px);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu_kernels::pack_panels;

    /// The direct convolution in f64, as the definition.
    fn direct(x: &[f32], g: &[f32], bias: &[f32], s: Shape) -> Vec<f64> {
        let Shape { h, w, cin, cout } = s;
        let mut y = vec![0f64; h * w * cout];
        for oy in 0..h {
            for ox in 0..w {
                for co in 0..cout {
                    let mut acc = bias[co] as f64;
                    for kh in 0..3 {
                        for kw in 0..3 {
                            let (iy, ix) = (oy + kh, ox + kw);
                            if iy == 0 || ix == 0 || iy > h || ix > w {
                                continue;
                            }
                            for ci in 0..cin {
                                let xv = x[((iy - 1) * w + ix - 1) * cin + ci] as f64;
                                acc += xv * g[((co * cin + ci) * 3 + kh) * 3 + kw] as f64;
                            }
                        }
                    }
                    y[(oy * w + ox) * cout + co] = acc;
                }
            }
        }
        y
    }

    /// Equal up to the rounding of the shared terms.
    fn close<const R: usize>(want: &[Lanes; R], got: &[Lanes; R]) {
        for (w, g) in want.iter().flatten().zip(got.iter().flatten()) {
            assert!((w - g).abs() <= 1e-5 * w.abs().max(1.0), "{w} vs {g}");
        }
    }

    #[test]
    fn written_out_transforms_are_their_matrices() {
        let x: [Lanes; 6] =
            std::array::from_fn(|i| std::array::from_fn(|l| (i * 7 + l * 3) as f32 * 0.37 - 5.0));
        let (mut want, mut got) = ([[0f32; L]; 6], [[0f32; L]; 6]);
        apply(&BT, &x, &mut want);
        bt(&x, &mut got);
        close(&want, &got);
        let (mut want, mut got) = ([[0f32; L]; 4], [[0f32; L]; 4]);
        apply(&AT, &x, &mut want);
        at(&x, &mut got);
        close(&want, &got);
    }

    #[test]
    fn winograd_matches_the_direct_convolution() {
        // A small deterministic generator: the values only need to be varied.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        // Partial tiles on both edges, one-tile and sub-tile images, channel counts on and off
        // the 16 lanes, more tiles in a row than one group holds, one group whose products split
        // their panels between threads (12x12, 40 channels).
        for (h, w, cin, cout) in [
            (9, 13, 5, 19),
            (4, 4, 16, 16),
            (3, 2, 1, 1),
            (8, 300, 64, 48),
            (17, 6, 33, 7),
            (12, 12, 8, 40),
        ] {
            let s = Shape { h, w, cin, cout };
            let x: Vec<f32> = (0..h * w * cin).map(|_| next()).collect();
            let g: Vec<f32> = (0..cout * cin * 9).map(|_| next() * 0.3).collect();
            let bias: Vec<f32> = (0..cout).map(|_| next()).collect();
            // The packed im2col layout: rows (kh, kw, ci), columns co.
            let mut rows = vec![0f32; 9 * cin * cout];
            for co in 0..cout {
                for ci in 0..cin {
                    for k in 0..9 {
                        rows[(k * cin + ci) * cout + co] = g[(co * cin + ci) * 9 + k];
                    }
                }
            }
            let u = transform_kernel(&pack_panels(&rows, 9 * cin, cout), cin, cout);
            let mut y = vec![f32::NAN; h * w * cout];
            conv3x3(&x, &u, Some(&bias), s, &mut y);
            let want = direct(&x, &g, &bias, s);
            let scale = want.iter().fold(1f64, |m, v| m.max(v.abs()));
            let err = y
                .iter()
                .zip(&want)
                .map(|(&a, &b)| (a as f64 - b).abs())
                .fold(0f64, f64::max);
            assert!(err / scale < 1e-5, "{s:?}: error {err} of {scale}");
        }
    }
}
