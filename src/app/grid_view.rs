//! The token grid: cells coloured by pass, window or rejections, or the image itself, with a
//! hover tooltip per cell and a pass limit for replay.

use egui::{Color32, Rect, Sense, Stroke, TextureHandle, Vec2, pos2, vec2};

use super::run_view::{AttentionMaps, NEEDED_MASS, RunView};
use super::settings::ViewMode;
use crate::colormap;
use crate::decode::exact::Fate;

/// Colours of the fate map.
const FATES: [(Fate, Color32, &str); 3] = [
    (Fate::Accepted, Color32::from_rgb(70, 175, 95), "accepted"),
    (Fate::Residual, Color32::from_rgb(215, 65, 60), "residual"),
    (Fate::Plain, Color32::from_rgb(105, 115, 135), "plain"),
];

fn fate_color(f: Fate) -> Color32 {
    FATES
        .iter()
        .find(|(g, _, _)| *g == f)
        .map_or(Color32::GRAY, |(_, c, _)| *c)
}

fn color(c: [u8; 3]) -> Color32 {
    Color32::from_rgb(c[0], c[1], c[2])
}

/// Darkens a colour (alternate passes in the pass map).
fn shade(c: [u8; 3], f: f32) -> [u8; 3] {
    c.map(|v| (v as f32 * f).round() as u8)
}

/// The pass map's colour of `pass`. Alternate passes darker: the cells a pass produced
/// together read as one stripe, so the diagonal front of ZipAR stays visible in a still picture.
fn pass_color(run: &RunView, pass: usize) -> [u8; 3] {
    let max_pass = run.passes().saturating_sub(1).max(1) as f32;
    let c = colormap::viridis(pass as f32 / max_pass);
    if pass % 2 == 1 { shade(c, 0.72) } else { c }
}

/// The colour of cell `i` in `mode` (`None`: the view shows no colour there).
fn cell_color(
    run: &RunView,
    mode: ViewMode,
    maps: Option<&AttentionMaps>,
    i: usize,
) -> Option<Color32> {
    let w = run.grid.1;
    let pass = run.pass_of.get(i).copied().flatten()?;
    let banded = || pass_color(run, pass);
    Some(match mode {
        ViewMode::Image => return None,
        ViewMode::PassMap => color(banded()),
        ViewMode::Overlay => {
            let c = banded();
            Color32::from_rgba_unmultiplied(c[0], c[1], c[2], 150)
        }
        ViewMode::Parallelism => {
            let k = run.tokens_per_pass.get(pass).copied().unwrap_or(1) as f32;
            color(colormap::scaled(
                k,
                1.0,
                run.max_tokens_per_pass().max(2) as f32,
            ))
        }
        ViewMode::Ahead => color(colormap::scaled(
            run.passes_ahead(i) as f32,
            0.0,
            run.max_passes_ahead().max(1) as f32,
        )),
        ViewMode::WindowMap => {
            let win = run.window_of[i].unwrap_or(w) as f32;
            color(colormap::scaled(win, 0.0, w as f32))
        }
        ViewMode::Rejections => {
            let max_rej = run.rejections.iter().copied().max().unwrap_or(0).max(1) as f32;
            color(colormap::scaled(run.rejections[i] as f32, 0.0, max_rej))
        }
        ViewMode::Fate => fate_color(run.fate_of.get(i).copied().flatten()?),
        // NTP tokens saw everything: their colour is the window they would need; other runs
        // show how much of each token's attention fell on what was written.
        ViewMode::Attention => {
            let maps = maps?;
            match maps.needed.get(i).copied().flatten() {
                Some(s) => color(colormap::scaled(s as f32, 1.0, w as f32)),
                None => color(colormap::viridis(maps.retained.get(i).copied().flatten()?)),
            }
        }
    })
}

