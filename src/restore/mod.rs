//! Restore: plan (which image supplies each block) → read and check payloads → decode and verify
//! → write in ascending order. Nothing is written before every safety check has passed, and no
//! block is written before its crc and hash have been checked.

use crate::chain::{self, Piece, Planner, Source};
use crate::device::{self, buf::AlignedBuf, queue::Op, queue::Request, Access, DeviceInfo};
use crate::progress::{human_bytes, Progress};
use crate::reader::{self, BlockDecoder, ChainReader, Payload};
use crate::repo::{Image, Repository};
use anyhow::{anyhow, bail, Context, Result};
use crossbeam_channel::{Receiver, Sender};
use serde::Serialize;
use std::fs::OpenOptions;
use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct RestoreOptions {
    pub repo: PathBuf,
    pub target: PathBuf,
    pub name: Option<String>,
    pub image: Option<String>,
    pub yes: bool,
    /// Restore only this partition of a whole-disk image (its byte range, at offset 0 of the target).
    pub partition: Option<u32>,
    /// Extend the last partition to the end of a larger drive.
    pub grow_last_partition: bool,
    /// Read the target back (O_DIRECT) after the restore and compare it with the image's hashes.
    pub verify: bool,
}

#[derive(Debug, Serialize)]
pub struct RestoreReport {
    pub id: String,
    pub name: String,
    pub chain: Vec<String>,
    pub target: String,
    pub source_size: u64,
    /// Size of the target device (the restored size for a file).
    pub target_size: u64,
    /// `--partition N`.
    pub partition: Option<u32>,
    /// Image bytes [start, end) written, at target offset 0 for a partition.
    pub range: [u64; 2],
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    /// True when the target was read back and matched the image (`--verify`).
    pub verified: bool,
    /// What was changed in the partition table to fit the target, if anything.
    pub partition_table: Option<crate::ptable::TableChange>,
    /// What to do next (grow the filesystem of a grown partition).
    pub hints: Vec<String>,
    pub duration_ms: u64,
    pub io: String,
}

const QUEUE_DEPTH: usize = 8;
const POOL_BUFFERS: usize = 16;

/// Picks the image a command works on (`Repository::select_image`).
pub fn select_image(repo: &Repository, name: Option<&str>, image: Option<&str>) -> Result<String> {
    repo.select_image(name, image)
}

