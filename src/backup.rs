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
    self, hash_hex, is_zero, Entry, EntryKind, FrameHeader, ImageKind, Index, Manifest, Method,
    SourceIdentity,
};
use crate::progress::Progress;
use crate::repo::{Image, Repository};
use crate::tracker::{self, protocol::CutKind, protocol::Token};
use anyhow::{anyhow, bail, Context, Result};
use crossbeam_channel::{bounded, Receiver, Sender};
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
    /// Fail when more than this many bytes are unreadable (None: no limit).
    pub max_bad: Option<u64>,
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
    let history = images_of_name(&repo, &name)?;
    let Decision { kind, parent, note } = decide_kind(opts.kind, &history, &name);

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

    // What to read, and what to compare it with.
    let base_chain: Vec<Image> = match (method, &parent) {
        (Method::CompareScan, Some((m, _))) => chain::resolve(&repo, &m.id).with_context(|| {
            format!(
                "the parent image {} cannot be read for a compare-scan",
                m.id
            )
        })?,
        _ => Vec::new(),
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
        max_bad: opts.max_bad,
    };
    let mut stats = Stats::default();
    let mut found: Vec<(u64, u64)> = Vec::new();
    let explicit_zero = kind != ImageKind::Full;
    let entries = pipeline(
        handle,
        buffers,
        geometry,
        opts.level,
        &work,
        &base_chain,
        |unit| {
            progress.advance(unit.read_len);
            stats.blocks_total += 1;
            stats.bytes_read += unit.read_len;
            let mut entries = Vec::new();
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
                        entries.push(Entry {
                            offset: out.offset,
                            length: out.len as u32,
                            kind: EntryKind::Zero,
                            segment: 0,
                            stored_length: 0,
                            segment_offset: 0,
                            crc: 0,
                            hash: out.hash,
                        });
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
                entries.push(Entry {
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
                });
            }
            Ok(entries)
        },
    )
    .with_context(|| {
        format!(
            "backup of {} failed; the repository is unchanged",
            opts.source.display()
        )
    })?;
    progress.finish();

    let segments = writer.finish_segments()?;
    let (entries, bad_ranges) = entries;
    let index = Index { entries };
    let index_bytes = index.encode();
    stats.stored_bytes = segments.iter().map(|s| s.size).sum::<u64>() + index_bytes.len() as u64;
    stats.duration_ms = started.elapsed().as_millis() as u64;
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
            entries: index.entries.len() as u64,
            size: index_bytes.len() as u64,
            blake3: blake3::hash(&index_bytes).to_hex().to_string(),
        },
        segments,
        stats: stats.clone(),
        bad_ranges: bad_ranges.clone(),
        tracking: cut.as_ref().map(|c| TrackingRef {
            lineage: c.token.lineage.clone(),
            seq: c.token.seq,
        }),
        partition_table,
    };
    // What the loader would refuse is never committed (the temporary image is removed).
    manifest
        .validate()
        .map_err(|e| anyhow!("the new image's manifest is invalid ({e}); nothing was kept"))?;
    let (manifest_bytes, _) = manifest.encode();
    writer.commit(&index_bytes, &manifest_bytes)?;
    drop(lock);
    // Only now, with the image published, may the tracker forget what this image holds.
    if let Some(s) = session {
        let repair =
            (kind == ImageKind::Differential && method == Method::CompareScan).then_some(found);
        if let Err(e) = s.commit(repair) {
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
    note: Option<String>,
}

/// Full for a new name (or when asked); otherwise incremental (default) or differential.
fn decide_kind(
    asked: Option<ImageKind>,
    history: &[(Manifest, format::Hash)],
    name: &str,
) -> Decision {
    let wanted = asked.unwrap_or(if history.is_empty() {
        ImageKind::Full
    } else {
        ImageKind::Incremental
    });
    let full = |note: Option<String>| Decision {
        kind: ImageKind::Full,
        parent: None,
        note,
    };
    if wanted == ImageKind::Full {
        return full(None);
    }
    let parent = match wanted {
        ImageKind::Differential => history
            .iter()
            .rev()
            .find(|(m, _)| m.kind == ImageKind::Full),
        _ => history.last(),
    };
    let Some(parent) = parent else {
        return full(Some(format!(
            "{name} has no full image yet: taking a full image, which starts the chain"
        )));
    };
    Decision {
        kind: wanted,
        parent: Some(parent.clone()),
        note: None,
    }
}

/// Every readable image of `name`, oldest first. Damaged manifests are skipped here (verify
/// reports them): a damaged image is never taken as a parent.
fn images_of_name(repo: &Repository, name: &str) -> Result<Vec<(Manifest, format::Hash)>> {
    let mut out = Vec::new();
    for id in repo.image_ids()? {
        match repo.load_manifest(&id) {
            Ok((m, h)) if m.name == name => out.push((m, h)),
            Ok(_) => {}
            Err(e) => tracing::warn!("skipping unreadable image: {e:#}"),
        }
    }
    // image_ids() is in creation order already.
    Ok(out)
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
    seq: u64,
    len: usize,
    outs: Vec<StagedOut>,
    buf: AlignedBuf,
}

/// Unreadable (offset, length) ranges of the source.
type BadRanges = Vec<(u64, u64)>;

/// Runs the pipeline, calling `sink` for each read unit in order on the caller's thread. Returns
/// the index entries the sink produced.
fn pipeline(
    handle: device::Handle,
    buffers: Vec<AlignedBuf>,
    geo: Geometry,
    level: i32,
    work: &Work,
    base: &[Image],
    mut sink: impl FnMut(Unit<'_>) -> Result<Vec<Entry>>,
) -> Result<(Vec<Entry>, BadRanges)> {
    let total_units = match work {
        Work::All | Work::Compare => geo.size.div_ceil(u64::from(geo.block_size)),
        Work::Extents(e) => e.len() as u64,
    };
    let workers = device::buf::stage_workers();
    let (free_tx, free_rx) = device::buf::circulate(buffers);
    let (work_tx, work_rx) = bounded::<ReadUnit>(POOL_BUFFERS);
    let (done_tx, done_rx) = bounded::<Processed>(POOL_BUFFERS);

    std::thread::scope(|s| {
        let reader = s.spawn(move || read_all(handle, geo, work, base, free_rx, work_tx));
        let mut stage = Vec::new();
        for _ in 0..workers {
            let rx = work_rx.clone();
            let tx = done_tx.clone();
            stage.push(s.spawn(move || block_stage(level, geo.granule as usize, base, rx, tx)));
        }
        drop(work_rx);
        drop(done_tx);

        let written = write_in_order(total_units, &done_rx, &free_tx, &mut sink);
        // Unblock everything upstream before joining, whatever happened.
        drop(done_rx);
        drop(free_tx);
        let read_result = reader
            .join()
            .map_err(|_| anyhow!("reader thread panicked"))?;
        for w in stage {
            w.join()
                .map_err(|_| anyhow!("block-stage thread panicked"))??;
        }
        // A reader error explains a short writer run; report it first.
        let bad = read_result?;
        Ok((written?, bad))
    })
}

fn read_all(
    mut handle: device::Handle,
    geo: Geometry,
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
    let q = &mut handle.queue;
    let mut next = 0u64;
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
                    fit_pieces(p.next().unwrap_or_default(), offset, want as u64),
                );
            }
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
            return Ok(bad);
        }
        let mut c = q.wait().context("waiting for a read")?;
        let (_, want) = unit(c.tag);
        if let Err(e) = &c.result {
            // A failing disk: do not give up on the image. Narrow the failure down to the
            // unreadable sectors, keep them as zeros and record where they are.
            tracing::warn!(
                "read error at offset {} ({e}); narrowing it down to the unreadable sectors",
                c.offset
            );
            let found = device::fault::read_around_errors(
                &handle.file,
                c.offset,
                &mut c.buf.as_mut_slice()[..want as usize],
                geo.sector,
                faults.as_ref(),
            );
            for (o, l) in found {
                tracing::warn!("unreadable: {l} bytes at offset {o}, stored as zeros");
                match bad.last_mut() {
                    Some((bo, bl)) if *bo + *bl == o => *bl += l,
                    _ => bad.push((o, l)),
                }
            }
            let total: u64 = bad.iter().map(|r| r.1).sum();
            if let Some(max) = geo.max_bad.filter(|&m| total > m) {
                bail!("{total} bytes of the source are unreadable, more than --max-bad {max}; giving up");
            }
        }
        let unit = ReadUnit {
            seq: c.tag,
            offset: c.offset,
            len: want as usize,
            buf: c.buf,
            expected: expected.remove(&c.tag),
        };
        if work_tx.send(unit).is_err() {
            return Ok(bad);
        }
    }
}

