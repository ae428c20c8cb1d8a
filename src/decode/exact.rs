//! ZipAR-exact: ZipAR's row staircase used as a drafter, made lossless by speculative
//! sampling (shared/notes/zipar-exact.md).
//!
//! Every token that ZipAR decodes early, under a partial row above, becomes a *draft* x with
//! the law q it was drawn from. A draft is tested once, in the first pass in which every
//! earlier position is final, against the full-context NTP distribution p: accept with
//! min(1, p(x)/q(x)), else take a sample of norm(max(0, p - q)). Every token therefore has
//! exactly NTP's law. When every draft is accepted the run has ZipAR's pass count.
//!
//! One pass feeds:
//! - **the chain**: the last final token at its slot, then every draft right after it, re-fed
//!   so that their K/V see only final context (rule R1). The walk down the chain tests the
//!   drafts in raster order and ends with a rejection (residual sample), a plain sample from p
//!   (the next cell had no draft) or the end of the chain. A separator of the end-of-row
//!   layout is a known token: it is re-fed like a draft and never tested.
//! - **one drafting input per started row** whose next cell lies beyond the chain: ZipAR's
//!   input (the auxiliary token at the end of the row above for a row's first cell). When that
//!   slot is in the chain, its chain logits are used instead (one input per slot).
//!
//! After a rejection the row's untested drafts stay drafts (TAIL) and are tested next pass.
//! With [`Refresh::Coupled`] they are first refreshed by maximal coupling with this pass's
//! logits, storing q := p' (SJD-PAC's adaptive continuation). Rows start as in the official
//! ZipAR schedule, so the window only changes the speed, never the law.
//!
//! Rules kept (note, section 3.2): R1 re-feed accepted drafts; R2 store q exactly as sampled
//! (CFG, temperature, top-k, top-p) and p' after a refresh; R3 one test per draft, a rejection
//! finalises the cell; R4 fresh uniforms; R5 one input per slot; R6 no selection on a draft's
//! own value; R7 q(x) > 0 for every draft. [`Flaws`] breaks R1, R2 or the residual on purpose,
//! for the exactness test's controls.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::adaptive::{Verdict, residual, verify};
use super::engine::{
    EngineError, Flow, GenerateParams, PassReport, RunSetup, check_rows, combine, finish_pass,
    setup,
};
use super::sampling::{Sampling, argmax, distribution};
use super::schedule::{Cell, Layout, Schedule, pos_of, windows_from_passes};
use crate::model::{Condition, ImageArModel, ModelInput, TokenAttention};

/// How a cell got its final token in the exact mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fate {
    /// Sampled from the full-context p: the next cell had no draft.
    Plain,
    /// A draft that passed its test.
    Accepted,
    /// Drawn from the residual norm(max(0, p - q)) after its draft was rejected.
    Residual,
}

impl Fate {
    /// The name used in traces and CSV files.
    pub fn name(self) -> &'static str {
        match self {
            Fate::Plain => "plain",
            Fate::Accepted => "accepted",
            Fate::Residual => "residual",
        }
    }
}

/// What happens to a row's untested drafts after a rejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Refresh {
    /// Keep them as they are (TAIL); they are tested next pass.
    Off,
    /// Refresh each by maximal coupling with the logits this pass computed at its
    /// predecessor's slot, and store that law as its q.
    #[default]
    Coupled,
}

/// Deliberate departures from the algorithm, each of which must make the output law differ
/// from NTP's: the controls of the exactness test. Never set in the product.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flaws {
    /// After a rejection, draw from p instead of the residual.
    pub no_residual: bool,
    /// A coupled refresh keeps the draft's old q.
    pub stale_q: bool,
    /// The chain feeds only the last final token: later drafts are tested against the logits
    /// their slot produced when it was last fed (K/V computed under partial context).
    pub no_refeed: bool,
}

/// Options of the exact mode beyond [`GenerateParams`]. None of them changes the output law;
/// they trade inputs per pass against passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExactOptions {
    /// Policy for the drafts after a rejection.
    pub refresh: Refresh,
    /// At most this many drafts kept after a rejection are re-fed (and so tested) per pass.
    pub max_tail: usize,
    /// Rows below the first incomplete row that may draft; `None`: as many as ZipAR keeps
    /// active, ceil(w / s).
    pub rows_ahead: Option<usize>,

    /// Test switches (see [`Flaws`]).
    #[doc(hidden)]
    pub flaws: Flaws,
}

