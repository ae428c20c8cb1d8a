//! Runs a model through a schedule, samples each predicted cell and reports every pass to a
//! sink (the CLI's progress bar, the app's worker channel). Cancellation happens between
//! passes: the sink answers [`Flow::Stop`].

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::adaptive::{self, Outcome};
use super::plan::{AdaptivePlan, FixedPlan, Plan};
use super::sampling::{Sampler, Sampling, SamplingError, cfg_combine, distribution, validate_cfg};
use super::schedule::{Cell, Feed, Layout, Mode, Pass, Role, Schedule, ScheduleError, Source};
use super::trace::DecodeTrace;
use crate::model::{Condition, ImageArModel, ModelInput, PassLogits, RunOptions, TokenAttention};

/// Settings of one generation run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GenerateParams {
    /// NTP or ZipAR.
    pub mode: Mode,
    /// ZipAR window (ignored for NTP).
    pub window: usize,
    /// Classifier-free guidance scale; 1.0 runs without the unconditional half.
    pub cfg_scale: f32,
    /// How tokens are drawn.
    pub sampling: Sampling,
    /// RNG seed.
    pub seed: u64,
    /// Hide never-written cache slots from attention (off matches the official code).
    pub mask_unwritten: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            mode: Mode::Zipar,
            window: 4,
            cfg_scale: 2.0,
            sampling: Sampling::default(),
            seed: 0,
            mask_unwritten: false,
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, PartialEq)]
pub struct PassReport {
    /// Pass index, from 0 (the prefill).
    pub index: usize,
    /// Passes in the whole run.
    pub total: usize,
    /// Cells produced, with token and probability, top to bottom.
    pub produced: Vec<(Cell, u32, f32)>,
    /// Inputs fed.
    pub inputs: usize,
    /// Exact mode: how each produced cell became final (same order as `produced`); empty in
    /// the other modes.
    pub fates: Vec<super::exact::Fate>,
    /// With attention capture on (NTP, ZipAR, adaptive): the attention of the query that drew
    /// each produced cell (per layer, and the heads of one layer), over the condition's slots
    /// and then the image positions (same order as `produced`); empty otherwise.
    pub attention: Vec<TokenAttention>,
    /// Wall time of the pass (model call plus sampling).
    pub elapsed: Duration,
}

/// Passes after the prefill measured before a run's length is projected.
pub const PROJECT_AFTER: usize = 3;

/// A run long enough to warn about: its projected total, in seconds.
pub const SLOW_RUN_S: f64 = 30.0;

/// After the first passes of a run (the prefill and [`PROJECT_AFTER`] more), its projected
/// total time when that exceeds [`SLOW_RUN_S`]: what was measured plus the remaining passes at
/// the measured per-pass time (the prefill, which reads the whole prompt, is not averaged in).
/// A 7B model on a CPU: "4 passes in 12.5 s: about 52 min for all 753". `None` before that,
/// or for a run that will be quick.
pub fn slow_run_warning(pass_ms: &[f64], total_passes: usize) -> Option<String> {
    let done = pass_ms.len();
    if done < PROJECT_AFTER + 1 || done >= total_passes {
        return None;
    }
    let spent: f64 = pass_ms.iter().sum::<f64>() / 1e3;
    let per_pass = pass_ms[1..].iter().sum::<f64>() / (done - 1) as f64 / 1e3;
    let total = spent + per_pass * (total_passes - done) as f64;
    (total > SLOW_RUN_S).then(|| {
        format!(
            "{done} passes in {spent:.1} s: about {} for all {total_passes}",
            human_duration(total)
        )
    })
}

/// 95 -> "1 min 35 s", 7300 -> "2 h 1 min".
pub fn human_duration(secs: f64) -> String {
    let s = secs.round() as u64;
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, sec) => format!("{sec} s"),
        (0, min, sec) => format!("{min} min {sec} s"),
        (h, min, _) => format!("{h} h {min} min"),
    }
}

/// The sink's answer after each pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on.
    Continue,
    /// Cancel the run.
    Stop,
}

/// Why a run ended without an image.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The sink asked to stop.
    #[error("cancelled after {passes} of {total} passes")]
    Cancelled {
        /// Passes done.
        passes: usize,
        /// Passes planned.
        total: usize,
    },
    /// The window does not fit the grid.
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// Sampling settings out of range.
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    /// The mode cannot decode this model's token layout.
    #[error("{0}")]
    Unsupported(String),
    /// The model failed. (Not a `#[source]`: the message already holds the whole chain, and
    /// a source would print it twice.)
    #[error("model error: {0:#}")]
    Model(anyhow::Error),
}

