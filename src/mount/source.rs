//! The bytes of a restore point, on demand: each block planned by the one planner restore uses
//! ([`crate::chain::Planner`]), decoded and checked by the one checked reader
//! ([`crate::reader::BlockDecoder`]), and kept in a bounded [`BlockCache`].
//!
//! A block that cannot be read or fails a check is an error for every read that touches it and
//! is never cached; nothing here substitutes zeros or older bytes for it.

use super::cache::BlockCache;
use crate::chain::Planner;
use crate::format::manifest::Manifest;
use crate::reader::BlockDecoder;
use crate::repo::Image;
use anyhow::{anyhow, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Blocks read ahead of a sequential reader: enough to keep every read-ahead thread busy while
/// the reader consumes the current block (4 MiB of the cache at the default block size).
const READ_AHEAD_BLOCKS: u64 = 4;
/// Threads decoding ahead: decoding is the cost of a sequential read, and one thread alone
/// leaves the second core of a small machine idle while the reader waits on it.
const READ_AHEAD_THREADS: usize = 2;

/// A restore point: its chain, oldest first, and its geometry.
pub struct RestorePoint {
    pub id: String,
    pub chain: Vec<Image>,
    pub size: u64,
    pub block_size: u64,
}

impl RestorePoint {
    pub fn new(id: String, chain: Vec<Image>) -> RestorePoint {
        let m = &chain.last().expect("a chain holds its image").manifest;
        RestorePoint {
            id,
            size: m.source.size,
            block_size: u64::from(m.block_size),
            chain,
        }
    }

    /// The manifest of the restore point's own image (the newest of its chain).
    pub fn manifest(&self) -> &Manifest {
        &self.chain.last().expect("a chain holds its image").manifest
    }
}

/// One decoding context: a planner positioned where its last block ended (a sequential reader
/// never searches the index again) and a decoder with its open segments.
struct Decoder {
    planner: Planner<'static>,
    next_block: u64,
    dec: BlockDecoder<'static>,
}

impl Decoder {
    fn new(point: &'static RestorePoint) -> Result<Decoder> {
        Ok(Decoder {
            planner: Planner::new(&point.chain),
            next_block: 0,
            dec: BlockDecoder::new(&point.chain)?,
        })
    }

    fn block(&mut self, block: u64) -> Result<Vec<u8>> {
        if block != self.next_block {
            self.planner.seek(block)?;
        }
        // A failed plan leaves the planner's position unknown: the next call seeks.
        self.next_block = u64::MAX;
        let pieces = self
            .planner
            .next()
            .ok_or_else(|| anyhow!("block {block} is past the end of the restore point"))??;
        self.next_block = block + 1;
        self.dec.decode(&pieces)
    }
}

/// A decode in progress, and its outcome for the readers waiting on it.
#[derive(Default)]
struct Loading {
    done: Mutex<Option<Result<Arc<[u8]>, String>>>,
    ready: Condvar,
}

struct Finish<'a> {
    loading: &'a Mutex<HashMap<u64, Arc<Loading>>>,
    block: u64,
    slot: &'a Loading,
}

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        lock(&self.slot.done)
            .get_or_insert_with(|| Err(format!("decoding block {} failed", self.block)));
        self.slot.ready.notify_all();
        lock(self.loading).remove(&self.block);
    }
}

/// The data under these locks is whole values swapped in and out: a panicking holder cannot
/// leave them half-updated.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

enum Claim {
    Cached(Arc<[u8]>),
    Waiting(Arc<Loading>),
    Decoding(Arc<Loading>),
}

/// The outcome of another reader's decode, once it is there.
fn wait_for(slot: &Loading) -> Result<Arc<[u8]>> {
    let mut done = lock(&slot.done);
    while done.is_none() {
        done = slot.ready.wait(done).unwrap_or_else(|p| p.into_inner());
    }
    match done.as_ref().expect("set") {
        Ok(b) => Ok(b.clone()),
        Err(msg) => Err(anyhow!("{msg}")),
    }
}

/// A checked block and the part of it a read covers.
pub struct Slice {
    data: Arc<[u8]>,
    range: std::ops::Range<usize>,
}

impl Slice {
    pub fn bytes(&self) -> &[u8] {
        &self.data[self.range.clone()]
    }
}

