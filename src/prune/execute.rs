//! Carrying out a prune decision crash-safely (docs/prune.md): rewrite every kept image whose
//! parent goes, publish, then remove, then collect garbage.
//!
//! A kept image K whose parent is removed is rewritten in place under its own id: its restore
//! point, planned by the one planner (`chain::Planner`) over its old chain, is re-expressed over
//! its nearest kept ancestor A (or over nothing: a synthetic full). Every part of the point that
//! an image above A supplies is carried over as an index entry pointing at the frame already
//! stored (a window of it when a newer image replaced the rest): nothing is decompressed or
//! rewritten but the index. Only a block whose pieces do not fall on granule boundaries (a chain
//! whose source size changed to a size that is not a multiple of the granule) is decoded through
//! the one checked reader and stored again.

use crate::chain::{self, Piece, Planner, Source};
use crate::format::frame::{image_tag, Codec};
use crate::format::manifest::{
    BadRangesRef, IndexRef, ParentRef, SegmentOrigin, SegmentRef, Stats,
};
use crate::format::{
    self, hash_hex, Entry, EntryKind, FrameHeader, ImageKind, IndexWriter, Manifest, Method,
    SegmentHeader,
};
use crate::reader::BlockDecoder;
use crate::repo::{sync_dir, Image, RepoLock, Repository};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// What happens to one kept image whose parent is removed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Rewritten {
    pub id: String,
    /// Its kind before and after: a kept incremental whose full goes becomes a (synthetic) full.
    pub was: &'static str,
    pub now: &'static str,
    /// Its new parent (the nearest kept image below it), None for a synthetic full.
    pub parent: Option<String>,
    /// The removed images whose data it takes over.
    pub merged: Vec<String>,
    /// Index entries of the rewritten image, and how many of them are windows of larger frames.
    pub entries: u64,
    pub windows: u64,
    /// Bytes decoded and stored again (blocks whose pieces are not granule-aligned).
    pub reencoded_bytes: u64,
}

/// What a prune did, or (dry run) would do, to the repository's files.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Outcome {
    pub rewritten: Vec<Rewritten>,
    pub removed: Vec<String>,
    /// Bytes of the repository's files (images/, segments/, tmp/) before.
    pub bytes_before: u64,
    /// Bytes they hold after (for a dry run: would hold).
    pub bytes_after: u64,
    /// Bytes of new files written (indexes, manifests, unreadable-range lists, re-encoded frames).
    pub bytes_written: u64,
}

impl Outcome {
    pub fn freed(&self) -> u64 {
        self.bytes_before.saturating_sub(self.bytes_after)
    }
}

