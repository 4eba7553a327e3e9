//! Corpora, the token cache, and seeded batches.
//!
//! A corpus is tokenized once into `CACHE_DIR/<corpus hash>-<tokenizer hash>.bin` (little-endian u16
//! when the vocabulary fits, else u32) and memory-mapped. The last `val_fraction` of tokens is the
//! validation split. Training batches are random windows from a ChaCha stream whose position is saved
//! in checkpoints; evaluation uses fixed windows from `eval_seed`, the same for every run.

pub mod prepare;
pub mod shards;
pub mod tokenizer;

use crate::data::tokenizer::Tokenizer;
use crate::fsutil::{sha256_hex, write_atomic};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use memmap2::Mmap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
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

/// A tokenized corpus, memory-mapped, split into train and validation.
pub struct TokenData {
    mmap: Mmap,
    bytes_per_token: usize,
    n_tokens: usize,
    n_train: usize,
    /// The cache file backing `mmap`.
    pub cache_path: PathBuf,
}

impl TokenData {
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
        let stem = format!("{}-{}", &corpus.sha256[..16], &tokenizer_sha256[..16]);
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
            mmap,
            bytes_per_token,
            n_tokens,
            n_train,
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

    /// Token `i` of a split.
    fn token(&self, split: Split, i: usize) -> u32 {
        let i = match split {
            Split::Train => i,
            Split::Val => self.n_train + i,
        };
        let b = &self.mmap[i * self.bytes_per_token..(i + 1) * self.bytes_per_token];
        match self.bytes_per_token {
            2 => u16::from_le_bytes([b[0], b[1]]) as u32,
            _ => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
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
            for i in s..s + block_size {
                x.push(self.token(split, i));
                y.push(self.token(split, i + 1));
            }
        }
        let shape = (starts.len(), block_size);
        Ok((
            Tensor::from_vec(x, shape, device)?,
            Tensor::from_vec(y, shape, device)?,
        ))
    }
}

/// Splits text into pieces that tokenize independently: cuts only after a newline that is followed
/// by a non-whitespace character, where GPT-2's pre-tokenizer always ends a token anyway.
fn independent_chunks(text: &str, target: usize) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + target).min(text.len());
        while end < text.len() && !(bytes[end - 1] == b'\n' && bytes[end].is_ascii_graphic()) {
            end += 1;
        }
        chunks.push(&text[start..end]);
        start = end;
    }
    chunks
}

/// Tokenizes a whole corpus, in parallel chunks for Hugging Face tokenizers.
fn tokenize_corpus(text: &str, tokenizer: &Tokenizer) -> Result<Vec<u32>> {
    match tokenizer {
        Tokenizer::Byte => tokenizer.encode(text),
        Tokenizer::Hf(tok) => {
            let chunks = independent_chunks(text, 1 << 20);
            let encodings = tok
                .encode_batch_fast(chunks, false)
                .map_err(|e| anyhow::anyhow!("tokenization failed: {e}"))?;
            Ok(encodings
                .iter()
                .flat_map(|e| e.get_ids().iter().copied())
                .collect())
        }
    }
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
    fn chunks_cover_the_text_and_cut_only_before_a_line_start() {
        let text = "ab\n\ncd ef\n  gh\nij\n\n\nk";
        let chunks = independent_chunks(text, 3);
        assert_eq!(chunks.concat(), text);
        for c in &chunks[..chunks.len() - 1] {
            assert!(c.ends_with('\n'));
        }
        for c in &chunks[1..] {
            assert!(!c.starts_with(char::is_whitespace), "{chunks:?}");
        }
        assert_eq!(chunks, vec!["ab\n\n", "cd ef\n  gh\n", "ij\n\n\n", "k"]);
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
