//! Bad input through the real binary: a clear one-line error and exit code 2, never a panic.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use common::fixture;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_zipar-studio"))
        .args(args)
        .output()
        .expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `generate` on `model` with extra flags and expects a one-line error containing `want`.
fn expect_error(model: &Path, extra: &[&str], want: &str) {
    let out_dir = tempfile::tempdir().expect("tempdir");
    let png = out_dir.path().join("x.png");
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().expect("utf8"),
        "--quiet",
        "--out",
        png.to_str().expect("utf8"),
    ];
    if !extra.contains(&"--class") {
        args.extend(["--class", "1"]);
    }
    args.extend(extra);
    let (code, _, stderr) = run(&args);
    assert_eq!(code, 2, "exit code for {extra:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {stderr}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(want),
        "{want:?} not in {stderr:?}"
    );
}

/// A copy of the tiny fixture whose files can be damaged.
fn model_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["config.json", "gpt.safetensors", "vq.safetensors"] {
        std::fs::copy(fixture("tiny").join(f), dir.path().join(f)).expect("copy");
    }
    dir
}

#[test]
fn missing_model_folder() {
    expect_error(Path::new("/no/such/model"), &[], "is not a model folder");
}

#[test]
fn missing_weight_file() {
    let d = model_copy();
    std::fs::remove_file(d.path().join("gpt.safetensors")).expect("rm");
    expect_error(d.path(), &[], "gpt.safetensors does not exist");
}

#[test]
fn truncated_weight_file() {
    let d = model_copy();
    let p = d.path().join("vq.safetensors");
    let bytes = std::fs::read(&p).expect("read");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).expect("write");
    expect_error(d.path(), &[], "cannot read weight file");
}

#[test]
fn file_with_no_tensors() {
    let d = model_copy();
    let empty: HashMap<String, candle_core::Tensor> = HashMap::new();
    candle_core::safetensors::save(&empty, d.path().join("gpt.safetensors")).expect("save");
    expect_error(d.path(), &[], "holds no tensors");
}

#[test]
fn wrong_key_names() {
    let d = model_copy();
    let p = d.path().join("gpt.safetensors");
    let tensors = candle_core::safetensors::load(&p, &candle_core::Device::Cpu).expect("load");
    let renamed: HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.replace("attention.wqkv", "attn.qkv_proj"), v))
        .collect();
    candle_core::safetensors::save(&renamed, &p).expect("save");
    expect_error(d.path(), &[], "layers.0.attention.wqkv.weight");
}

#[test]
fn shapes_that_disagree_with_the_config() {
    let d = model_copy();
    let p = d.path().join("config.json");
    let cfg = std::fs::read_to_string(&p)
        .expect("read")
        .replace("\"dim\": 64", "\"dim\": 128");
    std::fs::write(&p, cfg).expect("write");
    expect_error(d.path(), &[], "does not match the model config");
}

#[test]
fn corrupt_config() {
    let d = model_copy();
    std::fs::write(d.path().join("config.json"), "{ not json").expect("write");
    expect_error(d.path(), &[], "invalid model config");
}

#[test]
fn window_out_of_range() {
    let m = fixture("tiny");
    expect_error(&m, &["--window", "1"], "window 1 is out of range");
    expect_error(&m, &["--window", "7"], "window 7 is out of range");
}

#[test]
fn unknown_class() {
    expect_error(
        &fixture("tiny"),
        &["--class", "10"],
        "class id 10 is out of range",
    );
}

#[test]
fn bad_sampling_settings() {
    let m = fixture("tiny");
    expect_error(&m, &["--temperature", "0"], "temperature 0 is out of range");
    expect_error(&m, &["--top-p", "1.5"], "top-p 1.5 is out of range");
    expect_error(&m, &["--cfg=-1"], "cfg scale -1 is out of range");
}

#[test]
fn unwritable_output() {
    let (code, _, stderr) = run(&[
        "generate",
        "--model",
        fixture("tiny").to_str().expect("utf8"),
        "--class",
        "1",
        "--out",
        "/no/such/folder/x.png",
    ]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("folder /no/such/folder does not exist"),
        "{stderr}"
    );
}

#[test]
fn unavailable_device() {
    let m = fixture("tiny");
    if !cfg!(feature = "cuda") {
        expect_error(&m, &["--device", "cuda"], "device cuda is not available");
    }
    expect_error(&m, &["--device", "tpu"], "unknown device");
}

