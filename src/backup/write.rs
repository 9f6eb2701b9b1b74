//! The in-order end of a backup: frames and index entries appended to the new image.

use super::plan::Plan;
use super::stage::{Processed, Stage};
use crate::device::buf::AlignedBuf;
use crate::device::DeviceInfo;
use crate::format::manifest::{BadRangesRef, IndexRef, ParentRef, SegmentRef, Stats, TrackingRef};
use crate::format::{self, frame::Codec};
use crate::format::{
    hash_hex, Entry, EntryKind, FrameHeader, ImageKind, Manifest, PartitionTableRecord,
};
use crate::repo::ImageWriter;
use crate::tracker;
use anyhow::{anyhow, bail, Result};
use crossbeam_channel::Sender;
use std::path::Path;
use std::time::{Instant, UNIX_EPOCH};

/// One stored (or zero) extent coming out of the block stage.
pub struct Out<'a> {
    pub offset: u64,
    pub len: u64,
    pub hash: format::Hash,
    /// None for an all-zero extent.
    pub stored: Option<(Codec, &'a [u8])>,
}

/// One read unit after the block stage, handed to the sink in order.
pub struct Unit<'a> {
    pub read_len: u64,
    pub outs: Vec<Out<'a>>,
}

/// The in-order end of a backup: hands each unit's staged extents to the segment-writing sink
/// and the unit's buffer back to the reader.
pub(super) struct SegmentSink<F> {
    pub(super) sink: F,
    pub(super) free_tx: Sender<AlignedBuf>,
    pub(super) units: u64,
}

impl<F: FnMut(Unit<'_>) -> Result<()>> crate::pipeline::Consumer<Processed> for SegmentSink<F> {
    fn take(&mut self, p: Processed) -> Result<()> {
        let outs = p
            .outs
            .iter()
            .map(|o| Out {
                offset: o.offset,
                len: o.len,
                hash: o.hash,
                stored: match &o.stage {
                    Stage::Zero => None,
                    Stage::Raw(at) => {
                        Some((Codec::Raw, &p.buf.as_slice()[*at..*at + o.len as usize]))
                    }
                    Stage::Zstd(v) => Some((Codec::Zstd, v.as_slice())),
                },
            })
            .collect();
        (self.sink)(Unit {
            read_len: p.len as u64,
            outs,
        })?;
        let _ = self.free_tx.send(p.buf);
        self.units += 1;
        Ok(())
    }
}

/// Appends each unit's extents to the new image: a frame and an index entry for stored data.
pub(super) struct ImageSink<'a, 's> {
    writer: &'a mut ImageWriter,
    granule: u64,
    /// An incremental or differential records zeros too: the parent chain may hold data there.
    explicit_zero: bool,
    pub(super) stats: Stats,
    /// The granule runs read, streamed to the tracker for its repair of a differential
    /// compare-scan; None for every other image.
    pub(super) found: Option<tracker::Repair<'s>>,
}

impl<'a, 's> ImageSink<'a, 's> {
    pub(super) fn new(
        writer: &'a mut ImageWriter,
        granule: u32,
        kind: ImageKind,
        found: Option<tracker::Repair<'s>>,
    ) -> Self {
        ImageSink {
            writer,
            granule: u64::from(granule),
            explicit_zero: kind != ImageKind::Full,
            stats: Stats::default(),
            found,
        }
    }

    pub(super) fn take(&mut self, unit: Unit<'_>) -> Result<()> {
        self.stats.blocks_total += 1;
        self.stats.bytes_read += unit.read_len;
        for out in unit.outs {
            let (g0, g1) = (
                out.offset / self.granule,
                (out.offset + out.len).div_ceil(self.granule),
            );
            if let Some(found) = self.found.as_mut() {
                found.push(g0, g1 - g0);
            }
            let Some((codec, payload)) = out.stored else {
                self.stats.blocks_zero += 1;
                if self.explicit_zero {
                    self.writer.push_entry(&Entry {
                        offset: out.offset,
                        length: out.len as u32,
                        kind: EntryKind::Zero,
                        segment: 0,
                        stored_length: 0,
                        segment_offset: 0,
                        crc: 0,
                        hash: out.hash,
                    })?;
                }
                continue;
            };
            self.stats.data_bytes += out.len;
            self.stats.blocks_stored += 1;
            let crc = crc32fast::hash(payload);
            let header = FrameHeader {
                codec,
                offset: out.offset,
                length: out.len as u32,
                stored_length: payload.len() as u32,
                crc,
            };
            let (segment, segment_offset) = self.writer.append(&header, payload)?;
            self.writer.push_entry(&Entry {
                offset: out.offset,
                length: out.len as u32,
                kind: EntryKind::stored(codec),
                segment,
                stored_length: payload.len() as u32,
                segment_offset,
                crc,
                hash: out.hash,
            })?;
        }
        Ok(())
    }
}

