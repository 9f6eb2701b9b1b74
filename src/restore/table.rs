//! The partition table the image holds, read from its data, and the kernel's view after a restore.

use super::target::Target;
use super::{Restore, RestoreOptions};
use crate::chain::Planner;
use crate::format::Manifest;
use crate::progress::human_bytes;
use crate::ptable::{PartitionTable, ReadError, TableChange, TableKind};
use crate::reader::BlockDecoder;
use crate::repo::Image;
use anyhow::{Context, Result};
use std::path::Path;

/// The restore point's bytes as a seekable stream (for the partition-table parsers). Decodes one
/// block at a time; a seek far away replans from the start, which costs index walking only.
pub(super) struct ImageReader<'a> {
    dec: BlockDecoder<'a>,
    size: u64,
    block_size: u64,
    pos: u64,
    cache: Option<(u64, Vec<u8>)>,
}

impl<'a> ImageReader<'a> {
    pub(super) fn new(chain: &'a [Image]) -> Result<Self> {
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

/// The partition table as the image holds it; None for a partition's image, and for a table cairn
/// cannot read when nothing asked needs it.
pub(super) fn read_table(
    chain: &[Image],
    id: &str,
    m: &Manifest,
    opts: &RestoreOptions,
) -> Result<Option<PartitionTable>> {
    if m.source.kind == "partition" {
        return Ok(None);
    }
    match image_table(chain) {
        Ok(t) => Ok(t),
        Err(ReadError::Io(e)) => Err(e.context(format!(
            "image {id} cannot be restored: the blocks holding its partition table could not be read; nothing was written"
        ))),
        Err(ReadError::Table(e)) if opts.partition.is_some() || opts.grow_last_partition => {
            Err(e.context(format!("image {id}: cannot read its partition table")))
        }
        Err(ReadError::Table(e)) => {
            tracing::warn!(
                "image {id}: its partition table is not one cairn can read ({e:#}); restoring its bytes as they are, without fitting the table to the target's size or checking the target's sector size against it"
            );
            Ok(None)
        }
    }
}

/// After the data is written: the image's partition table fitted to the target's size, and what
/// to do next about a grown partition.
pub(super) fn fit_to_target(
    restore: &Restore,
    target: &Target,
    target_size: u64,
    verified: bool,
    tail_file: std::fs::File,
) -> Result<(Option<TableChange>, Vec<String>)> {
    let (id, image_size, tpath) = (&restore.id, restore.image_size, &restore.opts.target);
    let mut hints = Vec::new();
    // A GPT the target held before (its backup header in the last sector, beyond the image) would
    // make tools see a damaged GPT next to the restored MBR or bare data.
    let gpt_image = restore
        .table
        .as_ref()
        .is_some_and(|t| t.kind == TableKind::Gpt);
    if restore.whole && target.is_block && target_size > image_size && !gpt_image {
        crate::ptable::clear_stale_gpt_backup(&tail_file, image_size, target_size)
            .context("clearing the target's old GPT backup header")?;
    }
    let (Some(t), true) = (&restore.table, restore.whole) else {
        return Ok((None, hints));
    };
    let mut f = tail_file;
    let table_change = crate::ptable::fit_to_target(
        &mut f,
        t,
        image_size,
        target_size,
        restore.opts.grow_last_partition,
    )
    .with_context(|| {
        format!(
            "the data of image {id} is on {}, but its partition table could not be fitted to the drive",
            tpath.display()
        )
    })?;
    if verified && t.kind == TableKind::Gpt {
        crate::ptable::check_gpt(&mut f, u64::from(t.sector_size), target_size)
            .context("verifying the partition table after the restore")?;
    }
    if let Some(g) = table_change.as_ref().and_then(|c| c.grown.as_ref()) {
        hints.push(grow_hint(tpath, g));
    }
    if target.is_block {
        reread_partitions(tpath);
    }
    Ok((table_change, hints))
}

/// What to run to grow the filesystem of the grown partition `g` of the disk at `tpath`.
fn grow_hint(tpath: &Path, g: &crate::ptable::Grown) -> String {
    let base = tpath.display().to_string();
    let dev = if base.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{base}p{}", g.number)
    } else {
        format!("{base}{}", g.number)
    };
    format!(
        "partition {} grew from {} to {}; grow its filesystem to match: e2fsck -f {dev} && resize2fs {dev} (ext2/3/4), or mount it and run xfs_growfs MOUNTPOINT (xfs) or btrfs filesystem resize max MOUNTPOINT (btrfs)",
        g.number,
        human_bytes(g.old_size),
        human_bytes(g.new_size)
    )
}
