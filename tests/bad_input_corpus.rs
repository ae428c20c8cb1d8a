//! A corpus of bad inputs through the real binary (weights, manifest, prompt, settings, paths):
//! each must exit with code 2, print exactly one line on stderr (no backtrace, no panic) and
//! leave no partial output file behind.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use common::fixture;

/// A copy of the tiny fixture, damaged by `damage`.
fn model_with(damage: impl FnOnce(&Path)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in [
        "config.json",
        "gpt.safetensors",
        "vq.safetensors",
        "classes.json",
    ] {
        std::fs::copy(fixture("tiny").join(f), dir.path().join(f)).expect("copy");
    }
    damage(dir.path());
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).expect("read")).expect("json");
    edit(&mut v);
    std::fs::write(&p, v.to_string()).expect("write");
}

fn edit_tensors(file: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut t = candle_core::safetensors::load(file, &Device::Cpu).expect("load");
    edit(&mut t);
    candle_core::safetensors::save(&t, file).expect("save");
}

/// One bad input: a model folder (or path), the flags, and a phrase the error must contain.
struct Case {
    name: &'static str,
    model: Option<tempfile::TempDir>,
    model_path: Option<PathBuf>,
    args: Vec<String>,
    want: &'static str,
}

fn case(name: &'static str, model: tempfile::TempDir, args: &[&str], want: &'static str) -> Case {
    Case {
        name,
        model: Some(model),
        model_path: None,
        args: args.iter().map(|s| s.to_string()).collect(),
        want,
    }
}

fn good() -> tempfile::TempDir {
    model_with(|_| {})
}

/// A copy of the text-to-image fixture (GPT, T5 folder; the VQ path points back into the
/// fixtures), damaged by `damage`.
fn t2i_with(damage: impl FnOnce(&Path)) -> tempfile::TempDir {
    let src = fixture("tiny_t2i_text");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("t5")).expect("mkdir");
    for entry in std::fs::read_dir(src.join("t5")).expect("t5") {
        let f = entry.expect("entry").path();
        std::fs::copy(&f, dir.path().join("t5").join(f.file_name().expect("name"))).expect("copy");
    }
    std::fs::copy(
        src.join("gpt.safetensors"),
        dir.path().join("gpt.safetensors"),
    )
    .expect("copy");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).expect("copy");
    let vq = fixture("tiny").join("vq.safetensors");
    edit_config(dir.path(), |v| {
        v["vq_weights"] = vq.to_string_lossy().into_owned().into()
    });
    damage(dir.path());
    dir
}

