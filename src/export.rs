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
