//! Token files in the layouts the field already has on disk.
//!
//! - llm.c / modded-nanogpt shards (`dev/data/data_common.py` in llm.c): a 1,024-byte header of
//!   256 little-endian int32 — `[0]` magic, `[1]` version, `[2]` token count — then the tokens,
//!   little-endian: magic 20240520, version 1, uint16 tokens (GPT-2's vocabulary), or llm.c's
//!   llama-3 variant, magic 20240801, version 7, uint32 tokens.
//! - nanoGPT's `train.bin` / `val.bin` (`data/openwebtext/prepare.py`): headerless uint16.
//!
//! Read as uint16, an llm.c file starts with 55432, 308 (the low and high halves of its magic),
//! both above GPT-2's vocabulary, so a file with neither magic is taken as nanoGPT's layout.

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
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

/// A token file, memory-mapped and checked: its header (llm.c) and its size.
pub struct TokenFile {
    pub path: PathBuf,
    pub layout: FileLayout,
    pub width: TokenWidth,
    mmap: Mmap,
    /// Tokens in the file.
    len: usize,
}

impl TokenFile {
    /// Opens and checks `path`: an llm.c shard (magic, version, and size = header + count ×
    /// width), or else a nanoGPT `.bin` (an even number of bytes). Errors name the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path)
            .with_context(|| format!("cannot open token file {}", path.display()))?;
        // SAFETY: token files are written under a temporary name and renamed into place
        // (`prepare`); a file changed underneath a run is outside what we can defend against.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map token file {}", path.display()))?;
        let int =
            |i: usize| i32::from_le_bytes(mmap[4 * i..4 * i + 4].try_into().expect("4 bytes"));
        let size = mmap.len();
        if size >= 4 {
            if let Some(width) = TokenWidth::from_llmc_magic(int(0)) {
                if size < HEADER_BYTES {
                    bail!(
                        "token file {} has llm.c's magic but only {size} bytes (its header alone is {HEADER_BYTES})",
                        path.display()
                    );
                }
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
                return Ok(Self {
                    path: path.to_path_buf(),
                    layout: FileLayout::Llmc,
                    width,
                    mmap,
                    len: count as usize,
                });
            }
        }
        if size % 2 != 0 {
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
        let offset = match self.layout {
            FileLayout::Llmc => HEADER_BYTES,
            FileLayout::NanoGpt => 0,
        };
        let at = offset + i * self.width.bytes();
        let b = &self.mmap[at..at + self.width.bytes()];
        match self.width {
            TokenWidth::U16 => u16::from_le_bytes([b[0], b[1]]) as u32,
            TokenWidth::U32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_llmcs_and_its_magic_reads_as_two_out_of_vocabulary_u16() {
        let header = llmc_header(TokenWidth::U16, 7).unwrap();
        // The values llm.c's data_common.py writes, and the 55432, 308.
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
}
