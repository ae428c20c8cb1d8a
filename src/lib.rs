//! ZipAR Studio: autoregressive image generation accelerated by ZipAR parallel decoding.
//!
//! The crate is a library so that tests can drive every layer; `main.rs` only parses the
//! command line. Layers: [`decode`] (the algorithm), [`model`] (the networks), [`weights`]
//! (files), [`cli`] (headless commands), [`export`] (files out).

pub mod acceptance;
pub mod app;
pub mod bench;
pub mod cli;
pub mod colormap;
pub mod decode;
pub mod eval;
pub mod export;
pub mod locality;
pub mod model;
pub mod prompt;
pub mod weights;
pub mod worker;

use std::path::PathBuf;

/// Where the built-in default model is: next to the installed binary when the app was
/// installed from a package, else in the source tree it was built from.
pub fn default_model_dir() -> PathBuf {
    let exe = std::env::current_exe().ok();
    find_builtin_model(exe.as_deref().and_then(std::path::Path::parent))
}

/// The first of [`builtin_model_candidates`] holding a `config.json`, else the source tree.
pub fn find_builtin_model(exe_dir: Option<&std::path::Path>) -> PathBuf {
    builtin_model_candidates(exe_dir)
        .into_iter()
        .find(|d| d.join("config.json").is_file())
        .unwrap_or_else(source_tree_model_dir)
}

/// The built-in model in the source tree (`cargo run`).
fn source_tree_model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/models/emoji")
}

/// Places the built-in model is looked for, in order, given the folder of the running
/// binary: where cargo-packager puts resources in a .deb or AppImage (`../lib/zipar-studio`)
/// and in a macOS bundle (`../Resources`), a portable folder (`models/` next to the
/// binary), then the source tree.
pub fn builtin_model_candidates(exe_dir: Option<&std::path::Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(d) = exe_dir {
        out.push(d.join("../lib/zipar-studio/models/emoji"));
        out.push(d.join("../Resources/models/emoji"));
        out.push(d.join("models/emoji"));
    }
    out.push(source_tree_model_dir());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installed_layouts_are_found_before_the_source_tree() {
        let root = tempfile::tempdir().expect("tempdir");
        let bin = root.path().join("usr/bin");
        std::fs::create_dir_all(&bin).expect("mkdir");
        // Nothing installed: the source tree.
        assert_eq!(find_builtin_model(Some(&bin)), source_tree_model_dir());
        // .deb / AppImage layout.
        let deb = bin.join("../lib/zipar-studio/models/emoji");
        std::fs::create_dir_all(&deb).expect("mkdir");
        std::fs::write(deb.join("config.json"), "{}").expect("write");
        assert_eq!(find_builtin_model(Some(&bin)), deb);
        // macOS bundle layout.
        let app = root.path().join("ZipAR Studio.app/Contents/MacOS");
        let res = app.join("../Resources/models/emoji");
        std::fs::create_dir_all(&res).expect("mkdir");
        std::fs::write(res.join("config.json"), "{}").expect("write");
        assert_eq!(find_builtin_model(Some(&app)), res);
        assert_eq!(find_builtin_model(None), source_tree_model_dir());
    }
}
