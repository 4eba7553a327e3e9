//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The shared data directory: `$DATA_MIRROR`, else `../shared/data` beside the project.
pub fn data_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    match std::env::var_os("DATA_MIRROR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() { d } else { root.join(d) }
        }
        None => root.join("../shared/data"),
    }
}

/// Tiny Shakespeare from the data directory.
pub fn tinyshakespeare() -> PathBuf {
    let p = data_dir().join("tinyshakespeare.txt");
    assert!(p.is_file(), "{} missing: set DATA_MIRROR or run scripts/get_data.sh", p.display());
    p
}

/// GPT-2's tokenizer.json from the data directory.
pub fn gpt2_tokenizer() -> PathBuf {
    let p = data_dir().join("gpt2/tokenizer.json");
    assert!(p.is_file(), "{} missing: set DATA_MIRROR or run scripts/get_data.sh", p.display());
    p
}