/// The image's files, written and summed up for its manifest.
pub(super) struct Written {
    pub(super) segments: Vec<SegmentRef>,
    pub(super) index: IndexRef,
    pub(super) bad_ranges_file: Option<BadRangesRef>,
    pub(super) stats: Stats,
}

/// Closes the segments and the index, and writes the unreadable ranges.
pub(super) fn finish_files(
    writer: &mut ImageWriter,
    bad_ranges: &[(u64, u64)],
    mut stats: Stats,
    started: Instant,
) -> Result<Written> {
    let segments = writer.finish_segments()?;
    let index = writer.finish_index()?;
    stats.stored_bytes = segments.iter().map(|s| s.size).sum::<u64>() + index.size;
    stats.duration_ms = started.elapsed().as_millis() as u64;
    // Unreadable ranges go to their own binary file: a dying disk can have hundreds of thousands,
    // too many for the manifest's JSON.
    let bad_ranges_file = if bad_ranges.is_empty() {
        None
    } else {
        let (bytes, r) = format::badranges::encode(bad_ranges);
        writer.add_file(format::badranges::FILE_NAME, &bytes)?;
        Some(r)
    };
    Ok(Written {
        segments,
        index: IndexRef {
            entries: index.entries,
            size: index.size,
            blake3: hash_hex(&index.blake3),
        },
        bad_ranges_file,
        stats,
    })
}

/// The new image's manifest.
pub(super) fn manifest(
    plan: &Plan,
    info: &DeviceInfo,
    level: i32,
    written: Written,
    cut: Option<&tracker::Cut>,
    partition_table: Option<PartitionTableRecord>,
    sequence: u64,
) -> Manifest {
    let base_full = match (&plan.parent, plan.kind) {
        (_, ImageKind::Full) | (None, _) => None,
        (Some((m, _)), _) => Some(m.base_full.clone().unwrap_or_else(|| m.id.clone())),
    };
    Manifest {
        format_version: format::FORMAT_VERSION,
        id: plan.id.clone(),
        name: plan.name.clone(),
        kind: plan.kind,
        parent: plan.parent.as_ref().map(|(m, h)| ParentRef {
            id: m.id.clone(),
            manifest_blake3: hash_hex(h),
        }),
        base_full,
        created_unix: plan.created_unix,
        created: humantime::format_rfc3339_seconds(
            UNIX_EPOCH + std::time::Duration::from_secs(plan.created_unix),
        )
        .to_string(),
        tool_version: format!("cairn {}", env!("CARGO_PKG_VERSION")),
        method: plan.method,
        source: super::source_identity(info),
        block_size: plan.block_size,
        granule: plan.granule,
        codec: "zstd".into(),
        level,
        index: written.index,
        segments: written.segments,
        stats: written.stats,
        bad_ranges: Vec::new(),
        bad_ranges_file: written.bad_ranges_file,
        tracking: cut.map(|c| TrackingRef {
            lineage: c.token.lineage.clone(),
            seq: c.token.seq,
        }),
        partition_table,
        sequence: Some(sequence),
    }
}

/// Commits the image with `manifest`, unless a reader would refuse it.
pub(super) fn publish(writer: ImageWriter, manifest: &Manifest, source: &Path) -> Result<()> {
    // What the loader would refuse is never committed (the temporary image is removed).
    manifest
        .validate()
        .map_err(|e| anyhow!("the new image's manifest is invalid ({e}); nothing was kept"))?;
    let (manifest_bytes, _) = manifest.encode();
    // Never publish what the loader would refuse.
    if manifest_bytes.len() as u64 > format::manifest::MAX_MANIFEST_LEN {
        bail!(
            "backup of {} failed; the repository is unchanged: its manifest would be {} bytes, more than the {} a reader accepts",
            source.display(),
            manifest_bytes.len(),
            format::manifest::MAX_MANIFEST_LEN
        );
    }
    writer.commit(&manifest_bytes)?;
    Ok(())
}
