//! Headless commands: `generate` (and later `bench`, `eval`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::bench::{self, Setting};
use crate::decode::{Flow, GenerateParams, Mode, Sampling, generate};
use crate::export;
use crate::model::Condition;
use crate::model::registry::{self, Conditioning, LoadedModel};
use crate::prompt::ClassIndex;
use crate::weights::{self, ResolvedDefaults};

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
    /// Time NTP against ZipAR windows in one process.
    Bench(BenchArgs),
    /// Measure the quality cost: NLL of samples under the full-context model.
    Eval(EvalArgs),
    /// Would ZipAR's drafts pass an exact test? Teacher-forces NTP samples through the ZipAR
    /// schedules and reports the mean acceptance a = sum min(p, q) per window, row and column.
    Acceptance(AcceptanceArgs),
    /// Does the attention justify ZipAR? Captures the attention of teacher-forced NTP samples
    /// and reports the paper's Figure 3 (same column above vs previous token) and Figure 5
    /// (the window each token needs to keep 95% of its attention).
    Locality(LocalityArgs),
    /// Open the app (the default when no command is given).
    App(AppArgs),
}

/// The model folder and device every headless command takes.
#[derive(Debug, Args)]
pub struct ModelChoice {
    /// Model folder (holding config.json); the built-in model when absent.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl ModelChoice {
    /// Parses the device and loads the model onto it.
    pub fn load(&self) -> anyhow::Result<(LoadedModel, candle_core::Device)> {
        let device = weights::parse_device(&self.device)?;
        let model = load_model(self.model.as_deref(), &device)?;
        Ok((model, device))
    }
}

