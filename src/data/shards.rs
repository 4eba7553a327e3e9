//! Token files in the layouts the field already has on disk.
//!
//! - llm.c / modded-nanogpt shards (`dev/data/data_common.py` in llm.c): a 1,024-byte header of
//!   256 little-endian int32 — `[0]` magic, `[1]` version, `[2]` token count — then the tokens,
//!   little-endian: magic 20240520, version 1, uint16 tokens (GPT-2's vocabulary), or llm.c's
//!   llama-3 variant, magic 20240801, version 7, uint32 tokens.
//! - nanoGPT's `train.bin` / `val.bin` (`data/openwebtext/prepare.py`): headerless uint16.
//!
//! The layout is never guessed from a file that could be either ([`DataFormat`]): a file with
//! llm.c's header, or with what looks like a damaged one, is read as llm.c's or refused; a
//! headerless file is read as nanoGPT's only under nanoGPT's names or with
//! `data_format = "nanogpt"`. Every id is checked against the vocabulary when a file is opened.

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Bytes of an llm.c header.
pub const HEADER_BYTES: usize = 1024;

/// How many bytes a token takes in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenWidth {
    U16,
    U32,
}

impl TokenWidth {
    /// The narrowest width that holds every id of a `vocab_size` vocabulary.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            Self::U16
        } else {
            Self::U32
        }
    }

    /// Bytes per token.
    pub fn bytes(self) -> usize {
        match self {
            Self::U16 => 2,
            Self::U32 => 4,
        }
    }

    /// llm.c's (magic, version) for shards of this width.
    pub fn llmc_magic_version(self) -> (i32, i32) {
        match self {
            Self::U16 => (20240520, 1),
            Self::U32 => (20240801, 7),
        }
    }

    fn from_llmc_magic(magic: i32) -> Option<Self> {
        [Self::U16, Self::U32]
            .into_iter()
            .find(|w| w.llmc_magic_version().0 == magic)
    }

    /// `id` as little-endian bytes of this width (the caller checked that it fits).
    pub fn append(self, id: u32, out: &mut Vec<u8>) {
        match self {
            Self::U16 => out.extend_from_slice(&(id as u16).to_le_bytes()),
            Self::U32 => out.extend_from_slice(&id.to_le_bytes()),
        }
    }
}

/// The llm.c header of a shard of `count` tokens.
pub fn llmc_header(width: TokenWidth, count: u64) -> Result<[u8; HEADER_BYTES]> {
    let Ok(count) = i32::try_from(count) else {
        bail!("an llm.c shard holds at most {} tokens (its header counts them in an int32), not {count}", i32::MAX);
    };
    let (magic, version) = width.llmc_magic_version();
    let mut header = [0u8; HEADER_BYTES];
    for (i, v) in [magic, version, count].into_iter().enumerate() {
        header[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    Ok(header)
}

/// Which layout a token file has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileLayout {
    /// llm.c's header, then the tokens.
    Llmc,
    /// nanoGPT's headerless uint16.
    NanoGpt,
}

/// The `data_format` key: how token files are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// llm.c's shards by their header; headerless files only as nanoGPT's `train.bin` and
    /// `val.bin`. A file whose first bytes resemble llm.c's header is refused unless the header
    /// is exact.
    #[default]
    Auto,
    /// Every file must be an llm.c shard.
    Llmc,
    /// Every file is nanoGPT's headerless uint16 (one with an exact llm.c header is refused).
    NanoGpt,
}

impl DataFormat {
    /// Whether this is the default (left out of saved configs, which keeps their hashes).
    pub fn is_auto(&self) -> bool {
        *self == DataFormat::Auto
    }
}

/// File names under which nanoGPT's `prepare.py` writes its headerless token files.
const NANOGPT_NAMES: [&str; 2] = ["train.bin", "val.bin"];

/// Flipped bits within which a file's first int32 counts as a damaged llm.c magic.
const MAGIC_NEAR_BITS: u32 = 4;

/// Whether a file without llm.c's exact magic still looks like an llm.c header: a first int32
/// within [`MAGIC_NEAR_BITS`] flipped bits of a magic, or llm.c's version with the header's
/// zero padding behind it. A nanoGPT file starting so would need GPT-2 ids within a few bits of
/// 55432 (outside the vocabulary) or 506 zero ids in a row.
fn resembles_llmc_header(bytes: &[u8]) -> bool {
    if bytes.len() < 12 {
        return false;
    }
    let int = |i: usize| i32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    let near_magic = [TokenWidth::U16, TokenWidth::U32]
        .iter()
        .any(|w| (int(0) ^ w.llmc_magic_version().0).count_ones() <= MAGIC_NEAR_BITS);
    let version_and_padding = bytes.len() >= HEADER_BYTES
        && [1, 7].contains(&int(1))
        && bytes[12..HEADER_BYTES].iter().all(|&b| b == 0);
    near_magic || version_and_padding
}

