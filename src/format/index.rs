//! The index: one fixed-size entry per stored (or explicitly zero) extent (docs/format.md, "index").

use super::{corrupt, le_u32, le_u64, FormatError, Hash, FORMAT_VERSION};

const MAGIC: &[u8; 8] = b"CAIRNIDX";
const HEADER_LEN: usize = 32;
const TRAILER_LEN: usize = 32;
pub const INDEX_ENTRY_LEN: usize = 72;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Zero = 0,
    Raw = 1,
    Zstd = 2,
}

impl EntryKind {
    fn from_u8(v: u8) -> Option<EntryKind> {
        match v {
            0 => Some(EntryKind::Zero),
            1 => Some(EntryKind::Raw),
            2 => Some(EntryKind::Zstd),
            _ => None,
        }
    }

    pub fn codec(self) -> Option<super::frame::Codec> {
        match self {
            EntryKind::Zero => None,
            EntryKind::Raw => Some(super::frame::Codec::Raw),
            EntryKind::Zstd => Some(super::frame::Codec::Zstd),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub offset: u64,
    pub length: u32,
    pub kind: EntryKind,
    pub segment: u32,
    pub stored_length: u32,
    pub segment_offset: u64,
    pub crc: u32,
    pub hash: Hash,
}

impl Entry {
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.length)
    }

    fn encode_into(&self, b: &mut [u8]) {
        b.fill(0);
        b[0..8].copy_from_slice(&self.offset.to_le_bytes());
        b[8..12].copy_from_slice(&self.length.to_le_bytes());
        b[12] = self.kind as u8;
        b[16..20].copy_from_slice(&self.segment.to_le_bytes());
        b[20..24].copy_from_slice(&self.stored_length.to_le_bytes());
        b[24..32].copy_from_slice(&self.segment_offset.to_le_bytes());
        b[32..36].copy_from_slice(&self.crc.to_le_bytes());
        b[40..72].copy_from_slice(&self.hash);
    }

    fn decode(b: &[u8]) -> Result<Self, FormatError> {
        let kind = EntryKind::from_u8(b[12])
            .ok_or_else(|| corrupt(format!("unknown entry kind {}", b[12])))?;
        Ok(Entry {
            offset: le_u64(b, 0),
            length: le_u32(b, 8),
            kind,
            segment: le_u32(b, 16),
            stored_length: le_u32(b, 20),
            segment_offset: le_u64(b, 24),
            crc: le_u32(b, 32),
            hash: b[40..72].try_into().expect("32 bytes"),
        })
    }
}

/// The geometry an index must be consistent with; taken from the (already checked) manifest.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub source_size: u64,
    pub block_size: u32,
    pub granule: u32,
    pub segments: u32,
}

