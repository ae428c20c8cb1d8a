//! Reading weights: original LlamaGen `.pt` pickles (through candle's pickle reader),
//! `.safetensors` and sharded `*.safetensors.index.json` checkpoints, plus what every model
//! folder's manifest shares (its kind and name, the recommended decoding settings).
//!
//! A model is a directory holding `config.json` (the manifest) and the weight files it names.
//! Each architecture reads the rest of its manifest itself (`model::llamagen::Manifest`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// Problems with a model directory or weight file, each naming the file.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The directory does not exist or has no manifest.
    #[error("{0} is not a model folder: it has no config.json")]
    NoManifest(PathBuf),
    /// The manifest cannot be read or parsed.
    #[error("invalid model config {path}: {msg}")]
    BadManifest {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A weight file is missing.
    #[error("weight file {0} does not exist")]
    MissingFile(PathBuf),
    /// A weight file cannot be parsed.
    #[error("cannot read weight file {path}: {msg}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The reader's message.
        msg: String,
    },
    /// A weight file parsed but holds no tensors.
    #[error(
        "weight file {0} holds no tensors (expected a LlamaGen state dict, under the key 'model' or at the top level)"
    )]
    Empty(PathBuf),
    /// A tensor holds NaN or infinite values.
    #[error(
        "weight file {path}: tensor {tensor} holds NaN or infinite values (a diverged or corrupted checkpoint)"
    )]
    NonFinite {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
    },
    /// Tensors are missing or have the wrong shape for the config.
    #[error("weight file {path} does not match the model config: {msg}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// Which tensor and how.
        msg: String,
    },
}

/// Which architecture a model directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// LlamaGen, class-conditional.
    LlamagenC2i,
    /// LlamaGen, text-conditional (caption embeddings as input).
    LlamagenT2i,
    /// Lumina-mGPT (Chameleon), a Hugging Face folder: its `config.json` has no `kind`, but
    /// `"model_type": "chameleon"`.
    LuminaMgpt,
    /// Emu3-Gen, a folder as transformers saves `Emu3ForConditionalGeneration`: its
    /// `config.json` has `"model_type": "emu3"`.
    Emu3Gen,
}

/// What every model folder's `config.json` says first: its architecture and name. The
/// registry reads this to pick the loader, which reads the rest.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ModelHeader {
    /// Architecture.
    pub kind: ModelKind,
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
}

/// The path of `dir`'s manifest, or the error for a folder without one.
pub fn manifest_path(dir: &Path) -> Result<PathBuf, WeightsError> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(WeightsError::NoManifest(dir.to_path_buf()));
    }
    Ok(path)
}

/// Reads the [`ModelHeader`] of `dir/config.json`.
pub fn read_header(dir: &Path) -> Result<ModelHeader, WeightsError> {
    let path = manifest_path(dir)?;
    let bad = |msg: String| WeightsError::BadManifest {
        path: path.clone(),
        msg,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if value.get("kind").is_none() {
        let kind = match value.get("model_type").and_then(|t| t.as_str()) {
            Some("chameleon") => Some(ModelKind::LuminaMgpt),
            Some("emu3") => Some(ModelKind::Emu3Gen),
            _ => None,
        };
        if let Some(kind) = kind {
            return Ok(ModelHeader { kind, name: None });
        }
    }
    serde_json::from_value(value).map_err(|e| bad(e.to_string()))
}

/// 1234567 -> "1.2 MB".
pub fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 4] = ["B", "KB", "MB", "GB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < UNITS.len() {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// Recommended decoding settings of a model (`"defaults"` in `config.json`); every field is
/// optional and falls back to the app-wide default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingDefaults {
    /// Classifier-free guidance scale.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cfg: Option<f32>,
    /// Sampling temperature.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Top-k (0 = off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// Top-p (1 = off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// ZipAR window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<usize>,
    /// Hide never-written cache slots from attention (for models trained that way).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask_unwritten: Option<bool>,
}

impl SamplingDefaults {
    /// App-wide defaults, used where a model recommends nothing.
    pub const FALLBACK: ResolvedDefaults = ResolvedDefaults {
        cfg: 2.0,
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        window: 4,
        mask_unwritten: false,
    };

