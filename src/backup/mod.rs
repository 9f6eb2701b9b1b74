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

use crate::chain::{self, Piece, Planner, Source};
use crate::device::{self, buf::AlignedBuf, queue::Op, queue::Request, Access, DeviceInfo, Kind};
use crate::format::frame::Codec;
use crate::format::manifest::{IndexRef, ParentRef, Stats, TrackingRef};
use crate::format::{
    self, hash_hex, is_zero, Entry, EntryKind, FrameHeader, ImageKind, Manifest, Method,
    SourceIdentity,
};
use crate::progress::Progress;
use crate::repo::{Image, Repository};
use crate::tracker::{self, protocol::CutKind, protocol::Token};
use anyhow::{anyhow, bail, Context, Result};
use crossbeam_channel::{Receiver, Sender};
use serde::Serialize;
use std::collections::BTreeMap;
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

/// Buffers in circulation: queue depth plus room for the workers and the writer's reorder window.
const QUEUE_DEPTH: usize = 16;
const POOL_BUFFERS: usize = 24;

/// Reads in flight and buffers for a backup reading `work`: scattered small extents (a tracked
/// incremental) need many reads in flight to keep the device busy; whole blocks need fewer.
fn io_shape(work: &Work) -> (usize, usize) {
    match work {
        Work::Extents(_) => (32, 40),
        _ => (QUEUE_DEPTH, POOL_BUFFERS),
    }
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

struct Decision {
    kind: ImageKind,
    /// The image this one is relative to, with its manifest hash.
    parent: Option<(Manifest, format::Hash)>,
    /// The parent's restore point, oldest first (empty for a full).
    parent_chain: Vec<Image>,
    note: Option<String>,
    /// Why the parent is not the image the kind asks for (whose chain is broken), when it is not.
    fallback: Option<String>,
}

/// Full for a new name (or when asked); otherwise incremental (default) or differential, relative
/// to the newest image (the newest full for a differential) whose chain is restorable. Never onto
/// a broken chain: when that image's chain is broken the parent is the newest restorable one
/// before it (`fallback` says so), and a full when there is none.
fn decide_kind(
    asked: Option<ImageKind>,
    history: &[(Manifest, format::Hash)],
    name: &str,
    mut restorable: impl FnMut(&Manifest) -> Result<Vec<Image>>,
) -> Decision {
    let wanted = asked.unwrap_or(if history.is_empty() {
        ImageKind::Full
    } else {
        ImageKind::Incremental
    });
    let full = |note: Option<String>| Decision {
        kind: ImageKind::Full,
        parent: None,
        parent_chain: Vec::new(),
        note,
        fallback: None,
    };
    if wanted == ImageKind::Full {
        return full(None);
    }
    let mut candidates = history
        .iter()
        .rev()
        .filter(|(m, _)| wanted != ImageKind::Differential || m.kind == ImageKind::Full)
        .peekable();
    if candidates.peek().is_none() {
        return full(Some(format!(
            "{name} has no full image yet: taking a full image, which starts the chain"
        )));
    }
    let mut broken: Option<String> = None;
    for candidate in candidates {
        match restorable(&candidate.0) {
            Ok(chain) => {
                let fallback = broken.map(|why| {
                    format!(
                        "{why}; this {} is relative to {}, the newest restorable image, by compare-scan",
                        wanted.as_str(),
                        candidate.0.id
                    )
                });
                return Decision {
                    kind: wanted,
                    parent: Some(candidate.clone()),
                    parent_chain: chain,
                    note: fallback.clone(),
                    fallback,
                };
            }
            Err(e) => {
                broken.get_or_insert_with(|| {
                    format!(
                        "image {} cannot be a parent, its restore point is broken ({e:#})",
                        candidate.0.id
                    )
                });
            }
        }
    }
    full(Some(format!(
        "{}; no image of {name} is restorable: taking a full image, which starts a new chain",
        broken.unwrap_or_default()
    )))
}

/// The restore point ending at `m`, when it is complete and restorable: every manifest and index
/// present and checked, parent hashes matching, every segment present at its size.
fn restorable_chain(repo: &Repository, m: &Manifest) -> Result<Vec<Image>> {
    let chain = chain::resolve(repo, &m.id)?;
    for img in &chain {
        img.check_segments_present()?;
    }
    Ok(chain)
}

/// Every readable image of `name`, oldest first. Unreadable manifests are never taken as a parent
/// (`verify` reports them).
fn images_of_name(
    repo: &Repository,
    catalogue: &crate::repo::Catalogue,
    name: &str,
) -> Vec<(Manifest, format::Hash)> {
    catalogue
        .of_name(name)
        .filter_map(|i| match repo.load_manifest(&i.id) {
            Ok(mh) => Some(mh),
            Err(e) => {
                tracing::warn!("skipping unreadable image: {e:#}");
                None
            }
        })
        .collect()
}

/// The whole disk and byte range the tracker knows this source by.
fn tracked_range(info: &DeviceInfo) -> std::result::Result<((u32, u32), u64, u64), String> {
    match info.kind {
        Kind::File => Err("the source is a file; only block devices are tracked".into()),
        Kind::Disk => Ok((info.devno.expect("block device"), 0, info.size)),
        Kind::Partition => {
            let (Some(devno), Some(parent)) = (info.devno, info.parent_devno) else {
                return Err("cannot find the disk holding this partition".into());
            };
            let start =
                std::fs::read_to_string(format!("/sys/dev/block/{}:{}/start", devno.0, devno.1))
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or("cannot read the partition's start from sysfs")?;
            Ok((parent, start * 512, info.size))
        }
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

/// Granule runs → read extents, each inside one block.
fn extents_from_runs(
    runs: &[(u64, u64)],
    granule: u64,
    block_size: u64,
    size: u64,
) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(g, n) in runs {
        let mut at = g * granule;
        let end = ((g + n) * granule).min(size);
        while at < end {
            let block_end = (at / block_size + 1) * block_size;
            let stop = end.min(block_end);
            out.push((at, stop - at));
            at = stop;
        }
    }
    out
}

#[derive(Clone, Copy)]
struct Geometry {
    size: u64,
    block_size: u32,
    /// Resolution of compare-scans.
    granule: u32,
    /// Logical sector size: the smallest unit a failed read is narrowed down to.
    sector: usize,
    /// Give up when more than this many bytes are unreadable.
    max_bad: Option<u64>,
}

/// What the reader reads.
enum Work {
    /// Every block; store whatever is not zero.
    All,
    /// Every block, compared with the base chain; store what differs.
    Compare,
    /// Only these extents (offset, length), each inside one block.
    Extents(Vec<(u64, u64)>),
}

impl Work {
    fn bytes(&self, size: u64) -> u64 {
        match self {
            Work::All | Work::Compare => size,
            Work::Extents(e) => e.iter().map(|x| x.1).sum(),
        }
    }
}

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

struct ReadUnit {
    seq: u64,
    offset: u64,
    len: usize,
    buf: AlignedBuf,
    /// For a compare-scan: what the base chain holds for this block.
    expected: Option<Vec<Piece>>,
    /// Unreadable ranges (absolute, ascending) not to store: the parent chain's data stays.
    skip: Vec<(u64, u64)>,
}

impl crate::pipeline::Sequenced for ReadUnit {
    fn seq(&self) -> u64 {
        self.seq
    }
}

enum Stage {
    Zero,
    /// Stored as read: this range of the read buffer.
    Raw(usize),
    Zstd(Vec<u8>),
}

struct StagedOut {
    offset: u64,
    len: u64,
    hash: format::Hash,
    stage: Stage,
}

struct Processed {
    len: usize,
    outs: Vec<StagedOut>,
    buf: AlignedBuf,
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

/// Log lines about individual unreadable ranges before they are only counted (a dying disk can
/// have hundreds of thousands; `cairn badmap` lists them all).
const LOGGED_BAD_RANGES: usize = 20;

/// Watches the source for the failures that are not bad sectors: a device that went away or
/// changed size under the backup (see device::fault for why each errno means what).
struct SourceWatch<'a> {
    file: &'a std::fs::File,
    path: &'a std::path::Path,
    size: u64,
    faults: Option<&'a device::fault::Faults>,
}

impl SourceWatch<'_> {
    /// Fails when the source is no longer there at the size the backup started with.
    fn check(&self, reached: u64) -> Result<()> {
        let path = self.path.display();
        match device::fault::current_size(self.file, self.faults, reached) {
            Ok(s) if s == self.size => Ok(()),
            Ok(0) => bail!(
                "the source {path} went away during the backup (its size is now 0, noticed at offset {reached}): reconnect it and back up again"
            ),
            Ok(s) => bail!(
                "the source {path} changed size during the backup (from {} to {s} bytes, noticed at offset {reached}): back up again once it is stable",
                self.size
            ),
            Err(e) if device::fault::means_gone(&e) => bail!(
                "the source {path} went away during the backup (checking its size after offset {reached}: {}): reconnect it and back up again",
                device::fault::describe(&e)
            ),
            Err(e) => bail!(
                "cannot check the size of the source {path} after a read error ({})",
                device::fault::describe(&e)
            ),
        }
    }

    /// The error for a read failure that is not a bad sector, after checking whether the
    /// source is still there (a vanished or resized device explains it better).
    fn fatal(&self, offset: u64, e: &std::io::Error) -> anyhow::Error {
        if let Err(why) = self.check(offset) {
            return why;
        }
        let path = self.path.display();
        let what = device::fault::describe(e);
        if device::fault::means_gone(e) {
            anyhow!("the source {path} went away during the backup (reading offset {offset} failed with {what}): reconnect it and back up again")
        } else if e.kind() == std::io::ErrorKind::UnexpectedEof {
            anyhow!("the source {path} ended early, at offset {offset} of {} bytes: back up again once it is stable", self.size)
        } else {
            anyhow!("reading the source {path} failed at offset {offset} with {what}: a failure of the device or its connection, not a bad sector")
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn read_all(
    mut handle: device::Handle,
    geo: Geometry,
    source: &std::path::Path,
    work: &Work,
    base: &[Image],
    free_rx: Receiver<AlignedBuf>,
    work_tx: Sender<ReadUnit>,
) -> Result<Vec<(u64, u64)>> {
    let bs = u64::from(geo.block_size);
    let mut bad: Vec<(u64, u64)> = Vec::new();
    let faults = device::fault::Faults::from_env();
    let blocks = geo.size.div_ceil(bs);
    let mut planner = match work {
        Work::Compare if !base.is_empty() => Some(Planner::new(base)),
        _ => None,
    };
    // A full image keeps zeros where the source was unreadable; an incremental or differential
    // stores nothing there, so the parent chain's data stays in force (and is flagged).
    let store_unreadable = matches!(work, Work::All);
    let unit = |i: u64| -> (u64, u64) {
        match work {
            Work::All | Work::Compare => (i * bs, (geo.size - i * bs).min(bs)),
            Work::Extents(e) => e[i as usize],
        }
    };
    let total = match work {
        Work::All | Work::Compare => blocks,
        Work::Extents(e) => e.len() as u64,
    };
    // Expected pieces wait here from submission until their read completes.
    let mut expected: BTreeMap<u64, Vec<Piece>> = BTreeMap::new();
    let watch = SourceWatch {
        file: &handle.file,
        path: source,
        size: geo.size,
        faults: faults.as_ref(),
    };
    let q = &mut handle.queue;
    let mut next = 0u64;
    let mut reached = 0u64;
    let mut failed_reads = 0usize;
    let mut bad_bytes = 0u64;
    loop {
        while next < total && q.in_flight() < q.depth() {
            let buf = if q.in_flight() == 0 {
                match free_rx.recv() {
                    Ok(b) => b,
                    Err(_) => return Ok(bad), // writer stopped; its error is reported
                }
            } else {
                match free_rx.try_recv() {
                    Ok(b) => b,
                    Err(_) => break,
                }
            };
            let (offset, want) = unit(next);
            let want = want as usize;
            let len = if handle.direct {
                device::buf::align_up(want)
            } else {
                want
            };
            if let Some(p) = planner.as_mut() {
                expected.insert(
                    next,
                    fit_pieces(
                        p.next().transpose()?.unwrap_or_default(),
                        offset,
                        want as u64,
                    ),
                );
            }
            reached = reached.max(offset);
            q.submit(Request {
                op: Op::Read,
                tag: next,
                offset,
                start: 0,
                len,
                want,
                buf,
            })
            .with_context(|| format!("submitting a read at offset {offset}"))?;
            next += 1;
        }
        if q.in_flight() == 0 {
            // A device that grew or shrank without failing a read is caught here.
            watch.check(reached)?;
            return Ok(bad);
        }
        let mut c = q.wait().context("waiting for a read")?;
        let (_, want) = unit(c.tag);
        let mut skip: Vec<(u64, u64)> = Vec::new();
        if let Err(e) = &c.result {
            if device::fault::classify(e) == device::fault::ErrorClass::Fatal {
                return Err(watch.fatal(c.offset, e));
            }
            watch.check(reached)?;
            // A failing disk: do not give up on the image. Narrow the failure down to the
            // unreadable sectors and record where they are.
            failed_reads += 1;
            if failed_reads <= LOGGED_BAD_RANGES {
                tracing::warn!(
                    "read error at offset {} ({}); narrowing it down to the unreadable sectors",
                    c.offset,
                    device::fault::describe(e)
                );
            }
            let found = device::fault::read_around_errors(
                watch.file,
                c.offset,
                &mut c.buf.as_mut_slice()[..want as usize],
                geo.sector,
                faults.as_ref(),
            )
            .map_err(|e| watch.fatal(c.offset, &e))?;
            // Reads that failed because the device died meanwhile are not bad sectors.
            watch.check(reached)?;
            for (o, l) in found {
                if bad.len() < LOGGED_BAD_RANGES {
                    tracing::warn!(
                        "unreadable: {l} bytes at offset {o}, {}",
                        if store_unreadable {
                            "stored as zeros"
                        } else {
                            "the parent chain's data stays for the granules around them"
                        }
                    );
                } else if bad.len() == LOGGED_BAD_RANGES {
                    tracing::warn!("more unreadable ranges follow; `cairn badmap` lists them all");
                }
                // Index entries are whole granules, so an image that stores nothing for a bad
                // sector stores nothing for its granule either: the parent's data stands for all
                // of it, and all of it is recorded (the rest of the granule was read, but a
                // restore does not give what was read there).
                let (o, l) = if store_unreadable {
                    (o, l)
                } else {
                    let g = u64::from(geo.granule);
                    let start = o / g * g;
                    let end = ((o + l).div_ceil(g) * g).min(geo.size);
                    (start, end - start)
                };
                if !store_unreadable {
                    match skip.last_mut() {
                        Some((so, sl)) if *so + *sl >= o => *sl = (*sl).max(o + l - *so),
                        _ => skip.push((o, l)),
                    }
                }
                match bad.last_mut() {
                    Some((bo, bl)) if *bo + *bl >= o => {
                        let grown = (*bl).max(o + l - *bo);
                        bad_bytes += grown - *bl;
                        *bl = grown;
                    }
                    _ => {
                        bad_bytes += l;
                        bad.push((o, l));
                    }
                }
            }
            let total = bad_bytes;
            if let Some(max) = geo.max_bad.filter(|&m| total > m) {
                bail!("{total} bytes of the source are unreadable, more than --max-bad allows ({max} bytes); giving up (see `cairn backup --help` on --max-bad)");
            }
        }
        let unit = ReadUnit {
            seq: c.tag,
            offset: c.offset,
            len: want as usize,
            buf: c.buf,
            expected: expected.remove(&c.tag),
            skip,
        };
        if work_tx.send(unit).is_err() {
            return Ok(bad);
        }
    }
}

/// One block-stage thread: zero test, hash, compare with the base chain, compress.
fn block_stage(
    level: i32,
    granule: usize,
    base: &[Image],
) -> Result<impl FnMut(ReadUnit) -> Result<Processed> + '_> {
    let mut compressor = zstd::bulk::Compressor::new(level).context("zstd init")?;
    if level <= 1 {
        // Level 1's default hash table is sized for streams; for 1 MiB blocks a 32 Ki-entry
        // table (hashLog 15) stores 1.6 % less at the same speed (measured on tools/bench's
        // disk: 1184.5 vs 1203.9 MB, 4.46 s either way), which also keeps images smaller than
        // `zstd -1` of the whole device despite per-block frames.
        compressor
            .set_parameter(zstd::stream::raw::CParameter::HashLog(15))
            .context("zstd parameters")?;
    }
    let mut comparer = Comparer::new(base, granule)?;
    Ok(move |u: ReadUnit| {
        let data = &u.buf.as_slice()[..u.len];
        let wanted = match &u.expected {
            None => vec![(0, u.len)],
            Some(pieces) => comparer.changed_ranges(data, u.offset, pieces)?,
        };
        let mut outs = Vec::new();
        for (start, end) in without(wanted, &u.skip, u.offset) {
            outs.push(stage_extent(
                &mut compressor,
                &data[start..end],
                start,
                u.offset + start as u64,
            ));
        }
        Ok(Processed {
            len: u.len,
            outs,
            buf: u.buf,
        })
    })
}

/// `ranges` (ascending, disjoint, relative to a unit read at `offset`) minus the absolute,
/// ascending ranges `skip`.
fn without(ranges: Vec<(usize, usize)>, skip: &[(u64, u64)], offset: u64) -> Vec<(usize, usize)> {
    if skip.is_empty() {
        return ranges;
    }
    let skip: Vec<(usize, usize)> = skip
        .iter()
        .map(|&(o, l)| ((o - offset) as usize, (o - offset + l) as usize))
        .collect();
    let mut out = Vec::new();
    let mut si = 0;
    for (mut start, end) in ranges {
        while si < skip.len() && skip[si].1 <= start {
            si += 1;
        }
        let mut k = si;
        while start < end {
            match skip.get(k) {
                Some(&(s, e)) if s < end => {
                    if s > start {
                        out.push((start, s));
                    }
                    start = start.max(e);
                    k += 1;
                }
                _ => {
                    out.push((start, end));
                    break;
                }
            }
        }
    }
    out
}

/// Zero test, hash, and compression of one extent (`at` is its position in the read buffer).
fn stage_extent(
    compressor: &mut zstd::bulk::Compressor<'_>,
    data: &[u8],
    at: usize,
    offset: u64,
) -> StagedOut {
    let len = data.len() as u64;
    if is_zero(data) {
        return StagedOut {
            offset,
            len,
            hash: zero_hash(data.len()),
            stage: Stage::Zero,
        };
    }
    let hash = *blake3::hash(data).as_bytes();
    // An output buffer one byte smaller than the input: if zstd cannot fit the block in it,
    // compression does not pay and the block is stored raw.
    let mut out = Vec::with_capacity(data.len() - 1);
    let stage = match compressor.compress_to_buffer(data, &mut out) {
        Ok(_) if out.len() < data.len() => Stage::Zstd(out),
        _ => Stage::Raw(at),
    };
    StagedOut {
        offset,
        len,
        hash,
        stage,
    }
}

/// The base chain's pieces for one block, fitted to the block as it is now: cut at the source's
/// new end after a shrink, and extended with zero (what a restore of the base gives there) after
/// a growth.
fn fit_pieces(mut pieces: Vec<Piece>, offset: u64, len: u64) -> Vec<Piece> {
    let end = offset + len;
    pieces.retain(|p| p.offset < end);
    if let Some(last) = pieces.last_mut() {
        last.len = last.len.min(end - last.offset);
    }
    let covered = pieces.last().map_or(offset, |p| p.offset + p.len);
    if covered < end {
        pieces.push(Piece {
            offset: covered,
            len: end - covered,
            source: Source::Zero,
        });
    }
    pieces
}

/// A block stage's access to the base chain's data, for comparing at granule resolution.
struct Comparer<'a> {
    base: &'a [Image],
    granule: usize,
    dec: crate::reader::BlockDecoder<'a>,
}

impl<'a> Comparer<'a> {
    fn new(base: &'a [Image], granule: usize) -> Result<Self> {
        Ok(Comparer {
            base,
            granule: granule.max(512),
            dec: crate::reader::BlockDecoder::new(base)?,
        })
    }

    /// The byte ranges of `data` (a block read at `offset`) that differ from what the base chain
    /// holds there, at granule resolution. A piece that is one whole entry of the chain and hashes
    /// to its hash is unchanged without further work; otherwise the chain's data is decoded and
    /// compared granule by granule, so a 4 KiB write costs 4 KiB of image, not its 1 MiB block.
    /// Where the chain's stored data is damaged the piece counts as changed and is stored again
    /// (the new image then no longer needs the damaged block); any other failure to read the
    /// chain (no descriptors left, an I/O error on the repository's disk) fails the backup.
    fn changed_ranges(
        &mut self,
        data: &[u8],
        offset: u64,
        pieces: &[Piece],
    ) -> Result<Vec<(usize, usize)>> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        let g = self.granule;
        let mut mark = |from: usize, to: usize| match out.last_mut() {
            Some((_, end)) if *end == from => *end = to,
            _ => out.push((from, to)),
        };
        for p in pieces {
            let from = (p.offset - offset) as usize;
            let to = from + p.len as usize;
            let slice = &data[from..to];
            match p.source {
                Source::Zero => {
                    for (i, chunk) in slice.chunks(g).enumerate() {
                        if !is_zero(chunk) {
                            mark(from + i * g, from + i * g + chunk.len());
                        }
                    }
                }
                Source::Entry(ci, ei) => {
                    let e = crate::chain::entry(&self.base[ci], ei as u64)?;
                    let whole = e.offset == p.offset && u64::from(e.length) == p.len;
                    if whole && blake3::hash(slice).as_bytes() == &e.hash {
                        continue;
                    }
                    let skip = (p.offset - e.offset) as usize;
                    match self.dec.entry(ci, ei) {
                        Ok(old) => {
                            let old = &old[skip..skip + slice.len()];
                            for (i, (a, b)) in slice.chunks(g).zip(old.chunks(g)).enumerate() {
                                if a != b {
                                    mark(from + i * g, from + i * g + a.len());
                                }
                            }
                        }
                        Err(err) if crate::reader::is_damage(&err) => {
                            tracing::warn!("the parent chain is damaged here ({err:#}); storing this part again");
                            mark(from, to);
                        }
                        Err(err) => {
                            return Err(err.context(format!(
                                "cannot read the parent chain to compare the block at offset {}",
                                p.offset
                            )))
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

fn zero_hash(len: usize) -> format::Hash {
    thread_local! {
        static CACHE: std::cell::RefCell<Option<(usize, format::Hash)>> = const { std::cell::RefCell::new(None) };
    }
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        match *c {
            Some((l, h)) if l == len => h,
            _ => {
                let h = *blake3::hash(&vec![0u8; len]).as_bytes();
                *c = Some((len, h));
                h
            }
        }
    })
}

/// The in-order end of a backup: hands each unit's staged extents to the segment-writing sink
/// and the unit's buffer back to the reader.
struct SegmentSink<F> {
    sink: F,
    free_tx: Sender<AlignedBuf>,
    units: u64,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_pieces_fit_a_grown_or_shrunk_source() {
        let p = |offset, len, source| Piece {
            offset,
            len,
            source,
        };
        let old = vec![p(0, 4096, Source::Zero), p(4096, 4096, Source::Entry(0, 3))];
        assert_eq!(
            fit_pieces(old.clone(), 0, 12288),
            vec![old[0].clone(), old[1].clone(), p(8192, 4096, Source::Zero)]
        );
        assert_eq!(
            fit_pieces(old.clone(), 0, 6144),
            vec![old[0].clone(), p(4096, 2048, Source::Entry(0, 3))]
        );
        assert_eq!(
            fit_pieces(Vec::new(), 1 << 20, 4096),
            vec![p(1 << 20, 4096, Source::Zero)]
        );
    }

    #[test]
    fn unreadable_ranges_are_left_out_of_what_is_stored() {
        let at = 1 << 20;
        let skip = [(at + 4096, 4096), (at + 16384, 8192)];
        assert_eq!(
            without(vec![(0, 8192), (12288, 20480), (32768, 40960)], &skip, at),
            vec![(0, 4096), (12288, 16384), (32768, 40960)]
        );
        assert_eq!(without(vec![(0, 65536)], &[], at), vec![(0, 65536)]);
        assert_eq!(without(vec![(4096, 8192)], &skip, at), vec![]);
    }

    #[test]
    fn max_bad_default_is_a_share_with_a_floor() {
        assert_eq!(MaxBad::Default.limit(1 << 30), Some(64 << 20));
        assert_eq!(MaxBad::Default.limit(1 << 40), Some((1u64 << 40) / 100));
        assert_eq!(MaxBad::Percent(50.0).limit(1000), Some(500));
        assert_eq!(MaxBad::Unlimited.limit(1000), None);
    }

    #[test]
    fn runs_become_extents_inside_blocks() {
        let size = (4 << 20) - 100;
        let e = extents_from_runs(
            &[(0, 2), (250, 10), (1000, 5), (1023, 5)],
            4096,
            1 << 20,
            size,
        );
        assert_eq!(
            e,
            vec![
                (0, 8192),
                (250 * 4096, 6 * 4096),
                (1 << 20, 4 * 4096),
                (1000 * 4096, 5 * 4096),
                (1023 * 4096, size - 1023 * 4096)
            ]
        );
    }
}
