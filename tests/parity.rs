//! Numerical parity with the PyTorch reference (training/make_fixtures.py): teacher-forced
//! logits within 1e-4, greedy NTP and ZipAR tokens exactly, VQ pixels within 1e-4.

mod common;

use candle_core::Device;
use common::{assert_logits_match, f32s, fixture, flat, max_abs_diff, reference, u32s};
use zipar_studio::decode::{Flow, GenerateParams, Mode, Sampling, generate};
use zipar_studio::model::llamagen::LlamaGen;
use zipar_studio::model::{Condition, ImageArModel, ModelInput, PassLogits, RunOptions};

fn load(name: &str) -> LlamaGen {
    LlamaGen::load(&fixture(name), &Device::Cpu).expect("fixture model loads")
}

/// Prefill plus one pass over every token but the last: logits for every cell.
fn teacher_forced(model: &mut dyn ImageArModel, cond: &Condition, tokens: &[u32]) -> PassLogits {
    zipar_studio::eval::teacher_forced(model, cond, tokens, true).expect("teacher forcing")
}

#[test]
fn teacher_forced_logits_match_reference() {
    let r = reference("tiny");
    let tf = &r["teacher_forced"];
    let mut model = load("tiny");
    let class = tf["class"].as_u64().expect("class") as u32;
    let got = teacher_forced(&mut model, &Condition::Class(class), &u32s(&tf["tokens"]));
    assert_logits_match(&got, tf);
}

#[test]
fn greedy_tokens_match_reference_for_ntp_and_zipar() {
    let r = reference("tiny");
    let mut model = load("tiny");
    let runs = r["greedy"].as_array().expect("runs");
    assert!(runs.len() >= 12);
    for run in runs {
        let mode = match run["mode"].as_str() {
            Some("ntp") => Mode::Ntp,
            _ => Mode::Zipar,
        };
        let params = GenerateParams {
            mode,
            window: run["window"].as_u64().expect("window") as usize,
            cfg_scale: run["cfg"].as_f64().expect("cfg") as f32,
            sampling: Sampling::Greedy,
            seed: 0,
            mask_unwritten: run["mask_unwritten"].as_bool().expect("mask"),
        };
        let cond = Condition::Class(run["class"].as_u64().expect("class") as u32);
        let trace =
            generate(&mut model, &cond, &params, &mut |_| Flow::Continue).expect("generation runs");
        assert_eq!(
            trace.tokens,
            u32s(&run["tokens"]),
            "tokens differ for {params:?}"
        );
        assert_eq!(
            trace.passes as u64,
            run["passes"].as_u64().expect("passes"),
            "{params:?}"
        );
    }
}

#[test]
fn masking_unwritten_slots_changes_logits_only_where_slots_are_unwritten() {
    let mut model = load("tiny");
    let mut logits_at = |pos: usize, mask_unwritten: bool| {
        let opts = RunOptions {
            cfg: false,
            mask_unwritten,
        };
        model.prefill(&Condition::Class(2), opts).expect("prefill");
        let input = ModelInput {
            token: 7,
            pos,
            wants_logits: true,
        };
        model.step(&[input]).expect("step").cond
    };
    // Slots 0..5 of the grid were never written: hiding them changes the result, and both
    // variants match the reference.
    let r = reference("tiny");
    let plain = logits_at(5, false);
    let masked = logits_at(5, true);
    assert_ne!(plain, masked);
    let d = max_abs_diff(&plain[0], &f32s(&r["unwritten_step"]["false"]));
    assert!(d < 1e-4, "unmasked logits differ by {d}");
    let d = max_abs_diff(&masked[0], &f32s(&r["unwritten_step"]["true"]));
    assert!(d < 1e-4, "masked logits differ by {d}");
    // Right after the condition every earlier slot is written: no difference.
    assert_eq!(logits_at(0, false), logits_at(0, true));
}

#[test]
fn vq_decoder_matches_reference() {
    let r = reference("tiny");
    let vq = &r["vq"];
    let model = load("tiny");
    let (h, w) = model.grid();
    let x = model
        .vq()
        .decode(&u32s(&vq["codes"]), h, w)
        .expect("decode")
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("to vec");
    let d = max_abs_diff(&x, &f32s(&vq["pixels"]));
    assert!(d < 1e-4, "pixels differ by {d}");
    let img = model.decode_image(&u32s(&vq["codes"])).expect("image");
    let want: Vec<u8> = u32s(&vq["rgb8"]).iter().map(|&v| v as u8).collect();
    let shape = u32s(&vq["shape"]);
    assert_eq!(
        (img.height, img.width),
        (shape[1] as usize, shape[2] as usize)
    );
    let off = img
        .pixels
        .iter()
        .zip(&want)
        .filter(|(a, b)| a.abs_diff(**b) > 1)
        .count();
    assert_eq!(off, 0, "8-bit pixels differ by more than one step");
}