/// Draws `run` in `mode` into a square area `side` points wide. Only cells produced in passes
/// `< upto` are shown (the replay); the cells of pass `front` are outlined (the decoding
/// front: with ZipAR, a diagonal across several rows); hovering shows a cell's details.
#[allow(clippy::too_many_arguments)]
pub fn grid_ui(
    ui: &mut egui::Ui,
    run: &RunView,
    mode: ViewMode,
    attention: Option<&AttentionMaps>,
    texture: Option<&TextureHandle>,
    upto: usize,
    front: Option<usize>,
    side: f32,
) {
    let (h, w) = run.grid;
    // With end-of-row tokens, a half-width column after the last one shows when each was fed.
    let cols = w as f32 + if run.end_of_row { 0.5 } else { 0.0 };
    let aspect = if h > 0 { cols / h as f32 } else { 1.0 };
    let size = if aspect >= 1.0 {
        vec2(side, side / aspect)
    } else {
        vec2(side * aspect, side)
    };
    let (rect, response) = ui.allocate_exact_size(size, Sense::hover());
    response.widget_info(|| {
        let eol = if run.end_of_row {
            " with an end-of-row column"
        } else {
            ""
        };
        egui::WidgetInfo::labeled(egui::Role::Image, true, format!("{} grid{eol}", run.label))
    });
    let painter = ui.painter_at(rect);
    painter.rect_filled(rect, 2.0, ui.visuals().extreme_bg_color);
    if h * w == 0 {
        return;
    }
    let cell = Vec2::new(rect.width() / cols, rect.height() / h as f32);
    let image_rect = Rect::from_min_size(rect.min, vec2(cell.x * w as f32, rect.height()));
    let eol_rect = |r: usize| {
        Rect::from_min_size(
            pos2(image_rect.max.x, rect.min.y + r as f32 * cell.y),
            vec2(cell.x * 0.5, cell.y),
        )
    };
    let cell_rect = |i: usize| {
        let (r, c) = (i / w, i % w);
        Rect::from_min_size(
            pos2(
                rect.min.x + c as f32 * cell.x,
                rect.min.y + r as f32 * cell.y,
            ),
            cell,
        )
    };
    let visible = |i: usize| matches!(run.pass_of.get(i), Some(Some(p)) if *p < upto);
    let show_image = matches!(mode, ViewMode::Image | ViewMode::Overlay);
    if show_image && let Some(tex) = texture {
        painter.image(
            tex.id(),
            image_rect,
            Rect::from_min_max(pos2(0.0, 0.0), pos2(1.0, 1.0)),
            Color32::WHITE,
        );
    }
    for r in 0..h {
        if let Some(p) = run.end_of_row_pass(r).filter(|&p| p < upto) {
            painter.rect_filled(eol_rect(r).shrink(0.5), 0.0, color(pass_color(run, p)));
        }
    }
    // All cells as one mesh of plain quads, not a filled-rect shape each (tessellated with
    // anti-aliasing feathers, several times the triangles). On a software renderer a frame
    // of two finished runs' grids costs 20-21 instead of 22 ms of CPU, taken from the decoder
    // while a run starts; the cells' area itself costs about 4 ms.
    let mut cells = egui::Mesh::default();
    for i in 0..h * w {
        let r = cell_rect(i);
        if !visible(i) {
            if mode != ViewMode::Image || texture.is_none() {
                continue;
            }
            // Not generated yet at this point of the replay: dim the image there.
            cells.add_colored_rect(r, Color32::from_black_alpha(170));
            continue;
        }
        if let Some(fill) = cell_color(run, mode, attention, i) {
            cells.add_colored_rect(r.shrink(0.5), fill);
        }
    }
    painter.add(egui::Shape::mesh(cells));
    let hovered = response.hover_pos().and_then(|pos| {
        let c = ((pos.x - rect.min.x) / cell.x).floor() as usize;
        let r = ((pos.y - rect.min.y) / cell.y).floor() as usize;
        (r < h && c < w).then_some(r * w + c)
    });
    if mode == ViewMode::Attention
        && let Some(maps) = attention
        && let Some(i) = hovered
        && visible(i)
        && let Some(token) = run.attention_of.get(i).and_then(Option::as_ref)
        && let Some(att) = token.select(maps.pick.layer, maps.pick.head)
    {
        // Where the hovered token looked: its attention over the earlier cells, log-scaled
        // against its largest share; the cells written when its query ran outlined.
        let image = &att[run.cond_len.min(att.len())..];
        let top = image.iter().copied().fold(f32::MIN_POSITIVE, f32::max);
        let pass = token.pass;
        let mut shares = egui::Mesh::default();
        for (q, &a) in image.iter().enumerate().take(h * w) {
            let t = (1.0 + (a / top).max(1e-4).log10() / 4.0).clamp(0.0, 1.0_f32);
            shares.add_colored_rect(cell_rect(q).shrink(0.5), color(colormap::viridis(t)));
        }
        painter.add(egui::Shape::mesh(shares));
        for q in 0..image.len().min(h * w) {
            if matches!(run.pass_of.get(q), Some(Some(p)) if *p < pass) {
                painter.rect_stroke(
                    cell_rect(q),
                    0.0,
                    Stroke::new(1.0, Color32::from_rgb(255, 255, 255)),
                    egui::StrokeKind::Inside,
                );
            }
        }
    }
    if let Some(front) = front {
        let stroke = Stroke::new(2.0, Color32::from_rgb(255, 80, 200));
        for i in (0..h * w).filter(|&i| run.pass_of[i] == Some(front)) {
            painter.rect_stroke(cell_rect(i), 0.0, stroke, egui::StrokeKind::Inside);
        }
    }
    if let Some(pos) = response.hover_pos() {
        let c = ((pos.x - rect.min.x) / cell.x).floor() as usize;
        let r = ((pos.y - rect.min.y) / cell.y).floor() as usize;
        if run.end_of_row && r < h && c >= w {
            response.on_hover_ui_at_pointer(|ui| {
                ui.label(format!("end of row {r}"));
                match run.end_of_row_pass(r) {
                    Some(p) if p < upto => ui.label(format!(
                        "fed in pass {p}, with the first token of row {} (a known token: no pass of its own)",
                        r + 1
                    )),
                    _ if r + 1 == h => ui.label("the last row's: never needed"),
                    _ if run.params.mode == crate::decode::Mode::Exact => {
                        ui.label("the exact mode feeds it with its drafts; when is not recorded")
                    }
                    _ => ui.label("not fed yet"),
                };
            });
        } else if r < h && c < w {
            let i = r * w + c;
            painter.rect_stroke(
                cell_rect(i),
                0.0,
                Stroke::new(1.5, Color32::WHITE),
                egui::StrokeKind::Inside,
            );
            response.on_hover_ui_at_pointer(|ui| {
                ui.label(format!("row {r}, column {c}"));
                match (run.tokens.get(i).copied().flatten(), visible(i)) {
                    (Some(t), true) => {
                        let pass = run.pass_of[i].unwrap_or(0);
                        ui.label(format!("token {t}"));
                        ui.label(format!(
                            "pass {pass} ({} tokens in that pass)",
                            run.tokens_per_pass.get(pass).copied().unwrap_or(1)
                        ));
                        ui.label(format!("{} passes ahead of NTP", run.passes_ahead(i)));
                        ui.label(format!("window {}", run.window_of[i].unwrap_or(w)));
                        ui.label(format!("rejections {}", run.rejections[i]));
                        ui.label(format!("probability {:.3}", run.probs[i]));
                        exact_cell_ui(ui, run, i);
                        let maps = attention.filter(|_| mode == ViewMode::Attention);
                        if let Some(m) = maps.and_then(|m| m.retained.get(i).copied().flatten()) {
                            ui.label(format!(
                                "{:.0}% of its attention on what was written then",
                                100.0 * m
                            ));
                        }
                        if let Some(s) = maps.and_then(|m| m.needed.get(i).copied().flatten()) {
                            ui.label(format!(
                                "needs window {s} to keep {:.0}% of its attention",
                                100.0 * NEEDED_MASS
                            ));
                        }
                    }
                    _ => {
                        ui.label("not generated yet");
                    }
                }
            });
        }
    }
}

