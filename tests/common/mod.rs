//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The data directory: `$DATA_MIRROR`, else the project's `data/` (filled by
/// `scripts/get_data.sh`), else `../shared/data` beside the project.
pub fn data_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if let Some(d) = std::env::var_os("DATA_MIRROR") {
        let d = PathBuf::from(d);
        return if d.is_absolute() { d } else { root.join(d) };
    }
    let local = root.join("data");
    if local.join("tinyshakespeare.txt").is_file() && local.join("gpt2/tokenizer.json").is_file() {
        return local;
    }
    root.join("../shared/data")
}

/// Tiny Shakespeare from the data directory.
pub fn tinyshakespeare() -> PathBuf {
    let p = data_dir().join("tinyshakespeare.txt");
    assert!(
        p.is_file(),
        "{} missing: set DATA_MIRROR or run scripts/get_data.sh",
        p.display()
    );
    p
}

/// GPT-2's tokenizer.json from the data directory.
pub fn gpt2_tokenizer() -> PathBuf {
    let p = data_dir().join("gpt2/tokenizer.json");
    assert!(
        p.is_file(),
        "{} missing: set DATA_MIRROR or run scripts/get_data.sh",
        p.display()
    );
    p
}