pub fn run(opts: &RestoreOptions, progress: &Progress) -> Result<RestoreReport> {
    let started = Instant::now();
    let repo = Repository::open(&opts.repo)?;
    let id = select_image(&repo, opts.name.as_deref(), opts.image.as_deref())?;
    let chain =
        chain::resolve(&repo, &id).with_context(|| format!("image {id} cannot be restored"))?;
    for img in &chain {
        img.check_segments_present()
            .with_context(|| format!("image {id} cannot be restored"))?;
    }
    let unreadable =
        chain::unreadable_at(&chain).with_context(|| format!("image {id} cannot be restored"))?;
    if !unreadable.is_empty() {
        let bytes: u64 = unreadable.iter().map(|r| r.1).sum();
        tracing::warn!(
            "restore point {id} was taken from a failing source: {bytes} bytes in {} ranges could not be read (zeros, or an older image's data where its chain has one; `cairn badmap --image {id}` lists them)",
            unreadable.len()
        );
    }
    let target_img = chain.last().expect("non-empty chain");
    let m = &target_img.manifest;
    let image_size = m.source.size;
    let tpath = &opts.target;

    let tinfo = probe_target(tpath)?;
    let is_block = tinfo.as_ref().is_some_and(DeviceInfo::is_block);
    // The partition table as the image holds it (authoritative for this restore point).
    let table = if m.source.kind == "partition" {
        None
    } else {
        use crate::ptable::ReadError;
        match image_table(&chain) {
            Ok(t) => t,
            Err(ReadError::Io(e)) => {
                return Err(e.context(format!(
                    "image {id} cannot be restored: the blocks holding its partition table could not be read; nothing was written"
                )))
            }
            Err(ReadError::Table(e)) if opts.partition.is_some() || opts.grow_last_partition => {
                return Err(e.context(format!("image {id}: cannot read its partition table")))
            }
            Err(ReadError::Table(e)) => {
                tracing::warn!(
                    "image {id}: its partition table is not one cairn can read ({e:#}); restoring its bytes as they are, without fitting the table to the target's size or checking the target's sector size against it"
                );
                None
            }
        }
    };

    // What to write: the byte range [start, end) of the image, at target offset (offset - start).
    let (start, end, needed) = if let Some(n) = opts.partition {
        if opts.grow_last_partition {
            bail!("--grow-last-partition applies to whole-disk restores, not to --partition");
        }
        let t = table.as_ref().ok_or_else(|| {
            anyhow!(
                "image {id} ({}, a {}) has no partition table, so it has no partition {n}",
                m.source.path,
                m.source.kind
            )
        })?;
        let p = t.partition(n).ok_or_else(|| {
            anyhow!(
                "image {id} has no partition {n}; its partitions are {}",
                t.partitions
                    .iter()
                    .map(|p| format!("{} ({})", p.number, human_bytes(p.size)))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        if p.extended {
            bail!("partition {n} of image {id} is an extended partition (a container); restore the logical partitions in it");
        }
        if p.end() > image_size {
            bail!("partition {n} of image {id} ends at byte {}, beyond the image's {image_size} bytes", p.end());
        }
        (p.start, p.end(), p.size)
    } else {
        (0, image_size, image_size)
    };
    let whole = opts.partition.is_none();
    if opts.grow_last_partition && table.is_none() {
        bail!("--grow-last-partition: image {id} has no partition table");
    }

    // Size and sector checks, before anything is written.
    let target_size = match &tinfo {
        Some(info) if info.is_block() => info.size,
        _ => needed,
    };
    let mut end = end;
    if let (Some(info), true) = (&tinfo, is_block) {
        if whole {
            if let Some(t) = &table {
                if info.logical_sector_size != t.sector_size {
                    bail!(
                        "image {id} is of a disk with {}-byte logical sectors and a {} partition table, but target {} has {}-byte sectors: every partition would be at the wrong place; restore onto a drive with {}-byte sectors, or restore single partitions with --partition N",
                        t.sector_size,
                        t.kind.as_str().to_uppercase(),
                        tpath.display(),
                        info.logical_sector_size,
                        t.sector_size
                    );
                }
            }
        }
        if info.size < needed {
            match (&table, whole) {
                (Some(t), true) => {
                    check_fits(&chain, t, image_size, info.size, tpath)?;
                    end = info.size;
                }
                (None, true) => bail!(
                    "target {} is too small: {} bytes, the image needs {} bytes (it has no partition table cairn could fit onto a smaller drive)",
                    tpath.display(),
                    info.size,
                    needed
                ),
                (_, false) => bail!(
                    "target {} is too small: {} bytes, partition {} is {} bytes",
                    tpath.display(),
                    info.size,
                    opts.partition.unwrap_or(0),
                    needed
                ),
            }
        }
    }
    if let (Some(t), true) = (&table, whole) {
        if opts.grow_last_partition {
            crate::ptable::check_growable(t, target_size)
                .with_context(|| format!("image {id}: nothing was written"))?;
        }
        let resized = target_size != image_size || opts.grow_last_partition;
        if t.kind == crate::ptable::TableKind::Gpt && resized {
            let mut r = ImageReader::new(&chain)?;
            crate::ptable::check_relocatable(&mut r, u64::from(t.sector_size)).with_context(
                || {
                    format!(
                        "image {id}'s GPT cannot be fitted to a drive of another size ({} bytes; the image is {image_size}); nothing was written",
                        target_size
                    )
                },
            )?;
        }
    }
    let target = prepare_target(tpath, &opts.repo, tinfo.as_ref(), opts.yes)?;
    // Every stored block this restore uses is read and checked before the first write.
    chain::precheck(&chain, (start, end), progress)
        .with_context(|| format!("image {id} cannot be restored; nothing was written"))?;

    let buffers = device::buf::pool(POOL_BUFFERS, m.block_size as usize);
    let mut handle = device::open(tpath, Access::Write, target.is_block, QUEUE_DEPTH, &buffers)?;
    let io = handle.queue.describe();
    if !target.is_block {
        handle
            .file
            .set_len(needed)
            .with_context(|| format!("cannot size {}", tpath.display()))?;
    }
    // Unaligned pieces cannot go through O_DIRECT; they are written through a buffered descriptor.
    let tail_file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(tpath)
        .with_context(|| format!("cannot open {}", tpath.display()))?;
    let what = match opts.partition {
        Some(n) => format!("partition {n} of image {id}"),
        None => format!("image {id}"),
    };
    tracing::info!(
        "restoring {what} ({} images in chain) onto {} [{io}]",
        chain.len(),
        tpath.display()
    );
    progress.start(end - start, &format!("{id} → {}", tpath.display()));

    let mut bytes_written = 0u64;
    let mut bytes_zeroed = 0u64;
    let range = Range { start, end };
    let write_result = restore_pipeline(
        &chain,
        range,
        &mut handle,
        buffers,
        |w| {
            match w {
                WriteOut::Zero { offset, len } => {
                    if !target.fresh_file {
                        device::zero_range(&tail_file, target.is_block, offset, len)?;
                    }
                    bytes_zeroed += len;
                    progress.advance(len);
                }
                WriteOut::Data { len } => {
                    bytes_written += len;
                    progress.advance(len);
                }
            }
            Ok(())
        },
        &tail_file,
    );
    progress.finish();
    write_result.with_context(|| {
        format!(
            "restore of {what} onto {} failed; the target is only partly written",
            tpath.display()
        )
    })?;
    handle.file.sync_all().context("flushing the target")?;
    tail_file.sync_all().context("flushing the target")?;
    drop(handle);

    let verified = if opts.verify {
        verify_target(&chain, range, tpath, progress).with_context(|| {
            format!(
                "verification of {} after the restore failed",
                tpath.display()
            )
        })?;
        true
    } else {
        false
    };

    let mut hints = Vec::new();
    // A GPT the target held before (its backup header in the last sector, beyond the image) would
    // make tools see a damaged GPT next to the restored MBR or bare data.
    let gpt_image = table
        .as_ref()
        .is_some_and(|t| t.kind == crate::ptable::TableKind::Gpt);
    if whole && target.is_block && target_size > image_size && !gpt_image {
        crate::ptable::clear_stale_gpt_backup(&tail_file, image_size, target_size)
            .context("clearing the target's old GPT backup header")?;
    }
    let mut table_change = None;
    if let (Some(t), true) = (&table, whole) {
        let mut f = tail_file;
        table_change = crate::ptable::fit_to_target(
            &mut f,
            t,
            image_size,
            target_size,
            opts.grow_last_partition,
        )
        .with_context(|| {
            format!(
                "the data of image {id} is on {}, but its partition table could not be fitted to the drive",
                tpath.display()
            )
        })?;
        if verified && t.kind == crate::ptable::TableKind::Gpt {
            crate::ptable::check_gpt(&mut f, u64::from(t.sector_size), target_size)
                .context("verifying the partition table after the restore")?;
        }
        if let Some(g) = table_change.as_ref().and_then(|c| c.grown.as_ref()) {
            let base = tpath.display().to_string();
            let dev = if base.ends_with(|c: char| c.is_ascii_digit()) {
                format!("{base}p{}", g.number)
            } else {
                format!("{base}{}", g.number)
            };
            hints.push(format!(
                "partition {} grew from {} to {}; grow its filesystem to match: e2fsck -f {dev} && resize2fs {dev} (ext2/3/4), or mount it and run xfs_growfs MOUNTPOINT (xfs) or btrfs filesystem resize max MOUNTPOINT (btrfs)",
                g.number,
                human_bytes(g.old_size),
                human_bytes(g.new_size)
            ));
        }
        if target.is_block {
            reread_partitions(tpath);
        }
    }

    Ok(RestoreReport {
        id: id.clone(),
        name: m.name.clone(),
        chain: chain.iter().map(|i| i.id().to_string()).collect(),
        target: tpath.display().to_string(),
        source_size: image_size,
        target_size,
        partition: opts.partition,
        range: [start, end],
        bytes_written,
        bytes_zeroed,
        verified,
        partition_table: table_change,
        hints,
        duration_ms: started.elapsed().as_millis() as u64,
        io,
    })
}

struct Target {
    is_block: bool,
    /// A regular file cairn creates: already all holes, nothing to zero.
    fresh_file: bool,
}

/// The byte range of the image a restore writes; it lands at target offset `offset - start`.
#[derive(Debug, Clone, Copy)]
struct Range {
    start: u64,
    end: u64,
}

impl Range {
    /// The part of a block's pieces inside the range.
    fn clip(&self, pieces: &[Piece]) -> Vec<Piece> {
        pieces
            .iter()
            .filter_map(|p| {
                let s = p.offset.max(self.start);
                let e = (p.offset + p.len).min(self.end);
                (s < e).then(|| Piece {
                    offset: s,
                    len: e - s,
                    source: p.source,
                })
            })
            .collect()
    }
}

/// Facts about an existing target; None for a path that does not exist yet (a new file).
fn probe_target(path: &Path) -> Result<Option<DeviceInfo>> {
    if !path.exists() {
        if device::on_devtmpfs(path) {
            bail!(
                "{} does not exist; check the device name with `lsblk` or `cairn disks` (cairn does not create files in /dev)",
                path.display()
            );
        }
        return Ok(None);
    }
    device::require_root_for(path)?;
    DeviceInfo::probe(path)
        .map(Some)
        .with_context(|| format!("cannot use target {}", path.display()))
}

fn prepare_target(
    path: &Path,
    repo: &Path,
    info: Option<&DeviceInfo>,
    yes: bool,
) -> Result<Target> {
    let Some(info) = info else {
        return Ok(Target {
            is_block: false,
            fresh_file: true,
        });
    };
    if info.is_block() {
        if let Some(why) = info.in_use_reason() {
            bail!(
                "refusing to write {}: {why}; unmount it first",
                path.display()
            );
        }
        if info.holds(repo) {
            bail!(
                "refusing to write {}: it holds the repository {}",
                path.display(),
                repo.display()
            );
        }
        let desc = format!(
            "{} ({}, model {}, serial {})",
            path.display(),
            human_bytes(info.size),
            info.model.as_deref().unwrap_or("unknown"),
            info.serial.as_deref().unwrap_or("unknown")
        );
        confirm(&desc, yes)?;
        Ok(Target {
            is_block: true,
            fresh_file: false,
        })
    } else {
        let meta = std::fs::metadata(path)?;
        if meta.len() > 0 {
            confirm(
                &format!(
                    "existing file {} ({})",
                    path.display(),
                    human_bytes(meta.len())
                ),
                yes,
            )?;
        }
        Ok(Target {
            is_block: false,
            fresh_file: meta.len() == 0,
        })
    }
}

fn confirm(what: &str, yes: bool) -> Result<()> {
    if yes {
        return Ok(());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!("refusing to overwrite {what} without confirmation: no terminal to ask on; pass --yes to confirm");
    }
    eprint!("All data on {what} will be overwritten.\nType 'yes' to continue: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    stdin.lock().read_line(&mut line)?;
    if line.trim() != "yes" {
        bail!("not confirmed; nothing was written");
    }
    Ok(())
}

/// What the writer did with one job, for accounting.
enum WriteOut {
    Zero { offset: u64, len: u64 },
    Data { len: u64 },
}

/// A block's payloads, read from the segments and crc-checked.
struct ReadJob {
    offset: u64,
    len: u64,
    pieces: Vec<Piece>,
    payloads: Vec<Payload>,
}

enum Job {
    Zero {
        seq: u64,
        offset: u64,
        len: u64,
    },
    /// With the buffer the block is decoded into.
    Data(u64, ReadJob, AlignedBuf),
}

impl crate::pipeline::Sequenced for Job {
    fn seq(&self) -> u64 {
        match self {
            Job::Zero { seq, .. } | Job::Data(seq, ..) => *seq,
        }
    }
}

enum Decoded {
    Zero {
        offset: u64,
        len: u64,
    },
    Data {
        offset: u64,
        len: usize,
        buf: AlignedBuf,
    },
}

/// Restore's use of the ordered pipeline: the repository reader produces checked payloads in
/// block order, the stage decodes and checks them, the target writer writes in order.
fn restore_pipeline(
    chain: &[Image],
    range: Range,
    handle: &mut device::Handle,
    buffers: Vec<AlignedBuf>,
    account: impl FnMut(WriteOut) -> Result<()>,
    tail_file: &std::fs::File,
) -> Result<()> {
    let (free_tx, free_rx) = device::buf::circulate(buffers);
    let direct = handle.direct;
    let mut writer = TargetWriter {
        queue: &mut handle.queue,
        direct,
        shift: range.start,
        free_tx: &free_tx,
        account,
        tail_file,
    };
    // The reader hands out the buffers, in block order: the block the writer waits for always
    // has one. (Decoders taking them raced: a fast decoder could take every buffer for later
    // blocks while the writer waited for an earlier one, and nothing moved again.)
    crate::pipeline::run(
        device::buf::stage_workers(),
        POOL_BUFFERS,
        move |tx| read_jobs(chain, range, tx, free_rx),
        || decode_stage(chain),
        &mut writer,
    )?;
    writer.drain()
}

fn read_jobs(
    chain: &[Image],
    range: Range,
    tx: Sender<Job>,
    free: Receiver<AlignedBuf>,
) -> Result<()> {
    let mut reader = ChainReader::new(chain);
    let mut seq = 0u64;
    let mut zero_run: Option<(u64, u64)> = None;
    // A closed channel means the writer stopped; its error is the one reported.
    let send = |job: Job| tx.send(job).is_ok();
    for pieces in Planner::new(chain) {
        let pieces = pieces?;
        if pieces[0].offset >= range.end {
            break;
        }
        let pieces = range.clip(&pieces);
        if pieces.is_empty() {
            continue;
        }
        let offset = pieces[0].offset;
        let len: u64 = pieces.iter().map(|p| p.len).sum();
        if pieces.len() == 1 && pieces[0].source == Source::Zero {
            zero_run = match zero_run {
                Some((o, l)) if o + l == offset => Some((o, l + len)),
                Some((o, l)) => {
                    if !send(Job::Zero {
                        seq,
                        offset: o,
                        len: l,
                    }) {
                        return Ok(());
                    }
                    seq += 1;
                    Some((offset, len))
                }
                None => Some((offset, len)),
            };
            continue;
        }
        if let Some((o, l)) = zero_run.take() {
            if !send(Job::Zero {
                seq,
                offset: o,
                len: l,
            }) {
                return Ok(());
            }
            seq += 1;
        }
        let payloads = reader.payloads(&pieces)?;
        let Ok(buf) = free.recv() else {
            return Ok(());
        };
        let job = ReadJob {
            offset,
            len,
            pieces,
            payloads,
        };
        if !send(Job::Data(seq, job, buf)) {
            return Ok(());
        }
        seq += 1;
    }
    if let Some((o, l)) = zero_run {
        send(Job::Zero {
            seq,
            offset: o,
            len: l,
        });
    }
    Ok(())
}

/// One decoder thread's stage: a block's payloads → its checked plaintext in the job's buffer.
fn decode_stage(chain: &[Image]) -> Result<impl FnMut(Job) -> Result<Decoded> + '_> {
    let mut dctx = zstd::bulk::Decompressor::new().context("zstd init")?;
    let mut scratch: Vec<u8> = Vec::new();
    Ok(move |job| match job {
        Job::Zero { offset, len, .. } => Ok(Decoded::Zero { offset, len }),
        Job::Data(_, j, mut buf) => {
            let len = j.len as usize;
            reader::assemble(
                chain,
                j.offset,
                &j.pieces,
                &j.payloads,
                &mut buf.as_mut_slice()[..len],
                &mut dctx,
                &mut scratch,
            )?;
            Ok(Decoded::Data {
                offset: j.offset,
                len,
                buf,
            })
        }
    })
}

/// Writes decoded blocks in order; image offset `o` lands at target offset `o - shift`.
struct TargetWriter<'a, A> {
    queue: &'a mut Box<dyn device::queue::IoQueue>,
    direct: bool,
    shift: u64,
    free_tx: &'a Sender<AlignedBuf>,
    account: A,
    tail_file: &'a std::fs::File,
}

impl<A: FnMut(WriteOut) -> Result<()>> TargetWriter<'_, A> {
    /// Waits for one write and hands its buffer back to the reader.
    fn reap(&mut self) -> Result<()> {
        let c = self.queue.wait().context("waiting for a write")?;
        c.result
            .with_context(|| format!("write error at offset {} of the target", c.offset))?;
        let _ = self.free_tx.send(c.buf);
        Ok(())
    }

    /// Waits for every write still in flight.
    fn drain(&mut self) -> Result<()> {
        while self.queue.in_flight() > 0 {
            self.reap()?;
        }
        Ok(())
    }
}

impl<A: FnMut(WriteOut) -> Result<()>> crate::pipeline::Consumer<Decoded> for TargetWriter<'_, A> {
    fn take(&mut self, d: Decoded) -> Result<()> {
        match d {
            Decoded::Zero { offset, len } => (self.account)(WriteOut::Zero {
                offset: offset - self.shift,
                len,
            }),
            Decoded::Data { offset, len, buf } => {
                let offset = offset - self.shift;
                let align = device::buf::ALIGN;
                if self.direct && (len % align != 0 || offset % align as u64 != 0) {
                    // An unaligned end (or a partition at an unaligned offset): written
                    // buffered, flushed with the rest.
                    self.tail_file
                        .write_all_at(&buf.as_slice()[..len], offset)
                        .with_context(|| format!("write error at offset {offset} of the target"))?;
                    let _ = self.free_tx.send(buf);
                } else {
                    while self.queue.in_flight() >= self.queue.depth() {
                        self.reap()?;
                    }
                    self.queue
                        .submit(Request {
                            op: Op::Write,
                            tag: offset,
                            offset,
                            start: 0,
                            len,
                            want: len,
                            buf,
                        })
                        .with_context(|| format!("submitting a write at offset {offset}"))?;
                }
                (self.account)(WriteOut::Data { len: len as u64 })
            }
        }
    }

    /// While the next block is being decoded, finished writes return their buffers.
    fn idle(&mut self) -> Result<bool> {
        if self.queue.in_flight() == 0 {
            return Ok(false);
        }
        self.reap()?;
        Ok(true)
    }
}