#[test]
fn taming_vqgan_decoder_matches_reference() {
    // Chameleon's (Lumina-mGPT's) image decoder: taming-transformers' VQGAN, read through the
    // LlamaGen decoder with `style: taming` (training/make_vqgan_fixture.py). The file also
    // holds a loss weight the decoder must not need.
    let r = reference("tiny_vqgan");
    let cfg: zipar_studio::model::llamagen::VqConfig =
        serde_json::from_value(r["vq"].clone()).expect("vq config");
    assert_eq!(cfg.style, zipar_studio::model::llamagen::VqStyle::Taming);
    let path = fixture("tiny_vqgan").join("vqgan.safetensors");
    let vb = zipar_studio::weights::var_builder(&path, candle_core::DType::F32, &Device::Cpu)
        .expect("weights");
    let vq = zipar_studio::model::llamagen::VqDecoder::load(&cfg, vb).expect("decoder");
    let grid = u32s(&r["grid"]);
    let (h, w) = (grid[0] as usize, grid[1] as usize);
    let codes = u32s(&r["codes"]);
    let x = vq
        .decode(&codes, h, w)
        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
        .expect("decode");
    let d = max_abs_diff(&x, &f32s(&r["pixels"]));
    assert!(d < 1e-4, "pixels differ by {d}");
    // Chameleon's VQGAN as released: a Lightning checkpoint, the state dict under "state_dict"
    // next to training state. Same weights, same pixels.
    let ckpt = fixture("tiny_vqgan").join("vqgan.ckpt");
    let vb = zipar_studio::weights::var_builder(&ckpt, candle_core::DType::F32, &Device::Cpu)
        .expect("lightning checkpoint");
    let from_ckpt = zipar_studio::model::llamagen::VqDecoder::load(&cfg, vb)
        .and_then(|v| v.decode(&codes, h, w))
        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
        .expect("decode");
    assert_eq!(from_ckpt, x, "the .ckpt and .safetensors decoders differ");
    let img = vq.decode_rgb(&codes, h, w).expect("image");
    let shape = u32s(&r["shape"]);
    assert_eq!(
        (img.height, img.width),
        (shape[1] as usize, shape[2] as usize)
    );
    let want: Vec<u8> = u32s(&r["rgb8"]).iter().map(|&v| v as u8).collect();
    let off = img
        .pixels
        .iter()
        .zip(&want)
        .filter(|(a, b)| a.abs_diff(**b) > 1)
        .count();
    assert_eq!(off, 0, "8-bit pixels differ by more than one step");
    // Read as LlamaGen's layout, the same file is refused (its keys are named otherwise).
    let llamagen = zipar_studio::model::llamagen::VqConfig {
        style: zipar_studio::model::llamagen::VqStyle::LlamaGen,
        ..cfg
    };
    let vb = zipar_studio::weights::var_builder(&path, candle_core::DType::F32, &Device::Cpu)
        .expect("weights");
    assert!(zipar_studio::model::llamagen::VqDecoder::load(&llamagen, vb).is_err());
}

#[test]
fn pickle_checkpoints_load_like_safetensors() {
    // gpt.pt keeps the state dict under "model" (DDP files), vq.pt at the top (FSDP files).
    let src = fixture("tiny");
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["gpt.pt", "vq.pt"] {
        std::fs::copy(src.join(f), dir.path().join(f)).expect("copy");
    }
    let cfg = std::fs::read_to_string(src.join("config.json"))
        .expect("config")
        .replace("gpt.safetensors", "gpt.pt")
        .replace("vq.safetensors", "vq.pt");
    std::fs::write(dir.path().join("config.json"), cfg).expect("write config");
    let mut from_pt = LlamaGen::load(dir.path(), &Device::Cpu).expect("pickles load");
    let mut from_st = load("tiny");
    let r = reference("tiny");
    let tokens = u32s(&r["teacher_forced"]["tokens"]);
    let a = teacher_forced(&mut from_pt, &Condition::Class(1), &tokens);
    let b = teacher_forced(&mut from_st, &Condition::Class(1), &tokens);
    assert_eq!(a, b);
    let codes = u32s(&r["vq"]["codes"]);
    assert_eq!(
        from_pt.decode_image(&codes).expect("decode"),
        from_st.decode_image(&codes).expect("decode")
    );
}

