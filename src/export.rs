//! Files out: the image as PNG, the trace as JSON.

use std::path::Path;

use anyhow::Context;

use crate::decode::DecodeTrace;
use crate::model::RgbImage;

/// Checks that a file can be created at `path` before a long run.
pub fn check_writable(path: &Path) -> anyhow::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    anyhow::ensure!(
        parent.is_dir(),
        "cannot write {}: folder {} does not exist",
        path.display(),
        parent.display()
    );
    anyhow::ensure!(
        !path.is_dir(),
        "cannot write {}: it is a folder",
        path.display()
    );
    Ok(())
}

/// Writes an RGB image as PNG.
pub fn write_png(img: &RgbImage, path: &Path) -> anyhow::Result<()> {
    image::save_buffer_with_format(
        path,
        &img.pixels,
        img.width as u32,
        img.height as u32,
        image::ExtendedColorType::Rgb8,
        image::ImageFormat::Png,
    )
    .with_context(|| format!("cannot write image {}", path.display()))
}

/// Writes the trace JSON.
pub fn write_trace_json(trace: &DecodeTrace, path: &Path) -> anyhow::Result<()> {
    let text = serde_json::to_string(trace)?;
    std::fs::write(path, text).with_context(|| format!("cannot write trace {}", path.display()))
}

/// The pass map as an RGB image: one `cell` x `cell` square per token, coloured by pass.
pub fn pass_map_image(trace: &DecodeTrace, cell: usize) -> RgbImage {
    let (h, w) = (trace.grid_h, trace.grid_w);
    let cell = cell.max(1);
    let (width, height) = (w * cell, h * cell);
    let max_pass = trace.passes.saturating_sub(1).max(1) as f32;
    let mut pixels = vec![0u8; width * height * 3];
    for y in 0..height {
        for x in 0..width {
            let p = trace.pass_of[(y / cell) * w + x / cell];
            let c = crate::colormap::viridis(p as f32 / max_pass);
            let o = (y * width + x) * 3;
            pixels[o..o + 3].copy_from_slice(&c);
        }
    }
    RgbImage {
        width,
        height,
        pixels,
    }
}

/// One CSV row per token: row, col, token, pass, window, rejections, prob, and for the exact
/// mode fate, draft_pass, accept_prob (empty otherwise).
pub fn trace_csv(trace: &DecodeTrace) -> String {
    let mut out = String::from(
        "row,col,token,pass,window,rejections,prob,fate,draft_pass,accept_prob,retained_mass,\
         needed_window\n",
    );
    for i in 0..trace.tokens.len() {
        let (fate, draft, accept) = match &trace.exact {
            Some(rec) => (
                rec.fate_of[i].name().to_string(),
                rec.draft_pass_of[i].map_or(String::new(), |p| p.to_string()),
                rec.accept_prob_of[i].map_or(String::new(), |a| format!("{a:.6}")),
            ),
            None => Default::default(),
        };
        let retained = trace
            .retained_mass_of
            .get(i)
            .map_or(String::new(), |m| format!("{m:.6}"));
        let needed = trace
            .needed_window_of
            .get(i)
            .map_or(String::new(), |s| s.to_string());
        out.push_str(&format!(
            "{},{},{},{},{},{},{:.6},{fate},{draft},{accept},{retained},{needed}\n",
            i / trace.grid_w,
            i % trace.grid_w,
            trace.tokens[i],
            trace.pass_of[i],
            trace.window_of[i],
            trace.rejections_of[i],
            trace.prob_of[i]
        ));
    }
    out
}

/// Writes the CSV.
pub fn write_trace_csv(trace: &DecodeTrace, path: &Path) -> anyhow::Result<()> {
    std::fs::write(path, trace_csv(trace))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Files written by [`export_all`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    /// Image PNG.
    pub image: std::path::PathBuf,
    /// Pass-map PNG.
    pub pass_map: std::path::PathBuf,
    /// Trace JSON.
    pub json: std::path::PathBuf,
    /// Trace CSV.
    pub csv: std::path::PathBuf,
}

/// Writes image, pass map, trace JSON and CSV into `dir` as `<stem>.png`,
/// `<stem>_passes.png`, `<stem>.json`, `<stem>.csv`, creating `dir` when needed.
pub fn export_all(
    dir: &Path,
    stem: &str,
    image: &RgbImage,
    trace: &DecodeTrace,
) -> anyhow::Result<Exported> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let out = Exported {
        image: dir.join(format!("{stem}.png")),
        pass_map: dir.join(format!("{stem}_passes.png")),
        json: dir.join(format!("{stem}.json")),
        csv: dir.join(format!("{stem}.csv")),
    };
    write_png(image, &out.image)?;
    write_png(&pass_map_image(trace, 16), &out.pass_map)?;
    write_trace_json(trace, &out.json)?;
    write_trace_csv(trace, &out.csv)?;
    Ok(out)
}

/// A file-name-safe stem from free text.
pub fn file_stem(text: &str) -> String {
    let s: String = text
        .chars()
        .map(|c| {
            if c.is_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_matches('_');
    let s: String = s.chars().take(40).collect();
    if s.is_empty() { "zipar".into() } else { s }
}
