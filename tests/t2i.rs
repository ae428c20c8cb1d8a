//! LlamaGen text-to-image with a T5 caption encoder, against the PyTorch / `transformers`
//! reference of training/make_t2i_fixtures.py: a tiny FLAN-T5-style encoder (sharded
//! safetensors, a trained tokenizer) and a tiny t2i GPT with a 12-token caption, so that
//! captions are padded (and one is truncated). Tokens exactly, T5 rows and logits within 1e-4,
//! greedy NTP and ZipAR tokens exactly, with and without CFG.

mod common;

use std::process::Command;

use candle_core::Device;
use common::{assert_logits_match, f32s, fixture, max_abs_diff, reference, u32s};
use zipar_studio::decode::{Flow, GenerateParams, Mode, Sampling, generate};
use zipar_studio::model::Condition;
use zipar_studio::model::registry::{self, Conditioning};
use zipar_studio::model::t5::TextEncoder;

const FIXTURE: &str = "tiny_t2i_text";

fn captions() -> Vec<serde_json::Value> {
    reference(FIXTURE)["captions"]
        .as_array()
        .expect("captions")
        .clone()
}

fn encoder() -> TextEncoder {
    let t = reference(FIXTURE)["caption_tokens"].as_u64().expect("T") as usize;
    TextEncoder::load(&fixture(FIXTURE).join("t5"), t, &Device::Cpu).expect("T5 loads")
}

#[test]
fn caption_tokens_and_t5_rows_match_transformers() {
    let mut enc = encoder();
    let caps = captions();
    let lens: Vec<usize> = caps
        .iter()
        .map(|c| c["ids"].as_array().expect("ids").len())
        .collect();
    // The fixture covers a padded caption and one cut at the caption length.
    assert!(
        lens.iter().any(|&n| n < 12) && lens.contains(&12),
        "{lens:?}"
    );
    for c in &caps {
        let text = c["text"].as_str().expect("text");
        let ids = enc.tokens(text).expect("tokenises");
        assert_eq!(ids, u32s(&c["ids"]), "token ids of {text:?}");
        let Condition::Caption { len, values } = enc.encode(text).expect("encodes") else {
            panic!("a caption gives caption rows");
        };
        assert_eq!(len, ids.len());
        let d = max_abs_diff(&values, &f32s(&c["hidden"]));
        assert!(d < 1e-4, "T5 rows of {text:?} differ by {d}");
    }
}

#[test]
fn caption_conditioned_logits_match_the_reference_with_padding_masked() {
    let caps = captions();
    let c = &caps[0];
    let tf = &c["teacher_forced"];
    let mut loaded = registry::open(&fixture(FIXTURE), &Device::Cpu).expect("model loads");
    assert_eq!(loaded.card.conditioning, Conditioning::Caption);
    let cond = Condition::Text(c["text"].as_str().expect("text").to_string());
    let got = zipar_studio::eval::teacher_forced(
        loaded.model.as_mut(),
        &cond,
        &u32s(&tf["tokens"]),
        true,
    )
    .expect("teacher forcing");
    assert_logits_match(&got, tf);
}

