//! The token grid: cells coloured by pass, window or rejections, or the image itself, with a
//! hover tooltip per cell and a pass limit for replay.

use egui::{Color32, Rect, Sense, Stroke, TextureHandle, Vec2, pos2, vec2};

use super::run_view::RunView;
use super::settings::ViewMode;
use crate::colormap;

fn color(c: [u8; 3]) -> Color32 {
    Color32::from_rgb(c[0], c[1], c[2])
}

/// Draws `run` in `mode` into a square area `side` points wide. Only cells produced in passes
/// `< upto` are shown (the replay slider); hovering shows a cell's details.
pub fn grid_ui(
    ui: &mut egui::Ui,
    run: &RunView,
    mode: ViewMode,
    texture: Option<&TextureHandle>,
    upto: usize,
    side: f32,
) {
    let (h, w) = run.grid;
    let aspect = if h > 0 { w as f32 / h as f32 } else { 1.0 };
    let size = if aspect >= 1.0 {
        vec2(side, side / aspect)
    } else {
        vec2(side * aspect, side)
    };
    let (rect, response) = ui.allocate_exact_size(size, Sense::hover());
    let painter = ui.painter_at(rect);
    painter.rect_filled(rect, 2.0, ui.visuals().extreme_bg_color);
    if h * w == 0 {
        return;
    }
    let cell = Vec2::new(rect.width() / w as f32, rect.height() / h as f32);
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
            rect,
            Rect::from_min_max(pos2(0.0, 0.0), pos2(1.0, 1.0)),
            Color32::WHITE,
        );
    }
    let max_pass = run.passes().saturating_sub(1).max(1) as f32;
    let max_rej = run.rejections.iter().copied().max().unwrap_or(0).max(1) as f32;
    for i in 0..h * w {
        let r = cell_rect(i);
        if !visible(i) {
            if mode != ViewMode::Image || texture.is_none() {
                continue;
            }
            // Not generated yet at this point of the replay: dim the image there.
            painter.rect_filled(r, 0.0, Color32::from_black_alpha(170));
            continue;
        }
        let pass = run.pass_of[i].unwrap_or(0) as f32;
        let fill = match mode {
            ViewMode::Image => continue,
            ViewMode::PassMap => color(colormap::viridis(pass / max_pass)),
            ViewMode::Overlay => {
                let c = colormap::viridis(pass / max_pass);
                Color32::from_rgba_unmultiplied(c[0], c[1], c[2], 150)
            }
            ViewMode::WindowMap => {
                let win = run.window_of[i].unwrap_or(w) as f32;
                color(colormap::scaled(win, 0.0, w as f32))
            }
            ViewMode::Rejections => color(colormap::scaled(run.rejections[i] as f32, 0.0, max_rej)),
        };
        painter.rect_filled(r.shrink(0.5), 0.0, fill);
    }
    if let Some(pos) = response.hover_pos() {
        let c = ((pos.x - rect.min.x) / cell.x).floor() as usize;
        let r = ((pos.y - rect.min.y) / cell.y).floor() as usize;
        if r < h && c < w {
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
                        ui.label(format!("token {t}"));
                        ui.label(format!("pass {}", run.pass_of[i].unwrap_or(0)));
                        ui.label(format!("window {}", run.window_of[i].unwrap_or(w)));
                        ui.label(format!("rejections {}", run.rejections[i]));
                        ui.label(format!("probability {:.3}", run.probs[i]));
                    }
                    _ => {
                        ui.label("not generated yet");
                    }
                }
            });
        }
    }
}

/// A colour bar with its range, for the pass and window maps.
pub fn legend_ui(ui: &mut egui::Ui, mode: ViewMode, run: &RunView) {
    let (lo, hi, what) = match mode {
        ViewMode::PassMap | ViewMode::Overlay => {
            (0, run.passes().saturating_sub(1), "forward pass")
        }
        ViewMode::WindowMap => (0, run.grid.1, "window (tokens of the row above)"),
        ViewMode::Rejections => (
            0,
            run.rejections.iter().copied().max().unwrap_or(0) as usize,
            "rejected drafts",
        ),
        ViewMode::Image => return,
    };
    ui.horizontal(|ui| {
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

/// Bars of tokens per pass (top) and time per pass (bottom).
pub fn pass_plot_ui(ui: &mut egui::Ui, run: &RunView, width: f32) {
    let n = run.pass_ms.len();
    if n == 0 {
        return;
    }
    let height = 48.0;
    let (rect, response) = ui.allocate_exact_size(vec2(width, height * 2.0 + 6.0), Sense::hover());
    let painter = ui.painter_at(rect);
    let top = Rect::from_min_size(rect.min, vec2(width, height));
    let bottom = Rect::from_min_size(
        pos2(rect.min.x, rect.min.y + height + 6.0),
        vec2(width, height),
    );
    painter.rect_filled(top, 0.0, ui.visuals().extreme_bg_color);
    painter.rect_filled(bottom, 0.0, ui.visuals().extreme_bg_color);
    let max_k = run
        .tokens_per_pass
        .iter()
        .copied()
        .max()
        .unwrap_or(1)
        .max(1) as f32;
    let max_ms = run.pass_ms.iter().copied().fold(0.0, f64::max).max(1e-6) as f32;
    let bw = width / n as f32;
    let accent = ui.visuals().selection.bg_fill;
    for i in 0..n {
        let x = rect.min.x + i as f32 * bw;
        let k = run.tokens_per_pass[i] as f32 / max_k;
        let t = run.pass_ms[i] as f32 / max_ms;
        painter.rect_filled(
            Rect::from_min_max(
                pos2(x, top.max.y - k * height),
                pos2(x + bw.max(1.0), top.max.y),
            ),
            0.0,
            accent,
        );
        painter.rect_filled(
            Rect::from_min_max(
                pos2(x, bottom.max.y - t * height),
                pos2(x + bw.max(1.0), bottom.max.y),
            ),
            0.0,
            Color32::from_rgb(230, 150, 60),
        );
    }
    let text = ui.visuals().text_color();
    painter.text(
        top.left_top() + vec2(4.0, 2.0),
        egui::Align2::LEFT_TOP,
        format!("tokens per pass (max {max_k:.0})"),
        egui::FontId::proportional(11.0),
        text,
    );
    painter.text(
        bottom.left_top() + vec2(4.0, 2.0),
        egui::Align2::LEFT_TOP,
        format!("ms per pass (max {max_ms:.1})"),
        egui::FontId::proportional(11.0),
        text,
    );
    if let Some(pos) = response.hover_pos() {
        let i = (((pos.x - rect.min.x) / bw).floor() as usize).min(n - 1);
        response.on_hover_text_at_pointer(format!(
            "pass {i}: {} tokens, {:.2} ms",
            run.tokens_per_pass[i], run.pass_ms[i]
        ));
    }
}
