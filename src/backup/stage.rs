//! The block stage: zero test, hash, compare with the base chain, compress.

use super::read::ReadUnit;
use crate::chain::{Piece, Source};
use crate::device::buf::AlignedBuf;
use crate::format::{self, is_zero};
use crate::repo::Image;
use anyhow::{Context, Result};

pub(super) enum Stage {
    Zero,
    /// Stored as read: this range of the read buffer.
    Raw(usize),
    Zstd(Vec<u8>),
}

pub(super) struct StagedOut {
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) hash: format::Hash,
    pub(super) stage: Stage,
}

pub(super) struct Processed {
    pub(super) len: usize,
    pub(super) outs: Vec<StagedOut>,
    pub(super) buf: AlignedBuf,
}

/// One block-stage thread: zero test, hash, compare with the base chain, compress.
pub(super) fn block_stage(
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
/// ascending (offset, length) ranges `skip`.
fn without(ranges: Vec<(usize, usize)>, skip: &[(u64, u64)], offset: u64) -> Vec<(usize, usize)> {
    if skip.is_empty() {
        return ranges;
    }
    let absolute: Vec<(u64, u64)> = ranges
        .iter()
        .map(|&(s, e)| (offset + s as u64, offset + e as u64))
        .collect();
    let skip: Vec<(u64, u64)> = skip.iter().map(|&(o, l)| (o, o + l)).collect();
    crate::chain::spans::subtract(&absolute, &skip)
        .into_iter()
        .map(|(s, e)| ((s - offset) as usize, (e - offset) as usize))
        .collect()
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
pub(super) fn fit_pieces(mut pieces: Vec<Piece>, offset: u64, len: u64) -> Vec<Piece> {
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
}
