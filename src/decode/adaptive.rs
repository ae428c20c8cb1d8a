//! The adaptive window (DESIGN.md section 3): a row's first token is drafted as soon as the
//! row above has `s_min` tokens and verified in the next pass against the prediction with one
//! more token of context, by rejection sampling. On rejection a fresh draft is drawn from the
//! residual and verified again, until it is accepted or the row above is complete.
//!
//! Pure planning and probability logic: no tensors. The engine asks [`AdaptivePlanner`] for
//! each pass's inputs, runs the model, samples, and hands the outcomes back.
//!
//! Timing: while a row's first token is being verified the row already feeds that draft to
//! predict its second token, so a run where every draft is accepted has exactly the passes of
//! fixed-window ZipAR with `s = s_min`; each rejection delays the row (and the rows below it)
//! by one pass. The window recorded for a row is the context its accepted draft was drawn
//! with, i.e. the lag the row proceeds with.

use super::sampling::{Sampler, argmax};
use super::schedule::{Cell, Feed, Layout, Role, Source, pos_of};

/// The engine's result for one input.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A sampled token (for `Next`, `Draft`, `Speculative`) with its probability and the
    /// distribution it was drawn from (kept for drafts).
    Sampled {
        /// Token.
        token: u32,
        /// Its probability.
        prob: f32,
        /// The distribution (only needed for drafts; may be empty otherwise).
        dist: Vec<f32>,
    },
    /// The verification distribution p (for `Verify`).
    Verify {
        /// p over the vocabulary.
        dist: Vec<f32>,
    },
    /// Nothing (for `Discard`).
    None,
}

#[derive(Debug, Clone, PartialEq)]
enum RowState {
    Idle,
    /// Activated: drafts its first cell next pass from the auxiliary token.
    Drafting {
        aux: Cell,
    },
    /// A draft waits for verification.
    Verifying {
        aux: Cell,
        draft: u32,
        q: Vec<f32>,
        ctx: usize,
    },
    /// Proceeding token by token.
    Active,
    Done,
}

/// The verdict on a draft.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Keep the draft.
    Accept,
    /// Replace it by this token, drawn from the residual (greedy: p's argmax).
    Reject(u32),
}

/// Rejection-sampling verification of draft `x` drawn from `q`, against `p`: accept with
/// probability min(1, p(x)/q(x)), else draw from norm(max(0, p - q)). Greedy: accept when
/// p's argmax is `x`, else take that argmax.
pub fn verify(sampler: &mut Sampler, greedy: bool, x: u32, p: &[f32], q: &[f32]) -> Verdict {
    let xi = x as usize;
    if greedy {
        let best = argmax(p);
        return if best == xi {
            Verdict::Accept
        } else {
            Verdict::Reject(best as u32)
        };
    }
    let (px, qx) = (p[xi], q[xi].max(f32::MIN_POSITIVE));
    let u = sampler.uniform();
    if u < (px / qx).min(1.0) {
        return Verdict::Accept;
    }
    let res = residual(p, q);
    if res.iter().all(|&v| v <= 0.0) {
        // p == q up to rounding: the draft is as good as any.
        return Verdict::Accept;
    }
    Verdict::Reject(sampler.draw(&res) as u32)
}

/// norm(max(0, p - q)), unnormalised (the sampler normalises).
pub fn residual(p: &[f32], q: &[f32]) -> Vec<f32> {
    p.iter().zip(q).map(|(&a, &b)| (a - b).max(0.0)).collect()
}

/// Plans an adaptive run over an `h x w` grid (LlamaGen layout).
#[derive(Debug, Clone)]
pub struct AdaptivePlanner {
    h: usize,
    w: usize,
    s_min: usize,
    n: Vec<usize>,
    rows: Vec<RowState>,
    tokens: Vec<Option<u32>>,
    correction: Option<usize>,
    started: bool,
    /// Window per cell (raster order).
    pub window_of: Vec<usize>,
    /// Rejected drafts per cell.
    pub rejections_of: Vec<u32>,
}

impl AdaptivePlanner {
    /// A planner; `2 <= s_min < w` and `h >= 2` (callers fall back to NTP otherwise).
    pub fn new(h: usize, w: usize, s_min: usize) -> Self {
        Self {
            h,
            w,
            s_min,
            n: vec![0; h],
            rows: vec![RowState::Idle; h],
            tokens: vec![None; h * w],
            correction: None,
            started: false,
            window_of: vec![w; h * w],
            rejections_of: vec![0; h * w],
        }
    }

