//! Restore's ordered pipeline: repository reader → decoders → target writer.

use super::target::Target;
use super::{Range, Restore};
use crate::chain::{Piece, Source};
use crate::device::{self, buf::AlignedBuf, queue::Op, queue::Request, Access};
use crate::progress::Progress;
use crate::reader::{self, ChainReader, Payload};
use crate::repo::Image;
use anyhow::{Context, Result};
use crossbeam_channel::{Receiver, Sender};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

const QUEUE_DEPTH: usize = 8;
const POOL_BUFFERS: usize = 16;

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
    let mut jobs = JobSender { tx, seq: 0 };
    let mut zeros = ZeroRun(None);
    // A failed send means the writer stopped; its error is the one reported.
    for block in range.blocks(chain) {
        let (_, pieces) = block?;
        let offset = pieces[0].offset;
        let len: u64 = pieces.iter().map(|p| p.len).sum();
        if pieces.len() == 1 && pieces[0].source == Source::Zero {
            if !jobs.zero(zeros.extend(offset, len)) {
                return Ok(());
            }
            continue;
        }
        if !jobs.zero(zeros.0.take()) {
            return Ok(());
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
        if !jobs.send(|seq| Job::Data(seq, job, buf)) {
            return Ok(());
        }
    }
    jobs.zero(zeros.0.take());
    Ok(())
}

/// Numbers the jobs in the order they are sent.
struct JobSender {
    tx: Sender<Job>,
    seq: u64,
}

impl JobSender {
    /// False when the writer stopped.
    fn send(&mut self, job: impl FnOnce(u64) -> Job) -> bool {
        let sent = self.tx.send(job(self.seq)).is_ok();
        self.seq += 1;
        sent
    }

    /// Sends a finished run of zero blocks, if there is one.
    fn zero(&mut self, run: Option<(u64, u64)>) -> bool {
        match run {
            None => true,
            Some((offset, len)) => self.send(|seq| Job::Zero { seq, offset, len }),
        }
    }
}

/// Consecutive all-zero blocks, written as one zeroed range.
struct ZeroRun(Option<(u64, u64)>);

impl ZeroRun {
    /// Adds a zero block; returns the run it ends when it does not continue it.
    fn extend(&mut self, offset: u64, len: u64) -> Option<(u64, u64)> {
        match self.0 {
            Some((o, l)) if o + l == offset => {
                self.0 = Some((o, l + len));
                None
            }
            previous => {
                self.0 = Some((offset, len));
                previous
            }
        }
    }
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

/// What writing the target did.
pub(super) struct Written {
    pub(super) bytes_written: u64,
    pub(super) bytes_zeroed: u64,
    pub(super) io: String,
    /// The buffered descriptor of the target, for the partition-table work after the data.
    pub(super) tail_file: std::fs::File,
}

/// Writes the image's `range` onto the target and flushes it.
pub(super) fn write_target(
    restore: &Restore,
    range: Range,
    needed: u64,
    target: &Target,
    progress: &Progress,
) -> Result<Written> {
    let (chain, id, opts) = (&restore.chain, &restore.id, restore.opts);
    let tpath = &opts.target;
    let block_size = restore.manifest().block_size;
    let buffers = device::buf::pool(POOL_BUFFERS, block_size as usize);
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
    progress.start(
        range.end - range.start,
        &format!("{id} → {}", tpath.display()),
    );

    let mut bytes_written = 0u64;
    let mut bytes_zeroed = 0u64;
    let write_result = restore_pipeline(
        chain,
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
    Ok(Written {
        bytes_written,
        bytes_zeroed,
        io,
        tail_file,
    })
}
