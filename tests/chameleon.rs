//! Chameleon (Lumina-mGPT's architecture) against `transformers` on a tiny random model
//! (training/make_chameleon_fixture.py): logits within 1e-4 fed one token per pass and all at
//! once, and the image vocabulary read from the token names.

mod common;

use candle_core::{DType, Device};
use common::{f32s, fixture, max_abs_diff, reference, u32s};
use zipar_studio::model::chameleon::ChameleonConfig;
use zipar_studio::model::llamagen::Gpt;
use zipar_studio::model::{Condition, ModelInput, RunOptions};

fn load(max_prompt: usize, positions: usize) -> Gpt {
    load_from("tiny_chameleon", max_prompt, positions)
}

fn load_from(name: &str, max_prompt: usize, positions: usize) -> Gpt {
    let dir = fixture(name);
    // Emu3's language model is read as a Llama-style decoder, the others as Chameleon.
    let read = if name.contains("emu3") {
        ChameleonConfig::read_llama
    } else {
        ChameleonConfig::read
    };
    let cfg = read(&dir)
        .and_then(|c| c.gpt_config(max_prompt))
        .expect("config");
    let vb = zipar_studio::weights::var_builder(
        &dir.join("model.safetensors"),
        DType::F32,
        &Device::Cpu,
    )
    .expect("weights");
    Gpt::load_chameleon(&cfg, 1, positions, vb).expect("model")
}

#[test]
fn chameleon_logits_match_transformers() {
    // 4 heads each with its own keys and values, then grouped-query attention (2 key/value
    // heads serving 2 query heads each); then Emu3-Gen's language model (a Llama decoder: no
    // query/key norms, grouped-query attention, RoPE base 1e6; training/make_emu3_fixture.py).
    for name in ["tiny_chameleon", "tiny_chameleon_gqa", "tiny_emu3_lm"] {
        logits_match(name);
    }
}

fn logits_match(name: &str) {
    let r = reference(name);
    let ids = u32s(&r["ids"]);
    let want: Vec<Vec<f32>> = r["logits"]
        .as_array()
        .expect("rows")
        .iter()
        .map(f32s)
        .collect();
    let prompt = 4;
    let gpt = load_from(name, prompt, ids.len() - prompt);
    let opts = RunOptions::default();
    // one token per pass
    let (mut session, first) = gpt
        .start(&Condition::Tokens(ids[..prompt].to_vec()), opts, None)
        .expect("prefill");
    let d = max_abs_diff(&first.cond[0], &want[prompt - 1]);
    assert!(d < 1e-4, "{name}: prompt logits differ by {d}");
    for (pos, &token) in ids[prompt..].iter().enumerate() {
        let input = ModelInput {
            token,
            pos,
            wants_logits: true,
        };
        let out = gpt.step(&mut session, &[input]).expect("step");
        let d = max_abs_diff(&out.cond[0], &want[prompt + pos]);
        assert!(d < 1e-4, "{name}: logits at {} differ by {d}", prompt + pos);
    }
    // the rest in one pass of 8 inputs
    common::one_pass_logits_match(&gpt, &ids, &want, prompt, name);
}

