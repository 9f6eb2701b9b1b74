//! The one checked reader of stored blocks: restore, `restore --verify`, the pre-restore check,
//! a compare-scan's base and the partition-table reader all get a block's bytes from here.
//!
//! Reading is split in two so a pipeline can do the I/O on one thread and the CPU work on others:
//! [`ChainReader::payloads`] reads a block's stored payloads and checks each frame header and crc
//! against the index; [`assemble`] decompresses them and checks each plaintext's BLAKE3 before a
//! byte of it is used. [`BlockDecoder`] does both for callers that want plain bytes.
//!
//! Segment files stay open through a small cache shared by the whole chain, so a chain of
//! thousands of images needs a bounded number of descriptors.
//!
//! Errors that mean the repository's bytes are wrong (a crc or hash mismatch, a frame header
//! that disagrees with the index, a missing or truncated segment) carry [`Damage`], so a caller
//! can tell them from a failure to read at all (EMFILE, EIO on the repository's disk).

use crate::chain::{Piece, Source};
use crate::format::frame::Codec;
use crate::format::{
    segment_file_name, Entry, FrameHeader, SegmentHeader, FRAME_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use crate::repo::{image_error, Image};
use anyhow::{anyhow, Context, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Segment files open at once per reader. Restore runs one reader, a compare-scan one per
/// block-stage worker: far below the usual 1024-descriptor limit whatever the chain's length.
const MAX_OPEN_SEGMENTS: usize = 32;

/// Marks an error as damage to the repository's stored bytes (as opposed to a failed read).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Damage(pub String);

/// True when `e` (or its cause) is damage to the stored bytes.
pub fn is_damage(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Damage>())
}

fn damage(msg: String) -> anyhow::Error {
    anyhow::Error::new(Damage(msg))
}

/// A failed read of a repository file: missing or short files are damage, anything else (no
/// descriptors left, an I/O error of the disk holding the repository) is a plain error.
fn read_failure(err: std::io::Error, what: String) -> anyhow::Error {
    match err.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::UnexpectedEof => {
            damage(format!("{what}: {err}"))
        }
        _ => anyhow::Error::new(err).context(what),
    }
}

/// One entry's stored payload, crc-checked: the chain position and entry number it belongs to.
/// Entries that read the same stored frame (windows of one frame, format 2) share its bytes.
pub struct Payload {
    pub ci: usize,
    pub ei: usize,
    pub entry: Entry,
    pub codec: Codec,
    pub bytes: std::sync::Arc<Vec<u8>>,
}

impl Payload {
    /// The stored frame this payload is read from: entries with the same key decode to the same
    /// plaintext frame.
    fn frame(&self) -> (usize, u32, u64) {
        (self.ci, self.entry.segment, self.entry.segment_offset)
    }
}

struct OpenSegment {
    ci: usize,
    number: u32,
    file: File,
    last_use: u64,
}

/// Reads the stored payloads of a chain's entries, checking each frame against the index.
pub struct ChainReader<'a> {
    chain: &'a [Image],
    open: Vec<OpenSegment>,
    tick: u64,
}

impl<'a> ChainReader<'a> {
    pub fn new(chain: &'a [Image]) -> Self {
        ChainReader {
            chain,
            open: Vec::new(),
            tick: 0,
        }
    }

