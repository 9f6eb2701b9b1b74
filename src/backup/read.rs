//! The source reader: drives the I/O queue over the work, narrows failed reads down to the
//! unreadable sectors, and watches for a source that went away or changed size.

use super::plan::Work;
use super::stage::fit_pieces;
use crate::chain::{Piece, Planner};
use crate::device::{self, buf::AlignedBuf, queue::Op, queue::Request};
use crate::repo::Image;
use anyhow::{anyhow, bail, Context, Result};
use crossbeam_channel::{Receiver, Sender};
use std::collections::BTreeMap;

/// Buffers in circulation: queue depth plus room for the workers and the writer's reorder window.
pub(super) const QUEUE_DEPTH: usize = 16;
pub(super) const POOL_BUFFERS: usize = 24;

/// Reads in flight and buffers for a backup reading `work`: scattered small extents (a tracked
/// incremental) need many reads in flight to keep the device busy; whole blocks need fewer.
pub(super) fn io_shape(work: &Work) -> (usize, usize) {
    match work {
        Work::Extents(_) => (32, 40),
        _ => (QUEUE_DEPTH, POOL_BUFFERS),
    }
}

#[derive(Clone, Copy)]
pub(super) struct Geometry {
    pub(super) size: u64,
    pub(super) block_size: u32,
    /// Resolution of compare-scans.
    pub(super) granule: u32,
    /// Logical sector size: the smallest unit a failed read is narrowed down to.
    pub(super) sector: usize,
    /// Give up when more than this many bytes are unreadable.
    pub(super) max_bad: Option<u64>,
}

pub(super) struct ReadUnit {
    pub(super) seq: u64,
    pub(super) offset: u64,
    pub(super) len: usize,
    pub(super) buf: AlignedBuf,
    /// For a compare-scan: what the base chain holds for this block.
    pub(super) expected: Option<Vec<Piece>>,
    /// Unreadable ranges (absolute, ascending) not to store: the parent chain's data stays.
    pub(super) skip: Vec<(u64, u64)>,
}

impl crate::pipeline::Sequenced for ReadUnit {
    fn seq(&self) -> u64 {
        self.seq
    }
}

/// Log lines about individual unreadable ranges before they are only counted (a dying disk can
/// have hundreds of thousands; `cairn badmap` lists them all).
const LOGGED_BAD_RANGES: usize = 20;

/// Watches the source for the failures that are not bad sectors: a device that went away or
/// changed size under the backup (see device::fault for why each errno means what).
struct SourceWatch<'a> {
    file: &'a std::fs::File,
    path: &'a std::path::Path,
    size: u64,
    faults: Option<&'a device::fault::Faults>,
}