#[test]
fn chameleon_image_vocabulary_and_refusals() {
    let dir = fixture("tiny_chameleon");
    let cfg = ChameleonConfig::read(&dir).expect("config");
    let vocab = cfg.image_vocabulary().expect("vocabulary");
    let codes = reference("tiny_chameleon")["image_codes"]
        .as_u64()
        .expect("n") as usize;
    assert_eq!(vocab.len(), codes);
    for code in 0..codes as u32 {
        let bpe = vocab.bpe(code).expect("token");
        assert_eq!(vocab.code(bpe), Some(code));
        assert!((24..64).contains(&bpe), "image tokens are ids 24..63 here");
    }
    let gpt = load(4, 8);
    let opts = RunOptions::default();
    let err = |c: Condition, o: RunOptions| {
        gpt.start(&c, o, None)
            .map(|_| ())
            .expect_err("refused")
            .to_string()
    };
    assert!(err(Condition::Tokens(vec![1; 5]), opts).contains("1 to 4"));
    assert!(err(Condition::Tokens(vec![64]), opts).contains("outside the vocabulary"));
    assert!(err(Condition::Class(1), opts).contains("prompt of tokens"));
    let cfg_on = RunOptions { cfg: true, ..opts };
    assert!(err(Condition::Tokens(vec![1]), cfg_on).contains("unconditional prompt"));
    // Prompts of different lengths: the shorter is padded and hidden, and each half gives the
    // logits it gives alone (RoPE sees only distances).
    let alone = |ids: &[u32]| {
        let (_, out) = gpt
            .start(&Condition::Tokens(ids.to_vec()), opts, None)
            .expect("prefill");
        out.cond[0].clone()
    };
    for (cond, uncond) in [(vec![1, 2, 3], vec![7, 9]), (vec![5], vec![0, 1, 2, 3])] {
        let pair = Condition::TokenPair {
            cond: cond.clone(),
            uncond: uncond.clone(),
        };
        let (_, out) = gpt.start(&pair, cfg_on, None).expect("pair");
        let uncond_rows = out.uncond.expect("uncond");
        let d = max_abs_diff(&out.cond[0], &alone(&cond));
        let du = max_abs_diff(&uncond_rows[0], &alone(&uncond));
        assert!(d < 1e-4 && du < 1e-4, "{cond:?} / {uncond:?}: {d} {du}");
    }
    // Key/value heads that do not divide the query heads are refused with the numbers.
    let mut gqa = cfg.clone();
    gqa.num_key_value_heads = Some(3);
    assert!(
        gqa.gpt_config(4)
            .unwrap_err()
            .to_string()
            .contains("3 key/value heads do not divide the 4")
    );
}

/// Lumina-mGPT's image model on the fixture: the Chameleon GPT over 3 rows of 4 image tokens
/// plus the end-of-row token, the tiny taming VQGAN as its decoder (also 40 codes).
fn lumina(r: &serde_json::Value) -> zipar_studio::model::end_of_row::EndOfRowLm {
    use std::sync::Arc;
    use zipar_studio::model::llamagen::{GridDecoder, VqConfig, VqDecoder};
    let z = &r["zipar"];
    let grid = u32s(&z["grid"]);
    let (h, w) = (grid[0] as usize, grid[1] as usize);
    let prompt = u32s(&z["prompt"]).len();
    let dir = fixture("tiny_chameleon");
    let cc = ChameleonConfig::read(&dir).expect("config");
    let vb = zipar_studio::weights::var_builder(
        &dir.join("model.safetensors"),
        DType::F32,
        &Device::Cpu,
    )
    .expect("weights");
    let gpt = Gpt::load_chameleon(&cc.gpt_config(prompt).expect("gpt config"), h, w + 1, vb)
        .expect("model");
    let vq_ref = reference("tiny_vqgan");
    let vq_cfg: VqConfig = serde_json::from_value(vq_ref["vq"].clone()).expect("vq config");
    let vb = zipar_studio::weights::var_builder(
        &fixture("tiny_vqgan").join("vqgan.safetensors"),
        DType::F32,
        &Device::Cpu,
    )
    .expect("vq weights");
    let vq = Arc::new(VqDecoder::load(&vq_cfg, vb).expect("vq"));
    zipar_studio::model::end_of_row::EndOfRowLm::new(
        gpt,
        cc.image_vocabulary().expect("vocabulary"),
        z["eol"].as_u64().expect("eol") as u32,
        Arc::new(GridDecoder { vq, grid: (h, w) }),
    )
    .expect("lumina")
}