/// Fault injection for the crash tests (as `CAIRN_FAULT_READ`): with `CAIRN_FAULT_PRUNE_KILL_AT=N`
/// the process kills itself with SIGKILL at the N-th step of a prune that changes the
/// repository (a file written, renamed or deleted), as a power loss or `kill -9` would stop it.
fn step() {
    static STEPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = STEPS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    let kill_at = std::env::var("CAIRN_FAULT_PRUNE_KILL_AT")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    if kill_at == Some(n) {
        // SAFETY: kill(2) with this process's own pid and a signal number; no memory involved.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// A segment as the repository knows it: who wrote it, under which number.
type SegKey = SegmentOrigin;

/// Carries out the removal of `remove` (ids of readable images), or only plans it (`dry_run`).
/// Every kept image whose parent is in `remove` is rewritten first; the caller holds `lock`.
pub fn plan_or_execute(
    repo: &Repository,
    lock: Option<&RepoLock>,
    remove: &BTreeSet<String>,
    dry_run: bool,
) -> Result<Outcome> {
    let cat = repo.catalogue()?;
    if let Some((id, why)) = cat.unreadable.first() {
        bail!(
            "image {id} cannot be read ({why}); prune cannot tell which images depend on it or \
             which segments it uses, so it changes nothing: repair or remove that image first"
        );
    }
    if !dry_run {
        let lock = lock.ok_or_else(|| anyhow!("a prune that writes needs the exclusive lock"))?;
        repo.upgrade(lock)?;
        // Whatever an interrupted prune or backup left is finished off first.
        repo.remove_leftovers(lock)?;
        collect_garbage(repo, lock)?;
    }
    let bytes_before = files_bytes(repo)?;
    let mut outcome = Outcome {
        bytes_before,
        ..Outcome::default()
    };
    let manifests: BTreeMap<String, Manifest> = cat
        .images
        .iter()
        .map(|l| Ok((l.id.clone(), repo.load_manifest(&l.id)?.0)))
        .collect::<Result<_>>()?;
    for id in remove {
        if !manifests.contains_key(id) {
            bail!("no image {id} in {}", repo.root.display());
        }
        if is_protected(repo, id) {
            bail!("image {id} is protected; `cairn protect --unprotect --image {id}` first");
        }
    }
    // The new segment lists of rewritten images, for the space they keep referenced.
    let mut new_refs: HashMap<String, (Vec<SegmentRef>, u64)> = HashMap::new();
    for listed in &cat.images {
        let m = &manifests[&listed.id];
        let removed_parent = m.parent.as_ref().is_some_and(|p| remove.contains(&p.id));
        if remove.contains(&listed.id) || !removed_parent {
            continue;
        }
        let (r, refs, extra) = rewrite(repo, &listed.id, remove, dry_run).with_context(|| {
            format!("cannot rewrite image {} (nothing of it changed)", listed.id)
        })?;
        outcome.bytes_written += extra;
        new_refs.insert(listed.id.clone(), (refs, extra));
        outcome.rewritten.push(r);
    }
    if dry_run {
        outcome.removed = remove.iter().cloned().collect();
        outcome.bytes_after = referenced_bytes(repo, &manifests, remove, &new_refs)?;
        return Ok(outcome);
    }
    // Every rewritten image is published: nothing kept depends on a removed image any more.
    // Newest first: an image goes only after every image above it, so at every instant each
    // image still listed has its whole chain (a kill leaves no half-dropped chain behind).
    let referenced = referenced_segments(repo)?;
    for listed in cat.images.iter().rev().filter(|l| remove.contains(&l.id)) {
        remove_image(repo, &listed.id, &referenced)?;
        outcome.removed.push(listed.id.clone());
    }
    collect_garbage(repo, lock.expect("checked above"))?;
    outcome.bytes_after = files_bytes(repo)?;
    Ok(outcome)
}

/// Rewrites kept image `id` over its nearest kept ancestor. Returns what it became, its new
/// segment list and the bytes written (for a dry run: that would be written).
fn rewrite(
    repo: &Repository,
    id: &str,
    remove: &BTreeSet<String>,
    dry_run: bool,
) -> Result<(Rewritten, Vec<SegmentRef>, u64)> {
    let chain = chain::resolve(repo, id)?;
    let top = chain.len() - 1;
    let k = &chain[top];
    let base = (0..top).rev().find(|&i| !remove.contains(chain[i].id()));
    let merged: Vec<String> = chain[base.map_or(0, |b| b + 1)..top]
        .iter()
        .map(|i| i.id().to_string())
        .collect();
    let generation = k.rewrite.generation + 1;
    let mut out = Output::new(k, generation, dry_run)?;
    let unreadable = chain::unreadable_at(&chain)?;
    walk(&chain, base, &mut out)?;
    let was = k.manifest.kind.as_str();
    let (kind, method, parent, base_full) = match base {
        None => (ImageKind::Full, Method::Full, None, None),
        Some(b) => {
            let a = &chain[b];
            (
                ImageKind::Incremental,
                // A compare-scan read its whole source: what is unknown at it is exactly its
                // unreadable list, which is what was unknown at the old point.
                Method::CompareScan,
                Some(ParentRef {
                    id: a.id().to_string(),
                    manifest_blake3: hash_hex(&a.manifest_hash),
                }),
                Some(
                    a.manifest
                        .base_full
                        .clone()
                        .unwrap_or_else(|| a.id().to_string()),
                ),
            )
        }
    };
    let report = Rewritten {
        id: id.to_string(),
        was,
        now: kind.as_str(),
        parent: parent.as_ref().map(|p| p.id.clone()),
        merged: merged.clone(),
        entries: out.entries,
        windows: out.windows,
        reencoded_bytes: out.reencoded,
    };
    let (index, refs, stats, mut written) = out.finish()?;
    let mut m = k.manifest.clone();
    m.format_version = format::FORMAT_VERSION;
    m.kind = kind;
    m.method = method;
    m.parent = parent;
    m.base_full = base_full;
    m.index = index;
    m.segments = refs.clone();
    m.stats = stats;
    m.bad_ranges = Vec::new();
    m.bad_ranges_file = None;
    let mut bad_file: Option<(Vec<u8>, BadRangesRef)> = None;
    if !unreadable.is_empty() {
        let (bytes, r) = format::badranges::encode(&unreadable);
        m.bad_ranges_file = Some(r.clone());
        bad_file = Some((bytes, r));
    }
    let mut rw = k.rewrite.clone();
    rw.generation = generation;
    rw.former_manifests.push(hash_hex(&k.manifest_hash));
    rw.merged_from.extend(merged);
    m.validate()
        .map_err(|e| anyhow!("the rewritten manifest would be invalid: {e}"))?;
    let (bytes, _) = m.encode_rewritten(&rw);
    written += bytes.len() as u64;
    if let Some((b, _)) = &bad_file {
        written += b.len() as u64;
    }
    if dry_run {
        return Ok((report, refs, written));
    }
    step();
    if let Some((b, _)) = &bad_file {
        write_synced(&k.dir.join(format::bad_ranges_file_name(generation)), b)?;
        step();
    }
    publish_manifest(&k.dir, &bytes)?;
    // The rewritten point must load and hold together before anything it replaced goes.
    let check = chain::resolve(repo, id)
        .with_context(|| format!("image {id} does not load after its rewrite"))?;
    debug_assert_eq!(check.last().map(|i| i.id()), Some(id));
    Ok((report, refs, written))
}

/// Replaces an image's manifest atomically: `manifest.new`, fsync, rename(2), fsync the directory.
fn publish_manifest(dir: &Path, bytes: &[u8]) -> Result<()> {
    let new = dir.join("manifest.new");
    let _ = fs::remove_file(&new);
    write_synced(&new, bytes)?;
    step();
    fs::rename(&new, dir.join("manifest"))
        .with_context(|| format!("cannot replace {}/manifest", dir.display()))?;
    step();
    sync_dir(dir)?;
    step();
    Ok(())
}

fn write_synced(p: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(p)
        .with_context(|| format!("cannot create {}", p.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", p.display()))
}

/// One piece of the rewritten point, in ascending order.
enum Item {
    /// A stored frame carried over: `entry` as it goes into the new index, its `segment` still
    /// numbered in chain image `ci`'s list.
    Carry { ci: usize, entry: Entry },
    /// Zero now, where the new parent's point holds data.
    Zero { offset: u64, len: u64 },
    /// A block decoded through the checked reader, to be stored again.
    Encode { offset: u64, data: Vec<u8> },
}

/// Plans the point of the chain's last image over `chain[base]` (None: over nothing) with the one
/// planner, block by block, handing each piece the rewritten image must hold to `out`.
fn walk(chain: &[Image], base: Option<usize>, out: &mut Output) -> Result<()> {
    let top = &chain[chain.len() - 1].manifest;
    let (size, g) = (top.source.size, u64::from(top.granule));
    let mut planner = Planner::new(chain);
    let mut below = base.map(|b| Planner::new(&chain[..=b]));
    let below_blocks = below.as_ref().map_or(0, |p| p.blocks());
    let mut decoder = BlockDecoder::new(chain)?;
    let aligned = |x: u64| x % g == 0 || x == size;
    for block in 0..planner.blocks() {
        let pieces = planner.next().expect("within the block count")?;
        let parent: Option<Vec<Piece>> = match below.as_mut() {
            Some(p) if block < below_blocks => Some(p.next().expect("within the count")?),
            _ => None,
        };
        let mut items = Vec::new();
        let mut regular = true;
        for p in &pieces {
            let end = p.offset + p.len;
            let needed = match p.source {
                Source::Entry(ci, _) => base.is_none_or(|b| ci > b),
                Source::Zero => base.is_some() && parent_has_data(parent.as_deref(), p.offset, end),
            };
            if !needed {
                continue;
            }
            if !aligned(p.offset) || !aligned(end) {
                regular = false;
                break;
            }
            items.push(match p.source {
                Source::Entry(ci, ei) => Item::Carry {
                    ci,
                    entry: window(chain::entry(&chain[ci], ei as u64)?, p),
                },
                Source::Zero => Item::Zero {
                    offset: p.offset,
                    len: p.len,
                },
            });
        }
        if regular {
            for item in items {
                out.take(chain, item)?;
            }
            continue;
        }
        // Pieces off the granule grid cannot be entries: store the block's plaintext again.
        let data = decoder.decode(&pieces)?;
        let offset = pieces[0].offset;
        if format::is_zero(&data) {
            if base.is_some() {
                let len = data.len() as u64;
                out.take(chain, Item::Zero { offset, len })?;
            }
        } else {
            out.take(chain, Item::Encode { offset, data })?;
        }
    }
    Ok(())
}

/// Whether the parent point's pieces of a block hold stored data anywhere in `[from, to)` (None:
/// the block lies past the parent's size, where its point is zero).
fn parent_has_data(parent: Option<&[Piece]>, from: u64, to: u64) -> bool {
    parent.is_some_and(|pieces| {
        pieces.iter().any(|q| {
            matches!(q.source, Source::Entry(..)) && q.offset < to && q.offset + q.len > from
        })
    })
}

/// The entry for piece `p` of entry `e`: `e` itself when the piece is all of it, else a window
/// of the frame `e` reads.
fn window(e: Entry, p: &Piece) -> Entry {
    if p.offset == e.offset && p.len == u64::from(e.length) {
        return e;
    }
    let (frame_offset, frame_length) = e.frame_span();
    let codec = e.kind.codec().expect("a stored entry has a codec");
    Entry {
        offset: p.offset,
        length: p.len as u32,
        kind: EntryKind::Window(format::index::Window {
            codec,
            skip: (p.offset - frame_offset) as u32,
            frame_length,
        }),
        ..e
    }
}

/// The rewritten image's new files as the walk produces them: the index (streamed; counted only
/// in a dry run), its segment list, and a segment of its own for re-encoded blocks.
struct Output {
    id: String,
    dir: PathBuf,
    level: i32,
    index: Option<IndexWriter>,
    dry_run: bool,
    positions: HashMap<SegKey, u32>,
    refs: Vec<SegmentRef>,
    /// The segment re-encoded blocks go to, opened on first use: (its position in the list, its
    /// number as this image's segment, file, length, hash).
    fresh: Option<(u32, u32, Option<File>, u64, blake3::Hasher)>,
    next_number: u32,
    entries: u64,
    windows: u64,
    reencoded: u64,
    stats: Stats,
    zero_hashes: HashMap<u64, format::Hash>,
    prev_end: u64,
}

impl Output {
    fn new(k: &Image, generation: u32, dry_run: bool) -> Result<Output> {
        let index = if dry_run {
            None
        } else {
            let p = k.dir.join(format::index_file_name(generation));
            let _ = fs::remove_file(&p);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&p)
                .with_context(|| format!("cannot create {}", p.display()))?;
            Some(IndexWriter::new(f)?)
        };
        // A number no segment this image wrote has: past its files and everything its list names.
        let mut next_number = 0u32;
        for e in fs::read_dir(&k.dir)?.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(num) = n
                .strip_prefix("segment-")
                .and_then(|x| x.parse::<u32>().ok())
            {
                next_number = next_number.max(num + 1);
            }
        }
        for (i, s) in k.manifest.segments.iter().enumerate() {
            let o = s.origin.clone().unwrap_or(SegmentOrigin {
                image: k.id().to_string(),
                number: i as u32,
            });
            if o.image == k.id() {
                next_number = next_number.max(o.number + 1);
            }
        }
        Ok(Output {
            id: k.id().to_string(),
            dir: k.dir.clone(),
            level: k.manifest.level,
            index,
            dry_run,
            positions: HashMap::new(),
            refs: Vec::new(),
            fresh: None,
            next_number,
            entries: 0,
            windows: 0,
            reencoded: 0,
            stats: Stats {
                bytes_read: k.manifest.stats.bytes_read,
                blocks_total: k.manifest.stats.blocks_total,
                duration_ms: k.manifest.stats.duration_ms,
                ..Stats::default()
            },
            zero_hashes: HashMap::new(),
            prev_end: 0,
        })
    }

    /// The position in the new list of a segment of `img`'s list.
    fn position(&mut self, img: &Image, number: u32) -> Result<u32> {
        let place = img.segment(number)?;
        if let Some(&p) = self.positions.get(&place.origin) {
            return Ok(p);
        }
        let p = self.refs.len() as u32;
        let own = place.origin.image == self.id && place.origin.number == p;
        self.refs.push(SegmentRef {
            number: p,
            size: place.size,
            blake3: place.blake3.clone(),
            origin: (!own).then(|| place.origin.clone()),
        });
        self.positions.insert(place.origin, p);
        Ok(p)
    }

    fn push(&mut self, e: Entry) -> Result<()> {
        debug_assert!(e.offset >= self.prev_end);
        self.prev_end = e.end();
        self.entries += 1;
        if matches!(e.kind, EntryKind::Window(_)) {
            self.windows += 1;
        }
        if e.kind == EntryKind::Zero {
            self.stats.blocks_zero += 1;
        } else {
            self.stats.blocks_stored += 1;
            self.stats.data_bytes += u64::from(e.length);
        }
        if let Some(w) = self.index.as_mut() {
            w.push(&e).context("writing the rewritten index")?;
        }
        Ok(())
    }

    fn take(&mut self, chain: &[Image], item: Item) -> Result<()> {
        match item {
            Item::Carry { ci, mut entry } => {
                entry.segment = self.position(&chain[ci], entry.segment)?;
                self.push(entry)
            }
            Item::Zero { offset, len } => {
                let hash = *self
                    .zero_hashes
                    .entry(len)
                    .or_insert_with(|| *blake3::hash(&vec![0u8; len as usize]).as_bytes());
                self.push(Entry {
                    offset,
                    length: len as u32,
                    kind: EntryKind::Zero,
                    segment: 0,
                    stored_length: 0,
                    segment_offset: 0,
                    crc: 0,
                    hash,
                })
            }
            Item::Encode { offset, data } => {
                self.reencoded += data.len() as u64;
                let hash = *blake3::hash(&data).as_bytes();
                let compressed = zstd::bulk::compress(&data, self.level).context("zstd")?;
                let (codec, payload) = if compressed.len() < data.len() {
                    (Codec::Zstd, compressed)
                } else {
                    (Codec::Raw, data.clone())
                };
                let (segment, segment_offset) = self.append(offset, &data, codec, &payload)?;
                self.push(Entry {
                    offset,
                    length: data.len() as u32,
                    kind: EntryKind::stored(codec),
                    segment,
                    stored_length: payload.len() as u32,
                    segment_offset,
                    crc: crc32fast::hash(&payload),
                    hash,
                })
            }
        }
    }

    /// Appends a frame to the image's fresh segment; returns (its position, frame offset).
    fn append(
        &mut self,
        offset: u64,
        data: &[u8],
        codec: Codec,
        payload: &[u8],
    ) -> Result<(u32, u64)> {
        if self.fresh.is_none() {
            let number = self.next_number;
            let header = SegmentHeader {
                number,
                image_tag: image_tag(&self.id),
            }
            .encode();
            let mut file = None;
            if !self.dry_run {
                let p = self.dir.join(format::segment_file_name(number));
                let mut f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&p)
                    .with_context(|| format!("cannot create {}", p.display()))?;
                f.write_all(&header)?;
                file = Some(f);
            }
            let mut h = blake3::Hasher::new();
            h.update(&header);
            let position = self.refs.len() as u32;
            self.refs.push(SegmentRef {
                number: position,
                size: 0,
                blake3: String::new(),
                origin: (position != number).then(|| SegmentOrigin {
                    image: self.id.clone(),
                    number,
                }),
            });
            self.fresh = Some((position, number, file, header.len() as u64, h));
        }
        let (position, _, file, len, hasher) = self.fresh.as_mut().expect("just opened");
        let fh = FrameHeader {
            codec,
            offset,
            length: data.len() as u32,
            stored_length: payload.len() as u32,
            crc: crc32fast::hash(payload),
        }
        .encode();
        if let Some(f) = file.as_mut() {
            f.write_all(&fh)
                .and_then(|()| f.write_all(payload))
                .context("writing a re-encoded frame")?;
        }
        hasher.update(&fh);
        hasher.update(payload);
        let at = *len;
        *len += (fh.len() + payload.len()) as u64;
        Ok((*position, at))
    }

    /// Closes the files; returns the index reference, the segment list, the stats and the bytes
    /// written (index and fresh segment).
    fn finish(mut self) -> Result<(IndexRef, Vec<SegmentRef>, Stats, u64)> {
        let mut written = 0u64;
        if let Some((position, _, file, len, hasher)) = self.fresh.take() {
            if let Some(f) = file {
                f.sync_all().context("fsync the re-encoded segment")?;
            }
            written += len;
            let r = &mut self.refs[position as usize];
            r.size = len;
            r.blake3 = hasher.finalize().to_hex().to_string();
        }
        let index_size = format::Index::encoded_len(self.entries as usize);
        written += index_size;
        let index = match self.index.take() {
            None => IndexRef {
                entries: self.entries,
                size: index_size,
                blake3: hash_hex(&[0u8; 32]),
            },
            Some(w) => {
                let (file, summary) = w.finish().context("finishing the rewritten index")?;
                file.sync_all().context("fsync the rewritten index")?;
                IndexRef {
                    entries: summary.entries,
                    size: summary.size,
                    blake3: hash_hex(&summary.blake3),
                }
            }
        };
        let mut stats = self.stats;
        stats.stored_bytes = self.refs.iter().map(|r| r.size).sum::<u64>() + index.size;
        Ok((index, self.refs, stats, written))
    }
}

/// Every segment a published manifest references, as (origin, number).
fn referenced_segments(repo: &Repository) -> Result<BTreeSet<SegKey>> {
    let mut set = BTreeSet::new();
    for id in repo.image_dir_ids()? {
        let (m, _) = repo.load_manifest(&id)?;
        for (i, s) in m.segments.iter().enumerate() {
            set.insert(s.origin.clone().unwrap_or(SegmentOrigin {
                image: id.clone(),
                number: i as u32,
            }));
        }
    }
    Ok(set)
}

/// Removes image `id`, whose dependants are all rewritten: its segments that published images
/// still reference move to the shared directory first (rename(2): readers find them either
/// place), then the whole directory leaves images/ in one rename and is deleted.
fn remove_image(repo: &Repository, id: &str, referenced: &BTreeSet<SegKey>) -> Result<()> {
    let dir = repo.images_dir().join(id);
    let pool = repo.pool_dir();
    let mut moved = false;
    for e in fs::read_dir(&dir)?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(num) = n
            .strip_prefix("segment-")
            .and_then(|x| x.parse::<u32>().ok())
        else {
            continue;
        };
        let key = SegmentOrigin {
            image: id.to_string(),
            number: num,
        };
        if referenced.contains(&key) {
            let to = pool.join(format::pooled_segment_file_name(id, num));
            fs::rename(e.path(), &to).with_context(|| {
                format!("cannot move {} to {}", e.path().display(), to.display())
            })?;
            step();
            moved = true;
        }
    }
    if moved {
        sync_dir(&pool)?;
        sync_dir(&dir)?;
    }
    let gone = repo.tmp_dir().join(format!("removed-{id}"));
    let _ = fs::remove_dir_all(&gone);
    fs::rename(&dir, &gone).with_context(|| format!("cannot remove image {id}"))?;
    step();
    sync_dir(&repo.images_dir())?;
    sync_dir(&repo.tmp_dir())?;
    step();
    fs::remove_dir_all(&gone).with_context(|| format!("cannot delete {}", gone.display()))?;
    step();
    sync_dir(&repo.tmp_dir())
}

