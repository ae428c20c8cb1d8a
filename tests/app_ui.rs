//! The real app driven through AccessKit with egui_kittest (no display, no GPU): type a
//! prompt, press Generate, let the worker finish, check the stats and the exports.

mod common;

use std::time::{Duration, Instant};

use common::fixture;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use zipar_studio::app::StudioApp;
use zipar_studio::app::run_view::RunStatus;
use zipar_studio::app::settings::Settings;
use zipar_studio::decode::Mode;

fn harness(settings: Settings) -> Harness<'static, StudioApp> {
    Harness::builder()
        .with_size([1200.0, 800.0])
        .build_ui_state(
            |ui, app: &mut StudioApp| app.ui(ui),
            StudioApp::new(settings),
        )
}

/// Steps the UI until `done` holds (the worker runs on its own thread meanwhile).
fn step_until(h: &mut Harness<'_, StudioApp>, what: &str, done: impl Fn(&StudioApp) -> bool) {
    let start = Instant::now();
    // Step first: pending clicks are only applied by a frame.
    h.step();
    while !done(h.state()) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}; status: {:?}",
            h.state().status
        );
        std::thread::sleep(Duration::from_millis(5));
        h.step();
    }
    h.step();
}

fn type_prompt(h: &mut Harness<'_, StudioApp>, text: &str) {
    h.get_by_label("Prompt").click();
    h.step();
    h.get_by_label("Prompt").type_text(text);
    h.step();
    h.step();
}

fn settings(export: &std::path::Path) -> Settings {
    Settings {
        prompt: String::new(),
        model_dir: Some(fixture("tiny")),
        export_dir: Some(export.to_path_buf()),
        mode: Mode::Zipar,
        window: 3,
        greedy: true,
        // a returning user: the settings above are kept, not replaced by the model's
        defaults_applied_for: Some(fixture("tiny")),
        ..Settings::default()
    }
}

/// A copy of the tiny model in a temporary folder, its `config.json` changed by `edit`.
fn tiny_copy(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let model = tempfile::tempdir().expect("tempdir");
    for f in [
        "config.json",
        "gpt.safetensors",
        "vq.safetensors",
        "classes.json",
    ] {
        std::fs::copy(fixture("tiny").join(f), model.path().join(f)).expect("copy");
    }
    let path = model.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("config")).expect("json");
    edit(&mut cfg);
    std::fs::write(&path, cfg.to_string()).expect("write");
    model
}

fn model_ready(app: &StudioApp) -> bool {
    matches!(app.model, zipar_studio::app::ModelState::Ready(_))
}

fn finished(app: &StudioApp) -> bool {
    let runs: Vec<_> = app.runs().collect();
    !runs.is_empty() && runs.iter().all(|r| !r.is_active())
}

#[test]
fn type_prompt_generate_and_export() {
    let out = tempfile::tempdir().expect("tempdir");
    let mut h = harness(settings(out.path()));
    step_until(&mut h, "the model", model_ready);

    type_prompt(&mut h, "green apple");
    assert_eq!(h.state().matched.as_ref().map(|m| m.id), Some(1));
    h.get_by_label("Generate").click();
    step_until(&mut h, "the run", finished);

    let run = h.state().runs().next().expect("a run").clone();
    assert_eq!(run.status, RunStatus::Done);
    // 2w + (h-2)s on the 5 x 6 grid with s = 3
    assert_eq!(run.passes_done(), 21);
    assert!(run.tokens.iter().all(|t| t.is_some()));
    assert!(run.image.is_some());
    // The stats panel shows the pass count against NTP.
    h.get_by_label("21 vs 30 NTP (30% fewer)");

    h.get_by_label("Export all").click();
    h.step();
    let files: Vec<_> = std::fs::read_dir(out.path())
        .expect("export folder")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(files.len(), 4, "{files:?}");
    for f in &files {
        match f.extension().and_then(|e| e.to_str()) {
            Some("png") => {
                image::open(f).expect("valid png");
            }
            Some("json") => {
                let v: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(f).expect("read"))
                        .expect("valid json");
                assert_eq!(v["passes"], 21);
                assert_eq!(v["tokens"].as_array().expect("tokens").len(), 30);
            }
            Some("csv") => {
                let text = std::fs::read_to_string(f).expect("read");
                assert_eq!(text.lines().count(), 31);
                assert!(text.starts_with(
                    "row,col,token,pass,window,rejections,prob,fate,draft_pass,accept_prob,retained_mass,needed_window"
                ));
            }
            other => panic!("unexpected file {other:?}"),
        }
    }
}

