//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The reference outputs written by training/make_fixtures.py.
pub fn reference(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name).join("reference.json"))
        .expect("fixture reference.json (regenerate with training/make_fixtures.py)");
    serde_json::from_str(&text).expect("valid reference json")
}

/// A JSON array of numbers as f32.
pub fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

/// A JSON array of integers as u32.
pub fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("integer") as u32)
        .collect()
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Rows of logits, concatenated.
pub fn flat(rows: &[Vec<f32>]) -> Vec<f32> {
    rows.iter().flatten().copied().collect()
}

/// Conditional and unconditional logits within 1e-4 of a reference's `cond_logits` and
/// `uncond_logits`.
pub fn assert_logits_match(got: &zipar_studio::model::PassLogits, reference: &Value) {
    let d_cond = max_abs_diff(&flat(&got.cond), &f32s(&reference["cond_logits"]));
    let d_uncond = max_abs_diff(
        &flat(got.uncond.as_deref().expect("uncond")),
        &f32s(&reference["uncond_logits"]),
    );
    assert!(d_cond < 1e-4, "cond logits differ by {d_cond}");
    assert!(d_uncond < 1e-4, "uncond logits differ by {d_uncond}");
}

/// A prompt of `ids[..prompt]`, then the rest of `ids` in one pass: the logits of every row
/// within 1e-4 of `want` (one row per id).
pub fn one_pass_logits_match(
    gpt: &zipar_studio::model::llamagen::Gpt,
    ids: &[u32],
    want: &[Vec<f32>],
    prompt: usize,
    name: &str,
) {
    use zipar_studio::model::{Condition, ModelInput, RunOptions};
    let (mut session, first) = gpt
        .start(
            &Condition::Tokens(ids[..prompt].to_vec()),
            RunOptions::default(),
            None,
        )
        .expect("prefill");
    let d = max_abs_diff(&first.cond[0], &want[prompt - 1]);
    assert!(d < 1e-4, "{name}: prompt logits differ by {d}");
    let inputs = ModelInput::teacher_forced(&ids[prompt..]);
    let out = gpt.step(&mut session, &inputs).expect("pass");
    for (i, row) in out.cond.iter().enumerate() {
        let d = max_abs_diff(row, &want[prompt + i]);
        assert!(
            d < 1e-4,
            "{name}: one-pass logits at {} differ by {d}",
            prompt + i
        );
    }
}