/// The restore point's bytes as a seekable stream (for the partition-table parsers). Decodes one
/// block at a time; a seek far away replans from the start, which costs index walking only.
struct ImageReader<'a> {
    dec: BlockDecoder<'a>,
    size: u64,
    block_size: u64,
    pos: u64,
    cache: Option<(u64, Vec<u8>)>,
}

impl<'a> ImageReader<'a> {
    fn new(chain: &'a [Image]) -> Result<Self> {
        // The restore point's geometry (a chain may change size; the Planner follows the last).
        let m = &chain.last().expect("non-empty chain").manifest;
        Ok(ImageReader {
            dec: BlockDecoder::new(chain)?,
            size: m.source.size,
            block_size: u64::from(m.block_size),
            pos: 0,
            cache: None,
        })
    }
}

impl std::io::Read for ImageReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.size || out.is_empty() {
            return Ok(0);
        }
        let block = self.pos / self.block_size;
        if self.cache.as_ref().map(|c| c.0) != Some(block) {
            let io = |e: anyhow::Error| std::io::Error::other(format!("{e:#}"));
            let mut planner = Planner::new(self.dec.chain());
            planner.seek(block).map_err(io)?;
            let pieces = planner
                .next()
                .ok_or_else(|| std::io::Error::other("restore plan ended early"))?
                .map_err(io)?;
            let data = self
                .dec
                .decode(&pieces)
                .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
            self.cache = Some((block, data));
        }
        let data = &self.cache.as_ref().expect("cached").1;
        let rel = (self.pos - block * self.block_size) as usize;
        let n = out.len().min(data.len() - rel);
        out[..n].copy_from_slice(&data[rel..rel + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl std::io::Seek for ImageReader<'_> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        let new = match pos {
            std::io::SeekFrom::Start(n) => Some(n),
            std::io::SeekFrom::End(d) => self.size.checked_add_signed(d),
            std::io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = new.ok_or_else(|| std::io::Error::other("seek out of range"))?;
        Ok(self.pos)
    }
}