#[test]
fn caption_conditioned_logits_match_reference() {
    let r = reference("tiny_t2i");
    let mut model = load("tiny_t2i");
    let values = f32s(&r["caption"]);
    let cond = Condition::Caption {
        len: 4,
        values: values.clone(),
    };
    let got = teacher_forced(&mut model, &cond, &u32s(&r["tokens"]));
    assert_logits_match(&got, &r);
    // A class is refused by a text-conditional model, and vice versa.
    assert!(
        model
            .prefill(&Condition::Class(0), RunOptions::default())
            .is_err()
    );
    let mut c2i = load("tiny");
    assert!(c2i.prefill(&cond, RunOptions::default()).is_err());
}

#[test]
fn ntp_and_full_window_zipar_give_identical_tokens_when_sampling() {
    let mut model = load("tiny");
    let mut run = |mode, window| {
        let params = GenerateParams {
            mode,
            window,
            cfg_scale: 2.0,
            sampling: Sampling::Random {
                temperature: 1.0,
                top_k: 20,
                top_p: 0.9,
            },
            seed: 42,
            mask_unwritten: false,
        };
        generate(&mut model, &Condition::Class(5), &params, &mut |_| {
            Flow::Continue
        })
        .expect("runs")
    };
    let ntp = run(Mode::Ntp, 6);
    let full = run(Mode::Zipar, 6);
    assert_eq!(ntp.tokens, full.tokens);
    assert_eq!(ntp.passes, 30);
    let z = run(Mode::Zipar, 3);
    assert_eq!(z.passes, 2 * 6 + 3 * 3);
    // Same seed, same result.
    assert_eq!(z.tokens, run(Mode::Zipar, 3).tokens);
}

#[test]
fn stop_from_the_sink_cancels_between_passes_and_the_model_stays_usable() {
    let mut model = load("tiny");
    let params = GenerateParams {
        mode: Mode::Zipar,
        window: 3,
        cfg_scale: 1.0,
        sampling: Sampling::Greedy,
        seed: 0,
        mask_unwritten: false,
    };
    let mut seen = 0;
    let err = generate(&mut model, &Condition::Class(1), &params, &mut |r| {
        seen = r.index + 1;
        if r.index == 4 {
            Flow::Stop
        } else {
            Flow::Continue
        }
    })
    .expect_err("cancelled");
    assert_eq!(seen, 5);
    assert!(
        err.to_string().contains("cancelled after 5 of 21 passes"),
        "{err}"
    );
    // The next run on the same model is complete and correct.
    let trace = generate(&mut model, &Condition::Class(1), &params, &mut |_| {
        Flow::Continue
    })
    .expect("runs after a cancel");
    assert!(trace.is_complete());
    assert_eq!(trace.passes, 21);
}

#[test]
fn adaptive_runs_within_the_fixed_bounds_and_full_window_is_ntp() {
    let mut model = load("tiny");
    let mut run = |mode, window, sampling| {
        let params = GenerateParams {
            mode,
            window,
            cfg_scale: 2.0,
            sampling,
            seed: 9,
            mask_unwritten: false,
        };
        generate(&mut model, &Condition::Class(4), &params, &mut |_| {
            Flow::Continue
        })
        .expect("runs")
    };
    let sampled = Sampling::Random {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
    };
    // s_min = w is plain NTP, token for token.
    assert_eq!(
        run(Mode::Adaptive, 6, sampled).tokens,
        run(Mode::Ntp, 6, sampled).tokens
    );
    let mut rejected = 0;
    for seed_sampling in [sampled, Sampling::Greedy] {
        for s_min in 2..=5 {
            let t = run(Mode::Adaptive, s_min, seed_sampling);
            assert!(t.is_complete());
            let lo = 2 * 6 + 3 * s_min;
            assert!(
                t.passes >= lo && t.passes <= 30,
                "s_min {s_min}: {}",
                t.passes
            );
            assert_eq!(t.mode, Mode::Adaptive);
            // Rows 2.. run under at least s_min; the first row's windows are the full width.
            assert!(t.window_of[12..].iter().all(|&x| x >= s_min && x <= 6));
            assert_eq!(t.tokens_per_pass.iter().sum::<usize>(), 30);
            rejected += t.rejections_of.iter().sum::<u32>();
        }
    }
    assert!(rejected > 0, "a random model should reject some drafts");
}