    /// Token of a generated cell.
    pub fn token(&self, c: Cell) -> Option<u32> {
        self.tokens[c.row * self.w + c.col]
    }

    /// Row r's current draft.
    pub fn draft(&self, r: usize) -> Option<u32> {
        match &self.rows[r] {
            RowState::Verifying { draft, .. } => Some(*draft),
            _ => None,
        }
    }

    /// Whether every cell has its final token.
    pub fn is_done(&self) -> bool {
        self.tokens.iter().all(|t| t.is_some())
    }

    /// Inputs of the next pass after the prefill (which the engine runs first and reports
    /// through [`AdaptivePlanner::apply_prefill`]); `None` when the grid is complete.
    pub fn next_pass(&self) -> Option<Vec<Feed>> {
        if self.is_done() {
            return None;
        }
        let w = self.w;
        let mut feeds = Vec::new();
        // Positions of the raster layout, the only one the adaptive window supports.
        let pos = |c: Cell| pos_of(Layout::Raster, w, c);
        let slot_last = |r: usize| pos(Cell::new(r, w - 1));
        // A completed row overwrites the auxiliary K/V at its last slot. If the row below is
        // still verifying its draft, these logits are its verification with full context.
        if let Some(r) = self.correction {
            let role = match self.rows.get(r + 1) {
                Some(RowState::Verifying { .. }) => Role::Verify(r + 1),
                _ => Role::Discard,
            };
            feeds.push(Feed {
                source: Source::Cell(Cell::new(r, w - 1)),
                pos: slot_last(r),
                role,
            });
        }
        for r in 0..self.h {
            match &self.rows[r] {
                RowState::Idle | RowState::Done => {}
                RowState::Active => {
                    let n = self.n[r];
                    let (token, pos) = if n == 0 {
                        // Row 0 starts from the prefill; row 1 from the real end of row 0.
                        (Source::Cell(Cell::new(r - 1, w - 1)), slot_last(r - 1))
                    } else {
                        (Source::Cell(Cell::new(r, n - 1)), pos(Cell::new(r, n - 1)))
                    };
                    feeds.push(Feed {
                        source: token,
                        pos,
                        role: Role::Next(Cell::new(r, n)),
                    });
                }
                RowState::Drafting { aux } => feeds.push(Feed {
                    source: Source::Cell(*aux),
                    pos: slot_last(r - 1),
                    role: Role::Draft(r),
                }),
                RowState::Verifying { aux, .. } => {
                    if self.correction != Some(r - 1) {
                        feeds.push(Feed {
                            source: Source::Cell(*aux),
                            pos: slot_last(r - 1),
                            role: Role::Verify(r),
                        });
                    }
                    if w > 1 {
                        feeds.push(Feed {
                            source: Source::Draft(r),
                            pos: pos(Cell::new(r, 0)),
                            role: Role::Speculative(r),
                        });
                    }
                }
            }
        }
        Some(feeds)
    }

    /// Records the prefill's token for cell (0, 0).
    pub fn apply_prefill(&mut self, token: u32) {
        self.tokens[0] = Some(token);
        self.n[0] = 1;
        self.rows[0] = if self.w > 1 {
            RowState::Active
        } else {
            RowState::Done
        };
        self.started = true;
        if self.w == 1 && self.h > 1 {
            self.rows[1] = RowState::Active;
        }
    }

