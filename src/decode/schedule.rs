//! Which grid cells are fed and predicted in each forward pass.
//!
//! Pure data: no tensors, no model. A [`Schedule`] is a list of [`Pass`]es; each pass feeds
//! some inputs at positions of the image region and says which cell each input's logits
//! predict. The engine turns that into one model call per pass.
//!
//! Positions are counted from the first slot after the condition. In the LlamaGen layout
//! (no end-of-row token) cell (r, c) sits at position `r * w + c`. In the end-of-row layout
//! (Lumina-mGPT, Emu3) each row is a block of `w` image tokens followed by a separator:
//! cell (r, c) sits at `r * (w + 1) + c` and the separator that opens row r (r >= 1) at
//! `r * (w + 1) - 1`; the separator opening row 0 is the last token of the condition.

use serde::{Deserialize, Serialize};

/// A cell of the token grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Cell {
    /// Row, from the top.
    pub row: usize,
    /// Column, from the left.
    pub col: usize,
}

impl Cell {
    /// The cell at (row, col).
    pub const fn new(row: usize, col: usize) -> Self {
        Self { row, col }
    }
}

/// Where the token of an input comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The condition prefix (class embedding, caption, or the text prompt): the prefill.
    Condition,
    /// The already generated token of this cell.
    Cell(Cell),
    /// The known separator token that opens this row (end-of-row layout only).
    Separator(usize),
    /// Row r's pending draft of its first cell (the adaptive window).
    Draft(usize),
}

/// What an input's logits are for. Fixed schedules use `Next` and `Discard` only; the
/// adaptive window's drafts use the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sample this cell; the token is final.
    Next(Cell),
    /// Sample a first draft for row r's first cell.
    Draft(usize),
    /// Re-predict row r's first cell to verify its draft.
    Verify(usize),
    /// Sample row r's second cell behind its unverified draft (kept only if it is accepted).
    Speculative(usize),
    /// Logits unused (a KV correction).
    Discard,
}

impl Role {
    /// Whether the input's logits are needed.
    pub fn wants_logits(self) -> bool {
        self != Role::Discard
    }
}

/// One input of a forward pass, for every planner (fixed schedules and the adaptive window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feed {
    /// Which token is fed.
    pub source: Source,
    /// Position in the image region where its K/V are written (ignored for the condition).
    pub pos: usize,
    /// What its logits are for.
    pub role: Role,
}

/// One forward call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pass {
    /// Inputs in the order they are fed (top to bottom).
    pub feeds: Vec<Feed>,
}

impl Pass {
    /// The cells this pass produces, in sampling order.
    pub fn predicted(&self) -> impl Iterator<Item = Cell> + '_ {
        self.feeds.iter().filter_map(|f| match f.role {
            Role::Next(c) => Some(c),
            _ => None,
        })
    }
}

/// How the image tokens are laid out in the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// Plain raster order, no separators (LlamaGen).
    Raster,
    /// Each row followed by an end-of-row token (Lumina-mGPT, Emu3).
    EndOfRow,
}

/// Decoding order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Next-token prediction: one token per pass.
    Ntp,
    /// ZipAR with a fixed window.
    Zipar,
    /// ZipAR with a window chosen per row by draft verification.
    Adaptive,
    /// ZipAR's drafts tested against the full-context distribution: NTP's law, lossless.
    Exact,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Ntp => "ntp",
            Mode::Zipar => "zipar",
            Mode::Adaptive => "adaptive",
            Mode::Exact => "exact",
        })
    }
}

/// A schedule that cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    /// The grid has no cells.
    #[error("the token grid {h}x{w} is empty")]
    EmptyGrid {
        /// Rows.
        h: usize,
        /// Columns.
        w: usize,
    },
    /// The window is outside the range this layout supports.
    #[error(
        "window {window} is out of range: it must be between {min} and {max} for a grid {w} wide"
    )]
    WindowOutOfRange {
        /// The window asked for.
        window: usize,
        /// Smallest valid window.
        min: usize,
        /// Largest valid window.
        max: usize,
        /// Grid width.
        w: usize,
    },
}

/// The precomputed list of passes for one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// Grid rows.
    pub h: usize,
    /// Grid columns.
    pub w: usize,
    /// Token layout.
    pub layout: Layout,
    /// Decoding mode (NTP or fixed-window ZipAR).
    pub mode: Mode,
    /// The window: for NTP the grid width (LlamaGen) or width + 1 (end-of-row).
    pub window: usize,
    /// The passes, prefill first.
    pub passes: Vec<Pass>,
}

