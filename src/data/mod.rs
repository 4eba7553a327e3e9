//! Corpora, the token cache, token files, and seeded batches.
//!
//! A text corpus is tokenized once into `CACHE_DIR/<corpus hash>-<tokenizer hash>.bin`
//! (little-endian u16 when the vocabulary fits, else u32) and memory-mapped; the last
//! `val_fraction` of tokens is the validation split. Token files (llm.c shards, nanoGPT `.bin`,
//! [`shards`]; written by [`prepare`]) are memory-mapped as they are, train and validation
//! apart. Training batches are random windows from a ChaCha stream whose position is saved
//! in checkpoints; evaluation uses fixed windows from `eval_seed`, the same for every run.

pub mod prepare;
pub mod shards;
pub mod tokenizer;

use crate::data::shards::{DataFormat, TokenFile};
use crate::data::tokenizer::Tokenizer;
use crate::fsutil::{sha256_file, sha256_hex, write_atomic};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use memmap2::Mmap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// A corpus read into memory, checked, and hashed.
pub struct Corpus {
    pub path: PathBuf,
    pub text: String,
    /// SHA-256 of the file's bytes.
    pub sha256: String,
}

impl Corpus {
    /// Reads `path`, refusing a missing, empty or non-UTF-8 file.
    pub fn read(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!("corpus file {} does not exist", path.display());
        }
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read corpus {}", path.display()))?;
        if bytes.is_empty() {
            bail!("corpus file {} is empty", path.display());
        }
        let sha256 = sha256_hex(&bytes);
        let text = String::from_utf8(bytes).map_err(|e| {
            anyhow::anyhow!(
                "corpus file {} is not UTF-8 text (invalid byte at offset {})",
                path.display(),
                e.utf8_error().valid_up_to()
            )
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            text,
            sha256,
        })
    }

    /// The leading `1 − val_fraction` of the text (cut at a character boundary): what a trained
    /// tokenizer may learn from without seeing the validation text.
    pub fn training_text(&self, val_fraction: f64) -> &str {
        let mut end = ((self.text.len() as f64) * (1.0 - val_fraction)) as usize;
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        &self.text[..end]
    }
}

/// Which part of the tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

/// Metadata stored beside a cached token file.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct CacheMeta {
    corpus_sha256: String,
    tokenizer_sha256: String,
    n_tokens: usize,
    bytes_per_token: usize,
}

/// A run's tokens, memory-mapped, split into train and validation: a tokenized text corpus
/// (one cache file, the last `val_fraction` for validation), or token files.
pub struct TokenData {
    backing: Backing,
    n_tokens: usize,
    n_train: usize,
    /// Ids at or above this are refused where they are read (token files made elsewhere are not
    /// scanned at start).
    vocab_size: usize,
    /// The cache file (text corpora) or the first training file.
    pub cache_path: PathBuf,
}

enum Backing {
    Cache { mmap: Mmap, bytes_per_token: usize },
    Files { train: Segments, val: Segments },
}

/// Token files read as one stream.
struct Segments {
    files: Vec<TokenFile>,
    /// Stream index of each file's first token.
    starts: Vec<usize>,
    len: usize,
}

impl Segments {
    fn new(files: Vec<TokenFile>) -> Self {
        let mut starts = Vec::with_capacity(files.len());
        let mut len = 0;
        for f in &files {
            starts.push(len);
            len += f.len();
        }
        Self { files, starts, len }
    }

    /// The file holding stream token `i`, and the index in it.
    fn locate(&self, i: usize) -> (&TokenFile, usize) {
        let f = self.starts.partition_point(|&s| s <= i) - 1;
        (&self.files[f], i - self.starts[f])
    }
}

/// Where a run's tokens come from: `data` and `val_data` resolved.
pub enum DataSource {
    /// A UTF-8 text file, tokenized into the cache.
    Text(Corpus),
    /// Token files (llm.c shards or nanoGPT `.bin`), in stream order.
    Files {
        train: Vec<PathBuf>,
        val: Vec<PathBuf>,
        /// How they are laid out (`data_format`).
        format: DataFormat,
    },
}

/// Whether `s` is a glob pattern rather than a path.
fn is_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// The files a glob matches, sorted; an error names the key when there are none.
fn glob_files(pattern: &str, key: &str) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = glob::glob(pattern)
        .with_context(|| format!("{key} = {pattern:?} is not a valid glob"))?
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.is_file());
    files.sort();
    if files.is_empty() {
        bail!("{key} = {pattern:?} matches no files");
    }
    Ok(files)
}

