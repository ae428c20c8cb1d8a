//! Times the VQ decoder's building blocks on a LlamaGen-B-sized activation (128 channels at
//! 256 x 256): the packed 3x3 convolution channels-first (two layout copies) and channels-last
//! (none, as the CPU decoder runs it), candle's GroupNorm + SiLU against the fused
//! channels-last kernel, nearest upsampling.
//!     cargo run --release --example vq_ops
//! `vq_ops decode DIR` times a model folder's whole decoder (the first call is a warm-up).
//! `vq_ops conv` runs only the channels-last convolution, 20 times (for `perf record`).
use std::time::Instant;

use candle_core::{Device, Module, Tensor};
use zipar_studio::model::cpu_kernels::{GroupNormNhwc, PackedConv};

fn time(name: &str, mut f: impl FnMut() -> candle_core::Result<Tensor>) -> candle_core::Result<()> {
    f()?;
    let t0 = Instant::now();
    for _ in 0..3 {
        f()?;
    }
    println!(
        "{name:<28} {:8.1} ms",
        t0.elapsed().as_secs_f64() * 1e3 / 3.0
    );
    Ok(())
}

/// The allocator the binary uses (see `src/main.rs`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1, 128, 256, 256), &dev)?;
    let w = Tensor::randn(0f32, 0.05, (128, 128, 3, 3), &dev)?;
    let b = Tensor::zeros(128, candle_core::DType::F32, &dev)?;
    let conv = PackedConv::new(&w, Some(&b))?;
    let gn = candle_nn::GroupNorm::new(
        Tensor::ones(128, candle_core::DType::F32, &dev)?,
        Tensor::zeros(128, candle_core::DType::F32, &dev)?,
        128,
        32,
        1e-6,
    )?;
    let small = Tensor::randn(0f32, 1.0, (1, 128, 128, 128), &dev)?;
    let nhwc = x.permute((0, 2, 3, 1))?.contiguous()?;
    let (ones, zeros) = (vec![1f32; 128], vec![0f32; 128]);
    let fused = GroupNormNhwc {
        groups: 32,
        eps: 1e-6,
        gamma: &ones,
        beta: &zeros,
        silu: true,
    };
    if std::env::args().nth(1).as_deref() == Some("decode") {
        // The whole decoder of a model folder, e.g. /tmp/llamagen-b from bench_reference.py.
        let dir = std::env::args().nth(2).expect("vq_ops decode MODEL_DIR");
        let model = zipar_studio::model::llamagen::LlamaGen::load(dir.as_ref(), &dev)
            .map_err(candle_core::Error::wrap)?;
        let (h, w) = zipar_studio::model::ImageArModel::grid(&model);
        let codes: Vec<u32> = (0..h * w).map(|i| (i * 7919 % 1000) as u32).collect();
        // an optional count of decodes (many, for `perf record`)
        let n: usize = std::env::args()
            .nth(3)
            .and_then(|n| n.parse().ok())
            .unwrap_or(8);
        for _ in 0..n {
            let t0 = Instant::now();
            model.vq().decode_rgb(&codes, h, w)?;
            println!("decode {h}x{w}: {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
        }
        return Ok(());
    }
    if std::env::args().nth(1).as_deref() == Some("conv") {
        // Only the channels-last convolution, many times: for `perf record`.
        for _ in 0..20 {
            conv.forward_nhwc(&nhwc)?;
        }
        return Ok(());
    }
    dev.with_context(|| -> candle_core::Result<()> {
        time("conv 3x3 128->128, NCHW", || conv.forward(&x)?.contiguous())?;
        time("conv 3x3 128->128, NHWC", || conv.forward_nhwc(&nhwc))?;
        time("candle group norm + silu", || gn.forward(&x)?.silu())?;
        time("fused group norm + silu NHWC", || {
            nhwc.apply_op1_no_bwd(&fused)
        })?;
        time("add", || &x + &x)?;
        time("upsample nearest 128->256", || {
            small.upsample_nearest2d(256, 256)
        })?;
        Ok(())
    })
}
