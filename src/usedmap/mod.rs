//! Allocation-map readers: which byte ranges of a filesystem must be imaged (docs/used-blocks.md).
//!
//! Given the bytes of one filesystem (a partition, or a whole device or file that holds a filesystem
//! directly) and their size, [`probe`] recognises the filesystem and reads its own allocation map.
//! The answer is either the byte ranges that must be imaged — every block the map marks used, plus
//! all metadata whether the map marks it or not — or a refusal with a one-line reason. Any doubt
//! (a bad magic, a failing checksum, a journal or log that needs replay, an unknown incompatible
//! feature, a map that disagrees with the filesystem's own free counts) is a refusal: the caller then
//! images that filesystem block by block. Nothing here guesses.
//!
//! Everything read is untrusted: no input makes these readers panic, allocate without bound, or
//! return a range outside `0..size` (fuzz/fuzz_targets/usedmap.rs, and the proptest below).
//!
//! This module depends on nothing else in cairn: the backup hands it a [`ReadAt`] over the source.

mod btrfs;
mod exfat;
mod ext;
mod fat;
mod swap;
mod xfs;

use std::fmt;
use std::io;

/// Positional reads over a filesystem's bytes. Offsets are relative to the filesystem's start.
pub trait ReadAt {
    /// Fills `buf` from `offset`; a short read is an error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for std::fs::File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).ok().filter(|&s| s <= self.len());
        match start.and_then(|s| self.get(s..s.checked_add(buf.len())?)) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the buffer",
            )),
        }
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

/// What [`probe`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A recognised filesystem whose map was read and checked.
    Used(UsedMap),
    /// A recognised filesystem that must be imaged block by block, and why (one line).
    Refused { fs: &'static str, why: String },
    /// No filesystem this module reads (or none at all).
    Unknown,
}

/// The ranges of a filesystem that must be imaged; everything else is free space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsedMap {
    /// "ext2", "ext3", "ext4", "vfat" (FAT12/16/32), "exfat", "xfs", "btrfs", "swap".
    pub fs: &'static str,
    /// `(offset, length)` byte ranges: ascending, non-empty, disjoint and not adjacent, inside the
    /// source. Anything past the filesystem's own end (up to the source's size) is included.
    pub ranges: Vec<(u64, u64)>,
    /// One line for the user: the variant, block size, and any caveat.
    pub note: String,
}

impl UsedMap {
    /// Bytes that must be imaged.
    pub fn used_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.1).sum()
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Used(m) => write!(
                f,
                "{}: {} bytes used in {} ranges ({})",
                m.fs,
                m.used_bytes(),
                m.ranges.len(),
                m.note
            ),
            Verdict::Refused { fs, why } => write!(f, "{fs}: imaged block by block: {why}"),
            Verdict::Unknown => write!(f, "no known filesystem"),
        }
    }
}

/// Recognises the filesystem on `src` (`size` bytes) and reads its allocation map.
///
/// Two different filesystem signatures on the same bytes (a leftover of an older filesystem that
/// mkfs did not wipe) are a refusal: which one is live cannot be told without guessing.
pub fn probe(src: &dyn ReadAt, size: u64) -> Verdict {
    let disk = Disk { src, size };
    let detectors: [(&'static str, Detect, Reader); 6] = [
        ("ext", ext::detect, ext::read),
        ("xfs", xfs::detect, xfs::read),
        ("btrfs", btrfs::detect, btrfs::read),
        ("exfat", exfat::detect, exfat::read),
        ("vfat", fat::detect, fat::read),
        ("swap", swap::detect, swap::read),
    ];
    let found: Vec<_> = detectors
        .iter()
        .filter(|(_, detect, _)| detect(&disk))
        .collect();
    match found.as_slice() {
        [] => Verdict::Unknown,
        [(name, _, read)] => match read(&disk) {
            Ok(map) => Verdict::Used(finish(map, size)),
            Err(Doubt { fs, why }) => Verdict::Refused {
                fs: if fs.is_empty() { name } else { fs },
                why,
            },
        },
        many => {
            let names: Vec<&str> = many.iter().map(|(n, _, _)| *n).collect();
            Verdict::Refused {
                fs: many[0].0,
                why: format!(
                    "signatures of more than one filesystem ({}): which one is live is not known",
                    names.join(", ")
                ),
            }
        }
    }
}

type Detect = fn(&Disk) -> bool;
type Reader = fn(&Disk) -> Result<FsMap, Doubt>;

/// A reader's answer before the common clean-up: used ranges inside the filesystem and where the
/// filesystem ends (bytes from there to the source's end are imaged too).
struct FsMap {
    fs: &'static str,
    ranges: Ranges,
    fs_end: u64,
    note: String,
}

fn finish(map: FsMap, size: u64) -> UsedMap {
    let FsMap {
        fs,
        mut ranges,
        fs_end,
        note,
    } = map;
    if fs_end < size {
        ranges.add(fs_end, size - fs_end);
    }
    UsedMap {
        fs,
        ranges: ranges.finish(size),
        note,
    }
}

/// Why a filesystem is imaged block by block. `fs` may be left empty for the detector's name.
#[derive(Debug)]
struct Doubt {
    fs: &'static str,
    why: String,
}

fn doubt<T>(fs: &'static str, why: impl Into<String>) -> Result<T, Doubt> {
    Err(Doubt {
        fs,
        why: why.into(),
    })
}

/// Larger single reads than this come from a corrupt field, never from a real filesystem's
/// structure (the readers stream bitmaps in pieces of at most this size).
const MAX_READ: u64 = 16 << 20;

/// The source with bounds checks: a read outside `0..size` or larger than [`MAX_READ`] is a doubt,
/// never an allocation or a panic.
struct Disk<'a> {
    src: &'a dyn ReadAt,
    size: u64,
}