/// Deletes what no published image needs (PBS's garbage collection, without its grace period:
/// every writer of this repository holds the exclusive lock, which the caller holds, so no image
/// is being written that could need a file it does not reference yet): shared segments no
/// manifest references, and in each image's directory the files of other generations, segments
/// of its own that nothing references and an unpublished `manifest.new`.
pub fn collect_garbage(repo: &Repository, _lock: &RepoLock) -> Result<u64> {
    let referenced = referenced_segments(repo)?;
    let mut freed = 0u64;
    let mut delete = |p: &Path| -> Result<()> {
        freed += fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        fs::remove_file(p).with_context(|| format!("cannot delete {}", p.display()))?;
        step();
        Ok(())
    };
    let pool = repo.pool_dir();
    let mut pool_changed = false;
    for e in fs::read_dir(&pool).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let key = n.rsplit_once('.').and_then(|(origin, num)| {
            Some(SegmentOrigin {
                image: origin.to_string(),
                number: num.parse().ok()?,
            })
        });
        if key.is_some_and(|k| !referenced.contains(&k)) {
            delete(&e.path())?;
            pool_changed = true;
        }
    }
    if pool_changed {
        sync_dir(&pool)?;
    }
    for id in repo.image_dir_ids()? {
        let dir = repo.images_dir().join(&id);
        let (_, rw, _) = repo.load_manifest_rewritten(&id)?;
        let (index, bad) = (
            format::index_file_name(rw.generation),
            format::bad_ranges_file_name(rw.generation),
        );
        let mut changed = false;
        for e in fs::read_dir(&dir)?.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let stray = if let Some(num) = n.strip_prefix("segment-") {
                num.parse::<u32>().is_ok_and(|num| {
                    !referenced.contains(&SegmentOrigin {
                        image: id.clone(),
                        number: num,
                    })
                })
            } else if n.starts_with("index") {
                n != index
            } else if n.starts_with(format::badranges::FILE_NAME) {
                n != bad
            } else {
                n == "manifest.new"
            };
            if stray {
                delete(&e.path())?;
                changed = true;
            }
        }
        if changed {
            sync_dir(&dir)?;
        }
    }
    Ok(freed)
}