/// `locality` flags.
#[derive(Debug, Args)]
pub struct LocalityArgs {
    /// Which model, on which device.
    #[command(flatten)]
    pub source: ModelChoice,
    /// Class ids (comma separated); default: 16 classes spread over the model's range.
    #[arg(long, value_delimiter = ',')]
    pub class: Vec<u32>,
    /// Prompts (matched to classes; repeat the flag for several).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// NTP samples (seeds 0..N) per class.
    #[arg(long, default_value_t = 1)]
    pub samples: u64,
    /// Share of a token's attention its window must keep (the needed window's threshold).
    #[arg(long, default_value_t = 0.95)]
    pub threshold: f32,
    /// Classifier-free guidance scale; default: the model's.
    #[arg(long)]
    pub cfg: Option<f32>,
    /// Write summary.json, needed_windows.png and attention_offsets.png into this folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `acceptance` flags.
#[derive(Debug, Args)]
pub struct AcceptanceArgs {
    /// Which model, on which device.
    #[command(flatten)]
    pub source: ModelChoice,
    /// Class ids (comma separated); default: 32 classes spread over the model's range.
    #[arg(long, value_delimiter = ',')]
    pub class: Vec<u32>,
    /// ZipAR windows (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "2,4,8")]
    pub windows: Vec<usize>,
    /// NTP samples (seeds 0..N) per class.
    #[arg(long, default_value_t = 1)]
    pub samples: u64,
    /// Classifier-free guidance scale; default: the model's.
    #[arg(long)]
    pub cfg: Option<f32>,
    /// Also write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `eval` flags.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Which model, on which device.
    #[command(flatten)]
    pub source: ModelChoice,
    /// Class ids (comma separated); default: the classifier's eval subset when the model
    /// ships a classifier, else 8 classes spread over the model's range.
    #[arg(long, value_delimiter = ',')]
    pub class: Vec<u32>,
    /// Fixed-window ZipAR windows (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "2,4,8")]
    pub windows: Vec<usize>,
    /// Adaptive minimum windows (comma separated; `--adaptive` alone for none).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "2,4")]
    pub adaptive: Vec<usize>,
    /// Exact-mode windows (comma separated; `--exact` alone for none).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "4,8")]
    pub exact: Vec<usize>,
    /// Samples (seeds 0..N) per class [default: 1 with a classifier's subset, else 2].
    #[arg(long)]
    pub samples: Option<u64>,
    /// Classifier-free guidance scale (also used for scoring); default: the model's.
    #[arg(long)]
    pub cfg: Option<f32>,
    /// Sampling temperature (also used for the z-score); default: the model's.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Top-k (0 = off); default: the model's.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Also write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `app` flags.
#[derive(Debug, Args)]
pub struct AppArgs {
    /// Open this model folder instead of the last one used.
    #[arg(long)]
    pub model: Option<PathBuf>,
}

/// `bench` flags.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which model, on which device.
    #[command(flatten)]
    pub source: ModelChoice,
    /// Class ids to generate (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub class: Vec<u32>,
    /// Prompts to generate (matched to classes; repeat the flag for several).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// ZipAR windows to time (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "2,4,8")]
    pub windows: Vec<usize>,
    /// Adaptive minimum windows to time (comma separated; `--adaptive` alone for none).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "2,4")]
    pub adaptive: Vec<usize>,
    /// Exact-mode windows to time (comma separated; `--exact` alone for none).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "4,8")]
    pub exact: Vec<usize>,
    /// Seeds (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    pub seeds: Vec<u64>,
    /// Classifier-free guidance scale; default: the model's.
    #[arg(long)]
    pub cfg: Option<f32>,
    /// Greedy decoding instead of sampling.
    #[arg(long)]
    pub greedy: bool,
    /// Also write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Decoding mode on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Next-token prediction.
    Ntp,
    /// ZipAR with a fixed window.
    Zipar,
    /// ZipAR with drafts verified by rejection sampling; `--window` is the smallest window.
    Adaptive,
    /// Lossless ZipAR: every early token is a draft tested against the full-context
    /// distribution, so the output has NTP's law; `--window` is ZipAR's window.
    Exact,
}

/// `generate` flags (DESIGN.md section 6).
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Which model, on which device.
    #[command(flatten)]
    pub source: ModelChoice,
    /// Class id of a class-conditional model.
    #[arg(long)]
    pub class: Option<u32>,
    /// Text prompt (matched to a class name for class-conditional models).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Decoding mode.
    #[arg(long, value_enum, default_value = "zipar")]
    pub mode: ModeArg,
    /// ZipAR window: tokens of the row above before the next row starts [default: the
    /// model's, else 4].
    #[arg(long)]
    pub window: Option<usize>,
    /// Classifier-free guidance scale, 1 disables it [default: the model's, else 2].
    #[arg(long)]
    pub cfg: Option<f32>,
    /// Sampling temperature [default: the model's, else 1].
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Top-k, 0 = off [default: the model's, else 0].
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Top-p, 1 = off [default: the model's, else 1].
    #[arg(long)]
    pub top_p: Option<f32>,
    /// RNG seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Take the most likely token instead of sampling.
    #[arg(long)]
    pub greedy: bool,
    /// Hide never-written cache slots from attention (the official code does not);
    /// `--mask-unwritten=false` to turn off a model's recommendation [default: the model's,
    /// else false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub mask_unwritten: Option<bool>,
    /// Output image (PNG).
    #[arg(long, default_value = "zipar.png")]
    pub out: PathBuf,
    /// Trace JSON output.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Record each token's attention: the trace gains `retained_mass_of`, and for NTP
    /// `needed_window_of`.
    #[arg(long)]
    pub attention: bool,
}

impl GenerateArgs {
    /// The decoding settings these flags ask for; `defaults` (the model's recommendations)
    /// fill in what the flags leave out.
    pub fn params(&self, defaults: &ResolvedDefaults) -> GenerateParams {
        GenerateParams {
            mode: match self.mode {
                ModeArg::Ntp => Mode::Ntp,
                ModeArg::Zipar => Mode::Zipar,
                ModeArg::Adaptive => Mode::Adaptive,
                ModeArg::Exact => Mode::Exact,
            },
            window: self.window.unwrap_or(defaults.window),
            cfg_scale: self.cfg.unwrap_or(defaults.cfg),
            sampling: Sampling::from_flags(
                self.greedy,
                self.temperature.unwrap_or(defaults.temperature),
                self.top_k.unwrap_or(defaults.top_k),
                self.top_p.unwrap_or(defaults.top_p),
            ),
            seed: self.seed,
            mask_unwritten: self.mask_unwritten.unwrap_or(defaults.mask_unwritten),
        }
    }
}

/// The condition asked for on the command line; a prompt is matched to a class name and the
/// choice is printed (with a warning when the match is weak).
pub fn condition_for(
    model: &LoadedModel,
    class: Option<u32>,
    prompt: Option<&str>,
) -> anyhow::Result<Condition> {
    if model.card.conditioning == Conditioning::Caption {
        return match (class, prompt) {
            (Some(_), _) => anyhow::bail!(
                "this model is text-conditional: give a caption with --prompt, not --class"
            ),
            (None, Some(p)) => Ok(Condition::Text(p.to_string())),
            (None, None) => anyhow::bail!("give a caption with --prompt TEXT"),
        };
    }
    match (class, prompt) {
        (Some(c), _) => Ok(Condition::Class(c)),
        (None, Some(p)) => {
            let Some(file) = &model.card.classes else {
                anyhow::bail!(
                    "this model has no class names to match the prompt {} against: use --class",
                    crate::prompt::shown(p)
                );
            };
            let index = ClassIndex::load(file)?;
            let Some(m) = index.best(p) else {
                anyhow::bail!(
                    "no class matches the prompt {}: try other words or --class",
                    crate::prompt::shown(p)
                );
            };
            eprintln!(
                "prompt {} -> class {} \"{}\" ({:?} match, score {:.2})",
                crate::prompt::shown(p),
                m.id,
                m.name,
                m.kind,
                m.score
            );
            if m.is_weak() {
                eprintln!("warning: weak match; pick a class with --class if this is not it");
            }
            Ok(Condition::Class(m.id))
        }
        (None, None) => anyhow::bail!("give --class N or --prompt TEXT"),
    }
}

/// Loads `dir`, or the built-in model when `None`.
pub fn load_model(
    dir: Option<&std::path::Path>,
    device: &candle_core::Device,
) -> anyhow::Result<LoadedModel> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
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
    // Say what is being read, with a progress bar per file, when it takes a while.
    let summary = registry::summary(&dir, device)?;
    if summary.weight_bytes <= 200_000_000 {
        return Ok(registry::open(&dir, device)?);
    }
    eprintln!("loading {}", summary.text);
    let bar = indicatif::ProgressBar::new(summary.weight_bytes);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg}, {eta} left")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let model = registry::open_with_progress(&dir, device, &mut |p| {
        bar.set_length(p.total);
        bar.set_position(p.done);
        bar.set_message(format!("{} ({} of {})", p.file, p.index + 1, p.files));
    });
    bar.finish_and_clear();
    Ok(model?)
}