impl Disk<'_> {
    fn read(&self, fs: &'static str, offset: u64, len: u64, what: &str) -> Result<Vec<u8>, Doubt> {
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > self.size) {
            return doubt(
                fs,
                format!(
                    "{what} at byte {offset} (+{len}) lies past the end of the source ({} bytes)",
                    self.size
                ),
            );
        }
        if len > MAX_READ {
            return doubt(
                fs,
                format!("{what} at byte {offset} is implausibly large ({len} bytes)"),
            );
        }
        let mut buf = vec![0u8; len as usize];
        if let Err(e) = self.src.read_exact_at(&mut buf, offset) {
            return doubt(fs, format!("reading {what} at byte {offset}: {e}"));
        }
        Ok(buf)
    }

    /// For detectors: `len` bytes at `offset`, or `None` when they cannot be read.
    fn peek(&self, offset: u64, len: usize) -> Option<Vec<u8>> {
        if offset.checked_add(len as u64)? > self.size {
            return None;
        }
        let mut buf = vec![0u8; len];
        self.src.read_exact_at(&mut buf, offset).ok()?;
        Some(buf)
    }
}

/// When more ranges than this pile up, neighbours closer than a growing gap are merged: the used
/// set only grows (never unsafe), and memory stays bounded on a badly fragmented 16 TiB filesystem.
const MAX_RANGES: usize = 1 << 22;

/// A used-range accumulator. Ranges may come in any order and overlap; appends that touch the last
/// range extend it, so a bitmap streamed in ascending order costs one entry per used run.
struct Ranges {
    v: Vec<(u64, u64)>,
    /// Gaps shorter than this are absorbed (0 until [`MAX_RANGES`] is hit).
    gap: u64,
    limit: usize,
}

impl Ranges {
    fn new() -> Ranges {
        Ranges {
            v: Vec::new(),
            gap: 0,
            limit: MAX_RANGES,
        }
    }

    fn add(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = offset.saturating_add(len);
        if let Some(last) = self.v.last_mut() {
            let last_end = last.0.saturating_add(last.1);
            if offset >= last.0 && offset <= last_end.saturating_add(self.gap) {
                last.1 = end.max(last_end) - last.0;
                return;
            }
        }
        self.v.push((offset, end - offset));
        if self.v.len() > self.limit {
            self.compact();
        }
    }

    /// Sorts and merges; while still over half the limit, doubles the absorbed gap.
    fn compact(&mut self) {
        self.merge();
        while self.v.len() > self.limit / 2 {
            self.gap = (self.gap * 2).max(4096);
            self.merge();
        }
    }

    fn merge(&mut self) {
        self.v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(self.v.len());
        for &(o, l) in &self.v {
            let end = o.saturating_add(l);
            if let Some(last) = out.last_mut() {
                let last_end = last.0 + last.1;
                if o <= last_end.saturating_add(self.gap) {
                    last.1 = end.max(last_end) - last.0;
                    continue;
                }
            }
            out.push((o, end - o));
        }
        self.v = out;
    }

    /// Sorted, merged (adjacent ranges too), clipped to `0..size`.
    fn finish(mut self, size: u64) -> Vec<(u64, u64)> {
        self.merge();
        self.v
            .into_iter()
            .filter(|&(o, _)| o < size)
            .map(|(o, l)| (o, l.min(size - o)))
            .filter(|&(_, l)| l > 0)
            .collect()
    }
}

