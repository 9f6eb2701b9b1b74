//! Which images a restore point needs, and which image supplies each part of the source.
//!
//! A restore point is an image plus its ancestors back to the full image (for a differential: the
//! full only). Per byte, the newest image of the chain that holds it wins; a region outside an
//! image's source size is zero from that image on; a full image's uncovered regions are zero. The
//! plan is produced block by block in ascending order, so restore writes every block exactly once.
//! Every reader of a restore point (restore, `restore --verify`, verify, a compare-scan's base)
//! takes its plan from here.

use crate::format::{Entry, EntryKind, ImageKind, Manifest};
use crate::repo::{Image, Repository};
use anyhow::{anyhow, bail, Result};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// The most images a restore point's chain may hold. A parent loop cannot pass the manifest-hash
/// check of every link, so only a chain this long (or a hand-made one) reaches it; the bound keeps
/// the walk finite whatever the repository holds.
const MAX_CHAIN: usize = 100_000;

/// Loads the chain ending at `id`, oldest (the full) first, checking each parent link against the
/// manifest hash the child recorded (the rules of [`Links`]).
pub fn resolve(repo: &Repository, id: &str) -> Result<Vec<Image>> {
    let top = repo.load_image(id)?;
    let decided = Links::default().decide(top, |parent| repo.load_image(parent));
    let (_, verdict) = decided.last().expect("the top is always decided");
    if let Err(broken) = verdict {
        return Err(broken.error(id));
    }
    // Nothing was decided before, so a chain that holds was walked down to its full image.
    debug_assert!(decided[0].0.manifest.parent.is_none());
    Ok(decided.into_iter().map(|(img, _)| img).collect())
}

/// What the link rules established about the chain ending at an image whose chain holds.
#[derive(Debug, Clone)]
pub struct Linked {
    full: String,
    block_size: u32,
    granule: u32,
    images: usize,
}

/// Why the chain ending at an image does not hold.
#[derive(Debug, Clone)]
pub enum Broken {
    /// A link or an image of the chain is at fault: the same message for every point above it.
    At(String),
    /// The chain does not start with a full image.
    NoFull,
    /// The chain holds more than [`MAX_CHAIN`] images.
    TooLong,
}

impl Broken {
    /// The error for the restore point ending at image `point`.
    pub fn error(&self, point: &str) -> anyhow::Error {
        match self {
            Broken::At(why) => anyhow!("{why}"),
            Broken::NoFull => anyhow!("image {point}: its chain does not start with a full image"),
            Broken::TooLong => {
                anyhow!("image {point}: chain longer than {MAX_CHAIN} images (a parent loop?)")
            }
        }
    }
}

/// The verdict on the restore point ending at one image: whether its chain holds together.
pub type Verdict = std::result::Result<Linked, Broken>;

/// The one definition of a restore point whose chain holds together, decided point by point from
/// the parent's point: restore (through [`resolve`]) and verify use it, so they cannot disagree.
///
/// The rules: the parent of every image of the chain loads (manifest and index checked) and is
/// the image its child recorded (manifest hash); the oldest image is a full image; every image has
/// its full's block size and granule (sizes may differ along a chain: a grown or shrunk device);
/// the chain holds at most [`MAX_CHAIN`] images. A point's verdict is remembered, so deciding the
/// points of a repository loads each image once, however long its chains.
#[derive(Default)]
pub struct Links {
    /// Per image: the manifest hashes it answers to ([`Image::answers_to`]) and its point's
    /// verdict; or why it could not be loaded.
    known: HashMap<String, std::result::Result<(Vec<String>, Verdict), String>>,
}

impl Links {
    /// The verdict on the point ending at `id`, when decided.
    pub fn verdict(&self, id: &str) -> Option<&Verdict> {
        match self.known.get(id) {
            Some(Ok((_, verdict))) => Some(verdict),
            _ => None,
        }
    }