/// NTP, then ZipAR for each window, adaptive for each minimum window, exact for each window.
fn settings_list(
    model: &LoadedModel,
    windows: &[usize],
    adaptive: &[usize],
    exact: &[usize],
) -> anyhow::Result<Vec<Setting>> {
    let (_, w) = model.model.grid();
    let layout = model.model.layout();
    let range = crate::decode::schedule::window_range(layout, w);
    // The adaptive window needs the raster layout: skipped (with a note) rather than failing
    // the whole run on its default windows.
    let adaptive = if layout == crate::decode::schedule::Layout::Raster || adaptive.is_empty() {
        adaptive
    } else {
        eprintln!(
            "note: the adaptive window is implemented for the raster layout only; skipped for this end-of-row model"
        );
        &[]
    };
    let mut settings = vec![Setting {
        mode: Mode::Ntp,
        window: w,
    }];
    let all = windows
        .iter()
        .map(|&s| (Mode::Zipar, s))
        .chain(adaptive.iter().map(|&s| (Mode::Adaptive, s)))
        .chain(exact.iter().map(|&s| (Mode::Exact, s)));
    for (mode, s) in all {
        anyhow::ensure!(
            range.contains(&s),
            "window {s} is out of range: it must be between {} and {} for a grid {w} wide",
            range.start(),
            range.end()
        );
        settings.push(Setting { mode, window: s });
    }
    Ok(settings)
}