#[test]
fn enter_in_the_prompt_generates_and_compare_runs_both_modes() {
    let out = tempfile::tempdir().expect("tempdir");
    let mut h = harness(settings(out.path()));
    step_until(&mut h, "the model", model_ready);
    type_prompt(&mut h, "cat");
    h.key_press(egui::Key::Enter);
    step_until(&mut h, "the run", finished);
    assert_eq!(h.state().runs().count(), 1);
    assert_eq!(h.state().runs().next().map(|r| r.passes_done()), Some(21));

    h.get_by_label("Compare").click();
    step_until(&mut h, "both runs", finished);
    let runs: Vec<_> = h.state().runs().cloned().collect();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].passes_done(), 30);
    assert_eq!(runs[1].passes_done(), 21);
    // Same prompt and seed: both are greedy here, so the grids differ only by schedule.
    assert_eq!(runs[0].params.seed, runs[1].params.seed);
}

#[test]
fn a_bad_model_folder_shows_an_error_and_the_app_stays_usable() {
    let out = tempfile::tempdir().expect("tempdir");
    let mut s = settings(out.path());
    s.model_dir = Some(out.path().join("nope"));
    let mut h = harness(s);
    step_until(&mut h, "the error", |a| a.model_error.is_some());
    let err = h.state().model_error.clone().expect("error");
    assert!(err.contains("is not a model folder"), "{err}");
    // Generate is refused with a message, not a panic.
    h.state_mut().generate(false);
    h.step();
    assert_eq!(h.state().runs().count(), 0);
    assert!(h.state().status.as_ref().is_some_and(|(_, is_err)| *is_err));
    // Switching to a good model works.
    h.state_mut().settings.model_dir = Some(fixture("tiny"));
    h.state_mut()
        .load_model(zipar_studio::worker::ModelSource::Dir(fixture("tiny")));
    step_until(&mut h, "the model", model_ready);
}

#[test]
fn stop_cancels_a_running_job() {
    // The tiny model on a 48 x 48 grid (RoPE and the cache follow the grid; the weights do
    // not): its 30-pass run could end before `stop` was called when the test thread lost its
    // core, 2,304 passes cannot.
    let model = tiny_copy(|cfg| {
        cfg["grid_h"] = 48.into();
        cfg["grid_w"] = 48.into();
    });
    let out = tempfile::tempdir().expect("tempdir");
    let mut s = settings(out.path());
    s.model_dir = Some(model.path().to_path_buf());
    s.defaults_applied_for = Some(model.path().to_path_buf());
    s.prompt = "dog".into();
    s.mode = Mode::Ntp;
    let mut h = harness(s);
    step_until(&mut h, "the model", model_ready);
    h.step();
    h.state_mut().generate(false);
    h.state_mut().stop();
    step_until(&mut h, "the stop", finished);
    let run = h.state().runs().next().cloned().expect("run");
    assert_eq!(run.status, RunStatus::Cancelled);
    assert!(run.passes_done() < 30);
}