impl From<anyhow::Error> for EngineError {
    fn from(e: anyhow::Error) -> Self {
        EngineError::Model(e)
    }
}

/// Builds the fixed schedule for a mode.
pub fn schedule_for(
    model: &dyn ImageArModel,
    mode: Mode,
    window: usize,
) -> Result<Schedule, ScheduleError> {
    let (h, w) = model.grid();
    match mode {
        Mode::Ntp => Schedule::ntp(h, w, model.layout()),
        Mode::Zipar => Schedule::zipar(h, w, model.layout(), window),
        // Adaptive and exact counts are data-dependent: this is their lower bound (all drafts
        // accepted).
        Mode::Adaptive | Mode::Exact => {
            Schedule::zipar(h, w, model.layout(), window).map(|mut s| {
                s.mode = mode;
                s
            })
        }
    }
}

/// Generates one image's tokens.
///
/// On the CPU the whole run, sampling included, goes inside candle's thread pool: each pass
/// then runs on a pool thread already awake, where handing every pass to the pool and waiting
/// for it cost two thread wake-ups a pass (about 100 µs of a 0.2-0.3 ms pass of the built-in
/// model on the 2-core VM: `cargo run --release --example pass_cost`).
pub fn generate(
    model: &mut dyn ImageArModel,
    cond: &Condition,
    params: &GenerateParams,
    sink: &mut (dyn FnMut(&PassReport) -> Flow + Send),
) -> Result<DecodeTrace, EngineError> {
    if model.on_cpu() {
        candle_core::Device::Cpu.with_context(|| generate_here(model, cond, params, sink))
    } else {
        generate_here(model, cond, params, sink)
    }
}

/// [`generate`] on the calling thread.
fn generate_here(
    model: &mut dyn ImageArModel,
    cond: &Condition,
    params: &GenerateParams,
    sink: &mut dyn FnMut(&PassReport) -> Flow,
) -> Result<DecodeTrace, EngineError> {
    let (h, w) = model.grid();
    if params.mode == Mode::Exact {
        return super::exact::generate(model, cond, params, sink);
    }
    if params.mode == Mode::Adaptive && model.layout() != Layout::Raster {
        return Err(EngineError::Unsupported(
            "the adaptive window is implemented for the raster layout only: this model ends \
             its rows with a separator token; use zipar or exact"
                .into(),
        ));
    }
    let schedule = schedule_for(model, params.mode, params.window)?;
    if params.mode == Mode::Adaptive && h >= 2 && params.window < w {
        let mut plan = AdaptivePlan::new(h, w, params.window, schedule.num_passes());
        return generate_planned(model, cond, params, &mut plan, sink);
    }
    // (An adaptive run whose window covers the row is fixed ZipAR at that window.)
    generate_planned(model, cond, params, &mut FixedPlan::new(schedule), sink)
}

/// Row `i` of a pass's logits, CFG-combined when `cfg` holds a scale.
pub(crate) fn combine(logits: &PassLogits, i: usize, cfg: Option<f32>) -> Vec<f32> {
    match (&logits.uncond, cfg) {
        (Some(u), Some(scale)) => cfg_combine(&logits.cond[i], &u[i], scale),
        _ => logits.cond[i].clone(),
    }
}

/// What both engines set up before the first pass.
pub(super) struct RunSetup {
    pub(super) trace: DecodeTrace,
    pub(super) cfg: Option<f32>,
    pub(super) opts: RunOptions,
    pub(super) sampler: Sampler,
}

pub(super) fn setup(
    params: &GenerateParams,
    h: usize,
    w: usize,
    window: usize,
) -> Result<RunSetup, EngineError> {
    params.sampling.validate()?;
    validate_cfg(params.cfg_scale)?;
    let mut trace = DecodeTrace::new(h, w, params.mode, window);
    trace.cfg_scale = params.cfg_scale;
    trace.sampling = params.sampling;
    trace.seed = params.seed;
    let cfg = (params.cfg_scale != 1.0).then_some(params.cfg_scale);
    Ok(RunSetup {
        trace,
        cfg,
        opts: RunOptions {
            cfg: cfg.is_some(),
            mask_unwritten: params.mask_unwritten,
        },
        sampler: Sampler::new(params.sampling, params.seed),
    })
}