#[test]
fn greedy_caption_runs_match_the_reference_for_ntp_and_zipar() {
    let mut loaded = registry::open(&fixture(FIXTURE), &Device::Cpu).expect("model loads");
    let mut checked = 0;
    for c in captions() {
        let cond = Condition::Text(c["text"].as_str().expect("text").to_string());
        for run in c["greedy"].as_array().expect("runs") {
            let params = GenerateParams {
                mode: match run["mode"].as_str() {
                    Some("ntp") => Mode::Ntp,
                    _ => Mode::Zipar,
                },
                window: run["window"].as_u64().expect("window") as usize,
                cfg_scale: run["cfg"].as_f64().expect("cfg") as f32,
                sampling: Sampling::Greedy,
                seed: 0,
                mask_unwritten: false,
            };
            let trace = generate(loaded.model.as_mut(), &cond, &params, &mut |_| {
                Flow::Continue
            })
            .expect("generation runs");
            assert_eq!(trace.tokens, u32s(&run["tokens"]), "{cond:?} {params:?}");
            assert_eq!(
                trace.passes as u64,
                run["passes"].as_u64().expect("passes"),
                "{params:?}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 24);
}

#[test]
fn a_caption_is_refused_without_an_encoder_and_a_class_with_one() {
    // tiny_t2i names no text encoder: raw text cannot be encoded.
    let mut plain = registry::open(&fixture("tiny_t2i"), &Device::Cpu).expect("loads");
    let e = plain
        .model
        .prefill(&Condition::Text("a cat".into()), Default::default())
        .expect_err("no encoder")
        .to_string();
    assert!(e.contains("no text encoder"), "{e}");
    let mut loaded = registry::open(&fixture(FIXTURE), &Device::Cpu).expect("loads");
    let e = loaded
        .model
        .prefill(&Condition::Class(0), Default::default())
        .expect_err("class refused")
        .to_string();
    assert!(e.contains("text-conditional"), "{e}");
    // A caption of more rows than the model's caption slots is refused, not cut silently.
    let too_long = Condition::Caption {
        len: 13,
        values: vec![0.0; 13 * 32],
    };
    assert!(loaded.model.prefill(&too_long, Default::default()).is_err());
}

#[test]
fn the_cli_generates_from_a_caption_with_zipar() {
    let out = tempfile::tempdir().expect("tempdir");
    let png = out.path().join("apple.png");
    let model = fixture(FIXTURE);
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().expect("utf8"),
            "--out",
            png.to_str().expect("utf8"),
            "--quiet",
        ];
        args.extend(extra);
        Command::new(env!("CARGO_BIN_EXE_zipar-studio"))
            .args(&args)
            .output()
            .expect("binary runs")
    };
    let ok = run(&[
        "--prompt",
        "a red apple on a wooden table",
        "--mode",
        "zipar",
        "--window",
        "8",
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let img = image::open(&png).expect("a PNG was written").to_rgb8();
    let (w, h) = img.dimensions();
    assert!(
        w > 0 && w * 4 == h * 9,
        "a 4 x 9 grid's image, got {w} x {h}"
    );
    let bad = run(&["--class", "1"]);
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("text-conditional"), "{stderr}");
}

/// T5's encoder tensors are read out of the shards alone (the rest is never read), their
/// element count comes from the headers without reading data, and a load reports each file
/// before reading it, with the bytes before it.
#[test]
fn the_encoder_is_read_alone_and_loading_reports_every_shard() {
    use zipar_studio::model::t5;
    use zipar_studio::weights;
    let dir = fixture(FIXTURE).join("t5");
    let index = t5::weight_file(&dir);
    let all = weights::read_tensors(&index).expect("reads");
    let mut seen = Vec::new();
    let enc = weights::read_tensors_where(
        &index,
        Some(&|n: &str| n.starts_with("encoder.block.0.")),
        &mut |p| seen.push(p.to_path_buf()),
    )
    .expect("reads");
    assert!(!enc.is_empty() && enc.len() < all.len());
    assert!(enc.keys().all(|k| k.starts_with("encoder.block.0.")));
    assert_eq!(seen.len(), 5, "every shard is visited: {seen:?}");
    for (k, t) in &enc {
        let diff = (t - &all[k]).expect("same shape").abs().expect("abs");
        let max = diff
            .max_all()
            .expect("max")
            .to_scalar::<f32>()
            .expect("f32");
        assert_eq!(max, 0.0, "{k}");
    }
    let counted = t5::encoder_params(&dir).expect("counts");
    let expected: usize = all
        .iter()
        .filter(|(k, _)| t5::is_encoder_tensor(k))
        .map(|(_, t)| t.elem_count())
        .sum();
    assert_eq!(counted, expected as u64);

    let mut reports = Vec::new();
    registry::open_with_progress(&fixture(FIXTURE), &Device::Cpu, &mut |p| {
        reports.push(p.clone())
    })
    .expect("loads");
    let files: Vec<&str> = reports.iter().map(|p| p.file.as_str()).collect();
    assert_eq!(files[..2], ["gpt.safetensors", "../tiny/vq.safetensors"]);
    assert_eq!(files.len(), 7, "{files:?}");
    assert!(reports.windows(2).all(|w| w[0].done < w[1].done));
    let total = reports[0].total;
    assert!(reports.iter().all(|p| p.total == total && p.done < total));
}

/// The headless commands run a text-to-image model on default captions (or `--prompt`), and
/// refuse `--class` with a message.
#[test]
fn bench_and_eval_take_captions() {
    let model = fixture(FIXTURE);
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_zipar-studio"))
            .args(args)
            .output()
            .expect("binary runs")
    };
    let m = model.to_str().expect("utf8");
    let bench = run(&["bench", "--model", m, "--windows", "3", "--seeds", "0"]);
    let out = String::from_utf8_lossy(&bench.stdout);
    assert!(
        bench.status.success(),
        "{}",
        String::from_utf8_lossy(&bench.stderr)
    );
    assert!(out.contains("zipar") && out.contains("24.0"), "{out}");
    let eval = run(&["eval", "--model", m, "--windows", "3", "--samples", "1"]);
    let out = String::from_utf8_lossy(&eval.stdout);
    assert!(
        eval.status.success(),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    assert!(out.lines().any(|l| l.starts_with("ntp")), "{out}");
    let bad = run(&["bench", "--model", m, "--class", "1"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("give a caption"));
}
