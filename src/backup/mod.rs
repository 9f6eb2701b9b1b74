//! Backup: source reader → block stage (zero test, hash, compare, compress) → ordered segment writer.
//!
//! Three ways to find what to store:
//! - **full**: every block; all-zero blocks are left out (they read back as zero).
//! - **tracked**: only the granule runs the change tracker reports, when it can prove it saw every
//!   write since the parent image.
//! - **compare-scan**: every block is read and hashed, and only the parts whose hash differs from the
//!   parent chain's are stored. Used whenever continuity is not proven: never guess.
//!
//! Threads: one reader driving the I/O queue, `workers` block-stage threads, and the caller's thread
//! writing segments in order. A fixed pool of aligned buffers circulates reader → worker → writer →
//! reader, so memory stays flat whatever the device size.

mod plan;
mod read;
mod stage;
mod write;

pub use write::{Out, Unit};

use crate::device::{self, buf::AlignedBuf, Access, DeviceInfo};
use crate::format::frame::Codec;
use crate::format::manifest::{IndexRef, ParentRef, Stats, TrackingRef};
use crate::format::{
    self, hash_hex, Entry, EntryKind, FrameHeader, ImageKind, Manifest, Method, SourceIdentity,
};
use crate::progress::Progress;
use crate::repo::{Image, Repository};
use crate::tracker::{self, protocol::CutKind, protocol::Token};
use anyhow::{anyhow, bail, Context, Result};
use plan::{
    decide_kind, extents_from_runs, images_of_name, restorable_chain, tracked_range, Decision, Work,
};
use read::{io_shape, read_all, Geometry, POOL_BUFFERS};
use stage::block_stage;
use write::SegmentSink;

use serde::Serialize;

use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub struct BackupOptions {
    pub source: PathBuf,
    pub repo: PathBuf,
    pub name: Option<String>,
    /// None: full for a new name, incremental otherwise.
    pub kind: Option<ImageKind>,
    pub level: i32,
    pub segment_size: u64,
    pub block_size: u32,
    /// Where the change tracker keeps its socket and state.
    pub state_dir: PathBuf,
    /// When to give up on a failing source.
    pub max_bad: MaxBad,
}

/// How much of the source may be unreadable before the backup gives up (`--max-bad`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaxBad {
    /// Never give up.
    Unlimited,
    Bytes(u64),
    /// A share of the source size, in percent.
    Percent(f64),
    /// [`MaxBad::DEFAULT_PERCENT`] of the source, at least [`MaxBad::DEFAULT_FLOOR`].
    Default,
}

impl MaxBad {
    /// A disk with scattered bad sectors, the usual case ddrescue users report (from kilobytes to
    /// a few hundred megabytes lost), stays far below 1 %; a failed head or a large damaged
    /// surface leaves several percent and more unreadable, and every unreadable sector costs
    /// the drive's internal retries (seconds each): such a disk is better served by ddrescue's
    /// skip-and-return-later passes than by hours of bisecting that may finish it off.
    pub const DEFAULT_PERCENT: f64 = 1.0;
    /// Small sources (a USB stick, one partition) still finish with a few bad areas.
    pub const DEFAULT_FLOOR: u64 = 64 << 20;