/// Records a finished pass in the trace and reports it; `Err` when the sink stops the run
/// before its last pass.
pub(super) fn finish_pass(
    trace: &mut DecodeTrace,
    sink: &mut dyn FnMut(&PassReport) -> Flow,
    report: PassReport,
    last: bool,
) -> Result<(), EngineError> {
    for &(cell, token, prob) in &report.produced {
        trace.record(cell, token, prob, report.index);
    }
    trace.passes = report.index + 1;
    trace.pass_ms.push(report.elapsed.as_secs_f64() * 1e3);
    trace.inputs_per_pass.push(report.inputs);
    trace.tokens_per_pass.push(report.produced.len());
    if sink(&report) == Flow::Stop && !last {
        return Err(EngineError::Cancelled {
            passes: report.index + 1,
            total: report.total,
        });
    }
    Ok(())
}

pub(super) fn check_rows(logits: &PassLogits, want: usize) -> Result<(), EngineError> {
    if logits.cond.len() != want {
        return Err(anyhow::anyhow!(
            "model returned {} rows of logits for {} predictions",
            logits.cond.len(),
            want
        )
        .into());
    }
    Ok(())
}

/// Drives a [`Plan`] to a full grid: one model call per pass (the prefill first), each input's
/// logits sampled, drafted or kept for verification as its role says, the outcomes handed
/// back to the plan. Fixed schedules and the adaptive window run through here.
fn generate_planned(
    model: &mut dyn ImageArModel,
    cond: &Condition,
    params: &GenerateParams,
    plan: &mut dyn Plan,
    sink: &mut dyn FnMut(&PassReport) -> Flow,
) -> Result<DecodeTrace, EngineError> {
    let (h, w) = model.grid();
    let RunSetup {
        mut trace,
        cfg,
        opts,
        mut sampler,
    } = setup(params, h, w, plan.window())?;
    let greedy = params.sampling == Sampling::Greedy;
    let mut total = plan.expected_passes();
    let started = Instant::now();
    // Attention capture: each token gets the attention of the query that drew it (for a row's
    // first token under the adaptive window, the draft's query, or the verification whose
    // residual replaced it).
    let mut capture = PlanAttention::new(h, w);
    let mut index = 0;
    while let Some(feeds) = plan.next_feeds() {
        total = total.max(index + 1);
        let t0 = Instant::now();
        let logits = run_feeds(model, cond, opts, &feeds, |source| plan.token_of(source))?;
        let wanted = feeds.iter().filter(|f| f.role.wants_logits()).count();
        check_rows(&logits, wanted)?;
        let mut row = 0;
        let mut outcomes = Vec::with_capacity(feeds.len());
        for f in &feeds {
            if !f.role.wants_logits() {
                outcomes.push(Outcome::None);
                continue;
            }
            let l = combine(&logits, row, cfg);
            row += 1;
            outcomes.push(match f.role {
                Role::Verify(_) => Outcome::Verify {
                    dist: distribution(&l, params.sampling),
                },
                Role::Draft(_) => {
                    let (s, dist) = sampler.sample_with_distribution(&l);
                    Outcome::Sampled {
                        token: s.token,
                        prob: s.prob,
                        dist,
                    }
                }
                _ => {
                    let s = sampler.sample(&l);
                    Outcome::Sampled {
                        token: s.token,
                        prob: s.prob,
                        dist: Vec::new(),
                    }
                }
            });
        }
        let pass_attention = model.take_attention();
        let first_cells = |plan: &dyn Plan| -> Vec<u32> {
            plan.rejections()
                .map_or_else(|| vec![0; h], |r| (0..h).map(|i| r[i * w]).collect())
        };
        // Which rows had a draft rejected in this pass: only attention capture needs it.
        let rejected_before = pass_attention.as_ref().map(|_| first_cells(plan));
        let produced = plan.record(&feeds, outcomes, &mut |x, p, q| {
            adaptive::verify(&mut sampler, greedy, x, p, q)
        });
        let attention = match (pass_attention, rejected_before) {
            (Some(a), Some(before)) => {
                let rejected: Vec<bool> = first_cells(plan)
                    .iter()
                    .zip(&before)
                    .map(|(now, before)| now > before)
                    .collect();
                capture.pass(&a, index, &feeds, &produced, &rejected)
            }
            _ => Vec::new(),
        };
        let report = PassReport {
            index,
            total,
            produced,
            inputs: feeds.len(),
            fates: Vec::new(),
            attention,
            elapsed: t0.elapsed(),
        };
        finish_pass(&mut trace, sink, report, plan.is_complete())?;
        index += 1;
    }
    trace.total_ms = started.elapsed().as_secs_f64() * 1e3;
    plan.finish(&mut trace);
    if let Some((all, cond_len)) = capture.finish() {
        trace.retained_mass_of = crate::locality::retained_in_run(&all, cond_len, &trace.pass_of);
        if params.mode == Mode::Ntp {
            trace.needed_window_of = crate::locality::needed_windows(&all, cond_len, w);
        }
    }
    Ok(trace)
}

