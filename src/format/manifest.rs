//! The manifest: what an image is, checksummed (docs/format.md, "manifest").

use super::{
    check_sector_size, corrupt, invalid, parse_hash_hex, valid_image_id, valid_name, FormatError,
    Hash, Index, INDEX_ENTRY_LEN, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, MIN_GRANULE, SEGMENT_HEADER_LEN,
};
use serde::{Deserialize, Serialize};

const HEADER_PREFIX: &str = "cairn-manifest ";
/// A manifest is small; anything larger is damage or an attack.
pub const MAX_MANIFEST_LEN: u64 = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    Full,
    Incremental,
    Differential,
}

impl ImageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageKind::Full => "full",
            ImageKind::Incremental => "incremental",
            ImageKind::Differential => "differential",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Full,
    Tracked,
    CompareScan,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    pub id: String,
    pub manifest_blake3: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceIdentity {
    pub path: String,
    /// "disk", "partition" or "file".
    pub kind: String,
    pub size: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wwn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ptable_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexRef {
    pub entries: u64,
    pub size: u64,
    pub blake3: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRef {
    /// The segment's position in this manifest's list (what index entries name).
    pub number: u32,
    pub size: u64,
    pub blake3: String,
    /// Format 2: the image that wrote the segment and its number there, when that is not this
    /// image at `number` (a segment shared with the image that wrote it, or kept after that image
    /// was removed). Absent: this image wrote it as its segment `number`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<SegmentOrigin>,
}

/// Who wrote a segment: the writer's image id (its tag is in the segment header) and the number
/// it gave the segment (also in the header).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SegmentOrigin {
    pub image: String,
    pub number: u32,
}

/// Format 2 keys a prune writes into the manifest of an image it rewrites (docs/format.md,
/// "Rewritten images"). Kept apart from [`Manifest`] so that writers which never rewrite an
/// image need not know them; all default to absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rewrite {
    /// How many times the image was rewritten: names its index and badranges files.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub generation: u32,
    /// Header hashes of the manifests this restore point was published under before, oldest
    /// first: a child that recorded one of them as its parent's hash still links to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub former_manifests: Vec<String>,
    /// Ids of the removed images whose data was merged into this one (informational).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_from: Vec<String>,
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

/// The most former manifests a rewritten image records (one per prune that rewrote it).
pub const MAX_FORMER_MANIFESTS: usize = 100_000;

impl Rewrite {
    fn validate(&self, version: u32) -> Result<(), FormatError> {
        if version < 2 && *self != Rewrite::default() {
            return Err(corrupt(
                "a format-1 manifest with format-2 keys (generation, former_manifests, merged_from)",
            ));
        }
        if self.former_manifests.len() > MAX_FORMER_MANIFESTS
            || self
                .former_manifests
                .iter()
                .any(|h| parse_hash_hex(h).is_none())
        {
            return Err(corrupt("former_manifests invalid"));
        }
        if self.merged_from.iter().any(|id| !valid_image_id(id)) {
            return Err(corrupt("merged_from holds an invalid image id"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackingRef {
    pub lineage: String,
    pub seq: u64,
}

/// The `badranges` file of an image (format/badranges.rs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadRangesRef {
    /// Number of ranges in the file.
    pub ranges: u64,
    /// Their total length.
    pub bytes: u64,
    pub blake3: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub bytes_read: u64,
    pub data_bytes: u64,
    pub stored_bytes: u64,
    pub blocks_total: u64,
    pub blocks_zero: u64,
    pub blocks_stored: u64,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub id: String,
    pub name: String,
    pub kind: ImageKind,
    pub parent: Option<ParentRef>,
    pub base_full: Option<String>,
    pub created_unix: u64,
    pub created: String,
    pub tool_version: String,
    pub method: Method,
    pub source: SourceIdentity,
    pub block_size: u32,
    pub granule: u32,
    pub codec: String,
    pub level: i32,
    pub index: IndexRef,
    pub segments: Vec<SegmentRef>,
    pub stats: Stats,
    /// Source ranges (byte offset, length) that could not be read, inline: images written before
    /// `bad_ranges_file` existed. New images leave it empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bad_ranges: Vec<(u64, u64)>,
    /// The `badranges` file listing the source ranges this image could not read (a full image
    /// holds zeros there; an incremental or differential holds nothing, so its parent's data is
    /// what a restore gives there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bad_ranges_file: Option<BadRangesRef>,
    /// The change tracker's cut this image corresponds to, when a tracker was running: the next
    /// incremental or differential hands it back to prove continuity since this image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<TrackingRef>,
    /// The source disk's partition table, read at backup start (whole disks and disk-image files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_table: Option<super::PartitionTableRecord>,
    /// The image's place in the repository's order: one more than the highest sequence in the
    /// repository when it was written (from 1). Absent in manifests written before it existed;
    /// those order by id, before every sequenced image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
}

impl Manifest {
    /// Serialises with the checksummed header line. Returns the bytes and the header hash, which a
    /// child image records as `parent.manifest_blake3`.
    pub fn encode(&self) -> (Vec<u8>, Hash) {
        let body = serde_json::to_vec_pretty(self).expect("manifest serialises");
        self.framed(body)
    }

    /// As [`Manifest::encode`], with the keys of a rewritten image.
    pub fn encode_rewritten(&self, rewrite: &Rewrite) -> (Vec<u8>, Hash) {
        #[derive(Serialize)]
        struct Both<'a> {
            #[serde(flatten)]
            manifest: &'a Manifest,
            #[serde(flatten)]
            rewrite: &'a Rewrite,
        }
        let body = serde_json::to_vec_pretty(&Both {
            manifest: self,
            rewrite,
        })
        .expect("manifest serialises");
        self.framed(body)
    }

    fn framed(&self, body: Vec<u8>) -> (Vec<u8>, Hash) {
        let hash = *blake3::hash(&body).as_bytes();
        let mut out = format!(
            "{HEADER_PREFIX}{} blake3={}\n",
            self.format_version,
            super::hash_hex(&hash)
        )
        .into_bytes();
        out.extend_from_slice(&body);
        (out, hash)
    }

    /// Parses and validates a manifest. Returns it with its header hash.
    pub fn decode(b: &[u8]) -> Result<(Self, Hash), FormatError> {
        Self::decode_rewritten(b).map(|(m, _, h)| (m, h))
    }

    /// Parses and validates a manifest with the keys of a rewritten image.
    pub fn decode_rewritten(b: &[u8]) -> Result<(Self, Rewrite, Hash), FormatError> {
        if b.len() as u64 > MAX_MANIFEST_LEN {
            return Err(corrupt(format!(
                "manifest is {} bytes, larger than any cairn writes",
                b.len()
            )));
        }
        let nl = b
            .iter()
            .take(200)
            .position(|&c| c == b'\n')
            .ok_or_else(|| corrupt("manifest has no header line"))?;
        let header =
            std::str::from_utf8(&b[..nl]).map_err(|_| corrupt("manifest header is not text"))?;
        let rest = header
            .strip_prefix(HEADER_PREFIX)
            .ok_or_else(|| corrupt("not a cairn manifest (bad header line)"))?;
        let (version, hash) = rest
            .split_once(' ')
            .ok_or_else(|| corrupt("manifest header line malformed"))?;
        let version: u64 = version
            .parse()
            .map_err(|_| corrupt(format!("manifest version {version:?} is not a number")))?;
        if !super::known_version(version) {
            return Err(FormatError::UnknownVersion { found: version });
        }
        let want = hash
            .strip_prefix("blake3=")
            .and_then(parse_hash_hex)
            .ok_or_else(|| corrupt("manifest header has no valid blake3"))?;
        let body = &b[nl + 1..];
        let got = *blake3::hash(body).as_bytes();
        if got != want {
            return Err(corrupt(
                "manifest checksum mismatch (the manifest is damaged)",
            ));
        }
        let m: Manifest = serde_json::from_slice(body)
            .map_err(|e| corrupt(format!("manifest JSON invalid: {e}")))?;
        if u64::from(m.format_version) != version {
            return Err(invalid(
                "format_version",
                m.format_version,
                &format!("differs from the header line's version {version}"),
            ));
        }
        m.validate()?;
        let rewrite: Rewrite = serde_json::from_slice(body)
            .map_err(|e| corrupt(format!("manifest JSON invalid: {e}")))?;
        rewrite.validate(m.format_version)?;
        Ok((m, rewrite, got))
    }

    /// Checks every field against the format's rules (docs/format.md, "manifest"): what `decode`
    /// refuses, a writer must not commit. Errors name the field and its value.
    pub fn validate(&self) -> Result<(), FormatError> {
        if !super::known_version(self.format_version.into()) {
            return Err(FormatError::UnknownVersion {
                found: self.format_version.into(),
            });
        }
        if !valid_image_id(&self.id) {
            return Err(corrupt(format!("invalid image id {:?}", self.id)));
        }
        if !valid_name(&self.name) {
            return Err(corrupt(format!("invalid name {:?}", self.name)));
        }
        self.validate_lineage()?;
        self.validate_source()?;
        self.validate_geometry()?;
        if self.codec != "zstd" {
            return Err(corrupt(format!("unknown codec {:?}", self.codec)));
        }
        if !zstd::compression_level_range().contains(&self.level) {
            return Err(invalid("level", self.level, "not a zstd compression level"));
        }
        self.validate_storage()?;
        self.validate_stats()?;
        let mut end = 0u64;
        for (i, &(o, l)) in self.bad_ranges.iter().enumerate() {
            if l == 0 || o < end || o.checked_add(l).is_none_or(|e| e > self.source.size) {
                return Err(invalid(
                    &format!("bad_ranges[{i}]"),
                    format!("[{o}, {l}]"),
                    "bad ranges must be non-empty, sorted, non-overlapping and inside the source",
                ));
            }
            end = o + l;
        }
        if let Some(t) = &self.tracking {
            let l = &t.lineage;
            if l.is_empty() || l.len() > 64 || !l.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(invalid(
                    "tracking.lineage",
                    format!("{l:?}"),
                    "not 1 to 64 hex digits",
                ));
            }
        }
        if let Some(t) = &self.partition_table {
            t.validate(self.source.size)?;
        }
        Ok(())
    }

    /// Kind, method, parent and base full agree.
    fn validate_lineage(&self) -> Result<(), FormatError> {
        match (self.kind, &self.parent, &self.base_full) {
            (ImageKind::Full, None, None) => {}
            (ImageKind::Full, _, _) => return Err(corrupt("full image with a parent")),
            (_, Some(p), Some(base)) => {
                if !valid_image_id(&p.id)
                    || !valid_image_id(base)
                    || parse_hash_hex(&p.manifest_blake3).is_none()
                {
                    return Err(corrupt("invalid parent reference"));
                }
                if self.kind == ImageKind::Differential && p.id != *base {
                    return Err(corrupt(format!(
                        "differential image whose parent {:?} is not its base full {base:?}",
                        p.id
                    )));
                }
            }
            _ => {
                return Err(corrupt(
                    "incremental or differential image without a parent",
                ))
            }
        }
        if (self.kind == ImageKind::Full) != (self.method == Method::Full) {
            return Err(corrupt(format!(
                "a {} image made by method {:?}",
                self.kind.as_str(),
                self.method
            )));
        }
        Ok(())
    }

    fn validate_source(&self) -> Result<(), FormatError> {
        let s = &self.source;
        if !matches!(s.kind.as_str(), "disk" | "partition" | "file") {
            return Err(invalid(
                "source.kind",
                format!("{:?}", s.kind),
                "not disk, partition or file",
            ));
        }
        // Offsets are handed to pread/pwrite as off_t.
        if s.size == 0 || s.size > i64::MAX as u64 {
            return Err(invalid("source.size", s.size, "not 1 to 2^63-1 bytes"));
        }
        check_sector_size("source.logical_sector_size", s.logical_sector_size)?;
        check_sector_size("source.physical_sector_size", s.physical_sector_size)?;
        if s.physical_sector_size < s.logical_sector_size {
            return Err(invalid(
                "source.physical_sector_size",
                s.physical_sector_size,
                &format!(
                    "smaller than source.logical_sector_size {}",
                    s.logical_sector_size
                ),
            ));
        }
        Ok(())
    }

    fn validate_geometry(&self) -> Result<(), FormatError> {
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(invalid(
                "block_size",
                bs,
                &format!("not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"),
            ));
        }
        // Both are powers of two, so a granule no larger than the block divides it.
        let g = self.granule;
        if !g.is_power_of_two() || g < MIN_GRANULE || g > bs {
            return Err(invalid(
                "granule",
                g,
                &format!("not a power of two from {MIN_GRANULE} to block_size {bs}"),
            ));
        }
        Ok(())
    }

    /// The index and segment references, and what their sizes imply.
    fn validate_storage(&self) -> Result<(), FormatError> {
        if parse_hash_hex(&self.index.blake3).is_none() {
            return Err(corrupt("index hash invalid"));
        }
        if let Some(r) = &self.bad_ranges_file {
            if !self.bad_ranges.is_empty()
                || parse_hash_hex(&r.blake3).is_none()
                || r.ranges == 0
                || r.ranges > r.bytes
                || r.bytes > self.source.size
            {
                return Err(corrupt("bad-range file reference invalid"));
            }
        }
        if self.sequence == Some(0) {
            return Err(invalid("sequence", 0, "sequences start at 1"));
        }
        // Index entries are disjoint granule-aligned extents of the source.
        let max_entries = self.source.size.div_ceil(u64::from(self.granule));
        if self.index.entries > max_entries {
            return Err(invalid(
                "index.entries",
                self.index.entries,
                &format!(
                    "more than the {max_entries} granules of a {}-byte source",
                    self.source.size
                ),
            ));
        }
        let want = Index::encoded_len(0) + self.index.entries * INDEX_ENTRY_LEN as u64;
        if self.index.size != want {
            return Err(invalid(
                "index.size",
                self.index.size,
                &format!("{} entries take {want} bytes", self.index.entries),
            ));
        }
        if self.segments.len() > u32::MAX as usize {
            return Err(corrupt("more segments than segment numbers"));
        }
        let mut segment_bytes = 0u64;
        for (i, seg) in self.segments.iter().enumerate() {
            if seg.number as usize != i {
                return Err(invalid(
                    &format!("segments[{i}].number"),
                    seg.number,
                    "segments must be numbered 0, 1, 2... in order",
                ));
            }
            if let Some(o) = &seg.origin {
                if self.format_version < 2 || !valid_image_id(&o.image) {
                    return Err(invalid(
                        &format!("segments[{i}].origin.image"),
                        format!("{:?}", o.image),
                        "an origin needs format 2 and a valid image id",
                    ));
                }
            }
            if parse_hash_hex(&seg.blake3).is_none() {
                return Err(invalid(
                    &format!("segments[{i}].blake3"),
                    format!("{:?}", seg.blake3),
                    "not 64 lowercase hex digits",
                ));
            }
            if seg.size < SEGMENT_HEADER_LEN as u64 {
                return Err(invalid(
                    &format!("segments[{i}].size"),
                    seg.size,
                    &format!("shorter than the {SEGMENT_HEADER_LEN}-byte segment header"),
                ));
            }
            segment_bytes = segment_bytes
                .checked_add(seg.size)
                .ok_or_else(|| corrupt("segment sizes add up to more than 2^64 bytes"))?;
        }
        let stored = segment_bytes.checked_add(self.index.size);
        if stored != Some(self.stats.stored_bytes) {
            return Err(invalid(
                "stats.stored_bytes",
                self.stats.stored_bytes,
                &format!(
                    "the segments ({segment_bytes} bytes) and the index ({} bytes) add up to another size",
                    self.index.size
                ),
            ));
        }
        Ok(())
    }

    /// The counters cannot describe more than the source holds.
    fn validate_stats(&self) -> Result<(), FormatError> {
        let st = &self.stats;
        let size = self.source.size;
        for (field, v) in [
            ("stats.bytes_read", st.bytes_read),
            ("stats.data_bytes", st.data_bytes),
        ] {
            if v > size {
                return Err(invalid(
                    field,
                    v,
                    &format!("more than the source's {size} bytes"),
                ));
            }
        }
        // Every block counted is at least one granule of the source.
        let granules = size.div_ceil(u64::from(self.granule));
        let extents = st.blocks_zero.checked_add(st.blocks_stored);
        for (field, v) in [
            ("stats.blocks_total", Some(st.blocks_total)),
            ("stats.blocks_zero + stats.blocks_stored", extents),
        ] {
            if v.is_none_or(|v| v > granules) {
                return Err(invalid(
                    field,
                    v.map_or("more than 2^64".into(), |v| v.to_string()),
                    &format!("more than the source's {granules} granules"),
                ));
            }
        }
        Ok(())
    }

    /// Whether this image could not read some of its source.
    pub fn has_bad_ranges(&self) -> bool {
        !self.bad_ranges.is_empty() || self.bad_ranges_file.is_some()
    }

    /// How many bytes of its source this image could not read.
    pub fn bad_bytes(&self) -> u64 {
        match &self.bad_ranges_file {
            Some(r) => r.bytes,
            None => self.bad_ranges.iter().map(|r| r.1).sum(),
        }
    }

    pub fn geometry(&self) -> super::index::Geometry {
        super::index::Geometry {
            source_size: self.source.size,
            block_size: self.block_size,
            granule: self.granule,
            segments: self.segments.len() as u32,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::format::FORMAT_VERSION;

    pub fn sample() -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            id: "20261126T141500Z".into(),
            name: "disk-test".into(),
            kind: ImageKind::Full,
            parent: None,
            base_full: None,
            created_unix: 1_795_000_000,
            created: "2026-11-26T14:15:00Z".into(),
            tool_version: "cairn 0.1.0".into(),
            method: Method::Full,
            source: SourceIdentity {
                path: "/dev/x".into(),
                kind: "disk".into(),
                size: 1 << 30,
                logical_sector_size: 512,
                physical_sector_size: 4096,
                ..Default::default()
            },
            block_size: 1 << 20,
            granule: 64 << 10,
            codec: "zstd".into(),
            level: 1,
            index: IndexRef {
                entries: 0,
                size: 64,
                blake3: "00".repeat(32),
            },
            segments: vec![SegmentRef {
                number: 0,
                size: 32,
                blake3: "11".repeat(32),
                origin: None,
            }],
            stats: Stats {
                stored_bytes: 32 + 64,
                ..Stats::default()
            },
            bad_ranges: Vec::new(),
            bad_ranges_file: None,
            tracking: None,
            partition_table: None,
            sequence: Some(7),
        }
    }

    #[test]
    fn round_trip_and_hash() {
        let m = sample();
        let (b, h) = m.encode();
        let (back, h2) = Manifest::decode(&b).unwrap();
        assert_eq!(back, m);
        assert_eq!(h, h2);
    }

    #[test]
    fn damage_and_versions_are_reported() {
        let (b, _) = sample().encode();
        let mut c = b.clone();
        let last = c.len() - 3;
        c[last] ^= 1;
        assert!(matches!(Manifest::decode(&c), Err(FormatError::Corrupt(_))));
        let text =
            String::from_utf8(b)
                .unwrap()
                .replacen("cairn-manifest 2 ", "cairn-manifest 99 ", 1);
        assert!(matches!(
            Manifest::decode(text.as_bytes()),
            Err(FormatError::UnknownVersion { found: 99 })
        ));
        assert!(Manifest::decode(b"").is_err());
        assert!(Manifest::decode(b"cairn-manifest 1 blake3=zz\n{}").is_err());
    }

    /// A version-1 manifest (every image before format 2) still reads; format-2 keys in one do
    /// not, nor a body whose version differs from its header line's.
    #[test]
    fn version_one_reads_and_keeps_to_version_one() {
        let mut m = sample();
        m.format_version = 1;
        let (b, h) = m.encode();
        assert!(b.starts_with(b"cairn-manifest 1 "));
        let (back, rw, h2) = Manifest::decode_rewritten(&b).unwrap();
        assert_eq!((back, rw, h2), (m.clone(), Rewrite::default(), h));
        let with_keys = Rewrite {
            generation: 1,
            ..Rewrite::default()
        };
        let (b, _) = m.encode_rewritten(&with_keys);
        assert!(Manifest::decode(&b).is_err());
        m.segments[0].origin = Some(SegmentOrigin {
            image: "20261126T141500Z".into(),
            number: 3,
        });
        assert!(Manifest::decode(&m.encode().0).is_err());
        m.format_version = 2;
        let (b, _) = m.encode_rewritten(&with_keys);
        let (back, rw, _) = Manifest::decode_rewritten(&b).unwrap();
        assert_eq!((back, rw), (m.clone(), with_keys));
        let text =
            String::from_utf8(b)
                .unwrap()
                .replacen("cairn-manifest 2 ", "cairn-manifest 1 ", 1);
        assert!(Manifest::decode(text.as_bytes()).is_err());
    }

    #[test]
    fn sequence_is_optional_and_starts_at_one() {
        let mut m = sample();
        m.sequence = None;
        let (b, _) = m.encode();
        assert!(!String::from_utf8_lossy(&b).contains("sequence"));
        assert_eq!(Manifest::decode(&b).unwrap().0.sequence, None);
        m.sequence = Some(0);
        let (b, _) = m.encode();
        assert!(Manifest::decode(&b).is_err());
    }

    #[test]
    fn rejects_path_like_ids() {
        let mut m = sample();
        m.id = "../../etc".into();
        let (b, _) = m.encode();
        assert!(Manifest::decode(&b).is_err());
    }
}