fn corpus() -> Vec<Case> {
    let nan = |dir: &Path| {
        edit_tensors(&dir.join("gpt.safetensors"), |t| {
            let w = t["layers.0.attention.wo.weight"].clone();
            let bad = (w * f64::NAN).expect("mul");
            t.insert("layers.0.attention.wo.weight".into(), bad);
        })
    };
    let long_prompt = "zzqx ".repeat(20_000);
    let mut v = vec![
        // weights
        case(
            "gpt weights missing",
            model_with(|d| std::fs::remove_file(d.join("gpt.safetensors")).expect("rm")),
            &[],
            "does not exist",
        ),
        case(
            "vq weights truncated",
            model_with(|d| {
                let p = d.join("vq.safetensors");
                let b = std::fs::read(&p).expect("read");
                std::fs::write(&p, &b[..b.len() / 3]).expect("write");
            }),
            &[],
            "cannot read weight file",
        ),
        case(
            "empty weight file",
            model_with(|d| std::fs::write(d.join("gpt.safetensors"), b"").expect("w")),
            &[],
            "gpt.safetensors",
        ),
        case(
            "text instead of weights",
            model_with(|d| std::fs::write(d.join("gpt.safetensors"), "hello, world").expect("w")),
            &[],
            "cannot read weight file",
        ),
        case(
            "random bytes as a .pt",
            model_with(|d| {
                std::fs::write(d.join("gpt.pt"), [7u8; 300]).expect("w");
                edit_config(d, |v| v["gpt_weights"] = "gpt.pt".into());
            }),
            &[],
            "gpt.pt",
        ),
        case(
            "legacy torch.save",
            model_with(|d| {
                std::fs::write(d.join("gpt.pt"), [0x80u8, 0x02, 0x8a, 0x0a, 0x6c, 0xfc])
                    .expect("w");
                edit_config(d, |v| v["gpt_weights"] = "gpt.pt".into());
            }),
            &[],
            "legacy",
        ),
        case("weights full of NaN", model_with(nan), &[], "NaN"),
        case(
            "a number where a tensor should be",
            model_with(|d| {
                std::fs::copy(fixture("non_tensor.pt"), d.join("gpt.pt")).expect("copy");
                edit_config(d, |v| v["gpt_weights"] = "gpt.pt".into());
            }),
            &[],
            "not tensors: layers.0.attention.wo.weight",
        ),
        case(
            "renamed keys",
            model_with(|d| {
                edit_tensors(&d.join("gpt.safetensors"), |t| {
                    let w = t.remove("norm.weight").expect("norm");
                    t.insert("final_norm.weight".into(), w);
                })
            }),
            &[],
            "does not match the model config",
        ),
        case(
            "weights are a folder",
            model_with(|d| {
                std::fs::create_dir(d.join("weights_dir")).expect("mkdir");
                edit_config(d, |v| v["vq_weights"] = "weights_dir".into());
            }),
            &[],
            "weights_dir",
        ),
        // manifest
        case(
            "no config.json",
            model_with(|d| std::fs::remove_file(d.join("config.json")).expect("rm")),
            &[],
            "not a model folder",
        ),
        case(
            "config is not JSON",
            model_with(|d| std::fs::write(d.join("config.json"), "{ not json").expect("w")),
            &[],
            "invalid model config",
        ),
        case(
            "empty config object",
            model_with(|d| std::fs::write(d.join("config.json"), "{}").expect("w")),
            &[],
            "invalid model config",
        ),
        case(
            "huge grid",
            model_with(|d| edit_config(d, |v| v["grid_h"] = 100_000.into())),
            &[],
            "grid_h must be between",
        ),
        case(
            "huge dim",
            model_with(|d| edit_config(d, |v| v["dim"] = 1_000_000.into())),
            &[],
            "dim must be between",
        ),
        case(
            "a model larger than the memory",
            model_with(|d| {
                edit_config(d, |v| {
                    v["dim"] = 16_384.into();
                    v["n_layer"] = 512.into();
                    v["n_head"] = 128.into();
                })
            }),
            &[],
            "of memory is available",
        ),
        case(
            "no condition slots",
            model_with(|d| edit_config(d, |v| v["cls_token_num"] = 0.into())),
            &[],
            "cls_token_num",
        ),
        case(
            "heads do not divide dim",
            model_with(|d| edit_config(d, |v| v["n_head"] = 7.into())),
            &[],
            "not divisible",
        ),
        case(
            "vocabulary differs from codebook",
            model_with(|d| edit_config(d, |v| v["vocab_size"] = 77.into())),
            &[],
            "codebook",
        ),
        case(
            "unknown model kind",
            model_with(|d| edit_config(d, |v| v["kind"] = "diffusion".into())),
            &[],
            "invalid model config",
        ),
        case(
            "negative size",
            model_with(|d| edit_config(d, |v| v["grid_w"] = (-1).into())),
            &[],
            "invalid model config",
        ),
        case(
            "recommended window out of range",
            model_with(|d| edit_config(d, |v| v["defaults"] = serde_json::json!({"window": 99}))),
            &[],
            "window",
        ),
        case(
            "shapes disagree with config",
            model_with(|d| edit_config(d, |v| v["ffn_hidden"] = 999.into())),
            &[],
            "does not match",
        ),
        // prompt
        case(
            "prompt matches nothing",
            good(),
            &["--prompt", "zzqx"],
            "no class matches",
        ),
        case(
            "empty prompt",
            good(),
            &["--prompt", ""],
            "no class matches",
        ),
        case(
            "20,000-word prompt",
            good(),
            &["--prompt", long_prompt.leak()],
            "characters)",
        ),
        case("no prompt and no class", good(), &["--no-class"], "--class"),
        case(
            "class out of range",
            good(),
            &["--class", "99999"],
            "out of range",
        ),
        // settings
        case("window 1", good(), &["--window", "1"], "window"),
        case(
            "window wider than the grid",
            good(),
            &["--window", "999"],
            "window",
        ),
        case(
            "temperature 0",
            good(),
            &["--temperature", "0"],
            "temperature",
        ),
        case(
            "temperature NaN",
            good(),
            &["--temperature", "NaN"],
            "temperature",
        ),
        case("top-p above 1", good(), &["--top-p", "1.5"], "top-p"),
        case(
            "exact mode, window 1",
            good(),
            &["--mode", "exact", "--window", "1"],
            "window",
        ),
        case("negative CFG", good(), &["--cfg=-1"], "cfg"),
        case(
            "unknown device",
            good(),
            &["--device", "tpu"],
            "unknown device",
        ),
        case(
            "CUDA not built in",
            good(),
            &["--device", "cuda:7"],
            "not available",
        ),
    ];
    // paths
    let out_dir = tempfile::tempdir().expect("tempdir");
    v.push(case(
        "output folder missing",
        good(),
        &["--out", "/no/such/dir/x.png"],
        "/no/such/dir",
    ));
    v.push(case(
        "output is a folder",
        good(),
        &["--out", out_dir.path().to_str().expect("utf8")],
        "it is a folder",
    ));
    v.push(case(
        "trace folder missing",
        good(),
        &["--trace", "/no/such/dir/t.json"],
        "/no/such/dir",
    ));
    v.push(Case {
        name: "model path is a file",
        model: None,
        model_path: Some(fixture("tiny").join("config.json")),
        args: vec![],
        want: "not a model folder",
    });
    // text-to-image: the T5 folder and the caption
    let caption = ["--prompt", "a red apple"];
    v.extend([
        case(
            "t2i: T5 folder missing",
            t2i_with(|d| std::fs::remove_dir_all(d.join("t5")).expect("rm")),
            &caption,
            "text_encoder: the folder",
        ),
        case(
            "t2i: tokenizer.json damaged",
            t2i_with(|d| std::fs::write(d.join("t5/tokenizer.json"), "{ not json").expect("w")),
            &caption,
            "not a tokenizer",
        ),
        case(
            "t2i: a T5 shard missing",
            t2i_with(|d| {
                std::fs::remove_file(d.join("t5/model-00003-of-00005.safetensors")).expect("rm")
            }),
            &caption,
            "model-00003-of-00005.safetensors",
        ),
        case(
            "t2i: caption_dim differs from the encoder",
            t2i_with(|d| {
                edit_config(d, |v| v["caption_dim"] = 48.into());
                edit_tensors(&d.join("gpt.safetensors"), |t| {
                    // Keep the GPT loadable at the new width so that the encoder check speaks.
                    let fc1 = Tensor::zeros((64, 48), candle_core::DType::F16, &Device::Cpu);
                    let un = Tensor::zeros((12, 48), candle_core::DType::F16, &Device::Cpu);
                    t.insert("cls_embedding.cap_proj.fc1.weight".into(), fc1.expect("t"));
                    t.insert("cls_embedding.uncond_embedding".into(), un.expect("t"));
                })
            }),
            &caption,
            "caption_dim",
        ),
        case(
            "t2i: a class for a caption model",
            t2i_with(|_| {}),
            &["--class", "1"],
            "--prompt",
        ),
    ]);
    std::mem::forget(out_dir);
    v
}