impl DataSource {
    /// Resolves the `data` and `val_data` keys: a text file; a directory of llm.c shards
    /// (`*_train_*.bin` and `*_val_*.bin`) or of nanoGPT's `train.bin` and `val.bin`; or a glob
    /// or `.bin` file of training tokens with `val_data` naming the validation ones. `format`
    /// (`data_format`) says how token files are laid out; it has no meaning for a text corpus.
    pub fn resolve(data: &str, val_data: Option<&str>, format: DataFormat) -> Result<Self> {
        let path = Path::new(data);
        let val = |default: Option<Vec<PathBuf>>| -> Result<Vec<PathBuf>> {
            match (val_data, default) {
                (Some(v), _) if is_glob(v) => glob_files(v, "val_data"),
                (Some(v), _) => {
                    if !Path::new(v).is_file() {
                        bail!("val_data file {v} does not exist");
                    }
                    Ok(vec![PathBuf::from(v)])
                }
                (None, Some(found)) if !found.is_empty() => Ok(found),
                (None, _) => bail!(
                    "data = {data:?} names token files but no validation files: set val_data (a glob of val shards, or val.bin)"
                ),
            }
        };
        if path.is_dir() {
            let in_dir = |pattern: &str| -> Vec<PathBuf> {
                let pattern = path.join(pattern).display().to_string();
                let mut found: Vec<PathBuf> = glob::glob(&pattern)
                    .map(|g| g.filter_map(|p| p.ok()).collect())
                    .unwrap_or_default();
                found.sort();
                found
            };
            let (train, val_found) = if path.join("train.bin").is_file() {
                (vec![path.join("train.bin")], vec![path.join("val.bin")])
            } else {
                (in_dir("*_train_*.bin"), in_dir("*_val_*.bin"))
            };
            let val_found: Vec<PathBuf> = val_found.into_iter().filter(|p| p.is_file()).collect();
            if train.is_empty() {
                bail!(
                    "data directory {data} holds no token files (llm.c's *_train_*.bin or nanoGPT's train.bin)"
                );
            }
            return Ok(Self::Files {
                train,
                val: val(Some(val_found))?,
                format,
            });
        }
        if is_glob(data) {
            return Ok(Self::Files {
                train: glob_files(data, "data")?,
                val: val(None)?,
                format,
            });
        }
        if path.extension().is_some_and(|e| e == "bin") {
            if !path.is_file() {
                bail!("data file {data} does not exist");
            }
            return Ok(Self::Files {
                train: vec![path.to_path_buf()],
                val: val(None)?,
                format,
            });
        }
        if val_data.is_some() {
            bail!(
                "val_data goes with token files; a text corpus ({data}) is split by val_fraction"
            );
        }
        if !format.is_auto() {
            bail!("data_format goes with token files; {data} is a text corpus");
        }
        Ok(Self::Text(Corpus::read(path)?))
    }

    /// What run.json records as the corpus: the text file, or the token files' directory or
    /// glob.
    pub fn describe(&self, data: &str) -> String {
        match self {
            Self::Text(c) => c.path.display().to_string(),
            Self::Files { train, val, .. } => {
                format!(
                    "{data} ({} training and {} validation token files)",
                    train.len(),
                    val.len()
                )
            }
        }
    }

    /// The data's identity for resume: the text's SHA-256, or for token files the SHA-256 of
    /// their list (path and size of each, and the SHA-256 of any `manifest.json` beside them,
    /// which holds each shard's hash) — a changed set is refused without re-reading the files.
    pub fn sha256(&self) -> Result<String> {
        match self {
            Self::Text(c) => Ok(c.sha256.clone()),
            Self::Files { train, val, .. } => {
                let mut listing = String::new();
                let mut manifests = std::collections::BTreeSet::new();
                for (split, files) in [("train", train), ("val", val)] {
                    for f in files {
                        let size = std::fs::metadata(f)
                            .with_context(|| format!("cannot read token file {}", f.display()))?
                            .len();
                        listing.push_str(&format!("{split}\t{}\t{size}\n", f.display()));
                        if let Some(dir) = f.parent() {
                            manifests.insert(dir.join("manifest.json"));
                        }
                    }
                }
                for m in manifests.iter().filter(|m| m.is_file()) {
                    listing.push_str(&format!("manifest\t{}\t{}\n", m.display(), sha256_file(m)?));
                }
                Ok(sha256_hex(listing.as_bytes()))
            }
        }
    }

