//! ZipAR-exact is lossless: on a mock model whose outputs are the true conditionals only when
//! every slot it reads holds consistent K/V, the exact mode's images follow the NTP law (known
//! by enumeration) in a chi-square test, and four broken decoders fail the same test
//! (shared/notes/zipar-exact.md, section 3.4).

use std::sync::Arc;

use zipar_studio::decode::exact::{self, ExactOptions, Flaws, Refresh};
use zipar_studio::decode::sampling::{cfg_combine, distribution};
use zipar_studio::decode::{Flow, GenerateParams, Layout, Mode, Sampling, generate};
use zipar_studio::model::{
    Condition, ImageArModel, ImageDecoder, ModelInput, PassLogits, RgbImage, RunOptions,
};

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn hash(items: impl IntoIterator<Item = u64>) -> u64 {
    items.into_iter().fold(0x5EED, |acc, x| mix(acc ^ x))
}

/// A value in [-1, 1).
fn unit(h: u64) -> f32 {
    (h >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// What a slot holds: its token, and whether its K/V was computed while every lower slot held
/// consistent K/V (`ok`), with the versions of the lower slots at that moment (`seen`).
#[derive(Debug, Clone)]
struct Rec {
    token: u32,
    ok: bool,
    seen: Vec<u64>,
}

/// The mock: logits predicting position i+1 from a query at slot i are a fixed function of the
/// tokens at slots 0..=i when every slot below i is consistent (the true conditional), and a
/// perturbed function of what the slots hold (stale or never written) otherwise, as stale or
/// missing K/V does in a transformer.
struct Mock {
    h: usize,
    w: usize,
    layout: Layout,
    vocab: usize,
    class: u64,
    cfg: bool,
    slots: Vec<Option<Rec>>,
    versions: Vec<u64>,
    next: u64,
}

const SEP: u32 = 99;
/// The class every sample is conditioned on.
const CLASS: u32 = 7;
const UNWRITTEN: u64 = 1_000;

impl Mock {
    fn new(h: usize, w: usize, layout: Layout, vocab: usize) -> Self {
        let len = match layout {
            Layout::Raster => h * w,
            Layout::EndOfRow => h * (w + 1) - 1,
        };
        Self {
            h,
            w,
            layout,
            vocab,
            class: u64::from(CLASS),
            cfg: false,
            slots: vec![None; len],
            versions: vec![0; len],
            next: 0,
        }
    }

    fn len(&self) -> usize {
        self.slots.len()
    }

    fn is_separator(&self, i: usize) -> bool {
        self.layout == Layout::EndOfRow && (i + 1).is_multiple_of(self.w + 1)
    }

    /// The true logits for position `i` after `prefix` (one half of CFG).
    fn true_logits(&self, uncond: bool, i: usize, prefix: &[u64]) -> Vec<f32> {
        let class = if uncond { u64::MAX } else { self.class };
        (0..self.vocab as u64)
            .map(|v| {
                2.0 * unit(hash(
                    [class, i as u64, v]
                        .into_iter()
                        .chain(prefix.iter().copied()),
                ))
            })
            .collect()
    }

    fn consistent(&self, j: usize) -> bool {
        match &self.slots[j] {
            None => false,
            Some(r) => r.ok && r.seen[..] == self.versions[..j],
        }
    }

    fn output(&self, pos: usize, uncond: bool) -> Vec<f32> {
        let held: Vec<u64> = (0..=pos)
            .map(|j| {
                self.slots[j]
                    .as_ref()
                    .map_or(UNWRITTEN, |r| u64::from(r.token))
            })
            .collect();
        let mut l = self.true_logits(uncond, pos + 1, &held);
        let ok = self.slots[pos].as_ref().is_some_and(|r| r.ok);
        if !ok {
            let stale: Vec<u64> = (0..pos).map(|j| u64::from(self.consistent(j))).collect();
            for (v, x) in l.iter_mut().enumerate() {
                let h = hash(
                    [0xBAD, u64::from(uncond), pos as u64, v as u64]
                        .into_iter()
                        .chain(held.iter().copied())
                        .chain(stale.iter().copied()),
                );
                *x += 1.5 * unit(h);
            }
        }
        l
    }

    /// The exact law of the cell grid (raster order, base-V index) under NTP.
    fn law(&self, cfg: f32, sampling: Sampling) -> Vec<f64> {
        let cells = self.h * self.w;
        let mut law = vec![0.0; self.vocab.pow(cells as u32)];
        let mut prefix = Vec::new();
        self.enumerate(cfg, sampling, &mut prefix, 1.0, &mut law);
        law
    }

    fn enumerate(
        &self,
        cfg: f32,
        sampling: Sampling,
        prefix: &mut Vec<u64>,
        prob: f64,
        law: &mut [f64],
    ) {
        let i = prefix.len();
        if i == self.len() {
            let index = prefix
                .iter()
                .enumerate()
                .filter(|(j, _)| !self.is_separator(*j))
                .fold(0, |acc, (_, &t)| acc * self.vocab + t as usize);
            law[index] += prob;
            return;
        }
        if self.is_separator(i) {
            prefix.push(u64::from(SEP));
            self.enumerate(cfg, sampling, prefix, prob, law);
            prefix.pop();
            return;
        }
        let cond = self.true_logits(false, i, prefix);
        let l = if cfg == 1.0 {
            cond
        } else {
            cfg_combine(&cond, &self.true_logits(true, i, prefix), cfg)
        };
        let d = distribution(&l, sampling);
        for (v, &p) in d.iter().enumerate() {
            if p > 0.0 {
                prefix.push(v as u64);
                self.enumerate(cfg, sampling, prefix, prob * f64::from(p), law);
                prefix.pop();
            }
        }
    }
}

struct NoDecoder(usize, usize, usize);

impl ImageDecoder for NoDecoder {
    fn decode(&self, _: &[u32]) -> anyhow::Result<RgbImage> {
        anyhow::bail!("the mock has no image decoder")
    }
    fn grid(&self) -> (usize, usize) {
        (self.0, self.1)
    }
    fn codebook_size(&self) -> usize {
        self.2
    }
}

impl ImageArModel for Mock {
    fn grid(&self) -> (usize, usize) {
        (self.h, self.w)
    }
    fn layout(&self) -> Layout {
        self.layout
    }
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn separator_token(&self) -> Option<u32> {
        (self.layout == Layout::EndOfRow).then_some(SEP)
    }
    fn prefill(&mut self, cond: &Condition, opts: RunOptions) -> anyhow::Result<PassLogits> {
        let Condition::Class(c) = cond else {
            anyhow::bail!("class conditions only")
        };
        self.class = u64::from(*c);
        self.cfg = opts.cfg;
        self.slots.iter_mut().for_each(|s| *s = None);
        self.versions.iter_mut().for_each(|v| *v = 0);
        Ok(PassLogits {
            cond: vec![self.true_logits(false, 0, &[])],
            uncond: self.cfg.then(|| vec![self.true_logits(true, 0, &[])]),
        })
    }
    fn step(&mut self, inputs: &[ModelInput]) -> anyhow::Result<PassLogits> {
        for input in inputs {
            anyhow::ensure!(input.pos < self.len(), "slot {} out of range", input.pos);
            self.next += 1;
            self.versions[input.pos] = self.next;
            self.slots[input.pos] = Some(Rec {
                token: input.token,
                ok: false,
                seen: Vec::new(),
            });
        }
        // K/V of this pass's inputs, lowest slot first: each sees the slots below it as they
        // are now.
        let mut order: Vec<usize> = inputs.iter().map(|i| i.pos).collect();
        order.sort_unstable();
        for pos in order {
            let ok = (0..pos).all(|j| self.consistent(j));
            let seen = self.versions[..pos].to_vec();
            if let Some(r) = self.slots[pos].as_mut() {
                r.ok = ok;
                r.seen = seen;
            }
        }
        let wanted = inputs.iter().filter(|i| i.wants_logits);
        Ok(PassLogits {
            cond: wanted.clone().map(|i| self.output(i.pos, false)).collect(),
            uncond: self
                .cfg
                .then(|| wanted.map(|i| self.output(i.pos, true)).collect()),
        })
    }
    fn image_decoder(&self) -> Arc<dyn ImageDecoder> {
        Arc::new(NoDecoder(self.h, self.w, self.vocab))
    }
}

/// One configuration of the test.
#[derive(Clone, Copy)]
struct Setup {
    h: usize,
    w: usize,
    layout: Layout,
    vocab: usize,
    window: usize,
    cfg: f32,
    sampling: Sampling,
}

const T1: Sampling = Sampling::Random {
    temperature: 1.0,
    top_k: 0,
    top_p: 1.0,
};

impl Setup {
    fn small(layout: Layout, window: usize) -> Self {
        Self {
            h: 3,
            w: 3,
            layout,
            vocab: 2,
            window,
            cfg: 1.0,
            sampling: T1,
        }
    }
    fn mock(&self) -> Mock {
        Mock::new(self.h, self.w, self.layout, self.vocab)
    }
}

/// Which decoder draws the samples.
#[derive(Clone, Copy)]
enum Decoder {
    Exact(ExactOptions),
    Lossy(Mode),
}

fn exact(refresh: Refresh) -> Decoder {
    Decoder::Exact(ExactOptions {
        refresh,
        ..Default::default()
    })
}

/// The policy with the fewest inputs per pass: at most one kept draft re-fed, one row ahead.
fn lean() -> Decoder {
    Decoder::Exact(ExactOptions {
        max_tail: 1,
        rows_ahead: Some(1),
        ..Default::default()
    })
}

fn flawed(refresh: Refresh, flaws: Flaws) -> Decoder {
    Decoder::Exact(ExactOptions {
        refresh,
        flaws,
        ..Default::default()
    })
}

/// Histogram of `n` images (seeds 0..n, two threads), and the mean pass count.
fn sample(setup: Setup, decoder: Decoder, n: u64) -> (Vec<u64>, f64) {
    let cells = setup.h * setup.w;
    let outcomes = setup.vocab.pow(cells as u32);
    let run = |seeds: std::ops::Range<u64>| {
        let mut mock = setup.mock();
        let mut counts = vec![0u64; outcomes];
        let mut passes = 0usize;
        for seed in seeds {
            let params = GenerateParams {
                mode: match decoder {
                    Decoder::Exact(_) => Mode::Exact,
                    Decoder::Lossy(m) => m,
                },
                window: setup.window,
                cfg_scale: setup.cfg,
                sampling: setup.sampling,
                seed,
                mask_unwritten: false,
            };
            let cond = Condition::Class(CLASS);
            let mut sink = |_: &_| Flow::Continue;
            let trace = match decoder {
                Decoder::Exact(o) => exact::generate_with(&mut mock, &cond, &params, o, &mut sink),
                Decoder::Lossy(_) => generate(&mut mock, &cond, &params, &mut sink),
            }
            .expect("mock run");
            passes += trace.passes;
            let index = trace
                .tokens
                .iter()
                .fold(0, |acc, &t| acc * setup.vocab + t as usize);
            counts[index] += 1;
        }
        (counts, passes)
    };
    let ((a, pa), (b, pb)) = std::thread::scope(|s| {
        let first = s.spawn(|| run(0..n / 2));
        let second = run(n / 2..n);
        (first.join().expect("sampling thread"), second)
    });
    let counts = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    (counts, (pa + pb) as f64 / n as f64)
}

/// Chi-square of the counts against the law (cells of expected count < 5 pooled), as a
/// Wilson-Hilferty z-score (z > 3.72 is p < 1e-4; z > 6.36 is p < 1e-10), and the total
/// variation distance. Samples where the law is zero give z = infinity.
fn chi_square(law: &[f64], counts: &[u64]) -> (f64, f64) {
    let n: u64 = counts.iter().sum();
    let n = n as f64;
    let (mut chi2, mut bins) = (0.0, 0usize);
    let (mut pooled_e, mut pooled_o) = (0.0, 0.0);
    let mut tv = 0.0;
    for (&p, &c) in law.iter().zip(counts) {
        let (e, o) = (p * n, c as f64);
        tv += (o / n - p).abs() / 2.0;
        if p == 0.0 && c > 0 {
            return (f64::INFINITY, tv);
        }
        if e >= 5.0 {
            chi2 += (o - e).powi(2) / e;
            bins += 1;
        } else {
            pooled_e += e;
            pooled_o += o;
        }
    }
    if pooled_e > 0.0 {
        chi2 += (pooled_o - pooled_e).powi(2) / pooled_e;
        bins += 1;
    }
    let df = (bins - 1) as f64;
    let z = ((chi2 / df).cbrt() - (1.0 - 2.0 / (9.0 * df))) / (2.0 / (9.0 * df)).sqrt();
    (z, tv)
}

const N: u64 = 200_000;

fn check(setup: Setup, decoder: Decoder, n: u64) -> (f64, f64, f64) {
    let law = setup.mock().law(setup.cfg, setup.sampling);
    let total: f64 = law.iter().sum();
    assert!((total - 1.0).abs() < 1e-6, "the law sums to {total}");
    let (counts, passes) = sample(setup, decoder, n);
    let (z, tv) = chi_square(&law, &counts);
    (z, tv, passes)
}

fn assert_exact(setup: Setup, decoder: Decoder, n: u64, what: &str) -> f64 {
    let (z, tv, passes) = check(setup, decoder, n);
    eprintln!("{what}: z {z:.2}, TV {tv:.4}, {passes:.2} passes");
    assert!(z < 3.72, "{what} is not NTP's law: z = {z:.2}, TV {tv:.4}");
    passes
}

fn assert_fails(setup: Setup, decoder: Decoder, n: u64, what: &str) {
    let (z, tv, passes) = check(setup, decoder, n);
    eprintln!("control {what}: z {z:.2}, TV {tv:.4}, {passes:.2} passes");
    assert!(
        z > 6.36,
        "the control {what} passed: z = {z:.2}, TV {tv:.4}"
    );
}

#[test]
fn the_exact_mode_has_the_ntp_law_on_a_3x3_grid() {
    let setup = Setup::small(Layout::Raster, 2);
    assert_exact(setup, Decoder::Lossy(Mode::Ntp), N, "NTP");
    let tail = assert_exact(setup, exact(Refresh::Off), N, "exact TAIL s=2");
    let coupled = assert_exact(setup, exact(Refresh::Coupled), N, "exact coupled s=2");
    // The drafts save passes: NTP needs 9.
    assert!(tail < 8.9 && coupled < 8.9, "passes {tail} / {coupled}");
}

#[test]
fn the_exact_mode_has_the_ntp_law_with_cfg_and_with_top_k() {
    let cfg = Setup {
        cfg: 2.0,
        ..Setup::small(Layout::Raster, 2)
    };
    assert_exact(cfg, exact(Refresh::Coupled), N, "exact, CFG 2");
    // Three tokens, top-k 2 at temperature 0.7: p and q have zeros.
    let top_k = Setup {
        vocab: 3,
        sampling: Sampling::Random {
            temperature: 0.7,
            top_k: 2,
            top_p: 1.0,
        },
        ..Setup::small(Layout::Raster, 2)
    };
    assert_exact(top_k, exact(Refresh::Coupled), N, "exact, T 0.7 top-k 2");
}

#[test]
fn the_exact_mode_has_the_ntp_law_at_window_3_and_with_separators() {
    let wide = Setup {
        w: 4,
        ..Setup::small(Layout::Raster, 3)
    };
    assert_exact(wide, exact(Refresh::Off), 300_000, "exact TAIL 3x4 s=3");
    // Three drafts in row 2: the lean policy re-feeds one kept draft per pass, not two.
    let long = Setup {
        w: 5,
        ..Setup::small(Layout::Raster, 2)
    };
    let lean_passes = assert_exact(long, lean(), 300_000, "exact lean 3x5 s=2");
    let full_passes = assert_exact(long, exact(Refresh::Coupled), 300_000, "exact 3x5 s=2");
    assert!(lean_passes > full_passes, "the lean cap did not bind");
    for s in [2, 3] {
        let eor = Setup::small(Layout::EndOfRow, s);
        assert_exact(
            eor,
            exact(Refresh::Coupled),
            N,
            &format!("exact end-of-row s={s}"),
        );
    }
}

#[test]
fn lossy_and_broken_decoders_fail_the_same_test() {
    let setup = Setup::small(Layout::Raster, 2);
    assert_fails(setup, Decoder::Lossy(Mode::Zipar), N, "lossy ZipAR");
    let no_residual = Flaws {
        no_residual: true,
        ..Default::default()
    };
    assert_fails(setup, flawed(Refresh::Off, no_residual), N, "no residual");
    let stale_q = Flaws {
        stale_q: true,
        ..Default::default()
    };
    // A refresh needs a rejection with untested drafts after it: two drafts in a row.
    let wide = Setup { w: 4, ..setup };
    assert_exact(
        wide,
        exact(Refresh::Coupled),
        300_000,
        "exact coupled 3x4 s=2",
    );
    assert_fails(
        wide,
        flawed(Refresh::Coupled, stale_q),
        300_000,
        "old q after a refresh",
    );
    let no_refeed = Flaws {
        no_refeed: true,
        ..Default::default()
    };
    assert_fails(wide, flawed(Refresh::Off, no_refeed), 300_000, "no re-feed");
}

#[test]
fn greedy_exact_decoding_is_greedy_ntp_token_for_token() {
    for (layout, s) in [
        (Layout::Raster, 2),
        (Layout::EndOfRow, 2),
        (Layout::EndOfRow, 3),
    ] {
        for refresh in [Refresh::Off, Refresh::Coupled] {
            for class in 0..50 {
                let mut mock = Mock::new(4, 4, layout, 3);
                let mut params = GenerateParams {
                    mode: Mode::Ntp,
                    window: s,
                    cfg_scale: 1.5,
                    sampling: Sampling::Greedy,
                    seed: 0,
                    mask_unwritten: false,
                };
                let cond = Condition::Class(class);
                let ntp =
                    generate(&mut mock, &cond, &params, &mut |_| Flow::Continue).expect("ntp");
                params.mode = Mode::Exact;
                let options = ExactOptions {
                    refresh,
                    ..Default::default()
                };
                let ex = exact::generate_with(&mut mock, &cond, &params, options, &mut |_| {
                    Flow::Continue
                })
                .expect("exact");
                assert_eq!(ex.tokens, ntp.tokens, "{layout:?} s={s} class {class}");
                assert!(ex.passes <= ntp.passes);
                let rec = ex.exact.as_ref().expect("exact record");
                let tested: usize = rec.tested_per_pass.iter().sum();
                assert!(tested > 0, "no draft was tested");
            }
        }
    }
}

/// The adaptive planner assumes the raster layout: on an end-of-row model it is refused with a
/// clear message instead of decoding the separators as image tokens.
#[test]
fn the_adaptive_window_is_refused_on_an_end_of_row_layout() {
    let mut model = Setup::small(Layout::EndOfRow, 2).mock();
    let params = GenerateParams {
        mode: Mode::Adaptive,
        window: 2,
        cfg_scale: 1.0,
        sampling: T1,
        seed: 0,
        mask_unwritten: false,
    };
    let e = generate(&mut model, &Condition::Class(0), &params, &mut |_| {
        Flow::Continue
    })
    .expect_err("refused")
    .to_string();
    assert!(e.contains("raster layout only"), "{e}");
    let raster = &mut Setup::small(Layout::Raster, 2).mock();
    assert!(
        generate(raster, &Condition::Class(0), &params, &mut |_| {
            Flow::Continue
        })
        .is_ok()
    );
}
