//! Cost of one forward pass of the built-in model by number of inputs (release build, quiet
//! machine): `cargo run --release --example pass_cost [cfg]`. Prints the median microseconds
//! of `step` for 1..16 inputs at scattered slots, with and without classifier-free guidance.
//! The passes run inside candle's thread pool, as `engine::generate` runs them.

use std::time::Instant;

use candle_core::Device;
use zipar_studio::model::llamagen::LlamaGen;
use zipar_studio::model::{Condition, ImageArModel, ModelInput, RunOptions};

fn main() -> anyhow::Result<()> {
    Device::Cpu
        .with_context(|| measure().map_err(|e| e.to_string()))
        .map_err(anyhow::Error::msg)
}

fn measure() -> anyhow::Result<()> {
    let mut model = LlamaGen::load(&zipar_studio::default_model_dir(), &Device::Cpu)?;
    let reps = 300;
    for cfg in [false, true] {
        print!("cfg {cfg:<5}");
        for k in [1usize, 2, 3, 4, 6, 8, 12, 16] {
            let mut times = Vec::with_capacity(reps);
            for _ in 0..reps {
                model.prefill(
                    &Condition::Class(1),
                    RunOptions {
                        cfg,
                        mask_unwritten: false,
                    },
                )?;
                // A chain of k inputs ending at slot 200, as the exact mode feeds.
                let inputs: Vec<ModelInput> = (0..k)
                    .map(|i| ModelInput {
                        token: (i * 37 % 1024) as u32,
                        pos: 200 - k + i,
                        wants_logits: true,
                    })
                    .collect();
                let t = Instant::now();
                model.step(&inputs)?;
                times.push(t.elapsed().as_secs_f64() * 1e6);
            }
            times.sort_by(f64::total_cmp);
            print!("  {k}:{:.0}us", times[reps / 2]);
        }
        println!();
    }
    Ok(())
}