impl SourceWatch<'_> {
    /// Fails when the source is no longer there at the size the backup started with.
    fn check(&self, reached: u64) -> Result<()> {
        let path = self.path.display();
        match device::fault::current_size(self.file, self.faults, reached) {
            Ok(s) if s == self.size => Ok(()),
            Ok(0) => bail!(
                "the source {path} went away during the backup (its size is now 0, noticed at offset {reached}): reconnect it and back up again"
            ),
            Ok(s) => bail!(
                "the source {path} changed size during the backup (from {} to {s} bytes, noticed at offset {reached}): back up again once it is stable",
                self.size
            ),
            Err(e) if device::fault::means_gone(&e) => bail!(
                "the source {path} went away during the backup (checking its size after offset {reached}: {}): reconnect it and back up again",
                device::fault::describe(&e)
            ),
            Err(e) => bail!(
                "cannot check the size of the source {path} after a read error ({})",
                device::fault::describe(&e)
            ),
        }
    }

    /// The error for a read failure that is not a bad sector, after checking whether the
    /// source is still there (a vanished or resized device explains it better).
    fn fatal(&self, offset: u64, e: &std::io::Error) -> anyhow::Error {
        if let Err(why) = self.check(offset) {
            return why;
        }
        let path = self.path.display();
        let what = device::fault::describe(e);
        if device::fault::means_gone(e) {
            anyhow!("the source {path} went away during the backup (reading offset {offset} failed with {what}): reconnect it and back up again")
        } else if e.kind() == std::io::ErrorKind::UnexpectedEof {
            anyhow!("the source {path} ended early, at offset {offset} of {} bytes: back up again once it is stable", self.size)
        } else {
            anyhow!("reading the source {path} failed at offset {offset} with {what}: a failure of the device or its connection, not a bad sector")
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn read_all(
    mut handle: device::Handle,
    geo: Geometry,
    source: &std::path::Path,
    work: &Work,
    base: &[Image],
    free_rx: Receiver<AlignedBuf>,
    work_tx: Sender<ReadUnit>,
) -> Result<Vec<(u64, u64)>> {
    let bs = u64::from(geo.block_size);
    let mut bad = BadMap::default();
    let faults = device::fault::Faults::from_env();
    let blocks = geo.size.div_ceil(bs);
    let mut planner = match work {
        Work::Compare if !base.is_empty() => Some(Planner::new(base)),
        _ => None,
    };
    // A full image keeps zeros where the source was unreadable; an incremental or differential
    // stores nothing there, so the parent chain's data stays in force (and is flagged).
    let store_unreadable = matches!(work, Work::All);
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
    let watch = SourceWatch {
        file: &handle.file,
        path: source,
        size: geo.size,
        faults: faults.as_ref(),
    };
    let q = &mut handle.queue;
    let mut next = 0u64;
    let mut reached = 0u64;
    loop {
        while next < total && q.in_flight() < q.depth() {
            let buf = if q.in_flight() == 0 {
                match free_rx.recv() {
                    Ok(b) => b,
                    Err(_) => return Ok(bad.ranges), // writer stopped; its error is reported
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
                    fit_pieces(
                        p.next().transpose()?.unwrap_or_default(),
                        offset,
                        want as u64,
                    ),
                );
            }
            reached = reached.max(offset);
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
            // A device that grew or shrank without failing a read is caught here.
            watch.check(reached)?;
            return Ok(bad.ranges);
        }
        let mut c = q.wait().context("waiting for a read")?;
        let (_, want) = unit(c.tag);
        let mut skip: Vec<(u64, u64)> = Vec::new();
        if let Err(e) = &c.result {
            if device::fault::classify(e) == device::fault::ErrorClass::Fatal {
                return Err(watch.fatal(c.offset, e));
            }
            watch.check(reached)?;
            // A failing disk: do not give up on the image. Narrow the failure down to the
            // unreadable sectors and record where they are.
            bad.failed_reads += 1;
            if bad.failed_reads <= LOGGED_BAD_RANGES {
                tracing::warn!(
                    "read error at offset {} ({}); narrowing it down to the unreadable sectors",
                    c.offset,
                    device::fault::describe(e)
                );
            }
            let found = device::fault::read_around_errors(
                watch.file,
                c.offset,
                &mut c.buf.as_mut_slice()[..want as usize],
                geo.sector,
                faults.as_ref(),
            )
            .map_err(|e| watch.fatal(c.offset, &e))?;
            // Reads that failed because the device died meanwhile are not bad sectors.
            watch.check(reached)?;
            skip = bad.record(found, &geo, store_unreadable)?;
        }
        let unit = ReadUnit {
            seq: c.tag,
            offset: c.offset,
            len: want as usize,
            buf: c.buf,
            expected: expected.remove(&c.tag),
            skip,
        };
        if work_tx.send(unit).is_err() {
            return Ok(bad.ranges);
        }
    }
}

/// The unreadable ranges found so far.
#[derive(Default)]
struct BadMap {
    /// Ascending, disjoint (offset, length) ranges.
    ranges: Vec<(u64, u64)>,
    bytes: u64,
    failed_reads: usize,
}

impl BadMap {
    /// Records the unreadable ranges `found` in one read; returns the ranges the image stores
    /// nothing for (none when `store_unreadable`).
    fn record(
        &mut self,
        found: Vec<(u64, u64)>,
        geo: &Geometry,
        store_unreadable: bool,
    ) -> Result<Vec<(u64, u64)>> {
        let mut skip: Vec<(u64, u64)> = Vec::new();
        for (o, l) in found {
            if self.ranges.len() < LOGGED_BAD_RANGES {
                tracing::warn!(
                    "unreadable: {l} bytes at offset {o}, {}",
                    if store_unreadable {
                        "stored as zeros"
                    } else {
                        "the parent chain's data stays for the granules around them"
                    }
                );
            } else if self.ranges.len() == LOGGED_BAD_RANGES {
                tracing::warn!("more unreadable ranges follow; `cairn badmap` lists them all");
            }
            // Index entries are whole granules, so an image that stores nothing for a bad
            // sector stores nothing for its granule either: the parent's data stands for all
            // of it, and all of it is recorded (the rest of the granule was read, but a
            // restore does not give what was read there).
            let (o, l) = if store_unreadable {
                (o, l)
            } else {
                let g = u64::from(geo.granule);
                let start = o / g * g;
                let end = ((o + l).div_ceil(g) * g).min(geo.size);
                (start, end - start)
            };
            if !store_unreadable {
                match skip.last_mut() {
                    Some((so, sl)) if *so + *sl >= o => *sl = (*sl).max(o + l - *so),
                    _ => skip.push((o, l)),
                }
            }
            match self.ranges.last_mut() {
                Some((bo, bl)) if *bo + *bl >= o => {
                    let grown = (*bl).max(o + l - *bo);
                    self.bytes += grown - *bl;
                    *bl = grown;
                }
                _ => {
                    self.bytes += l;
                    self.ranges.push((o, l));
                }
            }
        }
        let total = self.bytes;
        if let Some(max) = geo.max_bad.filter(|&m| total > m) {
            bail!("{total} bytes of the source are unreadable, more than --max-bad allows ({max} bytes); giving up (see `cairn backup --help` on --max-bad)");
        }
        Ok(skip)
    }
}
