//! The shipped model loads through the ordinary LlamaGen path and decodes a full image.

use candle_core::Device;
use zipar_studio::decode::{Flow, GenerateParams, Mode, Sampling, generate};
use zipar_studio::model::llamagen::LlamaGen;
use zipar_studio::model::{Condition, ImageArModel};
use zipar_studio::prompt::ClassIndex;

#[test]
fn builtin_model_loads_matches_prompts_and_generates() {
    let dir = zipar_studio::default_model_dir();
    let mut model = LlamaGen::load(&dir, &Device::Cpu).expect("built-in model loads");
    assert_eq!(model.grid(), (16, 16));
    let classes = model.manifest.classes.clone().expect("class names");
    let index = ClassIndex::load(&dir.join(classes)).expect("classes.json");
    assert_eq!(index.classes().len(), model.manifest.gpt.num_classes);
    let m = index.best("red apple").expect("a match");
    assert_eq!(m.name, "red apple");
    let params = GenerateParams {
        mode: Mode::Zipar,
        window: 4,
        cfg_scale: 1.0,
        sampling: Sampling::Greedy,
        seed: 0,
        mask_unwritten: false,
    };
    let trace = generate(&mut model, &Condition::Class(m.id), &params, &mut |_| {
        Flow::Continue
    })
    .expect("generates");
    assert_eq!(trace.passes, 2 * 16 + 14 * 4);
    let img = model.decode_image(&trace.tokens).expect("decodes");
    assert_eq!((img.width, img.height), (64, 64));
}

#[test]
fn load_summary_counts_exactly_the_weights_in_the_file() {
    let dir = zipar_studio::default_model_dir();
    let manifest = zipar_studio::model::llamagen::Manifest::read(&dir).expect("manifest");
    let tensors =
        zipar_studio::weights::read_tensors(&dir.join(&manifest.gpt_weights)).expect("weights");
    let stored: usize = tensors.values().map(|t| t.elem_count()).sum();
    assert_eq!(manifest.gpt.num_params(), stored);
    let summary = zipar_studio::model::llamagen::load_summary(&dir, &Device::Cpu)
        .expect("summary")
        .text;
    let millions = format!("GPT {:.1}M parameters", stored as f64 / 1e6);
    assert!(summary.contains(&millions), "{summary}");
    assert!(summary.contains("as F32 on cpu"), "{summary}");
    assert!(summary.starts_with("gpt.safetensors "), "{summary}");
}

/// The shipped weights decode to the same greedy tokens as the PyTorch reference
/// (training/builtin_reference.py, run on the same f16 weights): NTP and ZipAR, with and
/// without CFG and masking of unwritten slots.
/// tests/fixtures/builtin_greedy.json (training/builtin_reference.py).
fn greedy_reference() -> serde_json::Value {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/builtin_greedy.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

/// Decodes a reference case's class greedily with its CFG scale and masking, in `mode`.
fn decode_case(
    model: &mut LlamaGen,
    case: &serde_json::Value,
    mode: Mode,
    window: usize,
) -> zipar_studio::decode::DecodeTrace {
    let params = GenerateParams {
        mode,
        window,
        cfg_scale: case["cfg"].as_f64().expect("cfg") as f32,
        sampling: Sampling::Greedy,
        seed: 0,
        mask_unwritten: case["mask_unwritten"].as_bool().expect("mask"),
    };
    let class = case["class"].as_u64().expect("class") as u32;
    generate(model, &Condition::Class(class), &params, &mut |_| {
        Flow::Continue
    })
    .expect("generates")
}

/// A reference case's tokens.
fn case_tokens(case: &serde_json::Value) -> Vec<u32> {
    case["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_u64().expect("token") as u32)
        .collect()
}

#[test]
fn builtin_model_matches_the_pytorch_reference_token_for_token() {
    let reference = greedy_reference();
    let dir = zipar_studio::default_model_dir();
    let mut model = LlamaGen::load(&dir, &Device::Cpu).expect("built-in model loads");
    for case in reference["cases"].as_array().expect("cases") {
        let trace = match case["window"].as_u64() {
            Some(w) => decode_case(&mut model, case, Mode::Zipar, w as usize),
            None => decode_case(&mut model, case, Mode::Ntp, 16),
        };
        let want = case_tokens(case);
        let same = trace
            .tokens
            .iter()
            .zip(&want)
            .filter(|(a, b)| a == b)
            .count();
        assert_eq!(
            (trace.tokens.len(), same, trace.passes as u64),
            (
                want.len(),
                want.len(),
                case["passes"].as_u64().expect("passes")
            ),
            "case {case:?}"
        );
    }
}

/// The eval classifier ships with the model, loads, and scores a decoded image: one logit per
/// class, features of the size of the real-image statistics.
#[test]
fn builtin_classifier_scores_a_generated_image() {
    use zipar_studio::model::classifier::{Classifier, frechet_distance};
    let dir = zipar_studio::default_model_dir();
    let mut model = LlamaGen::load(&dir, &Device::Cpu).expect("built-in model loads");
    let file = model
        .manifest
        .classifier
        .clone()
        .expect("the model ships a classifier");
    let classifier = Classifier::load(&dir.join(file), &Device::Cpu).expect("classifier loads");
    let params = GenerateParams {
        mode: Mode::Ntp,
        window: 16,
        cfg_scale: 1.0,
        sampling: Sampling::Greedy,
        seed: 0,
        mask_unwritten: false,
    };
    let trace = generate(&mut model, &Condition::Class(723), &params, &mut |_| {
        Flow::Continue
    })
    .expect("generates");
    let img = model.decode_image(&trace.tokens).expect("decodes");
    let scored = classifier.run(&[&img]).expect("scores");
    assert_eq!(scored.logits[0].len(), model.manifest.gpt.num_classes);
    assert_eq!(scored.features[0].len(), classifier.real.mean.len());
    assert!(scored.logits[0].iter().all(|x| x.is_finite()));
    let fd = frechet_distance(&classifier.real, &classifier.real).expect("fd");
    assert!(fd.abs() < 1e-3 * classifier.real.mean.len() as f64, "{fd}");
    assert!(
        classifier.heldout_top1.is_some(),
        "the file records its held-out accuracy"
    );
}

/// Greedy exact decoding is greedy NTP token for token on the built-in model (a draft is kept
/// only when it is the full-context argmax), in fewer passes: the reference's NTP cases,
/// decoded in the exact mode at windows 4 and 8, give the reference's tokens.
#[test]
fn greedy_exact_decoding_gives_the_reference_ntp_tokens() {
    let reference = greedy_reference();
    let mut model = LlamaGen::load(&zipar_studio::default_model_dir(), &Device::Cpu)
        .expect("built-in model loads");
    let mut checked = 0;
    for case in reference["cases"].as_array().expect("cases") {
        if !case["window"].is_null() {
            continue;
        }
        let want = case_tokens(case);
        for window in [4, 8] {
            let trace = decode_case(&mut model, case, Mode::Exact, window);
            let class = &case["class"];
            assert_eq!(trace.tokens, want, "class {class}, window {window}");
            assert!(
                trace.passes < want.len(),
                "window {window}: {} passes",
                trace.passes
            );
            checked += 1;
        }
    }
    assert!(checked >= 2, "the fixture has NTP cases");
}
