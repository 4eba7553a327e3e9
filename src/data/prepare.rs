//! `gpt-pretrain prepare`: text corpora (`.txt`, `.jsonl`, `.jsonl.zst`, `.parquet`) into llm.c
//! token shards, once, in parallel, deterministically and crash-safely.
//!
//! The token stream is every document in input order (files in the order given, directories and
//! globs sorted by path, lines and rows in file order), each preceded by the end-of-text token;
//! its first `val_tokens` tokens are the validation shard(s) (`NAME_val_000000.bin`), the rest the
//! training shards (`NAME_train_000001.bin`, …), `shard_tokens` each, as llm.c's `fineweb.py`
//! writes them. A literal `<|endoftext|>` inside a document becomes the end-of-text token, as
//! Hugging Face `tokenizers` encodes it (tiktoken's `encode_ordinary`, which llm.c uses, spells it
//! out instead); the manifest counts the documents where that happened.
//!
//! Memory: one batch of documents being tokenized and the next being read (each about
//! [`BATCH_BYTES`] of text, or one document if larger — a `.txt` file is one document), their
//! tokens, and one shard's write buffer; not the corpus.
//!
//! Crash safety: a shard is written as `.NAME_split_index.bin.tmp`, fsynced and renamed; after
//! each shard `.prepare-progress.json` records where in the document stream the next one starts.
//! A rerun of the same command skips the finished shards' documents without tokenizing them and
//! produces the same bytes as an uninterrupted run. `manifest.json` is written last.

use super::shards::{llmc_header, TokenWidth, HEADER_BYTES};
use super::tokenizer::{Tokenizer, END_OF_TEXT};
use crate::fsutil::{sha256_file, sync_dir, write_atomic};
use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

/// Text per batch of documents handed to the tokenizer threads.
pub const BATCH_BYTES: usize = 32 << 20;
/// llm.c's shard size.
pub const DEFAULT_SHARD_TOKENS: u64 = 100_000_000;
/// Skipped records listed one by one in the manifest (all are counted).
const LISTED_SKIPS: usize = 1000;
const MANIFEST: &str = "manifest.json";
const PROGRESS: &str = ".prepare-progress.json";

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
    /// SHA-256 of its serialized form ([`Tokenizer::fingerprint`]).
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
    /// The first [`LISTED_SKIPS`] skips.
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

    fn count_skip(&mut self, skip: Skip) {
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

/// `.prepare-progress.json`: the identity and the shards finished so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Progress {
    identity: Identity,
    shards: Vec<ShardRecord>,
    counts: Counts,
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
    /// Reads `DIR/manifest.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a prepare manifest", path.display()))
    }
}

/// The kinds of input file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InputKind {
    Text,
    Jsonl,
    JsonlZst,
    Parquet,
}

impl InputKind {
    fn of(path: &Path) -> Option<Self> {
        let name = path.file_name()?.to_string_lossy().to_lowercase();
        if name.ends_with(".jsonl.zst") {
            Some(Self::JsonlZst)
        } else if name.ends_with(".jsonl") {
            Some(Self::Jsonl)
        } else if name.ends_with(".parquet") {
            Some(Self::Parquet)
        } else if name.ends_with(".txt") {
            Some(Self::Text)
        } else {
            None
        }
    }
}

const KINDS: &str = ".txt, .jsonl, .jsonl.zst or .parquet";

