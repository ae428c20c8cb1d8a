//! `zipar-studio`: with no subcommand opens the app; otherwise the headless commands.

use std::process::ExitCode;

use clap::Parser;

/// candle reads the thread count for every CPU matmul and convolution: without
/// `RAYON_NUM_THREADS` set it counts physical cores by parsing /proc/cpuinfo each time, which
/// perf showed at about a quarter of a forward pass of the built-in model. Count once, here,
/// and publish the answer through the variable candle (and rayon) read.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let n = candle_core::utils::get_num_threads();
    // SAFETY: first statement of `main`, before any other thread exists (nothing reads or
    // writes the environment concurrently). Reviewed exception to the crate's unsafe_code lint.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}
use zipar_studio::cli::{self, Cli};

/// mimalloc instead of the system allocator: candle allocates a fresh buffer for every op, and
/// glibc hands large ones to `mmap` and back on free, so each op paid a page fault per 4 KiB
/// it wrote (perf: 15% of a VQ convolution). mimalloc keeps and reuses that memory. Measured
/// with `vq_ops decode` on the LlamaGen-B-sized decoder: about 870 -> 660 ms an image.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    pin_thread_count();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Cli::parse();
    match cli::run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