/// A token file, memory-mapped and checked: its layout, header and size, and every id against
/// the vocabulary.
pub struct TokenFile {
    pub path: PathBuf,
    pub layout: FileLayout,
    pub width: TokenWidth,
    mmap: Mmap,
    /// Tokens in the file.
    len: usize,
}

impl TokenFile {
    /// Opens and checks `path` as `format` says ([`DataFormat`]): an llm.c shard (magic,
    /// version, size = header + count × width), or nanoGPT's headerless uint16 (an even number
    /// of bytes); then every id against `vocab_size`. Errors name the file.
    pub fn open(path: &Path, format: DataFormat, vocab_size: usize) -> Result<Self> {
        let file = File::open(path)
            .with_context(|| format!("cannot open token file {}", path.display()))?;
        // SAFETY: token files are written under a temporary name and renamed into place
        // (`prepare`); a file changed underneath a run is outside what we can defend against.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map token file {}", path.display()))?;
        let magic = (mmap.len() >= 4)
            .then(|| i32::from_le_bytes(mmap[..4].try_into().expect("4 bytes")))
            .and_then(TokenWidth::from_llmc_magic);
        let named_as_nanogpt = path
            .file_name()
            .is_some_and(|n| NANOGPT_NAMES.iter().any(|name| n == *name));
        let token_file = match (format, magic) {
            (DataFormat::Auto | DataFormat::Llmc, Some(width)) => Self::llmc(path, mmap, width)?,
            (DataFormat::NanoGpt, Some(_)) => bail!(
                "token file {} starts with llm.c's header, but data_format = \"nanogpt\" says it has none",
                path.display()
            ),
            (DataFormat::Llmc, None) => bail!(
                "token file {} is not an llm.c shard: its first int32 is {}, not llm.c's magic 20240520 or 20240801",
                path.display(),
                first_int(&mmap)
            ),
            (DataFormat::Auto, None) if resembles_llmc_header(&mmap) => bail!(
                "token file {} has a damaged llm.c header (first int32 {}, llm.c's magic is 20240520 or 20240801); \
                 if it is nanoGPT's headerless layout, set data_format = \"nanogpt\"",
                path.display(),
                first_int(&mmap)
            ),
            (DataFormat::Auto, None) if !named_as_nanogpt => bail!(
                "token file {} has no llm.c header and is not named train.bin or val.bin; \
                 for nanoGPT's headerless uint16 layout set data_format = \"nanogpt\"",
                path.display()
            ),
            (DataFormat::Auto | DataFormat::NanoGpt, None) => Self::nanogpt(path, mmap)?,
        };
        token_file.check_vocabulary(vocab_size)?;
        Ok(token_file)
    }

    /// An llm.c shard whose magic says `width`: version and size checked.
    fn llmc(path: &Path, mmap: Mmap, width: TokenWidth) -> Result<Self> {
        let size = mmap.len();
        if size < HEADER_BYTES {
            bail!(
                "token file {} has llm.c's magic but only {size} bytes (its header alone is {HEADER_BYTES})",
                path.display()
            );
        }
        let int =
            |i: usize| i32::from_le_bytes(mmap[4 * i..4 * i + 4].try_into().expect("4 bytes"));
        let (magic, version) = width.llmc_magic_version();
        if int(1) != version {
            bail!(
                "token file {} has llm.c's magic {magic} but version {} (expected {version})",
                path.display(),
                int(1)
            );
        }
        let count = int(2);
        let expected = HEADER_BYTES as u64 + count.max(0) as u64 * width.bytes() as u64;
        if count < 0 || size as u64 != expected {
            bail!(
                "token file {} is {size} bytes, but its header counts {count} tokens of {} bytes \
                 ({expected} bytes with the header): truncated or damaged",
                path.display(),
                width.bytes()
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            layout: FileLayout::Llmc,
            width,
            mmap,
            len: count as usize,
        })
    }