#[test]
fn a_model_loaded_for_the_first_time_brings_its_recommended_settings() {
    let model = tiny_copy(|cfg| {
        cfg["defaults"] = serde_json::json!({"cfg": 1.5, "top_k": 7, "window": 5});
    });

    let out = tempfile::tempdir().expect("tempdir");
    let mut s = settings(out.path());
    s.model_dir = Some(model.path().to_path_buf());
    s.defaults_applied_for = None;
    s.cfg = 6.0;
    let mut h = harness(s);
    step_until(&mut h, "the model", model_ready);
    let got = &h.state().settings;
    assert_eq!(
        (got.cfg, got.top_k, got.window, got.greedy),
        (1.5, 7, 5, false)
    );
    assert_eq!(got.defaults_applied_for.as_deref(), Some(model.path()));

    // What the user sets afterwards survives a reload of the same model...
    h.state_mut().settings.cfg = 4.0;
    h.state_mut()
        .load_model(zipar_studio::worker::ModelSource::Dir(
            model.path().to_path_buf(),
        ));
    step_until(&mut h, "the reload", model_ready);
    assert_eq!(h.state().settings.cfg, 4.0);
    // ...and the "Model defaults" button brings the recommendations back.
    h.get_by_label("Model defaults").click();
    h.step();
    assert_eq!(h.state().settings.cfg, 1.5);
}

#[test]
fn an_adaptive_run_with_rejections_shows_its_actual_pass_count_everywhere() {
    // Hot sampling on the tiny model makes drafts disagree with their verification, so some
    // are rejected and the run takes more passes than the fixed s_min plan.
    let out = tempfile::tempdir().expect("tempdir");
    let mut s = settings(out.path());
    s.mode = Mode::Adaptive;
    s.window = 2;
    s.greedy = false;
    s.temperature = 3.0;
    let mut h = harness(s);
    step_until(&mut h, "the model", model_ready);
    type_prompt(&mut h, "cat");
    let mut found = false;
    for seed in 0..30 {
        h.state_mut().settings.seed = seed;
        h.state_mut().generate(false);
        step_until(&mut h, "the run", finished);
        let run = h.state().runs().next().cloned().expect("a run");
        let trace = run.trace.as_ref().expect("a finished run has a trace");
        if trace.passes <= run.planned_passes {
            continue;
        }
        found = true;
        assert!(trace.rejections_of.iter().any(|&r| r > 0));
        // One number for every view: the stats, the replay range, the pass legend.
        assert_eq!(run.passes(), trace.passes);
        assert_eq!(run.passes_done(), trace.passes);
        let last = trace.pass_of.iter().copied().max().expect("cells");
        assert_eq!(
            last + 1,
            run.passes(),
            "the last cell's pass is inside the range"
        );
        assert!(
            run.pass_of
                .iter()
                .all(|p| p.is_some_and(|p| p < run.passes()))
        );
        // The replay range ends at the actual count, and its end shows every cell.
        assert_eq!(h.state().player.longest(), trace.passes);
        assert_eq!(h.state().shown_passes(), vec![(trace.passes, None)]);
        let label = format!("{} vs 30 NTP", trace.passes);
        assert!(
            h.query_by_label_contains(&label).is_some(),
            "the stats show the actual count ({label})"
        );
        break;
    }
    assert!(found, "no seed produced a rejection that cost a pass");
}

#[test]
fn the_prompt_has_the_keyboard_at_start_and_enter_generates_again_and_again() {
    let out = tempfile::tempdir().expect("tempdir");
    // The prompt the app starts with (the sample, or the last one) is selected: typing
    // replaces it.
    let mut s = settings(out.path());
    s.prompt = "red apple".into();
    let mut h = harness(s);
    step_until(&mut h, "the model", model_ready);
    // No click: keys go wherever the focus is, as for a newcomer typing straight away.
    h.event(egui::Event::Text("cat".into()));
    h.step();
    h.step();
    assert_eq!(
        h.state().settings.prompt,
        "cat",
        "the typed text replaced the selected prompt"
    );
    h.key_press(egui::Key::Enter);
    step_until(&mut h, "the first run", finished);
    let first = h.state().runs().next().map(|r| r.job);
    assert!(first.is_some(), "Enter in a fresh app generates");
    h.key_press(egui::Key::Enter);
    step_until(&mut h, "the second run", finished);
    let second = h.state().runs().next().map(|r| r.job);
    assert!(
        second > first,
        "a second Enter generates again: {first:?} -> {second:?}"
    );
}

