//! The long-lived worker thread: the only owner of models. The UI sends [`Command`]s and
//! receives [`Event`]s, each tagged with a job id so that events of a stopped or superseded
//! job can be dropped. Live previews cost the decoding nothing: after a model loads, a second
//! thread learns each code's thumbnail ([`CodePalette`]) while no run is active, and the UI
//! paints produced tokens with it; the real VQ decode runs once, when a run ends.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::decode::engine::{EngineError, schedule_for};
use crate::decode::{DecodeTrace, Flow, GenerateParams, PassReport, generate};
use crate::model::palette::CodePalette;
use crate::model::registry;
use crate::model::{Condition, ImageArModel, ImageDecoder, RgbImage};
use crate::prompt::ClassIndex;
use crate::weights;

/// Identifies one request.
pub type JobId = u64;

/// Which model to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// The built-in emoji model.
    Builtin,
    /// A model folder.
    Dir(PathBuf),
}

impl ModelSource {
    /// The folder holding the model.
    pub fn dir(&self) -> PathBuf {
        match self {
            ModelSource::Builtin => crate::default_model_dir(),
            ModelSource::Dir(d) => d.clone(),
        }
    }
}

/// UI -> worker.
#[derive(Debug, Clone)]
pub enum Command {
    /// Load (or switch to) a model.
    LoadModel {
        /// Job id.
        job: JobId,
        /// Which model.
        source: ModelSource,
        /// cpu, cuda, cuda:N, metal.
        device: String,
    },
    /// Generate one image.
    Generate {
        /// Job id.
        job: JobId,
        /// Condition.
        cond: Condition,
        /// Decoding settings.
        params: GenerateParams,
        /// Record each token's attention, keeping this layer's heads one by one.
        attention: Option<usize>,
    },
    /// End the thread.
    Shutdown,
}

/// What the UI needs to know about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Display name.
    pub name: String,
    /// Folder.
    pub dir: PathBuf,
    /// Token grid (rows, columns).
    pub grid: (usize, usize),
    /// Valid ZipAR windows.
    pub windows: std::ops::RangeInclusive<usize>,
    /// How image tokens are laid out (rows ending with an end-of-row token or not).
    pub layout: crate::decode::schedule::Layout,
    /// Architecture.
    pub kind: crate::weights::ModelKind,
    /// Class names, for class-conditional models that ship them.
    pub classes: Option<Arc<ClassIndex>>,
    /// Number of classes (0 for text-conditional models).
    pub num_classes: usize,
    /// Class ids or free-text captions.
    pub conditioning: crate::model::registry::Conditioning,
    /// Device it runs on.
    pub device: String,
    /// Load time.
    pub load_ms: f64,
    /// Decoding settings the model recommends.
    pub defaults: crate::weights::SamplingDefaults,
}

/// Worker -> UI.
#[derive(Debug, Clone)]
pub enum Event {
    /// A model is ready.
    ModelLoaded {
        /// Job id.
        job: JobId,
        /// About the model.
        info: ModelInfo,
    },
    /// A model load started: what is read and the memory it will take.
    Loading {
        /// Job id.
        job: JobId,
        /// One line, see [`crate::model::registry::summary`].
        detail: String,
    },
    /// A load reached its next weight file.
    LoadProgress {
        /// Job id.
        job: JobId,
        /// Where it stands.
        progress: crate::model::registry::LoadProgress,
    },
    /// A model could not be loaded; the previous one (if any) stays.
    ModelFailed {
        /// Job id.
        job: JobId,
        /// One-line reason.
        error: String,
    },
    /// A generation started.
    Started {
        /// Job id.
        job: JobId,
        /// Passes planned.
        total_passes: usize,
        /// Grid.
        grid: (usize, usize),
        /// When the worker started it.
        at: Instant,
    },
    /// One forward pass finished.
    Pass {
        /// Job id.
        job: JobId,
        /// What it did.
        report: PassReport,
    },
    /// The loaded model's code thumbnails, for live previews (some time after `ModelLoaded`).
    Palette {
        /// Job id of the model load.
        job: JobId,
        /// The thumbnails.
        palette: Arc<CodePalette>,
    },
    /// A generation finished.
    Finished {
        /// Job id.
        job: JobId,
        /// Per-token record.
        trace: Box<DecodeTrace>,
        /// Final image.
        image: RgbImage,
        /// The run's wall time as the worker measured it: from its start to its image decoded.
        wall: Duration,
    },
    /// A generation was stopped.
    Cancelled {
        /// Job id.
        job: JobId,
    },
    /// A generation failed.
    Failed {
        /// Job id.
        job: JobId,
        /// One-line reason.
        error: String,
    },
}