/// The exact mode's story of one cell: its fate, when its draft was drawn and its test.
fn exact_cell_ui(ui: &mut egui::Ui, run: &RunView, i: usize) {
    let Some(fate) = run.fate_of.get(i).copied().flatten() else {
        return;
    };
    let rec = run.trace.as_ref().and_then(|t| t.exact.as_ref());
    let draft = rec.and_then(|r| r.draft_pass_of[i]);
    let accept = rec.and_then(|r| r.accept_prob_of[i]);
    let final_pass = run.pass_of[i].unwrap_or(0);
    ui.colored_label(
        fate_color(fate),
        match (fate, draft) {
            (Fate::Accepted, Some(d)) => {
                format!("accepted draft: drawn in pass {d}, final in pass {final_pass}")
            }
            (Fate::Accepted, None) => format!("accepted draft, final in pass {final_pass}"),
            (Fate::Residual, _) => {
                format!("draft rejected in pass {final_pass}; residual sample")
            }
            (Fate::Plain, _) => format!("plain sample in pass {final_pass} (no draft)"),
        },
    );
    if let Some(a) = accept {
        ui.label(format!("acceptance probability min(1, p/q) = {a:.3}"));
    }
}

/// A colour bar with its range, for the pass and window maps.
pub fn legend_ui(ui: &mut egui::Ui, mode: ViewMode, run: &RunView) {
    if mode == ViewMode::Attention
        && run.params.mode == crate::decode::Mode::Ntp
        && run.attention_of.iter().any(Option::is_some)
    {
        let w = run.grid.1;
        return colorbar_ui(
            ui,
            1,
            w,
            "needed window: the window that keeps 95% of the token's attention",
        );
    }
    if mode == ViewMode::Fate {
        fate_legend_ui(ui, run);
        return;
    }
    if mode == ViewMode::Attention && !run.attention_of.iter().any(Option::is_some) {
        ui.weak("no attention recorded: tick \"Record attention\" and generate again");
        return;
    }
    let (lo, hi, what) = match mode {
        ViewMode::PassMap | ViewMode::Overlay => (
            0,
            run.passes().saturating_sub(1),
            "forward pass (alternate passes darker)",
        ),
        ViewMode::WindowMap => (0, run.grid.1, "window (tokens of the row above)"),
        ViewMode::Rejections => (
            0,
            run.rejections.iter().copied().max().unwrap_or(0) as usize,
            "rejected drafts",
        ),
        ViewMode::Parallelism => (
            1,
            run.max_tokens_per_pass().max(2),
            "tokens produced by the cell's pass",
        ),
        ViewMode::Ahead => (
            0,
            run.max_passes_ahead().max(1),
            "passes ahead of next-token decoding",
        ),
        ViewMode::Attention => (
            0,
            1,
            "share of the token's attention on what was written (hover: where it looked)",
        ),
        ViewMode::Image | ViewMode::Fate => return,
    };
    colorbar_ui(ui, lo, hi, what);
}

