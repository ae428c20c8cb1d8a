//! Cost of one forward pass by number of inputs (release build, quiet machine):
//!
//!     cargo run --release --example pass_cost [model-dir] [repetitions]
//!
//! Prints the median time of `step` for 1..16 inputs at scattered slots, with and without
//! classifier-free guidance, on the built-in model or the model folder given (300
//! repetitions by default; a few suffice for large models). The passes run inside candle's
//! thread pool, as `engine::generate` runs them. Set `RAYON_NUM_THREADS` as the binary's
//! `main` does (candle otherwise re-reads the CPU count on every matmul).

use std::time::Instant;

use candle_core::Device;
use zipar_studio::model::{Condition, ModelInput, RunOptions};

fn main() -> anyhow::Result<()> {
    Device::Cpu
        .with_context(|| measure().map_err(|e| format!("{e:#}")))
        .map_err(anyhow::Error::msg)
}

fn measure() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(zipar_studio::default_model_dir);
    let reps: usize = match std::env::args().nth(2) {
        Some(r) => r.parse()?,
        None => 300,
    };
    anyhow::ensure!(reps > 0, "at least one repetition");
    let mut loaded = zipar_studio::model::registry::open(&dir, &Device::Cpu)?;
    let model = loaded.model.as_mut();
    let (h, w) = model.grid();
    // A chain of k inputs ending at the slot 4/5 of the way into the grid, as the exact mode
    // feeds (slot 200 of the built-in 16 x 16 grid).
    let end = h * w * 4 / 5;
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
                let inputs: Vec<ModelInput> = (0..k)
                    .map(|i| ModelInput {
                        token: (i * 37 % model.vocab_size()) as u32,
                        pos: end - k + i,
                        wants_logits: true,
                    })
                    .collect();
                let t = Instant::now();
                model.step(&inputs)?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            times.sort_by(f64::total_cmp);
            print!("  {k}:{:.3}ms", times[reps / 2]);
        }
        println!();
    }
    Ok(())
}