fn block_stage(
    level: i32,
    granule: usize,
    base: &[Image],
    rx: Receiver<ReadUnit>,
    tx: Sender<Processed>,
) -> Result<()> {
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
    for u in rx {
        let data = &u.buf.as_slice()[..u.len];
        let mut outs = Vec::new();
        match &u.expected {
            None => outs.push(stage_extent(&mut compressor, data, 0, u.offset)),
            Some(pieces) => {
                for (start, end) in comparer.changed_ranges(data, u.offset, pieces) {
                    outs.push(stage_extent(
                        &mut compressor,
                        &data[start..end],
                        start,
                        u.offset + start as u64,
                    ));
                }
            }
        }
        let p = Processed {
            seq: u.seq,
            len: u.len,
            outs,
            buf: u.buf,
        };
        if tx.send(p).is_err() {
            break;
        }
    }
    Ok(())
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
    readers: Vec<crate::repo::SegmentReader>,
    dctx: zstd::bulk::Decompressor<'static>,
    payload: Vec<u8>,
    /// The plaintext of the last entry decoded, and which one it is.
    old: Vec<u8>,
    old_entry: Option<(usize, usize)>,
}

impl<'a> Comparer<'a> {
    fn new(base: &'a [Image], granule: usize) -> Result<Self> {
        Ok(Comparer {
            base,
            granule: granule.max(512),
            readers: base.iter().map(Image::segment_reader).collect(),
            dctx: zstd::bulk::Decompressor::new().context("zstd init")?,
            payload: Vec::new(),
            old: Vec::new(),
            old_entry: None,
        })
    }

