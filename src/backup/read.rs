//! The source reader: drives the I/O queue over the work, narrows failed reads down to the
//! unreadable sectors, and watches for a source that went away or changed size.

use super::plan::{Extents, Work};
use super::stage::fit_pieces;
use crate::chain::{Piece, Planner};
use crate::device::{self, buf::AlignedBuf, queue::Op, queue::Request};
use crate::repo::Image;
use crate::tracker::ChangedRuns;
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
        Work::Tracked(_) => (32, 40),
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

/// Where the reader's units come from, in order: (offset, length), each inside one block.
enum Units<'r> {
    /// Every block of the source.
    Blocks { next: u64, size: u64, block: u64 },
    /// The tracker's changed runs, as extents, read from its session as they are needed.
    Tracked(Extents<ChangedRuns<'r>>),
}

impl Iterator for Units<'_> {
    type Item = Result<(u64, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Units::Blocks { next, size, block } => {
                let offset = *next * *block;
                (offset < *size).then(|| {
                    *next += 1;
                    Ok((offset, (*size - offset).min(*block)))
                })
            }
            Units::Tracked(extents) => extents.next(),
        }
    }
}

/// What the reader did: the unreadable ranges it found, how many units it sent, and whether it
/// reached the end of its work (false: the writer stopped first, and its error is reported).
pub(super) struct ReadOutcome {
    pub(super) bad: Vec<(u64, u64)>,
    pub(super) units: u64,
    pub(super) complete: bool,
}

/// A read in flight: what it wants, and for a compare-scan what the base chain holds there.
struct InFlight {
    want: usize,
    expected: Option<Vec<Piece>>,
}

/// The source reader's state across submissions and completions.
struct SourceReader<'r, 'b> {
    geo: Geometry,
    units: std::iter::Peekable<Units<'r>>,
    /// For a compare-scan: the base chain's plan, one block per unit.
    planner: Option<Planner<'b>>,
    in_flight: BTreeMap<u64, InFlight>,
    bad: BadMap,
    /// A full image keeps zeros where the source was unreadable; an incremental or differential
    /// stores nothing there, so the parent chain's data stays in force (and is flagged).
    store_unreadable: bool,
    submitted: u64,
    /// The highest offset submitted: where a vanished or resized source was noticed.
    reached: u64,
}

/// Reads `work` from the source and sends each unit, in order of submission, to the block stages.
/// `runs` are the tracked cut's changed runs (for `Work::Tracked`).
#[allow(clippy::too_many_arguments)]
pub(super) fn read_all(
    mut handle: device::Handle,
    geo: Geometry,
    source: &std::path::Path,
    work: &Work,
    base: &[Image],
    runs: Option<ChangedRuns<'_>>,
    free_rx: Receiver<AlignedBuf>,
    work_tx: Sender<ReadUnit>,
) -> Result<ReadOutcome> {
    let faults = device::fault::Faults::from_env();
    let mut reader = SourceReader::new(geo, work, base, runs)?;
    let watch = SourceWatch {
        file: &handle.file,
        path: source,
        size: geo.size,
        faults: faults.as_ref(),
    };
    let q = &mut handle.queue;
    loop {
        if !reader.submit_more(q.as_mut(), handle.direct, &free_rx)? {
            return Ok(reader.outcome(false));
        }
        if q.in_flight() == 0 {
            // A device that grew or shrank without failing a read is caught here.
            watch.check(reader.reached)?;
            return Ok(reader.outcome(true));
        }
        let c = q.wait().context("waiting for a read")?;
        let unit = reader.complete(c, &watch)?;
        if work_tx.send(unit).is_err() {
            return Ok(reader.outcome(false));
        }
    }
}