    /// Decides the point ending at `top` (loaded by the caller) and every undecided point below
    /// it, loading each parent not known yet with `load`, once. Returns the images of the walk,
    /// oldest first, each with its point's verdict (the last is `top`'s). A parent that fails to
    /// load is remembered as such; a parent that loads but is not the image its child recorded ends
    /// the walk and is not returned (its own point is decided when it is asked for).
    pub fn decide(
        &mut self,
        top: Image,
        mut load: impl FnMut(&str) -> Result<Image>,
    ) -> Vec<(Image, Verdict)> {
        let mut walk = vec![top];
        // The verdict on the point below the walk's oldest image; None when that image has no parent.
        let mut below: Option<Verdict> = loop {
            let child = &walk[walk.len() - 1].manifest;
            let Some(parent) = child.parent.clone() else {
                break None;
            };
            if walk.len() >= MAX_CHAIN {
                break Some(Err(Broken::TooLong));
            }
            let replaced = |hashes: &[String]| !hashes.contains(&parent.manifest_blake3);
            let replaced_error = Broken::At(format!(
                "image {}: its parent {} has been replaced (manifest hash differs)",
                child.id, parent.id
            ));
            let damaged = |why: &str| {
                Broken::At(format!(
                    "image {} needs its parent {}, which is damaged or missing: {why}",
                    child.id, parent.id
                ))
            };
            match self.known.get(&parent.id) {
                Some(Ok((hash, _))) if replaced(hash) => break Some(Err(replaced_error)),
                Some(Ok((_, verdict))) => break Some(verdict.clone()),
                Some(Err(why)) => break Some(Err(damaged(why))),
                None => {}
            }
            match load(&parent.id) {
                Err(e) => {
                    let why = format!("{e:#}");
                    let broken = damaged(&why);
                    self.known.insert(parent.id, Err(why));
                    break Some(Err(broken));
                }
                Ok(p) if !p.answers_to(&parent.manifest_blake3) => break Some(Err(replaced_error)),
                Ok(p) => walk.push(p),
            }
        };
        let mut decided = Vec::with_capacity(walk.len());
        for img in walk.into_iter().rev() {
            let verdict = extend(&img.manifest, below.as_ref());
            let mut hashes = img.rewrite.former_manifests.clone();
            hashes.push(crate::format::hash_hex(&img.manifest_hash));
            self.known
                .insert(img.id().to_string(), Ok((hashes, verdict.clone())));
            below = Some(verdict.clone());
            decided.push((img, verdict));
        }
        decided
    }
}

/// The verdict on the point ending at `m`, from the verdict on its parent's point (None: `m` has
/// no parent) once the link between them holds; a broken parent point breaks this one.
fn extend(m: &Manifest, parent: Option<&Verdict>) -> Verdict {
    let Some(parent) = parent else {
        if m.kind != ImageKind::Full {
            return Err(Broken::NoFull);
        }
        return Ok(Linked {
            full: m.id.clone(),
            block_size: m.block_size,
            granule: m.granule,
            images: 1,
        });
    };
    let below = parent.as_ref().map_err(Clone::clone)?;
    if below.images >= MAX_CHAIN {
        return Err(Broken::TooLong);
    }
    if m.block_size != below.block_size || m.granule != below.granule {
        return Err(Broken::At(format!(
            "image {}: block geometry differs from its full image {}",
            m.id, below.full
        )));
    }
    Ok(Linked {
        images: below.images + 1,
        ..below.clone()
    })
}

/// Where a piece of a block comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Zero,
    /// (position in the chain, entry number in that image's index)
    Entry(usize, usize),
}

/// A run of bytes within one block with a single source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub offset: u64,
    pub len: u64,
    pub source: Source,
}