/// The GPU code path (candle's attention with a mask tensor, slot-major key cache, candle's
/// matmul) runs on the CPU too when the weights are not f32: it must agree with the CPU
/// kernels' path on a ZipAR-shaped pass with unwritten slots masked.
#[test]
fn candle_attention_path_agrees_with_the_cpu_kernels() {
    use candle_core::DType;
    use zipar_studio::model::llamagen::Gpt;
    let dir = fixture("tiny");
    let manifest = zipar_studio::model::llamagen::Manifest::read(&dir).expect("manifest");
    let path = dir.join(&manifest.gpt_weights);
    let build = |dtype: DType| {
        let vb = zipar_studio::weights::var_builder(&path, dtype, &Device::Cpu).expect("weights");
        Gpt::load(&manifest.gpt, manifest.grid_h, manifest.grid_w, vb).expect("gpt")
    };
    let run = |gpt: &Gpt| {
        let opts = RunOptions {
            cfg: true,
            mask_unwritten: true,
        };
        let (mut s, first) = gpt
            .start(&Condition::Class(1), opts, None)
            .expect("prefill");
        let mut out = flat(&first.cond);
        let row0: Vec<ModelInput> = (0..6)
            .map(|pos| ModelInput {
                token: (pos * 7 % 96) as u32,
                pos,
                wants_logits: true,
            })
            .collect();
        out.extend(flat(&gpt.step(&mut s, &row0).expect("row 0").cond));
        // Two rows at once, with most of row 1 never written.
        let staircase = [(11, 6), (3, 7), (40, 12)].map(|(token, pos)| ModelInput {
            token,
            pos,
            wants_logits: true,
        });
        out.extend(flat(&gpt.step(&mut s, &staircase).expect("staircase").cond));
        out
    };
    let fast = run(&build(DType::F32));
    let candle = run(&build(DType::F16));
    let diff = max_abs_diff(&fast, &candle);
    assert!(diff < 0.05, "f32 kernels vs f16 candle path: {diff}");
}

#[test]
fn acceptance_is_one_along_the_full_context_and_below_one_for_zipar_drafts() {
    use zipar_studio::acceptance::{measure, ntp_laws, overlap, schedule_laws};
    use zipar_studio::decode::{Layout, Schedule};
    let mut model = load("tiny");
    let cond = Condition::Class(3);
    let base = GenerateParams {
        mode: Mode::Ntp,
        window: 6,
        cfg_scale: 2.0,
        sampling: Sampling::Random {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        },
        seed: 7,
        mask_unwritten: false,
    };
    let x = generate(&mut model, &cond, &base, &mut |_| Flow::Continue)
        .expect("runs")
        .tokens;
    let p = ntp_laws(&mut model, &cond, &x, 2.0, base.sampling).expect("p");
    // The NTP schedule teacher-forced is the full context again: q = p cell for cell.
    let ntp = Schedule::ntp(5, 6, Layout::Raster).expect("schedule");
    let q = schedule_laws(&mut model, &cond, &ntp, &x, 2.0, base.sampling, false).expect("q");
    for (i, (a, b)) in p.iter().zip(&q).enumerate() {
        assert!(overlap(a, b) > 1.0 - 1e-4, "cell {i}: {}", overlap(a, b));
    }
    // ZipAR with s = 2 drafts rows 2..4 under partial context: rows 0 and 1 are NTP's.
    let r = measure(
        &mut model,
        std::slice::from_ref(&cond),
        base,
        &[2, 6],
        &[0, 1, 2],
        &mut || {},
    )
    .expect("measure");
    assert_eq!(r[0].samples, 3);
    assert!(
        r[0].per_row[..2].iter().all(|&a| a > 1.0 - 1e-4),
        "{:?}",
        r[0].per_row
    );
    assert!(
        r[0].drafted < 0.999,
        "drafts under partial context differ: {}",
        r[0].drafted
    );
    assert!(r[0].drafted > 0.0);
    // Cells the schedule predicts after the row above is complete are not drafts: the exact
    // mode samples them in its verifying chain. Lossy ZipAR predicts them over the stale K/V
    // of the row's drafted cells, so they sit between the drafts and 1.
    let zipar = Schedule::zipar(5, 6, Layout::Raster, 2).expect("schedule");
    let drafted = zipar_studio::acceptance::drafted_cells(&zipar);
    // s = 2: rows 2..4 start 2 behind, so columns 0..=3 of each are drafted
    assert_eq!(drafted.iter().filter(|&&d| d).count(), 3 * 4);
    assert_eq!(r[0].drafted_cells, 12);
    let q2 = schedule_laws(&mut model, &cond, &zipar, &x, 2.0, base.sampling, false).expect("q");
    let mean_a = |want: bool| {
        let cells: Vec<usize> = (12..30).filter(|&i| drafted[i] == want).collect();
        cells.iter().map(|&i| overlap(&p[i], &q2[i])).sum::<f64>() / cells.len() as f64
    };
    assert!(
        mean_a(false) > mean_a(true),
        "{} vs {}",
        mean_a(false),
        mean_a(true)
    );
    // The full-width window is NTP's context (the row above is complete).
    assert_eq!(r[1].drafted_cells, 0, "s = w drafts nothing");
    assert!(r[1].all > 1.0 - 1e-4, "{}", r[1].all);
}

