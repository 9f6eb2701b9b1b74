//! Verify: read every byte of an image's segments once, checking each frame against the index
//! (header, crc, decoded length, blake3) and each segment against the manifest's hash; then say,
//! per restore point, whether its whole chain is intact.

use crate::chain;
use crate::format::{
    segment_file_name, FrameHeader, SegmentHeader, FRAME_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use crate::progress::Progress;
use crate::reader::decode_checked;
use crate::repo::{image_error, Image, Repository};
use anyhow::{anyhow, Result};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read};

/// Error messages kept per image; past this many, damage is counted but not listed.
const MAX_ERRORS: usize = 20;

#[derive(Debug, Clone, Serialize)]
pub struct ImageStatus {
    pub id: String,
    pub name: Option<String>,
    pub kind: Option<&'static str>,
    /// "ok", "intact-with-bad-sectors" (the source had unreadable sectors, stored as zeros; the
    /// image itself is intact) or "damaged".
    pub status: &'static str,
    /// True when this image and every image it depends on are intact.
    pub restorable: bool,
    pub damaged_blocks: u64,
    pub errors: Vec<String>,
    /// What is unreadable at this restore point (its whole chain considered); absent when the
    /// point is not restorable.
    pub unreadable: Option<crate::chain::Unreadable>,
}

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub images: Vec<ImageStatus>,
}

pub fn run(
    repo: &Repository,
    name: Option<&str>,
    image: Option<&str>,
    progress: &Progress,
) -> Result<VerifyReport> {
    // Nothing may be removed (a prune) while it is read.
    let _lock = repo.lock_shared()?;
    let selected = select(repo, name, image)?;
    Ok(verify(repo, &selected, progress, &|id| repo.load_image(id)))
}

/// The images a verify reports on, in the repository's order.
fn select(repo: &Repository, name: Option<&str>, image: Option<&str>) -> Result<Vec<String>> {
    // A manifest that cannot be read has no known name: it is reported with every selection, as
    // it may belong to the name asked for.
    Ok(match (name, image) {
        (_, Some(id)) => {
            repo.select_image(name, Some(id))?;
            vec![id.to_string()]
        }
        (Some(n), None) => {
            let cat = repo.catalogue()?;
            let ids: Vec<String> = cat
                .of_name(n)
                .map(|i| i.id.clone())
                .chain(cat.unreadable.iter().map(|(id, _)| id.clone()))
                .collect();
            if ids.is_empty() {
                anyhow::bail!("no image named {n:?} in {}", repo.root.display());
            }
            ids
        }
        (None, None) => {
            let cat = repo.catalogue()?;
            cat.images
                .into_iter()
                .map(|i| i.id)
                .chain(cat.unreadable.into_iter().map(|(id, _)| id))
                .collect()
        }
    })
}

/// One image as verify found it.
struct Checked {
    status: ImageStatus,
    /// Why the image could not be loaded (its manifest or index), when it could not.
    load_error: Option<String>,
}

/// Byte spans `(start, end)`, ascending and disjoint.
type Spans = Vec<(u64, u64)>;

/// What verify knows of a restore point whose chain holds together ([`chain::Links`]).
struct Point {
    /// The newest damaged image of its chain, itself included.
    damaged: Option<String>,
    /// What is unknown at it (spans), while a point above it may still need it; None once no
    /// point does, or when the chain holds a damaged image.
    unknown: Option<std::result::Result<Spans, String>>,
    /// Its report: what is unreadable at it, or why that could not be told.
    unreadable: Option<std::result::Result<crate::chain::Unreadable, String>>,
}