    /// The text corpus, if the data is one (a trained BPE tokenizer needs it).
    pub fn corpus(&self) -> Option<&Corpus> {
        match self {
            Self::Text(c) => Some(c),
            Self::Files { .. } => None,
        }
    }
}

impl TokenData {
    /// The run's tokens from `source`: a text corpus through [`TokenData::load`], token files
    /// through [`TokenData::open_files`].
    pub fn from_source(
        source: &DataSource,
        tokenizer: &Tokenizer,
        cache_dir: &Path,
        val_fraction: f64,
        block_size: usize,
    ) -> Result<Self> {
        match source {
            DataSource::Text(corpus) => {
                Self::load(corpus, tokenizer, cache_dir, val_fraction, block_size)
            }
            DataSource::Files { train, val, format } => {
                Self::open_files(train, val, *format, tokenizer, block_size)
            }
        }
    }

    /// Memory-maps token files (llm.c shards or nanoGPT `.bin`), each checked on open
    /// ([`TokenFile::open`]: layout as `format` says, header, size, every id against the
    /// vocabulary) and against `block_size` (a file shorter than one window of `block_size + 1`
    /// tokens is refused, as llm.c's loader would fail on it). Where a `manifest.json` from
    /// `prepare` lies beside them, its tokenizer must be `tokenizer`, and every file must be one
    /// it lists, an llm.c shard with the listed token count and SHA-256. Files are checked in
    /// parallel.
    pub fn open_files(
        train: &[PathBuf],
        val: &[PathBuf],
        format: DataFormat,
        tokenizer: &Tokenizer,
        block_size: usize,
    ) -> Result<Self> {
        let fingerprint = tokenizer.fingerprint()?;
        let vocab_size = tokenizer.vocab_size();
        let mut manifests: BTreeMap<PathBuf, Option<prepare::Manifest>> = BTreeMap::new();
        for p in train.iter().chain(val) {
            let dir = p.parent().unwrap_or(Path::new(".")).to_path_buf();
            if manifests.contains_key(&dir) {
                continue;
            }
            let manifest = if dir.join("manifest.json").is_file() {
                if format == DataFormat::NanoGpt {
                    bail!(
                        "data_format = \"nanogpt\", but {} holds a prepare manifest.json, which describes llm.c shards",
                        dir.display()
                    );
                }
                let manifest = prepare::Manifest::read(&dir)?;
                if manifest.identity.tokenizer.sha256 != fingerprint {
                    bail!(
                        "token files in {} were prepared with tokenizer {} (sha256 {}), not the run's (sha256 {})",
                        dir.display(),
                        manifest.identity.tokenizer.name,
                        &manifest.identity.tokenizer.sha256[..12],
                        &fingerprint[..12]
                    );
                }
                Some(manifest)
            } else {
                None
            };
            manifests.insert(dir, manifest);
        }
        let open_one = |p: &PathBuf| -> Result<TokenFile> {
            let dir = p.parent().unwrap_or(Path::new("."));
            let manifest = manifests.get(dir).and_then(Option::as_ref);
            let file = match manifest {
                Some(manifest) => manifest.open_shard(p, vocab_size)?,
                None => TokenFile::open(p, format, vocab_size)?,
            };
            if file.len() < block_size + 1 {
                bail!(
                    "token file {} holds {} tokens, fewer than one window of block_size + 1 = {}",
                    p.display(),
                    file.len(),
                    block_size + 1
                );
            }
            Ok(file)
        };
        let open = |paths: &[PathBuf]| -> Result<Segments> {
            let files = paths.par_iter().map(open_one).collect::<Result<Vec<_>>>()?;
            Ok(Segments::new(files))
        };
        let (train, val) = (open(train)?, open(val)?);
        Ok(Self {
            n_tokens: train.len + val.len,
            n_train: train.len,
            vocab_size,
            cache_path: train.files[0].path.clone(),
            backing: Backing::Files { train, val },
        })
    }