/// The files the inputs name, in order: a file as given, a directory's files (recursively) and
/// a glob's matches sorted by path.
fn resolve_inputs(inputs: &[String]) -> Result<Vec<PathBuf>> {
    if inputs.is_empty() {
        bail!("prepare: no inputs given");
    }
    let mut files = Vec::new();
    for input in inputs {
        let path = Path::new(input);
        if path.is_dir() {
            let mut found = Vec::new();
            let mut stack = vec![path.to_path_buf()];
            while let Some(dir) = stack.pop() {
                for entry in std::fs::read_dir(&dir)
                    .with_context(|| format!("cannot list {}", dir.display()))?
                {
                    let p = entry?.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if InputKind::of(&p).is_some() {
                        found.push(p);
                    }
                }
            }
            if found.is_empty() {
                bail!("input directory {input} holds no {KINDS} files");
            }
            found.sort();
            files.extend(found);
        } else if path.exists() {
            if InputKind::of(path).is_none() {
                bail!("input {input} is not a {KINDS} file");
            }
            files.push(path.to_path_buf());
        } else if input.contains(['*', '?', '[']) {
            let mut found: Vec<PathBuf> = glob::glob(input)
                .with_context(|| format!("input {input} is not a valid glob"))?
                .collect::<Result<_, _>>()?;
            found.retain(|p| p.is_file() && InputKind::of(p).is_some());
            if found.is_empty() {
                bail!("input glob {input} matches no {KINDS} files");
            }
            found.sort();
            files.extend(found);
        } else {
            bail!("input {input} does not exist");
        }
    }
    Ok(files)
}

fn describe_input(path: &Path) -> Result<InputFile> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    Ok(InputFile {
        path: path.to_path_buf(),
        bytes: meta.len(),
        modified,
    })
}

/// The documents of a few inputs, read ahead on their own thread, in batches.
struct Batch {
    /// Index of the first document in the whole stream.
    first_document: u64,
    documents: Vec<String>,
    /// Each skip with the index of the document that follows it.
    skips: Vec<(u64, Skip)>,
    /// Input bytes consumed up to the end of this batch (all inputs before it included).
    input_bytes_done: u64,
}

/// Reads the inputs into batches, skipping the first `skip_documents` documents unread by the
/// tokenizer (they are still read from disk: the formats have no index).
struct Reader {
    field: String,
    /// Whether malformed records are skipped rather than an error.
    skip_bad_records: bool,
    sender: SyncSender<Result<Batch>>,
    next_document: u64,
    skip_documents: u64,
    /// Whether an interrupted run counted the skips up to `skip_documents` (inclusive).
    resuming: bool,
    batch: Batch,
    batch_bytes: usize,
    bytes_before_file: u64,
}

impl Reader {
    fn push_document(&mut self, text: String) -> Result<()> {
        let index = self.next_document;
        self.next_document += 1;
        if index < self.skip_documents {
            return Ok(());
        }
        if self.batch.documents.is_empty() {
            self.batch.first_document = index;
        }
        self.batch_bytes += text.len();
        self.batch.documents.push(text);
        if self.batch_bytes >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Whether the record being read lies before the document a resumed run starts at: the
    /// interrupted run already counted its skips (or stopped at it).
    fn before_resume_point(&self) -> bool {
        self.resuming && self.next_document <= self.skip_documents
    }

    /// A malformed record: an error naming it, or with `skip_bad_records` a counted skip.
    fn bad_record(&mut self, location: String, reason: String) -> Result<()> {
        if self.skip_bad_records || self.before_resume_point() {
            self.skip(location, reason);
            return Ok(());
        }
        bail!("{location}: {reason}; a malformed record (--skip-bad-records skips and lists such records)")
    }

    /// A record that is not in the stream: an empty document, or (see `bad_record`) a
    /// malformed one that may be skipped.
    fn skip(&mut self, location: String, reason: impl Into<String>) {
        if self.before_resume_point() {
            return;
        }
        let skip = Skip {
            location,
            reason: reason.into(),
        };
        self.batch.skips.push((self.next_document, skip));
    }

    fn flush(&mut self) -> Result<()> {
        let next = Batch {
            first_document: self.next_document,
            documents: Vec::new(),
            skips: Vec::new(),
            input_bytes_done: self.batch.input_bytes_done,
        };
        let batch = std::mem::replace(&mut self.batch, next);
        self.batch_bytes = 0;
        self.sender
            .send(Ok(batch))
            .map_err(|_| anyhow!("prepare: the tokenizer side stopped"))
    }

    fn read_all(&mut self, files: &[PathBuf]) -> Result<()> {
        for path in files {
            let bytes = std::fs::metadata(path)?.len();
            match InputKind::of(path).expect("resolved inputs have a kind") {
                InputKind::Text => self.read_text(path)?,
                InputKind::Jsonl => {
                    let file = File::open(path)
                        .with_context(|| format!("cannot open {}", path.display()))?;
                    self.read_jsonl(path, BufReader::with_capacity(1 << 20, file))?
                }
                InputKind::JsonlZst => {
                    let file = File::open(path)
                        .with_context(|| format!("cannot open {}", path.display()))?;
                    let decoder = zstd::Decoder::new(file)
                        .with_context(|| format!("{} is not zstd-compressed", path.display()))?;
                    self.read_jsonl(path, BufReader::with_capacity(1 << 20, decoder))?
                }
                InputKind::Parquet => self.read_parquet(path)?,
            }
            self.bytes_before_file += bytes;
            self.batch.input_bytes_done = self.bytes_before_file;
        }
        self.flush()
    }

    fn read_text(&mut self, path: &Path) -> Result<()> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let location = path.display().to_string();
        match String::from_utf8(bytes) {
            Ok(text) if text.is_empty() => self.skip(location, "empty text"),
            Ok(text) => self.push_document(text)?,
            Err(e) => self.bad_record(
                location,
                format!("invalid UTF-8 at byte {}", e.utf8_error().valid_up_to()),
            )?,
        }
        Ok(())
    }

