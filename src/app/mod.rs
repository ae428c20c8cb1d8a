//! The desktop app (egui only: no tensors here). One worker thread owns the models; this
//! module turns its events into [`RunView`]s and draws them.

pub mod grid_view;
pub mod player;
pub mod run_view;
pub mod settings;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use egui::{Color32, Key, KeyboardShortcut, Modifiers, RichText, TextureHandle, TextureOptions};

use crate::decode::Mode;
use crate::decode::schedule::Layout;
use crate::export;
use crate::model::palette::CodePalette;
use crate::model::registry::Conditioning;
use crate::model::{Condition, RgbImage};
use crate::prompt::ClassMatch;
use crate::weights;
use crate::worker::{Command, Event, JobId, ModelInfo, ModelSource, WorkerHandle};
use player::Player;
use run_view::{RunStatus, RunView};
use settings::{Settings, ViewMode};

/// Ctrl+Enter: generate.
const GENERATE_KEY: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::Enter);
/// Ctrl+S: save the image.
const SAVE_KEY: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::S);

/// Least time between two frames driven by worker events.
const REPAINT_EVERY: std::time::Duration = std::time::Duration::from_millis(33);

/// egui's default animation time, restored when no run is active.
const ANIMATION_TIME: f32 = 1.0 / 12.0;

/// Model loading state.
#[derive(Debug, Clone)]
pub enum ModelState {
    /// Loading (job id).
    Loading(JobId),
    /// Ready.
    Ready(ModelInfo),
    /// No model: the reason.
    Missing(String),
}

/// A run and its textures.
struct Lane {
    run: RunView,
    texture: Option<TextureHandle>,
    texture_version: u64,
}

/// The application.
pub struct StudioApp {
    /// Persisted settings.
    pub settings: Settings,
    worker: WorkerHandle,
    wake_ctx: Arc<OnceLock<egui::Context>>,
    next_job: JobId,
    /// The model.
    pub model: ModelState,
    lanes: Vec<Lane>,
    /// Prompt match shown under the prompt box.
    pub matched: Option<ClassMatch>,
    class_filter: String,
    /// Last message for the status line (errors in red).
    pub status: Option<(String, bool)>,
    /// Model load error shown next to the model picker.
    pub model_error: Option<String>,
    /// What the model being loaded reads and takes in memory (from the worker).
    pub loading_detail: Option<String>,
    /// Where the load stands (per weight file).
    pub load_progress: Option<crate::model::registry::LoadProgress>,
    last_matched_prompt: String,
    /// Job id of the load that produced the current model.
    model_job: JobId,
    /// The current model's code thumbnails (live previews), once learned.
    palette: Option<Arc<CodePalette>>,
    /// Whether the prompt box has been given the keyboard focus at start.
    prompt_focused: bool,
    /// Replay of the finished runs on screen (one position for all, so a pair races).
    pub player: Player,
}

impl StudioApp {
    /// The app with these settings; starts the worker and loads the model.
    pub fn new(settings: Settings) -> Self {
        let wake_ctx: Arc<OnceLock<egui::Context>> = Arc::new(OnceLock::new());
        let w = wake_ctx.clone();
        // At most ~30 repaints a second while a run streams passes: egui keeps the earliest
        // pending deadline, so a burst of events costs one frame.
        let worker = WorkerHandle::spawn(move || {
            if let Some(ctx) = w.get() {
                ctx.request_repaint_after(REPAINT_EVERY);
            }
        });
        let mut app = Self {
            settings,
            worker,
            wake_ctx,
            next_job: 1,
            model: ModelState::Missing(String::new()),
            lanes: Vec::new(),
            matched: None,
            class_filter: String::new(),
            status: None,
            model_error: None,
            loading_detail: None,
            load_progress: None,
            last_matched_prompt: String::new(),
            model_job: 0,
            palette: None,
            prompt_focused: false,
            player: Player::default(),
        };
        let source = match &app.settings.model_dir {
            Some(d) => ModelSource::Dir(d.clone()),
            None => ModelSource::Builtin,
        };
        app.load_model(source);
        app
    }

    /// From eframe's creation context: restores the settings (`model` overrides the folder).
    pub fn from_creation(cc: &eframe::CreationContext<'_>, model: Option<PathBuf>) -> Self {
        let mut settings: Settings = cc
            .storage
            .and_then(|s| eframe::get_value(s, eframe::APP_KEY))
            .unwrap_or_default();
        if model.is_some() {
            settings.model_dir = model;
        }
        let app = Self::new(settings);
        let _ = app.wake_ctx.set(cc.egui_ctx.clone());
        app
    }

    fn job(&mut self) -> JobId {
        let j = self.next_job;
        self.next_job += 1;
        j
    }

    /// Asks the worker to load a model.
    pub fn load_model(&mut self, source: ModelSource) {
        // The worker handles one command at a time: stop the run so the load starts now.
        self.stop();
        let job = self.job();
        self.model_error = None;
        self.model = ModelState::Loading(job);
        self.loading_detail = None;
        self.load_progress = None;
        self.worker.send(Command::LoadModel {
            job,
            source,
            device: self.settings.device.clone(),
        });
    }

    /// The runs on screen (one, or two when comparing).
    pub fn runs(&self) -> impl Iterator<Item = &RunView> {
        self.lanes.iter().map(|l| &l.run)
    }

    /// Whether a generation is queued or running.
    pub fn is_busy(&self) -> bool {
        self.lanes.iter().any(|l| l.run.is_active())
    }

    /// How long ago the newest active run was asked for, while one is.
    fn active_run_age(&self) -> Option<std::time::Duration> {
        self.lanes
            .iter()
            .filter(|l| l.run.is_active())
            .map(|l| l.run.queued_at.elapsed())
            .min()
    }

