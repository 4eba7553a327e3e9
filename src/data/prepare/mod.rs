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

use super::shards::TokenWidth;
use super::tokenizer::{Tokenizer, END_OF_TEXT};
use crate::fsutil::write_atomic;
use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver};

mod inputs;
mod records;
mod resume;
mod writer;

use inputs::*;
pub use records::*;
use resume::*;
use writer::*;

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