    fn read_jsonl(&mut self, path: &Path, mut reader: impl BufRead) -> Result<()> {
        let mut line = Vec::new();
        let mut number = 0u64;
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .with_context(|| format!("cannot read {} after line {number}", path.display()))?;
            if n == 0 {
                return Ok(());
            }
            number += 1;
            let location = format!("{}:{number}", path.display());
            let content = line.strip_suffix(b"\n").unwrap_or(&line);
            let content = content.strip_suffix(b"\r").unwrap_or(content);
            if content.iter().all(u8::is_ascii_whitespace) {
                self.skip(location, "blank line");
                continue;
            }
            let text = match std::str::from_utf8(content) {
                Err(e) => {
                    self.bad_record(
                        location,
                        format!("invalid UTF-8 at byte {} of the line", e.valid_up_to()),
                    )?;
                    continue;
                }
                Ok(text) => text,
            };
            let mut record: serde_json::Map<String, serde_json::Value> =
                match serde_json::from_str(text) {
                    Err(e) => {
                        self.bad_record(location, format!("not a JSON object ({e})"))?;
                        continue;
                    }
                    Ok(record) => record,
                };
            match record.remove(&self.field) {
                Some(serde_json::Value::String(s)) if s.is_empty() => {
                    self.skip(location, "empty text")
                }
                Some(serde_json::Value::String(s)) => self.push_document(s)?,
                Some(_) => {
                    let reason = format!("field '{}' is not a string", self.field);
                    self.bad_record(location, reason)?
                }
                None => self.bad_record(location, format!("no field '{}'", self.field))?,
            }
        }
    }

    fn read_parquet(&mut self, path: &Path) -> Result<()> {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        use parquet::record::Field;
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let reader = SerializedFileReader::new(file)
            .with_context(|| format!("{} is not a parquet file", path.display()))?;
        let schema = reader.metadata().file_metadata().schema();
        let Some(column) = schema.get_fields().iter().find(|f| f.name() == self.field) else {
            let names: Vec<&str> = schema.get_fields().iter().map(|f| f.name()).collect();
            bail!(
                "parquet file {} has no column '{}' (its columns: {}); pass --text-field",
                path.display(),
                self.field,
                names.join(", ")
            );
        };
        let projection = parquet::schema::types::Type::group_type_builder(schema.name())
            .with_fields(vec![column.clone()])
            .build()?;
        let rows = parquet::record::reader::RowIter::from_file_into(Box::new(reader))
            .project(Some(projection))
            .with_context(|| {
                format!("cannot read column '{}' of {}", self.field, path.display())
            })?;
        for (row_index, row) in rows.enumerate() {
            let row =
                row.with_context(|| format!("cannot read {} at row {row_index}", path.display()))?;
            let location = format!("{}:row {row_index}", path.display());
            match row.get_column_iter().next().map(|(_, field)| field) {
                Some(Field::Str(s)) if s.is_empty() => self.skip(location, "empty text"),
                Some(Field::Str(s)) => self.push_document(s.clone())?,
                Some(Field::Bytes(b)) => match std::str::from_utf8(b.data()) {
                    Ok("") => self.skip(location, "empty text"),
                    Ok(s) => self.push_document(s.to_owned())?,
                    Err(e) => self.bad_record(
                        location,
                        format!("invalid UTF-8 at byte {}", e.valid_up_to()),
                    )?,
                },
                Some(Field::Null) | None => self.skip(location, "null text"),
                Some(other) => bail!(
                    "parquet file {} column '{}' holds {} values, not text",
                    path.display(),
                    self.field,
                    other
                ),
            }
        }
        Ok(())
    }
}

