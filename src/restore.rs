//! Restore: plan (which image supplies each block) → read and check payloads → decode and verify
//! → write in ascending order. Nothing is written before every safety check has passed, and no
//! block is written before its crc and hash have been checked.

use crate::chain::{self, Piece, Planner, Source};
use crate::device::{self, buf::AlignedBuf, queue::Op, queue::Request, Access, DeviceInfo};
use crate::format::frame::Codec;
use crate::format::Entry;
use crate::progress::Progress;
use crate::repo::{decode_checked, Image, Repository, SegmentReader};
use anyhow::{anyhow, bail, Context, Result};
use crossbeam_channel::{bounded, Receiver, Sender};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct RestoreOptions {
    pub repo: PathBuf,
    pub target: PathBuf,
    pub name: Option<String>,
    pub image: Option<String>,
    pub yes: bool,
}

#[derive(Debug, Serialize)]
pub struct RestoreReport {
    pub id: String,
    pub name: String,
    pub chain: Vec<String>,
    pub target: String,
    pub source_size: u64,
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    pub duration_ms: u64,
    pub io: String,
}

const QUEUE_DEPTH: usize = 8;
const POOL_BUFFERS: usize = 16;

/// Picks the image a command works on: `--image`, else the newest of `--name`, else the newest of
/// the only name in the repository.
pub fn select_image(repo: &Repository, name: Option<&str>, image: Option<&str>) -> Result<String> {
    if let Some(id) = image {
        let (m, _) = repo.load_manifest(id)?;
        if let Some(n) = name {
            if m.name != n {
                bail!("image {id} belongs to {:?}, not {n:?}", m.name);
            }
        }
        return Ok(id.to_string());
    }
    let mut newest: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for id in repo.image_ids()? {
        match repo.load_manifest(&id) {
            Ok((m, _)) => {
                let e = newest.entry(m.name.clone()).or_insert((0, String::new()));
                if (m.created_unix, &m.id) > (e.0, &e.1) {
                    *e = (m.created_unix, m.id);
                }
            }
            Err(e) => tracing::warn!("skipping unreadable image: {e:#}"),
        }
    }
    match name {
        Some(n) => newest
            .remove(n)
            .map(|(_, id)| id)
            .ok_or_else(|| anyhow!("no image named {n:?} in {}", repo.root.display())),
        None => match newest.len() {
            0 => bail!("repository {} holds no images", repo.root.display()),
            1 => Ok(newest.into_values().next().expect("one").1),
            _ => bail!(
                "repository {} holds several names ({}); choose one with --name or --image",
                repo.root.display(),
                newest.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        },
    }
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
    let target_img = chain.last().expect("non-empty chain");
    let size = target_img.manifest.source.size;
    let target = prepare_target(&opts.target, &opts.repo, size, opts.yes)?;

    let buffers = device::buf::pool(POOL_BUFFERS, target_img.manifest.block_size as usize);
    let mut handle = device::open(
        &opts.target,
        Access::Write,
        target.is_block,
        QUEUE_DEPTH,
        &buffers,
    )?;
    let io = handle.queue.describe();
    if !target.is_block {
        handle
            .file
            .set_len(size)
            .with_context(|| format!("cannot size {}", opts.target.display()))?;
    }
    // Unaligned tails cannot go through O_DIRECT; they are written through a buffered descriptor.
    let tail_file = OpenOptions::new()
        .write(true)
        .open(&opts.target)
        .with_context(|| format!("cannot open {}", opts.target.display()))?;
    tracing::info!(
        "restoring image {id} ({} images in chain) onto {} [{io}]",
        chain.len(),
        opts.target.display()
    );
    progress.start(size, &format!("{id} → {}", opts.target.display()));

    let mut bytes_written = 0u64;
    let mut bytes_zeroed = 0u64;
    let write_result = restore_pipeline(
        &chain,
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
            "restore of image {id} onto {} failed; the target is only partly written",
            opts.target.display()
        )
    })?;
    handle.file.sync_all().context("flushing the target")?;
    tail_file.sync_all().context("flushing the target")?;

    Ok(RestoreReport {
        id: id.clone(),
        name: target_img.manifest.name.clone(),
        chain: chain.iter().map(|i| i.id().to_string()).collect(),
        target: opts.target.display().to_string(),
        source_size: size,
        bytes_written,
        bytes_zeroed,
        duration_ms: started.elapsed().as_millis() as u64,
        io,
    })
}

struct Target {
    is_block: bool,
    /// A regular file cairn creates: already all holes, nothing to zero.
    fresh_file: bool,
}

fn prepare_target(path: &Path, repo: &Path, size: u64, yes: bool) -> Result<Target> {
    if !path.exists() {
        if device::on_devtmpfs(path) {
            bail!(
                "{} does not exist; check the device name with `lsblk` (cairn does not create files in /dev)",
                path.display()
            );
        }
        return Ok(Target {
            is_block: false,
            fresh_file: true,
        });
    }
    device::require_root_for(path)?;
    let info =
        DeviceInfo::probe(path).with_context(|| format!("cannot use target {}", path.display()))?;
    if info.is_block() {
        if info.size < size {
            bail!(
                "target {} is too small: {} bytes, the image needs {} bytes",
                path.display(),
                info.size,
                size
            );
        }
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

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {} ({n} bytes)", UNITS[u])
    }
}