/// Why a read failed: the block and the reader's error (which names image, segment and offset).
pub struct ReadFailure {
    pub block: u64,
    pub error: anyhow::Error,
}

pub struct BlockSource {
    point: &'static RestorePoint,
    cache: BlockCache,
    /// Idle decoders; a reader takes one (or makes one) and puts it back.
    idle: Mutex<Vec<Decoder>>,
    /// Blocks being decoded now: a reader asking for one waits for that decode instead of
    /// doing it again (the kernel splits one sequential read into requests served in parallel,
    /// often inside the same block).
    loading: Mutex<HashMap<u64, Arc<Loading>>>,
    /// The block after the last one read, to notice a sequential reader.
    last_end: AtomicU64,
    /// The block after the last one queued for reading ahead: each block is queued once per
    /// sequential run, not once for each of the kernel's requests inside the block before it.
    queued_end: AtomicU64,
    ahead: Option<crossbeam_channel::Sender<u64>>,
}

impl BlockSource {
    /// `point` lives as long as the process serves it (a mount), hence `'static`.
    pub fn new(point: &'static RestorePoint, cache_bytes: usize) -> Arc<BlockSource> {
        Arc::new(BlockSource {
            point,
            cache: BlockCache::new(cache_bytes),
            idle: Mutex::new(Vec::new()),
            loading: Mutex::new(HashMap::new()),
            last_end: AtomicU64::new(u64::MAX),
            queued_end: AtomicU64::new(0),
            ahead: None,
        })
    }

