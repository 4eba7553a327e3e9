//! `prepare`'s inputs: the files the command line names, in stream order, and the reader thread
//! that turns them into batches of documents, skipping (or stopping at) records that are not.

use anyhow::{anyhow, bail, Context, Result};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::mpsc::SyncSender;

use super::records::*;

/// The kinds of input file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum InputKind {
    Text,
    Jsonl,
    JsonlZst,
    Parquet,
}

impl InputKind {
    pub(super) fn of(path: &Path) -> Option<Self> {
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

pub(super) const KINDS: &str = ".txt, .jsonl, .jsonl.zst or .parquet";

/// The files the inputs name, in order: a file as given, a directory's files (recursively) and
/// a glob's matches sorted by path.
pub(super) fn resolve_inputs(inputs: &[String]) -> Result<Vec<PathBuf>> {
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

pub(super) fn describe_input(path: &Path) -> Result<InputFile> {
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
pub(super) struct Batch {
    /// Index of the first document in the whole stream.
    pub(super) first_document: u64,
    pub(super) documents: Vec<String>,
    /// Each skip with the index of the document that follows it.
    pub(super) skips: Vec<(u64, Skip)>,
    /// Input bytes consumed up to the end of this batch (all inputs before it included).
    pub(super) input_bytes_done: u64,
}

/// Reads the inputs into batches, skipping the first `skip_documents` documents unread by the
/// tokenizer (they are still read from disk: the formats have no index).
pub(super) struct Reader {
    pub(super) field: String,
    /// Whether malformed records are skipped rather than an error.
    pub(super) skip_bad_records: bool,
    pub(super) sender: SyncSender<Result<Batch>>,
    pub(super) next_document: u64,
    pub(super) skip_documents: u64,
    /// Whether an interrupted run counted the skips up to `skip_documents` (inclusive).
    pub(super) resuming: bool,
    pub(super) batch: Batch,
    pub(super) batch_bytes: usize,
    pub(super) bytes_before_file: u64,
}

impl Reader {
    pub(super) fn push_document(&mut self, text: String) -> Result<()> {
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
    pub(super) fn before_resume_point(&self) -> bool {
        self.resuming && self.next_document <= self.skip_documents
    }

    /// A malformed record: an error naming it, or with `skip_bad_records` a counted skip.
    pub(super) fn bad_record(&mut self, location: String, reason: String) -> Result<()> {
        if self.skip_bad_records || self.before_resume_point() {
            self.skip(location, reason);
            return Ok(());
        }
        bail!("{location}: {reason}; a malformed record (--skip-bad-records skips and lists such records)")
    }

    /// A record that is not in the stream: an empty document, or (see `bad_record`) a
    /// malformed one that may be skipped.
    pub(super) fn skip(&mut self, location: String, reason: impl Into<String>) {
        if self.before_resume_point() {
            return;
        }
        let skip = Skip {
            location,
            reason: reason.into(),
        };
        self.batch.skips.push((self.next_document, skip));
    }

    pub(super) fn flush(&mut self) -> Result<()> {
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

    pub(super) fn read_all(&mut self, files: &[PathBuf]) -> Result<()> {
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

    pub(super) fn read_text(&mut self, path: &Path) -> Result<()> {
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

    pub(super) fn read_jsonl(&mut self, path: &Path, mut reader: impl BufRead) -> Result<()> {
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

    pub(super) fn read_parquet(&mut self, path: &Path) -> Result<()> {
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