/// The partition table stored in the restore point's data (None when it has none).
fn image_table(
    chain: &[Image],
) -> Result<Option<crate::ptable::PartitionTable>, crate::ptable::ReadError> {
    let m = &chain.last().expect("non-empty chain").manifest;
    let mut r = ImageReader::new(chain).map_err(crate::ptable::ReadError::Io)?;
    crate::ptable::read(&mut r, m.source.size, m.source.logical_sector_size)
}

/// The smaller-drive check: every partition must end inside the target, and no non-zero byte outside
/// the partitions may lie where the target has no room (beyond its end, or where the relocated GPT
/// backup goes) — other than the image's own GPT backup, which is relocated. Decodes only blocks that
/// have data in that region.
fn check_fits(
    chain: &[Image],
    table: &crate::ptable::PartitionTable,
    image_size: u64,
    target_size: u64,
    tpath: &Path,
) -> Result<()> {
    use crate::ptable::TableKind;
    let ss = u64::from(table.sector_size);
    let (limit, allowed_from) = match table.kind {
        TableKind::Gpt => {
            let last_usable = (target_size / ss)
                .checked_sub(2 + table.array_sectors())
                .ok_or_else(|| anyhow!("target {} is too small for a GPT", tpath.display()))?;
            let old_backup = table
                .last_usable_lba
                .map(|l| (l + 1) * ss)
                .unwrap_or(image_size);
            ((last_usable + 1) * ss, old_backup.min(image_size))
        }
        TableKind::Mbr => (target_size / ss * ss, image_size),
    };
    let sizes = format!(
        "target {} is {}, the image {}",
        tpath.display(),
        human_bytes(target_size),
        human_bytes(image_size)
    );
    if let Some(p) = table.partitions.iter().find(|p| p.end() > limit) {
        bail!(
            "{sizes}; partition {} ends at byte {}, but on this target partitions must end by byte {limit}: it does not fit. cairn does not shrink filesystems: shrink the filesystem and partition on the source (e.g. resize2fs, then gdisk or parted), take a new image, and restore that",
            p.number,
            p.end()
        );
    }
    if limit >= allowed_from {
        return Ok(());
    }
    let region = Range {
        start: limit,
        end: allowed_from,
    };
    // The first and the last non-zero byte there, to say what does not fit and what would.
    let mut first: Option<u64> = None;
    let mut last_end = 0u64;
    let mut dec = BlockDecoder::new(chain)?;
    for pieces in Planner::new(chain) {
        let pieces = pieces?;
        if pieces[0].offset >= region.end {
            break;
        }
        let inside = region.clip(&pieces);
        if !inside.iter().any(|p| p.source != Source::Zero) {
            continue;
        }
        let data = dec.decode(&pieces)?;
        let base = pieces[0].offset;
        for p in inside.iter().filter(|p| p.source != Source::Zero) {
            let rel = (p.offset - base) as usize;
            let bytes = &data[rel..rel + p.len as usize];
            if let Some(i) = bytes.iter().position(|&b| b != 0) {
                let j = bytes.iter().rposition(|&b| b != 0).unwrap_or(i);
                first.get_or_insert(p.offset + i as u64);
                last_end = last_end.max(p.offset + j as u64 + 1);
            }
        }
    }
    if let Some(at) = first {
        let room_after = match table.kind {
            TableKind::Gpt => (1 + table.array_sectors()) * ss,
            TableKind::Mbr => 0,
        };
        let need = last_end.div_ceil(ss) * ss + room_after;
        bail!(
            "{sizes}; the image holds data outside its partitions from byte {at} to byte {last_end}, beyond byte {limit} where this target's room ends (partitions end by byte {}): refusing to cut it off. It needs a drive of at least {need} bytes",
            table.partitions_end()
        );
    }
    Ok(())
}

