//! The index: one fixed-size entry per stored (or explicitly zero) extent (docs/format.md, "index").

use super::{corrupt, known_version, le_u32, le_u64, FormatError, Hash, FORMAT_VERSION};

const MAGIC: &[u8; 8] = b"CAIRNIDX";
const HEADER_LEN: usize = 32;
const TRAILER_LEN: usize = 32;
pub const INDEX_ENTRY_LEN: usize = 72;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Zero,
    Raw,
    Zstd,
    /// Format 2: the extent is a window of a stored frame that holds more (a frame whose other
    /// parts a newer image replaced, carried over by prune without decoding it). The entry's
    /// `stored_length`, `crc`, `segment_offset` and `hash` are the whole frame's.
    Window(Window),
}

/// Where an extent lies in the stored frame it is a window of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub codec: super::frame::Codec,
    /// Bytes of the frame's plaintext before the extent (a multiple of [`WINDOW_SKIP_UNIT`]).
    pub skip: u32,
    /// The frame's plaintext length.
    pub frame_length: u32,
}

/// The unit the index stores a window's skip in (the smallest granule): skips are granule
/// aligned, so 16 bits of it reach past the largest block.
pub const WINDOW_SKIP_UNIT: u32 = super::MIN_GRANULE;
const FLAG_WINDOW: u8 = 1;

impl EntryKind {
    /// The kind of an entry whose extent is a whole frame stored with `codec`.
    pub fn stored(codec: super::frame::Codec) -> EntryKind {
        match codec {
            super::frame::Codec::Zstd => EntryKind::Zstd,
            super::frame::Codec::Raw => EntryKind::Raw,
        }
    }

    fn code(self) -> u8 {
        match self {
            EntryKind::Zero => 0,
            EntryKind::Raw => 1,
            EntryKind::Zstd => 2,
            EntryKind::Window(w) => w.codec as u8,
        }
    }

    pub fn codec(self) -> Option<super::frame::Codec> {
        match self {
            EntryKind::Zero => None,
            EntryKind::Raw => Some(super::frame::Codec::Raw),
            EntryKind::Zstd => Some(super::frame::Codec::Zstd),
            EntryKind::Window(w) => Some(w.codec),
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

    /// The source offset and plaintext length of the stored frame the entry reads: the extent
    /// itself, or for a window the whole frame it lies in.
    pub fn frame_span(&self) -> (u64, u32) {
        match self.kind {
            EntryKind::Window(w) => (self.offset - u64::from(w.skip), w.frame_length),
            _ => (self.offset, self.length),
        }
    }

    fn encode_into(&self, b: &mut [u8]) {
        b.fill(0);
        b[0..8].copy_from_slice(&self.offset.to_le_bytes());
        b[8..12].copy_from_slice(&self.length.to_le_bytes());
        b[12] = self.kind.code();
        if let EntryKind::Window(w) = self.kind {
            b[13] = FLAG_WINDOW;
            b[14..16].copy_from_slice(&((w.skip / WINDOW_SKIP_UNIT) as u16).to_le_bytes());
            b[36..40].copy_from_slice(&w.frame_length.to_le_bytes());
        }
        b[16..20].copy_from_slice(&self.segment.to_le_bytes());
        b[20..24].copy_from_slice(&self.stored_length.to_le_bytes());
        b[24..32].copy_from_slice(&self.segment_offset.to_le_bytes());
        b[32..36].copy_from_slice(&self.crc.to_le_bytes());
        b[40..72].copy_from_slice(&self.hash);
    }

    fn decode(b: &[u8]) -> Result<Self, FormatError> {
        use super::frame::Codec;
        let skip = u32::from(u16::from_le_bytes([b[14], b[15]])) * WINDOW_SKIP_UNIT;
        let frame_length = le_u32(b, 36);
        let kind = match (b[12], b[13]) {
            (_, 0) if skip != 0 || frame_length != 0 => {
                return Err(corrupt("index entry with nonzero reserved bytes"))
            }
            (0, 0) => EntryKind::Zero,
            (1, 0) => EntryKind::Raw,
            (2, 0) => EntryKind::Zstd,
            (c @ (1 | 2), FLAG_WINDOW) => EntryKind::Window(Window {
                codec: Codec::from_u8(c).expect("1 or 2"),
                skip,
                frame_length,
            }),
            (k, 0 | FLAG_WINDOW) => return Err(corrupt(format!("unknown entry kind {k}"))),
            (_, f) => return Err(corrupt(format!("unknown entry flags {f}"))),
        };
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

    /// The whole index in memory (tests and fuzzing; backups stream it with [`IndexWriter`]).
    pub fn encode(&self) -> Vec<u8> {
        let n = self.entries.len();
        let mut b = Vec::with_capacity(Self::encoded_len(n) as usize);
        b.extend_from_slice(&header(n as u64));
        for e in &self.entries {
            let mut eb = [0u8; INDEX_ENTRY_LEN];
            e.encode_into(&mut eb);
            b.extend_from_slice(&eb);
        }
        let h = blake3::hash(&b);
        b.extend_from_slice(h.as_bytes());
        b
    }

    /// Parses and validates a whole index held in memory, with the checks [`IndexFile::open`]
    /// makes. Entry count and length must agree before anything is allocated.
    pub fn decode(b: &[u8], geo: &Geometry) -> Result<Self, FormatError> {
        geo.check()?;
        let mut entries = Vec::new();
        check_stream(b, b.len() as u64, geo, |e| entries.push(e))?;
        Ok(Index { entries })
    }
}

/// Entries per chunk of the read cache (9 KiB).
const CHUNK_ENTRIES: u64 = 128;
/// Chunks kept per open index: the planner's cursor and the readers behind it stay within a few
/// chunks of each other, and a chain of thousands of images stays within a few tens of MiB.
const CACHED_CHUNKS: usize = 2;

/// Writes an index front to back as a backup runs, so no image's entries are ever all in memory:
/// a header whose count is patched in at the end, the entries, and the BLAKE3 trailer.
pub struct IndexWriter {
    out: std::io::BufWriter<std::fs::File>,
    count: u64,
    prev_end: u64,
}

/// What the manifest records about a finished index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexSummary {
    pub entries: u64,
    pub size: u64,
    /// BLAKE3 of the whole file.
    pub blake3: Hash,
}

fn header(count: u64) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(INDEX_ENTRY_LEN as u32).to_le_bytes());
    b[16..24].copy_from_slice(&count.to_le_bytes());
    let crc = crc32fast::hash(&b[0..28]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    b
}

impl IndexWriter {
    /// Starts an index in `file` (empty, opened for reading and writing).
    pub fn new(file: std::fs::File) -> std::io::Result<Self> {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        std::io::Write::write_all(&mut out, &header(0))?;
        Ok(IndexWriter {
            out,
            count: 0,
            prev_end: 0,
        })
    }