    /// Whether the model recommends nothing.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The model's recommendations with the app-wide defaults filled in.
    pub fn resolve(&self) -> ResolvedDefaults {
        let f = Self::FALLBACK;
        ResolvedDefaults {
            cfg: self.cfg.unwrap_or(f.cfg),
            temperature: self.temperature.unwrap_or(f.temperature),
            top_k: self.top_k.unwrap_or(f.top_k),
            top_p: self.top_p.unwrap_or(f.top_p),
            window: self.window.unwrap_or(f.window),
            mask_unwritten: self.mask_unwritten.unwrap_or(f.mask_unwritten),
        }
    }
}

/// Decoding settings with every value present.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResolvedDefaults {
    /// Classifier-free guidance scale.
    pub cfg: f32,
    /// Sampling temperature.
    pub temperature: f32,
    /// Top-k (0 = off).
    pub top_k: usize,
    /// Top-p (1 = off).
    pub top_p: f32,
    /// ZipAR window.
    pub window: usize,
    /// Hide never-written cache slots from attention.
    pub mask_unwritten: bool,
}

/// Memory the system can still give this process (Linux: MemAvailable), if known.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Reads every tensor of a weight file into memory (on the CPU, as stored).
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>, WeightsError> {
    read_tensors_where(path, None, &mut |_| {})
}

/// Which tensors of a file to read, by name.
pub type Keep<'a> = &'a dyn Fn(&str) -> bool;

/// Told the path of each file (each shard of a sharded checkpoint) before it is read.
pub type OnFile<'a> = &'a mut dyn FnMut(&Path);

/// Reads the tensors of a weight file (all, or those `keep` accepts) into memory, on the CPU,
/// as stored. With `keep`, a `.safetensors` file is read tensor by tensor, so that only the
/// kept bytes are ever in memory (T5's encoder out of a whole encoder-decoder checkpoint).
pub fn read_tensors_where(
    path: &Path,
    keep: Option<Keep>,
    on_file: OnFile,
) -> Result<HashMap<String, Tensor>, WeightsError> {
    if !path.is_file() {
        return Err(WeightsError::MissingFile(path.to_path_buf()));
    }
    if let Some(shards) = shard_files(path)? {
        // A sharded checkpoint: `*.safetensors.index.json` maps each tensor to its shard.
        let mut out = HashMap::new();
        for shard in shards {
            match read_tensors_where(&shard, keep, on_file) {
                Err(WeightsError::Empty(_)) if keep.is_some() => {}
                r => out.extend(r?),
            }
        }
        if out.is_empty() {
            return Err(WeightsError::Empty(path.to_path_buf()));
        }
        return Ok(out);
    }
    on_file(path);
    let corrupt = |e: candle_core::Error| WeightsError::Corrupt {
        path: path.to_path_buf(),
        msg: first_line(&e.to_string()),
    };
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let tensors = if let (Some(keep), "safetensors") = (keep, ext.as_str()) {
        read_safetensors_where(path, keep)?
    } else if ext == "safetensors" {
        candle_core::safetensors::load(path, &Device::Cpu).map_err(corrupt)?
    } else {
        // DDP checkpoints keep the state dict under "model", Lightning ones under
        // "state_dict"; FSDP ones at the top.
        if is_legacy_torch_save(path) {
            return Err(WeightsError::Corrupt {
                path: path.to_path_buf(),
                msg: "this is a legacy (pre-1.6, non-zip) torch.save file, which is not supported: \
                      re-save it with a current PyTorch (torch.save(torch.load(f), f)) or as .safetensors"
                    .into(),
            });
        }
        let odd = non_tensor_entries(path);
        if !odd.is_empty() {
            let shown: Vec<&str> = odd.iter().take(3).map(String::as_str).collect();
            let more = if odd.len() > 3 {
                format!(" and {} more", odd.len() - 3)
            } else {
                String::new()
            };
            return Err(WeightsError::Corrupt {
                path: path.to_path_buf(),
                msg: format!(
                    "the state dict holds entries that are not tensors: {}{more} (expected a LlamaGen state dict of tensors)",
                    shown.join(", ")
                ),
            });
        }
        let under = |key| {
            candle_core::pickle::PthTensors::new(path, Some(key))
                .ok()
                .filter(|p| !p.tensor_infos().is_empty())
        };
        let pth = match under("model").or_else(|| under("state_dict")) {
            Some(p) => p,
            None => candle_core::pickle::PthTensors::new(path, None).map_err(corrupt)?,
        };
        let mut out = HashMap::new();
        let mut names: Vec<&String> = pth.tensor_infos().keys().collect();
        names.sort();
        for name in names {
            if let Some(t) = pth.get(name).map_err(corrupt)? {
                out.insert(name.clone(), t);
            }
        }
        out
    };
    let mut tensors = strip_wrapper_prefixes(tensors);
    if let Some(keep) = keep {
        tensors.retain(|name, _| keep(name));
    }
    if tensors.is_empty() {
        return Err(WeightsError::Empty(path.to_path_buf()));
    }
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        if !all_finite(&tensors[name]).map_err(corrupt)? {
            return Err(WeightsError::NonFinite {
                path: path.to_path_buf(),
                tensor: name.clone(),
            });
        }
    }
    Ok(tensors)
}

