//! What `prepare` reads and writes: its options, the identity of a run, the shard records, the
//! counts, and the manifest.

use crate::data::shards::{DataFormat, TokenFile, TokenWidth};
use crate::fsutil::sha256_file;
use anyhow::bail;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Text per batch of documents handed to the tokenizer threads.
pub const BATCH_BYTES: usize = 32 << 20;
/// llm.c's shard size.
pub const DEFAULT_SHARD_TOKENS: u64 = 100_000_000;
/// Skipped records listed one by one in the manifest (all are counted).
pub(super) const LISTED_SKIPS: usize = 1000;
pub(super) const MANIFEST: &str = "manifest.json";
pub(super) const PROGRESS: &str = ".prepare-progress.json";

/// What `prepare` is asked to do.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Files, directories or globs.
    pub inputs: Vec<String>,
    pub out: PathBuf,
    /// Shard name prefix (default: the output directory's name).
    pub name: Option<String>,
    /// `gpt2`, or a `tokenizer.json` path.
    pub tokenizer: String,
    /// Where GPT-2's `tokenizer.json` is, for `gpt2`.
    pub tokenizer_path: Option<PathBuf>,
    /// The JSON key / parquet column holding the text.
    pub text_field: String,
    pub shard_tokens: u64,
    /// Tokens of the validation split (default: one shard, as llm.c).
    pub val_tokens: Option<u64>,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Skip malformed records (invalid UTF-8, not a JSON object, no text field) instead of
    /// stopping at the first; each is counted and listed in the manifest. Empty documents are
    /// always skipped.
    pub skip_bad_records: bool,
}

/// One input file, as it was when prepared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFile {
    pub path: PathBuf,
    pub bytes: u64,
    /// Modification time, seconds since the Unix epoch: with the size, how a rerun tells that an
    /// input changed without re-reading it.
    pub modified: u64,
}

/// The tokenizer, identified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerRecord {
    /// `gpt2`, or the `tokenizer.json` path given.
    pub name: String,
    /// SHA-256 of its serialized form ([`crate::data::tokenizer::Tokenizer::fingerprint`]).
    pub sha256: String,
    pub vocab_size: usize,
    pub end_of_text: u32,
}

/// Everything that decides the shards' bytes: a rerun with another identity is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub name: String,
    pub tokenizer: TokenizerRecord,
    pub token_width: TokenWidth,
    pub text_field: String,
    pub shard_tokens: u64,
    pub val_tokens: u64,
    pub inputs: Vec<InputFile>,
}

/// Which split a shard belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardSplit {
    Val,
    Train,
}

/// A position in the token stream: token `token` of document `document` (its end-of-text
/// token is token 0), counting documents over all inputs, skipped records not included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cursor {
    pub document: u64,
    pub token: u64,
}

/// A finished shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub file: String,
    pub split: ShardSplit,
    pub tokens: u64,
    pub sha256: String,
    /// Where the next shard starts.
    pub next: Cursor,
}

/// A record that is not in the stream, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skip {
    /// `file:line` or `file:row N`.
    pub location: String,
    pub reason: String,
}

/// Running totals, saved with the progress so a resumed run reports the whole corpus.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub documents: u64,
    /// Stream tokens written: to finished shards and the open one (what the shards hold).
    pub tokens: u64,
    pub max_token_id: u32,
    pub documents_with_literal_end_of_text: u64,
    pub skipped: u64,
    pub skipped_by_reason: BTreeMap<String, u64>,
    /// The first `LISTED_SKIPS` (1,000) skips.
    pub skips: Vec<Skip>,
}

impl Counts {
    /// The skipped records for a summary line: how many, and the first `shown` with their
    /// reasons (`"none"` when there were none).
    pub fn skipped_summary(&self, shown: usize) -> String {
        if self.skipped == 0 {
            return "none".into();
        }
        let listed: Vec<String> = self
            .skips
            .iter()
            .take(shown)
            .map(|s| format!("{}: {}", s.location, s.reason))
            .collect();
        let more = if self.skipped as usize > listed.len() {
            format!(
                "; {} more in manifest.json",
                self.skipped as usize - listed.len()
            )
        } else {
            String::new()
        };
        format!("{} ({}{more})", self.skipped, listed.join("; "))
    }

    pub(super) fn count_skip(&mut self, skip: Skip) {
        self.skipped += 1;
        *self
            .skipped_by_reason
            .entry(skip_kind(&skip.reason))
            .or_default() += 1;
        if self.skips.len() < LISTED_SKIPS {
            self.skips.push(skip);
        }
    }
}

/// `manifest.json`: what the shards hold and where they came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// `llm.c`: the shards' layout.
    pub format: String,
    #[serde(flatten)]
    pub identity: Identity,
    pub shards: Vec<ShardRecord>,
    pub val_tokens_written: u64,
    pub train_tokens_written: u64,
    #[serde(flatten)]
    pub counts: Counts,
}

impl Manifest {
    /// One line for the end of `prepare`: where, what and how long, and the skipped records.
    pub fn summary(&self, out: &Path, elapsed: std::time::Duration) -> String {
        format!(
            "{}: {} documents, {} tokens ({} validation, {} training) in {} shards; {:.1} s; skipped records: {}",
            out.display(),
            self.counts.documents,
            self.counts.tokens,
            self.val_tokens_written,
            self.train_tokens_written,
            self.shards.len(),
            elapsed.as_secs_f64(),
            self.counts.skipped_summary(5)
        )
    }

    /// Reads `DIR/manifest.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a prepare manifest", path.display()))
    }

    /// Opens a token file from a directory `prepare` wrote: the manifest must list it, and it must
    /// be the llm.c shard the manifest describes (token count and SHA-256).
    pub fn open_shard(&self, path: &Path, vocab_size: usize) -> Result<TokenFile> {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let Some(record) = self.shards.iter().find(|r| r.file == name) else {
            bail!(
                "token file {} lies beside a prepare manifest.json that does not list it",
                path.display()
            );
        };
        let file = TokenFile::open(path, DataFormat::Llmc, vocab_size)?;
        if file.len() as u64 != record.tokens {
            bail!(
                "token file {} holds {} tokens, but its manifest.json lists {}",
                path.display(),
                file.len(),
                record.tokens
            );
        }
        let sha256 = sha256_file(path)?;
        if sha256 != record.sha256 {
            bail!(
                "token file {} has SHA-256 {}, but its manifest.json lists {}: the file changed or is damaged",
                path.display(),
                &sha256[..16],
                &record.sha256[..16]
            );
        }
        Ok(file)
    }
}

/// A skip reason without its positions (`invalid UTF-8 at byte 12` → `invalid UTF-8`), for
/// counting by kind.
pub(super) fn skip_kind(reason: &str) -> String {
    let cut = [" at byte", " ("]
        .iter()
        .filter_map(|m| reason.find(m))
        .min();
    reason[..cut.unwrap_or(reason.len())].to_string()
}

/// `.prepare-progress.json`: the identity and the shards finished so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Progress {
    pub(super) identity: Identity,
    pub(super) shards: Vec<ShardRecord>,
    pub(super) counts: Counts,
}
