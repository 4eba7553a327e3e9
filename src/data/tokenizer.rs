//! Tokenizers: GPT-2's byte-level BPE, raw bytes, and a byte-level BPE trained on the corpus.

use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

/// The Hugging Face repository whose `tokenizer.json` is GPT-2's.
pub const GPT2_REPO: &str = "openai-community/gpt2";

/// End-of-text marker shared by GPT-2 and our trained BPE.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// A tokenizer: text ↔ token ids.
pub enum Tokenizer {
    /// Each UTF-8 byte is a token (256 ids).
    Byte,
    /// A Hugging Face `tokenizers` tokenizer (GPT-2's, or one trained here).
    Hf(Box<tokenizers::Tokenizer>),
}

impl Tokenizer {
    /// GPT-2's tokenizer from `path`, else from the Hugging Face cache, else from the Hub
    /// (unless `HF_HUB_OFFLINE=1`).
    pub fn gpt2(path: Option<&Path>) -> Result<Self> {
        let file = match path {
            Some(p) => {
                if !p.is_file() {
                    bail!("tokenizer_path {} does not exist", p.display());
                }
                p.to_path_buf()
            }
            None => locate_gpt2_tokenizer()?,
        };
        Self::from_file(&file)
    }

    /// A `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let tok = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        Ok(Self::Hf(Box::new(tok)))
    }

    /// Trains a byte-level BPE of `vocab_size` tokens (256 byte tokens, `<|endoftext|>`, merges)
    /// on `text`, with GPT-2's pre-tokenization.
    pub fn train_bpe(text: &str, vocab_size: usize) -> Result<Self> {
        let mut tok = tokenizers::Tokenizer::new(BPE::default());
        tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tok.with_decoder(Some(ByteLevel::default()));
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(0)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
            .build()
            .into();
        tok.train(&mut trainer, text.split_inclusive('\n'))
            .map_err(|e| anyhow!("BPE training failed: {e}"))?;
        Ok(Self::Hf(Box::new(tok)))
    }

    /// Number of token ids.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Byte => 256,
            Self::Hf(t) => t.get_vocab_size(true),
        }
    }

    /// Token ids of `text` (special tokens such as `<|endoftext|>` map to their ids).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Self::Byte => Ok(text.bytes().map(u32::from).collect()),
            Self::Hf(t) => Ok(t
                .encode_fast(text, false)
                .map_err(|e| anyhow!("tokenization failed: {e}"))?
                .get_ids()
                .to_vec()),
        }
    }

    /// Text of `ids`; invalid UTF-8 (a cut multi-byte character) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Self::Byte => {
                let bytes: Vec<u8> = ids.iter().map(|&i| i.min(255) as u8).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Self::Hf(t) => t
                .decode(ids, false)
                .map_err(|e| anyhow!("decoding failed: {e}")),
        }
    }

    /// The tokenizer serialized as `tokenizer.json` (`"byte"` for the byte tokenizer).
    pub fn to_json(&self) -> Result<String> {
        match self {
            Self::Byte => Ok("byte".into()),
            Self::Hf(t) => t
                .to_string(false)
                .map_err(|e| anyhow!("cannot serialize tokenizer: {e}")),
        }
    }

    /// A content hash: two tokenizers with the same fingerprint give the same ids.
    pub fn fingerprint(&self) -> Result<String> {
        Ok(crate::fsutil::sha256_hex(self.to_json()?.as_bytes()))
    }
}

/// Finds GPT-2's `tokenizer.json` in the Hugging Face cache (`HF_HOME` / `HF_HUB_CACHE`), or
/// downloads it unless `HF_HUB_OFFLINE=1`.
fn locate_gpt2_tokenizer() -> Result<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    if let Some(path) = cache.model(GPT2_REPO.to_string()).get("tokenizer.json") {
        return Ok(path);
    }
    let hint = "set tokenizer_path (scripts/get_data.sh puts one in data/gpt2/tokenizer.json)";
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
    if offline {
        bail!("GPT-2 tokenizer not in the Hugging Face cache and HF_HUB_OFFLINE is set: {hint}");
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .context("cannot set up the Hugging Face hub client")?;
    api.model(GPT2_REPO.to_string())
        .get("tokenizer.json")
        .map_err(|e| anyhow!("GPT-2 tokenizer not in the Hugging Face cache and the Hub is unreachable ({e}): {hint}"))
}