#[test]
fn lumina_zipar_greedy_tokens_match_the_reference() {
    use zipar_studio::decode::{Flow, GenerateParams, Mode, Sampling, generate};
    use zipar_studio::model::ImageArModel;
    let r = reference("tiny_chameleon");
    let mut model = lumina(&r);
    let (h, w) = model.grid();
    let prompt = Condition::Tokens(u32s(&r["zipar"]["prompt"]));
    let runs = r["zipar"]["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 4);
    for run in runs {
        let s = run["window"].as_u64().expect("window") as usize;
        // s = w + 1 is next-token prediction: checked through the NTP mode too
        let modes: &[Mode] = if s == w + 1 {
            &[Mode::Ntp, Mode::Zipar]
        } else {
            &[Mode::Zipar]
        };
        for &mode in modes {
            let params = GenerateParams {
                mode,
                window: s,
                cfg_scale: 1.0,
                sampling: Sampling::Greedy,
                seed: 0,
                mask_unwritten: false,
            };
            let trace =
                generate(&mut model, &prompt, &params, &mut |_| Flow::Continue).expect("runs");
            assert_eq!(
                trace.tokens,
                u32s(&run["codes"]),
                "codes differ for {params:?}"
            );
            assert_eq!(
                trace.passes as u64,
                run["passes"].as_u64().expect("passes"),
                "passes differ for {params:?}"
            );
            // ZipAR's pass count on the end-of-row layout: w + (h - 1)(s - 1) image passes
            if mode == Mode::Zipar {
                assert_eq!(trace.passes, w + (h - 1) * (s - 1));
            }
        }
    }
    let img = model.decode_image(&u32s(&runs[1]["codes"])).expect("image");
    assert_eq!((img.height, img.width), (4 * h, 4 * w));
}

#[test]
fn lumina_checkpoints_share_one_query_key_norm_row_across_heads() {
    // Lumina-mGPT's own checkpoints store each query/key norm as [1, head_dim] (one row per
    // model-parallel shard, shared by its heads); Hugging Face's conversion as [heads, head_dim].
    // The same weights in both shapes must give the same logits; a wrong shape is refused.
    use candle_core::Tensor;
    use std::collections::HashMap;
    let dir = fixture("tiny_chameleon");
    let cfg = ChameleonConfig::read(&dir)
        .and_then(|c| c.gpt_config(4))
        .expect("config");
    let tensors = zipar_studio::weights::read_tensors_where(
        &dir.join("model.safetensors"),
        None,
        &mut |_| {},
    )
    .expect("tensors");
    let heads = cfg.n_head;
    let (mut shared, mut per_head): (HashMap<String, Tensor>, HashMap<String, Tensor>) =
        (HashMap::new(), HashMap::new());
    for (name, t) in tensors {
        if name.contains("_norm.") && name.contains("self_attn") {
            let row = t.narrow(0, 0, 1).expect("row");
            let rows = row
                .broadcast_as((heads, t.dim(1).expect("dim")))
                .and_then(|r| r.contiguous())
                .expect("rows");
            shared.insert(name.clone(), row);
            per_head.insert(name, rows);
        } else {
            shared.insert(name.clone(), t.clone());
            per_head.insert(name, t);
        }
    }
    let logits = |m: HashMap<String, Tensor>| {
        let vb = candle_nn::VarBuilder::from_tensors(m, DType::F32, &Device::Cpu);
        let gpt = Gpt::load_chameleon(&cfg, 1, 4, vb).expect("model");
        let (_, out) = gpt
            .start(
                &Condition::Tokens(vec![1, 5, 9, 17]),
                RunOptions::default(),
                None,
            )
            .expect("prefill");
        out.cond[0].clone()
    };
    let d = max_abs_diff(&logits(shared.clone()), &logits(per_head));
    assert!(d < 1e-6, "shared and per-head norms differ by {d}");
    let mut bad = shared;
    let name = "model.layers.0.self_attn.q_norm.weight".to_string();
    bad.insert(
        name,
        Tensor::ones((3, 12), DType::F32, &Device::Cpu).expect("t"),
    );
    let vb = candle_nn::VarBuilder::from_tensors(bad, DType::F32, &Device::Cpu);
    let err = Gpt::load_chameleon(&cfg, 1, 4, vb)
        .expect_err("refused")
        .to_string();
    assert!(err.contains("[3, 12]"), "{err}");
}

#[test]
fn a_lumina_folder_generates_from_a_text_prompt_through_the_cli() {
    // The Hugging Face folder as the registry opens it (config.json with model_type chameleon,
    // tokenizer.json, vqgan.safetensors, zipar.json): the prompt goes through Lumina-mGPT's
    // template and the tokenizer, ZipAR-3 decodes the 4 x 4 grid, the VQGAN draws it. Codes
    // and passes equal the Python reference's for the same template.
    let r = reference("tiny_chameleon");
    let t = &r["text"];
    let dir = tempfile_dir("lumina-cli");
    let (trace, png) = (dir.join("trace.json"), dir.join("out.png"));
    let tr = generate_trace(t["prompt"].as_str().expect("prompt"), "1", &trace, &png);
    assert_eq!(u32s(&tr["tokens"]), u32s(&t["codes"]));
    assert_eq!(tr["passes"], t["passes"]);
    let img = image::open(&png).expect("png");
    assert_eq!((img.width(), img.height()), (16, 16));
    // With classifier-free guidance (scale 3): the unconditional half is the official code's
    // [0, 1, ..., 1, image start, grid tokens] prompt, same positions.
    let c = &t["cfg"];
    let tr = generate_trace(t["prompt"].as_str().expect("prompt"), "3", &trace, &png);
    assert_eq!(u32s(&tr["tokens"]), u32s(&c["codes"]));
    assert_ne!(
        u32s(&c["codes"]),
        u32s(&t["codes"]),
        "CFG changes the image here"
    );
    assert_eq!(
        zipar_studio::model::chameleon::unconditional_prompt(&u32s(&t["ids"]), Some(4)),
        u32s(&c["uncond"])
    );
    // the registry's card: a caption model on a 4 x 4 grid with Lumina-mGPT's defaults
    let loaded = zipar_studio::model::registry::open(&fixture("tiny_chameleon"), &Device::Cpu)
        .expect("open");
    assert_eq!(loaded.card.grid, (4, 4));
    assert_eq!(
        loaded.card.conditioning,
        zipar_studio::model::registry::Conditioning::Caption
    );
    assert_eq!(loaded.card.defaults.window, Some(16));
    assert_eq!(loaded.card.defaults.cfg, Some(3.0));
    let summary = zipar_studio::model::registry::summary(&fixture("tiny_chameleon"), &Device::Cpu)
        .expect("summary");
    assert!(
        summary.text.contains("Chameleon 0.1M parameters")
            && summary.text.contains("KV cache of a 4x4 image"),
        "{}",
        summary.text
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_lumina_folder_without_its_decoder_is_named() {
    let dir = tempfile_dir("lumina-missing");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("tiny_chameleon").join(f), dir.join(f)).expect("copy");
    }
    let err = zipar_studio::model::registry::open(&dir, &Device::Cpu)
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("vqgan.safetensors") && err.contains("vqgan.ckpt"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `generate` on tiny_chameleon through the binary (ZipAR-3, greedy, CFG `cfg`): its trace.
fn generate_trace(
    prompt: &str,
    cfg: &str,
    trace: &std::path::Path,
    png: &std::path::Path,
) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zipar-studio"))
        .args(["generate", "--model"])
        .arg(fixture("tiny_chameleon"))
        .args(["--prompt", prompt, "--mode", "zipar", "--window", "3"])
        .args(["--greedy", "--quiet", "--cfg", cfg, "--trace"])
        .arg(trace)
        .arg("--out")
        .arg(png)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(trace).expect("trace")).expect("json")
}

fn tempfile_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("zipar-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn a_lumina_folder_with_an_impossible_grid_is_refused_before_loading() {
    let dir = tempfile_dir("lumina-grid");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "vqgan.safetensors",
    ] {
        std::fs::copy(fixture("tiny_chameleon").join(f), dir.join(f)).expect("copy");
    }
    for (settings, want) in [
        (r#"{"grid": [100000, 4]}"#, "each side must be 1 to 512"),
        (
            r#"{"grid": [3, 4]}"#,
            "not a whole number of 32-pixel patches",
        ),
        (r#"{"grid": [4, 4], "colour": 1}"#, "unknown field"),
    ] {
        std::fs::write(dir.join("zipar.json"), settings).expect("write");
        let err = zipar_studio::model::registry::open(&dir, &Device::Cpu)
            .expect_err("refused")
            .to_string();
        assert!(err.contains(want), "{settings}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_llamagen_manifest_cannot_ask_for_another_family() {
    // family and n_kv_head are set by the loaders, not read from a LlamaGen config.json
    let json = r#"{"dim": 64, "n_layer": 2, "n_head": 4, "vocab_size": 96,
                   "family": "chameleon", "n_kv_head": 2}"#;
    match serde_json::from_str::<zipar_studio::model::llamagen::GptConfig>(json) {
        Ok(cfg) => {
            assert_eq!(cfg.family, zipar_studio::model::llamagen::Family::LlamaGen);
            assert_eq!(cfg.kv_heads(), 4);
        }
        Err(e) => assert!(e.to_string().contains("unknown field"), "{e}"),
    }
}