/// Checks every selected image and every image a selected point depends on, each once (`load`
/// loads an image: the repository's loader, or a test's counting one), and decides each point from
/// its parent's point: a point is restorable when its image is intact, its chain holds together
/// (the rules restore uses, [`chain::Links`]), every image of its chain is intact, and what is
/// unreadable at it can be told. Each point costs one step beyond checking its own image, so a
/// verify is linear in the repository, however long its chains.
fn verify(
    repo: &Repository,
    selected: &[String],
    progress: &Progress,
    load: &dyn Fn(&str) -> Result<Image>,
) -> VerifyReport {
    let mut checked: HashMap<String, Checked> = HashMap::new();
    let mut links = chain::Links::default();
    let mut points: HashMap<String, Point> = HashMap::new();
    let wanted: HashSet<&str> = selected.iter().map(String::as_str).collect();
    let mut children = children_of_points(repo, selected);
    // An image is checked once; one asked for again (a damaged point whose chain was not needed
    // then, or a parent its child did not record) is loaded again but not checked again.
    let obtain = |checked: &mut HashMap<String, Checked>, id: &str| -> Result<Image> {
        if let Some(c) = checked.get_mut(id) {
            if let Some(why) = &c.load_error {
                return Err(anyhow!("{why}"));
            }
            let again = load(id);
            if let Err(e) = &again {
                // It loaded when it was checked: it changed since.
                c.status.status = "damaged";
                c.status.errors.push(format!("{e:#}"));
                c.load_error = Some(format!("{e:#}"));
            }
            return again;
        }
        let loaded = load(id);
        let status = check_image(id, loaded.as_ref(), progress);
        let load_error = loaded.as_ref().err().map(|e| format!("{e:#}"));
        checked.insert(id.to_string(), Checked { status, load_error });
        loaded
    };
    for id in selected {
        if links.verdict(id).is_some() || checked.get(id).is_some_and(|c| !intact(c.status.status))
        {
            continue;
        }
        let top = match obtain(&mut checked, id) {
            Ok(img) if intact(checked[id.as_str()].status.status) => img,
            // A damaged image is not restorable whatever its chain: that chain is not walked now.
            _ => continue,
        };
        let decided = links.decide(top, |parent| obtain(&mut checked, parent));
        for (img, verdict) in decided {
            let id = img.id();
            let parent = img.manifest.parent.as_ref().map(|p| p.id.as_str());
            if verdict.is_ok() {
                let point = point_on(&img, parent.map(|p| &points[p]), &checked, &children);
                let point = Point {
                    unreadable: point.unreadable.filter(|_| wanted.contains(id)),
                    ..point
                };
                points.insert(id.to_string(), point);
            }
            // The parent's unknown spans are kept until its last child has used them.
            if let Some(p) = parent {
                if let Some(left) = children.get_mut(p) {
                    *left = left.saturating_sub(1);
                    if *left == 0 {
                        if let Some(b) = points.get_mut(p) {
                            b.unknown = None;
                        }
                    }
                }
            }
        }
    }
    let images: Vec<ImageStatus> = selected
        .iter()
        .map(|id| {
            let mut status = checked[id.as_str()].status.clone();
            status.restorable = intact(status.status);
            if !status.restorable {
                return status;
            }
            let verdict = links
                .verdict(id)
                .expect("an intact selected image is decided");
            if let Err(broken) = verdict {
                status.restorable = false;
                status
                    .errors
                    .push(format!("not restorable: {:#}", broken.error(id)));
                return status;
            }
            let point = &points[id.as_str()];
            if let Some(damaged) = &point.damaged {
                status.restorable = false;
                status
                    .errors
                    .push(format!("depends on damaged image {damaged}"));
                return status;
            }
            match point.unreadable.clone().expect("a selected point's report") {
                Ok(u) => status.unreadable = Some(u),
                Err(e) => {
                    status.restorable = false;
                    status.errors.push(e);
                }
            }
            status
        })
        .collect();
    let ok = images.iter().all(|i| intact(i.status) && i.restorable);
    VerifyReport { ok, images }
}

/// The point ending at `img`, whose chain holds together, from its parent's point (`below`; None
/// for a full image).
fn point_on(
    img: &Image,
    below: Option<&Point>,
    checked: &HashMap<String, Checked>,
    children: &HashMap<String, usize>,
) -> Point {
    let id = img.id();
    let damaged = if intact(checked[id].status.status) {
        below.and_then(|b| b.damaged.clone())
    } else {
        Some(id.to_string())
    };
    if damaged.is_some() {
        return Point {
            damaged,
            unknown: None,
            unreadable: None,
        };
    }
    let unknown = match below.map(|b| &b.unknown) {
        None => chain::unknown_step(img, &[]).map_err(|e| format!("{e:#}")),
        Some(Some(Ok(u))) => chain::unknown_step(img, u).map_err(|e| format!("{e:#}")),
        Some(Some(Err(e))) => Err(e.clone()),
        // Only a manifest that changed during the verify can make a point need what was dropped.
        Some(None) => Err(format!(
            "image {id}: the repository changed while it was verified; run verify again"
        )),
    };
    let unreadable = Some(match &unknown {
        Ok(u) => Ok(chain::Unreadable::summary(&chain::ranges(u))),
        Err(e) => Err(e.clone()),
    });
    Point {
        damaged,
        unknown: Some(unknown).filter(|_| children.get(id).is_some_and(|&n| n > 0)),
        unreadable,
    }
}