/// Bytes of every file under images/, segments/ and tmp/.
pub fn files_bytes(repo: &Repository) -> Result<u64> {
    fn walk(p: &Path) -> u64 {
        let Ok(rd) = fs::read_dir(p) else {
            return 0;
        };
        rd.flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => walk(&e.path()),
                Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
                Err(_) => 0,
            })
            .sum()
    }
    Ok(walk(&repo.images_dir()) + walk(&repo.pool_dir()) + walk(&repo.tmp_dir()))
}

/// The bytes the repository would hold once `remove` is gone and the rewritten images hold
/// `new_refs` (segment list, bytes of their new files): each referenced segment once, plus every
/// kept image's manifest, index and unreadable-range list.
fn referenced_bytes(
    repo: &Repository,
    manifests: &BTreeMap<String, Manifest>,
    remove: &BTreeSet<String>,
    new_refs: &HashMap<String, (Vec<SegmentRef>, u64)>,
) -> Result<u64> {
    let mut segments: BTreeMap<SegKey, u64> = BTreeMap::new();
    let mut other = 0u64;
    for (id, m) in manifests {
        if remove.contains(id) {
            continue;
        }
        let refs = match new_refs.get(id) {
            Some((refs, written)) => {
                other += written;
                refs
            }
            None => {
                let dir = repo.images_dir().join(id);
                for e in fs::read_dir(&dir)?.flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if !n.starts_with("segment-") {
                        other += e.metadata().map(|m| m.len()).unwrap_or(0);
                    }
                }
                &m.segments
            }
        };
        for (i, s) in refs.iter().enumerate() {
            let key = s.origin.clone().unwrap_or(SegmentOrigin {
                image: id.clone(),
                number: i as u32,
            });
            segments.insert(key, s.size);
        }
    }
    Ok(other + segments.values().sum::<u64>())
}

/// A protected image has a `protected` file in its directory (docs/format.md).
pub fn is_protected(repo: &Repository, id: &str) -> bool {
    repo.images_dir().join(id).join(PROTECTED).exists()
}

pub const PROTECTED: &str = "protected";

/// Protects (or unprotects) an image: a prune never removes it, a delete refuses it.
pub fn set_protected(repo: &Repository, _lock: &RepoLock, id: &str, on: bool) -> Result<bool> {
    repo.load_manifest(id)?;
    let dir = repo.images_dir().join(id);
    let p = dir.join(PROTECTED);
    let was = p.exists();
    if on && !was {
        write_synced(&p, b"")?;
        sync_dir(&dir)?;
    } else if !on && was {
        fs::remove_file(&p).with_context(|| format!("cannot remove {}", p.display()))?;
        sync_dir(&dir)?;
    }
    Ok(was)
}
