//! The target: what it is, whether the image fits it, and the owner's consent to overwrite it.

use super::table::ImageReader;
use super::{Range, Restore, RestoreOptions};
use crate::chain::Source;
use crate::device::{self, DeviceInfo};
use crate::format::Manifest;
use crate::progress::human_bytes;
use crate::ptable::PartitionTable;
use crate::reader::BlockDecoder;
use crate::repo::Image;
use anyhow::{anyhow, bail, Context, Result};
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

pub(super) struct Target {
    pub(super) is_block: bool,
    /// A regular file cairn creates: already all holes, nothing to zero.
    pub(super) fresh_file: bool,
}

/// Facts about an existing target; None for a path that does not exist yet (a new file).
pub(super) fn probe_target(path: &Path) -> Result<Option<DeviceInfo>> {
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

pub(super) fn prepare_target(
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
    for block in region.blocks(chain) {
        let (pieces, inside) = block?;
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

/// What to write: the byte range [start, end) of the image, at target offset (offset - start),
/// and how many bytes the target needs for it.
pub(super) fn range_to_write(
    opts: &RestoreOptions,
    id: &str,
    m: &Manifest,
    table: Option<&PartitionTable>,
) -> Result<(u64, u64, u64)> {
    let image_size = m.source.size;
    let Some(n) = opts.partition else {
        return Ok((0, image_size, image_size));
    };
    if opts.grow_last_partition {
        bail!("--grow-last-partition applies to whole-disk restores, not to --partition");
    }
    let t = table.ok_or_else(|| {
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
        bail!(
            "partition {n} of image {id} ends at byte {}, beyond the image's {image_size} bytes",
            p.end()
        );
    }
    Ok((p.start, p.end(), p.size))
}

/// The sector-size and size checks against a target device; returns where the written range
/// ends (before `end` when the image is fitted onto a smaller drive).
pub(super) fn check_size(
    restore: &Restore,
    tinfo: Option<&DeviceInfo>,
    end: u64,
    needed: u64,
) -> Result<u64> {
    let (id, tpath) = (&restore.id, &restore.opts.target);
    let Some(info) = tinfo.filter(|i| i.is_block()) else {
        return Ok(end);
    };
    if restore.whole {
        if let Some(t) = &restore.table {
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
    if info.size >= needed {
        return Ok(end);
    }
    match (&restore.table, restore.whole) {
        (Some(t), true) => {
            check_fits(&restore.chain, t, restore.image_size, info.size, tpath)?;
            Ok(info.size)
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
            restore.opts.partition.unwrap_or(0),
            needed
        ),
    }
}

/// A whole-disk table that must change to fit the target: can it (a last partition that can
/// grow, a GPT that can be relocated)?
pub(super) fn check_table_fits(restore: &Restore, target_size: u64) -> Result<()> {
    let (Some(t), true) = (&restore.table, restore.whole) else {
        return Ok(());
    };
    let (id, image_size, opts) = (&restore.id, restore.image_size, restore.opts);
    if opts.grow_last_partition {
        crate::ptable::check_growable(t, target_size)
            .with_context(|| format!("image {id}: nothing was written"))?;
    }
    let resized = target_size != image_size || opts.grow_last_partition;
    if t.kind == crate::ptable::TableKind::Gpt && resized {
        let mut r = ImageReader::new(&restore.chain)?;
        crate::ptable::check_relocatable(&mut r, u64::from(t.sector_size)).with_context(|| {
            format!(
                "image {id}'s GPT cannot be fitted to a drive of another size ({} bytes; the image is {image_size}); nothing was written",
                target_size
            )
        })?;
    }
    Ok(())
}