/// The number of elements of the tensors `keep` accepts in a `.safetensors` file or shard
/// index, from the headers alone (to estimate memory before loading).
pub fn count_elements_where(path: &Path, keep: Keep) -> Result<u64, WeightsError> {
    if let Some(shards) = shard_files(path)? {
        let mut n = 0;
        for shard in shards {
            n += count_elements_where(&shard, keep)?;
        }
        return Ok(n);
    }
    let (header, ..) = safetensors_header(path)?;
    let mut total = 0u64;
    for (name, info) in &header {
        if name == "__metadata__" || !keep(unwrapped(name)) {
            continue;
        }
        let elems = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|dims| {
                dims.iter()
                    .try_fold(1u64, |acc, d| acc.checked_mul(d.as_u64()?))
            })
            .and_then(|n| total.checked_add(n));
        total = elems.ok_or_else(|| WeightsError::Corrupt {
            path: path.to_path_buf(),
            msg: format!("tensor {name}: its shape is not a list of sizes that fit in 64 bits"),
        })?;
    }
    Ok(total)
}

type Header = serde_json::Map<String, serde_json::Value>;

/// A `.safetensors` file's JSON header, the offset its data starts at, its length, and the
/// open file.
fn safetensors_header(path: &Path) -> Result<(Header, u64, u64, std::fs::File), WeightsError> {
    use std::io::Read;
    let corrupt = |msg: String| WeightsError::Corrupt {
        path: path.to_path_buf(),
        msg,
    };
    if !path.is_file() {
        return Err(WeightsError::MissingFile(path.to_path_buf()));
    }
    let io = |e: std::io::Error| corrupt(e.to_string());
    let mut f = std::fs::File::open(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io)?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 || 8 + n > file_len {
        return Err(corrupt(format!("its header length {n} is out of range")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io)?;
    let header: Header = serde_json::from_slice(&header)
        .map_err(|e| corrupt(format!("its header is not JSON: {e}")))?;
    Ok((header, 8 + n, file_len, f))
}

/// The tensors of a `.safetensors` file that `keep` accepts, each read from its own byte
/// range (the format: an 8-byte little-endian header length, a JSON header naming each
/// tensor's dtype, shape and byte range, then the data).
fn read_safetensors_where(
    path: &Path,
    keep: Keep,
) -> Result<HashMap<String, Tensor>, WeightsError> {
    use std::io::{Read, Seek, SeekFrom};
    let corrupt = |msg: String| WeightsError::Corrupt {
        path: path.to_path_buf(),
        msg,
    };
    let io = |e: std::io::Error| corrupt(e.to_string());
    let (header, start, file_len, mut f) = safetensors_header(path)?;
    let mut out = HashMap::new();
    for (name, info) in &header {
        if name == "__metadata__" || !keep(unwrapped(name)) {
            continue;
        }
        let bad = |what: &str| corrupt(format!("tensor {name}: {what}"));
        let dtype = match info.get("dtype").and_then(|d| d.as_str()) {
            Some("F32") => DType::F32,
            Some("F16") => DType::F16,
            Some("BF16") => DType::BF16,
            Some("F64") => DType::F64,
            Some("U8") => DType::U8,
            Some("U32") => DType::U32,
            Some("I64") => DType::I64,
            other => return Err(bad(&format!("unsupported dtype {other:?}"))),
        };
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| bad("no shape"))?;
        let [a, b]: [u64; 2] = info
            .get("data_offsets")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| bad("no data offsets"))?;
        let bytes = shape
            .iter()
            .try_fold(dtype.size_in_bytes() as u64, |acc, &d| {
                acc.checked_mul(d as u64)
            });
        if a > b || Some(b - a) != bytes || start.checked_add(b).is_none_or(|e| e > file_len) {
            return Err(bad(
                "its byte range does not match its shape or lies outside the file",
            ));
        }
        f.seek(SeekFrom::Start(start + a)).map_err(io)?;
        let mut buf = vec![0u8; (b - a) as usize];
        f.read_exact(&mut buf).map_err(io)?;
        let t = Tensor::from_raw_buffer(&buf, dtype, &shape, &Device::Cpu)
            .map_err(|e| bad(&e.to_string()))?;
        out.insert(name.clone(), t);
    }
    Ok(out)
}

