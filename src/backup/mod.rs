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
use crate::format::manifest::Stats;
use crate::format::{self, ImageKind, Method, SourceIdentity};
use crate::progress::Progress;
use crate::repo::{Catalogue, Image, ImageWriter, RepoLock, Repository};
use crate::tracker;
use anyhow::{bail, Context, Result};
use plan::{Decision, Plan, Work};
use read::{io_shape, read_all, Geometry, POOL_BUFFERS};
use serde::Serialize;
use stage::block_stage;
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use write::SegmentSink;

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
    let info = open_source(opts)?;
    let partition_table = crate::ptable::for_backup(&info);
    let repo = Repository::open_or_create(&opts.repo)?;
    let lock = repo.lock()?;
    repo.remove_leftovers(&lock)?;

    let name = image_name(opts, &info)?;
    let catalogue = repo.catalogue()?;
    let (plan, base_chain, mut tracking) = make_plan(opts, &info, &repo, &catalogue, &lock, name);
    let mut writer = repo.begin_image(&plan.id, opts.segment_size, &lock)?;

    let stored = read_and_store(
        opts,
        &info,
        &plan,
        &base_chain,
        &mut writer,
        tracking.session.as_mut(),
        progress,
    )?;
    drop(base_chain);
    plan::check_parent_unchanged(&repo, plan.parent.as_ref(), &opts.source)?;

    let written = write::finish_files(&mut writer, &stored.bad_ranges, stored.stats, started)?;
    let sequence = repo.reserve_sequence(&catalogue, &lock)?;
    let manifest = write::manifest(
        &plan,
        &info,
        opts.level,
        written,
        tracking.cut.as_ref(),
        partition_table,
        sequence,
    );
    write::publish(writer, &manifest, &opts.source)?;
    drop(lock);
    tell_tracker(tracking.session, &stored.bad_ranges);
    Ok(report(
        opts,
        &info,
        plan,
        &manifest.stats,
        stored.io,
        stored.bad_ranges,
        started,
    ))
}

/// Decides the new image's kind, parent and method (asking the tracker), and names it. Returns
/// the base chain a compare-scan compares with (empty otherwise).
fn make_plan(
    opts: &BackupOptions,
    info: &DeviceInfo,
    repo: &Repository,
    catalogue: &Catalogue,
    lock: &RepoLock,
    name: String,
) -> (Plan, Vec<Image>, plan::Tracking) {
    let Decision {
        kind,
        parent,
        parent_chain,
        note,
        fallback,
    } = plan::decide(repo, catalogue, opts.kind, &name);
    let granule = parent.as_ref().map_or(format::GRANULE, |(m, _)| m.granule);
    let block_size = parent
        .as_ref()
        .map_or(opts.block_size, |(m, _)| m.block_size);
    // The tracker is asked for every backup, a full included: the cut starts (or continues) the
    // history the next incremental proves its continuity against.
    let consumer = format!("{}/{}", repo.identity(), name);
    let tracking = plan::ask_tracker(
        &opts.state_dir,
        info,
        &consumer,
        kind,
        parent.as_ref(),
        granule,
    );
    let (method, method_reason) = plan::choose_method(kind, fallback, &tracking);

    let created_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let id = repo.new_image_id(created_unix, lock);
    // What to compare with: the parent chain, checked restorable above (dropped when not needed,
    // as it holds every index of the chain).
    let base_chain: Vec<Image> = if method == Method::CompareScan {
        parent_chain
    } else {
        drop(parent_chain);
        Vec::new()
    };
    let work = plan::work_for(method, tracking.cut.as_ref());
    let plan = Plan {
        id,
        name,
        kind,
        parent,
        note,
        method,
        method_reason,
        granule,
        block_size,
        created_unix,
        work,
    };
    (plan, base_chain, tracking)
}

/// Probes the source and refuses one that cannot be backed up (empty, or holding the repository).
fn open_source(opts: &BackupOptions) -> Result<DeviceInfo> {
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
    Ok(info)
}

/// The name asked for, or the source's default name.
fn image_name(opts: &BackupOptions, info: &DeviceInfo) -> Result<String> {
    Ok(match &opts.name {
        Some(n) if !format::valid_name(n) => bail!(
            "invalid name {n:?}: use letters, digits, '.', '_', '-' and ':', starting with a letter or digit"
        ),
        Some(n) => n.clone(),
        None => info.default_name(),
    })
}

/// What reading the source stored.
struct Stored {
    stats: Stats,
    bad_ranges: BadRanges,
    io: String,
}