    /// nanoGPT's headerless uint16.
    fn nanogpt(path: &Path, mmap: Mmap) -> Result<Self> {
        let size = mmap.len();
        if !size.is_multiple_of(2) {
            bail!(
                "token file {} has no llm.c header and an odd size ({size} bytes), so it is not nanoGPT's uint16 layout either",
                path.display()
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            layout: FileLayout::NanoGpt,
            width: TokenWidth::U16,
            mmap,
            len: size / 2,
        })
    }

    /// Refuses the file if any id is outside a `vocab_size` vocabulary, naming the first.
    /// One sequential pass over the tokens, in parallel over chunks.
    fn check_vocabulary(&self, vocab_size: usize) -> Result<()> {
        const CHUNK_TOKENS: usize = 1 << 20;
        let tokens = self.token_bytes();
        let width = self.width.bytes();
        let first_bad = tokens
            .par_chunks(CHUNK_TOKENS * width)
            .enumerate()
            .find_map_first(|(chunk, bytes)| {
                let position = match self.width {
                    TokenWidth::U16 => bytes
                        .chunks_exact(2)
                        .position(|b| u16::from_le_bytes([b[0], b[1]]) as usize >= vocab_size),
                    TokenWidth::U32 => bytes.chunks_exact(4).position(|b| {
                        u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize >= vocab_size
                    }),
                };
                position.map(|p| chunk * CHUNK_TOKENS + p)
            });
        if let Some(at) = first_bad {
            bail!(
                "token file {} holds id {} at token {at}, outside the tokenizer's vocabulary of {vocab_size}",
                self.path.display(),
                self.token(at)
            );
        }
        Ok(())
    }

    /// The bytes of the tokens, after any header.
    fn token_bytes(&self) -> &[u8] {
        let offset = match self.layout {
            FileLayout::Llmc => HEADER_BYTES,
            FileLayout::NanoGpt => 0,
        };
        &self.mmap[offset..offset + self.len * self.width.bytes()]
    }

    /// Tokens in the file.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the file holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Token `i` (< [`TokenFile::len`]).
    pub fn token(&self, i: usize) -> u32 {
        let width = self.width.bytes();
        let b = &self.token_bytes()[i * width..(i + 1) * width];
        match self.width {
            TokenWidth::U16 => u16::from_le_bytes([b[0], b[1]]) as u32,
            TokenWidth::U32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        }
    }
}

/// A file's first int32, for error messages (0 when it has fewer than 4 bytes).
fn first_int(bytes: &[u8]) -> i32 {
    bytes
        .get(..4)
        .map_or(0, |b| i32::from_le_bytes(b.try_into().expect("4 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_llmcs_and_its_magic_reads_as_two_out_of_vocabulary_u16() {
        let header = llmc_header(TokenWidth::U16, 7).unwrap();
        // The values llm.c's data_common.py writes; read as uint16 the magic is 55432, 308.
        assert_eq!(
            &header[..12],
            &[0x88, 0xd8, 0x34, 0x01, 1, 0, 0, 0, 7, 0, 0, 0]
        );
        assert_eq!(u16::from_le_bytes([header[0], header[1]]), 55432);
        assert_eq!(u16::from_le_bytes([header[2], header[3]]), 308);
        assert!(header[12..].iter().all(|&b| b == 0));
        let wide = llmc_header(TokenWidth::U32, 1).unwrap();
        assert_eq!(i32::from_le_bytes(wide[..4].try_into().unwrap()), 20240801);
        assert_eq!(i32::from_le_bytes(wide[4..8].try_into().unwrap()), 7);
        assert!(llmc_header(TokenWidth::U16, 1 << 31).is_err());
    }

    #[test]
    fn a_damaged_llmc_header_is_told_from_nanogpt_tokens() {
        let header = llmc_header(TokenWidth::U16, 7).unwrap();
        assert!(resembles_llmc_header(&header));
        for bit in 0..32 {
            let mut damaged = header;
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(resembles_llmc_header(&damaged), "bit {bit}");
        }
        // Five flipped bits of the magic: still the version and the zero padding.
        let mut far = header;
        far[0] ^= 0x1f;
        assert!(resembles_llmc_header(&far));
        // GPT-2 ids: the first two would have to be within 4 bits of 55432 and 308. These
        // start with ids 1, 0 where llm.c keeps its version, but ids follow, not zero padding.
        let mut ids = Vec::new();
        for id in [464u16, 3290, 1, 0, 50256, 13, 198, 0] {
            ids.extend_from_slice(&id.to_le_bytes());
        }
        ids.resize(4096, 0);
        assert!(!resembles_llmc_header(&ids));
        assert!(!resembles_llmc_header(&[0u8; 8]));
    }
}