/// The decoding settings `bench` and `eval` start from: the model's recommendations, with
/// the CFG scale and greedy decoding as asked.
fn base_params(
    model: &LoadedModel,
    cfg: Option<f32>,
    greedy: bool,
) -> anyhow::Result<GenerateParams> {
    let d = model.card.defaults.resolve();
    let base = GenerateParams {
        cfg_scale: cfg.unwrap_or(d.cfg),
        sampling: Sampling::from_flags(greedy, d.temperature, d.top_k, d.top_p),
        mask_unwritten: d.mask_unwritten,
        ..GenerateParams::default()
    };
    crate::decode::sampling::validate_cfg(base.cfg_scale)?;
    Ok(base)
}

/// Captions the headless commands use on a text-to-image model when none is given.
const DEFAULT_CAPTIONS: [&str; 8] = [
    "a red apple on a wooden table",
    "a cat sleeping on a sofa",
    "a lighthouse on a cliff at sunset",
    "a bowl of ramen with an egg",
    "an astronaut riding a horse",
    "a snowy mountain under a blue sky",
    "a vintage car parked on a street",
    "a sunflower field in summer",
];

/// The conditions of a headless command: the classes given (class-conditional models only)
/// and the prompts given (matched to classes, or captions as typed), else `k` defaults:
/// classes spread over the model's range, or default captions.
fn conditions(
    model: &LoadedModel,
    classes: &[u32],
    prompts: &[String],
    k: u32,
) -> anyhow::Result<Vec<Condition>> {
    let mut conds = Vec::new();
    for &c in classes {
        conds.push(condition_for(model, Some(c), None)?);
    }
    for p in prompts {
        conds.push(condition_for(model, None, Some(p))?);
    }
    if conds.is_empty() {
        conds = match model.card.conditioning {
            Conditioning::Class => spread_classes(model.card.num_classes.max(1) as u32, k)
                .into_iter()
                .map(Condition::Class)
                .collect(),
            Conditioning::Caption => DEFAULT_CAPTIONS
                .iter()
                .take(k.max(1) as usize)
                .map(|c| Condition::Text(c.to_string()))
                .collect(),
        };
    }
    Ok(conds)
}

/// Up to `k` class ids spread evenly over `0..n`.
fn spread_classes(n: u32, k: u32) -> Vec<u32> {
    let k = k.min(n).max(1);
    (0..k)
        .map(|i| (i * n / k).min(n.saturating_sub(1)))
        .collect()
}

/// Peak resident set size of this process (Linux).
fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `eval`.
pub fn run_eval(args: &EvalArgs) -> anyhow::Result<()> {
    if let Some(j) = &args.json {
        export::check_writable(j)?;
    }
    let (mut model, device) = args.source.load()?;
    let classifier = match &model.card.classifier {
        Some(f) => Some(crate::model::classifier::Classifier::load(f, &device)?),
        None => None,
    };
    let n = model.card.num_classes.max(1) as u32;
    let conds = match (&classifier, args.class.is_empty()) {
        (Some(c), true) => (0..n)
            .step_by(c.class_stride.max(1) as usize)
            .map(Condition::Class)
            .collect(),
        _ => conditions(&model, &args.class, &[], 8)?,
    };
    let settings = settings_list(&model, &args.windows, &args.adaptive, &args.exact)?;
    let samples = args
        .samples
        .unwrap_or(if classifier.is_some() { 1 } else { 2 });
    let seeds: Vec<u64> = (0..samples.max(1)).collect();
    let mut base = base_params(&model, args.cfg, false)?;
    if let Sampling::Random {
        temperature, top_k, ..
    } = &mut base.sampling
    {
        *temperature = args.temperature.unwrap_or(*temperature);
        *top_k = args.top_k.unwrap_or(*top_k);
    }
    base.sampling.validate()?;
    let bar = indicatif::ProgressBar::new((conds.len() * seeds.len() * settings.len()) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} images, {eta} left")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let results = crate::eval::run_eval(
        model.model.as_mut(),
        &conds,
        base,
        &settings,
        &seeds,
        classifier.as_ref(),
        &mut || bar.inc(1),
    )?;
    bar.finish_and_clear();
    println!(
        "{} samples per setting ({} classes x {} seeds), {}, cfg {}",
        conds.len() * seeds.len(),
        conds.len(),
        seeds.len(),
        base.sampling,
        base.cfg_scale
    );
    match &classifier {
        Some(c) => println!(
            "image-space scores by the model's classifier (held-out top-1 of the classifier on real images: {}); Frechet distance to the real images of every {}th class",
            c.heldout_top1
                .map_or("unknown".into(), |a| format!("{a:.3}")),
            c.class_stride
        ),
        None => println!("this model ships no classifier: no image-space scores"),
    }
    print!("{}", crate::eval::table(&results));
    if let Some(j) = &args.json {
        std::fs::write(j, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("cannot write {}", j.display()))?;
    }
    Ok(())
}