/// Which captured query each token came from: for a `Next` input, its own query (the
/// prefill's last condition slot for cell (0, 0)). Under the adaptive window a row's first
/// token is the draft that was accepted (drawn by a `Draft` input, or by the `Verify` input whose residual
/// replaced a rejected draft), or the residual drawn once the row above was complete (that
/// `Verify` input); its second token is the `Speculative` input's; the others are `Next`.
struct PlanAttention {
    w: usize,
    cells: Vec<Option<TokenAttention>>,
    cond_len: Option<usize>,
    /// The query behind each row's pending draft, and behind its speculative second token.
    draft: Vec<Option<TokenAttention>>,
    spec: Vec<Option<TokenAttention>>,
}

impl PlanAttention {
    fn new(h: usize, w: usize) -> Self {
        Self {
            w,
            cells: vec![None; h * w],
            cond_len: None,
            draft: vec![None; h],
            spec: vec![None; h],
        }
    }

    fn record(&mut self, cell: Cell, t: &TokenAttention) {
        if cell.row == 0 && cell.col == 0 {
            // The prefill's query spans exactly the condition's slots.
            self.cond_len = t.layers.first().map(Vec::len);
        }
        self.cells[cell.row * self.w + cell.col] = Some(t.clone());
    }

    /// One pass's attention, given which rows had a draft rejected in it; returns the
    /// attention of each produced cell, in order.
    fn pass(
        &mut self,
        a: &crate::model::PassAttention,
        index: usize,
        feeds: &[Feed],
        produced: &[(Cell, u32, f32)],
        rejected: &[bool],
    ) -> Vec<TokenAttention> {
        let mut next = Vec::new();
        let mut verify: Vec<Option<TokenAttention>> = vec![None; self.draft.len()];
        for (i, f) in feeds.iter().enumerate() {
            // The prefill's inputs are the condition's slots; its last one predicts.
            let row = if f.source == Source::Condition {
                a.slots.len() - 1
            } else {
                i
            };
            let t = || TokenAttention::of_input(a, row, index);
            match f.role {
                Role::Next(c) => next.push((c, t())),
                Role::Draft(r) => self.draft[r] = Some(t()),
                Role::Verify(r) => verify[r] = Some(t()),
                Role::Speculative(r) => self.spec[r] = Some(t()),
                Role::Discard => {}
            }
        }
        let mut out = Vec::with_capacity(produced.len());
        for &(cell, _, _) in produced {
            let r = cell.row;
            let t = match next.iter().position(|(c, _)| *c == cell) {
                Some(k) => Some(next.swap_remove(k).1),
                None if cell.col == 0 && rejected[r] => verify[r].take(),
                None if cell.col == 0 => self.draft[r].take(),
                None => self.spec[r].take(),
            };
            if let Some(t) = &t {
                self.record(cell, t);
            }
            out.push(t);
        }
        // A rejected draft that did not end the row: the residual is the new draft.
        for (r, v) in verify.into_iter().enumerate() {
            if rejected[r] && v.is_some() && self.cells[r * self.w].is_none() {
                self.draft[r] = v;
            }
        }
        // One entry per produced cell, or none at all (the report's rows must line up).
        out.into_iter()
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default()
    }

    /// Every cell's attention and the condition's length, when every cell has one.
    fn finish(self) -> Option<(Vec<TokenAttention>, usize)> {
        let cond_len = self.cond_len?;
        let all: Option<Vec<TokenAttention>> = self.cells.into_iter().collect();
        Some((all?, cond_len))
    }
}

/// Runs one pass of a fixed schedule: the prefill, or a step feeding each scheduled cell's
/// token (`token_of`) or the layout's separator at its slot.
pub(crate) fn run_pass(
    model: &mut dyn ImageArModel,
    cond: &Condition,
    opts: RunOptions,
    pass: &Pass,
    token_of: impl Fn(Cell) -> Option<u32>,
) -> anyhow::Result<PassLogits> {
    run_feeds(model, cond, opts, &pass.feeds, |source| match source {
        Source::Cell(c) => token_of(c),
        _ => None,
    })
}