/// Whether a float tensor holds only finite values (one elementwise op and one reduction:
/// `0 * t` is 0 exactly where `t` is finite and NaN elsewhere). Integer tensors are finite.
fn all_finite(t: &Tensor) -> candle_core::Result<bool> {
    if !t.dtype().is_float() {
        return Ok(true);
    }
    let zeros = t.to_dtype(DType::F32)?.affine(0.0, 0.0)?;
    Ok(zeros.sum_all()?.to_scalar::<f32>()? == 0.0)
}

/// Key prefixes that training wrappers add in front of a state dict's names: DDP's `module.`
/// and `torch.compile`'s `_orig_mod.` (in either order, possibly both).
const WRAPPER_PREFIXES: [&str; 2] = ["module.", "_orig_mod."];

/// A name without the [`WRAPPER_PREFIXES`], as filters see it on every format.
fn unwrapped(mut name: &str) -> &str {
    while let Some(rest) = WRAPPER_PREFIXES.iter().find_map(|p| name.strip_prefix(p)) {
        name = rest;
    }
    name
}

/// Removes [`WRAPPER_PREFIXES`] from every key, so wrapped checkpoints load as they are.
fn strip_wrapper_prefixes(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    tensors
        .into_iter()
        .map(|(k, t)| (unwrapped(&k).to_string(), t))
        .collect()
}

/// Names of the entries of a `.pt` state dict (under `model`, else at the top level) whose
/// values are not tensors. candle's reader skips them (printing a line to stderr for each) and
/// the model then reports them missing, although they are there. Best effort: a file that
/// cannot be read this way gives no names, and the ordinary reader reports the problem.
fn non_tensor_entries(path: &Path) -> Vec<String> {
    use candle_core::pickle::{Object, Stack};
    let is_tensor = |o: &Object| {
        matches!(o, Object::Reduce { callable, .. }
            if matches!(&**callable, Object::Class { class_name, .. } if class_name.starts_with("_rebuild_")))
    };
    let Ok(file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let Ok(mut zip) = zip::ZipArchive::new(std::io::BufReader::new(file)) else {
        return Vec::new();
    };
    let pickles: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .filter(|n| n.ends_with("data.pkl"))
        .collect();
    let mut out = Vec::new();
    for name in pickles {
        let Ok(entry) = zip.by_name(&name) else {
            continue;
        };
        let mut stack = Stack::empty();
        if stack
            .read_loop(&mut std::io::BufReader::new(entry))
            .is_err()
        {
            continue;
        }
        let Ok(Object::Dict(mut entries)) = stack.finalize() else {
            continue;
        };
        // The state dict: under "model" (DDP checkpoints), under "state_dict" (PyTorch
        // Lightning's, e.g. Chameleon's vqgan.ckpt, whose other entries are training state),
        // else at the top.
        for key in ["model", "state_dict"] {
            let key = Object::Unicode(key.into());
            if let Some(i) = entries.iter().position(|(k, _)| *k == key)
                && let (_, Object::Dict(inner)) = entries.swap_remove(i)
            {
                entries = inner;
                break;
            }
        }
        out.extend(entries.into_iter().filter_map(|(k, v)| match k {
            Object::Unicode(k) if !is_tensor(&v) => Some(k),
            _ => None,
        }));
    }
    out
}

/// Whether `path` is a legacy `torch.save` file: a pickle stream (protocol 2+ opens with
/// 0x80) instead of the zip archive PyTorch writes since 1.6.
fn is_legacy_torch_save(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 2];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|()| head[0] == 0x80 && (2..=5).contains(&head[1]))
}

/// A `VarBuilder` over a weight file; building a module from it fails with
/// [`WeightsError::Mismatch`] through [`mismatch`] when a key or shape is wrong.
pub fn var_builder(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, WeightsError> {
    var_builder_where(path, None, dtype, device, &mut |_| {})
}

/// [`var_builder`] over the tensors `keep` accepts (all with `None`), telling `on_file` of
/// each file it reads. The tensors are placed as [`read_tensors_placed`] does.
pub fn var_builder_where(
    path: &Path,
    keep: Option<Keep>,
    dtype: DType,
    device: &Device,
    on_file: OnFile,
) -> Result<VarBuilder<'static>, WeightsError> {
    let tensors = read_tensors_placed(path, keep, &|_| dtype, device, on_file)?;
    Ok(VarBuilder::from_tensors(tensors, dtype, device))
}

