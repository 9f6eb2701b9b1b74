//! Verify: read every byte of an image's segments once, checking each frame against the index
//! (header, crc, decoded length, blake3) and each segment against the manifest's hash; then say,
//! per restore point, whether its whole chain is intact.

use crate::format::{
    segment_file_name, FrameHeader, SegmentHeader, FRAME_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use crate::progress::Progress;
use crate::reader::decode_checked;
use crate::repo::{image_error, Image, Repository};
use anyhow::{anyhow, Result};
use serde::Serialize;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};

/// Error messages kept per image; past this many, damage is counted but not listed.
const MAX_ERRORS: usize = 20;

#[derive(Debug, Serialize)]
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
    // A manifest that cannot be read has no known name: it is reported with every selection, as
    // it may belong to the name asked for.
    let selected: Vec<String> = match (name, image) {
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
    };
    // Check each image once, including ancestors the selected ones depend on. Whether a point is
    // restorable is decided by the same chain resolution restore uses (manifests present, parent
    // hashes, block geometry), so verify and restore cannot disagree.
    let mut checked: HashMap<String, bool> = HashMap::new();
    let mut images = Vec::new();
    for id in &selected {
        let mut status = check_image(repo, id, progress);
        checked.insert(id.clone(), intact(status.status));
        status.restorable = intact(status.status);
        if !status.restorable {
            images.push(status);
            continue;
        }
        match crate::chain::resolve(repo, id) {
            Err(e) => {
                status.restorable = false;
                status.errors.push(format!("not restorable: {e:#}"));
            }
            Ok(chain) => {
                for ancestor in chain.iter().rev().skip(1) {
                    let aid = ancestor.id().to_string();
                    let ok = *checked
                        .entry(aid.clone())
                        .or_insert_with(|| intact(check_image(repo, &aid, progress).status));
                    if !ok {
                        status.restorable = false;
                        status
                            .errors
                            .push(format!("depends on damaged image {aid}"));
                        break;
                    }
                }
                if status.restorable {
                    match crate::chain::unreadable_at(&chain) {
                        Ok(u) => status.unreadable = Some(crate::chain::Unreadable::summary(&u)),
                        Err(e) => {
                            status.restorable = false;
                            status.errors.push(format!("{e:#}"));
                        }
                    }
                }
            }
        }
        images.push(status);
    }
    let ok = images.iter().all(|i| intact(i.status) && i.restorable);
    Ok(VerifyReport { ok, images })
}

pub fn intact(status: &str) -> bool {
    status == "ok" || status == "intact-with-bad-sectors"
}

fn check_image(repo: &Repository, id: &str, progress: &Progress) -> ImageStatus {
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
    let img = match repo.load_image(id) {
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
    // The writer appends frames in index order, so one pass over the index visits every
    // segment's frames in file order; the index is never held in memory.
    let mut stored = (0..img.index.len())
        .map(|i| crate::chain::entry(&img, i))
        .filter(|r| r.as_ref().map_or(true, |e| e.kind.codec().is_some()))
        .peekable();
    for seg in &img.manifest.segments {
        if let Err(e) = check_segment(&img, seg.number, &mut stored, &mut st, progress) {
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
    progress.finish();
    if st.errors.len() > MAX_ERRORS {
        let more = st.errors.len() - MAX_ERRORS;
        st.errors.truncate(MAX_ERRORS);
        st.errors.push(format!("... and {more} more"));
    }
    if let Err(e) = crate::chain::bad_ranges(&img) {
        st.errors.push(format!("{e:#}"));
    }
    if !st.errors.is_empty() {
        st.status = "damaged";
    } else if img.manifest.has_bad_ranges() {
        st.status = "intact-with-bad-sectors";
    }
    st
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
    let file = File::open(img.dir.join(&name))
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