    /// Tokenizes `corpus` with `tokenizer` (or reuses the cached result) and splits it.
    /// `block_size` is checked: each split needs at least one window of `block_size + 1` tokens.
    pub fn load(
        corpus: &Corpus,
        tokenizer: &Tokenizer,
        cache_dir: &Path,
        val_fraction: f64,
        block_size: usize,
    ) -> Result<Self> {
        let tokenizer_sha256 = tokenizer.fingerprint()?;
        let bytes_per_token = if tokenizer.vocab_size() <= 1 << 16 {
            2
        } else {
            4
        };
        // "t2": the second way of cutting the text into pieces (`independent_chunks`); the
        // first merged `\n\n` at a few cuts, so its caches must not be reused.
        let stem = format!("{}-{}-t2", &corpus.sha256[..16], &tokenizer_sha256[..16]);
        let bin = cache_dir.join(format!("{stem}.bin"));
        let meta_path = cache_dir.join(format!("{stem}.json"));
        let expected = |n_tokens| CacheMeta {
            corpus_sha256: corpus.sha256.clone(),
            tokenizer_sha256: tokenizer_sha256.clone(),
            n_tokens,
            bytes_per_token,
        };
        let cached = std::fs::read_to_string(&meta_path)
            .ok()
            .and_then(|s| serde_json::from_str::<CacheMeta>(&s).ok())
            .filter(|m| {
                *m == expected(m.n_tokens)
                    && std::fs::metadata(&bin)
                        .is_ok_and(|md| md.len() == (m.n_tokens * bytes_per_token) as u64)
            });
        let n_tokens = match cached {
            Some(meta) => meta.n_tokens,
            None => {
                let ids = tokenize_corpus(&corpus.text, tokenizer)?;
                let mut bytes = Vec::with_capacity(ids.len() * bytes_per_token);
                for &id in &ids {
                    if bytes_per_token == 2 {
                        bytes.extend_from_slice(&(id as u16).to_le_bytes());
                    } else {
                        bytes.extend_from_slice(&id.to_le_bytes());
                    }
                }
                std::fs::create_dir_all(cache_dir).with_context(|| {
                    format!(
                        "cannot create token cache directory {}",
                        cache_dir.display()
                    )
                })?;
                write_atomic(&bin, &bytes)?;
                let meta = serde_json::to_string_pretty(&expected(ids.len()))?;
                write_atomic(&meta_path, meta.as_bytes())?;
                ids.len()
            }
        };
        let file = File::open(&bin).with_context(|| format!("cannot open {}", bin.display()))?;
        // SAFETY: the cache file is only ever replaced by rename, never written in place.
        let mmap =
            unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", bin.display()))?;
        let n_val = ((n_tokens as f64) * val_fraction).round() as usize;
        let n_train = n_tokens - n_val;
        let need = block_size + 1;
        if n_train < need || n_val < need {
            bail!(
                "corpus {} has {n_tokens} tokens: too short for block_size {block_size} \
                 (each of the train and validation splits needs at least {need})",
                corpus.path.display()
            );
        }
        Ok(Self {
            backing: Backing::Cache {
                mmap,
                bytes_per_token,
            },
            n_tokens,
            n_train,
            vocab_size: tokenizer.vocab_size(),
            cache_path: bin,
        })
    }

    /// All tokens.
    pub fn len(&self) -> usize {
        self.n_tokens
    }

    /// Whether there are no tokens (never true for loaded data).
    pub fn is_empty(&self) -> bool {
        self.n_tokens == 0
    }

    /// Tokens in a split.
    pub fn split_len(&self, split: Split) -> usize {
        match split {
            Split::Train => self.n_train,
            Split::Val => self.n_tokens - self.n_train,
        }
    }

    /// Token `i` of a split. Token files had every id checked against the vocabulary when they
    /// were opened; a cache id outside it is refused here.
    fn token(&self, split: Split, i: usize) -> Result<u32> {
        match &self.backing {
            Backing::Cache {
                mmap,
                bytes_per_token,
            } => {
                let i = match split {
                    Split::Train => i,
                    Split::Val => self.n_train + i,
                };
                let b = &mmap[i * bytes_per_token..(i + 1) * bytes_per_token];
                let id = match bytes_per_token {
                    2 => u16::from_le_bytes([b[0], b[1]]) as u32,
                    _ => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                };
                if id as usize >= self.vocab_size {
                    bail!(
                        "token cache {} holds id {id}, outside the vocabulary of {}",
                        self.cache_path.display(),
                        self.vocab_size
                    );
                }
                Ok(id)
            }
            Backing::Files { train, val } => {
                let segments = match split {
                    Split::Train => train,
                    Split::Val => val,
                };
                let (file, at) = segments.locate(i);
                Ok(file.token(at))
            }
        }
    }