impl ExactOptions {
    /// Fewer inputs per pass, a few more passes: at most two kept drafts re-fed per pass and
    /// one row drafting ahead of the first incomplete row. The better trade where each input
    /// costs arithmetic (a CPU; measured in the README, "ZipAR-exact").
    pub fn lean() -> Self {
        Self {
            max_tail: 2,
            rows_ahead: Some(1),
            ..Self::default()
        }
    }

    /// The policy for a model: the default (fewest passes) where wide passes are cheap, else
    /// [`ExactOptions::lean`].
    pub fn for_model(model: &dyn ImageArModel) -> Self {
        if model.wide_passes_are_cheap() {
            Self::default()
        } else {
            Self::lean()
        }
    }
}

/// The default policy has the fewest passes on the built-in model (README, "ZipAR-exact"):
/// coupled refresh, every kept draft re-fed, ZipAR's staircase of rows.
impl Default for ExactOptions {
    fn default() -> Self {
        Self {
            refresh: Refresh::Coupled,
            max_tail: usize::MAX,
            rows_ahead: None,
            flaws: Flaws::default(),
        }
    }
}

/// Per-cell and per-pass records of an exact run, beyond the common trace fields.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ExactRecord {
    /// How each cell became final (raster order).
    pub fate_of: Vec<Fate>,
    /// The pass that drew the draft a cell finally kept (accepted drafts only).
    pub draft_pass_of: Vec<Option<usize>>,
    /// min(1, p(x)/q(x)) of each tested draft (greedy: 1 or 0).
    pub accept_prob_of: Vec<Option<f32>>,
    /// Drafts tested in each pass.
    pub tested_per_pass: Vec<usize>,
    /// Drafts accepted in each pass.
    pub accepted_per_pass: Vec<usize>,
    /// Drafts rejected in each pass (0 or 1).
    pub rejected_per_pass: Vec<usize>,
}

impl ExactRecord {
    /// Accepted drafts over tested drafts, or `None` when nothing was tested.
    pub fn acceptance(&self) -> Option<f64> {
        let tested: usize = self.tested_per_pass.iter().sum();
        let accepted: usize = self.accepted_per_pass.iter().sum();
        (tested > 0).then(|| accepted as f64 / tested as f64)
    }
}

/// The sequence of positions: cells, and the separators of the end-of-row layout.
#[derive(Debug, Clone, Copy)]
struct Seq {
    layout: Layout,
    w: usize,
    len: usize,
}

impl Seq {
    fn new(layout: Layout, h: usize, w: usize) -> Self {
        let len = match layout {
            Layout::Raster => h * w,
            Layout::EndOfRow => h * (w + 1) - 1,
        };
        Self { layout, w, len }
    }

    fn pos(&self, c: Cell) -> usize {
        pos_of(self.layout, self.w, c)
    }