#[test]
fn every_bad_input_gets_one_line_and_exit_code_2_and_leaves_no_file() {
    let cases = corpus();
    assert!(cases.len() >= 30, "the corpus has {} cases", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let work = tempfile::tempdir().expect("tempdir");
        let png = work.path().join("out.png");
        let trace = work.path().join("trace.json");
        let model = c
            .model
            .as_ref()
            .map(|d| d.path().to_path_buf())
            .or(c.model_path.clone())
            .expect("a model");
        let mut args: Vec<String> = vec!["generate".into(), "--quiet".into(), "--model".into()];
        args.push(model.to_string_lossy().into_owned());
        let has = |f: &str| c.args.iter().any(|a| a == f);
        if !has("--out") {
            args.extend(["--out".into(), png.to_string_lossy().into_owned()]);
        }
        if !has("--trace") {
            args.extend(["--trace".into(), trace.to_string_lossy().into_owned()]);
        }
        if !has("--class") && !has("--prompt") && !has("--no-class") {
            args.extend(["--class".into(), "1".into()]);
        }
        args.extend(c.args.iter().filter(|a| *a != "--no-class").cloned());
        let out = Command::new(env!("CARGO_BIN_EXE_zipar-studio"))
            .args(&args)
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LOG")
            .output()
            .expect("binary runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let problems = [
            (
                out.status.code() != Some(2),
                format!("exit code {:?}", out.status.code()),
            ),
            (lines.len() != 1, format!("{} lines on stderr", lines.len())),
            (stderr.contains("panicked"), "a panic".into()),
            (
                !stderr.contains(c.want),
                format!("no {:?} in the message", c.want),
            ),
            (
                png.exists() || trace.exists(),
                "an output file was left".into(),
            ),
        ];
        for (bad, what) in problems {
            if bad {
                failures.push(format!("{}: {what}: {}", c.name, stderr.trim()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// A checkpoint split into shards with a `*.safetensors.index.json` (as 7B checkpoints come)
/// loads through the registry and decodes the same tokens as the single file; a missing
/// shard is named.
#[test]
fn a_sharded_checkpoint_loads_like_the_single_file() {
    use zipar_studio::decode::{Flow, GenerateParams, Mode, Sampling, generate};
    use zipar_studio::model::Condition;
    use zipar_studio::model::registry;
    let dir = model_with(|d| {
        let all =
            candle_core::safetensors::load(d.join("gpt.safetensors"), &Device::Cpu).expect("load");
        let mut names: Vec<&String> = all.keys().collect();
        names.sort();
        let mut map = serde_json::Map::new();
        let mut shards = [HashMap::new(), HashMap::new()];
        for (i, name) in names.iter().enumerate() {
            let file = format!("gpt-0000{}-of-00002.safetensors", i % 2 + 1);
            shards[i % 2].insert((*name).clone(), all[*name].clone());
            map.insert((*name).clone(), file.into());
        }
        for (i, shard) in shards.iter().enumerate() {
            let file = d.join(format!("gpt-0000{}-of-00002.safetensors", i + 1));
            candle_core::safetensors::save(shard, file).expect("save shard");
        }
        let index = serde_json::json!({ "metadata": {}, "weight_map": map });
        std::fs::write(d.join("gpt.safetensors.index.json"), index.to_string()).expect("index");
        std::fs::remove_file(d.join("gpt.safetensors")).expect("rm");
        edit_config(d, |c| {
            c["gpt_weights"] = "gpt.safetensors.index.json".into()
        });
    });
    let params = GenerateParams {
        mode: Mode::Zipar,
        window: 3,
        cfg_scale: 2.0,
        sampling: Sampling::Greedy,
        seed: 0,
        mask_unwritten: false,
    };
    let tokens = |path: &Path| {
        let mut m = registry::open(path, &Device::Cpu).expect("loads");
        generate(m.model.as_mut(), &Condition::Class(3), &params, &mut |_| {
            Flow::Continue
        })
        .expect("generates")
        .tokens
    };
    assert_eq!(tokens(dir.path()), tokens(&fixture("tiny")));
    std::fs::remove_file(dir.path().join("gpt-00002-of-00002.safetensors")).expect("rm");
    let err = registry::open(dir.path(), &Device::Cpu).expect_err("a shard is missing");
    assert!(
        err.to_string().contains("gpt-00002-of-00002.safetensors"),
        "{err}"
    );
}