/// Runs `locality`.
pub fn run_locality(args: &LocalityArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.threshold > 0.0 && args.threshold <= 1.0,
        "--threshold must be in (0, 1], got {}",
        args.threshold
    );
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        export::check_writable(&dir.join("summary.json"))?;
    }
    let (mut model, _) = args.source.load()?;
    let conds = conditions(&model, &args.class, &args.prompt, 16)?;
    let base = base_params(&model, args.cfg, false)?;
    let bar = indicatif::ProgressBar::new(conds.len() as u64 * args.samples.max(1));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} NTP samples, {eta} left")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let summary = crate::locality::measure(
        model.model.as_mut(),
        &conds,
        base,
        args.samples.max(1),
        args.threshold,
        &mut || bar.inc(1),
    )?;
    bar.finish_and_clear();
    println!(
        "{} NTP samples ({} conditions x {} seeds), {}, cfg {}; attention averaged over heads and layers",
        conds.len() as u64 * args.samples.max(1),
        conds.len(),
        args.samples.max(1),
        base.sampling,
        base.cfg_scale
    );
    print!("{}", crate::locality::table(&summary));
    if let Some(dir) = &args.out {
        std::fs::write(
            dir.join("summary.json"),
            serde_json::to_string_pretty(&summary)?,
        )
        .with_context(|| format!("cannot write {}", dir.join("summary.json").display()))?;
        export::write_png(
            &crate::locality::histogram_image(&summary),
            &dir.join("needed_windows.png"),
        )?;
        export::write_png(
            &crate::locality::heatmap_image(&summary, 16),
            &dir.join("attention_offsets.png"),
        )?;
        println!(
            "wrote summary.json, needed_windows.png, attention_offsets.png in {}",
            dir.display()
        );
    }
    Ok(())
}

/// Runs `acceptance`.
pub fn run_acceptance(args: &AcceptanceArgs) -> anyhow::Result<()> {
    if let Some(j) = &args.json {
        export::check_writable(j)?;
    }
    // An out-of-range window is refused by the schedule before any sample is drawn.
    let (mut model, _) = args.source.load()?;
    let conds = conditions(&model, &args.class, &[], 32)?;
    let seeds: Vec<u64> = (0..args.samples.max(1)).collect();
    let base = base_params(&model, args.cfg, false)?;
    let bar = indicatif::ProgressBar::new((conds.len() * seeds.len()) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} NTP samples, {eta} left")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let results = crate::acceptance::measure(
        model.model.as_mut(),
        &conds,
        base,
        &args.windows,
        &seeds,
        &mut || bar.inc(1),
    )?;
    bar.finish_and_clear();
    println!(
        "{} NTP samples ({} classes x {} seeds), {}, cfg {}, hide unwritten slots {}",
        conds.len() * seeds.len(),
        conds.len(),
        seeds.len(),
        base.sampling,
        base.cfg_scale,
        base.mask_unwritten
    );
    print!("{}", crate::acceptance::table(&results));
    if let Some(j) = &args.json {
        std::fs::write(j, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("cannot write {}", j.display()))?;
    }
    Ok(())
}