    /// Inputs and next-token targets `(B, T)` for windows starting at `starts`.
    pub fn batch(
        &self,
        split: Split,
        starts: &[usize],
        block_size: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let mut x = Vec::with_capacity(starts.len() * block_size);
        let mut y = Vec::with_capacity(starts.len() * block_size);
        for &s in starts {
            let mut previous = self.token(split, s)?;
            for i in s + 1..=s + block_size {
                let next = self.token(split, i)?;
                x.push(previous);
                y.push(next);
                previous = next;
            }
        }
        let shape = (starts.len(), block_size);
        Ok((
            Tensor::from_vec(x, shape, device)?,
            Tensor::from_vec(y, shape, device)?,
        ))
    }
}

/// Splits text into pieces of about `target` bytes that tokenize independently with GPT-2's
/// pre-tokenizer: cuts only after a lone newline between two visible ASCII characters
/// (`x\ny`). There the newline is a pre-token of its own both ways — alone in the whole text
/// (`\s+(?!\S)` cannot take it, `\s+` does) and at the end of a piece — and nothing before or
/// after it joins it. (A cut after `\n\n` is not safe: the whole text splits it into two `\n`
/// tokens, a piece ending in it keeps one `\n\n`.)
fn independent_chunks(text: &str, target: usize) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut chunks = Vec::new();
    let mut start = 0;
    let safe_cut = |end: usize| {
        end >= 2
            && bytes[end - 1] == b'\n'
            && bytes[end - 2].is_ascii_graphic()
            && bytes[end].is_ascii_graphic()
    };
    while start < text.len() {
        let mut end = (start + target.max(2)).min(text.len());
        while end < text.len() && !safe_cut(end) {
            end += 1;
        }
        chunks.push(&text[start..end]);
        start = end;
    }
    chunks
}

/// Tokenizes a whole corpus in parallel, in chunks cut where no token can span the cut.
fn tokenize_corpus(text: &str, tokenizer: &Tokenizer) -> Result<Vec<u32>> {
    let pieces: Vec<Vec<u32>> = independent_chunks(text, 1 << 20)
        .into_par_iter()
        .map(|chunk| tokenizer.encode(chunk))
        .collect::<Result<_>>()?;
    Ok(pieces.concat())
}

/// How training windows are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sampling {
    /// Window starts uniform over the split, independently (nanoGPT's `get_batch`): a run
    /// reading a fraction f of the split reads about f/2 of its tokens twice by chance.
    #[default]
    Random,
    /// Without replacement: the split cut into consecutive block-size windows (each with its
    /// next-token target, as llm.c's loader reads them), visited in a seeded random order, a new
    /// order each epoch. No token is read twice within an epoch.
    Shuffled,
}

impl Sampling {
    /// Whether this is the default (left out of saved configs, which keeps their hashes).
    pub fn is_random(&self) -> bool {
        *self == Sampling::Random
    }
}

/// Draws training windows from a seeded stream. Its position is saved in checkpoints, so a
/// resumed run draws exactly the batches an uninterrupted one would.
pub struct BatchSampler {
    rng: ChaCha8Rng,
    seed: u64,
    sampling: Sampling,
    /// Windows drawn so far ([`Sampling::Shuffled`]).
    drawn: u128,
    /// The window order of one epoch, once computed: (epoch, window indices).
    order: Option<(u128, Vec<u32>)>,
}