#[test]
fn the_z_test_accepts_ntp_samples_and_rejects_samples_from_another_law() {
    use zipar_studio::eval::score_sample;
    let mut model = load("tiny");
    let law = |temperature| Sampling::Random {
        temperature,
        top_k: 0,
        top_p: 1.0,
    };
    // z over 80 images drawn with `draw`, scored against the law NTP draws from at T = 1
    let mut z = |draw: Sampling| {
        let (mut excess, mut variance) = (0.0, 0.0);
        for seed in 0..40 {
            for (k, class) in [1, 5].into_iter().enumerate() {
                let params = GenerateParams {
                    mode: Mode::Ntp,
                    window: 6,
                    cfg_scale: 2.0,
                    sampling: draw,
                    // independent streams (eval's rule)
                    seed: zipar_studio::eval::sample_seed(seed, k),
                    mask_unwritten: false,
                };
                let cond = Condition::Class(class);
                let x = generate(&mut model, &cond, &params, &mut |_| Flow::Continue)
                    .expect("runs")
                    .tokens;
                let s = score_sample(&mut model, &cond, &x, 2.0, law(1.0)).expect("scores");
                excess += s.excess;
                variance += s.variance;
            }
        }
        excess / f64::sqrt(variance)
    };
    let exact = z(law(1.0));
    assert!(exact.abs() < 4.0, "NTP's own law: z = {exact}");
    let hot = z(law(1.6));
    assert!(hot > 4.0, "samples from a hotter law: z = {hot}");
}

/// The GPT does not change during a run: the run's cache is a session value, so two sessions
/// on one loaded GPT, interleaved pass by pass, give each the logits it gets alone.
#[test]
fn two_sessions_on_one_gpt_do_not_see_each_other() {
    use zipar_studio::model::llamagen::Gpt;
    let dir = fixture("tiny");
    let manifest = zipar_studio::model::llamagen::Manifest::read(&dir).expect("manifest");
    let path = dir.join(&manifest.gpt_weights);
    let vb = zipar_studio::weights::var_builder(&path, candle_core::DType::F32, &Device::Cpu)
        .expect("weights");
    let gpt = Gpt::load(&manifest.gpt, manifest.grid_h, manifest.grid_w, vb).expect("gpt");
    let opts = RunOptions::default();
    let feed = |pos: usize, class: u32| {
        [ModelInput {
            token: (pos as u32 * 5 + class) % 96,
            pos,
            wants_logits: true,
        }]
    };
    let alone = |class: u32| {
        let (mut s, first) = gpt
            .start(&Condition::Class(class), opts, None)
            .expect("start");
        let mut out = flat(&first.cond);
        for pos in 0..8 {
            out.extend(flat(
                &gpt.step(&mut s, &feed(pos, class)).expect("step").cond,
            ));
        }
        out
    };
    let (a_alone, b_alone) = (alone(1), alone(2));
    let (mut a, fa) = gpt.start(&Condition::Class(1), opts, None).expect("start");
    let (mut b, fb) = gpt.start(&Condition::Class(2), opts, None).expect("start");
    let (mut a_out, mut b_out) = (flat(&fa.cond), flat(&fb.cond));
    for pos in 0..8 {
        a_out.extend(flat(&gpt.step(&mut a, &feed(pos, 1)).expect("a").cond));
        b_out.extend(flat(&gpt.step(&mut b, &feed(pos, 2)).expect("b").cond));
    }
    assert_eq!(a_out, a_alone);
    assert_eq!(b_out, b_alone);
    assert_ne!(a_out, b_out);
}