    /// The cell at a position, `None` for a separator.
    fn cell(&self, i: usize) -> Option<Cell> {
        match self.layout {
            Layout::Raster => Some(Cell::new(i / self.w, i % self.w)),
            Layout::EndOfRow => {
                let (r, c) = ((i + 1) / (self.w + 1), (i + 1) % (self.w + 1));
                (c != 0).then(|| Cell::new(r, c - 1))
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Draft {
    x: u32,
    q: Vec<f32>,
    pass: usize,
    /// Kept untested after a rejection to its left (TAIL).
    tail: bool,
    /// With capture on, the attention of the query that drew it.
    att: Option<TokenAttention>,
}

/// Decoding state between passes.
struct State {
    seq: Seq,
    h: usize,
    w: usize,
    s: usize,
    /// Positions `0..fin` are final.
    fin: usize,
    final_tok: Vec<u32>,
    drafts: Vec<Option<Draft>>,
    sep: Option<u32>,
    started: Vec<bool>,
    aux: Vec<Option<Cell>>,
    /// Combined logits of each slot's last input (only kept for [`Flaws::no_refeed`]).
    slot_logits: Vec<Option<Vec<f32>>>,
}

impl State {
    /// The token a slot holds now: final, a known separator, or a draft.
    fn token_at(&self, i: usize) -> Option<u32> {
        if i < self.fin {
            return Some(self.final_tok[i]);
        }
        match self.seq.cell(i) {
            None => self.sep,
            Some(_) => self.drafts[i].as_ref().map(|d| d.x),
        }
    }

    /// Cells of row r that hold a final token or a draft (a prefix of the row).
    fn front(&self, r: usize) -> usize {
        (0..self.w)
            .take_while(|&c| {
                let i = self.seq.pos(Cell::new(r, c));
                i < self.fin || self.drafts[i].is_some()
            })
            .count()
    }

    /// Starts rows as the official schedule does: raster, row 1 once row 0 is complete and
    /// row r+1 once row r holds s cells (its first input is an auxiliary token); end-of-row,
    /// row r+1 once row r's block holds s entries, its separator counted.
    fn activate(&mut self) {
        for r in 0..self.h.saturating_sub(1) {
            if !self.started[r] || self.started[r + 1] {
                continue;
            }
            let n = self.front(r);
            let start = match self.seq.layout {
                Layout::Raster if r == 0 => n == self.w,
                Layout::Raster => n >= self.s,
                Layout::EndOfRow => n + 1 >= self.s,
            };
            if start {
                self.started[r + 1] = true;
                self.aux[r + 1] = match (self.seq.layout, r) {
                    (Layout::EndOfRow, _) => None,
                    (Layout::Raster, 0) => Some(Cell::new(0, self.w - 1)),
                    (Layout::Raster, _) => Some(Cell::new(r - 1, self.front(r - 1) - 1)),
                };
            }
        }
    }
}

/// A row's next cell and the input whose logits draft it.
struct Target {
    pos: usize,
    input: usize,
}

/// Generates one image in the exact mode with the model's policy
/// ([`ExactOptions::for_model`]).
pub fn generate(
    model: &mut dyn ImageArModel,
    cond: &Condition,
    params: &GenerateParams,
    sink: &mut dyn FnMut(&PassReport) -> Flow,
) -> Result<super::DecodeTrace, EngineError> {
    let options = ExactOptions::for_model(model);
    generate_with(model, cond, params, options, sink)
}

/// Generates one image in the exact mode (`params.window` is ZipAR's window).
pub fn generate_with(
    model: &mut dyn ImageArModel,
    cond: &Condition,
    params: &GenerateParams,
    options: ExactOptions,
    sink: &mut dyn FnMut(&PassReport) -> Flow,
) -> Result<super::DecodeTrace, EngineError> {
    let (h, w) = model.grid();
    let layout = model.layout();
    // ZipAR's schedule checks the window and gives the pass count when every draft passes.
    let mut total = Schedule::zipar(h, w, layout, params.window)?.num_passes();
    let RunSetup {
        mut trace,
        cfg,
        opts,
        mut sampler,
    } = setup(params, h, w, params.window)?;
    let sampling = params.sampling;
    let greedy = sampling == Sampling::Greedy;
    let flaws = options.flaws;
    let seq = Seq::new(layout, h, w);
    let sep = model.separator_token();
    if layout == Layout::EndOfRow && sep.is_none() && h > 1 {
        return Err(anyhow::anyhow!("the end-of-row layout needs an end-of-row token").into());
    }
    let mut st = State {
        seq,
        h,
        w,
        s: params.window,
        fin: 0,
        final_tok: vec![0; seq.len],
        drafts: vec![None; seq.len],
        sep,
        started: vec![false; h],
        aux: vec![None; h],
        slot_logits: vec![None; seq.len],
    };
    let n = h * w;
    let mut rec = ExactRecord {
        fate_of: vec![Fate::Plain; n],
        draft_pass_of: vec![None; n],
        accept_prob_of: vec![None; n],
        ..Default::default()
    };
    let idx = |c: Cell| c.row * w + c.col;
    let started = Instant::now();

    // The prefill predicts cell (0, 0).
    let t0 = Instant::now();
    let logits = model.prefill(cond, opts)?;
    check_rows(&logits, 1)?;
    let first = sampler.sample(&combine(&logits, 0, cfg));
    // With capture on: each cell's attention (the query that drew its final token) and the
    // condition's length (the prefill's query spans exactly its slots).
    let mut att_of: Vec<Option<TokenAttention>> = vec![None; n];
    let first_att = model
        .take_attention()
        .map(|a| TokenAttention::of_input(&a, a.slots.len() - 1, 0));
    let cond_len = first_att
        .as_ref()
        .and_then(|a| a.layers.first().map(Vec::len));
    att_of[0] = first_att.clone();
    st.final_tok[0] = first.token;
    st.fin = 1;
    st.started[0] = true;
    st.activate();
    rec.tested_per_pass.push(0);
    rec.accepted_per_pass.push(0);
    rec.rejected_per_pass.push(0);
    let report = PassReport {
        index: 0,
        total,
        produced: vec![(Cell::new(0, 0), first.token, first.prob)],
        inputs: 1,
        fates: vec![Fate::Plain],
        attention: first_att.into_iter().collect(),
        elapsed: t0.elapsed(),
    };
    finish_pass(&mut trace, sink, report, st.fin == seq.len)?;

    let chain_cap = w + 1;
    let rows_ahead = options
        .rows_ahead
        .unwrap_or_else(|| w.div_ceil(params.window.max(1)));
    let mut index = 0;
    while st.fin < seq.len {
        index += 1;
        total = total.max(index + 1);
        let t0 = Instant::now();
        let f = st.fin;
        // (1) The chain: slots f-1, f, ... fed contiguously.
        let mut inputs = vec![ModelInput {
            token: st.final_tok[f - 1],
            pos: f - 1,
            wants_logits: true,
        }];
        if !flaws.no_refeed {
            let mut j = f;
            let mut tails = 0;
            while j + 1 < seq.len && j - f < chain_cap {
                let Some(token) = st.token_at(j) else { break };
                if st.drafts[j].as_ref().is_some_and(|d| d.tail) {
                    if tails == options.max_tail {
                        break;
                    }
                    tails += 1;
                }
                inputs.push(ModelInput {
                    token,
                    pos: j,
                    wants_logits: true,
                });
                j += 1;
            }
        }
        let chain_end = f - 1 + inputs.len() - 1;
        // (2) One drafting input per started row whose next cell is beyond the chain.
        let mut targets = Vec::new();
        let top = seq.cell(f).map_or_else(|| (f + 1) / (w + 1), |c| c.row);
        for r in 0..h {
            if !st.started[r] || r > top + rows_ahead {
                continue;
            }
            let c = st.front(r);
            if c == w {
                continue;
            }
            let t = seq.pos(Cell::new(r, c));
            let k = t - 1;
            if k <= chain_end {
                targets.push(Target {
                    pos: t,
                    input: k + 1 - f,
                });
                continue;
            }
            let token = st
                .token_at(k)
                .or_else(|| st.aux[r].and_then(|a| st.token_at(seq.pos(a))))
                .ok_or_else(|| anyhow::anyhow!("exact mode: no token to feed at slot {k}"))?;
            inputs.push(ModelInput {
                token,
                pos: k,
                wants_logits: true,
            });
            targets.push(Target {
                pos: t,
                input: inputs.len() - 1,
            });
        }
        let logits = model.step(&inputs)?;
        check_rows(&logits, inputs.len())?;
        let pass_att = model.take_attention();
        let input_att = |i: usize| {
            pass_att
                .as_ref()
                .map(|a| TokenAttention::of_input(a, i, index))
        };
        let rows: Vec<Vec<f32>> = (0..inputs.len())
            .map(|i| combine(&logits, i, cfg))
            .collect();
        if flaws.no_refeed {
            for (input, l) in inputs.iter().zip(&rows) {
                st.slot_logits[input.pos] = Some(l.clone());
            }
        }

        // (3) The walk: test the chain's drafts in order.
        let mut produced = Vec::new();
        let mut produced_att = Vec::new();
        let (mut tested, mut accepted, mut rejected_at) = (0, 0, None);
        let mut j = f;
        loop {
            // Logits that predict position j: its predecessor's slot in the chain.
            let l = if j - 1 <= chain_end {
                rows[j - f].clone()
            } else if flaws.no_refeed {
                match &st.slot_logits[j - 1] {
                    Some(l) => l.clone(),
                    None => break,
                }
            } else {
                break;
            };
            let Some(cell) = seq.cell(j) else {
                // A known separator: final without a test.
                st.final_tok[j] = st.sep.unwrap_or_default();
                st.fin = j + 1;
                j += 1;
                if j == seq.len {
                    break;
                }
                continue;
            };
            // A residual or plain sample is drawn from the chain input at slot j - 1.
            let chain_att = if j - 1 <= chain_end {
                input_att(j - f)
            } else {
                None
            };
            let (token, prob, stop, att) = match st.drafts[j].take() {
                Some(d) => {
                    tested += 1;
                    let p = distribution(&l, sampling);
                    let xi = d.x as usize;
                    let ratio = if greedy {
                        f32::from(argmax(&p) == xi)
                    } else {
                        (p[xi] / d.q[xi].max(f32::MIN_POSITIVE)).min(1.0)
                    };
                    rec.accept_prob_of[idx(cell)] = Some(ratio);
                    let verdict = if flaws.no_residual && !greedy {
                        if sampler.uniform() < ratio {
                            Verdict::Accept
                        } else {
                            Verdict::Reject(sampler.draw(&p) as u32)
                        }
                    } else {
                        verify(&mut sampler, greedy, d.x, &p, &d.q)
                    };
                    match verdict {
                        Verdict::Accept => {
                            accepted += 1;
                            rec.fate_of[idx(cell)] = Fate::Accepted;
                            rec.draft_pass_of[idx(cell)] = Some(d.pass);
                            (d.x, p[xi], false, d.att)
                        }
                        Verdict::Reject(y) => {
                            rejected_at = Some(j);
                            rec.fate_of[idx(cell)] = Fate::Residual;
                            trace.rejections_of[idx(cell)] += 1;
                            (y, p[y as usize], true, chain_att)
                        }
                    }
                }
                None => {
                    let s = sampler.sample(&l);
                    rec.fate_of[idx(cell)] = Fate::Plain;
                    (s.token, s.prob, true, chain_att)
                }
            };
            st.final_tok[j] = token;
            st.fin = j + 1;
            produced.push((cell, token, prob));
            att_of[idx(cell)] = att.clone();
            produced_att.push(att);
            j += 1;
            if stop || j == seq.len {
                break;
            }
        }

        // (4) TAIL: drafts after a rejection stay; optionally refresh them by coupling.
        if let Some(js) = rejected_at {
            let row = seq.cell(js).map(|c| c.row);
            for k in js + 1..seq.len {
                if seq.cell(k).map(|c| c.row) != row {
                    break;
                }
                if let Some(d) = st.drafts[k].as_mut() {
                    d.tail = true;
                }
            }
        }
        if let (Some(js), Refresh::Coupled) = (rejected_at, options.refresh) {
            for k in js + 1..=(chain_end + 1).min(seq.len - 1) {
                let Some(d) = st.drafts[k].as_mut() else {
                    continue;
                };
                let p2 = distribution(&rows[k - f], sampling);
                let xi = d.x as usize;
                let x = if greedy {
                    argmax(&p2) as u32
                } else if sampler.uniform() < (p2[xi] / d.q[xi].max(f32::MIN_POSITIVE)).min(1.0) {
                    d.x
                } else {
                    let res = residual(&p2, &d.q);
                    if res.iter().all(|&v| v <= 0.0) {
                        d.x
                    } else {
                        sampler.draw(&res) as u32
                    }
                };
                d.x = x;
                d.pass = index;
                d.tail = true;
                d.att = input_att(k - f);
                if !flaws.stale_q {
                    d.q = p2;
                }
            }
        }

        // (5) New drafts for the rows' next cells the walk did not reach.
        for t in targets {
            if t.pos < st.fin || st.drafts[t.pos].is_some() {
                continue;
            }
            let (s, q) = sampler.sample_with_distribution(&rows[t.input]);
            st.drafts[t.pos] = Some(Draft {
                x: s.token,
                q,
                pass: index,
                tail: false,
                att: input_att(t.input),
            });
        }
        st.activate();

        rec.tested_per_pass.push(tested);
        rec.accepted_per_pass.push(accepted);
        rec.rejected_per_pass
            .push(usize::from(rejected_at.is_some()));
        let fates = produced
            .iter()
            .map(|(c, _, _)| rec.fate_of[idx(*c)])
            .collect();
        let report = PassReport {
            index,
            total,
            produced,
            inputs: inputs.len(),
            fates,
            // One entry per produced cell, or none (the report's rows must line up).
            attention: produced_att
                .into_iter()
                .collect::<Option<Vec<_>>>()
                .unwrap_or_default(),
            elapsed: t0.elapsed(),
        };
        finish_pass(&mut trace, sink, report, st.fin == seq.len)?;
    }
    trace.total_ms = started.elapsed().as_secs_f64() * 1e3;
    // A row's lag: when the cell first got the token it kept.
    let first_pass: Vec<usize> = (0..n)
        .map(|i| rec.draft_pass_of[i].unwrap_or(trace.pass_of[i]))
        .collect();
    trace.window_of = windows_from_passes(h, w, &first_pass);
    if let (Some(cond_len), Some(all)) = (
        cond_len,
        att_of.into_iter().collect::<Option<Vec<TokenAttention>>>(),
    ) {
        trace.retained_mass_of = crate::locality::retained_in_run(&all, cond_len, &trace.pass_of);
    }
    trace.exact = Some(rec);
    Ok(trace)
}