    /// Applies one pass's outcomes (same order as the feeds). `verify_fn` decides drafts.
    /// Returns the cells that received their final token in this pass.
    pub fn apply(
        &mut self,
        feeds: &[Feed],
        outcomes: Vec<Outcome>,
        mut verify_fn: impl FnMut(u32, &[f32], &[f32]) -> Verdict,
    ) -> Vec<(Cell, u32, f32)> {
        let w = self.w;
        let ctx_of = |n: &[usize], r: usize| n[r - 1];
        // The context each row sees in this pass: tokens of the row above fed so far.
        let ctx_now: Vec<usize> = (0..self.h)
            .map(|r| if r == 0 { 0 } else { ctx_of(&self.n, r) })
            .collect();
        self.correction = None;
        let mut produced = Vec::new();
        let mut spec: Vec<Option<(u32, f32)>> = vec![None; self.h];
        let mut verdicts: Vec<Option<(Verdict, Vec<f32>)>> = vec![None; self.h];
        for (f, o) in feeds.iter().zip(outcomes) {
            match (f.role, o) {
                (Role::Next(cell), Outcome::Sampled { token, prob, .. }) => {
                    self.tokens[cell.row * w + cell.col] = Some(token);
                    produced.push((cell, token, prob));
                }
                (Role::Draft(r), Outcome::Sampled { token, dist, .. }) => {
                    if let RowState::Drafting { aux } = self.rows[r] {
                        self.rows[r] = RowState::Verifying {
                            aux,
                            draft: token,
                            q: dist,
                            ctx: ctx_now[r],
                        };
                    }
                }
                (Role::Speculative(r), Outcome::Sampled { token, prob, .. }) => {
                    spec[r] = Some((token, prob));
                }
                (Role::Verify(r), Outcome::Verify { dist }) => {
                    if let RowState::Verifying { draft, q, .. } = &self.rows[r] {
                        let v = verify_fn(*draft, &dist, q);
                        verdicts[r] = Some((v, dist));
                    }
                }
                _ => {}
            }
        }
        // Resolve drafts.
        for r in 0..self.h {
            let Some((verdict, p)) = verdicts[r].take() else {
                continue;
            };
            let RowState::Verifying {
                aux,
                draft,
                q: _,
                ctx,
            } = self.rows[r].clone()
            else {
                continue;
            };
            let full = ctx_now[r] >= w;
            match verdict {
                Verdict::Accept => {
                    let prob = p[draft as usize];
                    self.finish_first(r, draft, prob, ctx, spec[r], &mut produced);
                }
                Verdict::Reject(x) if full => {
                    // With the row above complete the residual draw is final: distributed as
                    // p with full context.
                    self.rejections_of[r * w] += 1;
                    let prob = p[x as usize];
                    self.finish_first(r, x, prob, w, None, &mut produced);
                }
                Verdict::Reject(x) => {
                    self.rejections_of[r * w] += 1;
                    // The residual draw is distributed as p: it is the next draft's q.
                    self.rows[r] = RowState::Verifying {
                        aux,
                        draft: x,
                        q: p,
                        ctx: ctx_now[r],
                    };
                }
            }
        }
        // Advance rows and activate the next ones (top to bottom, as the fixed schedule).
        for r in 0..self.h {
            let was = self.n[r];
            let now = (0..w).filter(|&c| self.tokens[r * w + c].is_some()).count();
            self.n[r] = now;
            if now == w && !matches!(self.rows[r], RowState::Done) {
                self.rows[r] = RowState::Done;
                if r >= 1 {
                    self.correction = Some(r);
                }
                if r == 0 && self.h > 1 {
                    self.rows[1] = RowState::Active;
                }
            }
            let reaches_window = r >= 1 && was < self.s_min && now >= self.s_min;
            if reaches_window && r + 1 < self.h && matches!(self.rows[r + 1], RowState::Idle) {
                let above = r - 1;
                let latest = self.n[above].max(1) - 1;
                self.rows[r + 1] = RowState::Drafting {
                    aux: Cell::new(above, latest),
                };
            }
        }
        produced
    }