#[test]
fn the_replay_plays_steps_and_keeps_a_compare_pair_in_sync() {
    let out = tempfile::tempdir().expect("tempdir");
    let mut h = harness(settings(out.path()));
    step_until(&mut h, "the model", model_ready);
    type_prompt(&mut h, "cat");
    h.get_by_label("Compare").click();
    step_until(&mut h, "both runs", finished);
    // NTP: 30 passes, ZipAR s=3: 21. The finished pair is shown complete.
    assert_eq!(h.state().player.longest(), 30);
    assert_eq!(h.state().shown_passes(), vec![(30, None), (21, None)]);

    // Play starts over and advances with the frames (kittest: 0.25 s a frame; the default
    // speed plays the longest run in 5 s, 6 passes a second).
    h.get_by_label("Play").click();
    h.step();
    assert!(h.state().player.playing);
    let mut seen = vec![h.state().player.shown()];
    for _ in 0..8 {
        h.step();
        let now = h.state().shown_passes();
        let at = h.state().player.shown();
        // in sync: both runs show the same pass count (the shorter clamps at its end), and
        // the front is the pass just shown
        assert_eq!(now[0].0, at);
        assert_eq!(now[1].0, at.min(21));
        if at > 0 {
            assert_eq!(now[0].1, Some(at - 1));
            // ZipAR's front is the same pass while the position is inside its 21 passes
            assert_eq!(now[1].1, (at <= 21).then(|| at - 1));
        }
        seen.push(at);
    }
    assert!(seen.windows(2).all(|w| w[1] >= w[0]), "{seen:?}");
    assert!(seen[seen.len() - 1] >= seen[0] + 8, "{seen:?}");
    assert!(seen[0] <= 2, "play started over: {seen:?}");

    h.get_by_label("Pause").click();
    h.step();
    let paused = h.state().player.shown();
    h.step();
    h.step();
    assert_eq!(h.state().player.shown(), paused, "paused");

    h.get_by_label("Step back").click();
    h.step();
    assert_eq!(h.state().player.shown(), paused - 1);
    h.get_by_label("Step forward").click();
    h.step();
    h.get_by_label("Step forward").click();
    h.step();
    assert_eq!(h.state().player.shown(), paused + 1);

    // Past the ZipAR run's end, it is complete while NTP still decodes.
    h.state_mut().player.seek(25);
    h.step();
    assert_eq!(h.state().shown_passes(), vec![(25, Some(24)), (21, None)]);
    // Played to the end without Loop, it stops there.
    h.get_by_label("Play").click();
    for _ in 0..30 {
        h.step();
    }
    assert!(!h.state().player.playing);
    assert_eq!(h.state().player.shown(), 30);

    // Space plays once Esc has taken the keyboard from the prompt (in the prompt it types).
    h.get_by_label("Prompt").click();
    h.step();
    h.key_press(egui::Key::Escape);
    h.step();
    h.key_press(egui::Key::Space);
    h.step();
    assert!(h.state().player.playing, "Space toggles play");
    assert_eq!(h.state().settings.prompt, "cat", "the prompt got no space");
    h.key_press(egui::Key::Space);
    h.step();
    assert!(!h.state().player.playing, "Space pauses");
}