/// What the writer did with one job, for accounting.
enum WriteOut {
    Zero { offset: u64, len: u64 },
    Data { len: u64 },
}

/// A block's payloads, read from the segments and crc-checked.
struct ReadJob {
    seq: u64,
    offset: u64,
    len: u64,
    pieces: Vec<Piece>,
    payloads: Vec<(usize, usize, Codec, Vec<u8>)>,
}

enum Job {
    Zero {
        seq: u64,
        offset: u64,
        len: u64,
    },
    Data(ReadJob),
    /// The reader could not supply this block; the writer stops there.
    Failed {
        seq: u64,
        error: anyhow::Error,
    },
}

struct Decoded {
    seq: u64,
    kind: DecodedKind,
}

enum DecodedKind {
    Zero {
        offset: u64,
        len: u64,
    },
    Data {
        offset: u64,
        len: usize,
        buf: AlignedBuf,
    },
    /// Unreadable or damaged: everything before it is written, nothing from it on.
    Failed(anyhow::Error),
}

fn restore_pipeline(
    chain: &[Image],
    handle: &mut device::Handle,
    buffers: Vec<AlignedBuf>,
    mut account: impl FnMut(WriteOut) -> Result<()>,
    tail_file: &std::fs::File,
) -> Result<()> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 8);
    let (free_tx, free_rx) = bounded::<AlignedBuf>(buffers.len());
    for b in buffers {
        free_tx.send(b).expect("room");
    }
    let (job_tx, job_rx) = bounded::<Job>(POOL_BUFFERS);
    let (dec_tx, dec_rx) = bounded::<Decoded>(POOL_BUFFERS);
    std::thread::scope(|s| {
        let reader = s.spawn(move || read_jobs(chain, job_tx));
        let mut stage = Vec::new();
        for _ in 0..workers {
            let (rx, tx, free) = (job_rx.clone(), dec_tx.clone(), free_rx.clone());
            stage.push(s.spawn(move || decode_jobs(chain, rx, tx, free)));
        }
        drop((job_rx, dec_tx, free_rx));
        let written = write_jobs(handle, &dec_rx, &free_tx, &mut account, tail_file);
        drop(dec_rx);
        drop(free_tx);
        let read_result = reader
            .join()
            .map_err(|_| anyhow!("reader thread panicked"))?;
        for w in stage {
            w.join().map_err(|_| anyhow!("decoder thread panicked"))??;
        }
        // Damage reaches the writer in order and stops it there, so its error is the real cause.
        written?;
        read_result
    })
}

fn read_jobs(chain: &[Image], tx: Sender<Job>) -> Result<()> {
    let mut readers: Vec<SegmentReader> = chain.iter().map(Image::segment_reader).collect();
    let mut seq = 0u64;
    let mut zero_run: Option<(u64, u64)> = None;
    let planner = Planner::new(chain);
    for pieces in planner {
        let offset = pieces[0].offset;
        let len: u64 = pieces.iter().map(|p| p.len).sum();
        if pieces.len() == 1 && pieces[0].source == Source::Zero {
            zero_run = match zero_run {
                Some((o, l)) if o + l == offset => Some((o, l + len)),
                Some((o, l)) => {
                    if tx
                        .send(Job::Zero {
                            seq,
                            offset: o,
                            len: l,
                        })
                        .is_err()
                    {
                        return Ok(());
                    }
                    seq += 1;
                    Some((offset, len))
                }
                None => Some((offset, len)),
            };
            continue;
        }
        if let Some((o, l)) = zero_run.take() {
            if tx
                .send(Job::Zero {
                    seq,
                    offset: o,
                    len: l,
                })
                .is_err()
            {
                return Ok(());
            }
            seq += 1;
        }
        let mut payloads: Vec<(usize, usize, Codec, Vec<u8>)> = Vec::new();
        for p in &pieces {
            if let Source::Entry(ci, ei) = p.source {
                if payloads.iter().any(|(c, e, _, _)| (*c, *e) == (ci, ei)) {
                    continue;
                }
                let entry = &chain[ci].index.entries[ei];
                let mut payload = Vec::new();
                match readers[ci].read_payload(entry, &mut payload) {
                    Ok(codec) => payloads.push((ci, ei, codec, payload)),
                    Err(error) => {
                        let _ = tx.send(Job::Failed { seq, error });
                        return Ok(());
                    }
                }
            }
        }
        if tx
            .send(Job::Data(ReadJob {
                seq,
                offset,
                len,
                pieces,
                payloads,
            }))
            .is_err()
        {
            return Ok(());
        }
        seq += 1;
    }
    if let Some((o, l)) = zero_run {
        let _ = tx.send(Job::Zero {
            seq,
            offset: o,
            len: l,
        });
    }
    Ok(())
}