    pub fn chain(&self) -> &'a [Image] {
        self.chain
    }

    /// The open segment file, its header checked; the least recently used one is closed when
    /// the cache is full.
    fn segment(&mut self, ci: usize, number: u32) -> Result<&File> {
        self.tick += 1;
        if let Some(i) = self
            .open
            .iter()
            .position(|s| s.ci == ci && s.number == number)
        {
            self.open[i].last_use = self.tick;
            return Ok(&self.open[i].file);
        }
        let img = &self.chain[ci];
        let id = img.id();
        // Format 2: the segment may have been written by another image (docs/format.md,
        // "Shared segments"); its header names that image and number.
        let place = img.segment(number)?;
        let name = place.name();
        let file = File::open(&place.path)
            .map_err(|e| read_failure(e, format!("image {id}: cannot open {name}")))?;
        let mut h = [0u8; SEGMENT_HEADER_LEN];
        file.read_exact_at(&mut h, 0).map_err(|e| {
            read_failure(
                e,
                format!("image {id}, {name}, offset 0: cannot read segment header"),
            )
        })?;
        let sh = SegmentHeader::decode(&h)
            .map_err(|e| damage(format!("{:#}", image_error(id, &name, Some(0), e))))?;
        if sh.number != place.origin.number
            || sh.image_tag != crate::format::frame::image_tag(&place.origin.image)
        {
            return Err(damage(format!(
                "image {id}, {name}: segment belongs to another image or position"
            )));
        }
        if self.open.len() >= MAX_OPEN_SEGMENTS {
            let oldest = (0..self.open.len())
                .min_by_key(|&i| self.open[i].last_use)
                .expect("cache is full, so not empty");
            self.open.swap_remove(oldest);
        }
        self.open.push(OpenSegment {
            ci,
            number,
            file,
            last_use: self.tick,
        });
        Ok(&self.open.last().expect("just pushed").file)
    }

    /// Reads the stored payload of entry `ei` of chain image `ci` into `out`, checking the frame
    /// header against the entry and the payload's crc. Returns the codec.
    pub fn read_payload(&mut self, ci: usize, ei: usize, out: &mut Vec<u8>) -> Result<Codec> {
        let e = crate::chain::entry(&self.chain[ci], ei as u64)?;
        self.read_entry_payload(ci, &e, out)
    }

    /// As [`Self::read_payload`], for an entry already looked up in image `ci`'s index.
    pub fn read_entry_payload(&mut self, ci: usize, e: &Entry, out: &mut Vec<u8>) -> Result<Codec> {
        let chain = self.chain;
        let id = chain[ci].id();
        let name = segment_file_name(e.segment);
        let at = e.segment_offset;
        let codec = e
            .kind
            .codec()
            .ok_or_else(|| anyhow!("image {id}: zero extents have no payload"))?;
        let f = self.segment(ci, e.segment)?;
        let mut hb = [0u8; FRAME_HEADER_LEN];
        f.read_exact_at(&mut hb, at).map_err(|err| {
            read_failure(
                err,
                format!("image {id}, {name}, offset {at}: cannot read frame header"),
            )
        })?;
        let h = FrameHeader::decode(&hb)
            .map_err(|err| damage(format!("{:#}", image_error(id, &name, Some(at), err))))?;
        // A window (format 2) reads the whole frame it lies in.
        let (frame_offset, frame_length) = e.frame_span();
        if h.codec != codec
            || h.offset != frame_offset
            || h.length != frame_length
            || h.stored_length != e.stored_length
            || h.crc != e.crc
        {
            return Err(damage(format!(
                "image {id}, {name}, offset {at}: frame header does not match the index (block at source offset {})",
                e.offset
            )));
        }
        out.clear();
        out.resize(e.stored_length as usize, 0);
        let pat = at + FRAME_HEADER_LEN as u64;
        f.read_exact_at(out, pat).map_err(|err| {
            read_failure(
                err,
                format!(
                    "image {id}, {name}, offset {pat}: cannot read {} payload bytes",
                    e.stored_length
                ),
            )
        })?;
        if crc32fast::hash(out) != e.crc {
            return Err(damage(format!(
                "image {id}, {name}, offset {pat}: block at source offset {} is damaged (crc mismatch)",
                e.offset
            )));
        }
        Ok(codec)
    }

    /// Reads and crc-checks the payloads a block's pieces need, each entry once and each stored
    /// frame once: after a merge, one block's pieces may be hundreds of windows of one frame.
    pub fn payloads(&mut self, pieces: &[Piece]) -> Result<Vec<Payload>> {
        let mut out: Vec<Payload> = Vec::new();
        for p in pieces {
            if let Source::Entry(ci, ei) = p.source {
                if out.iter().any(|x| (x.ci, x.ei) == (ci, ei)) {
                    continue;
                }
                let entry = crate::chain::entry(&self.chain[ci], ei as u64)?;
                let key = (ci, entry.segment, entry.segment_offset);
                let (codec, bytes) = match out.iter().find(|x| x.frame() == key) {
                    Some(same) => (same.codec, std::sync::Arc::clone(&same.bytes)),
                    None => {
                        let mut bytes = Vec::new();
                        let codec = self.read_entry_payload(ci, &entry, &mut bytes)?;
                        (codec, std::sync::Arc::new(bytes))
                    }
                };
                out.push(Payload {
                    ci,
                    ei,
                    entry,
                    codec,
                    bytes,
                });
            }
        }
        Ok(out)
    }
}

/// Decodes a crc-checked payload and checks the plaintext's BLAKE3 against the entry; `out`
/// gets the entry's extent (for a window, its part of the frame).
pub fn decode_checked(
    image_id: &str,
    e: &Entry,
    codec: Codec,
    payload: &[u8],
    dctx: &mut zstd::bulk::Decompressor<'_>,
    out: &mut [u8],
) -> Result<()> {
    if let crate::format::EntryKind::Window(w) = e.kind {
        // The hash is the whole frame's: decode and check all of it, then take the window.
        let mut frame = vec![0u8; w.frame_length as usize];
        decode_frame_checked(image_id, e, codec, payload, dctx, &mut frame)?;
        let skip = w.skip as usize;
        out.copy_from_slice(&frame[skip..skip + out.len()]);
        return Ok(());
    }
    decode_frame_checked(image_id, e, codec, payload, dctx, out)
}

/// Decodes the whole stored frame an entry reads (`frame_out` is its plaintext length:
/// `Entry::frame_span`) and checks its BLAKE3 against the entry.
fn decode_frame_checked(
    image_id: &str,
    e: &Entry,
    codec: Codec,
    payload: &[u8],
    dctx: &mut zstd::bulk::Decompressor<'_>,
    frame_out: &mut [u8],
) -> Result<()> {
    let name = segment_file_name(e.segment);
    let at = e.segment_offset + FRAME_HEADER_LEN as u64;
    crate::format::frame::decode_payload(codec, payload, frame_out, dctx)
        .map_err(|err| damage(format!("{:#}", image_error(image_id, &name, Some(at), err))))?;
    if blake3::hash(frame_out).as_bytes() != &e.hash {
        return Err(damage(format!(
            "image {image_id}, {name}, offset {at}: block at source offset {} is damaged (hash mismatch)",
            e.offset
        )));
    }
    Ok(())
}

