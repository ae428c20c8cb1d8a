//! Emu3-Gen against `transformers` on a tiny random `Emu3ForConditionalGeneration`
//! (training/make_emu3_fixture.py, tests/fixtures/tiny_emu3): the language model's logits, the
//! MoVQ decoder's pixels, the generation template, and greedy next-token and ZipAR decoding at
//! CFG 1 and 3, through the library and the binary.

mod common;

use candle_core::{DType, Device};
use common::{f32s, fixture, max_abs_diff, reference, u32s};
use zipar_studio::decode::{Flow, GenerateParams, Mode, Sampling, generate};
use zipar_studio::model::Condition;
use zipar_studio::model::emu3::{Emu3Config, Emu3Settings, Emu3Template};
use zipar_studio::model::end_of_row::TextPrompt;
use zipar_studio::model::llamagen::Gpt;
use zipar_studio::model::movq::MovqDecoder;
use zipar_studio::model::registry;

fn weights() -> candle_nn::VarBuilder<'static> {
    zipar_studio::weights::var_builder(
        &fixture("tiny_emu3").join("model.safetensors"),
        DType::F32,
        &Device::Cpu,
    )
    .expect("weights")
}

#[test]
fn the_language_model_of_the_composite_checkpoint_matches_transformers() {
    // transformers saves the text model as text_model.model.* and text_model.lm_head
    let r = reference("tiny_emu3");
    let ids = u32s(&r["ids"]);
    let cfg = Emu3Config::read(&fixture("tiny_emu3")).expect("config");
    let prompt = 4;
    let gpt_cfg = cfg.text_config.gpt_config(prompt).expect("gpt config");
    let vb = weights().rename_f(|n| format!("text_model.{n}"));
    let gpt = Gpt::load_chameleon(&gpt_cfg, 1, ids.len() - prompt, vb).expect("model");
    let want: Vec<Vec<f32>> = r["logits"]
        .as_array()
        .expect("rows")
        .iter()
        .map(f32s)
        .collect();
    common::one_pass_logits_match(&gpt, &ids, &want, prompt, "tiny_emu3");
}

#[test]
fn the_movq_decoder_matches_transformers_pixels() {
    // One frame through two temporal up-samplings and batch-normed temporal blocks, spatial
    // norms, two-head attention in the middle and the lowest level, on a 3 x 5 grid.
    let r = reference("tiny_emu3");
    let v = &r["vq"];
    let grid = u32s(&v["grid"]);
    let (h, w) = (grid[0] as usize, grid[1] as usize);
    let cfg = Emu3Config::read(&fixture("tiny_emu3")).expect("config");
    let movq = MovqDecoder::load(&cfg.vq_config, weights().pp("vqmodel")).expect("decoder");
    let x = movq.decode(&u32s(&v["codes"]), h, w).expect("decode");
    assert_eq!(x.dims(), [1, 3, 2 * h, 2 * w]);
    let got: Vec<f32> = x.flatten_all().and_then(|t| t.to_vec1()).expect("pixels");
    let d = max_abs_diff(&got, &f32s(&v["pixels"]));
    assert!(d < 1e-4, "pixels differ by {d}");
    // through the decoder seam: 8-bit RGB within one level of PyTorch's
    let model = registry::open(&fixture("tiny_emu3"), &Device::Cpu).expect("open");
    let decoder = model.model.image_decoder();
    assert_eq!(decoder.codebook_size(), 48);
    let img = zipar_studio::model::movq::MovqGridDecoder { movq, grid: (h, w) };
    let rgb = zipar_studio::model::ImageDecoder::decode(&img, &u32s(&v["codes"])).expect("rgb");
    let want = u32s(&v["rgb8"]);
    assert_eq!(rgb.pixels.len(), want.len());
    let worst = rgb
        .pixels
        .iter()
        .zip(&want)
        .map(|(&a, &b)| (a as i64 - b as i64).abs())
        .max();
    assert!(worst <= Some(1), "8-bit pixels differ by {worst:?}");
}

#[test]
fn the_generation_template_gives_the_processors_tokens() {
    let dir = fixture("tiny_emu3");
    let r = reference("tiny_emu3");
    let g = &r["generate"];
    let cfg = Emu3Config::read(&dir).expect("config");
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer");
    let settings = Emu3Settings::read(&dir).expect("settings");
    assert_eq!(settings.positive_prompt, g["positive"].as_str().expect("+"));
    assert_eq!(settings.negative_prompt, g["negative"].as_str().expect("-"));
    let grid = settings.grid(&dir, 2).expect("grid");
    assert_eq!(grid, (3, 4));
    let t = Emu3Template::new(tok, &cfg.vocabulary_map, grid, &settings).expect("template");
    let ids = t
        .encode(g["prompt"].as_str().expect("prompt"))
        .expect("ids");
    assert_eq!(ids, u32s(&g["ids"]));
    assert_eq!(
        t.unconditional(&ids).expect("neg"),
        u32s(&g["negative_ids"])
    );
}