    /// The checked plaintext of entry `ei` of chain image `ci`.
    fn entry(&mut self, ci: usize, ei: usize) -> Result<&[u8]> {
        if self.old_entry != Some((ci, ei)) {
            self.old_entry = None;
            let e = &self.base[ci].index.entries[ei];
            let codec = self.readers[ci].read_payload(e, &mut self.payload)?;
            self.old.resize(e.length as usize, 0);
            crate::repo::decode_checked(
                self.base[ci].id(),
                e,
                codec,
                &self.payload,
                &mut self.dctx,
                &mut self.old,
            )?;
            self.old_entry = Some((ci, ei));
        }
        Ok(&self.old)
    }

    /// The byte ranges of `data` (a block read at `offset`) that differ from what the base chain
    /// holds there, at granule resolution. A piece that is one whole entry of the chain and hashes
    /// to its hash is unchanged without further work; otherwise the chain's data is decoded and
    /// compared granule by granule, so a 4 KiB write costs 4 KiB of image, not its 1 MiB block.
    /// If the chain's data cannot be read, the piece counts as changed (stored again).
    fn changed_ranges(
        &mut self,
        data: &[u8],
        offset: u64,
        pieces: &[Piece],
    ) -> Vec<(usize, usize)> {
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
                    let e = &self.base[ci].index.entries[ei];
                    let whole = e.offset == p.offset && u64::from(e.length) == p.len;
                    if whole && blake3::hash(slice).as_bytes() == &e.hash {
                        continue;
                    }
                    let skip = (p.offset - e.offset) as usize;
                    match self.entry(ci, ei) {
                        Ok(old) => {
                            let old = &old[skip..skip + slice.len()];
                            for (i, (a, b)) in slice.chunks(g).zip(old.chunks(g)).enumerate() {
                                if a != b {
                                    mark(from + i * g, from + i * g + a.len());
                                }
                            }
                        }
                        Err(err) => {
                            tracing::warn!("cannot compare with the parent chain ({err:#}); storing this part again");
                            mark(from, to);
                        }
                    }
                }
            }
        }
        out
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

fn write_in_order(
    total_units: u64,
    done_rx: &Receiver<Processed>,
    free_tx: &Sender<AlignedBuf>,
    sink: &mut impl FnMut(Unit<'_>) -> Result<Vec<Entry>>,
) -> Result<Vec<Entry>> {
    let mut pending: BTreeMap<u64, Processed> = BTreeMap::new();
    let mut entries = Vec::new();
    let mut next = 0u64;
    while next < total_units {
        let p = match pending.remove(&next) {
            Some(p) => p,
            None => {
                let p = done_rx
                    .recv()
                    .map_err(|_| anyhow!("the source reader stopped early"))?;
                if p.seq != next {
                    pending.insert(p.seq, p);
                    continue;
                }
                p
            }
        };
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
        entries.extend(sink(Unit {
            read_len: p.len as u64,
            outs,
        })?);
        let _ = free_tx.send(p.buf);
        next += 1;
    }
    Ok(entries)
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
