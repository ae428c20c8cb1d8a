//! ZipAR Studio: autoregressive image generation accelerated by ZipAR parallel decoding.
//!
//! The crate is a library so that tests can drive every layer; `main.rs` only parses the
//! command line. Layers: [`decode`] (the algorithm), [`model`] (the networks), [`weights`]
//! (files), [`cli`] (headless commands), [`export`] (files out).

pub mod app;
pub mod bench;
pub mod cli;
pub mod colormap;
pub mod decode;
pub mod eval;
pub mod export;
pub mod model;
pub mod prompt;
pub mod weights;
pub mod worker;

use std::path::PathBuf;

/// Where the built-in default model lives in the source tree.
pub fn default_model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/models/emoji")
}