    /// As [`BlockSource::new`], with a thread that decodes the blocks after a sequential read
    /// into the cache while the reader consumes the current ones.
    pub fn with_read_ahead(point: &'static RestorePoint, cache_bytes: usize) -> Arc<BlockSource> {
        let (tx, rx) = crossbeam_channel::bounded::<u64>(2 * READ_AHEAD_BLOCKS as usize);
        let source = Arc::new(BlockSource {
            point,
            cache: BlockCache::new(cache_bytes),
            idle: Mutex::new(Vec::new()),
            loading: Mutex::new(HashMap::new()),
            last_end: AtomicU64::new(u64::MAX),
            queued_end: AtomicU64::new(0),
            ahead: Some(tx),
        });
        for i in 0..READ_AHEAD_THREADS {
            // The threads hold only a weak handle: they end when the source is dropped (the
            // channel's sender goes with it).
            let weak = Arc::downgrade(&source);
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("cairn-read-ahead-{i}"))
                .spawn(move || {
                    for block in rx {
                        let Some(s) = weak.upgrade() else { break };
                        // A block another thread is decoding is left to it, so this one moves
                        // on to the next instead of waiting.
                        if !s.cache.contains(block) && !lock(&s.loading).contains_key(&block) {
                            // A failure here is reported when a reader asks for the block.
                            let _ = s.block(block);
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!("no read-ahead thread ({e}); reads decode on demand only");
                break;
            }
        }
        source
    }

    pub fn point(&self) -> &'static RestorePoint {
        self.point
    }

    pub fn size(&self) -> u64 {
        self.point.size
    }

    /// The checked plaintext of one block.
    pub fn block(&self, block: u64) -> Result<Arc<[u8]>> {
        match self.claim(block) {
            Claim::Cached(b) => Ok(b),
            Claim::Waiting(slot) => wait_for(&slot),
            Claim::Decoding(slot) => self.decode_for_all(block, &slot),
        }
    }

    /// Whether `block` is cached, being decoded by another reader, or this reader's to decode.
    fn claim(&self, block: u64) -> Claim {
        if let Some(b) = self.cache.get(block) {
            return Claim::Cached(b);
        }
        let mut loading = lock(&self.loading);
        // Checked again under the lock: the decode may have finished meanwhile (it is cached
        // before its slot goes).
        if let Some(b) = self.cache.get(block) {
            return Claim::Cached(b);
        }
        match loading.get(&block) {
            Some(s) => Claim::Waiting(s.clone()),
            None => {
                let s = Arc::new(Loading::default());
                loading.insert(block, s.clone());
                Claim::Decoding(s)
            }
        }
    }

    /// Decodes a claimed block, caches it if it passed every check, and hands the outcome to
    /// the readers waiting on `slot`.
    fn decode_for_all(&self, block: u64, slot: &Loading) -> Result<Arc<[u8]>> {
        // Wakes the waiters and clears the slot however this ends (a panic included).
        let finish = Finish {
            loading: &self.loading,
            block,
            slot,
        };
        let result = self.decode(block);
        if let Ok(b) = &result {
            self.cache.insert(block, b.clone());
        }
        *lock(&slot.done) = Some(match &result {
            Ok(b) => Ok(b.clone()),
            Err(e) => Err(format!("{e:#}")),
        });
        drop(finish);
        result
    }

    fn decode(&self, block: u64) -> Result<Arc<[u8]>> {
        let taken = lock(&self.idle).pop();
        let mut d = match taken {
            Some(d) => d,
            None => Decoder::new(self.point)?,
        };
        let result = d.block(block);
        lock(&self.idle).push(d);
        Ok(result?.into())
    }

    /// Fills `out` with the restore point's bytes from `offset` (which must lie inside it, with
    /// `out`): all of them checked, or an error naming the first block that failed.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), ReadFailure> {
        let mut at = 0;
        for s in self.read_slices(offset, out.len())? {
            let part = s.bytes();
            out[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        Ok(())
    }

    /// The restore point's `len` bytes from `offset` (which must lie inside it) as the parts of
    /// the checked blocks that hold them, in order, without copying them: all of them checked, or
    /// an error naming the first block that failed.
    pub fn read_slices(&self, offset: u64, len: usize) -> Result<Vec<Slice>, ReadFailure> {
        let end = offset + len as u64;
        if end > self.point.size {
            return Err(ReadFailure {
                block: offset / self.point.block_size,
                error: anyhow!(
                    "read of {}..{end} past the end of the restore point ({} bytes)",
                    offset,
                    self.point.size
                ),
            });
        }
        let bs = self.point.block_size;
        let mut slices = Vec::with_capacity(1);
        let mut pos = offset;
        while pos < end {
            let block = pos / bs;
            let data = self
                .block(block)
                .map_err(|error| ReadFailure { block, error })?;
            let rel = (pos - block * bs) as usize;
            let n = ((end - pos) as usize).min(data.len() - rel);
            slices.push(Slice {
                data,
                range: rel..rel + n,
            });
            pos += n as u64;
        }
        if len > 0 {
            self.read_ahead_after(offset / bs, (end - 1) / bs);
        }
        Ok(slices)
    }

    /// Queues the blocks after `last` for the read-ahead thread when the read of blocks
    /// `first..=last` continues the one before it.
    fn read_ahead_after(&self, first: u64, last: u64) {
        let prev = self.last_end.swap(last + 1, Ordering::Relaxed);
        let Some(tx) = &self.ahead else { return };
        if prev == first || prev == first + 1 {
            let blocks = self.point.size.div_ceil(self.point.block_size);
            let until = (last + 1 + READ_AHEAD_BLOCKS).min(blocks);
            let from = self.queued_end.swap(until, Ordering::Relaxed).max(last + 1);
            for b in from..until {
                // A full queue means the threads are behind: skip rather than wait.
                let _ = tx.try_send(b);
            }
        } else {
            // A jump starts a new run: nothing after it is queued yet.
            self.queued_end.store(0, Ordering::Relaxed);
        }
    }

    /// The bytes `[start, start + len)` of the restore point as a seekable stream (for the
    /// partition-table reader and the filesystem probes).
    pub fn stream(self: &Arc<Self>, start: u64, len: u64) -> Stream {
        Stream {
            source: self.clone(),
            start,
            len,
            pos: 0,
        }
    }
}

pub struct Stream {
    source: Arc<BlockSource>,
    start: u64,
    len: u64,
    pos: u64,
}

impl std::io::Read for Stream {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = (out.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.source
            .read(self.start + self.pos, &mut out[..n])
            .map_err(|f| std::io::Error::other(format!("{:#}", f.error)))?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl std::io::Seek for Stream {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        let new = match pos {
            std::io::SeekFrom::Start(n) => Some(n),
            std::io::SeekFrom::End(d) => self.len.checked_add_signed(d),
            std::io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = new.ok_or_else(|| std::io::Error::other("seek out of range"))?;
        Ok(self.pos)
    }
}