/// Documents longer than this are cut where the pre-tokenizer ends a token anyway, and the
/// pieces tokenized in parallel (see [`super::independent_chunks`]). The test suite lowers it
/// with `GPT_PRETRAIN_PIECE_BYTES` to check the cuts against whole-document ids.
fn long_document() -> usize {
    static BYTES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| {
        std::env::var("GPT_PRETRAIN_PIECE_BYTES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1 << 20)
    })
}

/// The end-of-text token followed by the document's ids.
fn tokenize_document(tokenizer: &Tokenizer, end_of_text: u32, text: &str) -> Result<Vec<u32>> {
    let mut ids = vec![end_of_text];
    let long = long_document();
    if text.len() > long {
        let pieces: Vec<Vec<u32>> = super::independent_chunks(text, long)
            .into_par_iter()
            .map(|piece| tokenizer.encode(piece))
            .collect::<Result<_>>()?;
        ids.extend(pieces.into_iter().flatten());
    } else {
        ids.extend(tokenizer.encode(text)?);
    }
    Ok(ids)
}

/// The shard being written.
struct OpenShard {
    tmp: PathBuf,
    file: std::io::BufWriter<File>,
    name: String,
    split: ShardSplit,
    capacity: u64,
    tokens: u64,
}

/// Appends the token stream to shards, cutting them at the split and size boundaries.
struct ShardWriter {
    dir: PathBuf,
    identity: Identity,
    shards: Vec<ShardRecord>,
    open: Option<OpenShard>,
    counts: Counts,
    buffer: Vec<u8>,
}

impl ShardWriter {
    fn val_written(&self) -> u64 {
        self.counts.tokens.min(self.identity.val_tokens)
    }

