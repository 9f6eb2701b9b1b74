//! Writes synthetic images into a repository through cairn's own repository writer, for the scale
//! section of tools/bench: measuring what a command costs on a 16 TiB disk or in a repository of
//! 10,000 images without reading 16 TiB or running 10,000 backups.
//!
//! ```text
//! synth_image REPO huge SIZE         one full image of a SIZE-byte source whose every 1 MiB block
//!                                    has an index entry (kind zero: nothing is stored, so a
//!                                    restore writes nothing and verify reads only the index)
//! synth_image REPO many COUNT        COUNT full images of a 64 KiB source, one stored frame each
//! synth_image REPO chain COUNT       one chain of COUNT images of a 64 KiB source: a full, then
//!                                    COUNT - 1 compare-scan incrementals, each the child of the
//!                                    one before, one stored frame each
//! ```

use anyhow::{bail, Context, Result};
use cairn::format::frame::Codec;
use cairn::format::manifest::{IndexRef, ParentRef, Stats};
use cairn::format::{
    self, Entry, EntryKind, FrameHeader, ImageKind, Manifest, Method, SourceIdentity,
};
use cairn::repo::Repository;
use std::path::Path;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(2).map(String::as_str) {
        Some("huge") if args.len() == 4 => huge(Path::new(&args[1]), parse(&args[3])?),
        Some("many") if args.len() == 4 => many(Path::new(&args[1]), parse(&args[3])?),
        Some("chain") if args.len() == 4 => chain(Path::new(&args[1]), parse(&args[3])?),
        _ => bail!(
            "usage: synth_image REPO huge SIZE | synth_image REPO many COUNT | synth_image REPO chain COUNT"
        ),
    }
}

fn parse(s: &str) -> Result<u64> {
    cairn::cli::parse_size(s).map_err(anyhow::Error::msg)
}

/// Where an image stands in its chain: a full image, or an incremental on `parent` (its id and
/// manifest hash) whose chain starts at the full `base`.
enum Lineage<'a> {
    Full,
    Incremental {
        parent: &'a (String, format::Hash),
        base: &'a str,
    },
}

/// One image: `entries` are (offset, length, optional stored plaintext), ascending.
/// `sequence`: the image's place, or None to take the next one as a backup does (which reads
/// every manifest: writing thousands of images that way would be quadratic).
/// Returns the image's id and manifest hash.
#[allow(clippy::too_many_arguments)]
fn write_image(
    repo: &Repository,
    lineage: Lineage,
    sequence: Option<u64>,
    created_unix: u64,
    name: &str,
    size: u64,
    block_size: u32,
    entries: impl Iterator<Item = (u64, u32, Option<Vec<u8>>)>,
) -> Result<(String, format::Hash)> {
    let lock = repo.lock()?;
    let id = repo.new_image_id(created_unix, &lock);
    let mut writer = repo.begin_image(&id, 2 << 30, &lock)?;
    let mut stats = Stats::default();
    let mut zero_hash = (0u32, [0u8; 32]);
    for (offset, length, data) in entries {
        stats.blocks_total += 1;
        let entry = match data {
            None => {
                stats.blocks_zero += 1;
                if zero_hash.0 != length {
                    zero_hash = (
                        length,
                        *blake3::hash(&vec![0u8; length as usize]).as_bytes(),
                    );
                }
                Entry {
                    offset,
                    length,
                    kind: EntryKind::Zero,
                    segment: 0,
                    stored_length: 0,
                    segment_offset: 0,
                    crc: 0,
                    hash: zero_hash.1,
                }
            }
            Some(plain) => {
                stats.blocks_stored += 1;
                stats.data_bytes += u64::from(length);
                let payload = zstd::bulk::compress(&plain, 1)?;
                let crc = crc32fast::hash(&payload);
                let header = FrameHeader {
                    codec: Codec::Zstd,
                    offset,
                    length,
                    stored_length: payload.len() as u32,
                    crc,
                };
                let (segment, segment_offset) = writer.append(&header, &payload)?;
                Entry {
                    offset,
                    length,
                    kind: EntryKind::Zstd,
                    segment,
                    stored_length: payload.len() as u32,
                    segment_offset,
                    crc,
                    hash: *blake3::hash(&plain).as_bytes(),
                }
            }
        };
        writer.push_entry(&entry)?;
    }
    stats.bytes_read = size;
    let segments = writer.finish_segments()?;
    let index = writer.finish_index()?;
    stats.stored_bytes = segments.iter().map(|s| s.size).sum::<u64>() + index.size;
    let (kind, method, parent, base_full) = match lineage {
        Lineage::Full => (ImageKind::Full, Method::Full, None, None),
        Lineage::Incremental { parent, base } => (
            ImageKind::Incremental,
            Method::CompareScan,
            Some(ParentRef {
                id: parent.0.clone(),
                manifest_blake3: format::hash_hex(&parent.1),
            }),
            Some(base.to_string()),
        ),
    };
    let manifest = Manifest {
        format_version: format::FORMAT_VERSION,
        id: id.clone(),
        name: name.into(),
        kind,
        parent,
        base_full,
        created_unix,
        created: humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(created_unix),
        )
        .to_string(),
        tool_version: "synth_image".into(),
        method,
        source: SourceIdentity {
            path: format!("/synthetic/{name}"),
            kind: "file".into(),
            size,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            ..Default::default()
        },
        block_size,
        granule: format::GRANULE,
        codec: "zstd".into(),
        level: 1,
        index: IndexRef {
            entries: index.entries,
            size: index.size,
            blake3: format::hash_hex(&index.blake3),
        },
        segments,
        stats,
        bad_ranges: Vec::new(),
        bad_ranges_file: None,
        tracking: None,
        partition_table: None,
        sequence: Some(match sequence {
            Some(s) => s,
            None => repo.reserve_sequence(&repo.catalogue()?, &lock)?,
        }),
    };
    manifest.validate().context("synthetic manifest")?;
    let (bytes, hash) = manifest.encode();
    writer.commit(&bytes)?;
    Ok((id, hash))
}

