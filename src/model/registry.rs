//! The model registry: a model folder's `config.json` names its `kind`, and the kind picks the
//! loader. Callers (the worker, the CLI, bench, eval) get a `Box<dyn ImageArModel>` and a
//! [`ModelCard`]: what they need to know about the model without naming its type.

use std::path::{Path, PathBuf};

use candle_core::Device;

use super::ImageArModel;
use super::llamagen::{self, LlamaGen, Manifest};
use crate::weights::{ModelKind, SamplingDefaults, WeightsError, read_header};

/// What a model's images are conditioned on, as a caller gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conditioning {
    /// A class id ([`super::Condition::Class`]); a prompt is matched to a class name.
    Class,
    /// A free-text caption ([`super::Condition::Text`]), encoded by the model's text encoder.
    Caption,
}

/// What callers know about a loaded model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelCard {
    /// Display name (the manifest's, else the folder's).
    pub name: String,
    /// The model folder.
    pub dir: PathBuf,
    /// Architecture.
    pub kind: ModelKind,
    /// Token grid (rows, columns).
    pub grid: (usize, usize),
    /// What the model is conditioned on.
    pub conditioning: Conditioning,
    /// Classes of a class-conditional model (0 for a caption-conditioned one).
    pub num_classes: usize,
    /// Class names for prompt matching (`classes.json`), when the model has them.
    pub classes: Option<PathBuf>,
    /// The image classifier `eval` scores with, when the model ships one.
    pub classifier: Option<PathBuf>,
    /// Decoding settings the model's authors recommend.
    pub defaults: SamplingDefaults,
}

/// A model and its card.
pub struct LoadedModel {
    /// The model, behind the decoder's trait.
    pub model: Box<dyn ImageArModel>,
    /// What it is.
    pub card: ModelCard,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("card", &self.card)
            .finish_non_exhaustive()
    }
}

/// What loading `dir` will read and roughly take in memory.
pub fn summary(dir: &Path, device: &Device) -> Result<llamagen::LoadSummary, WeightsError> {
    match read_header(dir)?.kind {
        ModelKind::LlamagenC2i | ModelKind::LlamagenT2i => llamagen::load_summary(dir, device),
        ModelKind::LuminaMgpt => super::chameleon::load_summary(dir, device),
        ModelKind::Emu3Gen => super::emu3::load_summary(dir, device),
    }
}

/// Where a load stands.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadProgress {
    /// The file being read (its name, with its shard's name for a sharded checkpoint).
    pub file: String,
    /// Index of that file among the load's files.
    pub index: usize,
    /// Number of files the load reads.
    pub files: usize,
    /// Bytes of the files before it.
    pub done: u64,
    /// Bytes of all the load's files.
    pub total: u64,
}

/// Loads the model folder `dir` onto `device` with the loader of its kind.
pub fn open(dir: &Path, device: &Device) -> Result<LoadedModel, WeightsError> {
    open_with_progress(dir, device, &mut |_| {})
}

/// [`open`], telling `progress` before each weight file (or shard) is read.
pub fn open_with_progress(
    dir: &Path,
    device: &Device,
    progress: &mut dyn FnMut(&LoadProgress),
) -> Result<LoadedModel, WeightsError> {
    let kind = read_header(dir)?.kind;
    let files = match kind {
        ModelKind::LlamagenC2i | ModelKind::LlamagenT2i => llamagen::weight_files(dir)?,
        ModelKind::LuminaMgpt => super::chameleon::LuminaFiles::find(dir)?.all()?,
        ModelKind::Emu3Gen => super::emu3::Emu3Files::find(dir)?.all()?,
    };
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let total: u64 = files.iter().map(|p| size(p)).sum();
    let (mut index, mut done) = (0, 0u64);
    let mut on_file = |p: &Path| {
        let file = p
            .strip_prefix(dir)
            .unwrap_or(p)
            .to_string_lossy()
            .into_owned();
        progress(&LoadProgress {
            file,
            index,
            files: files.len(),
            done,
            total,
        });
        index += 1;
        done += size(p);
    };
    match kind {
        ModelKind::LuminaMgpt | ModelKind::Emu3Gen => {
            let (model, defaults) = if kind == ModelKind::Emu3Gen {
                let m = super::emu3::load_emu3(dir, device, &mut on_file)?;
                (m, super::emu3::EMU3_DEFAULTS)
            } else {
                let m = super::chameleon::load_lumina(dir, device, &mut on_file)?;
                (m, super::chameleon::LUMINA_DEFAULTS)
            };
            let card = ModelCard {
                name: folder_name(dir),
                dir: dir.to_path_buf(),
                kind,
                grid: model.grid(),
                conditioning: Conditioning::Caption,
                num_classes: 0,
                classes: None,
                classifier: None,
                defaults,
            };
            Ok(LoadedModel {
                model: Box::new(model),
                card,
            })
        }
        ModelKind::LlamagenC2i | ModelKind::LlamagenT2i => {
            let model = LlamaGen::load_with(dir, device, &mut on_file)?;
            let card = card(dir, &model.manifest);
            Ok(LoadedModel {
                model: Box::new(model),
                card,
            })
        }
    }
}

fn folder_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

fn card(dir: &Path, m: &Manifest) -> ModelCard {
    ModelCard {
        name: m.name.clone().unwrap_or_else(|| folder_name(dir)),
        dir: dir.to_path_buf(),
        kind: m.kind,
        grid: (m.grid_h, m.grid_w),
        conditioning: match m.kind {
            ModelKind::LlamagenC2i => Conditioning::Class,
            ModelKind::LlamagenT2i | ModelKind::LuminaMgpt | ModelKind::Emu3Gen => {
                Conditioning::Caption
            }
        },
        num_classes: m.gpt.num_classes,
        classes: m.classes.as_ref().map(|f| dir.join(f)),
        classifier: m.classifier.as_ref().map(|f| dir.join(f)),
        defaults: m.defaults,
    }
}