    /// Resolves the condition from the prompt / class picker.
    pub fn condition(&self) -> Result<(Condition, String), String> {
        let ModelState::Ready(info) = &self.model else {
            return Err("no model is loaded".into());
        };
        if info.conditioning == Conditioning::Caption {
            let caption = self.settings.prompt.trim();
            if caption.is_empty() {
                return Err("type a caption for this text-to-image model".into());
            }
            return Ok((Condition::Text(caption.to_string()), caption.to_string()));
        }
        if let Some(id) = self.settings.class_override {
            let name = info
                .classes
                .as_ref()
                .and_then(|c| c.get(id).map(|x| x.name.clone()))
                .unwrap_or_else(|| format!("class {id}"));
            return Ok((Condition::Class(id), name));
        }
        match (&info.classes, &self.matched) {
            (Some(_), Some(m)) => Ok((Condition::Class(m.id), m.name.clone())),
            (Some(_), None) => Err(format!(
                "no class matches {:?}: try other words or pick a class",
                self.settings.prompt
            )),
            (None, _) => Err("this model has no class names: pick a class id".into()),
        }
    }

    /// Starts a run (or, with `compare`, an NTP run and a run in the chosen mode).
    pub fn generate(&mut self, compare: bool) {
        let (cond, name) = match self.condition() {
            Ok(c) => c,
            Err(e) => {
                self.status = Some((e, true));
                return;
            }
        };
        self.stop();
        self.lanes.clear();
        self.player.reset(0);
        let mut modes = vec![self.settings.mode];
        if compare {
            modes = vec![Mode::Ntp, self.settings.mode];
            if self.settings.mode == Mode::Ntp {
                modes[1] = Mode::Zipar;
            }
        }
        for mode in modes {
            let job = self.job();
            let params = self.settings.params(mode);
            let label = match mode {
                Mode::Ntp => "NTP".to_string(),
                Mode::Zipar => format!("ZipAR s={}", params.window),
                Mode::Adaptive => format!("Adaptive s_min={}", params.window),
                Mode::Exact => format!("Exact s={}", params.window),
            };
            let mut run = RunView::new(job, label, params);
            run.end_of_row =
                matches!(&self.model, ModelState::Ready(i) if i.layout == Layout::EndOfRow);
            self.lanes.push(Lane {
                run,
                texture: None,
                texture_version: 0,
            });
            self.worker.send(Command::Generate {
                job,
                cond: cond.clone(),
                params,
                attention: self
                    .settings
                    .record_attention
                    .then(|| self.settings.attention_layer.unwrap_or(0)),
            });
        }
        self.status = Some((format!("generating \"{name}\""), false));
    }

    /// Stops every running job (between passes).
    pub fn stop(&mut self) {
        self.worker.cancel_below(self.next_job);
    }

    /// Applies pending worker events.
    pub fn poll(&mut self) {
        while let Ok(ev) = self.worker.events.try_recv() {
            self.apply(ev);
        }
    }

    fn apply(&mut self, ev: Event) {
        let job = ev.job();
        match ev {
            Event::ModelLoaded { info, .. } => {
                if matches!(self.model, ModelState::Loading(j) if j == job) {
                    let mut msg = format!("loaded {} in {:.0} ms", info.name, info.load_ms);
                    if self.settings.defaults_applied_for.as_ref() != Some(&info.dir) {
                        self.settings.apply_defaults(&info.defaults, &info.windows);
                        self.settings.defaults_applied_for = Some(info.dir.clone());
                        if !info.defaults.is_empty() {
                            msg.push_str("; decoding settings set to the model's defaults");
                        }
                    }
                    if !info.windows.contains(&self.settings.window) {
                        self.settings.window =
                            (*info.windows.end()).min(4).max(*info.windows.start());
                    }
                    self.status = Some((msg, false));
                    self.model = ModelState::Ready(info);
                    self.model_job = job;
                    self.palette = None;
                    self.last_matched_prompt.clear();
                }
            }
            Event::Loading { detail, .. } => {
                if matches!(self.model, ModelState::Loading(j) if j == job) {
                    self.status = Some((format!("loading {detail}"), false));
                    self.loading_detail = Some(detail);
                }
            }
            Event::LoadProgress { progress, .. } => {
                if matches!(self.model, ModelState::Loading(j) if j == job) {
                    self.load_progress = Some(progress);
                }
            }
            Event::ModelFailed { error, .. } => {
                if matches!(self.model, ModelState::Loading(j) if j == job) {
                    self.model_error = Some(error.clone());
                    self.status = Some((error.clone(), true));
                    self.model = ModelState::Missing(error);
                }
            }
            Event::Palette { palette, .. } => {
                if job == self.model_job {
                    self.palette = Some(palette);
                }
            }
            other => {
                let palette = self.palette.clone();
                let Some(lane) = self.lanes.iter_mut().find(|l| l.run.job == job) else {
                    return; // a stopped or superseded job
                };
                let run = &mut lane.run;
                match other {
                    Event::Started {
                        total_passes,
                        grid,
                        at,
                        ..
                    } => run.on_started(total_passes, grid, at),
                    Event::Pass { report, .. } => run.on_pass(&report, palette.as_deref()),
                    Event::Finished {
                        trace, image, wall, ..
                    } => {
                        run.on_finished(*trace, image, wall);
                        let msg = format!(
                            "{}: {} passes (NTP {}), {:.0} ms",
                            run.label,
                            run.passes_done(),
                            run.grid.0 * run.grid.1,
                            run.decode_ms()
                        );
                        self.status = Some((msg, false));
                        if self.lanes.iter().all(|l| l.run.status == RunStatus::Done) {
                            let longest = self.lanes.iter().map(|l| l.run.passes()).max();
                            self.player.reset(longest.unwrap_or(0));
                        }
                    }
                    Event::Cancelled { .. } => {
                        run.status = RunStatus::Cancelled;
                        self.status = Some(("stopped".into(), false));
                    }
                    Event::Failed { error, .. } => {
                        run.status = RunStatus::Failed(error.clone());
                        self.status = Some((error, true));
                    }
                    Event::ModelLoaded { .. }
                    | Event::Loading { .. }
                    | Event::LoadProgress { .. }
                    | Event::ModelFailed { .. }
                    | Event::Palette { .. } => {}
                }
            }
        }
    }

