//! Attention capture on the built-in model: it changes no token, its probabilities are a
//! causal law over the slots, and the locality measure reads them.

use candle_core::Device;
use zipar_studio::decode::{Flow, GenerateParams, Mode, Sampling, generate};
use zipar_studio::model::llamagen::LlamaGen;
use zipar_studio::model::{Condition, ImageArModel, ModelInput};

fn model() -> LlamaGen {
    LlamaGen::load(&zipar_studio::default_model_dir(), &Device::Cpu).expect("built-in model")
}

#[test]
fn capturing_attention_changes_no_token() {
    let mut m = model();
    for (mode, sampling) in [
        (Mode::Ntp, Sampling::Greedy),
        (Mode::Zipar, Sampling::default()),
        (Mode::Adaptive, Sampling::default()),
        (Mode::Exact, Sampling::default()),
    ] {
        let params = GenerateParams {
            mode,
            window: 4,
            cfg_scale: 2.0,
            sampling,
            seed: 3,
            mask_unwritten: false,
        };
        let cond = Condition::Class(42);
        let off = generate(&mut m, &cond, &params, &mut |_| Flow::Continue).expect("off");
        assert!(m.set_attention_capture(Some(1)));
        let mut reported = 0;
        let on = generate(&mut m, &cond, &params, &mut |r| {
            // Each produced cell arrives with the attention of the query that drew it.
            assert_eq!(
                r.attention.len(),
                r.produced.len(),
                "{mode:?} pass {}",
                r.index
            );
            assert!(r.attention.iter().all(|a| a.pass <= r.index));
            reported += r.attention.len();
            Flow::Continue
        })
        .expect("on");
        m.set_attention_capture(None);
        assert_eq!(on.tokens, off.tokens, "{mode:?}");
        assert_eq!(reported, 256, "{mode:?}");
        assert!(off.retained_mass_of.is_empty());
        assert_eq!(on.retained_mass_of.len(), 256, "{mode:?}");
        assert!(
            on.retained_mass_of
                .iter()
                .all(|m| (0.0..=1.0001).contains(m))
        );
        // NTP sees everything it attends to; ZipAR, adaptive and exact drafts do not.
        let full = on.retained_mass_of.iter().all(|&m| m > 0.9999);
        assert_eq!(full, mode == Mode::Ntp, "{mode:?}");
    }
}

#[test]
fn captured_attention_is_a_causal_law_over_the_slots() {
    let mut m = model();
    assert!(m.set_attention_capture(Some(2)));
    let opts = zipar_studio::model::RunOptions {
        cfg: true,
        mask_unwritten: false,
    };
    m.prefill(&Condition::Class(7), opts).expect("prefill");
    let prefill = m.take_attention().expect("prefill attention");
    assert_eq!(prefill.mean.len(), 4, "one entry per layer");
    // A ZipAR-like pass: three inputs at scattered slots.
    let inputs: Vec<ModelInput> = [(5u32, 0usize), (9, 1), (11, 17)]
        .iter()
        .map(|&(token, pos)| ModelInput {
            token,
            pos,
            wants_logits: true,
        })
        .collect();
    m.step(&inputs).expect("step");
    let a = m.take_attention().expect("pass attention");
    assert_eq!(a.slots, vec![1, 2, 18]);
    assert_eq!(a.cond_len, 1);
    assert_eq!(a.head_layer, 2);
    assert_eq!(a.heads.len(), 4, "every head of layer 2");
    for layer in &a.mean {
        for (row, &slot) in layer.iter().zip(&a.slots) {
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-4, "row sums to {sum}");
            assert!(
                row[slot + 1..].iter().all(|&p| p == 0.0),
                "no attention after the query"
            );
            // The query sees itself.
            assert!(row[slot] > 0.0);
        }
    }
    // The mean over heads of layer 2 is the mean of its heads.
    for (i, row) in a.mean[2].iter().enumerate() {
        for (j, &p) in row.iter().enumerate() {
            let mean: f32 = a.heads.iter().map(|h| h[i][j]).sum::<f32>() / 4.0;
            assert!((p - mean).abs() < 1e-5);
        }
    }
    m.set_attention_capture(None);
    m.step(&inputs).expect("step");
    assert!(m.take_attention().is_none(), "off records nothing");
}