/// Runs of set bits in `bits` (bit `i` is `bits[i / 8] >> (i % 8) & 1`, the order of every map
/// here), limited to the first `count` bits, as `(first, len)` in bit numbers.
fn set_runs(bits: &[u8], count: u64, mut emit: impl FnMut(u64, u64)) {
    let count = count.min(bits.len() as u64 * 8);
    let mut i = 0u64;
    while i < count {
        let byte = bits[(i / 8) as usize];
        // Whole bytes of zeros or ones are the common case: skip them eight bits at a time.
        if i % 8 == 0 && i + 8 <= count && byte == 0 {
            i += 8;
            continue;
        }
        if byte >> (i % 8) & 1 == 0 {
            i += 1;
            continue;
        }
        let start = i;
        while i < count {
            let b = bits[(i / 8) as usize];
            if i % 8 == 0 && i + 8 <= count && b == 0xff {
                i += 8;
            } else if b >> (i % 8) & 1 == 1 {
                i += 1;
            } else {
                break;
            }
        }
        emit(start, i - start);
    }
}

/// Linux's crc32c(seed, data) as ext4, jbd2 and xfs call it: no inversion on entry or exit
/// (the `crc32c` crate inverts both, so undo it).
fn crc32c_raw(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

fn le16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}
fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}
fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).map_or(0, |s| {
        u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]])
    })
}
fn be16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |s| u16::from_be_bytes([s[0], s[1]]))
}
fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}
fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).map_or(0, |s| {
        u64::from_be_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_merge_and_clip() {
        let mut r = Ranges::new();
        r.add(100, 10);
        r.add(110, 5);
        r.add(0, 50);
        r.add(40, 20);
        r.add(200, 1000);
        assert_eq!(r.finish(500), vec![(0, 60), (100, 15), (200, 300)]);
    }

    #[test]
    fn ranges_stay_bounded_and_only_grow() {
        let mut r = Ranges::new();
        r.limit = 64;
        for i in 0..10_000u64 {
            r.add(i * 8192, 512);
        }
        assert!(r.v.len() <= 64);
        let out = r.finish(u64::MAX);
        for i in 0..10_000u64 {
            let (o, l) = (i * 8192, 512);
            assert!(
                out.iter().any(|&(ro, rl)| ro <= o && o + l <= ro + rl),
                "{o} lost"
            );
        }
    }

    #[test]
    fn set_runs_finds_every_run() {
        let bits = [0b1000_0110u8, 0xff, 0x01, 0x00, 0x80];
        let mut runs = Vec::new();
        set_runs(&bits, 40, |s, l| runs.push((s, l)));
        assert_eq!(runs, vec![(1, 2), (7, 10), (39, 1)]);
        runs.clear();
        set_runs(&bits, 12, |s, l| runs.push((s, l)));
        assert_eq!(runs, vec![(1, 2), (7, 5)]);
    }

    #[test]
    fn crc32c_raw_matches_linux() {
        // crc32c("123456789") = 0xE3069283 with the usual inversions.
        assert_eq!(!crc32c_raw(!0, b"123456789"), 0xE306_9283);
    }

    /// Random bytes, and random bytes behind each known magic, never panic and never yield a range
    /// outside the source.
    fn check(bytes: &[u8]) {
        let size = bytes.len() as u64;
        if let Verdict::Used(m) = probe(&bytes, size) {
            let mut prev_end = None;
            for &(o, l) in &m.ranges {
                assert!(l > 0 && o + l <= size, "range {o}+{l} outside {size}");
                if let Some(p) = prev_end {
                    assert!(o > p, "ranges not ascending and disjoint");
                }
                prev_end = Some(o + l);
            }
        }
    }

    /// Stamps the magic of one filesystem (picked by `which`) into random bytes, so that the
    /// readers past the detectors are exercised, not only the detectors.
    fn stamp(bytes: &mut [u8], which: u8) {
        let mut put = |at: usize, m: &[u8]| {
            if bytes.len() >= at + m.len() {
                bytes[at..at + m.len()].copy_from_slice(m);
            }
        };
        match which % 8 {
            0 => put(1080, &[0x53, 0xef]),
            1 => put(0, b"XFSB"),
            2 => put(65536 + 64, b"_BHRfS_M"),
            3 => put(3, b"EXFAT   "),
            4 => {
                put(0, &[0xeb, 0x3c, 0x90]);
                put(11, &[0, 2, 1, 1, 0, 2]);
                put(510, &[0x55, 0xaa]);
            }
            5 => put(4096 - 10, b"SWAPSPACE2"),
            _ => {}
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn random_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..80_000), which in any::<u8>()) {
            stamp(&mut bytes, which);
            check(&bytes);
        }
    }
}
