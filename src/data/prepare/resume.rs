//! What an earlier `prepare` left in the output directory: nothing, an interrupted run to finish
//! (its progress record), or a finished one (its manifest).

use crate::data::shards::HEADER_BYTES;
use anyhow::{bail, Context, Result};
use std::path::Path;

use super::records::*;

/// Where a previous run in the output directory left off.
pub(super) enum Previous {
    Nothing,
    Finished(Manifest),
    Interrupted(Progress),
}

pub(super) fn previous_run(dir: &Path, identity: &Identity) -> Result<Previous> {
    let differs = |theirs: &Identity, what: &str| -> Result<()> {
        if theirs == identity {
            return Ok(());
        }
        let mut differences = Vec::new();
        if theirs.tokenizer != identity.tokenizer {
            differences.push("tokenizer");
        }
        if theirs.inputs != identity.inputs {
            differences.push("inputs (paths, sizes or modification times)");
        }
        if theirs.name != identity.name {
            differences.push("name");
        }
        if (theirs.shard_tokens, theirs.val_tokens) != (identity.shard_tokens, identity.val_tokens)
        {
            differences.push("shard or validation sizes");
        }
        if theirs.text_field != identity.text_field {
            differences.push("text field");
        }
        bail!(
            "{} already holds shards from another prepare ({what} differs in: {}); \
             choose another --out or delete them yourself",
            dir.display(),
            differences.join(", ")
        )
    };
    if dir.join(MANIFEST).exists() {
        let manifest = Manifest::read(dir)?;
        differs(&manifest.identity, "its manifest.json")?;
        return Ok(Previous::Finished(manifest));
    }
    if let Ok(text) = std::fs::read_to_string(dir.join(PROGRESS)) {
        let progress: Progress = serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged", dir.join(PROGRESS).display()))?;
        differs(&progress.identity, "its interrupted run")?;
        for shard in &progress.shards {
            let path = dir.join(&shard.file);
            let expected =
                (HEADER_BYTES + shard.tokens as usize * identity.token_width.bytes()) as u64;
            let size = std::fs::metadata(&path).map(|m| m.len()).ok();
            if size != Some(expected) {
                bail!(
                    "finished shard {} of the interrupted run is missing or changed ({} bytes, expected {expected})",
                    path.display(),
                    size.map_or("no".into(), |s| s.to_string())
                );
            }
        }
        return Ok(Previous::Interrupted(progress));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.ends_with(".bin") {
                bail!(
                    "{} already holds {name}, which no prepare manifest describes; choose another --out",
                    dir.display()
                );
            }
        }
    }
    Ok(Previous::Nothing)
}
