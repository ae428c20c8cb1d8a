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
    let dir = fixture("tiny_chameleon");
    let cfg = ChameleonConfig::read(&dir)
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
    let r = reference("tiny_chameleon");
    let ids = u32s(&r["ids"]);
    let want: Vec<Vec<f32>> = r["logits"]
        .as_array()
        .expect("rows")
        .iter()
        .map(f32s)
        .collect();
    let prompt = 4;
    let gpt = load(prompt, ids.len() - prompt);
    let opts = RunOptions::default();
    // one token per pass
    let (mut session, first) = gpt
        .start(&Condition::Tokens(ids[..prompt].to_vec()), opts, None)
        .expect("prefill");
    let d = max_abs_diff(&first.cond[0], &want[prompt - 1]);
    assert!(d < 1e-4, "prompt logits differ by {d}");
    for (pos, &token) in ids[prompt..].iter().enumerate() {
        let input = ModelInput {
            token,
            pos,
            wants_logits: true,
        };
        let out = gpt.step(&mut session, &[input]).expect("step");
        let d = max_abs_diff(&out.cond[0], &want[prompt + pos]);
        assert!(d < 1e-4, "logits at {} differ by {d}", prompt + pos);
    }
    // the rest in one pass of 8 inputs
    let (mut session, _) = gpt
        .start(&Condition::Tokens(ids[..prompt].to_vec()), opts, None)
        .expect("prefill");
    let inputs: Vec<ModelInput> = ids[prompt..]
        .iter()
        .enumerate()
        .map(|(pos, &token)| ModelInput {
            token,
            pos,
            wants_logits: true,
        })
        .collect();
    let out = gpt.step(&mut session, &inputs).expect("pass");
    for (i, row) in out.cond.iter().enumerate() {
        let d = max_abs_diff(row, &want[prompt + i]);
        assert!(d < 1e-4, "one-pass logits at {} differ by {d}", prompt + i);
    }
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
    assert!(err(Condition::Tokens(vec![1]), cfg_on).contains("classifier-free guidance"));
    // A grouped-query configuration is refused with its numbers.
    let mut gqa = cfg.clone();
    gqa.num_key_value_heads = Some(2);
    assert!(
        gqa.gpt_config(4)
            .unwrap_err()
            .to_string()
            .contains("2 key/value heads")
    );
}