/// How many images name each image as their parent, among the selected images and every image
/// their chains reach (manifests only): a point's unknown spans are kept while a point above it
/// may need them, and no longer. A manifest that cannot be read ends its chain here; the walk of
/// the points finds out why.
fn children_of_points(repo: &Repository, selected: &[String]) -> HashMap<String, usize> {
    let mut children: HashMap<String, usize> = HashMap::new();
    let mut seen: HashSet<String> = HashSet::new();
    for id in selected {
        let mut at = id.clone();
        while seen.insert(at.clone()) {
            let Some(parent) = repo.load_manifest(&at).ok().and_then(|(m, _)| m.parent) else {
                break;
            };
            *children.entry(parent.id.clone()).or_default() += 1;
            at = parent.id;
        }
    }
    children
}

pub fn intact(status: &str) -> bool {
    status == "ok" || status == "intact-with-bad-sectors"
}

/// Checks one image: `loaded` is how loading it went (its index was read and hashed then).
fn check_image(
    id: &str,
    loaded: std::result::Result<&Image, &anyhow::Error>,
    progress: &Progress,
) -> ImageStatus {
    let mut st = ImageStatus {
        id: id.to_string(),
        name: None,
        kind: None,
        status: "ok",
        restorable: false,
        damaged_blocks: 0,
        errors: Vec::new(),
        unreadable: None,
    };
    let img = match loaded {
        Ok(img) => img,
        Err(e) => {
            st.status = "damaged";
            st.errors.push(format!("{e:#}"));
            return st;
        }
    };
    st.name = Some(img.manifest.name.clone());
    st.kind = Some(img.manifest.kind.as_str());
    let total: u64 = img.manifest.segments.iter().map(|s| s.size).sum();
    progress.start(total, &format!("verifying {id}"));
    if shares_segments(img) {
        check_shared(img, &mut st, progress);
        return finish_status(img, st, progress);
    }
    // The writer appends frames in index order, so one pass over the index visits every
    // segment's frames in file order; the index is never held in memory.
    let mut stored = (0..img.index.len())
        .map(|i| crate::chain::entry(img, i))
        .filter(|r| r.as_ref().map_or(true, |e| e.kind.codec().is_some()))
        .peekable();
    for seg in &img.manifest.segments {
        if let Err(e) = check_segment(img, seg.number, &mut stored, &mut st, progress) {
            st.errors.push(format!("{e:#}"));
            // Skip what the failed segment's frames left unread.
            while stored
                .next_if(|r| r.as_ref().is_ok_and(|e| e.segment == seg.number))
                .is_some()
            {}
        }
    }
    if let Some(left) = stored.next() {
        match left {
            Ok(e) => st.errors.push(format!(
                "image {id}: the index is not in write order (a frame in segment {} at source offset {} after later segments)",
                e.segment, e.offset
            )),
            Err(e) => st.errors.push(format!("{e:#}")),
        }
    }
    finish_status(img, st, progress)
}

/// The end of an image's check: errors bounded, bad ranges read, the status decided.
fn finish_status(img: &Image, mut st: ImageStatus, progress: &Progress) -> ImageStatus {
    progress.finish();
    if st.errors.len() > MAX_ERRORS {
        let more = st.errors.len() - MAX_ERRORS;
        st.errors.truncate(MAX_ERRORS);
        st.errors.push(format!("... and {more} more"));
    }
    if let Err(e) = crate::chain::bad_ranges(img) {
        st.errors.push(format!("{e:#}"));
    }
    if !st.errors.is_empty() {
        st.status = "damaged";
    } else if img.manifest.has_bad_ranges() {
        st.status = "intact-with-bad-sectors";
    }
    st
}

/// Whether an image was rewritten by prune (format 2): its segments may be other images' too, its
/// entries need not follow write order, and some are windows of larger frames.
fn shares_segments(img: &Image) -> bool {
    img.rewrite.generation > 0 || img.manifest.segments.iter().any(|s| s.origin.is_some())
}

