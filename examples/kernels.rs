//! Micro-benchmark of the CPU kernels behind a forward pass (release build, quiet machine):
//! `cargo run --release --example kernels`. Prints microseconds per call of the packed matmul
//! (one 256 x 768 projection of the built-in model) and of the slot attention (4 heads, 251
//! slots) for 1..16 input rows.

use std::time::Instant;

use candle_core::{Device, Tensor};
use zipar_studio::model::cpu_kernels::{PackedWeight, SlotAttention};

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (256, 768), &dev)?;
    let packed = PackedWeight::pack(&w)?;
    let calls = 2000;
    for m in [1usize, 2, 4, 8, 16] {
        let x = Tensor::randn(0f32, 1.0, (m, 256), &dev)?;
        let t = Instant::now();
        dev.with_context(|| -> candle_core::Result<()> {
            for _ in 0..calls {
                packed.matmul(&x)?;
            }
            Ok(())
        })?;
        let matmul_us = t.elapsed().as_secs_f64() * 1e6 / calls as f64;
        let q = Tensor::randn(0f32, 1.0, (1, 4, m, 64), &dev)?;
        let kt = Tensor::randn(0f32, 1.0, (1, 4, 64, 257), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, 4, 257, 64), &dev)?;
        let slots: Vec<usize> = (0..m).map(|i| 250 - i).collect();
        // one row of `len` per batch entry
        let bias = vec![0f32; 251];
        let op = SlotAttention {
            slots: &slots,
            bias: &bias,
            len: 251,
            scale: 0.125,
        };
        let t = Instant::now();
        dev.with_context(|| -> candle_core::Result<()> {
            for _ in 0..calls {
                q.apply_op3_no_bwd(&kt, &v, &op)?;
            }
            Ok(())
        })?;
        let attention_us = t.elapsed().as_secs_f64() * 1e6 / calls as f64;
        println!(
            "{m:>2} rows: matmul 256x768 {matmul_us:6.1} us   attention 4 heads x 251 slots {attention_us:6.1} us"
        );
    }
    Ok(())
}
