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
        let on = generate(&mut m, &cond, &params, &mut |_| Flow::Continue).expect("on");
        m.set_attention_capture(None);
        assert_eq!(on.tokens, off.tokens, "{mode:?}");
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