/// Reads the source through the block stages into the new image's segments and index. The
/// tracker's `session` supplies a tracked image's changed runs as they are read, or takes a
/// differential compare-scan's repair set as it is found.
fn read_and_store(
    opts: &BackupOptions,
    info: &DeviceInfo,
    plan: &Plan,
    base_chain: &[Image],
    writer: &mut ImageWriter,
    session: Option<&mut tracker::Session>,
    progress: &Progress,
) -> Result<Stored> {
    let to_read = plan.work.bytes(info.size, plan.granule);
    let (depth, pool) = io_shape(&plan.work);
    let buffers = device::buf::pool(pool, plan.block_size as usize);
    let handle = device::open(&opts.source, Access::Read, info.is_block(), depth, &buffers)?;
    let io = handle.queue.describe();
    let id = &plan.id;
    tracing::info!(
        "{} backup ({}) of {} ({} bytes) to {} as {id} [{io}]",
        plan.kind.as_str(),
        method_name(plan.method),
        opts.source.display(),
        info.size,
        opts.repo.display()
    );
    progress.start(
        to_read,
        &format!(
            "{} → {id} ({})",
            opts.source.display(),
            method_name(plan.method)
        ),
    );

    let geometry = Geometry {
        size: info.size,
        block_size: plan.block_size,
        granule: plan.granule,
        sector: info.logical_sector_size.max(512) as usize,
        max_bad: opts.max_bad.limit(info.size),
    };
    let (runs, repair) = match (&plan.work, session) {
        (Work::Tracked(changed), Some(s)) => (Some(s.changed_runs(*changed)), None),
        (_, Some(s)) if repairs_tracker(plan) => (None, Some(s.repair())),
        _ => (None, None),
    };
    let mut sink = write::ImageSink::new(writer, plan.granule, plan.kind, repair);
    let bad_ranges = pipeline(
        handle,
        buffers,
        geometry,
        &opts.source,
        opts.level,
        (&plan.work, runs),
        base_chain,
        |unit| {
            progress.advance(unit.read_len);
            sink.take(unit)
        },
    )
    .with_context(|| {
        format!(
            "backup of {} failed; the repository is unchanged",
            opts.source.display()
        )
    })?;
    progress.finish();
    if let Some(repair) = sink.found.take() {
        repair.finish();
    }
    Ok(Stored {
        stats: sink.stats,
        bad_ranges,
        io,
    })
}

/// A differential compare-scan tells the tracker every granule it read, so the tracker's
/// since-last-full map can be rebuilt from what the image holds.
fn repairs_tracker(plan: &Plan) -> bool {
    plan.kind == ImageKind::Differential && plan.method == Method::CompareScan
}

/// Only now, with the image published, may the tracker forget what this image holds —
/// except the unreadable ranges: their content is unknown, so the next backup reads them again.
fn tell_tracker(session: Option<tracker::Session>, bad_ranges: &[(u64, u64)]) {
    if let Some(s) = session {
        if let Err(e) = s.commit(bad_ranges) {
            tracing::warn!("the tracker did not take the commit ({e:#}); the next backup will include these changes again");
        }
    }
}

fn report(
    opts: &BackupOptions,
    info: &DeviceInfo,
    plan: Plan,
    stats: &Stats,
    io: String,
    bad_ranges: BadRanges,
    started: Instant,
) -> BackupReport {
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    BackupReport {
        id: plan.id,
        name: plan.name,
        kind: plan.kind.as_str(),
        parent: plan.parent.as_ref().map(|(m, _)| m.id.clone()),
        method: method_name(plan.method),
        method_reason: plan.method_reason,
        note: plan.note,
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
    }
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
    (work, runs): (&Work, Option<tracker::ChangedRuns<'_>>),
    base: &[Image],
    sink: impl FnMut(Unit<'_>) -> Result<()>,
) -> Result<BadRanges> {
    let (free_tx, free_rx) = device::buf::circulate(buffers);
    let mut writer = SegmentSink {
        sink,
        free_tx,
        units: 0,
    };
    let read = crate::pipeline::run(
        device::buf::stage_workers(),
        POOL_BUFFERS,
        move |tx| read_all(handle, geo, source, work, base, runs, free_rx, tx),
        || block_stage(level, geo.granule as usize, base),
        &mut writer,
    )?;
    if !read.complete || writer.units != read.units {
        bail!(
            "the source reader stopped early: {} of {} units were stored",
            writer.units,
            read.units
        );
    }
    Ok(read.bad)
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