impl Event {
    /// The job an event belongs to.
    pub fn job(&self) -> JobId {
        match self {
            Event::ModelLoaded { job, .. }
            | Event::Loading { job, .. }
            | Event::LoadProgress { job, .. }
            | Event::ModelFailed { job, .. }
            | Event::Started { job, .. }
            | Event::Pass { job, .. }
            | Event::Palette { job, .. }
            | Event::Finished { job, .. }
            | Event::Cancelled { job }
            | Event::Failed { job, .. } => *job,
        }
    }
}

/// The UI's end of the worker.
pub struct WorkerHandle {
    commands: Sender<Command>,
    /// Events from the worker.
    pub events: Receiver<Event>,
    cancel_below: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WorkerHandle {
    /// Starts the worker; `wake` is called after each event (egui's `request_repaint`).
    pub fn spawn(wake: impl Fn() + Send + Sync + 'static) -> Self {
        let (ctx, crx) = crossbeam_channel::unbounded::<Command>();
        let (etx, erx) = crossbeam_channel::unbounded::<Event>();
        let cancel_below = Arc::new(AtomicU64::new(0));
        let cancel = cancel_below.clone();
        let wake: Arc<dyn Fn() + Send + Sync> = Arc::new(wake);
        let thread = std::thread::Builder::new()
            .name("zipar-worker".into())
            .spawn(move || Worker::new(etx, wake, cancel).run(crx))
            .ok();
        Self {
            commands: ctx,
            events: erx,
            cancel_below,
            thread,
        }
    }

    /// Sends a command; false when the worker is gone.
    pub fn send(&self, cmd: Command) -> bool {
        self.commands.send(cmd).is_ok()
    }

    /// Stops every job with an id below `job` (between passes).
    pub fn cancel_below(&self, job: JobId) {
        self.cancel_below.fetch_max(job, Ordering::SeqCst);
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.cancel_below(u64::MAX);
        let _ = self.commands.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Least time between two UI wake-ups while a run streams its passes.
const WAKE_EVERY: Duration = Duration::from_millis(33);

/// How long a run decodes before the UI shows it live. A frame costs the decoding cores
/// (tens of milliseconds of CPU on a software renderer, measured under Xvfb), and a run
/// shorter than this is over before a live view could show anything a person can follow: it
/// appears finished, and the replay shows how it was built. Longer runs stream at
/// [`WAKE_EVERY`].
pub const LIVE_AFTER: Duration = Duration::from_millis(250);

/// A model whose code thumbnails the palette thread should learn.
struct PaletteJob {
    job: JobId,
    decoder: Arc<dyn ImageDecoder>,
}

struct Worker {
    events: Sender<Event>,
    wake: Arc<dyn Fn() + Send + Sync>,
    cancel_below: Arc<AtomicU64>,
    model: Option<Box<dyn ImageArModel>>,
    palettes: Sender<PaletteJob>,
    /// Set while a run decodes: the palette thread waits, so the run has the cores.
    busy: Arc<AtomicBool>,
}

impl Worker {
    fn new(
        events: Sender<Event>,
        wake: Arc<dyn Fn() + Send + Sync>,
        cancel_below: Arc<AtomicU64>,
    ) -> Self {
        let (ptx, prx) = crossbeam_channel::unbounded::<PaletteJob>();
        let busy = Arc::new(AtomicBool::new(false));
        let (pev, pwake, pbusy) = (events.clone(), wake.clone(), busy.clone());
        let _ = std::thread::Builder::new()
            .name("zipar-palette".into())
            .spawn(move || palette_thread(&prx, &pev, &*pwake, &pbusy));
        Self {
            events,
            wake,
            cancel_below,
            model: None,
            palettes: ptx,
            busy,
        }
    }

    fn emit(&self, e: Event) {
        let _ = self.events.send(e);
        (self.wake)();
    }

    fn run(mut self, commands: Receiver<Command>) {
        for cmd in &commands {
            match cmd {
                Command::Shutdown => break,
                Command::LoadModel {
                    job,
                    source,
                    device,
                } => match self.load(job, &source, &device) {
                    Ok(info) => {
                        self.emit(Event::ModelLoaded { job, info });
                        if let Some(m) = &self.model {
                            let decoder = m.image_decoder();
                            let _ = self.palettes.send(PaletteJob { job, decoder });
                        }
                    }
                    Err(e) => self.emit(Event::ModelFailed {
                        job,
                        error: format!("{e:#}"),
                    }),
                },
                Command::Generate {
                    job,
                    cond,
                    params,
                    attention,
                } => {
                    if job < self.cancel_below.load(Ordering::SeqCst) {
                        self.emit(Event::Cancelled { job });
                        continue;
                    }
                    self.busy.store(true, Ordering::SeqCst);
                    let result = self.generate(job, &cond, &params, attention);
                    self.busy.store(false, Ordering::SeqCst);
                    let e = match result {
                        Ok((trace, image, wall)) => Event::Finished {
                            job,
                            trace: Box::new(trace),
                            image,
                            wall,
                        },
                        Err(GenError::Cancelled) => Event::Cancelled { job },
                        Err(GenError::Other(error)) => Event::Failed { job, error },
                    };
                    if matches!(e, Event::Finished { .. }) && !commands.is_empty() {
                        // Another run is queued (Compare's second): the UI shows both when the
                        // last one ends, instead of drawing a frame on the next run's cores.
                        let _ = self.events.send(e);
                    } else {
                        self.emit(e);
                    }
                }
            }
        }
    }

    fn load(
        &mut self,
        job: JobId,
        source: &ModelSource,
        device: &str,
    ) -> anyhow::Result<ModelInfo> {
        let t0 = Instant::now();
        let dev = weights::parse_device(device)?;
        let dir = source.dir();
        let detail = registry::summary(&dir, &dev)?.text;
        self.emit(Event::Loading { job, detail });
        let registry::LoadedModel { model, card } =
            registry::open_with_progress(&dir, &dev, &mut |p| {
                self.emit(Event::LoadProgress {
                    job,
                    progress: p.clone(),
                })
            })?;
        let classes = match &card.classes {
            Some(f) => Some(Arc::new(ClassIndex::load(f)?)),
            None => None,
        };
        let grid = model.grid();
        let info = ModelInfo {
            name: card.name,
            dir,
            grid,
            windows: crate::decode::schedule::window_range(model.layout(), grid.1),
            layout: model.layout(),
            kind: card.kind,
            classes,
            num_classes: card.num_classes,
            conditioning: card.conditioning,
            device: device.to_string(),
            load_ms: t0.elapsed().as_secs_f64() * 1e3,
            defaults: card.defaults,
        };
        self.model = Some(model);
        Ok(info)
    }

    fn generate(
        &mut self,
        job: JobId,
        cond: &Condition,
        params: &GenerateParams,
        attention: Option<usize>,
    ) -> Result<(DecodeTrace, RgbImage, Duration), GenError> {
        let Some(model) = self.model.as_deref_mut() else {
            return Err(GenError::Other("no model is loaded".into()));
        };
        model.set_attention_capture(attention);
        let schedule = schedule_for(model, params.mode, params.window)
            .map_err(|e| GenError::Other(e.to_string()))?;
        let (h, w) = model.grid();
        let started = Instant::now();
        // No wake-up for the start: a run is shown live only once it has lasted LIVE_AFTER.
        let _ = self.events.send(Event::Started {
            job,
            total_passes: schedule.num_passes(),
            grid: (h, w),
            at: started,
        });
        let events = self.events.clone();
        let wake = self.wake.clone();
        let cancel = self.cancel_below.clone();
        let mut last_wake = started;
        let result = generate(model, cond, params, &mut |report: &PassReport| {
            let _ = events.send(Event::Pass {
                job,
                report: report.clone(),
            });
            // Wake the UI at most every WAKE_EVERY while passes stream (a pass can take well
            // under a millisecond: one wake-up per pass would cost the decoding CPU), and not
            // before the run has lasted LIVE_AFTER; the events queue up and the next frame
            // applies them all.
            if started.elapsed() >= LIVE_AFTER && last_wake.elapsed() >= WAKE_EVERY {
                last_wake = Instant::now();
                wake();
            }
            if job < cancel.load(Ordering::SeqCst) {
                Flow::Stop
            } else {
                Flow::Continue
            }
        });
        model.set_attention_capture(None);
        let trace = match result {
            Ok(t) => t,
            Err(EngineError::Cancelled { .. }) => return Err(GenError::Cancelled),
            Err(e) => return Err(GenError::Other(e.to_string())),
        };
        let t_image = Instant::now();
        let image = model
            .decode_image(&trace.tokens)
            .map_err(|e| GenError::Other(format!("decoding the image failed: {e:#}")))?;
        log::info!(
            "run {job} finished: {} window {}, {} passes, decode {:.1} ms, image {:.1} ms, wall {:.1} ms",
            params.mode,
            params.window,
            trace.passes,
            trace.pass_ms.iter().sum::<f64>(),
            t_image.elapsed().as_secs_f64() * 1e3,
            started.elapsed().as_secs_f64() * 1e3,
        );
        if log::log_enabled!(log::Level::Debug) {
            log::debug!("run {job} {}", slowest_passes(&trace.pass_ms, 5));
        }
        Ok((trace, image, started.elapsed()))
    }
}

/// The `n` slowest passes after the first (the prefill) against the median pass, each with
/// when it started in the run: where a run lost time to something else on the machine.
fn slowest_passes(pass_ms: &[f64], n: usize) -> String {
    let mut sorted = pass_ms.get(1..).unwrap_or_default().to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let mut at = 0.0;
    let mut passes: Vec<(usize, f64, f64)> = pass_ms
        .iter()
        .enumerate()
        .map(|(i, &ms)| {
            let start = at;
            at += ms;
            (i, ms, start)
        })
        .skip(1)
        .collect();
    passes.sort_by(|a, b| b.1.total_cmp(&a.1));
    let slow: Vec<String> = passes
        .iter()
        .take(n)
        .map(|(i, ms, start)| format!("#{i} {ms:.2} ms at {start:.1} ms"))
        .collect();
    format!("median pass {median:.2} ms; slowest: {}", slow.join(", "))
}

enum GenError {
    Cancelled,
    Other(String),
}

/// Learns the code thumbnails of each loaded model, one grid decode at a time, waiting while
/// a run is active and giving up on a model as soon as another one is loaded.
fn palette_thread(
    jobs: &Receiver<PaletteJob>,
    events: &Sender<Event>,
    wake: &(dyn Fn() + Send + Sync),
    busy: &AtomicBool,
) {
    while let Ok(mut next) = jobs.recv() {
        loop {
            let mut newer = None;
            let built = CodePalette::build(&*next.decoder, || {
                while busy.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                newer = jobs.try_iter().last();
                newer.is_none()
            });
            match (newer, built) {
                (Some(n), _) => next = n,
                (None, Ok(Some(palette))) => {
                    let _ = events.send(Event::Palette {
                        job: next.job,
                        palette: Arc::new(palette),
                    });
                    wake();
                    break;
                }
                (None, Ok(None)) => break,
                (None, Err(e)) => {
                    log::warn!("no live previews for this model: {e:#}");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn slowest_passes_skip_the_prefill_and_say_when_each_started() {
        let line = super::slowest_passes(&[9.0, 1.0, 5.0, 1.0, 3.0, 1.0], 2);
        assert_eq!(
            line,
            "median pass 1.00 ms; slowest: #2 5.00 ms at 10.0 ms, #4 3.00 ms at 16.0 ms"
        );
        assert_eq!(
            super::slowest_passes(&[], 3),
            "median pass 0.00 ms; slowest: "
        );
    }
}