    fn update_match(&mut self) {
        if self.settings.prompt == self.last_matched_prompt {
            return;
        }
        if !self.last_matched_prompt.is_empty() {
            self.settings.class_override = None;
        }
        self.last_matched_prompt = self.settings.prompt.clone();
        self.matched = match &self.model {
            ModelState::Ready(ModelInfo {
                classes: Some(c), ..
            }) => c.best(&self.settings.prompt),
            _ => None,
        };
    }

    /// Writes image, pass map, trace JSON and CSV of the last finished run to the export
    /// folder.
    pub fn export_all(&mut self) -> Option<export::Exported> {
        let Some(run) = self
            .lanes
            .iter()
            .rev()
            .map(|l| &l.run)
            .find(|r| r.trace.is_some())
        else {
            self.status = Some((
                "nothing to export yet: generate an image first".into(),
                true,
            ));
            return None;
        };
        let (Some(trace), Some(image)) = (&run.trace, &run.image) else {
            return None;
        };
        let stem = export::file_stem(&format!("{} {}", self.settings.prompt, run.label));
        let dir = self.settings.export_folder();
        match export::export_all(&dir, &stem, image, trace) {
            Ok(done) => {
                self.status = Some((format!("exported to {}", dir.display()), false));
                Some(done)
            }
            Err(e) => {
                self.status = Some((format!("{e:#}"), true));
                None
            }
        }
    }

    fn save_image_dialog(&mut self) {
        let Some((image, name)) = self
            .lanes
            .iter()
            .rev()
            .find_map(|l| l.run.image.clone().map(|i| (i, l.run.label.clone())))
        else {
            self.status = Some(("no image to save yet".into(), true));
            return;
        };
        let stem = export::file_stem(&format!("{} {}", self.settings.prompt, name));
        let folder = self.settings.export_folder();
        let _ = std::fs::create_dir_all(&folder);
        if let Some(path) = rfd::FileDialog::new()
            .set_directory(&folder)
            .set_file_name(format!("{stem}.png"))
            .add_filter("PNG image", &["png"])
            .save_file()
        {
            self.report_write(export::write_png(&image, &path), &path);
        }
    }

    fn save_diagnostics_dialog(&mut self, what: &str) {
        let Some(trace) = self.lanes.iter().rev().find_map(|l| l.run.trace.clone()) else {
            self.status = Some(("no finished run yet".into(), true));
            return;
        };
        let folder = self.settings.export_folder();
        let _ = std::fs::create_dir_all(&folder);
        let stem = export::file_stem(&self.settings.prompt);
        let (ext, filter) = match what {
            "json" => ("json", "Trace JSON"),
            "csv" => ("csv", "CSV, one row per token"),
            _ => ("png", "Pass map PNG"),
        };
        let name = if what == "passes" {
            format!("{stem}_passes.png")
        } else {
            format!("{stem}.{ext}")
        };
        if let Some(path) = rfd::FileDialog::new()
            .set_directory(&folder)
            .set_file_name(name)
            .add_filter(filter, &[ext])
            .save_file()
        {
            let r = match what {
                "json" => export::write_trace_json(&trace, &path),
                "csv" => export::write_trace_csv(&trace, &path),
                _ => export::write_png(&export::pass_map_image(&trace, 16), &path),
            };
            self.report_write(r, &path);
        }
    }

    fn report_write(&mut self, r: anyhow::Result<()>, path: &std::path::Path) {
        self.status = Some(match r {
            Ok(()) => (format!("saved {}", path.display()), false),
            Err(e) => (format!("{e:#}"), true),
        });
    }