#[test]
fn emu3_greedy_codes_match_the_reference_at_cfg_1_and_3() {
    // The reference decodes with a per-entry KV cache built from the transformers model's
    // modules (checked there against transformers' own generate on next-token decoding, with
    // unbatched guidance against the negative prompt).
    let r = reference("tiny_emu3");
    let g = &r["generate"];
    let mut loaded = registry::open(&fixture("tiny_emu3"), &Device::Cpu).expect("open");
    let model = &mut loaded.model;
    let (h, w) = model.grid();
    assert_eq!((h, w), (3, 4));
    let prompt = Condition::Text(g["prompt"].as_str().expect("prompt").to_string());
    let runs = g["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 6);
    for run in runs {
        let s = run["window"].as_u64().expect("window") as usize;
        let cfg = run["cfg"].as_f64().expect("cfg") as f32;
        let modes: &[Mode] = if s == w + 1 {
            &[Mode::Ntp, Mode::Zipar]
        } else {
            &[Mode::Zipar]
        };
        for &mode in modes {
            let params = GenerateParams {
                mode,
                window: s,
                cfg_scale: cfg,
                sampling: Sampling::Greedy,
                seed: 0,
                mask_unwritten: false,
            };
            let trace =
                generate(model.as_mut(), &prompt, &params, &mut |_| Flow::Continue).expect("runs");
            assert_eq!(trace.tokens, u32s(&run["codes"]), "{params:?}");
            assert_eq!(
                trace.passes as u64,
                run["passes"].as_u64().expect("passes"),
                "{params:?}"
            );
            if mode == Mode::Zipar {
                assert_eq!(trace.passes, w + (h - 1) * (s - 1));
            }
        }
    }
    assert_ne!(
        u32s(&runs[0]["codes"]),
        u32s(&runs[3]["codes"]),
        "guidance changes the image here"
    );
    // the registry's card
    assert_eq!(loaded.card.kind, zipar_studio::weights::ModelKind::Emu3Gen);
    assert_eq!(loaded.card.defaults.window, Some(8));
    assert_eq!(loaded.card.defaults.top_k, Some(2048));
    let summary = registry::summary(&fixture("tiny_emu3"), &Device::Cpu).expect("summary");
    assert!(
        summary.text.contains("vision decoder 0.4M") && summary.text.contains("3x4 image"),
        "{}",
        summary.text
    );
}

#[test]
fn an_emu3_folder_generates_from_a_text_prompt_through_the_cli() {
    let r = reference("tiny_emu3");
    let g = &r["generate"];
    let run = g["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .find(|r| r["cfg"] == 3.0 && r["window"] == 3)
        .expect("the CFG 3, window 3 run");
    let dir = std::env::temp_dir().join(format!("zipar-emu3-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (trace, png) = (dir.join("trace.json"), dir.join("out.png"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zipar-studio"))
        .args(["generate", "--model"])
        .arg(fixture("tiny_emu3"))
        .args(["--prompt", g["prompt"].as_str().expect("prompt")])
        .args([
            "--mode", "zipar", "--window", "3", "--greedy", "--quiet", "--cfg", "3",
        ])
        .arg("--trace")
        .arg(&trace)
        .arg("--out")
        .arg(&png)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tr: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).expect("trace")).expect("json");
    assert_eq!(u32s(&tr["tokens"]), u32s(&run["codes"]));
    assert_eq!(tr["passes"], run["passes"]);
    let img = image::open(&png).expect("png");
    assert_eq!((img.width(), img.height()), (8, 6));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn broken_emu3_folders_are_refused_with_the_reason() {
    let dir = std::env::temp_dir().join(format!("zipar-emu3-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let src = fixture("tiny_emu3");
    for f in ["config.json", "model.safetensors", "zipar.json"] {
        std::fs::copy(src.join(f), dir.join(f)).expect("copy");
    }
    let open = |d: &std::path::Path| {
        registry::open(d, &Device::Cpu)
            .map(|_| ())
            .expect_err("refused")
            .to_string()
    };
    assert!(open(&dir).contains("tokenizer.json"), "{}", open(&dir));
    std::fs::copy(src.join("tokenizer.json"), dir.join("tokenizer.json")).expect("copy");
    // a grid beyond the cache's bounds, an unknown setting
    for (settings, want) in [
        (r#"{"grid": [4, 100000]}"#, "each side must be 1 to 512"),
        (r#"{"grid": [3, 4], "cfg": 2}"#, "unknown field"),
    ] {
        std::fs::write(dir.join("zipar.json"), settings).expect("write");
        let err = open(&dir);
        assert!(err.contains(want), "{settings}: {err}");
    }
    std::fs::copy(src.join("zipar.json"), dir.join("zipar.json")).expect("copy");
    // a vision tokenizer this decoder cannot build, a vocabulary without visual tokens
    let text = std::fs::read_to_string(src.join("config.json")).expect("config");
    let mut cfg: serde_json::Value = serde_json::from_str(&text).expect("json");
    cfg["vq_config"]["latent_channels"] = 8.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).expect("write");
    assert!(open(&dir).contains("latent_channels 8"), "{}", open(&dir));
    let mut cfg: serde_json::Value = serde_json::from_str(&text).expect("json");
    let map = cfg["vocabulary_map"].as_object_mut().expect("map");
    map.retain(|k, _| !k.starts_with("<|visual token"));
    std::fs::write(dir.join("config.json"), cfg.to_string()).expect("write");
    assert!(open(&dir).contains("no image tokens"), "{}", open(&dir));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_models_default_window_is_fitted_to_a_small_grid() {
    // Emu3-Gen recommends window 8; the fixture's grid is 4 wide (windows 2..=5): generate
    // without --window takes the largest that fits, as the app does; an explicit 9 is refused.
    let dir = std::env::temp_dir().join(format!("zipar-emu3-window-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_zipar-studio"))
            .args(["generate", "--model"])
            .arg(fixture("tiny_emu3"))
            .args(["--prompt", "a red apple", "--out"])
            .arg(dir.join("out.png"))
            .args(extra)
            .output()
            .expect("runs")
    };
    let out = run(&[]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("window 5"), "{text}");
    let out = run(&["--window", "9"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("between 2 and 5"));
    let _ = std::fs::remove_dir_all(&dir);
}