#[test]
fn the_built_in_model_attends_to_the_cell_above_more_than_to_the_previous_token() {
    let mut m = model();
    let base = GenerateParams {
        mode: Mode::Ntp,
        window: 16,
        cfg_scale: 2.0,
        sampling: Sampling::default(),
        seed: 0,
        mask_unwritten: false,
    };
    let conds: Vec<Condition> = [3u32, 700, 1500]
        .into_iter()
        .map(Condition::Class)
        .collect();
    let s = zipar_studio::locality::measure(&mut m, &conds, base, 1, 0.95, &mut || {})
        .expect("locality");
    assert_eq!(s.cells, 3 * 15 * 16);
    assert_eq!(s.needed_histogram.iter().sum::<usize>(), s.cells);
    // The retained mass grows with the window and is complete at the full width.
    assert!(s.mean_retained.windows(2).all(|p| p[0] <= p[1] + 1e-9));
    assert!((s.mean_retained[15] - 1.0).abs() < 1e-4);
    // The paper's Figure 3 on this model (README: 0.146 vs 0.028 over 16 classes).
    assert!(s.mean_above > 2.0 * s.mean_previous, "{s:?}");
}

/// The captured probabilities are the PyTorch reference's (training/attention_reference.py,
/// same f16 weights): the prefill, a 1-input pass and a 3-input ZipAR-like pass, per layer
/// (mean over heads) and per head of layer 2, within 1e-4.
#[test]
fn captured_attention_matches_the_pytorch_reference() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/builtin_attention.json");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json");
    let mut m = model();
    let head_layer = reference["head_layer"].as_u64().expect("head layer") as usize;
    assert!(m.set_attention_capture(Some(head_layer)));
    let class = reference["class"].as_u64().expect("class") as u32;
    let opts = zipar_studio::model::RunOptions {
        cfg: true,
        mask_unwritten: false,
    };
    let as_vec3 = |v: &serde_json::Value| -> Vec<Vec<Vec<f32>>> {
        serde_json::from_value(v.clone()).expect("[[[f32]]]")
    };
    let mut worst = 0f32;
    let mut compare = |got: &[Vec<Vec<f32>>], want: &[Vec<Vec<f32>>], what: &str| {
        assert_eq!(got.len(), want.len(), "{what}");
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert_eq!(g.len(), w.len(), "{what}: slots");
            for (a, b) in g.iter().zip(w) {
                worst = worst.max((a - b).abs());
            }
        }
    };
    for (k, pass) in reference["passes"]
        .as_array()
        .expect("passes")
        .iter()
        .enumerate()
    {
        if k == 0 {
            m.prefill(&Condition::Class(class), opts).expect("prefill");
        } else {
            let inputs: Vec<ModelInput> = pass["tokens"]
                .as_array()
                .expect("tokens")
                .iter()
                .zip(pass["positions"].as_array().expect("positions"))
                .map(|(t, p)| ModelInput {
                    token: t.as_u64().expect("token") as u32,
                    pos: p.as_u64().expect("pos") as usize,
                    wants_logits: true,
                })
                .collect();
            m.step(&inputs).expect("step");
        }
        let a = m.take_attention().expect("attention");
        compare(&a.mean, &as_vec3(&pass["mean"]), &format!("pass {k} mean"));
        compare(
            &a.heads,
            &as_vec3(&pass["heads"]),
            &format!("pass {k} heads"),
        );
    }
    eprintln!("largest difference from the reference: {worst:e}");
    assert!(worst < 1e-4, "largest difference {worst}");
}
