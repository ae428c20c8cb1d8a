//! One planner interface for the engine's loop: a [`Plan`] says which inputs each pass feeds
//! (one [`Feed`] type for every mode), takes the pass's outcomes back, and says which cells
//! got their final token. Fixed schedules ([`FixedPlan`]: NTP and ZipAR, any layout) know
//! every pass in advance; the adaptive window ([`AdaptivePlanner`], raster layout) decides
//! each pass from the verdicts of the last. Positions come from [`schedule::pos_of`], the one
//! place that knows the layouts. (The exact mode plans its own passes in `exact.rs`: its
//! drafts are re-fed and tested in a chain the engine loop here has no use for.)

use super::adaptive::{AdaptivePlanner, Outcome, Verdict};
use super::schedule::{self, Cell, Feed, Role, Schedule, Source};
use super::trace::DecodeTrace;

/// Decides a draft `x` drawn from `q` against the full-context `p`.
pub type Verify<'a> = &'a mut dyn FnMut(u32, &[f32], &[f32]) -> Verdict;

/// A decoding plan the engine drives pass by pass.
pub trait Plan {
    /// The inputs of the next pass, `None` when the grid is complete. The first pass is the
    /// prefill: one [`Source::Condition`] input predicting cell (0, 0).
    fn next_feeds(&mut self) -> Option<Vec<Feed>>;
    /// The token a [`Source::Cell`] or [`Source::Draft`] input feeds, once it exists.
    fn token_of(&self, source: Source) -> Option<u32>;
    /// Takes one pass's outcomes (same order as its feeds; `verify` decides drafts) and
    /// returns the cells that received their final token, in sampling order.
    fn record(
        &mut self,
        feeds: &[Feed],
        outcomes: Vec<Outcome>,
        verify: Verify,
    ) -> Vec<(Cell, u32, f32)>;
    /// Passes in all; a lower bound when the count depends on the data.
    fn expected_passes(&self) -> usize;
    /// Whether every cell has its final token.
    fn is_complete(&self) -> bool;
    /// The window the run is recorded under.
    fn window(&self) -> usize;
    /// Rejected drafts per cell, for plans with drafts.
    fn rejections(&self) -> Option<&[u32]> {
        None
    }
    /// Writes what the plan knows into the finished trace (windows, rejections).
    fn finish(&self, trace: &mut DecodeTrace);
}

/// A precomputed [`Schedule`] as a plan.
#[derive(Debug, Clone)]
pub struct FixedPlan {
    schedule: Schedule,
    next: usize,
    tokens: Vec<Option<u32>>,
}

impl FixedPlan {
    /// Plans `schedule`.
    pub fn new(schedule: Schedule) -> Self {
        let cells = schedule.h * schedule.w;
        Self {
            schedule,
            next: 0,
            tokens: vec![None; cells],
        }
    }
}

impl Plan for FixedPlan {
    fn next_feeds(&mut self) -> Option<Vec<Feed>> {
        let pass = self.schedule.passes.get(self.next)?;
        self.next += 1;
        Some(pass.feeds.clone())
    }

    fn token_of(&self, source: Source) -> Option<u32> {
        match source {
            Source::Cell(c) => self.tokens[c.row * self.schedule.w + c.col],
            _ => None,
        }
    }

    fn record(
        &mut self,
        feeds: &[Feed],
        outcomes: Vec<Outcome>,
        _verify: Verify,
    ) -> Vec<(Cell, u32, f32)> {
        let mut produced = Vec::new();
        for (f, o) in feeds.iter().zip(outcomes) {
            if let (Role::Next(c), Outcome::Sampled { token, prob, .. }) = (f.role, o) {
                self.tokens[c.row * self.schedule.w + c.col] = Some(token);
                produced.push((c, token, prob));
            }
        }
        produced
    }

    fn expected_passes(&self) -> usize {
        self.schedule.num_passes()
    }

    fn is_complete(&self) -> bool {
        self.next == self.schedule.passes.len()
    }

    fn window(&self) -> usize {
        self.schedule.window
    }

    fn finish(&self, trace: &mut DecodeTrace) {
        trace.window_of =
            schedule::windows_from_passes(self.schedule.h, self.schedule.w, &trace.pass_of);
    }
}

/// The adaptive window as a plan; its expected count is fixed ZipAR's at `s_min` (every
/// draft accepted).
#[derive(Debug, Clone)]
pub struct AdaptivePlan {
    planner: AdaptivePlanner,
    s_min: usize,
    expected: usize,
    prefilled: bool,
}

impl AdaptivePlan {
    /// Plans an `h x w` raster grid with minimum window `s_min`; `expected` is fixed ZipAR's
    /// pass count at `s_min`.
    pub fn new(h: usize, w: usize, s_min: usize, expected: usize) -> Self {
        Self {
            planner: AdaptivePlanner::new(h, w, s_min),
            s_min,
            expected,
            prefilled: false,
        }
    }
}

impl Plan for AdaptivePlan {
    fn next_feeds(&mut self) -> Option<Vec<Feed>> {
        if !self.prefilled {
            return Some(vec![Feed {
                source: Source::Condition,
                pos: 0,
                role: Role::Next(Cell::new(0, 0)),
            }]);
        }
        self.planner.next_pass()
    }

    fn token_of(&self, source: Source) -> Option<u32> {
        match source {
            Source::Cell(c) => self.planner.token(c),
            Source::Draft(r) => self.planner.draft(r),
            _ => None,
        }
    }

    fn record(
        &mut self,
        feeds: &[Feed],
        outcomes: Vec<Outcome>,
        verify: Verify,
    ) -> Vec<(Cell, u32, f32)> {
        if !self.prefilled {
            self.prefilled = true;
            return match outcomes.into_iter().next() {
                Some(Outcome::Sampled { token, prob, .. }) => {
                    self.planner.apply_prefill(token);
                    vec![(Cell::new(0, 0), token, prob)]
                }
                _ => Vec::new(),
            };
        }
        self.planner.apply(feeds, outcomes, verify)
    }

    fn expected_passes(&self) -> usize {
        self.expected
    }

    fn is_complete(&self) -> bool {
        self.prefilled && self.planner.is_done()
    }

    fn window(&self) -> usize {
        self.s_min
    }

    fn rejections(&self) -> Option<&[u32]> {
        Some(&self.planner.rejections_of)
    }

    fn finish(&self, trace: &mut DecodeTrace) {
        trace.window_of = self.planner.window_of.clone();
        trace.rejections_of = self.planner.rejections_of.clone();
    }
}