/// Reads the target back with O_DIRECT (buffered where the filesystem refuses it) and compares
/// every restored byte with the image: zero regions must be zero, stored extents must hash to the
/// index's BLAKE3 (or, when only part of an extent is used, equal its decoded bytes).
fn verify_target(chain: &[Image], range: Range, path: &Path, progress: &Progress) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let direct = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path);
    let buffered =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let direct = match direct {
        Ok(f) => Some(f),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(
                "{}: O_DIRECT refused; verifying through the page cache",
                path.display()
            );
            None
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!("cannot open {}", path.display())))
        }
    };
    let bs = chain.last().expect("non-empty chain").manifest.block_size as usize;
    let id = chain.last().expect("non-empty chain").id().to_string();
    let mut buf = AlignedBuf::new(bs, 0);
    let mut dec = BlockDecoder::new(chain)?;
    progress.start(
        range.end - range.start,
        &format!("verify {}", path.display()),
    );
    let align = device::buf::ALIGN as u64;
    for pieces in Planner::new(chain) {
        let pieces = pieces?;
        if pieces[0].offset >= range.end {
            break;
        }
        let pieces = range.clip(&pieces);
        if pieces.is_empty() {
            continue;
        }
        let off = pieces[0].offset;
        let len: u64 = pieces.iter().map(|p| p.len).sum();
        let toff = off - range.start;
        let dst = &mut buf.as_mut_slice()[..len as usize];
        let f = match &direct {
            Some(f) if toff % align == 0 && len % align == 0 => f,
            _ => &buffered,
        };
        f.read_exact_at(dst, toff).with_context(|| {
            format!("reading {len} bytes at offset {toff} of {}", path.display())
        })?;
        for p in &pieces {
            let rel = (p.offset - off) as usize;
            let got = &dst[rel..rel + p.len as usize];
            let same = match p.source {
                Source::Zero => crate::format::is_zero(got),
                Source::Entry(ci, ei) => {
                    let e = crate::chain::entry(&chain[ci], ei as u64)?;
                    if e.offset == p.offset && u64::from(e.length) == p.len {
                        blake3::hash(got).as_bytes() == &e.hash
                    } else {
                        let want = dec.entry(ci, ei)?;
                        let from = (p.offset - e.offset) as usize;
                        want[from..from + p.len as usize] == *got
                    }
                }
            };
            if !same {
                bail!(
                    "{} differs from image {id} in the {} bytes at target offset {} (image offset {})",
                    path.display(),
                    p.len,
                    p.offset - range.start,
                    p.offset
                );
            }
        }
        progress.advance(len);
    }
    progress.finish();
    Ok(())
}

/// Asks the kernel to re-read a whole disk's partition table (BLKRRPART) so the restored partitions
/// appear; a busy disk keeps its old view, which a reboot or `partprobe` fixes.
fn reread_partitions(path: &Path) {
    nix::ioctl_none_bad!(blkrrpart, 0x125f);
    let Ok(f) = std::fs::File::open(path) else {
        return;
    };
    // SAFETY: BLKRRPART takes no argument; fd is an open block device.
    if let Err(e) = unsafe { blkrrpart(std::os::fd::AsRawFd::as_raw_fd(&f)) } {
        if e != nix::errno::Errno::EINVAL {
            tracing::warn!(
                "{}: the kernel did not re-read the partition table ({e}); run `partprobe {}`",
                path.display(),
                path.display()
            );
        }
    }
}
