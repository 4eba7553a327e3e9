//! `prepare`'s shard writer: llm.c shards written under a temporary name, fsynced and renamed,
//! with the progress record after each.

use crate::data::shards::{llmc_header, HEADER_BYTES};
use crate::fsutil::{sha256_file, sync_dir, write_atomic};
use anyhow::{anyhow, Context, Result};
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;

use super::records::*;

/// The shard being written.
pub(super) struct OpenShard {
    pub(super) tmp: PathBuf,
    pub(super) file: std::io::BufWriter<File>,
    pub(super) name: String,
    pub(super) split: ShardSplit,
    pub(super) capacity: u64,
    pub(super) tokens: u64,
}

/// Appends the token stream to shards, cutting them at the split and size boundaries.
pub(super) struct ShardWriter {
    pub(super) dir: PathBuf,
    pub(super) identity: Identity,
    pub(super) shards: Vec<ShardRecord>,
    pub(super) open: Option<OpenShard>,
    pub(super) counts: Counts,
    pub(super) buffer: Vec<u8>,
}

impl ShardWriter {
    pub(super) fn val_written(&self) -> u64 {
        self.counts.tokens.min(self.identity.val_tokens)
    }

    pub(super) fn open_next(&mut self) -> Result<()> {
        let val = self.identity.val_tokens;
        let (split, capacity) = if self.counts.tokens < val {
            (
                ShardSplit::Val,
                (val - self.counts.tokens).min(self.identity.shard_tokens),
            )
        } else {
            (ShardSplit::Train, self.identity.shard_tokens)
        };
        // llm.c numbers the validation shard 0 and training from 1; with no validation split,
        // training still starts at 1.
        let index = self.shards.len() + usize::from(val == 0);
        let split_name = match split {
            ShardSplit::Val => "val",
            ShardSplit::Train => "train",
        };
        let name = format!("{}_{split_name}_{index:06}.bin", self.identity.name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let mut file =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        // The header's count is written when the shard is complete.
        file.write_all(&[0u8; HEADER_BYTES])?;
        self.open = Some(OpenShard {
            tmp,
            file: std::io::BufWriter::with_capacity(8 << 20, file),
            name,
            split,
            capacity,
            tokens: 0,
        });
        Ok(())
    }

    /// Appends `ids` (tokens `first_token..` of document `document`) to the stream.
    pub(super) fn append(&mut self, document: u64, first_token: u64, ids: &[u32]) -> Result<()> {
        let mut at = 0usize;
        while at < ids.len() {
            if self.open.is_none() {
                self.open_next()?;
            }
            let shard = self.open.as_mut().expect("opened above");
            let room = (shard.capacity - shard.tokens) as usize;
            let take = room.min(ids.len() - at);
            self.buffer.clear();
            for &id in &ids[at..at + take] {
                self.identity.token_width.append(id, &mut self.buffer);
            }
            shard
                .file
                .write_all(&self.buffer)
                .with_context(|| format!("cannot write {}", shard.tmp.display()))?;
            shard.tokens += take as u64;
            self.counts.tokens += take as u64;
            at += take;
            if shard.tokens == shard.capacity {
                let next = Cursor {
                    document,
                    token: first_token + at as u64,
                };
                self.finish_shard(next)?;
            }
            if abort_for_test_between(self.counts.tokens - take as u64, self.counts.tokens) {
                std::process::abort();
            }
        }
        Ok(())
    }

    /// Completes the open shard: header, fsync, hash, rename, then the progress record.
    pub(super) fn finish_shard(&mut self, next: Cursor) -> Result<()> {
        let Some(shard) = self.open.take() else {
            return Ok(());
        };
        let mut file = shard
            .file
            .into_inner()
            .map_err(|e| anyhow!("cannot write {}: {}", shard.tmp.display(), e.error()))?;
        file.seek(SeekFrom::Start(0))?;
        file.write_all(&llmc_header(self.identity.token_width, shard.tokens)?)?;
        file.sync_all()
            .with_context(|| format!("cannot write {}", shard.tmp.display()))?;
        drop(file);
        let sha256 = sha256_file(&shard.tmp)?;
        let path = self.dir.join(&shard.name);
        std::fs::rename(&shard.tmp, &path).with_context(|| {
            format!(
                "cannot rename {} to {}",
                shard.tmp.display(),
                path.display()
            )
        })?;
        sync_dir(&self.dir)?;
        self.shards.push(ShardRecord {
            file: shard.name,
            split: shard.split,
            tokens: shard.tokens,
            sha256,
            next,
        });
        let progress = Progress {
            identity: self.identity.clone(),
            shards: self.shards.clone(),
            counts: self.counts.clone(),
        };
        write_atomic(
            &self.dir.join(PROGRESS),
            serde_json::to_string_pretty(&progress)?.as_bytes(),
        )
    }
}

/// Fault injection for the test suite: with `GPT_PRETRAIN_PREPARE_ABORT_AT_TOKEN=N`, whether
/// the stream just went past N tokens (going from `before` to `after`), where `prepare` then
/// aborts with no cleanup, as under `kill -9`. Inert otherwise.
fn abort_for_test_between(before: u64, after: u64) -> bool {
    static AT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    AT.get_or_init(|| {
        std::env::var("GPT_PRETRAIN_PREPARE_ABORT_AT_TOKEN")
            .ok()
            .and_then(|s| s.parse().ok())
    })
    .is_some_and(|at| before < at && at <= after)
}