/// A viridis colour bar from `lo` to `hi` with a caption.
fn colorbar_ui(ui: &mut egui::Ui, lo: usize, hi: usize, what: &str) {
    // wraps within the lane: the lanes keep their width whatever the legend says
    ui.horizontal_wrapped(|ui| {
        ui.label(lo.to_string());
        let (rect, _) = ui.allocate_exact_size(vec2(160.0, 12.0), Sense::hover());
        let n = 32;
        for k in 0..n {
            let x0 = rect.min.x + rect.width() * k as f32 / n as f32;
            let x1 = rect.min.x + rect.width() * (k + 1) as f32 / n as f32;
            let r = Rect::from_min_max(pos2(x0, rect.min.y), pos2(x1, rect.max.y));
            ui.painter()
                .rect_filled(r, 0.0, color(colormap::viridis(k as f32 / (n - 1) as f32)));
        }
        ui.label(hi.to_string());
        ui.weak(what);
    });
}

/// The fate map's swatches with the count of each fate.
fn fate_legend_ui(ui: &mut egui::Ui, run: &RunView) {
    ui.horizontal_wrapped(|ui| {
        if !run.fate_of.iter().any(Option::is_some) {
            ui.weak("fates exist in the exact mode only");
            return;
        }
        for (fate, c, name) in FATES {
            let n = run.fate_of.iter().filter(|f| **f == Some(fate)).count();
            let (rect, _) = ui.allocate_exact_size(vec2(12.0, 12.0), Sense::hover());
            ui.painter().rect_filled(rect, 2.0, c);
            ui.label(format!("{name} {n}")).on_hover_text(match fate {
                Fate::Accepted => "drafts that passed their test against the full context",
                Fate::Residual => "drawn from norm(max(0, p - q)) after a rejected draft",
                Fate::Plain => "sampled from the full-context p: no draft was waiting",
            });
        }
    });
}