/// Walks the chain block by block.
///
/// Ownership of each byte of a block is decided newest image first. An image claims what its
/// entries cover, and then everything at or past its own source size: a region that lay outside
/// the source when that image was taken reads as zero from that image on, unless a later image
/// stores it (a chain that shrank and grew again must not resurrect an older image's bytes).
/// Whatever no image claims is zero (a full image leaves all-zero blocks out).
///
/// Entries are read from each image's index as the walk reaches them, and a block looks only at
/// the images that have entries in it or whose source ends inside it: memory does not grow with
/// the image and time grows with the entries visited, not with blocks × chain length.
pub struct Planner<'a> {
    chain: &'a [Image],
    /// Per image, the next entry not yet planned.
    cursors: Vec<u64>,
    /// (offset of the next entry, image) for every image with entries left; filled on first use.
    next: BinaryHeap<Reverse<(u64, usize)>>,
    started: bool,
    /// Source sizes ascending, and the newest image among those up to each position.
    by_size: Vec<(u64, usize)>,
    newest_up_to: Vec<usize>,
    block: u64,
    blocks: u64,
    block_size: u64,
    size: u64,
}

impl<'a> Planner<'a> {
    /// Plans the state of the chain's last image, at that image's size.
    pub fn new(chain: &'a [Image]) -> Self {
        let m = &chain[chain.len() - 1].manifest;
        let block_size = u64::from(m.block_size);
        let mut by_size: Vec<(u64, usize)> = chain
            .iter()
            .enumerate()
            .map(|(ci, img)| (img.manifest.source.size, ci))
            .collect();
        by_size.sort_unstable();
        let newest_up_to = by_size
            .iter()
            .scan(0usize, |newest, &(_, ci)| {
                *newest = (*newest).max(ci);
                Some(*newest)
            })
            .collect();
        Planner {
            chain,
            cursors: vec![0; chain.len()],
            next: BinaryHeap::new(),
            started: false,
            by_size,
            newest_up_to,
            block: 0,
            blocks: m.source.size.div_ceil(block_size),
            block_size,
            size: m.source.size,
        }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Moves the walk to `block` (the next call to `next` plans it): each image's cursor is found
    /// by binary search in its index.
    pub fn seek(&mut self, block: u64) -> Result<()> {
        let at = block.saturating_mul(self.block_size);
        for (ci, img) in self.chain.iter().enumerate() {
            let (mut lo, mut hi) = (0u64, img.index.len());
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                if entry(img, mid)?.offset < at {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            self.cursors[ci] = lo;
        }
        self.block = block;
        self.started = false;
        Ok(())
    }

    /// Fills the heap from the cursors.
    fn start(&mut self) -> Result<()> {
        self.next.clear();
        for (ci, img) in self.chain.iter().enumerate() {
            if self.cursors[ci] < img.index.len() {
                let e = entry(img, self.cursors[ci])?;
                self.next.push(Reverse((e.offset, ci)));
            }
        }
        self.started = true;
        Ok(())
    }

    /// Every entry of any image that starts before `end`, as (image, entry number, entry),
    /// grouped by image; the cursors move past them.
    fn entries_before(&mut self, end: u64) -> Result<Vec<(usize, usize, Entry)>> {
        let mut found = Vec::new();
        while let Some(&Reverse((offset, ci))) = self.next.peek() {
            if offset >= end {
                break;
            }
            self.next.pop();
            let img = &self.chain[ci];
            while self.cursors[ci] < img.index.len() {
                let e = entry(img, self.cursors[ci])?;
                if e.offset >= end {
                    self.next.push(Reverse((e.offset, ci)));
                    break;
                }
                found.push((ci, self.cursors[ci] as usize, e));
                self.cursors[ci] += 1;
            }
        }
        Ok(found)
    }

    fn plan_block(&mut self) -> Result<Vec<Piece>> {
        if !self.started {
            self.start()?;
        }
        let start = self.block * self.block_size;
        let end = (start + self.block_size).min(self.size);
        self.block += 1;
        let found = self.entries_before(end)?;
        // The newest image whose source ended at or before this block claims all of it that no
        // newer image claims; older images cannot matter here.
        let ended = self.by_size.partition_point(|&(s, _)| s <= start);
        let floor = ended.checked_sub(1).map(|k| self.newest_up_to[k]);
        let ends_inside = self.by_size.partition_point(|&(s, _)| s < end);
        let mut images: Vec<usize> = found.iter().map(|f| f.0).collect();
        images.extend(self.by_size[ended..ends_inside].iter().map(|&(_, ci)| ci));
        images.sort_unstable_by(|a, b| b.cmp(a));
        images.dedup();
        let mut unclaimed = Unclaimed(vec![(start, end)]);
        let mut pieces: Vec<Piece> = Vec::new();
        for ci in images {
            if floor.is_some_and(|f| ci < f) || unclaimed.0.is_empty() {
                break;
            }
            for (_, ei, e) in found.iter().filter(|f| f.0 == ci) {
                let source = if e.kind == EntryKind::Zero {
                    Source::Zero
                } else {
                    Source::Entry(ci, *ei)
                };
                unclaimed.claim(e.offset.max(start), e.end().min(end), source, &mut pieces);
            }
            let outside = self.chain[ci].manifest.source.size;
            unclaimed.claim(outside.max(start), end, Source::Zero, &mut pieces);
        }
        for (s, e) in std::mem::take(&mut unclaimed.0) {
            pieces.push(Piece {
                offset: s,
                len: e - s,
                source: Source::Zero,
            });
        }
        pieces.sort_by_key(|p| p.offset);
        let mut merged: Vec<Piece> = Vec::with_capacity(pieces.len());
        for p in pieces {
            match merged.last_mut() {
                Some(m) if m.source == p.source && m.offset + m.len == p.offset => m.len += p.len,
                _ => merged.push(p),
            }
        }
        Ok(merged)
    }
}

/// Entry `i` of an image's index, with the image named in the error.
pub fn entry(img: &Image, i: u64) -> Result<Entry> {
    img.index
        .get(i)
        .map_err(|e| crate::repo::image_error(img.id(), "index", None, e))
}

/// The parts of one block that no newer image has claimed yet, ascending and disjoint.
struct Unclaimed(Vec<(u64, u64)>);

impl Unclaimed {
    /// Claims whatever of `[from, to)` is still unclaimed for `source`.
    fn claim(&mut self, from: u64, to: u64, source: Source, out: &mut Vec<Piece>) {
        if from >= to {
            return;
        }
        let mut rest = Vec::with_capacity(self.0.len() + 1);
        for &(s, e) in &self.0 {
            let (cs, ce) = (s.max(from), e.min(to));
            if cs >= ce {
                rest.push((s, e));
                continue;
            }
            out.push(Piece {
                offset: cs,
                len: ce - cs,
                source,
            });
            if s < cs {
                rest.push((s, cs));
            }
            if ce < e {
                rest.push((ce, e));
            }
        }
        self.0 = rest;
    }
}

impl Iterator for Planner<'_> {
    /// The pieces of one block, in ascending order, covering it exactly; or why the chain's index
    /// could not be read.
    type Item = Result<Vec<Piece>>;

    fn next(&mut self) -> Option<Result<Vec<Piece>>> {
        if self.block >= self.blocks {
            return None;
        }
        Some(self.plan_block())
    }
}

/// Reads and checks (frame header and crc) every stored block a restore of this chain will use,
/// before anything is written: a damaged image anywhere in the chain makes the restore fail with
/// the target untouched, naming that image. Costs one read of the stored data; the plaintext
/// hashes are checked again as each block is written.
/// Only pieces overlapping `[range.0, range.1)` are checked (a one-partition restore).
pub fn precheck(
    chain: &[Image],
    range: (u64, u64),
    progress: &crate::progress::Progress,
) -> Result<()> {
    let mut reader = crate::reader::ChainReader::new(chain);
    let total: u64 = chain.iter().map(|i| i.manifest.stats.stored_bytes).sum();
    progress.start(total, "checking the images before writing");
    let mut payload = Vec::new();
    for pieces in Planner::new(chain) {
        // An entry lies inside one block, so it is read at most once per block: once in all.
        let mut seen: Vec<(usize, usize)> = Vec::new();
        for p in pieces? {
            if p.offset + p.len <= range.0 || p.offset >= range.1 {
                continue;
            }
            if let Source::Entry(ci, ei) = p.source {
                if seen.contains(&(ci, ei)) {
                    continue;
                }
                seen.push((ci, ei));
                reader.read_payload(ci, ei, &mut payload)?;
                progress.advance(payload.len() as u64);
            }
        }
    }
    progress.finish();
    Ok(())
}

/// The source ranges (offset, length) image `img` could not read: its `badranges` file, or the
/// manifest's inline list in images written before that file existed. Checked against the
/// manifest (count, hash, order, bounds).
pub fn bad_ranges(img: &Image) -> Result<Vec<(u64, u64)>> {
    let m = &img.manifest;
    let Some(r) = &m.bad_ranges_file else {
        return Ok(m.bad_ranges.clone());
    };
    let path = img.dir.join(img.bad_ranges_file_name());
    let want = crate::format::badranges::encoded_len(r.ranges);
    let file = std::fs::File::open(&path).map_err(|e| {
        anyhow::anyhow!(
            "image {}: its list of unreadable ranges ({}) is missing: {e}",
            m.id,
            crate::format::badranges::FILE_NAME
        )
    })?;
    let len = file.metadata()?.len();
    if len != want {
        bail!(
            "image {}: {} is {len} bytes, the manifest says {want} (truncated or damaged)",
            m.id,
            crate::format::badranges::FILE_NAME
        );
    }
    let mut bytes = Vec::with_capacity(len as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(file, want), &mut bytes)?;
    crate::format::badranges::decode(&bytes, r, m.source.size).map_err(|e| {
        crate::repo::image_error(m.id.as_str(), crate::format::badranges::FILE_NAME, None, e)
    })
}

/// The ranges (offset, length) whose content is unknown at the restore point `chain` ends with:
/// the union over the chain of each image's unreadable ranges, minus what a later image read
/// successfully. The chain is folded oldest first with [`unknown_step`]; it starts at the newest
/// image that read the whole source, which decides every byte by itself.
pub fn unreadable_at(chain: &[Image]) -> Result<Vec<(u64, u64)>> {
    let start = chain
        .iter()
        .rposition(|img| reads_whole_source(&img.manifest))
        .unwrap_or(0);
    let mut unknown = Vec::new();
    for img in &chain[start..] {
        unknown = unknown_step(img, &unknown)?;
    }
    Ok(ranges(&unknown))
}

/// The spans whose content is unknown at the point ending at `img`, from those unknown at its
/// parent's point (`below`; empty for an image with no parent).
///
/// The same newest-first rule as [`Planner`], with "read" in place of "holds": per byte, the
/// newest image that tried to read it decides. An image that could not read it flags it (and,
/// being an incremental or differential, stored nothing there, so an older image's data is what a
/// restore gives); an image that read it clears it, stored or not (a compare-scan stores only what
/// differs from its parent, but it read everything). A full image and a compare-scan read the
/// whole source; a tracked image read exactly what its index holds. Bytes at or past an image's
/// source size are zero from that image on, so known. Linear in the ranges and entries it visits.
pub fn unknown_step(img: &Image, below: &[(u64, u64)]) -> Result<Vec<(u64, u64)>> {
    let m = &img.manifest;
    let inside = [(0, m.source.size)];
    let mut bad: Vec<(u64, u64)> = bad_ranges(img)?
        .into_iter()
        .map(|(o, l)| (o, o.saturating_add(l)))
        .collect();
    bad.sort_unstable();
    let bad = spans::intersect(&inside, &spans::merged(bad.into_iter()));
    let read: Vec<(u64, u64)> = if reads_whole_source(m) {
        inside.to_vec()
    } else {
        let mut read = Vec::new();
        for i in 0..img.index.len() {
            let e = entry(img, i)?;
            read.push((e.offset, e.end()));
        }
        spans::merged(read.into_iter())
    };
    let undecided = spans::subtract(&spans::intersect(below, &inside), &bad);
    let mut unknown = bad;
    unknown.extend(spans::subtract(&undecided, &read));
    unknown.sort_unstable();
    Ok(spans::merged(unknown.into_iter()))
}

/// Whether an image read its whole source (a full image, a compare-scan), rather than only what a
/// tracker said changed.
fn reads_whole_source(m: &Manifest) -> bool {
    m.method != crate::format::Method::Tracked
}

/// Spans `(start, end)` as ranges `(offset, length)`.
pub fn ranges(spans: &[(u64, u64)]) -> Vec<(u64, u64)> {
    spans.iter().map(|&(s, e)| (s, e - s)).collect()
}

/// Operations on ascending, disjoint half-open byte spans `(start, end)`, each linear.
pub(crate) mod spans {
    pub fn merged(it: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (s, e) in it.filter(|(s, e)| s < e) {
            match out.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        out
    }

    pub fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let (mut i, mut j) = (0, 0);
        let mut out = Vec::new();
        while i < a.len() && j < b.len() {
            let (s, e) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
            if s < e {
                out.push((s, e));
            }
            if a[i].1 < b[j].1 {
                i += 1;
            } else {
                j += 1;
            }
        }
        out
    }