impl<'r, 'b> SourceReader<'r, 'b> {
    fn new(
        geo: Geometry,
        work: &Work,
        base: &'b [Image],
        runs: Option<ChangedRuns<'r>>,
    ) -> Result<Self> {
        let block = u64::from(geo.block_size);
        let units = match (work, runs) {
            (Work::Tracked(_), Some(runs)) => {
                Units::Tracked(Extents::new(runs, u64::from(geo.granule), block, geo.size))
            }
            (Work::Tracked(_), None) => bail!("a tracked backup without the tracker's runs"),
            (Work::All | Work::Compare, _) => Units::Blocks {
                next: 0,
                size: geo.size,
                block,
            },
        };
        Ok(SourceReader {
            geo,
            units: units.peekable(),
            planner: match work {
                Work::Compare if !base.is_empty() => Some(Planner::new(base)),
                _ => None,
            },
            in_flight: BTreeMap::new(),
            bad: BadMap::default(),
            store_unreadable: matches!(work, Work::All),
            submitted: 0,
            reached: 0,
        })
    }

    fn outcome(self, complete: bool) -> ReadOutcome {
        ReadOutcome {
            bad: self.bad.ranges,
            units: self.submitted,
            complete,
        }
    }

    /// Fills the queue with the next units while buffers are free. Ok(false): the writer
    /// stopped (no buffer will come back).
    fn submit_more(
        &mut self,
        q: &mut dyn device::queue::IoQueue,
        direct: bool,
        free_rx: &Receiver<AlignedBuf>,
    ) -> Result<bool> {
        while q.in_flight() < q.depth() {
            match self.units.peek() {
                None => break,
                Some(Ok(_)) => {}
                Some(Err(_)) => {
                    let e = self.units.next().and_then(Result::err).expect("peeked");
                    return Err(e.context("reading the tracker's changed runs"));
                }
            }
            let buf = if q.in_flight() == 0 {
                match free_rx.recv() {
                    Ok(b) => b,
                    Err(_) => return Ok(false),
                }
            } else {
                match free_rx.try_recv() {
                    Ok(b) => b,
                    Err(_) => break,
                }
            };
            let (offset, want) = self.units.next().and_then(Result::ok).expect("peeked");
            let expected = match self.planner.as_mut() {
                Some(p) => Some(fit_pieces(
                    p.next().transpose()?.unwrap_or_default(),
                    offset,
                    want,
                )),
                None => None,
            };
            let want = want as usize;
            let tag = self.submitted;
            self.in_flight.insert(tag, InFlight { want, expected });
            self.reached = self.reached.max(offset);
            q.submit(Request {
                op: Op::Read,
                tag,
                offset,
                start: 0,
                len: if direct {
                    device::buf::align_up(want)
                } else {
                    want
                },
                want,
                buf,
            })
            .with_context(|| format!("submitting a read at offset {offset}"))?;
            self.submitted += 1;
        }
        Ok(true)
    }

    /// Turns a finished read into a unit for the block stages; a failed read is narrowed down
    /// to its unreadable sectors, or fails the backup when it is not a bad sector.
    fn complete(
        &mut self,
        mut c: device::queue::Completion,
        watch: &SourceWatch<'_>,
    ) -> Result<ReadUnit> {
        let InFlight { want, expected } = self
            .in_flight
            .remove(&c.tag)
            .ok_or_else(|| anyhow!("a read completed that was never submitted"))?;
        let mut skip: Vec<(u64, u64)> = Vec::new();
        if let Err(e) = &c.result {
            if device::fault::classify(e) == device::fault::ErrorClass::Fatal {
                return Err(watch.fatal(c.offset, e));
            }
            watch.check(self.reached)?;
            // A failing disk: do not give up on the image. Narrow the failure down to the
            // unreadable sectors and record where they are.
            self.bad.failed_reads += 1;
            if self.bad.failed_reads <= LOGGED_BAD_RANGES {
                tracing::warn!(
                    "read error at offset {} ({}); narrowing it down to the unreadable sectors",
                    c.offset,
                    device::fault::describe(e)
                );
            }
            let found = device::fault::read_around_errors(
                watch.file,
                c.offset,
                &mut c.buf.as_mut_slice()[..want],
                self.geo.sector,
                watch.faults,
            )
            .map_err(|e| watch.fatal(c.offset, &e))?;
            // Reads that failed because the device died meanwhile are not bad sectors.
            watch.check(self.reached)?;
            skip = self.bad.record(found, &self.geo, self.store_unreadable)?;
        }
        Ok(ReadUnit {
            seq: c.tag,
            offset: c.offset,
            len: want,
            buf: c.buf,
            expected,
            skip,
        })
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