#[test]
fn generate_writes_png_and_trace_with_the_zipar_pass_count() {
    let out = tempfile::tempdir().expect("tempdir");
    let png = out.path().join("a.png");
    let trace = out.path().join("t.json");
    let (code, stdout, stderr) = run(&[
        "generate",
        "--model",
        fixture("tiny").to_str().expect("utf8"),
        "--class",
        "3",
        "--mode",
        "zipar",
        "--window",
        "3",
        "--greedy",
        "--quiet",
        "--out",
        png.to_str().expect("utf8"),
        "--trace",
        trace.to_str().expect("utf8"),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("21 passes"), "{stdout}");
    let img = image::open(&png).expect("valid png");
    assert_eq!((img.width(), img.height()), (6 * 2, 5 * 2));
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).expect("trace")).expect("json");
    // 2w + (h-2)s with h = 5, w = 6, s = 3
    assert_eq!(t["passes"], 21);
    for key in ["tokens", "pass_of", "window_of", "rejections_of"] {
        assert_eq!(t[key].as_array().expect(key).len(), 30, "{key}");
    }
    assert_eq!(t["pass_ms"].as_array().expect("pass_ms").len(), 21);
    assert_eq!(t["mode"], "zipar");
}

/// A copy of the tiny fixture whose config.json recommends `defaults`.
fn model_with_defaults(defaults: serde_json::Value) -> tempfile::TempDir {
    let d = model_copy();
    let path = d.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("config")).expect("json");
    cfg["defaults"] = defaults;
    std::fs::write(&path, cfg.to_string()).expect("write");
    d
}

#[test]
fn the_models_recommended_window_applies_unless_a_flag_overrides_it() {
    let d = model_with_defaults(serde_json::json!({"window": 3, "cfg": 1.0, "top_k": 5}));
    let out = tempfile::tempdir().expect("tempdir");
    let png = out.path().join("a.png");
    let model = d.path().to_str().expect("utf8");
    let base = [
        "generate", "--model", model, "--class", "2", "--quiet", "--out",
    ];
    let png = png.to_str().expect("utf8");
    let (code, stdout, stderr) = run(&[&base[..], &[png]].concat());
    assert_eq!(code, 0, "{stderr}");
    // 2w + (h-2)s with h = 5, w = 6 and the recommended s = 3
    assert!(stdout.contains("window 3: 21 passes"), "{stdout}");
    let (code, stdout, stderr) = run(&[&base[..], &[png, "--window", "5"]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("window 5: 27 passes"), "{stdout}");
}

#[test]
fn recommended_defaults_out_of_range_are_refused() {
    let d = model_with_defaults(serde_json::json!({"window": 9}));
    expect_error(d.path(), &[], "defaults: window 9 is out of range");
    let d = model_with_defaults(serde_json::json!({"temperature": 0.0}));
    expect_error(d.path(), &[], "defaults: temperature 0 is out of range");
    let d = model_with_defaults(serde_json::json!({"cfg_scale": 2.0}));
    expect_error(d.path(), &[], "unknown field `cfg_scale`");
}

/// Tokens of a `generate` run (greedy ZipAR-2, class 4) on `model` with `extra` flags.
fn tokens_of(model: &Path, extra: &[&str]) -> Vec<u64> {
    let out = tempfile::tempdir().expect("tempdir");
    let png = out.path().join("a.png");
    let trace = out.path().join("t.json");
    let base = [
        "generate", "--class", "4", "--mode", "zipar", "--window", "2", "--greedy", "--quiet",
    ];
    let paths = [
        "--model",
        model.to_str().expect("utf8"),
        "--out",
        png.to_str().expect("utf8"),
        "--trace",
        trace.to_str().expect("utf8"),
    ];
    let (code, _, stderr) = run(&[&base[..], &paths[..], extra].concat());
    assert_eq!(code, 0, "{stderr}");
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).expect("trace")).expect("json");
    t["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|v| v.as_u64().expect("token"))
        .collect()
}

#[test]
fn a_models_mask_unwritten_recommendation_applies_and_can_be_turned_off() {
    let plain = fixture("tiny");
    let masked = model_with_defaults(serde_json::json!({"mask_unwritten": true}));
    let with_flag = tokens_of(&plain, &["--mask-unwritten"]);
    let without = tokens_of(&plain, &[]);
    assert_eq!(tokens_of(masked.path(), &[]), with_flag);
    assert_eq!(
        tokens_of(masked.path(), &["--mask-unwritten=false"]),
        without
    );
    // Otherwise the checks above could not tell the two apart.
    assert_ne!(
        with_flag, without,
        "masking should change some greedy tokens here"
    );
}

/// A model error is said once: "model error: X", not "model error: X: X" (the engine's error
/// used to carry its message as a source too).
#[test]
fn a_model_error_is_said_once() {
    let out_dir = tempfile::tempdir().expect("tempdir");
    let png = out_dir.path().join("x.png");
    // tiny_t2i names no text encoder: its prefill refuses the caption inside the engine.
    let model = fixture("tiny_t2i");
    for mode in ["ntp", "exact"] {
        let (code, _, stderr) = run(&[
            "generate",
            "--model",
            model.to_str().expect("utf8"),
            "--prompt",
            "a cat",
            "--mode",
            mode,
            "--quiet",
            "--out",
            png.to_str().expect("utf8"),
        ]);
        assert_eq!(code, 2, "{stderr}");
        assert_eq!(
            stderr.matches("no text encoder").count(),
            1,
            "{mode}: {stderr}"
        );
    }
}