/// The valid fixed windows for a layout and grid width.
pub fn window_range(layout: Layout, w: usize) -> std::ops::RangeInclusive<usize> {
    match layout {
        // s = 1 would place a row's auxiliary token on the slot the row above is still
        // writing; the official code crashes there, so it is rejected.
        Layout::Raster => 2..=w.max(2),
        Layout::EndOfRow => 2..=w + 1,
    }
}

/// Position of a cell in the image region.
pub fn pos_of(layout: Layout, w: usize, cell: Cell) -> usize {
    match layout {
        Layout::Raster => cell.row * w + cell.col,
        Layout::EndOfRow => cell.row * (w + 1) + cell.col,
    }
}

/// Position of the separator that opens row `r >= 1` in the end-of-row layout.
pub fn separator_pos(w: usize, r: usize) -> usize {
    r * (w + 1) - 1
}

impl Schedule {
    /// Plain next-token prediction: one token per pass, `h * w` passes.
    pub fn ntp(h: usize, w: usize, layout: Layout) -> Result<Self, ScheduleError> {
        check_grid(h, w)?;
        let mut passes = Vec::with_capacity(h * w);
        passes.push(prefill());
        let mut prev = Cell::new(0, 0);
        for r in 0..h {
            for c in 0..w {
                if r == 0 && c == 0 {
                    continue;
                }
                let cell = Cell::new(r, c);
                let mut feeds = Vec::with_capacity(2);
                if c == 0 && layout == Layout::EndOfRow {
                    // The separator is known: fed in place of the row's last token.
                    let sep = Feed {
                        source: Source::Separator(r),
                        pos: separator_pos(w, r),
                        role: Role::Next(cell),
                    };
                    let last = Feed {
                        source: Source::Cell(prev),
                        pos: pos_of(layout, w, prev),
                        role: Role::Discard,
                    };
                    feeds.push(last);
                    feeds.push(sep);
                } else {
                    feeds.push(Feed {
                        source: Source::Cell(prev),
                        pos: pos_of(layout, w, prev),
                        role: Role::Next(cell),
                    });
                }
                passes.push(Pass { feeds });
                prev = cell;
            }
        }
        let window = match layout {
            Layout::Raster => w,
            Layout::EndOfRow => w + 1,
        };
        Ok(Self {
            h,
            w,
            layout,
            mode: Mode::Ntp,
            window,
            passes,
        })
    }

    /// ZipAR with a fixed window `s`.
    ///
    /// Raster layout: `2 <= s <= w`, `2w + (h-2)s` passes; `s = w` is exactly NTP.
    /// End-of-row layout: `2 <= s <= w + 1` (separator counted), `w + (h-1)(s-1)` passes.
    pub fn zipar(h: usize, w: usize, layout: Layout, s: usize) -> Result<Self, ScheduleError> {
        check_grid(h, w)?;
        let range = window_range(layout, w);
        if !range.contains(&s) {
            return Err(ScheduleError::WindowOutOfRange {
                window: s,
                min: *range.start(),
                max: *range.end(),
                w,
            });
        }
        let full = match layout {
            Layout::Raster => w,
            Layout::EndOfRow => w + 1,
        };
        if s >= full || h == 1 {
            let mut ntp = Self::ntp(h, w, layout)?;
            ntp.mode = Mode::Zipar;
            ntp.window = s;
            return Ok(ntp);
        }
        let passes = match layout {
            Layout::Raster => zipar_raster(h, w, s),
            Layout::EndOfRow => zipar_end_of_row(h, w, s),
        };
        Ok(Self {
            h,
            w,
            layout,
            mode: Mode::Zipar,
            window: s,
            passes,
        })
    }

    /// Number of forward passes, prefill included.
    pub fn num_passes(&self) -> usize {
        self.passes.len()
    }

    /// For each cell in raster order, the pass that produces it.
    pub fn pass_of(&self) -> Vec<usize> {
        let mut out = vec![usize::MAX; self.h * self.w];
        for (i, pass) in self.passes.iter().enumerate() {
            for cell in pass.predicted() {
                out[cell.row * self.w + cell.col] = i;
            }
        }
        out
    }

    /// For each cell in raster order, the window it was decoded under: how many tokens of
    /// the row above existed when its row's first token was predicted (the full width for
    /// row 0, which has no row above).
    pub fn window_of(&self) -> Vec<usize> {
        windows_from_passes(self.h, self.w, &self.pass_of())
    }
}