fn decode_jobs(
    chain: &[Image],
    rx: Receiver<Job>,
    tx: Sender<Decoded>,
    free: Receiver<AlignedBuf>,
) -> Result<()> {
    let mut dctx = zstd::bulk::Decompressor::new().context("zstd init")?;
    let mut scratch: Vec<u8> = Vec::new();
    for job in rx {
        let out = match job {
            Job::Zero { seq, offset, len } => Decoded {
                seq,
                kind: DecodedKind::Zero { offset, len },
            },
            Job::Failed { seq, error } => Decoded {
                seq,
                kind: DecodedKind::Failed(error),
            },
            Job::Data(j) => {
                let Ok(mut buf) = free.recv() else {
                    return Ok(());
                };
                let len = j.len as usize;
                match assemble(
                    chain,
                    &j,
                    &mut buf.as_mut_slice()[..len],
                    &mut dctx,
                    &mut scratch,
                ) {
                    Ok(()) => Decoded {
                        seq: j.seq,
                        kind: DecodedKind::Data {
                            offset: j.offset,
                            len,
                            buf,
                        },
                    },
                    Err(e) => Decoded {
                        seq: j.seq,
                        kind: DecodedKind::Failed(e),
                    },
                }
            }
        };
        if tx.send(out).is_err() {
            break;
        }
    }
    Ok(())
}

/// Builds one block's plaintext from its checked payloads. A block supplied whole by one entry (every
/// block of a full image) is decoded straight into the write buffer.
fn assemble(
    chain: &[Image],
    j: &ReadJob,
    block: &mut [u8],
    dctx: &mut zstd::bulk::Decompressor<'_>,
    scratch: &mut Vec<u8>,
) -> Result<()> {
    if j.pieces.len() == 1 && j.payloads.len() == 1 {
        let (ci, ei, codec, payload) = &j.payloads[0];
        let e: &Entry = &chain[*ci].index.entries[*ei];
        return decode_checked(chain[*ci].id(), e, *codec, payload, dctx, block);
    }
    for p in &j.pieces {
        let rel = (p.offset - j.offset) as usize;
        let dst = &mut block[rel..rel + p.len as usize];
        match p.source {
            Source::Zero => dst.fill(0),
            Source::Entry(ci, ei) => {
                let (_, _, codec, payload) = j
                    .payloads
                    .iter()
                    .find(|(c, e, _, _)| (*c, *e) == (ci, ei))
                    .ok_or_else(|| anyhow!("restore plan lost a payload"))?;
                let e: &Entry = &chain[ci].index.entries[ei];
                scratch.resize(e.length as usize, 0);
                decode_checked(chain[ci].id(), e, *codec, payload, dctx, scratch)?;
                let from = (p.offset - e.offset) as usize;
                dst.copy_from_slice(&scratch[from..from + p.len as usize]);
            }
        }
    }
    Ok(())
}

fn write_jobs(
    handle: &mut device::Handle,
    rx: &Receiver<Decoded>,
    free_tx: &Sender<AlignedBuf>,
    account: &mut impl FnMut(WriteOut) -> Result<()>,
    tail_file: &std::fs::File,
) -> Result<()> {
    let direct = handle.direct;
    let q = &mut handle.queue;
    let mut pending: BTreeMap<u64, Decoded> = BTreeMap::new();
    let mut next = 0u64;
    let mut finished_input = false;
    let reap = |q: &mut Box<dyn device::queue::IoQueue>| -> Result<()> {
        let c = q.wait().context("waiting for a write")?;
        c.result
            .with_context(|| format!("write error at offset {} of the target", c.offset))?;
        let _ = free_tx.send(c.buf);
        Ok(())
    };
    loop {
        if let Some(d) = pending.remove(&next) {
            next += 1;
            match d.kind {
                DecodedKind::Failed(e) => return Err(e),
                DecodedKind::Zero { offset, len } => account(WriteOut::Zero { offset, len })?,
                DecodedKind::Data { offset, len, buf } => {
                    if direct && len % device::buf::ALIGN != 0 {
                        // The source's unaligned end: written buffered, flushed with the rest.
                        tail_file
                            .write_all_at(&buf.as_slice()[..len], offset)
                            .with_context(|| {
                                format!("write error at offset {offset} of the target")
                            })?;
                        let _ = free_tx.send(buf);
                    } else {
                        while q.in_flight() >= q.depth() {
                            reap(q)?;
                        }
                        q.submit(Request {
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
                    account(WriteOut::Data { len: len as u64 })?;
                }
            }
            continue;
        }
        if finished_input {
            if pending.is_empty() {
                break;
            }
            bail!("restore pipeline lost block {next}");
        }
        let got = if q.in_flight() > 0 {
            match rx.try_recv() {
                Ok(d) => Some(d),
                Err(crossbeam_channel::TryRecvError::Empty) => {
                    reap(q)?;
                    continue;
                }
                Err(crossbeam_channel::TryRecvError::Disconnected) => None,
            }
        } else {
            rx.recv().ok()
        };
        match got {
            Some(d) => {
                pending.insert(d.seq, d);
            }
            None => finished_input = true,
        }
    }
    while q.in_flight() > 0 {
        reap(q)?;
    }
    Ok(())
}