    fn finish_first(
        &mut self,
        r: usize,
        token: u32,
        prob: f32,
        window: usize,
        spec: Option<(u32, f32)>,
        produced: &mut Vec<(Cell, u32, f32)>,
    ) {
        let w = self.w;
        self.tokens[r * w] = Some(token);
        produced.push((Cell::new(r, 0), token, prob));
        self.window_of[r * w..(r + 1) * w].fill(window);
        if let Some((t, p)) = spec {
            self.tokens[r * w + 1] = Some(t);
            produced.push((Cell::new(r, 1), t, p));
        }
        self.rows[r] = if w == 1 {
            RowState::Done
        } else {
            RowState::Active
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::sampling::Sampling;
    use crate::decode::schedule::{Layout, Schedule};

    /// Runs the planner with a fake model whose distributions come from `dist(cell_or_row,
    /// ctx)`; every pass's draws use a seeded sampler.
    fn simulate(
        h: usize,
        w: usize,
        s_min: usize,
        greedy: bool,
        draft_dist: impl Fn(usize) -> Vec<f32>,
        verify_dist: impl Fn(usize) -> Vec<f32>,
    ) -> (usize, AdaptivePlanner) {
        let mut planner = AdaptivePlanner::new(h, w, s_min);
        let mut sampler = Sampler::new(Sampling::default(), 3);
        planner.apply_prefill(0);
        let mut passes = 1;
        while let Some(feeds) = planner.next_pass() {
            passes += 1;
            assert!(passes <= h * w + 1, "no progress");
            let outcomes = feeds
                .iter()
                .map(|f| match f.role {
                    Role::Next(_) | Role::Speculative(_) => Outcome::Sampled {
                        token: 1,
                        prob: 1.0,
                        dist: vec![],
                    },
                    Role::Draft(r) => {
                        let d = draft_dist(r);
                        let t = sampler.draw(&d) as u32;
                        Outcome::Sampled {
                            token: t,
                            prob: d[t as usize],
                            dist: d,
                        }
                    }
                    Role::Verify(r) => Outcome::Verify {
                        dist: verify_dist(r),
                    },
                    Role::Discard => Outcome::None,
                })
                .collect();
            let mut s2 = sampler.clone();
            planner.apply(&feeds, outcomes, |x, p, q| verify(&mut s2, greedy, x, p, q));
            sampler = s2;
        }
        (passes, planner)
    }

    #[test]
    fn equal_distributions_accept_every_draft_and_match_fixed_s_min() {
        for (h, w, s) in [(4, 5, 2), (6, 8, 3), (16, 16, 4), (5, 6, 5)] {
            let d = |_| vec![0.25f32; 4];
            let (passes, p) = simulate(h, w, s, false, d, d);
            let fixed = Schedule::zipar(h, w, Layout::Raster, s)
                .unwrap()
                .num_passes();
            assert_eq!(passes, fixed, "h={h} w={w} s={s}");
            assert!(p.rejections_of.iter().all(|&r| r == 0));
            assert!(p.window_of[2 * w..].iter().all(|&x| x == s));
        }
    }

    #[test]
    fn disagreeing_distributions_reject_and_cost_passes_within_bounds() {
        let (h, w, s) = (8, 8, 2);
        // Drafts always propose token 0; verification puts no mass on it.
        let draft = |_| vec![1.0f32, 0.0, 0.0, 0.0];
        let verify_d = |_| vec![0.0f32, 0.5, 0.5, 0.0];
        let (passes, p) = simulate(h, w, s, false, draft, verify_d);
        let lo = Schedule::zipar(h, w, Layout::Raster, s)
            .unwrap()
            .num_passes();
        assert!(passes > lo, "{passes} vs {lo}");
        assert!(passes <= h * w, "{passes}");
        assert!(p.rejections_of.iter().sum::<u32>() > 0);
        assert!(p.is_done());
        // Rows with rejections decode under a larger window.
        assert!(p.window_of[2 * w] > s);
    }

    #[test]
    fn greedy_accepts_when_the_argmax_agrees() {
        let mut s = Sampler::new(Sampling::Greedy, 0);
        assert_eq!(
            verify(&mut s, true, 2, &[0.1, 0.2, 0.7], &[0.9, 0.05, 0.05]),
            Verdict::Accept
        );
        assert_eq!(
            verify(&mut s, true, 0, &[0.1, 0.2, 0.7], &[0.9, 0.05, 0.05]),
            Verdict::Reject(2)
        );
    }

    #[test]
    fn draft_then_residual_is_distributed_as_p() {
        // Draw x ~ q, accept with min(1, p/q), else draw from the residual: the result must
        // follow p. A wrong residual (e.g. p itself, or q - p) fails the tolerance.
        let p = [0.5f32, 0.3, 0.15, 0.05];
        let q = [0.1f32, 0.2, 0.3, 0.4];
        let mut s = Sampler::new(Sampling::default(), 11);
        let n = 200_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            let x = s.draw(&q) as u32;
            let t = match verify(&mut s, false, x, &p, &q) {
                Verdict::Accept => x,
                Verdict::Reject(y) => y,
            };
            counts[t as usize] += 1;
        }
        for i in 0..4 {
            let f = counts[i] as f32 / n as f32;
            assert!((f - p[i]).abs() < 0.005, "token {i}: {f} vs {}", p[i]);
        }
    }
}