/// Windows derived from the pass that produced each cell (raster order); see
/// [`Schedule::window_of`]. Works for any schedule, adaptive ones included.
pub fn windows_from_passes(h: usize, w: usize, pass_of: &[usize]) -> Vec<usize> {
    let mut out = vec![w; h * w];
    for r in 1..h {
        let first = pass_of[r * w];
        let above = (0..w).filter(|&c| pass_of[(r - 1) * w + c] < first).count();
        out[r * w..(r + 1) * w].fill(above);
    }
    out
}

fn check_grid(h: usize, w: usize) -> Result<(), ScheduleError> {
    if h == 0 || w == 0 {
        return Err(ScheduleError::EmptyGrid { h, w });
    }
    Ok(())
}

fn prefill() -> Pass {
    Pass {
        feeds: vec![Feed {
            source: Source::Condition,
            pos: 0,
            role: Role::Next(Cell::new(0, 0)),
        }],
    }
}

/// The official LlamaGen schedule (see shared/notes/zipar-official-schedule.md): row 0 is plain
/// NTP, a row's first token is predicted from an auxiliary token fed at the slot of the
/// missing predecessor, and a completed row's real last token overwrites that slot next pass.
fn zipar_raster(h: usize, w: usize, s: usize) -> Vec<Pass> {
    let mut passes = Vec::with_capacity(2 * w + (h - 2) * s);
    passes.push(prefill());
    for c in 1..w {
        passes.push(Pass {
            feeds: vec![Feed {
                source: Source::Cell(Cell::new(0, c - 1)),
                pos: c - 1,
                role: Role::Next(Cell::new(0, c)),
            }],
        });
    }
    let mut n = vec![0usize; h];
    n[0] = w;
    let mut active = vec![1usize];
    let mut aux = vec![Cell::new(0, 0); h];
    aux[1] = Cell::new(0, w - 1);
    let mut correction: Option<usize> = None;
    while !active.is_empty() {
        let mut feeds = Vec::with_capacity(active.len() + 1);
        if let Some(r) = correction.take() {
            feeds.push(Feed {
                source: Source::Cell(Cell::new(r, w - 1)),
                pos: pos_of(Layout::Raster, w, Cell::new(r, w - 1)),
                role: Role::Discard,
            });
        }
        for &r in &active {
            let fed = if n[r] == 0 {
                // The auxiliary token, at the slot of the row's missing predecessor.
                (Source::Cell(aux[r]), Cell::new(r - 1, w - 1))
            } else {
                (Source::Cell(Cell::new(r, n[r] - 1)), Cell::new(r, n[r] - 1))
            };
            let (source, pos) = (fed.0, pos_of(Layout::Raster, w, fed.1));
            feeds.push(Feed {
                source,
                pos,
                role: Role::Next(Cell::new(r, n[r])),
            });
        }
        let rows = active.clone();
        for r in rows {
            n[r] += 1;
            if n[r] == s && r + 1 < h && !active.contains(&(r + 1)) {
                aux[r + 1] = Cell::new(r - 1, n[r - 1] - 1);
                active.push(r + 1);
            }
            if n[r] == w {
                correction = Some(r);
                active.retain(|&x| x != r);
            }
        }
        passes.push(Pass { feeds });
    }
    passes
}