/// Checks a rewritten image: every segment it references hashes to what its manifest records
/// (read front to back once), and every entry's frame is read where the index says and checked
/// by the one checked reader (header, crc, decoded length, BLAKE3). Frames of a shared segment
/// that this image does not use are other images' to describe, so "every byte belongs to a frame
/// of the index" is not asked here.
fn check_shared(img: &Image, st: &mut ImageStatus, progress: &Progress) {
    let id = img.id();
    for number in 0..img.manifest.segments.len() as u32 {
        let place = match img.segment(number) {
            Ok(p) => p,
            Err(e) => {
                st.errors.push(format!("{e:#}"));
                continue;
            }
        };
        let name = place.name();
        let hashed = File::open(&place.path).and_then(|f| {
            let len = f.metadata()?.len();
            let mut hasher = blake3::Hasher::new();
            std::io::copy(&mut BufReader::with_capacity(4 << 20, f), &mut hasher)?;
            Ok((len, *hasher.finalize().as_bytes()))
        });
        match hashed {
            Err(e) => st
                .errors
                .push(format!("image {id}: {name} is missing: {e}")),
            Ok((len, _)) if len != place.size => st.errors.push(format!(
                "image {id}, {name}: {len} bytes, the manifest says {} (truncated or damaged)",
                place.size
            )),
            Ok((_, h)) if Some(h) != crate::format::parse_hash_hex(&place.blake3) => {
                st.errors.push(format!(
                    "image {id}, {name}: segment hash does not match the manifest"
                ))
            }
            Ok(_) => {}
        }
    }
    let chain = std::slice::from_ref(img);
    let mut reader = crate::reader::ChainReader::new(chain);
    let mut dctx = match zstd::bulk::Decompressor::new() {
        Ok(d) => d,
        Err(e) => {
            st.errors.push(format!("zstd: {e}"));
            return;
        }
    };
    let (mut payload, mut plain) = (Vec::new(), Vec::new());
    for i in 0..img.index.len() {
        let checked = crate::chain::entry(img, i).and_then(|e| {
            let Some(_) = e.kind.codec() else {
                return Ok(0);
            };
            let codec = reader.read_entry_payload(0, &e, &mut payload)?;
            plain.resize(e.length as usize, 0);
            decode_checked(id, &e, codec, &payload, &mut dctx, &mut plain)?;
            Ok(FRAME_HEADER_LEN as u64 + u64::from(e.stored_length))
        });
        match checked {
            Ok(n) => progress.advance(n),
            Err(e) => {
                st.damaged_blocks += 1;
                st.errors.push(format!("{e:#}"));
            }
        }
    }
}