/// A fixed plot under a grid: no zoom, drag or scroll, y from 0, labelled axes.
fn small_plot<'a>(
    id: impl std::hash::Hash + std::fmt::Debug,
    width: f32,
    height: f32,
    x_label: &str,
    y_label: &str,
) -> egui_plot::Plot<'a> {
    egui_plot::Plot::new(id)
        .width(width)
        .height(height)
        .allow_zoom(false)
        .allow_drag(false)
        .allow_scroll(false)
        .allow_boxed_zoom(false)
        .include_y(0.0)
        .x_axis_label(x_label.to_string())
        .y_axis_label(y_label.to_string())
        .y_axis_min_width(28.0)
}

/// NTP run with attention: how many tokens need each window (the paper's Figure 5) and the
/// window that covers 90% of them.
pub fn needed_window_plot_ui(ui: &mut egui::Ui, run: &RunView, maps: &AttentionMaps, width: f32) {
    use egui_plot::{Bar, BarChart};
    let (h, w) = run.grid;
    if run.params.mode != crate::decode::Mode::Ntp || h < 2 {
        return;
    }
    let needed: Vec<usize> = (w..h * w)
        .filter_map(|i| maps.needed.get(i).copied().flatten())
        .collect();
    if needed.is_empty() {
        return;
    }
    let mut counts = vec![0usize; w + 1];
    for &s in &needed {
        counts[s.min(w)] += 1;
    }
    let mut cum = 0;
    let cover = (1..=w)
        .find(|&s| {
            cum += counts[s];
            cum as f64 >= 0.9 * needed.len() as f64
        })
        .unwrap_or(w);
    ui.label(format!(
        "needed window, rows 1-{}: 90% of tokens need at most {cover}",
        h - 1
    ));
    small_plot(
        ("needed_windows", run.job),
        width,
        72.0,
        "needed window",
        "tokens",
    )
    .include_x(0.5)
    .include_x(w as f64 + 0.5)
    .show(ui, |p| {
        let bars = (1..=w)
            .map(|s| {
                let c = colormap::scaled(s as f32, 1.0, w as f32);
                Bar::new(s as f64, counts[s] as f64)
                    .width(0.8)
                    .fill(color(c))
            })
            .collect();
        p.bar_chart(BarChart::new("tokens per needed window", bars));
    });
}