#[test]
fn an_exact_compare_shows_fates_badges_and_draft_acceptance() {
    let out = tempfile::tempdir().expect("tempdir");
    let mut s = settings(out.path());
    s.mode = Mode::Exact;
    s.window = 2;
    s.greedy = false;
    s.view = zipar_studio::app::settings::ViewMode::Fate;
    let mut h = harness(s);
    step_until(&mut h, "the model", model_ready);
    type_prompt(&mut h, "cat");
    h.get_by_label("Compare").click();
    step_until(&mut h, "both runs", finished);
    let runs: Vec<_> = h.state().runs().cloned().collect();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].params.mode, Mode::Ntp);
    let exact = &runs[1];
    assert_eq!(exact.params.mode, Mode::Exact);
    let rec = exact
        .trace
        .as_ref()
        .and_then(|t| t.exact.as_ref())
        .expect("an exact run records its fates");
    // Every cell has a fate, live and final alike, and the drafts were tested.
    assert!(exact.fate_of.iter().all(Option::is_some));
    let (ok, tested) = exact.drafts().expect("drafts");
    assert!(tested > 0 && ok <= tested);
    assert_eq!(
        rec.fate_of
            .iter()
            .filter(|f| **f != zipar_studio::decode::exact::Fate::Plain)
            .count(),
        tested,
        "each draft is tested once, and each tested draft is an accepted or a residual cell"
    );
    assert!(exact.passes() < 30, "drafts saved passes on the 5x6 grid");
    // Both runs have NTP's law: two lossless badges, no lossy one.
    assert_eq!(h.query_all_by_label("lossless").count(), 2);
    assert!(h.query_by_label("lossy").is_none());
    // The fate legend counts the exact run's cells, and says NTP has none.
    let accepted = exact
        .fate_of
        .iter()
        .filter(|f| **f == Some(zipar_studio::decode::exact::Fate::Accepted))
        .count();
    assert_eq!(accepted, ok);
    assert!(h.query_by_label(&format!("accepted {accepted}")).is_some());
    assert!(
        h.query_by_label("fates exist in the exact mode only")
            .is_some()
    );
    let summary = format!("{ok} of {tested} accepted");
    assert!(
        h.query_by_label_contains(&summary).is_some(),
        "the stats table shows {summary}"
    );
}

#[test]
fn recorded_attention_shows_where_a_hovered_token_looked() {
    let out = tempfile::tempdir().expect("tempdir");
    let mut s = settings(out.path());
    s.record_attention = true;
    s.view = zipar_studio::app::settings::ViewMode::Attention;
    let mut h = harness(s);
    step_until(&mut h, "the model", model_ready);
    type_prompt(&mut h, "cat");
    h.key_press(egui::Key::Enter);
    step_until(&mut h, "the run", finished);
    let run = h.state().runs().next().cloned().expect("a run");
    // Every token's attention arrived with its pass, over the condition and earlier cells.
    assert!(run.attention_of.iter().all(Option::is_some));
    assert_eq!(run.cond_len, 1);
    let trace = run.trace.as_ref().expect("trace");
    assert_eq!(trace.retained_mass_of.len(), 30);
    for i in 0..30 {
        let m = run.retained_mass(i, None, None).expect("retained mass");
        assert!((0.0..=1.0001).contains(&m));
        assert!((m - trace.retained_mass_of[i]).abs() < 1e-4, "cell {i}");
    }
    // ZipAR-3 decodes some tokens with part of the row above missing: less than all.
    assert!(trace.retained_mass_of.iter().any(|&m| m < 0.999));
    // Hovering the grid shows the hovered token's share.
    h.get_by_label(&format!("{} grid", run.label)).hover();
    for _ in 0..6 {
        h.step();
    }
    assert!(
        h.query_by_label_contains("of its attention on what was written then")
            .is_some(),
        "the tooltip shows the retained mass"
    );
    // One layer, one head: another view of the same tokens (layer 0's heads were recorded).
    let head: Vec<f32> = (0..30)
        .filter_map(|i| run.retained_mass(i, Some(0), Some(1)))
        .collect();
    assert_eq!(head.len(), 30);
    assert!(
        head.iter()
            .zip(&trace.retained_mass_of)
            .any(|(a, b)| (a - b).abs() > 1e-3)
    );
    assert!(
        h.query_by_label("layer").is_some(),
        "the layer picker shows"
    );
    // Compare: the NTP run's tokens saw everything; the view shows the windows they need.
    h.get_by_label("Compare").click();
    step_until(&mut h, "both runs", finished);
    let ntp = h.state().runs().next().cloned().expect("the NTP run");
    let needed: Vec<usize> = (6..30)
        .filter_map(|i| ntp.needed_window(i, None, None, 0.95))
        .collect();
    assert_eq!(needed.len(), 24);
    assert!(needed.iter().all(|&s| (1..=6).contains(&s)));
    assert!(
        h.query_by_label_contains("90% of tokens need at most")
            .is_some(),
        "the needed-window histogram renders"
    );
    assert_eq!(
        ntp.trace.as_ref().map(|t| t.needed_window_of.len()),
        Some(30),
        "the trace exports the needed windows"
    );
    // Off: nothing recorded, and the view says how to turn it on.
    h.state_mut().settings.record_attention = false;
    h.state_mut().generate(false);
    step_until(&mut h, "the second run", finished);
    let run = h.state().runs().next().cloned().expect("a run");
    assert!(run.attention_of.iter().all(Option::is_none));
    assert!(
        run.trace
            .as_ref()
            .is_some_and(|t| t.retained_mass_of.is_empty())
    );
    assert!(h.query_by_label_contains("no attention recorded").is_some());
}