    /// Appends one entry; entries come in ascending, non-overlapping order.
    pub fn push(&mut self, e: &Entry) -> std::io::Result<()> {
        if e.offset < self.prev_end {
            return Err(std::io::Error::other(format!(
                "index entry at {} after one ending at {} (out of order)",
                e.offset, self.prev_end
            )));
        }
        let mut b = [0u8; INDEX_ENTRY_LEN];
        e.encode_into(&mut b);
        std::io::Write::write_all(&mut self.out, &b)?;
        self.prev_end = e.end();
        self.count += 1;
        Ok(())
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Patches the count into the header and appends the trailer: the body is read back once to
    /// hash it (the header, which the hash covers, is only known now). Returns the file and what
    /// the manifest records; the caller fsyncs.
    pub fn finish(self) -> std::io::Result<(std::fs::File, IndexSummary)> {
        use std::os::unix::fs::FileExt;
        let count = self.count;
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.write_all_at(&header(count), 0)?;
        let body_len = HEADER_LEN as u64 + count * INDEX_ENTRY_LEN as u64;
        let mut body = blake3::Hasher::new();
        let mut whole = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        while at < body_len {
            let n = ((body_len - at) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..n], at)?;
            body.update(&buf[..n]);
            whole.update(&buf[..n]);
            at += n as u64;
        }
        let trailer = *body.finalize().as_bytes();
        file.write_all_at(&trailer, body_len)?;
        whole.update(&trailer);
        Ok((
            file,
            IndexSummary {
                entries: count,
                size: body_len + TRAILER_LEN as u64,
                blake3: *whole.finalize().as_bytes(),
            },
        ))
    }
}

/// Checks an index read front to back in bounded memory: header, length, every entry against
/// the geometry and its predecessor, the trailer. Calls `each` with every entry in order and
/// returns the count and the BLAKE3 of the whole input.
fn check_stream(
    mut r: impl std::io::Read,
    len: u64,
    geo: &Geometry,
    mut each: impl FnMut(Entry),
) -> Result<(u64, Hash), FormatError> {
    let io = |e: std::io::Error| corrupt(format!("index unreadable: {e}"));
    if len < (HEADER_LEN + TRAILER_LEN) as u64 {
        return Err(corrupt(format!(
            "index is {len} bytes, shorter than its header"
        )));
    }
    let mut b = [0u8; HEADER_LEN];
    r.read_exact(&mut b).map_err(io)?;
    if &b[0..8] != MAGIC {
        return Err(corrupt("not a cairn index (bad magic)"));
    }
    let version = le_u32(&b, 8);
    if !known_version(version.into()) {
        return Err(FormatError::UnknownVersion {
            found: version.into(),
        });
    }
    if crc32fast::hash(&b[0..28]) != le_u32(&b, 28) {
        return Err(corrupt("index header checksum mismatch"));
    }
    if le_u32(&b, 12) as usize != INDEX_ENTRY_LEN {
        return Err(corrupt(format!(
            "index entry size {} is not {INDEX_ENTRY_LEN}",
            le_u32(&b, 12)
        )));
    }
    let n = le_u64(&b, 16);
    let expected = n
        .checked_mul(INDEX_ENTRY_LEN as u64)
        .and_then(|x| x.checked_add((HEADER_LEN + TRAILER_LEN) as u64));
    if expected != Some(len) {
        return Err(corrupt(format!(
            "index says {n} entries but is {len} bytes long (truncated or damaged)"
        )));
    }
    let mut body = blake3::Hasher::new();
    let mut whole = blake3::Hasher::new();
    body.update(&b);
    whole.update(&b);
    let mut prev_end = 0u64;
    let mut chunk = vec![0u8; 4096 * INDEX_ENTRY_LEN];
    let mut i = 0u64;
    while i < n {
        let k = (n - i).min(4096) as usize;
        let bytes = &mut chunk[..k * INDEX_ENTRY_LEN];
        r.read_exact(bytes).map_err(io)?;
        body.update(bytes);
        whole.update(bytes);
        for (j, eb) in bytes.chunks_exact(INDEX_ENTRY_LEN).enumerate() {
            let e = Entry::decode(eb)?;
            validate_entry(&e, geo, prev_end)
                .map_err(|m| corrupt(format!("index entry {}: {m}", i + j as u64)))?;
            prev_end = e.end();
            each(e);
        }
        i += k as u64;
    }
    let mut trailer = [0u8; TRAILER_LEN];
    r.read_exact(&mut trailer).map_err(io)?;
    if body.finalize().as_bytes() != &trailer {
        return Err(corrupt("index checksum mismatch"));
    }
    whole.update(&trailer);
    Ok((n, *whole.finalize().as_bytes()))
}

/// An image's index on disk, checked once when opened and then read entry by entry through a
/// small cache: its size in memory does not depend on the image's. No descriptor is kept
/// between reads, so a chain of thousands of images holds none.
pub struct IndexFile {
    path: std::path::PathBuf,
    file_len: u64,
    count: u64,
    geo: Geometry,
    cache: std::sync::Mutex<Vec<(u64, Vec<Entry>)>>,
}

impl IndexFile {
    /// Checks the whole index at `path` (see `check_stream`) and returns it with the BLAKE3 of
    /// the file.
    pub fn open(path: &std::path::Path, geo: &Geometry) -> Result<(Self, Hash), FormatError> {
        geo.check()?;
        let file =
            std::fs::File::open(path).map_err(|e| corrupt(format!("index unreadable: {e}")))?;
        let len = file
            .metadata()
            .map_err(|e| corrupt(format!("index unreadable: {e}")))?
            .len();
        let reader = std::io::BufReader::with_capacity(1 << 20, &file);
        let (count, hash) = check_stream(reader, len, geo, |_| {})?;
        Ok((
            IndexFile {
                path: path.to_path_buf(),
                file_len: len,
                count,
                geo: *geo,
                cache: std::sync::Mutex::new(Vec::new()),
            },
            hash,
        ))
    }

    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Entry `i` (< len()). It was checked when the index was opened; it is checked against the
    /// geometry again, since the file is read again and could have changed since.
    pub fn get(&self, i: u64) -> Result<Entry, FormatError> {
        if i >= self.count {
            return Err(corrupt(format!(
                "index entry {i} asked for; the index has {}",
                self.count
            )));
        }
        let chunk = i / CHUNK_ENTRIES;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pos) = cache.iter().position(|(c, _)| *c == chunk) {
            let e = cache[pos].1[(i % CHUNK_ENTRIES) as usize].clone();
            if pos != 0 {
                let hit = cache.remove(pos);
                cache.insert(0, hit);
            }
            return Ok(e);
        }
        let first = chunk * CHUNK_ENTRIES;
        let k = (self.count - first).min(CHUNK_ENTRIES) as usize;
        let mut bytes = vec![0u8; k * INDEX_ENTRY_LEN];
        let unreadable = |e: std::io::Error| corrupt(format!("index unreadable: {e}"));
        let file = std::fs::File::open(&self.path).map_err(unreadable)?;
        let len = file.metadata().map_err(unreadable)?.len();
        if len != self.file_len {
            return Err(corrupt(format!(
                "index changed size since it was checked ({len} bytes, was {})",
                self.file_len
            )));
        }
        std::os::unix::fs::FileExt::read_exact_at(
            &file,
            &mut bytes,
            HEADER_LEN as u64 + first * INDEX_ENTRY_LEN as u64,
        )
        .map_err(unreadable)?;
        let mut entries = Vec::with_capacity(k);
        for (j, eb) in bytes.chunks_exact(INDEX_ENTRY_LEN).enumerate() {
            let e = Entry::decode(eb)?;
            validate_entry(&e, &self.geo, 0)
                .map_err(|m| corrupt(format!("index entry {}: {m}", first + j as u64)))?;
            entries.push(e);
        }
        let e = entries[(i % CHUNK_ENTRIES) as usize].clone();
        cache.insert(0, (chunk, entries));
        cache.truncate(CACHED_CHUNKS);
        Ok(e)
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
        EntryKind::Window(w) => {
            if e.segment >= geo.segments {
                return Err(format!("segment {} does not exist", e.segment));
            }
            if e.stored_length == 0 || e.segment_offset < super::SEGMENT_HEADER_LEN as u64 {
                return Err(
                    "window of a frame with no payload or inside the segment header".into(),
                );
            }
            let skip = u64::from(w.skip);
            let (fl, len) = (u64::from(w.frame_length), u64::from(e.length));
            if w.frame_length > geo.block_size || skip + len > fl || skip > e.offset {
                return Err(format!(
                    "window at {} of {len} bytes, {skip} into a {fl}-byte frame: not inside it",
                    e.offset
                ));
            }
            let frame_start = e.offset - skip;
            if frame_start % g != 0 || frame_start / bs != (frame_start + fl - 1) / bs {
                return Err(format!(
                    "window's frame at {frame_start} not aligned or crosses a block boundary"
                ));
            }
            let raw = w.codec == super::frame::Codec::Raw;
            if (raw && e.stored_length != w.frame_length)
                || (!raw && e.stored_length >= w.frame_length)
            {
                return Err("window's frame has a stored length its codec never gives".into());
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
        let stored = match kind {
            EntryKind::Zero => 0,
            EntryKind::Window(w) => w.frame_length,
            _ => length,
        };
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

    /// The streaming writer produces exactly the bytes of the in-memory encoder, and the file
    /// reader gives back every entry, across chunk boundaries of its cache.
    #[test]
    fn streamed_index_equals_the_encoded_one_and_reads_back() {
        let geo = Geometry {
            source_size: 1 << 30,
            block_size: 1 << 20,
            granule: 4 << 10,
            segments: 2,
        };
        let entries: Vec<Entry> = (0..1000u64)
            .map(|i| entry(i * (1 << 20), 64 << 10, EntryKind::Raw))
            .collect();
        let dir = std::env::temp_dir().join(format!("cairn-index-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("index");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mut w = IndexWriter::new(file).unwrap();
        for e in &entries {
            w.push(e).unwrap();
        }
        assert!(w.push(&entries[0]).is_err(), "out of order accepted");
        let (_, summary) = w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            bytes,
            Index {
                entries: entries.clone()
            }
            .encode()
        );
        assert_eq!(summary.entries, 1000);
        assert_eq!(summary.size, bytes.len() as u64);
        assert_eq!(&summary.blake3, blake3::hash(&bytes).as_bytes());
        let (idx, hash) = IndexFile::open(&path, &geo).unwrap();
        assert_eq!(hash, summary.blake3);
        assert_eq!(idx.len(), 1000);
        for i in [0u64, 127, 128, 999, 500, 1, 998] {
            assert_eq!(idx.get(i).unwrap(), entries[i as usize], "entry {i}");
        }
        assert!(idx.get(1000).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn windows_round_trip_and_must_lie_inside_their_frame() {
        let w = |skip, frame_length| {
            EntryKind::Window(Window {
                codec: super::super::frame::Codec::Raw,
                skip,
                frame_length,
            })
        };
        let idx = Index {
            entries: vec![
                entry(0, 64 << 10, EntryKind::Raw),
                entry(128 << 10, 64 << 10, w(128 << 10, 1 << 20)),
                entry(960 << 10, 64 << 10, w(960 << 10, 1 << 20)),
            ],
        };
        assert_eq!(Index::decode(&idx.encode(), &geo()).unwrap(), idx);
        for bad in [
            entry(960 << 10, 128 << 10, w(960 << 10, 1 << 20)), // past the frame's end
            entry(64 << 10, 64 << 10, w(128 << 10, 1 << 20)),   // frame before offset 0
            entry(1 << 20, 64 << 10, w(64 << 10, 1 << 20)),     // frame crosses a block
        ] {
            let b = Index {
                entries: vec![bad.clone()],
            }
            .encode();
            assert!(Index::decode(&b, &geo()).is_err(), "{bad:?} accepted");
        }
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