    /// The whole UI for one frame.
    pub fn ui(&mut self, ui: &mut egui::Ui) {
        let _ = self.wake_ctx.set(ui.ctx().clone());
        self.poll();
        // While a run decodes, no frame is drawn but the capped ones that show its progress:
        // egui's animations and the prompt's blinking cursor would each ask for their own
        // (on a software renderer a frame costs tens of milliseconds of the cores the run
        // needs).
        let busy = self.is_busy();
        ui.ctx().global_style_mut(|s| {
            s.animation_time = if busy { 0.0 } else { ANIMATION_TIME };
            s.visuals.text_cursor.blink = !busy;
        });
        self.update_match();
        if ui.input_mut(|i| i.consume_shortcut(&GENERATE_KEY)) {
            self.generate(false);
        }
        if ui.input_mut(|i| i.consume_shortcut(&SAVE_KEY)) {
            self.save_image_dialog();
        }
        self.upload_textures(ui.ctx());
        // The panels leave their background to the window's clear colour, which is the same
        // (`clear_color` below): filling them painted every pixel of the window once more, a
        // third to a half of a frame's CPU on a software renderer (scripts/frame_cost.sh).
        let style = ui.style().clone();
        let side = egui::Frame::side_top_panel(&style).fill(egui::Color32::TRANSPARENT);
        egui::Panel::top("prompt_bar")
            .frame(side)
            .show(ui, |ui| self.prompt_bar_ui(ui));
        egui::Panel::bottom("status_bar")
            .frame(side)
            .show(ui, |ui| self.status_ui(ui));
        egui::Panel::left("settings")
            .frame(side)
            .resizable(true)
            .default_size(260.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| self.settings_ui(ui));
            });
        let central = egui::Frame::central_panel(&style).fill(egui::Color32::TRANSPARENT);
        egui::CentralPanel::default().frame(central).show(ui, |ui| {
            // The grids are sized to leave their plots on screen; the stats table below them
            // scrolls into view on small windows.
            let height = ui.available_height();
            // The scroll bar is always shown: one that appears when a click adds runs asks for
            // two more frames, drawn on the cores the new run starts on.
            egui::ScrollArea::vertical()
                .id_salt("runs")
                .scroll_bar_visibility(egui::scroll_area::ScrollBarVisibility::AlwaysVisible)
                .show(ui, |ui| self.runs_ui(ui, height));
        });
        if let Some(age) = self.active_run_age() {
            // the progress line's clock; nothing before the run shows live
            let wait = crate::worker::LIVE_AFTER
                .saturating_sub(age)
                .max(std::time::Duration::from_millis(100));
            ui.ctx().request_repaint_after(wait);
        }
    }

    fn upload_textures(&mut self, ctx: &egui::Context) {
        for lane in &mut self.lanes {
            if lane.texture_version == lane.run.image_version {
                continue;
            }
            lane.texture_version = lane.run.image_version;
            let img: Option<&RgbImage> = lane.run.image.as_ref().or(lane.run.preview.as_ref());
            lane.texture = img.map(|img| {
                let ci = egui::ColorImage::from_rgb([img.width, img.height], &img.pixels);
                ctx.load_texture(format!("run-{}", lane.run.job), ci, TextureOptions::NEAREST)
            });
        }
    }

    fn prompt_bar_ui(&mut self, ui: &mut egui::Ui) {
        ui.add_space(4.0);
        ui.horizontal(|ui| {
            let caption = matches!(
                &self.model,
                ModelState::Ready(i) if i.conditioning == Conditioning::Caption
            );
            let label = ui.label(if caption { "Caption" } else { "Prompt" });
            let edit = egui::TextEdit::singleline(&mut self.settings.prompt)
                .hint_text(if caption {
                    "e.g. a red apple on a wooden table"
                } else {
                    "e.g. red apple"
                })
                .desired_width(280.0);
            let mut out = edit.show(ui);
            let resp = out.response.response.clone().labelled_by(label.id);
            // A newcomer types first: the prompt has the keyboard from the first frame, with
            // the remembered (or sample) prompt selected, so that typing replaces it and Enter
            // generates it.
            if !self.prompt_focused {
                resp.request_focus();
                out.state
                    .cursor
                    .set_char_range(Some(egui::text::CCursorRange::select_all_str(
                        &self.settings.prompt,
                    )));
                out.state.store(ui.ctx(), resp.id);
                self.prompt_focused = true;
            }
            if resp.lost_focus() && ui.input(|i| i.key_pressed(Key::Enter)) {
                self.update_match();
                self.generate(false);
                // Enter takes the focus from a single-line edit: give it back, so that the
                // next Enter generates again.
                resp.request_focus();
            }
            let ready = matches!(self.model, ModelState::Ready(_));
            if ui
                .add_enabled(ready, egui::Button::new("Generate"))
                .on_hover_text("Generate (Enter in the prompt, or Ctrl+Enter)")
                .clicked()
            {
                self.generate(false);
            }
            if ui
                .add_enabled(self.is_busy(), egui::Button::new("Stop"))
                .clicked()
            {
                self.stop();
            }
            if ui
                .add_enabled(ready, egui::Button::new("Compare"))
                .on_hover_text("Run NTP and the chosen mode with the same prompt and seed")
                .clicked()
            {
                self.generate(true);
            }
            self.progress_ui(ui);
        });
        let caption = matches!(
            &self.model,
            ModelState::Ready(i) if i.conditioning == Conditioning::Caption
        );
        ui.horizontal(|ui| match (&self.settings.class_override, &self.matched) {
            _ if caption => {
                ui.weak(match &self.model {
                    ModelState::Ready(i) if i.kind == weights::ModelKind::Emu3Gen => {
                        "free-text prompt, in Emu3's template (with its positive suffix; guided against its negative prompt), encoded by the model's tokenizer"
                    }
                    ModelState::Ready(i) if i.layout == Layout::EndOfRow => {
                        "free-text prompt, in Lumina-mGPT's template, encoded by the model's tokenizer"
                    }
                    _ => "free-text caption, encoded by the model's T5",
                });
            }
            (Some(id), _) => {
                ui.label(format!("class {id} (picked)"));
            }
            (None, Some(m)) => {
                let text = format!("-> {} (class {}, {:?} match)", m.name, m.id, m.kind);
                if m.is_weak() {
                    ui.colored_label(Color32::from_rgb(220, 160, 40), text)
                        .on_hover_text("weak match: check the class picker");
                } else {
                    ui.label(text);
                }
            }
            (None, None) => {
                ui.weak("no class matched yet");
            }
        });
        ui.add_space(2.0);
    }

    fn progress_ui(&self, ui: &mut egui::Ui) {
        let Some(run) = self
            .lanes
            .iter()
            .find(|l| l.run.is_active())
            .map(|l| &l.run)
        else {
            return;
        };
        if run.passes() == 0 {
            // A still label: a spinner would ask for a frame after every frame, on the cores
            // the run is starting on.
            ui.weak(format!("{}: starting…", run.label));
            return;
        }
        let frac = run.passes_done() as f32 / run.passes() as f32;
        ui.add(
            egui::ProgressBar::new(frac)
                .desired_width(220.0)
                .text(format!(
                    "{}: {} / {} passes · {:.1} s",
                    run.label,
                    run.passes_done(),
                    run.passes(),
                    run.elapsed.as_secs_f32()
                )),
        );
        // A large model on a CPU: what the first passes took and what the run will take.
        if let Some(w) = crate::decode::engine::slow_run_warning(&run.pass_ms, run.passes()) {
            ui.colored_label(ui.visuals().warn_fg_color, format!("slow here: {w}"))
                .on_hover_text("a GPU build (--features cuda or metal) runs large models far faster; Stop cancels the run between passes");
        }
    }

    fn status_ui(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            if let Some((msg, is_err)) = &self.status {
                if *is_err {
                    ui.colored_label(ui.visuals().error_fg_color, msg);
                } else {
                    ui.label(msg);
                }
            }
        });
    }

    fn settings_ui(&mut self, ui: &mut egui::Ui) {
        ui.heading("Model");
        let name = match &self.model {
            ModelState::Ready(i) => format!("{} ({}x{} tokens)", i.name, i.grid.0, i.grid.1),
            ModelState::Loading(_) => "loading…".into(),
            ModelState::Missing(_) => "none".into(),
        };
        ui.horizontal(|ui| {
            if matches!(self.model, ModelState::Loading(_)) {
                ui.spinner();
            }
            ui.label(name);
        });
        if let (ModelState::Loading(_), Some(d)) = (&self.model, &self.loading_detail) {
            // wraps within the panel: the detail line can be long
            ui.add(egui::Label::new(egui::RichText::new(d).small().weak()).wrap());
            if let Some(p) = &self.load_progress {
                let frac = p.done as f32 / p.total.max(1) as f32;
                ui.add(egui::ProgressBar::new(frac).text(format!(
                    "{} ({} of {}), {} of {}",
                    p.file,
                    p.index + 1,
                    p.files,
                    weights::human_bytes(p.done as f64),
                    weights::human_bytes(p.total as f64)
                )));
            }
        }
        ui.horizontal(|ui| {
            if ui.button("Built-in").clicked() {
                self.settings.model_dir = None;
                self.load_model(ModelSource::Builtin);
            }
            if ui.button("Open model folder…").clicked()
                && let Some(dir) = rfd::FileDialog::new().pick_folder()
            {
                self.settings.model_dir = Some(dir.clone());
                self.load_model(ModelSource::Dir(dir));
            }
        });
        if let Some(e) = &self.model_error {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
        ui.horizontal(|ui| {
            let l = ui.label("Device");
            let before = self.settings.device.clone();
            egui::ComboBox::from_id_salt("device")
                .selected_text(self.settings.device.clone())
                .show_ui(ui, |ui| {
                    for d in weights::compiled_devices() {
                        ui.selectable_value(&mut self.settings.device, d.to_string(), d);
                    }
                })
                .response
                .labelled_by(l.id);
            if self.settings.device != before {
                let source = match &self.settings.model_dir {
                    Some(d) => ModelSource::Dir(d.clone()),
                    None => ModelSource::Builtin,
                };
                self.load_model(source);
            }
        });
        ui.separator();
        ui.heading("Decoding");
        ui.horizontal(|ui| {
            ui.label("Mode");
            ui.selectable_value(&mut self.settings.mode, Mode::Ntp, "NTP");
            ui.selectable_value(&mut self.settings.mode, Mode::Zipar, "ZipAR");
            ui.selectable_value(&mut self.settings.mode, Mode::Adaptive, "Adaptive")
                .on_hover_text("drafts verified by rejection sampling; the window is the minimum");
            ui.selectable_value(&mut self.settings.mode, Mode::Exact, "Exact").on_hover_text(
                "lossless: ZipAR's tokens are drafts, each tested once against the full-context \
                 distribution; the output has NTP's law, rejections only cost passes",
            );
        });
        let range = match &self.model {
            ModelState::Ready(i) => i.windows.clone(),
            _ => 2..=16,
        };
        ui.add_enabled(
            self.settings.mode != Mode::Ntp,
            egui::Slider::new(&mut self.settings.window, range.clone())
                .text("window")
                .clamping(egui::SliderClamping::Always),
        )
        .on_hover_text(format!(
            "tokens of the row above before a row starts ({}..={}; the full width is NTP)",
            range.start(),
            range.end()
        ));
        ui.add(egui::Slider::new(&mut self.settings.cfg, 0.0..=10.0).text("CFG scale"));
        ui.checkbox(&mut self.settings.greedy, "Greedy (most likely token)");
        ui.checkbox(&mut self.settings.mask_unwritten, "Hide unwritten slots")
            .on_hover_text(
                "attention skips cache slots no token was written to yet; the official code \
                 attends to them as zeros",
            );
        ui.checkbox(&mut self.settings.record_attention, "Record attention")
            .on_hover_text(
                "runs keep each token's attention for the Attention view: every layer's mean \
                 over heads, and the heads of the layer picked there; off, it costs nothing",
            );
        ui.add_enabled_ui(!self.settings.greedy, |ui| {
            ui.add(
                egui::Slider::new(&mut self.settings.temperature, 0.05..=3.0).text("temperature"),
            );
            ui.add(egui::Slider::new(&mut self.settings.top_k, 0..=1024).text("top-k (0 = off)"));
            ui.add(egui::Slider::new(&mut self.settings.top_p, 0.05..=1.0).text("top-p"));
        });
        if let ModelState::Ready(info) = &self.model
            && ui
                .button("Model defaults")
                .on_hover_text(model_defaults_hint(&info.defaults))
                .clicked()
        {
            self.settings.apply_defaults(&info.defaults, &info.windows);
        }
        ui.horizontal(|ui| {
            let l = ui.label("Seed");
            ui.add(egui::DragValue::new(&mut self.settings.seed))
                .labelled_by(l.id);
            if ui.button("Random").on_hover_text("random seed").clicked() {
                self.settings.seed = rand::random::<u32>() as u64;
            }
        });
        ui.separator();
        self.class_picker_ui(ui);
        ui.separator();
        ui.heading("Export");
        let folder = self.settings.export_folder();
        ui.label(format!("folder: {}", folder.display()));
        ui.horizontal_wrapped(|ui| {
            if ui.button("Change folder…").clicked()
                && let Some(dir) = rfd::FileDialog::new().set_directory(&folder).pick_folder()
            {
                self.settings.export_dir = Some(dir);
            }
            if ui.button("Export all").clicked() {
                self.export_all();
            }
            if ui.button("Save image…").on_hover_text("Ctrl+S").clicked() {
                self.save_image_dialog();
            }
            if ui.button("Save pass map…").clicked() {
                self.save_diagnostics_dialog("passes");
            }
            if ui.button("Save trace JSON…").clicked() {
                self.save_diagnostics_dialog("json");
            }
            if ui.button("Save CSV…").clicked() {
                self.save_diagnostics_dialog("csv");
            }
        });
    }

    fn class_picker_ui(&mut self, ui: &mut egui::Ui) {
        let ModelState::Ready(info) = &self.model else {
            return;
        };
        if info.conditioning == Conditioning::Caption {
            ui.heading("Text-to-image");
            ui.label("This is a text-to-image model: the prompt is its caption, as typed.");
            return;
        }
        ui.heading("Class");
        match info.classes.clone() {
            Some(classes) => {
                ui.horizontal(|ui| {
                    let l = ui.label("Search");
                    ui.text_edit_singleline(&mut self.class_filter)
                        .labelled_by(l.id);
                });
                let list: Vec<(u32, String)> = if self.class_filter.trim().is_empty() {
                    classes
                        .classes()
                        .iter()
                        .take(200)
                        .map(|c| (c.id, c.name.clone()))
                        .collect()
                } else {
                    classes
                        .ranked(&self.class_filter, 50)
                        .into_iter()
                        .map(|m| (m.id, m.name))
                        .collect()
                };
                egui::ScrollArea::vertical()
                    .max_height(180.0)
                    .id_salt("classes")
                    .show(ui, |ui| {
                        for (id, name) in list {
                            let selected = self.settings.class_override == Some(id)
                                || (self.settings.class_override.is_none()
                                    && self.matched.as_ref().map(|m| m.id) == Some(id));
                            if ui
                                .selectable_label(selected, format!("{id}: {name}"))
                                .clicked()
                            {
                                self.settings.class_override = Some(id);
                            }
                        }
                    });
            }
            None => {
                let max = info.num_classes.saturating_sub(1) as u32;
                let mut id = self.settings.class_override.unwrap_or(0);
                ui.horizontal(|ui| {
                    let l = ui.label("class id");
                    ui.add(egui::DragValue::new(&mut id).range(0..=max))
                        .labelled_by(l.id);
                });
                self.settings.class_override = Some(id);
            }
        }
    }

    fn runs_ui(&mut self, ui: &mut egui::Ui, height: f32) {
        ui.horizontal(|ui| {
            ui.label("View");
            for m in ViewMode::ALL {
                ui.selectable_value(&mut self.settings.view, m, m.label())
                    .on_hover_text(m.hint());
            }
        });
        if self.lanes.is_empty() {
            ui.add_space(20.0);
            ui.label(
                RichText::new("Type a prompt and press Enter to generate.")
                    .size(16.0)
                    .weak(),
            );
            return;
        }
        let replaying = self.replaying();
        if replaying {
            self.player_ui(ui);
        }
        let view = self.settings.view;
        if view == ViewMode::Attention {
            self.attention_pick_ui(ui);
        }
        let pick = run_view::AttentionPick {
            layer: self.settings.attention_layer,
            head: self.settings.attention_head,
        };
        let n = self.lanes.len() as f32;
        let avail = ui.available_width();
        // room for the header rows, the legend and the plots under each grid
        let exact = self.lanes.iter().any(|l| l.run.params.mode == Mode::Exact);
        let plots = if exact { 450.0 } else { 300.0 };
        let side = ((avail - 16.0 * n) / n)
            .min(height - plots)
            .clamp(160.0, 520.0);
        let shown = self.player.shown();
        let longest = self.player.longest();
        ui.horizontal_top(|ui| {
            for lane in &self.lanes {
                ui.vertical(|ui| {
                    ui.set_width(side);
                    let run = &lane.run;
                    ui.horizontal(|ui| {
                        ui.strong(format!("{} — {}", run.label, status_text(&run.status)));
                        badge_ui(ui, run);
                    });
                    let (upto, front) = lane_view(run, replaying, shown, longest);
                    let maps = (view == ViewMode::Attention).then(|| run.attention_maps(pick));
                    grid_view::grid_ui(
                        ui,
                        run,
                        view,
                        maps.as_ref(),
                        lane.texture.as_ref(),
                        upto,
                        front,
                        side,
                    );
                    grid_view::legend_ui(ui, view, run);
                    if let Some(maps) = &maps {
                        grid_view::needed_window_plot_ui(ui, run, maps, side);
                    }
                    grid_view::pass_plot_ui(ui, run, front, side);
                    grid_view::exact_plot_ui(ui, run, front, side);
                });
            }
        });
        ui.add_space(6.0);
        stats_table_ui(ui, self.lanes.iter().map(|l| &l.run));
    }

    /// The Attention view's layer and head pickers.
    fn attention_pick_ui(&mut self, ui: &mut egui::Ui) {
        let recorded = self
            .lanes
            .iter()
            .flat_map(|l| l.run.attention_of.iter().flatten())
            .next()
            .map(|a| (a.layers.len(), a.head_layer, a.heads.len()));
        let Some((layers, head_layer, heads)) = recorded else {
            return;
        };
        let name = |x: Option<usize>| x.map_or("mean".to_string(), |i| i.to_string());
        let s = &mut self.settings;
        ui.horizontal(|ui| {
            egui::ComboBox::from_label("layer")
                .selected_text(name(s.attention_layer))
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut s.attention_layer, None, "mean of the layers");
                    for l in 0..layers {
                        ui.selectable_value(&mut s.attention_layer, Some(l), l.to_string());
                    }
                });
            let heads_here = s.attention_layer == Some(head_layer);
            ui.add_enabled_ui(heads_here, |ui| {
                egui::ComboBox::from_label("head")
                    .selected_text(name(s.attention_head))
                    .show_ui(ui, |ui| {
                        ui.selectable_value(&mut s.attention_head, None, "mean of the heads");
                        for h in 0..heads {
                            ui.selectable_value(&mut s.attention_head, Some(h), h.to_string());
                        }
                    });
            })
            .response
            .on_disabled_hover_text(format!(
                "heads are recorded for layer {head_layer}: pick it, or pick a layer and \
                 generate again"
            ));
        });
        if s.attention_layer != Some(head_layer) {
            s.attention_head = None;
        }
    }

    /// Whether the runs on screen are finished and the player drives what they show.
    fn replaying(&self) -> bool {
        !self.lanes.is_empty()
            && self.lanes.iter().all(|l| l.run.status == RunStatus::Done)
            && self.player.longest() > 1
    }

    /// Per run on screen: the passes shown and the pass outlined as the front, as drawn.
    pub fn shown_passes(&self) -> Vec<(usize, Option<usize>)> {
        let replaying = self.replaying();
        self.lanes
            .iter()
            .map(|l| {
                let (upto, front) = lane_view(
                    &l.run,
                    replaying,
                    self.player.shown(),
                    self.player.longest(),
                );
                (upto.min(l.run.passes()), front)
            })
            .collect()
    }

    /// Play / pause, step, position, speed and loop for the runs on screen.
    fn player_ui(&mut self, ui: &mut egui::Ui) {
        let dt = ui.input(|i| i.stable_dt) as f64;
        if self.player.advance(dt) {
            ui.ctx().request_repaint();
        }
        // Space toggles play unless a text field has the keyboard (the prompt keeps it after
        // Enter so that Enter generates again; Esc leaves it).
        let no_focus = ui.ctx().memory(|m| m.focused().is_none());
        if no_focus && ui.input_mut(|i| i.consume_key(Modifiers::NONE, Key::Space)) {
            self.player.toggle();
        }
        let before = self.player.clone();
        let p = &mut self.player;
        ui.horizontal(|ui| {
            if ui
                .button("Step back")
                .on_hover_text("one pass back")
                .clicked()
            {
                p.step(-1);
            }
            let label = if p.playing { "Pause" } else { "Play" };
            if ui
                .button(label)
                .on_hover_text(
                    "replay the passes at the speed set here (Space, once Esc has left the prompt)",
                )
                .clicked()
            {
                p.toggle();
            }
            if ui
                .button("Step forward")
                .on_hover_text("one pass forward")
                .clicked()
            {
                p.step(1);
            }
            let mut at = p.shown();
            let longest = p.longest();
            if ui
                .add(egui::Slider::new(&mut at, 0..=longest).text("passes shown"))
                .changed()
            {
                p.seek(at);
            }
            let mut speed = p.passes_per_s();
            let l = ui.label("passes/s");
            if ui
                .add(
                    egui::DragValue::new(&mut speed)
                        .range(player::MIN_SPEED..=2000.0)
                        .speed(0.5)
                        .max_decimals(1),
                )
                .labelled_by(l.id)
                .on_hover_text("replay speed; both runs of a Compare advance at this rate")
                .changed()
            {
                p.speed = Some(speed);
            }
            if p.speed.is_some()
                && ui
                    .small_button("auto")
                    .on_hover_text(format!(
                        "back to the default: the longest run lasts {:.0} s",
                        player::DEFAULT_REPLAY_S
                    ))
                    .clicked()
            {
                p.speed = None;
            }
            ui.checkbox(&mut p.looping, "Loop");
        });
        if self.player != before {
            // a click starts playback at once, not at the next input event
            ui.ctx().request_repaint();
        }
    }
}