/// Runs one pass over `feeds`: the prefill when they feed the condition, else a step feeding
/// each input's token (`token_of`) or the layout's separator at its slot.
fn run_feeds(
    model: &mut dyn ImageArModel,
    cond: &Condition,
    opts: RunOptions,
    feeds: &[Feed],
    token_of: impl Fn(Source) -> Option<u32>,
) -> anyhow::Result<PassLogits> {
    if feeds.first().map(|f| f.source) == Some(Source::Condition) {
        return model.prefill(cond, opts);
    }
    let inputs = feeds
        .iter()
        .map(|f| {
            let token = match f.source {
                Source::Separator(_) => model
                    .separator_token()
                    .ok_or_else(|| anyhow::anyhow!("the schedule needs an end-of-row token"))?,
                Source::Condition => anyhow::bail!("condition fed after the prefill"),
                source => token_of(source)
                    .ok_or_else(|| anyhow::anyhow!("the plan feeds {source:?} before it exists"))?,
            };
            Ok(ModelInput {
                token,
                pos: f.pos,
                wants_logits: f.role.wants_logits(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    model.step(&inputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ImageDecoder;

    /// A 2x2 model with flat logits that records, for each pass, whether it ran on a thread
    /// of a rayon pool.
    struct Recorder {
        cpu: bool,
        in_pool: Vec<bool>,
    }

    impl Recorder {
        fn logits(&mut self, n: usize) -> PassLogits {
            self.in_pool.push(rayon::current_thread_index().is_some());
            PassLogits {
                cond: vec![vec![0.0; 4]; n],
                uncond: None,
            }
        }
    }

    impl ImageArModel for Recorder {
        fn grid(&self) -> (usize, usize) {
            (2, 2)
        }
        fn layout(&self) -> Layout {
            Layout::Raster
        }
        fn vocab_size(&self) -> usize {
            4
        }
        fn on_cpu(&self) -> bool {
            self.cpu
        }
        fn prefill(&mut self, _: &Condition, _: RunOptions) -> anyhow::Result<PassLogits> {
            Ok(self.logits(1))
        }
        fn step(&mut self, inputs: &[ModelInput]) -> anyhow::Result<PassLogits> {
            Ok(self.logits(inputs.iter().filter(|i| i.wants_logits).count()))
        }
        fn image_decoder(&self) -> std::sync::Arc<dyn ImageDecoder> {
            std::sync::Arc::new(NoPixels)
        }
    }

    /// The recorder's decoder: it has no pixels to give.
    struct NoPixels;

    impl ImageDecoder for NoPixels {
        fn decode(&self, _: &[u32]) -> anyhow::Result<crate::model::RgbImage> {
            anyhow::bail!("the recorder has no image decoder")
        }
        fn grid(&self) -> (usize, usize) {
            (2, 2)
        }
        fn codebook_size(&self) -> usize {
            4
        }
    }

    #[test]
    fn a_cpu_run_goes_inside_the_thread_pool_as_a_whole() {
        for cpu in [true, false] {
            let mut model = Recorder {
                cpu,
                in_pool: Vec::new(),
            };
            let params = GenerateParams {
                mode: Mode::Ntp,
                cfg_scale: 1.0,
                ..GenerateParams::default()
            };
            let trace = generate(&mut model, &Condition::Class(0), &params, &mut |_| {
                Flow::Continue
            })
            .expect("a run");
            assert_eq!(trace.tokens.len(), 4);
            // the prefill and three passes, all on a pool thread for a CPU model, none otherwise
            assert_eq!(model.in_pool, vec![cpu; 4], "cpu {cpu}");
        }
    }

    #[test]
    fn slow_runs_are_projected_from_their_first_passes() {
        // a 5 s prefill, then 2 s passes: 753 passes take about 25 min
        let ms = [5000.0, 2000.0, 2000.0, 2000.0];
        let w = slow_run_warning(&ms, 753).expect("a warning");
        assert!(w.starts_with("4 passes in 11.0 s: about 25 min"), "{w}");
        // too early, quick, or finished: nothing
        assert_eq!(slow_run_warning(&ms[..3], 753), None);
        assert_eq!(slow_run_warning(&[1.0, 1.0, 1.0, 1.0], 753), None);
        assert_eq!(slow_run_warning(&ms, 4), None);
        assert_eq!(human_duration(95.0), "1 min 35 s");
        assert_eq!(human_duration(7300.0), "2 h 1 min");
    }
}