/// A text-to-image model folder: the prompt becomes a caption box, the class picker gives way
/// to a note, the load reports every weight file (the T5 shards too), and a typed caption
/// generates through the model's T5 with ZipAR.
#[test]
fn a_text_to_image_model_takes_a_free_text_caption() {
    let out = tempfile::tempdir().expect("tempdir");
    let mut h = harness(settings(out.path()));
    step_until(&mut h, "the model", model_ready);
    assert!(h.query_by_label("Prompt").is_some());
    let t2i = fixture("tiny_t2i_text");
    h.state_mut().settings.model_dir = Some(t2i.clone());
    h.state_mut()
        .load_model(zipar_studio::worker::ModelSource::Dir(t2i));
    step_until(&mut h, "the t2i model", model_ready);
    let p = h.state().load_progress.clone().expect("load progress");
    assert_eq!((p.index, p.files), (6, 7), "gpt, vq and 5 T5 shards: {p:?}");
    assert!(p.file.starts_with("t5/model-00005"), "{p:?}");
    assert!(h.query_by_label("Prompt").is_none());
    h.get_by_label("Caption").click();
    h.step();
    h.get_by_label("Caption")
        .type_text("a red apple on a wooden table");
    h.step();
    h.state_mut().settings.mode = Mode::Zipar;
    h.state_mut().settings.window = 3;
    h.key_press(egui::Key::Enter);
    step_until(&mut h, "the run", finished);
    let run = h.state().runs().next().cloned().expect("a run");
    assert_eq!(run.status, RunStatus::Done, "{:?}", h.state().status);
    assert_eq!(run.passes_done(), 24);
    // The wall time is the worker's: it covers the decoding (the T5 pass included).
    let wall_ms = run.elapsed.as_secs_f64() * 1e3;
    assert!(
        wall_ms >= run.decode_ms(),
        "wall {wall_ms} < decode {}",
        run.decode_ms()
    );
    assert!(h.query_by_label_contains("free-text caption").is_some());
    // An empty caption is refused with a message.
    h.state_mut().settings.prompt.clear();
    h.state_mut().generate(false);
    h.step();
    let (msg, is_err) = h.state().status.clone().expect("status");
    assert!(is_err && msg.contains("type a caption"), "{msg}");
}