/// What one run shows: the passes `< upto`, with pass `front` outlined. While replaying, every
/// run follows the player's one position (a shorter run is complete once it is passed); while
/// running, the newest pass is the front.
fn lane_view(
    run: &RunView,
    replaying: bool,
    shown: usize,
    longest: usize,
) -> (usize, Option<usize>) {
    if replaying {
        let inside = shown > 0 && shown < longest && shown <= run.passes();
        (shown, inside.then(|| shown - 1))
    } else if run.is_active() {
        (usize::MAX, run.passes_done().checked_sub(1))
    } else {
        (usize::MAX, None)
    }
}

/// "lossless" for a run whose output has NTP's law, "lossy" for ZipAR's.
fn badge_ui(ui: &mut egui::Ui, run: &RunView) {
    let (text, fill, hover) = if run.is_lossless() {
        (
            "lossless",
            egui::Color32::from_rgb(40, 130, 70),
            "the image has exactly the law of next-token decoding",
        )
    } else {
        (
            "lossy",
            egui::Color32::from_rgb(150, 110, 40),
            "tokens drawn with part of their context: the law differs from next-token decoding",
        )
    };
    ui.label(
        RichText::new(text)
            .small()
            .color(egui::Color32::WHITE)
            .background_color(fill),
    )
    .on_hover_text(hover);
}