/// Exact mode, finished: the share of tested drafts accepted in each row, and how many drafts
/// each pass accepted (its accepted run), with the replay position.
pub fn exact_plot_ui(ui: &mut egui::Ui, run: &RunView, at: Option<usize>, width: f32) {
    use egui_plot::{Bar, BarChart, VLine};
    let Some(rec) = run.trace.as_ref().and_then(|t| t.exact.as_ref()) else {
        return;
    };
    let (h, w) = run.grid;
    let green = FATES[0].1;
    let plot = |id: &str, x: &str, y: &str, n: usize| {
        small_plot((id, run.job), width, 64.0, x, y)
            .include_x(0.0)
            .include_x(n as f64)
    };
    plot("accept_by_row", "row", "accepted", h)
        .include_y(1.0)
        .show(ui, |p| {
            let bars = (0..h)
                .filter_map(|r| {
                    let tested = (0..w).filter(|&c| rec.accept_prob_of[r * w + c].is_some());
                    let n = tested.clone().count();
                    let ok = tested
                        .filter(|&c| rec.fate_of[r * w + c] == Fate::Accepted)
                        .count();
                    (n > 0).then(|| {
                        Bar::new(r as f64, ok as f64 / n as f64)
                            .width(0.8)
                            .name(format!("row {r}: {ok} of {n} drafts accepted"))
                            .fill(green)
                    })
                })
                .collect();
            p.bar_chart(BarChart::new("acceptance per row", bars).color(green));
        });
    let n = rec.accepted_per_pass.len();
    plot("accepted_per_pass", "pass", "run", n).show(ui, |p| {
        let bars = rec
            .accepted_per_pass
            .iter()
            .enumerate()
            .filter(|(_, k)| **k > 0)
            .map(|(i, &k)| Bar::new(i as f64, k as f64).width(1.0).fill(green))
            .collect();
        p.bar_chart(BarChart::new("drafts accepted per pass", bars).color(green));
        if let Some(x) = at {
            p.vline(VLine::new("replay", x as f64).color(Color32::from_rgb(255, 80, 200)));
        }
    });
}

/// Tokens per pass and milliseconds per pass (egui_plot: axes, hover values), with the
/// replay position as a vertical line.
pub fn pass_plot_ui(ui: &mut egui::Ui, run: &RunView, at: Option<usize>, width: f32) {
    use egui_plot::{Line, PlotPoints, VLine};
    let n = run.pass_ms.len();
    if n == 0 {
        return;
    }
    let accent = ui.visuals().selection.bg_fill;
    let marker = Color32::from_rgb(255, 80, 200);
    let plot = |id: &str, y_label: &str| {
        small_plot((id, run.job), width, 72.0, "pass", y_label)
            .include_x(0.0)
            .include_x(n as f64)
    };
    plot("tokens_per_pass", "tokens").show(ui, |p| {
        // A filled step line, as the bars of width 1 it replaces looked: one shape instead of
        // a rect with an outline per pass. (The bars cost 3.5 ms of CPU a frame on a software
        // renderer, mostly their area, which the fill still covers: about 1 ms is saved.)
        let steps: PlotPoints = run
            .tokens_per_pass
            .iter()
            .enumerate()
            .flat_map(|(i, &k)| [[i as f64 - 0.5, k as f64], [i as f64 + 0.5, k as f64]])
            .collect();
        let line = Line::new("tokens per pass", steps).color(accent);
        p.line(line.fill(0.0).fill_alpha(1.0));
        if let Some(x) = at {
            p.vline(VLine::new("replay", x as f64).color(marker));
        }
    });
    plot("ms_per_pass", "ms").show(ui, |p| {
        let pts: PlotPoints = run
            .pass_ms
            .iter()
            .enumerate()
            .map(|(i, &ms)| [i as f64, ms])
            .collect();
        p.line(Line::new("ms per pass", pts).color(Color32::from_rgb(230, 150, 60)));
        if let Some(x) = at {
            p.vline(VLine::new("replay", x as f64).color(marker));
        }
    });
}