/// Streams one segment front to back: every byte must belong to the header or to a frame the
/// index names, in order, and the whole file must hash to the manifest's value.
fn check_segment(
    img: &Image,
    number: u32,
    stored: &mut std::iter::Peekable<impl Iterator<Item = Result<crate::format::Entry>>>,
    st: &mut ImageStatus,
    progress: &Progress,
) -> Result<()> {
    let id = img.id();
    let name = segment_file_name(number);
    let want = &img.manifest.segments[number as usize];
    let file = File::open(img.segment(number)?.path)
        .map_err(|e| anyhow!("image {id}: {name} is missing: {e}"))?;
    let actual_len = file.metadata()?.len();
    if actual_len != want.size {
        st.errors.push(format!(
            "image {id}, {name}: {actual_len} bytes, the manifest says {} (truncated or damaged)",
            want.size
        ));
    }
    let mut r = BufReader::with_capacity(4 << 20, file);
    let mut hasher = blake3::Hasher::new();
    let mut hb = [0u8; SEGMENT_HEADER_LEN];
    r.read_exact(&mut hb)
        .map_err(|e| anyhow!("image {id}, {name}, offset 0: {e}"))?;
    hasher.update(&hb);
    SegmentHeader::decode(&hb).map_err(|e| image_error(id, &name, Some(0), e))?;
    let mut pos = SEGMENT_HEADER_LEN as u64;
    let mut dctx = zstd::bulk::Decompressor::new()?;
    let mut payload = Vec::new();
    let mut plain = Vec::new();
    while let Some(e) = stored.next_if(|r| r.as_ref().map_or(true, |e| e.segment == number)) {
        let e = e?;
        let e = &e;
        if e.segment_offset != pos {
            return Err(anyhow!(
                "image {id}, {name}, offset {pos}: the index expects the next frame at {}; the segment is damaged",
                e.segment_offset
            ));
        }
        let mut fh = [0u8; FRAME_HEADER_LEN];
        r.read_exact(&mut fh).map_err(|err| {
            anyhow!("image {id}, {name}, offset {pos}: frame header unreadable: {err}")
        })?;
        hasher.update(&fh);
        payload.resize(e.stored_length as usize, 0);
        let ppos = pos + FRAME_HEADER_LEN as u64;
        r.read_exact(&mut payload).map_err(|err| {
            anyhow!("image {id}, {name}, offset {ppos}: payload unreadable (truncated?): {err}")
        })?;
        hasher.update(&payload);
        pos = ppos + u64::from(e.stored_length);
        progress.advance(FRAME_HEADER_LEN as u64 + u64::from(e.stored_length));
        let frame_ok = FrameHeader::decode(&fh)
            .map_err(|err| image_error(id, &name, Some(ppos - FRAME_HEADER_LEN as u64), err))
            .and_then(|h| {
                if Some(h.codec) != e.kind.codec() || h.offset != e.offset || h.length != e.length || h.stored_length != e.stored_length || h.crc != e.crc {
                    Err(anyhow!("image {id}, {name}, offset {}: frame header does not match the index", ppos - 32))
                } else if crc32fast::hash(&payload) != e.crc {
                    Err(anyhow!(
                        "image {id}, {name}, offset {ppos}: block at source offset {} is damaged (crc mismatch)",
                        e.offset
                    ))
                } else {
                    plain.resize(e.length as usize, 0);
                    decode_checked(id, e, h.codec, &payload, &mut dctx, &mut plain)
                }
            });
        if let Err(err) = frame_ok {
            st.damaged_blocks += 1;
            st.errors.push(format!("{err:#}"));
        }
    }
    let mut rest = Vec::new();
    r.read_to_end(&mut rest)?;
    if !rest.is_empty() {
        st.errors.push(format!(
            "image {id}, {name}, offset {pos}: {} bytes not described by the index",
            rest.len()
        ));
    }
    hasher.update(&rest);
    if Some(*hasher.finalize().as_bytes()) != crate::format::parse_hash_hex(&want.blake3) {
        st.errors.push(format!(
            "image {id}, {name}: segment hash does not match the manifest"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::{BackupOptions, MaxBad};
    use std::cell::Cell;
    use std::os::unix::fs::FileExt;

    /// Images in the chain: long enough that a walk of every point's whole chain (what verify did)
    /// loads thousands of images more than once each.
    const CHAIN: usize = 200;

    /// A chain of `CHAIN` images made by real backups of a small file (a full, then compare-scan
    /// incrementals each changing one granule).
    fn chain_repository(dir: &std::path::Path, repo_dir: &std::path::Path) -> Repository {
        let src = dir.join("d.img");
        let granule = 64 << 10;
        std::fs::write(&src, vec![7u8; 8 * granule]).unwrap();
        let opts = BackupOptions {
            source: src.clone(),
            repo: repo_dir.to_path_buf(),
            name: Some("t".into()),
            kind: None,
            level: 1,
            segment_size: 1 << 30,
            block_size: 1 << 20,
            state_dir: dir.join("state"),
            max_bad: MaxBad::Default,
        };
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        for i in 0..CHAIN {
            let g = (i % 8) as u64 * granule as u64;
            f.write_all_at(&[(i % 251) as u8 + 1; 4096], g).unwrap();
            crate::backup::run(&opts, &Progress::hidden()).expect("backup");
        }
        Repository::open(repo_dir).unwrap()
    }

    /// Verify reports each point of the chain restorable and loads each image once: whether a
    /// point is restorable is decided from its parent's point, not by walking its whole chain
    /// again (CHAIN² / 2 = 20,100 loads for this chain).
    #[test]
    fn verify_of_a_long_chain_loads_each_image_once() {
        // The source is read with O_DIRECT, which tmpfs refuses; the repository's many small
        // synced files are quicker on tmpfs.
        let temp = |under: &str| {
            tempfile::Builder::new()
                .prefix("cairn-test-")
                .tempdir_in(under)
                .unwrap_or_else(|e| panic!("precondition missing: a temp dir under {under}: {e}"))
        };
        let (dir, repo_dir) = (temp("/var/tmp"), temp("/dev/shm"));
        let repo = chain_repository(dir.path(), repo_dir.path());
        let loads = Cell::new(0usize);
        let counting = |id: &str| {
            loads.set(loads.get() + 1);
            repo.load_image(id)
        };
        let all = select(&repo, None, None).unwrap();
        assert_eq!(all.len(), CHAIN);
        let report = verify(&repo, &all, &Progress::hidden(), &counting);
        assert!(report.ok, "{report:?}");
        for st in &report.images {
            assert!(st.restorable, "{st:?}");
            assert_eq!(st.unreadable.as_ref().map(|u| u.count), Some(0), "{st:?}");
        }
        assert_eq!(
            loads.get(),
            CHAIN,
            "verify of every point of a {CHAIN}-image chain loads each image once"
        );
        // The newest point alone: its whole chain, each image once.
        loads.set(0);
        let newest = vec![all[CHAIN - 1].clone()];
        let report = verify(&repo, &newest, &Progress::hidden(), &counting);
        assert!(report.ok && report.images[0].restorable, "{report:?}");
        assert_eq!(loads.get(), CHAIN);
    }
}