/// Runs `bench`.
pub fn run_bench(args: &BenchArgs) -> anyhow::Result<()> {
    if let Some(j) = &args.json {
        export::check_writable(j)?;
    }
    let (mut model, _) = args.source.load()?;
    let conds = conditions(&model, &args.class, &args.prompt, 1)?;
    let settings = settings_list(&model, &args.windows, &args.adaptive, &args.exact)?;
    let base = base_params(&model, args.cfg, args.greedy)?;
    let results = bench::run_bench(model.model.as_mut(), &conds, base, &settings, &args.seeds)?;
    println!(
        "{} images per setting ({} conditions x {} seeds), device {}, {}, cfg {}; {} build, {} threads",
        conds.len() * args.seeds.len(),
        conds.len(),
        args.seeds.len(),
        args.source.device,
        base.sampling,
        base.cfg_scale,
        bench::BUILD_PROFILE,
        candle_core::utils::get_num_threads(),
    );
    if bench::BUILD_PROFILE != "release" {
        eprintln!(
            "warning: a {} build: time a release build (cargo run --release -- bench)",
            bench::BUILD_PROFILE
        );
    }
    print!("{}", bench::table(&results));
    if let Some(kb) = peak_rss_kb() {
        println!(
            "peak resident memory of the process: {:.1} MiB",
            kb as f64 / 1024.0
        );
    }
    if let Some(j) = &args.json {
        std::fs::write(j, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("cannot write {}", j.display()))?;
    }
    Ok(())
}

/// Runs `generate`.
pub fn run_generate(args: &GenerateArgs) -> anyhow::Result<()> {
    export::check_writable(&args.out)?;
    if let Some(t) = &args.trace {
        export::check_writable(t)?;
    }
    let (mut model, _) = args.source.load()?;
    let mut params = args.params(&model.card.defaults.resolve());
    if args.window.is_none() {
        // The model's recommended window, within what this grid takes (as the app does); a
        // window asked for on the command line is checked as given.
        let range =
            crate::decode::schedule::window_range(model.model.layout(), model.model.grid().1);
        params.window = params.window.clamp(*range.start(), *range.end());
    }
    params.sampling.validate()?;
    crate::decode::sampling::validate_cfg(params.cfg_scale)?;
    let cond = condition_for(&model, args.class, args.prompt.as_deref())?;
    let schedule =
        crate::decode::engine::schedule_for(model.model.as_ref(), params.mode, params.window)?;
    if args.attention {
        model.model.set_attention_capture(Some(0));
    }
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(schedule.num_passes() as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} passes {elapsed_precise}, {eta} left",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let total = schedule.num_passes();
    let (mut pass_ms, mut warned) = (Vec::new(), false);
    let trace = generate(model.model.as_mut(), &cond, &params, &mut |r| {
        bar.inc(1);
        pass_ms.push(r.elapsed.as_secs_f64() * 1e3);
        if !warned && let Some(w) = crate::decode::engine::slow_run_warning(&pass_ms, total) {
            warned = true;
            let note = "warning: a slow run on this device";
            if args.quiet {
                eprintln!("{note}: {w}");
            } else {
                bar.println(format!("{note}: {w}"));
            }
        }
        Flow::Continue
    })?;
    bar.finish_and_clear();
    let t0 = std::time::Instant::now();
    let img = model.model.decode_image(&trace.tokens)?;
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

/// Dispatches a parsed command line.
pub fn run(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        None => crate::app::run_app(None),
        Some(Command::App(a)) => crate::app::run_app(a.model.clone()),
        Some(Command::Generate(a)) => run_generate(a).context("generate failed"),
        Some(Command::Bench(a)) => run_bench(a).context("bench failed"),
        Some(Command::Eval(a)) => run_eval(a).context("eval failed"),
        Some(Command::Acceptance(a)) => run_acceptance(a).context("acceptance failed"),
        Some(Command::Locality(a)) => run_locality(a).context("locality failed"),
    }
}