fn huge(root: &Path, size: u64) -> Result<()> {
    let repo = Repository::open_or_create(root)?;
    let bs = format::DEFAULT_BLOCK_SIZE;
    let blocks = size.div_ceil(u64::from(bs));
    let entries = (0..blocks).map(move |b| {
        let offset = b * u64::from(bs);
        (offset, (size - offset).min(u64::from(bs)) as u32, None)
    });
    let (id, _) = write_image(
        &repo,
        Lineage::Full,
        None,
        1_700_000_000,
        "huge",
        size,
        bs,
        entries,
    )?;
    println!("{id} {blocks}");
    Ok(())
}

fn many(root: &Path, count: u64) -> Result<()> {
    let repo = Repository::open_or_create(root)?;
    let size = 64 << 10;
    for i in 0..count {
        let plain: Vec<u8> = (0..size as usize)
            .map(|j| (j as u64 ^ i).wrapping_mul(31) as u8 | 1)
            .collect();
        let entries = std::iter::once((0u64, size as u32, Some(plain)));
        write_image(
            &repo,
            Lineage::Full,
            Some(i + 1),
            1_700_000_000 + i,
            "many",
            size,
            64 << 10,
            entries,
        )?;
    }
    // The counter file, as the last backup would have left it.
    let lock = repo.lock()?;
    repo.reserve_sequence(&repo.catalogue()?, &lock)?;
    println!("{count}");
    Ok(())
}

fn chain(root: &Path, count: u64) -> Result<()> {
    let repo = Repository::open_or_create(root)?;
    let size = 64 << 10;
    let mut parent: Option<(String, format::Hash)> = None;
    let mut base = String::new();
    for i in 0..count {
        let plain: Vec<u8> = (0..size as usize)
            .map(|j| (j as u64 ^ i).wrapping_mul(29) as u8 | 1)
            .collect();
        let lineage = match &parent {
            None => Lineage::Full,
            Some(p) => Lineage::Incremental {
                parent: p,
                base: &base,
            },
        };
        let written = write_image(
            &repo,
            lineage,
            Some(i + 1),
            1_700_000_000 + i,
            "chain",
            size,
            64 << 10,
            std::iter::once((0u64, size as u32, Some(plain))),
        )?;
        if parent.is_none() {
            base = written.0.clone();
        }
        parent = Some(written);
    }
    let lock = repo.lock()?;
    repo.reserve_sequence(&repo.catalogue()?, &lock)?;
    println!("{count}");
    Ok(())
}