/// The runs on screen side by side (egui_extras table): passes, decode and wall time,
/// throughput, and the speed-up over the NTP run of a Compare pair.
fn stats_table_ui<'a>(ui: &mut egui::Ui, runs: impl Iterator<Item = &'a RunView>) {
    use egui_extras::{Column, TableBuilder};
    let runs: Vec<&RunView> = runs.collect();
    let ntp_ms = runs
        .iter()
        .find(|r| r.params.mode == Mode::Ntp && r.status == RunStatus::Done)
        .map(|r| r.decode_ms());
    TableBuilder::new(ui)
        .id_salt("stats")
        .striped(true)
        .column(Column::auto().at_least(110.0))
        .column(Column::auto().at_least(190.0))
        .columns(Column::auto().at_least(80.0), 5)
        .header(18.0, |mut row| {
            for title in [
                "run", "passes", "decode", "wall", "tokens/s", "vs NTP", "drafts",
            ] {
                row.col(|ui| {
                    ui.strong(title);
                });
            }
        })
        .body(|mut body| {
            for run in runs {
                body.row(18.0, |mut row| {
                    let ntp = run.grid.0 * run.grid.1;
                    let passes = if run.status == RunStatus::Done {
                        run.passes_done()
                    } else {
                        run.passes()
                    };
                    let reduction = if ntp > 0 {
                        100.0 * (1.0 - passes as f64 / ntp as f64)
                    } else {
                        0.0
                    };
                    row.col(|ui| {
                        ui.label(&run.label);
                    });
                    row.col(|ui| {
                        ui.label(format!("{passes} vs {ntp} NTP ({reduction:.0}% fewer)"));
                    });
                    row.col(|ui| {
                        ui.label(format!("{:.0} ms", run.decode_ms()))
                            .on_hover_text(
                                "the forward passes and sampling, as the CLI measures them",
                            );
                    });
                    row.col(|ui| {
                        ui.label(format!("{:.0} ms", run.elapsed.as_secs_f64() * 1e3))
                            .on_hover_text(
                                "from the request to the final image, as you waited for it",
                            );
                    });
                    row.col(|ui| {
                        ui.label(format!("{:.0}", run.tokens_per_s()));
                    });
                    row.col(|ui| match ntp_ms {
                        Some(t) if run.status == RunStatus::Done && run.decode_ms() > 0.0 => {
                            ui.label(format!("{:.2}x", t / run.decode_ms()))
                                .on_hover_text("decode-time speed-up over the NTP run");
                        }
                        _ => {
                            ui.weak("–");
                        }
                    });
                    row.col(|ui| match run.drafts() {
                        Some((ok, n)) if n > 0 => {
                            ui.label(format!(
                                "{ok} of {n} accepted ({:.0}%)",
                                100.0 * ok as f64 / n as f64
                            ))
                            .on_hover_text(
                                "exact mode: drafts that passed their test against the \
                                 full-context distribution",
                            );
                        }
                        _ => {
                            ui.weak("–");
                        }
                    });
                });
            }
        });
}

