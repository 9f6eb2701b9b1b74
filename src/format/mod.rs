//! The on-disk image format (docs/format.md is its specification).
//!
//! This module only turns bytes into validated structures and back. It never opens devices and never
//! decides policy; the repository module owns files and directories.

pub mod badranges;
pub mod frame;
pub mod index;
pub mod manifest;
pub mod table;

pub use frame::{FrameHeader, SegmentHeader, FRAME_HEADER_LEN, SEGMENT_HEADER_LEN};
pub use index::{Entry, EntryKind, Index, IndexFile, IndexSummary, IndexWriter, INDEX_ENTRY_LEN};
pub use manifest::{ImageKind, Manifest, Method, SourceIdentity};
pub use table::{PartitionRecord, PartitionTableRecord, TableKind};

/// The format version this build writes (docs/format.md, "Version history").
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this build reads: version 1 repositories stay readable.
pub const MIN_FORMAT_VERSION: u32 = 1;

/// Whether this build reads files of format `version`.
pub fn known_version(version: u64) -> bool {
    (u64::from(MIN_FORMAT_VERSION)..=u64::from(FORMAT_VERSION)).contains(&version)
}

/// Default bytes per block: the unit read, hashed and compressed as one frame.
pub const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;
/// Bytes per granule: the change-tracking unit. 4 KiB, the page and filesystem block size, so an
/// incremental image stores what changed rather than the 64 KiB around it.
pub const GRANULE: u32 = 4 << 10;
/// The smallest granule a manifest may have (docs/format.md); cairn has never written less.
pub const MIN_GRANULE: u32 = 4 << 10;
pub const MIN_BLOCK_SIZE: u32 = 64 << 10;
pub const MAX_BLOCK_SIZE: u32 = 16 << 20;

/// A 32-byte BLAKE3 digest of a block's plaintext.
pub type Hash = [u8; 32];

/// Errors found while parsing repository data. Callers add the file and image context.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{0}")]
    Corrupt(String),
    #[error("unknown format version {found} (this cairn reads versions {MIN_FORMAT_VERSION} to {FORMAT_VERSION}); use a newer cairn")]
    UnknownVersion { found: u64 },
}

pub(crate) fn corrupt(msg: impl Into<String>) -> FormatError {
    FormatError::Corrupt(msg.into())
}

/// A manifest field outside its documented range: one line naming the field, its value and why.
pub(crate) fn invalid(field: &str, value: impl std::fmt::Display, why: &str) -> FormatError {
    FormatError::Corrupt(format!("{field} = {value}: {why}"))
}

/// Logical and physical sector sizes: a power of two from 512 to 64 KiB (the kernel's limits for a
/// logical block size).
pub const MIN_SECTOR_SIZE: u32 = 512;
pub const MAX_SECTOR_SIZE: u32 = 64 << 10;

pub(crate) fn check_sector_size(field: &str, v: u32) -> Result<(), FormatError> {
    if !v.is_power_of_two() || !(MIN_SECTOR_SIZE..=MAX_SECTOR_SIZE).contains(&v) {
        return Err(invalid(
            field,
            v,
            &format!("not a power of two from {MIN_SECTOR_SIZE} to {MAX_SECTOR_SIZE}"),
        ));
    }
    Ok(())
}

pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

pub fn hash_hex(h: &Hash) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn parse_hash_hex(s: &str) -> Option<Hash> {
    if s.len() != 64 || !s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

/// True when every byte is zero. Word-at-a-time; ~29 GB/s here.
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u128 has no invalid bit patterns, and align_to only yields the correctly aligned
        // middle part of the slice.
        unsafe { buf.align_to::<u128>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Validates an image id (a directory name taken from the repository).
pub fn valid_image_id(id: &str) -> bool {
    valid_token(id, 64, |c| {
        c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-'
    })
}

/// Validates a series name.
pub fn valid_name(name: &str) -> bool {
    valid_token(name, 128, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')
    })
}

fn valid_token(s: &str, max: usize, allowed: impl Fn(char) -> bool) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars().all(allowed)
}

/// File name of segment `n` inside an image directory.
pub fn segment_file_name(n: u32) -> String {
    format!("segment-{n:06}")
}

/// File name, in the repository's shared `segments/` directory, of segment `n` written by image
/// `origin` after that image was removed (docs/format.md, "Shared segments").
pub fn pooled_segment_file_name(origin: &str, n: u32) -> String {
    format!("{origin}.{n:06}")
}

/// File name of an image's index of generation `g` (0: written by a backup; more: rewritten by
/// prune, which never overwrites the file the published manifest names).
pub fn index_file_name(g: u32) -> String {
    match g {
        0 => "index".to_string(),
        g => format!("index.{g}"),
    }
}

/// File name of an image's unreadable ranges of generation `g` (as [`index_file_name`]).
pub fn bad_ranges_file_name(g: u32) -> String {
    match g {
        0 => badranges::FILE_NAME.to_string(),
        g => format!("{}.{g}", badranges::FILE_NAME),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_handles_unaligned_edges() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v[1..]));
        v[4098] = 1;
        assert!(!is_zero(&v[1..]));
        v[4098] = 0;
        v[1] = 1;
        assert!(!is_zero(&v[1..]));
    }

    #[test]
    fn ids_and_names() {
        assert!(valid_image_id("20261126T141500Z-2"));
        assert!(!valid_image_id("../etc"));
        assert!(!valid_image_id(".hidden"));
        assert!(!valid_image_id(""));
        assert!(valid_name("disk-wwn:0x5000c500"));
        assert!(!valid_name("a/b"));
    }

    #[test]
    fn hash_hex_round_trip() {
        let h = *blake3::hash(b"x").as_bytes();
        assert_eq!(parse_hash_hex(&hash_hex(&h)), Some(h));
        assert_eq!(parse_hash_hex("zz"), None);
    }
}