    /// The limit in bytes for a source of `size` bytes (None: no limit).
    pub fn limit(self, size: u64) -> Option<u64> {
        let share = |p: f64| (size as f64 * p / 100.0) as u64;
        match self {
            MaxBad::Unlimited => None,
            MaxBad::Bytes(b) => Some(b),
            MaxBad::Percent(p) => Some(share(p)),
            MaxBad::Default => Some(share(Self::DEFAULT_PERCENT).max(Self::DEFAULT_FLOOR)),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct BackupReport {
    pub id: String,
    pub name: String,
    pub kind: &'static str,
    pub parent: Option<String>,
    /// "full", "tracked" or "compare-scan".
    pub method: &'static str,
    /// Why a compare-scan was needed, when it was.
    pub method_reason: Option<String>,
    /// Why the kind differs from what was asked, when it does.
    pub note: Option<String>,
    pub source: String,
    pub source_size: u64,
    pub bytes_read: u64,
    pub data_bytes: u64,
    pub bytes_stored: u64,
    pub blocks_total: u64,
    pub blocks_zero: u64,
    pub blocks_stored: u64,
    pub duration_ms: u64,
    pub read_throughput_mb_s: f64,
    pub io: String,
    /// Unreadable source ranges (offset, length in bytes), stored as zeros.
    pub bad_ranges: Vec<(u64, u64)>,
    pub bad_bytes: u64,
}

pub fn run(opts: &BackupOptions, progress: &Progress) -> Result<BackupReport> {
    let started = Instant::now();
    device::require_root_for(&opts.source)?;
    let info = DeviceInfo::probe(&opts.source)
        .with_context(|| format!("cannot use source {}", opts.source.display()))?;
    if info.size == 0 {
        bail!("source {} is empty (0 bytes)", opts.source.display());
    }
    let repo_anchor = nearest_existing(&opts.repo);
    if info.holds(&repo_anchor) {
        bail!(
            "the repository {} is on the source device {}: back up to another disk",
            opts.repo.display(),
            opts.source.display()
        );
    }
    if info.is_block() {
        if let Some(why) = info.in_use_reason() {
            tracing::warn!("{why}: the image may be inconsistent; unmount it or back up from the rescue system for a consistent image");
        }
    }
    let partition_table = crate::ptable::for_backup(&info);
    let repo = Repository::open_or_create(&opts.repo)?;
    let lock = repo.lock()?;
    repo.remove_leftovers(&lock)?;

    let name = match &opts.name {
        Some(n) if !format::valid_name(n) => bail!(
            "invalid name {n:?}: use letters, digits, '.', '_', '-' and ':', starting with a letter or digit"
        ),
        Some(n) => n.clone(),
        None => info.default_name(),
    };
    let catalogue = repo.catalogue()?;
    let history = images_of_name(&repo, &catalogue, &name);
    let Decision {
        kind,
        parent,
        parent_chain,
        note,
        fallback,
    } = decide_kind(opts.kind, &history, &name, |m| restorable_chain(&repo, m));
    if let Some(why) = catalogue.doubt_newest(catalogue.newest_of(&name)) {
        tracing::warn!("{why}: it may be the newest image of {name}; the new image is relative to the newest readable one");
    }

    // The tracker is asked for every backup, a full included: the cut starts (or continues) the
    // history the next incremental proves its continuity against.
    let consumer = format!("{}/{}", repo.identity(), name);
    let granule = parent.as_ref().map_or(format::GRANULE, |(m, _)| m.granule);
    let block_size = parent
        .as_ref()
        .map_or(opts.block_size, |(m, _)| m.block_size);
    let parent_token = parent
        .as_ref()
        .and_then(|(m, _)| m.tracking.clone())
        .map(|t| Token {
            lineage: t.lineage,
            seq: t.seq,
        });
    let cut_kind = match kind {
        ImageKind::Full => CutKind::Full,
        ImageKind::Incremental => CutKind::Incremental,
        ImageKind::Differential => CutKind::Differential,
    };
    let (session, cut, tracker_problem) = match tracked_range(&info) {
        Err(why) => (None, None, Some(why)),
        Ok((disk, start, len)) => match tracker::Session::connect(&opts.state_dir) {
            Err(e) => (None, None, Some(format!("{e:#}"))),
            Ok(mut s) => match s.cut(
                disk,
                start,
                len,
                u64::from(granule),
                &consumer,
                cut_kind,
                parent_token,
            ) {
                Ok(c) => (Some(s), Some(c), None),
                Err(e) => (None, None, Some(format!("{e:#}"))),
            },
        },
    };
    let (method, method_reason) = match (kind, &cut) {
        (ImageKind::Full, _) => (Method::Full, None),
        // The tracker's changes are relative to the image it cut last, which is not the parent.
        _ if fallback.is_some() => (Method::CompareScan, fallback.clone()),
        (_, Some(c)) if c.changed.is_some() => (Method::Tracked, None),
        (_, Some(c)) => (Method::CompareScan, c.reason.clone()),
        (_, None) => (Method::CompareScan, tracker_problem.clone()),
    };
    if kind == ImageKind::Full {
        if let Some(p) = &tracker_problem {
            tracing::info!("no change tracking for this series: {p}");
        }
    }
    if let Some(r) = &method_reason {
        tracing::warn!("compare-scan (reads the whole source): {r}");
    }

    let created_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let id = repo.new_image_id(created_unix, &lock);
    let mut writer = repo.begin_image(&id, opts.segment_size, &lock)?;

    // What to compare with: the parent chain, checked restorable above (dropped when not needed,
    // as it holds every index of the chain).
    let base_chain: Vec<Image> = if method == Method::CompareScan {
        parent_chain
    } else {
        drop(parent_chain);
        Vec::new()
    };
    let work = match (method, &cut) {
        (Method::Tracked, Some(c)) => Work::Extents(extents_from_runs(
            c.changed.as_deref().unwrap_or_default(),
            u64::from(granule),
            u64::from(block_size),
            info.size,
        )),
        (Method::CompareScan, _) => Work::Compare,
        _ => Work::All,
    };
    let to_read = work.bytes(info.size);

    let (depth, pool) = io_shape(&work);
    let buffers = device::buf::pool(pool, block_size as usize);
    let handle = device::open(&opts.source, Access::Read, info.is_block(), depth, &buffers)?;
    let io = handle.queue.describe();
    tracing::info!(
        "{} backup ({}) of {} ({} bytes) to {} as {id} [{io}]",
        kind.as_str(),
        method_name(method),
        opts.source.display(),
        info.size,
        opts.repo.display()
    );
    progress.start(
        to_read,
        &format!("{} → {id} ({})", opts.source.display(), method_name(method)),
    );

    let geometry = Geometry {
        size: info.size,
        block_size,
        granule,
        sector: info.logical_sector_size.max(512) as usize,
        max_bad: opts.max_bad.limit(info.size),
    };
    let mut stats = Stats::default();
    let mut found: Vec<(u64, u64)> = Vec::new();
    let explicit_zero = kind != ImageKind::Full;
    let bad_ranges = pipeline(
        handle,
        buffers,
        geometry,
        &opts.source,
        opts.level,
        &work,
        &base_chain,
        |unit| {
            progress.advance(unit.read_len);
            stats.blocks_total += 1;
            stats.bytes_read += unit.read_len;
            for out in unit.outs {
                let (g0, g1) = (
                    out.offset / u64::from(granule),
                    (out.offset + out.len).div_ceil(u64::from(granule)),
                );
                match found.last_mut() {
                    Some((f, c)) if *f + *c == g0 => *c += g1 - g0,
                    _ => found.push((g0, g1 - g0)),
                }
                let Some((codec, payload)) = out.stored else {
                    stats.blocks_zero += 1;
                    if explicit_zero {
                        writer.push_entry(&Entry {
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
                stats.data_bytes += out.len;
                stats.blocks_stored += 1;
                let crc = crc32fast::hash(payload);
                let header = FrameHeader {
                    codec,
                    offset: out.offset,
                    length: out.len as u32,
                    stored_length: payload.len() as u32,
                    crc,
                };
                let (segment, segment_offset) = writer.append(&header, payload)?;
                writer.push_entry(&Entry {
                    offset: out.offset,
                    length: out.len as u32,
                    kind: if codec == Codec::Zstd {
                        EntryKind::Zstd
                    } else {
                        EntryKind::Raw
                    },
                    segment,
                    stored_length: payload.len() as u32,
                    segment_offset,
                    crc,
                    hash: out.hash,
                })?;
            }
            Ok(())
        },
    )
    .with_context(|| {
        format!(
            "backup of {} failed; the repository is unchanged",
            opts.source.display()
        )
    })?;
    progress.finish();
    drop(base_chain);
    // The parent chain again, just before commit: an image deleted or replaced by hand during the
    // run must not leave a new image on a broken chain.
    if let Some((m, h)) = &parent {
        let chain = restorable_chain(&repo, m).with_context(|| {
            format!(
                "backup of {} failed; the repository is unchanged: the parent chain broke during the backup",
                opts.source.display()
            )
        })?;
        if chain.last().map(|i| i.manifest_hash) != Some(*h) {
            bail!(
                "backup of {} failed; the repository is unchanged: the parent image {} was replaced during the backup",
                opts.source.display(),
                m.id
            );
        }
    }

    let segments = writer.finish_segments()?;
    let index = writer.finish_index()?;
    stats.stored_bytes = segments.iter().map(|s| s.size).sum::<u64>() + index.size;
    stats.duration_ms = started.elapsed().as_millis() as u64;
    // Unreadable ranges go to their own binary file: a dying disk can have hundreds of thousands,
    // too many for the manifest's JSON.
    let bad_ranges_file = if bad_ranges.is_empty() {
        None
    } else {
        let (bytes, r) = format::badranges::encode(&bad_ranges);
        writer.add_file(format::badranges::FILE_NAME, &bytes)?;
        Some(r)
    };
    let base_full = match (&parent, kind) {
        (_, ImageKind::Full) | (None, _) => None,
        (Some((m, _)), _) => Some(m.base_full.clone().unwrap_or_else(|| m.id.clone())),
    };
    let manifest = Manifest {
        format_version: format::FORMAT_VERSION,
        id: id.clone(),
        name: name.clone(),
        kind,
        parent: parent.as_ref().map(|(m, h)| ParentRef {
            id: m.id.clone(),
            manifest_blake3: hash_hex(h),
        }),
        base_full,
        created_unix,
        created: humantime::format_rfc3339_seconds(
            UNIX_EPOCH + std::time::Duration::from_secs(created_unix),
        )
        .to_string(),
        tool_version: format!("cairn {}", env!("CARGO_PKG_VERSION")),
        method,
        source: source_identity(&info),
        block_size,
        granule,
        codec: "zstd".into(),
        level: opts.level,
        index: IndexRef {
            entries: index.entries,
            size: index.size,
            blake3: hash_hex(&index.blake3),
        },
        segments,
        stats: stats.clone(),
        bad_ranges: Vec::new(),
        bad_ranges_file,
        tracking: cut.as_ref().map(|c| TrackingRef {
            lineage: c.token.lineage.clone(),
            seq: c.token.seq,
        }),
        partition_table,
        sequence: Some(repo.reserve_sequence(&catalogue, &lock)?),
    };
    // What the loader would refuse is never committed (the temporary image is removed).
    manifest
        .validate()
        .map_err(|e| anyhow!("the new image's manifest is invalid ({e}); nothing was kept"))?;
    let (manifest_bytes, _) = manifest.encode();
    // Never publish what the loader would refuse.
    if manifest_bytes.len() as u64 > format::manifest::MAX_MANIFEST_LEN {
        bail!(
            "backup of {} failed; the repository is unchanged: its manifest would be {} bytes, more than the {} a reader accepts",
            opts.source.display(),
            manifest_bytes.len(),
            format::manifest::MAX_MANIFEST_LEN
        );
    }
    writer.commit(&manifest_bytes)?;
    drop(lock);
    // Only now, with the image published, may the tracker forget what this image holds —
    // except the unreadable ranges: their content is unknown, so the next backup reads them again.
    if let Some(s) = session {
        let repair =
            (kind == ImageKind::Differential && method == Method::CompareScan).then_some(found);
        if let Err(e) = s.commit(repair, &bad_ranges) {
            tracing::warn!("the tracker did not take the commit ({e:#}); the next backup will include these changes again");
        }
    }

    let secs = started.elapsed().as_secs_f64().max(1e-9);
    Ok(BackupReport {
        id,
        name,
        kind: kind.as_str(),
        parent: manifest.parent.as_ref().map(|p| p.id.clone()),
        method: method_name(method),
        method_reason,
        note,
        source: opts.source.display().to_string(),
        source_size: info.size,
        bytes_read: stats.bytes_read,
        data_bytes: stats.data_bytes,
        bytes_stored: stats.stored_bytes,
        blocks_total: stats.blocks_total,
        blocks_zero: stats.blocks_zero,
        blocks_stored: stats.blocks_stored,
        duration_ms: stats.duration_ms,
        read_throughput_mb_s: stats.bytes_read as f64 / secs / 1e6,
        io,
        bad_bytes: bad_ranges.iter().map(|r| r.1).sum(),
        bad_ranges,
    })
}

pub fn method_name(m: Method) -> &'static str {
    match m {
        Method::Full => "full",
        Method::Tracked => "tracked",
        Method::CompareScan => "compare-scan",
    }
}

fn nearest_existing(p: &std::path::Path) -> PathBuf {
    let mut cur = p.to_path_buf();
    while !cur.exists() {
        match cur.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => cur = parent.to_path_buf(),
            _ => return PathBuf::from("."),
        }
    }
    cur
}

pub fn source_identity(info: &DeviceInfo) -> SourceIdentity {
    SourceIdentity {
        path: info.path.display().to_string(),
        kind: info.kind.as_str().into(),
        size: info.size,
        logical_sector_size: info.logical_sector_size,
        physical_sector_size: info.physical_sector_size,
        model: info.model.clone(),
        serial: info.serial.clone(),
        wwn: info.wwn.clone(),
        partuuid: info.partuuid.clone(),
        ptable_id: info.ptable_id.clone(),
    }
}

/// Unreadable (offset, length) ranges of the source.
type BadRanges = Vec<(u64, u64)>;

/// Backup's use of the ordered pipeline: the source reader, `workers` block stages, and `sink`
/// called for each read unit in order on the caller's thread. Returns the unreadable ranges the
/// reader found.
#[allow(clippy::too_many_arguments)]
fn pipeline(
    handle: device::Handle,
    buffers: Vec<AlignedBuf>,
    geo: Geometry,
    source: &std::path::Path,
    level: i32,
    work: &Work,
    base: &[Image],
    sink: impl FnMut(Unit<'_>) -> Result<()>,
) -> Result<BadRanges> {
    let total_units = match work {
        Work::All | Work::Compare => geo.size.div_ceil(u64::from(geo.block_size)),
        Work::Extents(e) => e.len() as u64,
    };
    let (free_tx, free_rx) = device::buf::circulate(buffers);
    let mut writer = SegmentSink {
        sink,
        free_tx,
        units: 0,
    };
    let bad = crate::pipeline::run(
        device::buf::stage_workers(),
        POOL_BUFFERS,
        move |tx| read_all(handle, geo, source, work, base, free_rx, tx),
        || block_stage(level, geo.granule as usize, base),
        &mut writer,
    )?;
    if writer.units != total_units {
        bail!(
            "the source reader stopped after {} of {total_units} blocks",
            writer.units
        );
    }
    Ok(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_bad_default_is_a_share_with_a_floor() {
        assert_eq!(MaxBad::Default.limit(1 << 30), Some(64 << 20));
        assert_eq!(MaxBad::Default.limit(1 << 40), Some((1u64 << 40) / 100));
        assert_eq!(MaxBad::Percent(50.0).limit(1000), Some(500));
        assert_eq!(MaxBad::Unlimited.limit(1000), None);
    }
}
