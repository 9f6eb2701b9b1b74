//! Restore: plan (which image supplies each block) → read and check payloads → decode and verify
//! → write in ascending order. Nothing is written before every safety check has passed, and no
//! block is written before its crc and hash have been checked.

mod pipeline;
mod readback;
mod table;
mod target;

use crate::chain::{self, Piece};
use crate::device::{self, Access, DeviceInfo};
use crate::progress::{human_bytes, Progress};
use crate::repo::Repository;
use anyhow::{anyhow, bail, Context, Result};
use pipeline::{restore_pipeline, WriteOut, POOL_BUFFERS, QUEUE_DEPTH};
use readback::verify_target;
use serde::Serialize;
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::time::Instant;
use table::{image_table, reread_partitions, ImageReader};
use target::{check_fits, prepare_target, probe_target};

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