/// Builds the plaintext of the pieces starting at `offset` (one block, or part of one) from their
/// checked payloads into `block`. An entry that spans the whole of `block` (every block of a full
/// image) is decoded straight into it; every other stored frame is decoded and checked once into
/// `scratch` (however many window entries read it) and only the pieces are copied over.
pub fn assemble(
    chain: &[Image],
    offset: u64,
    pieces: &[Piece],
    payloads: &[Payload],
    block: &mut [u8],
    dctx: &mut zstd::bulk::Decompressor<'_>,
    scratch: &mut Vec<u8>,
) -> Result<()> {
    let base = payloads.iter().position(|p| {
        let e = &p.entry;
        e.offset == offset && e.length as usize == block.len()
    });
    if let Some(b) = base {
        let p = &payloads[b];
        decode_checked(chain[p.ci].id(), &p.entry, p.codec, &p.bytes, dctx, block)?;
    }
    // Grouped by frame, so each frame is decoded once.
    let mut order: Vec<usize> = (0..payloads.len()).filter(|&i| Some(i) != base).collect();
    order.sort_by_key(|&i| payloads[i].frame());
    // What `scratch` holds: the frame and the hash it was checked against (an entry that claims
    // another hash for the same frame is decoded and checked again, and fails).
    let mut decoded: Option<((usize, u32, u64), crate::format::Hash)> = None;
    for i in order {
        let p = &payloads[i];
        let e = &p.entry;
        let (frame_offset, frame_length) = e.frame_span();
        if decoded != Some((p.frame(), e.hash)) {
            scratch.resize(frame_length as usize, 0);
            decode_frame_checked(chain[p.ci].id(), e, p.codec, &p.bytes, dctx, scratch)?;
            decoded = Some((p.frame(), e.hash));
        }
        for piece in pieces
            .iter()
            .filter(|x| x.source == Source::Entry(p.ci, p.ei))
        {
            let rel = (piece.offset - offset) as usize;
            let from = (piece.offset - frame_offset) as usize;
            block[rel..rel + piece.len as usize]
                .copy_from_slice(&scratch[from..from + piece.len as usize]);
        }
    }
    for piece in pieces.iter().filter(|x| x.source == Source::Zero) {
        let rel = (piece.offset - offset) as usize;
        block[rel..rel + piece.len as usize].fill(0);
    }
    Ok(())
}

/// Checked plaintext on demand: a block's pieces, or one whole entry (the last one decoded is
/// kept, since a compare-scan asks for the same entry granule after granule).
pub struct BlockDecoder<'a> {
    reader: ChainReader<'a>,
    dctx: zstd::bulk::Decompressor<'static>,
    payload: Vec<u8>,
    scratch: Vec<u8>,
    entry: Vec<u8>,
    entry_is: Option<(usize, usize)>,
}

impl<'a> BlockDecoder<'a> {
    pub fn new(chain: &'a [Image]) -> Result<Self> {
        Ok(BlockDecoder {
            reader: ChainReader::new(chain),
            dctx: zstd::bulk::Decompressor::new().context("zstd init")?,
            payload: Vec::new(),
            scratch: Vec::new(),
            entry: Vec::new(),
            entry_is: None,
        })
    }

    pub fn chain(&self) -> &'a [Image] {
        self.reader.chain()
    }

    /// The plaintext of `pieces` (contiguous, ascending).
    pub fn decode(&mut self, pieces: &[Piece]) -> Result<Vec<u8>> {
        let Some(first) = pieces.first() else {
            return Ok(Vec::new());
        };
        let payloads = self.reader.payloads(pieces)?;
        let mut block = vec![0u8; pieces.iter().map(|p| p.len as usize).sum()];
        assemble(
            self.reader.chain(),
            first.offset,
            pieces,
            &payloads,
            &mut block,
            &mut self.dctx,
            &mut self.scratch,
        )?;
        Ok(block)
    }

    /// The whole checked plaintext of entry `ei` of chain image `ci`.
    pub fn entry(&mut self, ci: usize, ei: usize) -> Result<&[u8]> {
        if self.entry_is != Some((ci, ei)) {
            self.entry_is = None;
            let chain = self.reader.chain();
            let e = crate::chain::entry(&chain[ci], ei as u64)?;
            let codec = self.reader.read_entry_payload(ci, &e, &mut self.payload)?;
            self.entry.resize(e.length as usize, 0);
            decode_checked(
                chain[ci].id(),
                &e,
                codec,
                &self.payload,
                &mut self.dctx,
                &mut self.entry,
            )?;
            self.entry_is = Some((ci, ei));
        }
        Ok(&self.entry)
    }
}