/// [`read_tensors_where`], each file's tensors converted to `dtype_of(name)` and moved to
/// `device` before the next file (shard) is read: the host holds the stored bytes of one shard
/// at a time, not of the whole checkpoint next to its copy on the device (a 7B model in bf16
/// would otherwise need 14 GB of host memory on top of the device's 14 GB, all of it the same
/// memory on a Mac). Not memory-mapped: candle's mapping needs `unsafe`, which this crate
/// denies.
pub fn read_tensors_placed(
    path: &Path,
    keep: Option<Keep>,
    dtype_of: &dyn Fn(&str) -> DType,
    device: &Device,
    on_file: OnFile,
) -> Result<HashMap<String, Tensor>, WeightsError> {
    if !path.is_file() {
        return Err(WeightsError::MissingFile(path.to_path_buf()));
    }
    let shards = shard_files(path)?;
    let sharded = shards.is_some();
    let mut out = HashMap::new();
    for file in shards.unwrap_or_else(|| vec![path.to_path_buf()]) {
        let tensors = match read_tensors_where(&file, keep, on_file) {
            Err(WeightsError::Empty(_)) if sharded && keep.is_some() => continue,
            r => r?,
        };
        for (name, t) in tensors {
            let placed = t
                .to_dtype(dtype_of(&name))
                .and_then(|t| t.to_device(device))
                .map_err(|e| WeightsError::Corrupt {
                    path: file.clone(),
                    msg: format!("{name}: cannot place it on the device: {e}"),
                })?;
            out.insert(name, placed);
        }
    }
    if out.is_empty() {
        return Err(WeightsError::Empty(path.to_path_buf()));
    }
    Ok(out)
}

/// The shard files of a sharded safetensors checkpoint (`*.index.json`, whose `weight_map`
/// maps tensor names to files next to it), in order; `None` for any other file.
pub fn shard_files(path: &Path) -> Result<Option<Vec<PathBuf>>, WeightsError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if !name.to_ascii_lowercase().ends_with(".index.json") {
        return Ok(None);
    }
    let corrupt = |msg: String| WeightsError::Corrupt {
        path: path.to_path_buf(),
        msg,
    };
    let text = std::fs::read_to_string(path).map_err(|e| corrupt(e.to_string()))?;
    let index: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| corrupt(format!("not a JSON index: {e}")))?;
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| corrupt("the index has no \"weight_map\" object".into()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| corrupt(format!("the shard of {tensor} is not a file name")))?;
        if file.to_ascii_lowercase().ends_with(".index.json") {
            return Err(corrupt(format!(
                "the shard of {tensor} is another index ({file}): shards must be weight files"
            )));
        }
        let f = dir.join(file);
        if !files.contains(&f) {
            files.push(f);
        }
    }
    if files.is_empty() {
        return Err(WeightsError::Empty(path.to_path_buf()));
    }
    files.sort();
    Ok(Some(files))
}

/// Bytes of a weights file, or of all its shards for a sharded index.
pub fn weight_bytes(path: &Path) -> u64 {
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    match shard_files(path) {
        Ok(Some(shards)) => shards.iter().map(|p| size(p)).sum(),
        _ => size(path),
    }
}