    fn open_next(&mut self) -> Result<()> {
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
    fn append(&mut self, document: u64, first_token: u64, ids: &[u32]) -> Result<()> {
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
    fn finish_shard(&mut self, next: Cursor) -> Result<()> {
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

fn load_tokenizer(opts: &PrepareOptions) -> Result<(Tokenizer, TokenizerRecord)> {
    let tokenizer = match opts.tokenizer.as_str() {
        "byte" => bail!(
            "prepare needs a tokenizer with an end-of-text token to write before each document; \
             the byte tokenizer has none (use gpt2 or a tokenizer.json)"
        ),
        "gpt2" => Tokenizer::gpt2(opts.tokenizer_path.as_deref())?,
        path => {
            if opts.tokenizer_path.is_some() {
                bail!("--tokenizer-path goes with --tokenizer gpt2; give the tokenizer.json as --tokenizer");
            }
            Tokenizer::from_file(Path::new(path))?
        }
    };
    let Some(end_of_text) = tokenizer.token_to_id(END_OF_TEXT) else {
        bail!(
            "tokenizer {} has no {END_OF_TEXT} token, which prepare writes before each document",
            opts.tokenizer
        );
    };
    let record = TokenizerRecord {
        name: opts.tokenizer.clone(),
        sha256: tokenizer.fingerprint()?,
        vocab_size: tokenizer.vocab_size(),
        end_of_text,
    };
    Ok((tokenizer, record))
}

/// Where a previous run in the output directory left off.
enum Previous {
    Nothing,
    Finished(Manifest),
    Interrupted(Progress),
}

fn previous_run(dir: &Path, identity: &Identity) -> Result<Previous> {
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

/// Runs `prepare` (see the module docs) and returns its manifest.
pub fn prepare(opts: &PrepareOptions) -> Result<Manifest> {
    if opts.shard_tokens == 0 {
        bail!("--shard-tokens must be at least 1");
    }
    let files = resolve_inputs(&opts.inputs)?;
    let (tokenizer, tokenizer_record) = load_tokenizer(opts)?;
    let name = match &opts.name {
        Some(n) => n.clone(),
        None => opts
            .out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                anyhow!(
                    "--out {} has no directory name to name the shards by; pass --name",
                    opts.out.display()
                )
            })?,
    };
    if name.is_empty() || name.contains(['/', '\\']) {
        bail!("--name '{name}' must be a non-empty file-name prefix");
    }
    let identity = Identity {
        name,
        token_width: TokenWidth::for_vocab(tokenizer_record.vocab_size),
        tokenizer: tokenizer_record,
        text_field: opts.text_field.clone(),
        shard_tokens: opts.shard_tokens,
        val_tokens: opts.val_tokens.unwrap_or(opts.shard_tokens),
        inputs: files
            .iter()
            .map(|p| describe_input(p))
            .collect::<Result<_>>()?,
    };
    let (resume_shards, resume_counts) = match previous_run(&opts.out, &identity)? {
        Previous::Finished(manifest) => return Ok(manifest),
        Previous::Interrupted(progress) => (progress.shards, progress.counts),
        Previous::Nothing => (Vec::new(), Counts::default()),
    };
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create output directory {}", opts.out.display()))?;
    let resuming = !resume_shards.is_empty();
    let start = resume_shards.last().map(|s| s.next).unwrap_or_default();
    let total_bytes: u64 = identity.inputs.iter().map(|i| i.bytes).sum();

    let (sender, receiver) = sync_channel::<Result<Batch>>(1);
    let field = identity.text_field.clone();
    let skip_bad_records = opts.skip_bad_records;
    let reader_files = files.clone();
    let reader = std::thread::spawn(move || {
        let mut reader = Reader {
            field,
            skip_bad_records,
            sender: sender.clone(),
            next_document: 0,
            skip_documents: start.document,
            resuming,
            batch: Batch {
                first_document: 0,
                documents: Vec::new(),
                skips: Vec::new(),
                input_bytes_done: 0,
            },
            batch_bytes: 0,
            bytes_before_file: 0,
        };
        if let Err(e) = reader.read_all(&reader_files) {
            let _ = sender.send(Err(e));
        }
    });

    let mut writer = ShardWriter {
        dir: opts.out.clone(),
        identity,
        shards: resume_shards,
        open: None,
        counts: resume_counts,
        buffer: Vec::new(),
    };
    let outcome = run_batches(
        &mut writer,
        &tokenizer,
        receiver,
        start,
        total_bytes,
        opts.progress,
    )
    .and_then(|counts| finish(&mut writer, counts));
    if let Some(open) = writer.open.take() {
        // After an error: the unfinished shard is left for a rerun to redo; finished shards
        // are never removed.
        drop(open.file);
        let _ = std::fs::remove_file(&open.tmp);
    }
    // The reader stops at its next send once the receiver is gone.
    let _ = reader.join();
    outcome
}

fn run_batches(
    writer: &mut ShardWriter,
    tokenizer: &Tokenizer,
    receiver: Receiver<Result<Batch>>,
    start: Cursor,
    total_bytes: u64,
    show_progress: bool,
) -> Result<Counts> {
    let end_of_text = writer.identity.tokenizer.end_of_text;
    let vocab = writer.identity.tokenizer.vocab_size;
    let bar = if show_progress {
        indicatif::ProgressBar::new(total_bytes)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {bytes}/{total_bytes} {msg} [{elapsed_precise}, ETA {eta}]",
        )
        .expect("a valid template"),
    );
    bar.println(format!("encoding with {}", tokenizer.encoder_name()));
    let started = std::time::Instant::now();
    let tokens_before = writer.counts.tokens;
    for batch in receiver {
        let batch = batch?;
        let ids: Vec<Vec<u32>> = batch
            .documents
            .par_iter()
            .map(|text| tokenize_document(tokenizer, end_of_text, text))
            .collect::<Result<_>>()?;
        // Counted in stream order, so that the totals saved with each finished shard describe
        // exactly the stream before its end, and a resumed run adds only what follows.
        let mut skips = batch.skips.into_iter().peekable();
        for (i, (doc, text)) in ids.iter().zip(&batch.documents).enumerate() {
            let document = batch.first_document + i as u64;
            while let Some((_, skip)) = skips.next_if(|(before, _)| *before <= document) {
                writer.counts.count_skip(skip);
            }
            // The document the interrupted run stopped inside: its first tokens are written.
            let from = if document == start.document {
                start.token as usize
            } else {
                0
            };
            let max = doc.iter().copied().max().unwrap_or(0);
            if max as usize >= vocab {
                bail!("tokenizer produced id {max}, outside its vocabulary of {vocab}");
            }
            let counts = &mut writer.counts;
            counts.max_token_id = counts.max_token_id.max(max);
            if from == 0 {
                counts.documents += 1;
                counts.documents_with_literal_end_of_text += u64::from(text.contains(END_OF_TEXT));
            }
            if from < doc.len() {
                writer.append(document, from as u64, &doc[from..])?;
            }
        }
        for (_, skip) in skips {
            writer.counts.count_skip(skip);
        }
        let rate = (writer.counts.tokens - tokens_before) as f64
            / started.elapsed().as_secs_f64().max(1e-9);
        bar.set_position(batch.input_bytes_done);
        bar.set_message(format!(
            "{} documents, {} tokens, {:.0}k tokens/s",
            writer.counts.documents,
            writer.counts.tokens,
            rate / 1e3
        ));
    }
    bar.finish_and_clear();
    Ok(writer.counts.clone())
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

/// A skip reason without its positions (`invalid UTF-8 at byte 12` → `invalid UTF-8`), for
/// counting by kind.
fn skip_kind(reason: &str) -> String {
    let cut = [" at byte", " ("]
        .iter()
        .filter_map(|m| reason.find(m))
        .min();
    reason[..cut.unwrap_or(reason.len())].to_string()
}

fn finish(writer: &mut ShardWriter, counts: Counts) -> Result<Manifest> {
    let val = writer.identity.val_tokens;
    if writer.counts.tokens == 0 {
        let first = counts.skips.first().map_or(String::new(), |s| {
            format!(", the first at {}: {}", s.location, s.reason)
        });
        bail!(
            "the inputs hold no documents to prepare ({} records skipped{first})",
            counts.skipped
        );
    }
    if writer.counts.tokens <= val {
        bail!(
            "the inputs make {} tokens, and the first {val} are the validation split (--val-tokens): \
             nothing is left for training; lower --val-tokens",
            writer.counts.tokens
        );
    }
    let end = Cursor {
        document: counts.documents,
        token: 0,
    };
    writer.finish_shard(end)?;
    let manifest = Manifest {
        format: "llm.c".into(),
        val_tokens_written: writer.val_written(),
        train_tokens_written: writer.counts.tokens - writer.val_written(),
        identity: writer.identity.clone(),
        shards: writer.shards.clone(),
        counts,
    };
    write_atomic(
        &writer.dir.join(MANIFEST),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    let _ = std::fs::remove_file(writer.dir.join(PROGRESS));
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_reasons_are_counted_by_kind() {
        assert_eq!(
            skip_kind("invalid UTF-8 at byte 12 of the line"),
            "invalid UTF-8"
        );
        assert_eq!(
            skip_kind("not a JSON object (EOF while parsing)"),
            "not a JSON object"
        );
        assert_eq!(skip_kind("no field 'text'"), "no field 'text'");
    }
}