#[test]
fn a_lumina_folder_decodes_with_its_end_of_row_column() {
    // Lumina-mGPT's folder layout (tests/fixtures/tiny_chameleon): open it, type a prompt,
    // generate with ZipAR-3; the pass map gets a column for the end-of-row tokens.
    let out = tempfile::tempdir().expect("tempdir");
    let mut h = harness(settings(out.path()));
    step_until(&mut h, "the model", model_ready);
    let dir = fixture("tiny_chameleon");
    h.state_mut().settings.model_dir = Some(dir.clone());
    h.state_mut()
        .load_model(zipar_studio::worker::ModelSource::Dir(dir));
    step_until(&mut h, "the Lumina model", model_ready);
    h.get_by_label("Caption").click();
    h.step();
    h.get_by_label("Caption").type_text("a red apple");
    h.step();
    assert!(
        h.query_by_label_contains("Lumina-mGPT's template")
            .is_some()
    );
    h.state_mut().settings.mode = Mode::Zipar;
    h.state_mut().settings.window = 3;
    h.state_mut().settings.greedy = true;
    h.key_press(egui::Key::Enter);
    step_until(&mut h, "the run", finished);
    let run = h.state().runs().next().cloned().expect("a run");
    assert_eq!(run.status, RunStatus::Done, "{:?}", h.state().status);
    // w + (h - 1)(s - 1) = 4 + 3 * 2 passes on the 4 x 4 grid
    assert_eq!(run.passes_done(), 10);
    assert!(run.end_of_row);
    // rows 0..2 end with a token fed with the next row's first; the last row's is never fed
    let fed: Vec<Option<usize>> = (0..4).map(|r| run.end_of_row_pass(r)).collect();
    assert!(
        fed[..3].iter().all(Option::is_some) && fed[3].is_none(),
        "{fed:?}"
    );
    h.step();
    assert!(
        h.query_by_label("ZipAR s=3 grid with an end-of-row column")
            .is_some()
    );
}

#[test]
fn an_emu3_folder_decodes_with_its_end_of_row_column() {
    // Emu3-Gen's folder as transformers saves it (tests/fixtures/tiny_emu3): open it, type a
    // prompt, generate with ZipAR-2 under guidance; the pass map gets the end-of-row column.
    let out = tempfile::tempdir().expect("tempdir");
    let mut h = harness(settings(out.path()));
    step_until(&mut h, "the model", model_ready);
    let dir = fixture("tiny_emu3");
    h.state_mut().settings.model_dir = Some(dir.clone());
    h.state_mut()
        .load_model(zipar_studio::worker::ModelSource::Dir(dir));
    step_until(&mut h, "the Emu3 model", model_ready);
    h.get_by_label("Caption").click();
    h.step();
    h.get_by_label("Caption").type_text("a red apple");
    h.step();
    assert!(h.query_by_label_contains("Emu3's template").is_some());
    h.state_mut().settings.mode = Mode::Zipar;
    h.state_mut().settings.window = 2;
    h.state_mut().settings.greedy = true;
    h.state_mut().settings.cfg = 3.0;
    h.key_press(egui::Key::Enter);
    step_until(&mut h, "the run", finished);
    let run = h.state().runs().next().cloned().expect("a run");
    assert_eq!(run.status, RunStatus::Done, "{:?}", h.state().status);
    // w + (h - 1)(s - 1) = 4 + 2 * 1 passes on the 3 x 4 grid
    assert_eq!(run.passes_done(), 6);
    assert!(run.end_of_row);
    let r = common::reference("tiny_emu3");
    let want = r["generate"]["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .find(|x| x["cfg"] == 3.0 && x["window"] == 2)
        .map(|x| common::u32s(&x["codes"]))
        .expect("the reference run");
    let got: Vec<u32> = run.tokens.iter().map(|t| t.expect("written")).collect();
    assert_eq!(got, want);
    h.step();
    assert!(
        h.query_by_label("ZipAR s=2 grid with an end-of-row column")
            .is_some()
    );
}