fn status_text(s: &RunStatus) -> String {
    match s {
        RunStatus::Queued => "queued".into(),
        RunStatus::Running => "running".into(),
        RunStatus::Done => "done".into(),
        RunStatus::Cancelled => "stopped".into(),
        RunStatus::Failed(e) => format!("failed: {e}"),
    }
}

impl eframe::App for StudioApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        StudioApp::ui(self, ui);
    }

    /// The panels' colour: they draw no background of their own (see [`StudioApp::ui`]).
    fn clear_color(&self, visuals: &egui::Visuals) -> [f32; 4] {
        visuals.panel_fill.to_normalized_gamma_f32()
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, eframe::APP_KEY, &self.settings);
    }
}

/// Opens the app window, optionally on a given model folder.
pub fn run_app(model: Option<PathBuf>) -> anyhow::Result<()> {
    let mut viewport = egui::ViewportBuilder::default();
    // The same staircase icon the desktop files use; a bad icon is not worth failing over.
    if let Ok(icon) = eframe::icon_data::from_png_bytes(include_bytes!("../../assets/icon-64.png"))
    {
        viewport = viewport.with_icon(std::sync::Arc::new(icon));
    }
    let options = eframe::NativeOptions {
        viewport: viewport
            .with_title("ZipAR Studio")
            .with_app_id("io.github.zipar_studio.ZiparStudio")
            .with_inner_size([1180.0, 760.0])
            .with_min_inner_size([720.0, 480.0]),
        // egui's dithering adds noise in the fragment shader against banding in gradients,
        // which this UI hardly has; on a software renderer it costs a sixth of every frame
        // (CPU per idle frame, app and X server, under Xvfb: 10.4 ms without, 12.5 ms with).
        dithering: false,
        ..Default::default()
    };
    eframe::run_native(
        "ZipAR Studio",
        options,
        Box::new(move |cc| Ok(Box::new(StudioApp::from_creation(cc, model)))),
    )
    .map_err(|e| anyhow::anyhow!("cannot open the window: {e}"))
}

/// Where the app keeps files other than its settings.
pub fn data_dir() -> Option<PathBuf> {
    directories::ProjectDirs::from("io.github", "zipar_studio", "ZiparStudio")
        .map(|d| d.data_dir().to_path_buf())
}

/// Tooltip of the "Model defaults" button.
fn model_defaults_hint(d: &weights::SamplingDefaults) -> String {
    let r = d.resolve();
    let from = if d.is_empty() {
        "the app's defaults (the model recommends none)"
    } else {
        "the model's recommended settings"
    };
    format!(
        "reset window, CFG and sampling to {from}: window {}, CFG {}, temperature {}, top-k {}, top-p {}, hide unwritten slots {}",
        r.window, r.cfg, r.temperature, r.top_k, r.top_p, r.mask_unwritten
    )
}