impl BatchSampler {
    /// A sampler at the start of `seed`'s stream.
    pub fn new(seed: u64, sampling: Sampling) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            seed,
            sampling,
            drawn: 0,
            order: None,
        }
    }

    /// A sampler at a saved position ([`BatchSampler::position`]) of `seed`'s stream.
    pub fn at(seed: u64, sampling: Sampling, position: u128) -> Self {
        let mut s = Self::new(seed, sampling);
        match sampling {
            Sampling::Random => s.rng.set_word_pos(position),
            Sampling::Shuffled => s.drawn = position,
        }
        s
    }

    /// The stream position, for checkpoints: the random stream's word position, or the number
    /// of windows drawn when shuffled.
    pub fn position(&self) -> u128 {
        match self.sampling {
            Sampling::Random => self.rng.get_word_pos(),
            Sampling::Shuffled => self.drawn,
        }
    }

    /// `batch_size` window starts over a split of `split_len` tokens.
    pub fn next_starts(
        &mut self,
        split_len: usize,
        block_size: usize,
        batch_size: usize,
    ) -> Vec<usize> {
        match self.sampling {
            Sampling::Random => {
                let last_start = split_len - block_size - 1;
                (0..batch_size)
                    .map(|_| self.rng.random_range(0..=last_start))
                    .collect()
            }
            Sampling::Shuffled => (0..batch_size)
                .map(|_| self.next_shuffled(split_len, block_size))
                .collect(),
        }
    }

    fn next_shuffled(&mut self, split_len: usize, block_size: usize) -> usize {
        // Window j reads tokens j·T ..= (j+1)·T: inputs never overlap, the last target is the
        // next window's first input.
        let windows = ((split_len - 1) / block_size) as u128;
        let (epoch, index) = (self.drawn / windows, self.drawn % windows);
        if self.order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            use rand::seq::SliceRandom;
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            // Stream 0 is the random mode's; epochs get streams 1, 2, …
            rng.set_stream(1 + epoch as u64);
            let mut order: Vec<u32> = (0..windows as u32).collect();
            order.shuffle(&mut rng);
            self.order = Some((epoch, order));
        }
        self.drawn += 1;
        let order = &self.order.as_ref().expect("order computed above").1;
        order[index as usize] as usize * block_size
    }
}

/// The fixed evaluation windows of a split: `n_batches` batches of `batch_size` starts, drawn
/// from `eval_seed` alone (one stream per split), so every run evaluates on the same text.
pub fn eval_windows(
    data: &TokenData,
    split: Split,
    eval_seed: u64,
    n_batches: usize,
    batch_size: usize,
    block_size: usize,
) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(eval_seed);
    rng.set_stream(match split {
        Split::Train => 1,
        Split::Val => 2,
    });
    let last_start = data.split_len(split) - block_size - 1;
    (0..n_batches)
        .map(|_| {
            (0..batch_size)
                .map(|_| rng.random_range(0..=last_start))
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffled_sampling_reads_every_window_once_per_epoch_and_resumes() {
        // 1,001 tokens, windows of 10 (+1 target): 100 windows at 0, 10, …, 990.
        let (len, block) = (1001, 10);
        let mut sampler = BatchSampler::new(7, Sampling::Shuffled);
        let mut first: Vec<usize> = Vec::new();
        for _ in 0..25 {
            first.extend(sampler.next_starts(len, block, 4));
        }
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).map(|j| j * 10).collect::<Vec<_>>());
        assert_ne!(first, sorted, "not shuffled");
        // The next epoch: all windows again, in another order.
        let second: Vec<usize> = (0..25)
            .flat_map(|_| sampler.next_starts(len, block, 4))
            .collect();
        let mut sorted2 = second.clone();
        sorted2.sort();
        assert_eq!(sorted, sorted2);
        assert_ne!(first, second);
        // Resuming mid-epoch continues the same sequence; another seed gives another order.
        let mut a = BatchSampler::new(7, Sampling::Shuffled);
        a.next_starts(len, block, 37);
        let mut b = BatchSampler::at(7, Sampling::Shuffled, a.position());
        assert_eq!(a.next_starts(len, block, 80), b.next_starts(len, block, 80));
        let other: Vec<usize> =
            BatchSampler::new(8, Sampling::Shuffled).next_starts(len, block, 100);
        assert_ne!(other, first);
    }

    #[test]
    fn chunks_cover_the_text_and_cut_only_at_a_lone_newline() {
        // Not after "\n\n", not before a space, not after a space; after "h\n" before "i".
        let text = "ab\n\ncd ef\n  gh\nij \nk\n\n\nl";
        let chunks = independent_chunks(text, 3);
        assert_eq!(chunks.concat(), text);
        assert_eq!(chunks, vec!["ab\n\ncd ef\n  gh\n", "ij \nk\n\n\nl"]);
    }

    #[test]
    fn sampler_resumes_at_saved_position() {
        let mut a = BatchSampler::new(7, Sampling::Random);
        a.next_starts(1000, 10, 5);
        let pos = a.position();
        let next = a.next_starts(1000, 10, 5);
        let mut b = BatchSampler::at(7, Sampling::Random, pos);
        assert_eq!(b.next_starts(1000, 10, 5), next);
        assert!(next.iter().all(|&s| s <= 1000 - 11));
    }
}
