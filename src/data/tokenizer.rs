//! Tokenizers: GPT-2's byte-level BPE, raw bytes, and a byte-level BPE trained on the corpus.
//!
//! Hugging Face `tokenizers` loads, trains, serializes and decodes them. Encoding, the hot path of
//! `prepare` and of the token cache, goes through tiktoken's rank-ordered BPE (`tiktoken-rs`)
//! where that gives the same ids, which is checked on the `tokenizer.json` itself
//! (`RankedBpe::from_json`); `GPT_PRETRAIN_RANKED_BPE=0` keeps every encoding on `tokenizers`.

use anyhow::{anyhow, bail, Context, Result};
use rustc_hash::FxHashMap;
use std::collections::HashMap;
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
    Hf(Box<HfTokenizer>),
}

/// A Hugging Face tokenizer and, where it gives the same ids, its rank-ordered encoder.
pub struct HfTokenizer {
    hf: tokenizers::Tokenizer,
    ranked: Option<RankedBpe>,
}

impl HfTokenizer {
    fn new(hf: tokenizers::Tokenizer) -> Result<Self> {
        let enabled = std::env::var("GPT_PRETRAIN_RANKED_BPE").map_or(true, |v| v != "0");
        let ranked = if enabled {
            let json = hf
                .to_string(false)
                .map_err(|e| anyhow!("cannot serialize tokenizer: {e}"))?;
            RankedBpe::from_json(&json).ok()
        } else {
            None
        };
        Ok(Self { hf, ranked })
    }
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
        Ok(Self::Hf(Box::new(HfTokenizer::new(tok)?)))
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
        Ok(Self::Hf(Box::new(HfTokenizer::new(tok)?)))
    }

    /// Number of token ids.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Byte => 256,
            Self::Hf(t) => t.hf.get_vocab_size(true),
        }
    }

    /// Token ids of `text` (special tokens such as `<|endoftext|>` map to their ids).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Self::Byte => Ok(text.bytes().map(u32::from).collect()),
            Self::Hf(t) => match &t.ranked {
                Some(ranked) => Ok(ranked.encode(text)),
                None => self.encode_with_tokenizers(text),
            },
        }
    }

    /// Token ids of `text` from Hugging Face `tokenizers` itself, whichever encoder
    /// [`Tokenizer::encode`] uses: the reference the rank-ordered encoder is held to.
    pub fn encode_with_tokenizers(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Self::Byte => self.encode(text),
            Self::Hf(t) => Ok(t
                .hf
                .encode_fast(text, false)
                .map_err(|e| anyhow!("tokenization failed: {e}"))?
                .get_ids()
                .to_vec()),
        }
    }

    /// Which code encodes: `bytes`, `tiktoken-rs` (rank-ordered BPE) or `tokenizers`.
    pub fn encoder_name(&self) -> &'static str {
        match self {
            Self::Byte => "bytes",
            Self::Hf(t) if t.ranked.is_some() => "tiktoken-rs",
            Self::Hf(_) => "tokenizers",
        }
    }

    /// The id of a token given as its text (`<|endoftext|>`, say); the byte tokenizer has none.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match self {
            Self::Byte => None,
            Self::Hf(t) => t.hf.token_to_id(token),
        }
    }

    /// Text of `ids`; invalid UTF-8 (a cut multi-byte character) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Self::Byte => {
                let bytes: Vec<u8> = ids.iter().map(|&i| i.min(255) as u8).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Self::Hf(t) => {
                t.hf.decode(ids, false)
                    .map_err(|e| anyhow!("decoding failed: {e}"))
            }
        }
    }

    /// The tokenizer serialized as `tokenizer.json` (`"byte"` for the byte tokenizer).
    pub fn to_json(&self) -> Result<String> {
        match self {
            Self::Byte => Ok("byte".into()),
            Self::Hf(t) => {
                t.hf.to_string(false)
                    .map_err(|e| anyhow!("cannot serialize tokenizer: {e}"))
            }
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

/// A byte-level BPE encoded by merge rank (tiktoken's algorithm: `tiktoken-rs`'s
/// `byte_pair_split`) instead of by `tokenizers`' merge loop, after GPT-2's pre-tokenization done
/// with the `regex` crate's automata rather than a backtracking engine. The same ids, several
/// times faster. Built only for a `tokenizer.json` whose structure the two algorithms agree on
/// (see [`RankedBpe::from_json`]).
struct RankedBpe {
    /// Token bytes → id, special tokens excluded.
    ranks: FxHashMap<Vec<u8>, u32>,
    /// Finds the special tokens, which are split out of the text before pre-tokenization.
    special_matcher: aho_corasick::AhoCorasick,
    /// The id of each of `special_matcher`'s patterns.
    special_ids: Vec<u32>,
    /// GPT-2's pre-tokenization without its lookahead ([`RankedBpe::next_piece`] restores it).
    pieces: regex::Regex,
}

/// GPT-2's pre-tokenization pattern (`tokenizers`' ByteLevel with `use_regex`, tiktoken's `gpt2`)
/// without the lookahead of its `\s+(?!\S)` alternative, which automata cannot express; see
/// [`RankedBpe::next_piece`] for how it is restored.
const GPT2_PATTERN_WITHOUT_LOOKAHEAD: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";

impl RankedBpe {
    /// Ranks for `json` (a serialized `tokenizer.json`), or why they cannot reproduce its ids:
    /// it must be a plain byte-level BPE (no normalizer, GPT-2's regex without an added prefix
    /// space, no dropout, unknown token, affixes or byte fallback), its added tokens plain
    /// specials, every byte a token, and each merge's result a token whose id grows with the merge's
    /// position, so that "lowest id first" merges in the same order as "earliest merge first".
    fn from_json(json: &str) -> std::result::Result<Self, String> {
        let t: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let model = &t["model"];
        if model["type"] != "BPE" {
            return Err(format!("model type {}", model["type"]));
        }
        let empty = |v: &serde_json::Value| v.is_null() || v == "" || v == false;
        for key in [
            "dropout",
            "unk_token",
            "continuing_subword_prefix",
            "end_of_word_suffix",
            "byte_fallback",
        ] {
            if !empty(&model[key]) {
                return Err(format!("model.{key} = {}", model[key]));
            }
        }
        if !t["normalizer"].is_null() {
            return Err("a normalizer".into());
        }
        let pre = &t["pre_tokenizer"];
        if pre["type"] != "ByteLevel"
            || pre["add_prefix_space"] != false
            || pre["use_regex"] != true
        {
            return Err(format!("pre_tokenizer {pre}"));
        }
        let byte_of: HashMap<char, u8> = (0..=255u8).map(|b| (byte_level_char(b), b)).collect();
        let bytes_of = |token: &str| -> std::result::Result<Vec<u8>, String> {
            token
                .chars()
                .map(|c| {
                    byte_of
                        .get(&c)
                        .copied()
                        .ok_or_else(|| format!("token {token:?} is not byte-level"))
                })
                .collect()
        };
        let vocab = model["vocab"].as_object().ok_or("no model.vocab")?;
        let mut ranks: FxHashMap<Vec<u8>, u32> = FxHashMap::default();
        for (token, id) in vocab {
            let id = id.as_u64().ok_or("a non-integer id")? as u32;
            ranks.insert(bytes_of(token)?, id);
        }
        if let Some(missing) = (0..=255u8).find(|b| !ranks.contains_key(&vec![*b])) {
            return Err(format!("byte {missing} has no token"));
        }
        let merges = model["merges"].as_array().ok_or("no model.merges")?;
        let mut last = 0u32;
        for merge in merges {
            let (a, b) = match merge {
                serde_json::Value::String(s) => {
                    s.split_once(' ').ok_or("a merge without a space")?
                }
                serde_json::Value::Array(p) if p.len() == 2 => (
                    p[0].as_str().ok_or("a merge part that is not a string")?,
                    p[1].as_str().ok_or("a merge part that is not a string")?,
                ),
                _ => return Err("a malformed merge".into()),
            };
            let merged = [bytes_of(a)?, bytes_of(b)?].concat();
            let id = *ranks
                .get(&merged)
                .ok_or_else(|| format!("merge {a} {b} makes no token"))?;
            if id <= last {
                return Err(format!(
                    "merge {a} {b} makes id {id}, not above the previous merge's {last}"
                ));
            }
            last = id;
        }
        let mut specials: Vec<(String, u32)> = Vec::new();
        for added in t["added_tokens"].as_array().into_iter().flatten() {
            if added["special"] != true
                || added["lstrip"] == true
                || added["rstrip"] == true
                || added["single_word"] == true
            {
                return Err(format!("added token {added}"));
            }
            let content = added["content"]
                .as_str()
                .ok_or("an added token without content")?;
            let id = added["id"].as_u64().ok_or("an added token without an id")? as u32;
            ranks.retain(|_, r| *r != id);
            specials.push((content.to_string(), id));
        }
        let pieces =
            regex::Regex::new(GPT2_PATTERN_WITHOUT_LOOKAHEAD).map_err(|e| e.to_string())?;
        // Leftmost, then longest: `tokenizers`' added-token matching.
        let special_matcher = aho_corasick::AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(specials.iter().map(|(s, _)| s))
            .map_err(|e| e.to_string())?;
        Ok(Self {
            ranks,
            special_ids: specials.into_iter().map(|(_, id)| id).collect(),
            special_matcher,
            pieces,
        })
    }

    fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3);
        let mut at = 0;
        for special in self.special_matcher.find_iter(text) {
            self.encode_ordinary(&text[at..special.start()], &mut ids);
            ids.push(self.special_ids[special.pattern().as_usize()]);
            at = special.end();
        }
        self.encode_ordinary(&text[at..], &mut ids);
        ids
    }

    fn encode_ordinary(&self, text: &str, ids: &mut Vec<u32>) {
        let mut at = 0;
        while at < text.len() {
            let end = self.next_piece(text, at);
            let piece = &text.as_bytes()[at..end];
            match self.ranks.get(piece) {
                Some(&id) => ids.push(id),
                None => ids.extend(
                    tiktoken_rs::byte_pair_split(piece, &self.ranks)
                        .into_iter()
                        .map(|part| self.ranks[part]),
                ),
            }
            at = end;
        }
    }

    /// The end of the pre-tokenization piece that starts at `at`. The pattern without lookahead
    /// takes a whole run of whitespace where `\s+(?!\S)` takes all of it but its last character
    /// when a non-space follows and the run is longer than one character (that last character
    /// then starts the next piece, " word" say); a run at the end of the text, or of one
    /// character, is whole in both.
    fn next_piece(&self, text: &str, at: usize) -> usize {
        let found = self
            .pieces
            .find_at(text, at)
            .expect("the pattern matches every character");
        debug_assert_eq!(found.start(), at);
        let piece = found.as_str();
        let longer_than_one = piece.chars().nth(1).is_some();
        if found.end() < text.len() && longer_than_one && piece.chars().all(char::is_whitespace) {
            let (last, _) = piece.char_indices().next_back().expect("not empty");
            return at + last;
        }
        found.end()
    }
}

/// GPT-2's byte → unicode table (`bytes_to_unicode`): printable bytes map to themselves, the rest
/// to 256 + n in order.
pub fn byte_level_char(b: u8) -> char {
    let printable = |c: u8| {
        (b'!'..=b'~').contains(&c) || (0xA1..=0xAC).contains(&c) || (0xAE..=0xFF).contains(&c)
    };
    if printable(b) {
        return b as char;
    }
    let n = (0..b).filter(|&c| !printable(c)).count() as u32;
    char::from_u32(256 + n).expect("valid char")
}