    pub fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut j = 0;
        for &(mut s, e) in a {
            while j < b.len() && b[j].1 <= s {
                j += 1;
            }
            let mut k = j;
            while s < e {
                match b.get(k) {
                    Some(&(bs, be)) if bs < e => {
                        if bs > s {
                            out.push((s, bs));
                        }
                        s = s.max(be);
                        k += 1;
                    }
                    _ => {
                        out.push((s, e));
                        break;
                    }
                }
            }
        }
        out
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn span_algebra() {
            let a = [(0, 10), (20, 30), (40, 50)];
            let b = [(5, 25), (45, 46), (49, 60)];
            assert_eq!(
                intersect(&a, &b),
                vec![(5, 10), (20, 25), (45, 46), (49, 50)]
            );
            assert_eq!(subtract(&a, &b), vec![(0, 5), (25, 30), (40, 45), (46, 49)]);
            assert_eq!(subtract(&a, &[]), a.to_vec());
            assert_eq!(subtract(&[(0, 100)], &[(0, 100)]), vec![]);
            assert_eq!(
                merged([(0, 5), (5, 7), (9, 9), (10, 12)].into_iter()),
                vec![(0, 7), (10, 12)]
            );
        }
    }
}

/// What is unreadable at a restore point, for reports (`verify`, `show`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Unreadable {
    /// Unreadable bytes in all.
    pub bytes: u64,
    /// How many ranges.
    pub count: u64,
    /// The ranges (offset, length), the first [`Unreadable::LISTED`] of them; `cairn badmap`
    /// lists all.
    pub ranges: Vec<(u64, u64)>,
    /// True when `ranges` is not the whole list.
    pub truncated: bool,
}

impl Unreadable {
    pub const LISTED: usize = 1000;

    pub fn summary(all: &[(u64, u64)]) -> Unreadable {
        Unreadable {
            bytes: all.iter().map(|r| r.1).sum(),
            count: all.len() as u64,
            ranges: all.iter().take(Self::LISTED).copied().collect(),
            truncated: all.len() > Self::LISTED,
        }
    }
}