/// End-of-row layout: row r+1 starts once row r's block holds `s` entries (its opening
/// separator counted); the real separator is fed at its true position, so no auxiliary token
/// is needed. A completed row's last token is fed in the next pass with its logits discarded,
/// as the official Lumina-mGPT code does (`last_token_in_row_idx`): without it, no later row
/// would ever see that token.
fn zipar_end_of_row(h: usize, w: usize, s: usize) -> Vec<Pass> {
    let mut passes = Vec::with_capacity(w + (h - 1) * (s - 1));
    let mut n = vec![0usize; h];
    let mut active: Vec<usize> = Vec::new();
    let mut first = true;
    // The row completed by the previous pass: its last token is fed in this one, logits
    // discarded, so that later rows see it (the official code's `last_token_in_row_idx`).
    let mut completed: Option<usize> = None;
    loop {
        let mut feeds = Vec::new();
        if first {
            feeds.extend(prefill().feeds);
            active.push(0);
            first = false;
        } else {
            if let Some(r) = completed.take() {
                let last = Cell::new(r, w - 1);
                feeds.push(Feed {
                    source: Source::Cell(last),
                    pos: pos_of(Layout::EndOfRow, w, last),
                    role: Role::Discard,
                });
            }
            for &r in &active {
                let feed = if n[r] == 0 {
                    Feed {
                        source: Source::Separator(r),
                        pos: separator_pos(w, r),
                        role: Role::Next(Cell::new(r, 0)),
                    }
                } else {
                    Feed {
                        source: Source::Cell(Cell::new(r, n[r] - 1)),
                        pos: pos_of(Layout::EndOfRow, w, Cell::new(r, n[r] - 1)),
                        role: Role::Next(Cell::new(r, n[r])),
                    }
                };
                feeds.push(feed);
            }
        }
        passes.push(Pass { feeds });
        let rows = active.clone();
        for r in rows {
            n[r] += 1;
            // The block of row r holds its separator plus n[r] image tokens.
            if n[r] + 1 == s && r + 1 < h {
                active.push(r + 1);
            }
            if n[r] == w {
                active.retain(|&x| x != r);
                completed = Some(r);
            }
        }
        if active.is_empty() {
            break;
        }
    }
    passes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_each_cell_once(s: &Schedule) {
        let mut seen = vec![0usize; s.h * s.w];
        let mut produced_at = vec![usize::MAX; s.h * s.w];
        for (i, pass) in s.passes.iter().enumerate() {
            for f in &pass.feeds {
                // Every fed cell must already exist when it is fed.
                if let Source::Cell(c) = f.source {
                    assert!(
                        produced_at[c.row * s.w + c.col] < i,
                        "pass {i} feeds {c:?} before it exists"
                    );
                }
            }
            for c in pass.predicted() {
                seen[c.row * s.w + c.col] += 1;
                produced_at[c.row * s.w + c.col] = i;
            }
        }
        assert!(seen.iter().all(|&k| k == 1), "{seen:?}");
    }

    #[test]
    fn ntp_pass_count_and_order() {
        for (h, w) in [(1, 1), (3, 4), (16, 16), (5, 7)] {
            let s = Schedule::ntp(h, w, Layout::Raster).unwrap();
            assert_eq!(s.num_passes(), h * w);
            check_each_cell_once(&s);
            let order: Vec<usize> = s.pass_of();
            assert_eq!(order, (0..h * w).collect::<Vec<_>>());
        }
    }

    #[test]
    fn zipar_pass_counts_follow_the_formula() {
        for h in 2..=12 {
            for w in 3..=12 {
                for s in 2..w {
                    let sch = Schedule::zipar(h, w, Layout::Raster, s).unwrap();
                    assert_eq!(sch.num_passes(), 2 * w + (h - 2) * s, "h={h} w={w} s={s}");
                    check_each_cell_once(&sch);
                }
            }
        }
    }

    #[test]
    fn zipar_rows_are_produced_left_to_right_and_start_after_s_tokens_above() {
        let (h, w, s) = (6, 8, 3);
        let sch = Schedule::zipar(h, w, Layout::Raster, s).unwrap();
        let pass_of = sch.pass_of();
        for r in 0..h {
            for c in 1..w {
                assert_eq!(pass_of[r * w + c], pass_of[r * w + c - 1] + 1);
            }
        }
        // Row 1 starts right after row 0 completes; later rows s passes after the row above.
        assert_eq!(pass_of[w], w);
        for r in 2..h {
            assert_eq!(pass_of[r * w], pass_of[(r - 1) * w] + s);
        }
    }

    #[test]
    fn zipar_feeds_auxiliary_token_and_correction() {
        let (h, w, s) = (4, 5, 2);
        let sch = Schedule::zipar(h, w, Layout::Raster, s).unwrap();
        // Row 2's first token: fed at slot (1, w-1) with the latest token of row 0.
        let first_of_row2 = sch
            .passes
            .iter()
            .flat_map(|p| p.feeds.iter())
            .find(|f| f.role == Role::Next(Cell::new(2, 0)))
            .copied()
            .unwrap();
        assert_eq!(first_of_row2.pos, w + w - 1);
        assert_eq!(first_of_row2.source, Source::Cell(Cell::new(0, w - 1)));
        // Row 1 completes; the next pass feeds its real last token at its own slot first.
        let pass_of = sch.pass_of();
        let done = pass_of[w + w - 1];
        let corr = sch.passes[done + 1].feeds[0];
        assert_eq!(corr.source, Source::Cell(Cell::new(1, w - 1)));
        assert_eq!(corr.pos, w + w - 1);
        assert_eq!(corr.role, Role::Discard);
        // Row 3's auxiliary token is the latest token of row 1 when row 3 was activated.
        let first_of_row3 = sch
            .passes
            .iter()
            .flat_map(|p| p.feeds.iter())
            .find(|f| f.role == Role::Next(Cell::new(3, 0)))
            .copied()
            .unwrap();
        assert_eq!(first_of_row3.pos, 2 * w + w - 1);
        assert_eq!(first_of_row3.source, Source::Cell(Cell::new(1, s + s - 1)));
    }

    #[test]
    fn windows_are_the_row_lag() {
        let sch = Schedule::zipar(5, 6, Layout::Raster, 3).unwrap();
        let win = sch.window_of();
        assert!(win[..12].iter().all(|&x| x == 6), "{win:?}");
        assert!(win[12..].iter().all(|&x| x == 3), "{win:?}");
        let ntp = Schedule::ntp(5, 6, Layout::Raster).unwrap();
        assert!(ntp.window_of().iter().all(|&x| x == 6));
    }

    #[test]
    fn window_equal_to_width_is_ntp() {
        for (h, w) in [(2, 2), (4, 6), (16, 16)] {
            let z = Schedule::zipar(h, w, Layout::Raster, w).unwrap();
            let n = Schedule::ntp(h, w, Layout::Raster).unwrap();
            assert_eq!(z.passes, n.passes);
            assert_eq!(z.num_passes(), h * w);
        }
    }

    #[test]
    fn windows_out_of_range_are_rejected() {
        assert_eq!(
            Schedule::zipar(4, 4, Layout::Raster, 1),
            Err(ScheduleError::WindowOutOfRange {
                window: 1,
                min: 2,
                max: 4,
                w: 4
            })
        );
        assert!(Schedule::zipar(4, 4, Layout::Raster, 5).is_err());
        assert!(Schedule::zipar(4, 4, Layout::EndOfRow, 6).is_err());
        assert!(Schedule::zipar(0, 4, Layout::Raster, 2).is_err());
    }

    #[test]
    fn end_of_row_pass_counts_follow_the_formula() {
        for h in 1..=10 {
            for w in 2..=10 {
                for s in 2..=w {
                    let sch = Schedule::zipar(h, w, Layout::EndOfRow, s).unwrap();
                    assert_eq!(sch.num_passes(), w + (h - 1) * (s - 1), "h={h} w={w} s={s}");
                    check_each_cell_once(&sch);
                }
            }
        }
        // The paper's figures: 48x48 Lumina-mGPT with s = 16 and a 90x90 Emu3 grid with s = 8.
        assert_eq!(
            Schedule::zipar(48, 48, Layout::EndOfRow, 16)
                .unwrap()
                .num_passes(),
            753
        );
        assert_eq!(
            Schedule::zipar(90, 90, Layout::EndOfRow, 8)
                .unwrap()
                .num_passes(),
            713
        );
    }

    #[test]
    fn end_of_row_feeds_the_real_separator_at_its_position() {
        let (h, w, s) = (3, 4, 3);
        let sch = Schedule::zipar(h, w, Layout::EndOfRow, s).unwrap();
        let f = sch
            .passes
            .iter()
            .flat_map(|p| p.feeds.iter())
            .find(|f| f.role == Role::Next(Cell::new(2, 0)))
            .copied()
            .unwrap();
        assert_eq!(f.source, Source::Separator(2));
        assert_eq!(f.pos, 2 * (w + 1) - 1);
        // Row 2 starts once row 1 holds s - 1 image tokens.
        let pass_of = sch.pass_of();
        assert_eq!(pass_of[2 * w], pass_of[w + s - 2] + 1);
    }

    #[test]
    fn end_of_row_feeds_every_completed_rows_last_token() {
        // Every image token except the grid's very last must be fed once, whatever the window:
        // a row's last token goes in with the next pass, its logits discarded.
        for s in 2..=5 {
            let (h, w) = (3, 4);
            let sch = Schedule::zipar(h, w, Layout::EndOfRow, s).unwrap();
            let mut fed = vec![0usize; h * w];
            for pass in &sch.passes {
                for f in &pass.feeds {
                    if let Source::Cell(c) = f.source {
                        fed[c.row * w + c.col] += 1;
                        if c.col == w - 1 {
                            assert_eq!(f.role, Role::Discard, "s = {s}: {c:?}");
                        }
                    }
                }
            }
            let mut want = vec![1usize; h * w];
            want[h * w - 1] = 0;
            assert_eq!(fed, want, "s = {s}");
        }
    }

    #[test]
    fn end_of_row_full_window_is_one_token_per_pass() {
        let sch = Schedule::zipar(3, 4, Layout::EndOfRow, 5).unwrap();
        assert_eq!(sch.num_passes(), 12);
        assert!(sch.passes.iter().all(|p| p.predicted().count() == 1));
    }
}
