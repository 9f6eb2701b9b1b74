//! `--verify`: the target read back and compared with the image.

use super::Range;
use crate::chain::Source;
use crate::device::{self, buf::AlignedBuf};
use crate::progress::Progress;
use crate::reader::BlockDecoder;
use crate::repo::Image;
use anyhow::{bail, Context, Result};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Reads the target back with O_DIRECT (buffered where the filesystem refuses it) and compares
/// every restored byte with the image: zero regions must be zero, stored extents must hash to the
/// index's BLAKE3 (or, when only part of an extent is used, equal its decoded bytes).
pub(super) fn verify_target(
    chain: &[Image],
    range: Range,
    path: &Path,
    progress: &Progress,
) -> Result<()> {
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
    for block in range.blocks(chain) {
        let (_, pieces) = block?;
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
