//! Headless commands: `generate` (and later `bench`, `eval`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::decode::{Flow, GenerateParams, Mode, Sampling, generate};
use crate::export;
use crate::model::llamagen::LlamaGen;
use crate::model::{Condition, ImageArModel};
use crate::weights;

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "zipar-studio",
    version,
    about = "Fast autoregressive image generation with ZipAR"
)]
pub struct Cli {
    /// What to do; none opens the app.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate one image and its decoding trace.
    Generate(GenerateArgs),
}

/// Decoding mode on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Next-token prediction.
    Ntp,
    /// ZipAR with a fixed window.
    Zipar,
}

/// `generate` flags (DESIGN.md section 6).
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model folder (holding config.json); the built-in model when absent.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Class id of a class-conditional model.
    #[arg(long)]
    pub class: Option<u32>,
    /// Text prompt (matched to a class name for class-conditional models).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Decoding mode.
    #[arg(long, value_enum, default_value = "zipar")]
    pub mode: ModeArg,
    /// ZipAR window: tokens of the row above before the next row starts.
    #[arg(long, default_value_t = 4)]
    pub window: usize,
    /// Classifier-free guidance scale (1 disables it).
    #[arg(long, default_value_t = 2.0)]
    pub cfg: f32,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Top-k (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Top-p (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// RNG seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Take the most likely token instead of sampling.
    #[arg(long)]
    pub greedy: bool,
    /// Hide never-written cache slots from attention (the official code does not).
    #[arg(long)]
    pub mask_unwritten: bool,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Output image (PNG).
    #[arg(long, default_value = "zipar.png")]
    pub out: PathBuf,
    /// Trace JSON output.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl GenerateArgs {
    /// The decoding settings these flags ask for.
    pub fn params(&self) -> GenerateParams {
        GenerateParams {
            mode: match self.mode {
                ModeArg::Ntp => Mode::Ntp,
                ModeArg::Zipar => Mode::Zipar,
            },
            window: self.window,
            cfg_scale: self.cfg,
            sampling: if self.greedy {
                Sampling::Greedy
            } else {
                Sampling::Random {
                    temperature: self.temperature,
                    top_k: self.top_k,
                    top_p: self.top_p,
                }
            },
            seed: self.seed,
            mask_unwritten: self.mask_unwritten,
        }
    }
}

/// Runs `generate`.
pub fn run_generate(args: &GenerateArgs) -> anyhow::Result<()> {
    export::check_writable(&args.out)?;
    if let Some(t) = &args.trace {
        export::check_writable(t)?;
    }
    let params = args.params();
    params.sampling.validate()?;
    crate::decode::sampling::validate_cfg(params.cfg_scale)?;
    let dir = match &args.model {
        Some(d) => d.clone(),
        None => {
            let d = crate::default_model_dir();
            anyhow::ensure!(
                d.join("config.json").is_file(),
                "no --model given and the built-in model is missing at {}",
                d.display()
            );
            d
        }
    };
    let device = weights::parse_device(&args.device)?;
    let mut model = LlamaGen::load(&dir, &device)?;
    let cond = match (args.class, &args.prompt) {
        (Some(c), _) => Condition::Class(c),
        (None, Some(p)) => anyhow::bail!(
            "this model has no class names to match the prompt {p:?} against: use --class"
        ),
        (None, None) => anyhow::bail!("give --class N or --prompt TEXT"),
    };
    let schedule = crate::decode::engine::schedule_for(&model, params.mode, params.window)?;
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(schedule.num_passes() as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} passes {elapsed_precise}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let trace = generate(&mut model, &cond, &params, &mut |_| {
        bar.inc(1);
        Flow::Continue
    })?;
    bar.finish_and_clear();
    let t0 = std::time::Instant::now();
    let img = model.decode_image(&trace.tokens)?;
    let decode_ms = t0.elapsed().as_secs_f64() * 1e3;
    export::write_png(&img, &args.out)?;
    if let Some(t) = &args.trace {
        export::write_trace_json(&trace, t)?;
    }
    println!(
        "{} window {}: {} passes (NTP {}, {:.0}% fewer), {:.1} ms decoding + {:.1} ms image; wrote {}",
        trace.mode,
        trace.window,
        trace.passes,
        trace.ntp_passes,
        trace.pass_reduction() * 100.0,
        trace.total_ms,
        decode_ms,
        args.out.display()
    );
    Ok(())
}

/// Dispatches a parsed command line; `Ok(false)` when there was no subcommand.
pub fn run(cli: &Cli) -> anyhow::Result<bool> {
    match &cli.command {
        Some(Command::Generate(a)) => run_generate(a).context("generate failed").map(|_| true),
        None => Ok(false),
    }
}
