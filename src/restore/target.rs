//! The target: what it is, whether the image fits it, and the owner's consent to overwrite it.

use super::Range;
use crate::chain::{Planner, Source};
use crate::device::{self, DeviceInfo};
use crate::progress::human_bytes;
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
pub(super) fn check_fits(
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
