//! The partition table the image holds, read from its data, and the kernel's view after a restore.

use crate::chain::Planner;
use crate::reader::BlockDecoder;
use crate::repo::Image;
use anyhow::Result;
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
pub(super) fn image_table(
    chain: &[Image],
) -> Result<Option<crate::ptable::PartitionTable>, crate::ptable::ReadError> {
    let m = &chain.last().expect("non-empty chain").manifest;
    let mut r = ImageReader::new(chain).map_err(crate::ptable::ReadError::Io)?;
    crate::ptable::read(&mut r, m.source.size, m.source.logical_sector_size)
}

/// Asks the kernel to re-read a whole disk's partition table (BLKRRPART) so the restored partitions
/// appear; a busy disk keeps its old view, which a reboot or `partprobe` fixes.
pub(super) fn reread_partitions(path: &Path) {
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