impl Geometry {
    /// The divisions the entry checks make are defined (a manifest that passed validation always
    /// gives such a geometry; this guards every other caller).
    fn check(&self) -> Result<(), FormatError> {
        if !self.block_size.is_power_of_two()
            || !self.granule.is_power_of_two()
            || self.granule > self.block_size
        {
            return Err(corrupt(format!(
                "index geometry invalid: block size {}, granule {}",
                self.block_size, self.granule
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Index {
    pub entries: Vec<Entry>,
}

impl Index {
    pub fn encoded_len(entries: usize) -> u64 {
        (HEADER_LEN + TRAILER_LEN) as u64 + (entries as u64) * INDEX_ENTRY_LEN as u64
    }

    pub fn encode(&self) -> Vec<u8> {
        let n = self.entries.len();
        let mut b = vec![0u8; Self::encoded_len(n) as usize];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(INDEX_ENTRY_LEN as u32).to_le_bytes());
        b[16..24].copy_from_slice(&(n as u64).to_le_bytes());
        let crc = crc32fast::hash(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        for (i, e) in self.entries.iter().enumerate() {
            let at = HEADER_LEN + i * INDEX_ENTRY_LEN;
            e.encode_into(&mut b[at..at + INDEX_ENTRY_LEN]);
        }
        let body_end = b.len() - TRAILER_LEN;
        let h = blake3::hash(&b[..body_end]);
        b[body_end..].copy_from_slice(h.as_bytes());
        b
    }

    /// Parses and validates an index against the image geometry. Entry count and file length must
    /// agree before anything is allocated.
    pub fn decode(b: &[u8], geo: &Geometry) -> Result<Self, FormatError> {
        geo.check()?;
        if b.len() < HEADER_LEN + TRAILER_LEN {
            return Err(corrupt(format!(
                "index is {} bytes, shorter than its header",
                b.len()
            )));
        }
        if &b[0..8] != MAGIC {
            return Err(corrupt("not a cairn index (bad magic)"));
        }
        let version = le_u32(b, 8);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnknownVersion {
                found: version.into(),
            });
        }
        if crc32fast::hash(&b[0..28]) != le_u32(b, 28) {
            return Err(corrupt("index header checksum mismatch"));
        }
        if le_u32(b, 12) as usize != INDEX_ENTRY_LEN {
            return Err(corrupt(format!(
                "index entry size {} is not {INDEX_ENTRY_LEN}",
                le_u32(b, 12)
            )));
        }
        let n = le_u64(b, 16);
        let expected = n
            .checked_mul(INDEX_ENTRY_LEN as u64)
            .and_then(|x| x.checked_add((HEADER_LEN + TRAILER_LEN) as u64));
        if expected != Some(b.len() as u64) {
            return Err(corrupt(format!(
                "index says {n} entries but is {} bytes long (truncated or damaged)",
                b.len()
            )));
        }
        let body_end = b.len() - TRAILER_LEN;
        if blake3::hash(&b[..body_end]).as_bytes() != &b[body_end..] {
            return Err(corrupt("index checksum mismatch"));
        }
        let mut entries = Vec::with_capacity(n as usize);
        let mut prev_end = 0u64;
        for i in 0..n as usize {
            let at = HEADER_LEN + i * INDEX_ENTRY_LEN;
            let e = Entry::decode(&b[at..at + INDEX_ENTRY_LEN])?;
            validate_entry(&e, geo, prev_end)
                .map_err(|m| corrupt(format!("index entry {i}: {m}")))?;
            prev_end = e.end();
            entries.push(e);
        }
        Ok(Index { entries })
    }
}

fn validate_entry(e: &Entry, geo: &Geometry, prev_end: u64) -> Result<(), String> {
    let bs = u64::from(geo.block_size);
    let g = u64::from(geo.granule);
    if e.length == 0 || e.length > geo.block_size {
        return Err(format!("length {} out of range", e.length));
    }
    let end = e
        .offset
        .checked_add(u64::from(e.length))
        .ok_or("offset overflows")?;
    if end > geo.source_size {
        return Err(format!(
            "extent {}..{end} beyond source size {}",
            e.offset, geo.source_size
        ));
    }
    if e.offset < prev_end {
        return Err(format!(
            "extent at {} overlaps or is out of order",
            e.offset
        ));
    }
    if e.offset % g != 0 || (end % g != 0 && end != geo.source_size) {
        return Err(format!(
            "extent {}..{end} not aligned to the granule",
            e.offset
        ));
    }
    if e.offset / bs != (end - 1) / bs {
        return Err(format!(
            "extent {}..{end} crosses a block boundary",
            e.offset
        ));
    }
    match e.kind {
        EntryKind::Zero => {
            if e.stored_length != 0 || e.segment != 0 || e.segment_offset != 0 {
                return Err("zero extent with stored data".into());
            }
        }
        EntryKind::Raw | EntryKind::Zstd => {
            if e.segment >= geo.segments {
                return Err(format!("segment {} does not exist", e.segment));
            }
            if e.stored_length == 0 {
                return Err("stored extent with no payload".into());
            }
            if e.segment_offset < super::SEGMENT_HEADER_LEN as u64 {
                return Err(format!(
                    "frame at segment offset {}, inside the segment header",
                    e.segment_offset
                ));
            }
            if e.kind == EntryKind::Raw && e.stored_length != e.length {
                return Err("raw extent whose stored length differs from its length".into());
            }
            // cairn stores a zstd frame only when it is smaller than the plaintext; this also
            // bounds every allocation made for reading a payload by the block size.
            if e.kind == EntryKind::Zstd && e.stored_length >= e.length {
                return Err("zstd extent not smaller than its plaintext".into());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> Geometry {
        Geometry {
            source_size: 10 << 20,
            block_size: 1 << 20,
            granule: 64 << 10,
            segments: 2,
        }
    }

    fn entry(offset: u64, length: u32, kind: EntryKind) -> Entry {
        let stored = if kind == EntryKind::Zero { 0 } else { length };
        Entry {
            offset,
            length,
            kind,
            segment: u32::from(kind != EntryKind::Zero),
            stored_length: stored,
            segment_offset: if stored > 0 { 32 } else { 0 },
            crc: 5,
            hash: [9; 32],
        }
    }

    #[test]
    fn round_trip() {
        let idx = Index {
            entries: vec![
                entry(0, 1 << 20, EntryKind::Raw),
                entry(2 << 20, 64 << 10, EntryKind::Zero),
                entry(3 << 20, 128 << 10, EntryKind::Raw),
            ],
        };
        let b = idx.encode();
        assert_eq!(Index::decode(&b, &geo()).unwrap(), idx);
    }

    #[test]
    fn rejects_truncation_bitflips_and_bad_geometry() {
        let idx = Index {
            entries: vec![entry(0, 1 << 20, EntryKind::Raw)],
        };
        let b = idx.encode();
        assert!(Index::decode(&b[..b.len() - 1], &geo()).is_err());
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x10;
            assert!(Index::decode(&c, &geo()).is_err(), "flip at {i} accepted");
        }
        let crossing = Index {
            entries: vec![entry(960 << 10, 128 << 10, EntryKind::Raw)],
        };
        assert!(Index::decode(&crossing.encode(), &geo()).is_err());
        let beyond = Index {
            entries: vec![entry(10 << 20, 64 << 10, EntryKind::Raw)],
        };
        assert!(Index::decode(&beyond.encode(), &geo()).is_err());
        let overlap = Index {
            entries: vec![
                entry(0, 128 << 10, EntryKind::Raw),
                entry(64 << 10, 64 << 10, EntryKind::Raw),
            ],
        };
        assert!(Index::decode(&overlap.encode(), &geo()).is_err());
    }

    #[test]
    fn a_geometry_no_manifest_passes_is_an_error_not_a_division_by_zero() {
        let b = Index {
            entries: vec![entry(0, 64 << 10, EntryKind::Raw)],
        }
        .encode();
        for (block_size, granule) in [(1 << 20, 0), (0, 64 << 10), (0, 0), (64 << 10, 1 << 20)] {
            let g = Geometry {
                block_size,
                granule,
                ..geo()
            };
            let e = Index::decode(&b, &g).unwrap_err();
            assert!(e.to_string().contains("geometry"), "{e}");
        }
    }

    #[test]
    fn a_frame_inside_the_segment_header_is_refused() {
        let mut e = entry(0, 64 << 10, EntryKind::Raw);
        e.segment_offset = 31;
        let b = Index { entries: vec![e] }.encode();
        let err = Index::decode(&b, &geo()).unwrap_err();
        assert!(err.to_string().contains("segment header"), "{err}");
    }

    #[test]
    fn huge_entry_count_is_rejected_without_allocating() {
        let mut b = Index::default().encode();
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        let crc = crc32fast::hash(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        assert!(Index::decode(&b, &geo()).is_err());
    }
}