/// Wraps a module-building error as a mismatch of `path`.
pub fn mismatch(path: &Path, e: candle_core::Error) -> WeightsError {
    WeightsError::Mismatch {
        path: path.to_path_buf(),
        msg: first_line(&e.to_string()),
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

/// The device named on the command line or in the app: `cpu`, `cuda`, `cuda:N`, `metal`.
pub fn parse_device(name: &str) -> anyhow::Result<Device> {
    let name = name.trim().to_ascii_lowercase();
    let unavailable = |what: &str, e: candle_core::Error| {
        anyhow::anyhow!(
            "device {what} is not available: {} (this build supports: {})",
            first_line(&e.to_string()),
            compiled_devices().join(", ")
        )
    };
    match name.as_str() {
        "cpu" => Ok(Device::Cpu),
        "metal" => Device::new_metal(0).map_err(|e| unavailable("metal", e)),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let idx = s
                .strip_prefix("cuda:")
                .map(|i| i.parse::<usize>())
                .transpose()
                .map_err(|_| anyhow::anyhow!("bad CUDA device index in {s:?}"))?
                .unwrap_or(0);
            Device::new_cuda(idx).map_err(|e| unavailable(s, e))
        }
        other => anyhow::bail!("unknown device {other:?}: use cpu, cuda, cuda:N or metal"),
    }
}

/// Backends compiled into this build.
pub fn compiled_devices() -> Vec<&'static str> {
    let mut v = vec!["cpu"];
    if cfg!(feature = "cuda") {
        v.push("cuda");
    }
    if cfg!(feature = "metal") {
        v.push("metal");
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `.safetensors` file with this JSON header and `data` bytes after it.
    fn safetensors_file(dir: &Path, header: &str, data: usize) -> PathBuf {
        let p = dir.join("w.safetensors");
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.extend(vec![0u8; data]);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn damaged_safetensors_headers_are_refused_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let keep_all: Keep = &|_| true;
        // Byte offsets near u64::MAX: no overflow, no seek into the header.
        let p = safetensors_file(
            dir.path(),
            r#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[18446744073709551611,18446744073709551615]}}"#,
            4,
        );
        let e = read_tensors_where(&p, Some(keep_all), &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("byte range"), "{e}");
        // A shape whose element count does not fit in 64 bits, and a negative size.
        for shape in ["[4294967296,4294967296,4]", "[-1,2]"] {
            let h = format!(r#"{{"x":{{"dtype":"F32","shape":{shape},"data_offsets":[0,4]}}}}"#);
            let p = safetensors_file(dir.path(), &h, 4);
            let e = count_elements_where(&p, keep_all).unwrap_err().to_string();
            assert!(e.contains("shape"), "{shape}: {e}");
        }
        // A good file counts and reads, and names behind a DDP prefix are filtered unwrapped.
        let p = safetensors_file(
            dir.path(),
            r#"{"module.enc.w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"dec.w":{"dtype":"F32","shape":[3],"data_offsets":[16,28]}}"#,
            28,
        );
        let enc: Keep = &|n| n.starts_with("enc.");
        assert_eq!(count_elements_where(&p, enc).unwrap(), 4);
        let t = read_tensors_where(&p, Some(enc), &mut |_| {}).unwrap();
        assert_eq!(t.keys().collect::<Vec<_>>(), ["enc.w"]);
        // An index whose shard is an index (itself) is refused instead of followed forever.
        let idx = dir.path().join("model.safetensors.index.json");
        std::fs::write(
            &idx,
            r#"{"weight_map":{"x":"model.safetensors.index.json"}}"#,
        )
        .unwrap();
        let e = read_tensors(&idx).unwrap_err().to_string();
        assert!(e.contains("another index"), "{e}");
        assert!(count_elements_where(&idx, keep_all).is_err());
    }

    #[test]
    fn ddp_and_compiled_checkpoints_load_under_their_plain_names() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("w.safetensors");
        let t = Tensor::ones((2, 3), DType::F32, &Device::Cpu)?;
        let tensors: HashMap<String, Tensor> = [
            ("_orig_mod.norm.weight", t.clone()),
            ("module._orig_mod.output.weight", t.clone()),
            ("module.tok_embeddings.weight", t),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        candle_core::safetensors::save(&tensors, &path)?;
        let mut names: Vec<String> = read_tensors(&path)?.into_keys().collect();
        names.sort();
        assert_eq!(
            names,
            ["norm.weight", "output.weight", "tok_embeddings.weight"]
        );
        Ok(())
    }

    #[test]
    fn a_non_tensor_in_a_state_dict_is_named() {
        // tests/fixtures/non_tensor.pt: {"model": {"norm.weight": tensor, "layers.0.attention.wo.weight": 3}}
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/non_tensor.pt");
        let err = read_tensors(&path).map(|_| ()).expect_err("refused");
        let msg = err.to_string();
        assert!(
            msg.contains("not tensors: layers.0.attention.wo.weight"),
            "{msg}"
        );
        assert!(
            non_tensor_entries(
                &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures/tiny/gpt.pt")
            )
            .is_empty()
        );
    }

    #[test]
    fn a_pre_zip_torch_save_is_named_as_such() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("old.pt");
        std::fs::write(&path, [0x80u8, 0x02, 0x8a, 0x0a]).expect("write");
        let err = read_tensors(&path).map(|_| ()).expect_err("refused");
        assert!(err.to_string().contains("legacy (pre-1.6"), "{err}");
    }
}
