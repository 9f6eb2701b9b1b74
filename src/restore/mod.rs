//! Restore: plan (which image supplies each block) → read and check payloads → decode and verify
//! → write in ascending order. Nothing is written before every safety check has passed, and no
//! block is written before its crc and hash have been checked.

mod pipeline;
mod readback;
mod table;
mod target;

use crate::chain::{self, Piece};
use crate::progress::Progress;
use crate::ptable::PartitionTable;
use crate::repo::{Image, Repository};
use anyhow::{bail, Context, Result};
use readback::verify_target;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;
use target::{prepare_target, probe_target};

pub struct RestoreOptions {
    pub repo: PathBuf,
    pub target: PathBuf,
    pub name: Option<String>,
    pub image: Option<String>,
    pub yes: bool,
    /// Restore only this partition of a whole-disk image (its byte range, at offset 0 of the target).
    pub partition: Option<u32>,
    /// Extend the last partition to the end of a larger drive.
    pub grow_last_partition: bool,
    /// Read the target back (O_DIRECT) after the restore and compare it with the image's hashes.
    pub verify: bool,
}

#[derive(Debug, Serialize)]
pub struct RestoreReport {
    pub id: String,
    pub name: String,
    pub chain: Vec<String>,
    pub target: String,
    pub source_size: u64,
    /// Size of the target device (the restored size for a file).
    pub target_size: u64,
    /// `--partition N`.
    pub partition: Option<u32>,
    /// Image bytes [start, end) written, at target offset 0 for a partition.
    pub range: [u64; 2],
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    /// True when the target was read back and matched the image (`--verify`).
    pub verified: bool,
    /// What was changed in the partition table to fit the target, if anything.
    pub partition_table: Option<crate::ptable::TableChange>,
    /// What to do next (grow the filesystem of a grown partition).
    pub hints: Vec<String>,
    pub duration_ms: u64,
    pub io: String,
}

/// Picks the image a command works on (`Repository::select_image`).
pub fn select_image(repo: &Repository, name: Option<&str>, image: Option<&str>) -> Result<String> {
    repo.select_image(name, image)
}

pub fn run(opts: &RestoreOptions, progress: &Progress) -> Result<RestoreReport> {
    let started = Instant::now();
    // Held to the end: nothing the restore reads may be removed (a prune) while it runs.
    let _lock = Repository::open(&opts.repo)?.lock_shared()?;
    let (id, chain) = open_restore_point(opts)?;
    let m = &chain.last().expect("non-empty chain").manifest;
    let image_size = m.source.size;
    let tinfo = probe_target(&opts.target)?;
    let table = table::read_table(&chain, &id, m, opts)?;
    let (start, end, needed) = target::range_to_write(opts, &id, m, table.as_ref())?;
    let restore = Restore {
        opts,
        id,
        image_size,
        whole: opts.partition.is_none(),
        table,
        chain,
    };
    let id = &restore.id;
    if opts.grow_last_partition && restore.table.is_none() {
        bail!("--grow-last-partition: image {id} has no partition table");
    }

    // Size and sector checks, before anything is written.
    let target_size = match &tinfo {
        Some(info) if info.is_block() => info.size,
        _ => needed,
    };
    let end = target::check_size(&restore, tinfo.as_ref(), end, needed)?;
    target::check_table_fits(&restore, target_size)?;
    let target = prepare_target(&opts.target, &opts.repo, tinfo.as_ref(), opts.yes)?;
    // Every stored block this restore uses is read and checked before the first write.
    chain::precheck(&restore.chain, (start, end), progress)
        .with_context(|| format!("image {id} cannot be restored; nothing was written"))?;

    let range = Range { start, end };
    let written = pipeline::write_target(&restore, range, needed, &target, progress)?;
    let verified = opts.verify && read_back(&restore, range, progress)?;
    let (table_change, hints) =
        table::fit_to_target(&restore, &target, target_size, verified, written.tail_file)?;
    Ok(RestoreReport {
        id: restore.id.clone(),
        name: restore.manifest().name.clone(),
        chain: restore.chain.iter().map(|i| i.id().to_string()).collect(),
        target: opts.target.display().to_string(),
        source_size: image_size,
        target_size,
        partition: opts.partition,
        range: [start, end],
        bytes_written: written.bytes_written,
        bytes_zeroed: written.bytes_zeroed,
        verified,
        partition_table: table_change,
        hints,
        duration_ms: started.elapsed().as_millis() as u64,
        io: written.io,
    })
}

/// One restore, as its checks and steps see it.
struct Restore<'a> {
    opts: &'a RestoreOptions,
    id: String,
    /// The restore point, oldest image first.
    chain: Vec<Image>,
    image_size: u64,
    /// The partition table as the image holds it (authoritative for this restore point).
    table: Option<PartitionTable>,
    /// A whole-image restore (not `--partition`).
    whole: bool,
}

impl Restore<'_> {
    /// The manifest of the restore point's image.
    fn manifest(&self) -> &crate::format::Manifest {
        &self.chain.last().expect("non-empty chain").manifest
    }
}

/// The image asked for and its restore point, checked complete.
fn open_restore_point(opts: &RestoreOptions) -> Result<(String, Vec<Image>)> {
    let repo = Repository::open(&opts.repo)?;
    let id = select_image(&repo, opts.name.as_deref(), opts.image.as_deref())?;
    let chain =
        chain::resolve(&repo, &id).with_context(|| format!("image {id} cannot be restored"))?;
    for img in &chain {
        img.check_segments_present()
            .with_context(|| format!("image {id} cannot be restored"))?;
    }
    let unreadable =
        chain::unreadable_at(&chain).with_context(|| format!("image {id} cannot be restored"))?;
    if !unreadable.is_empty() {
        let bytes: u64 = unreadable.iter().map(|r| r.1).sum();
        tracing::warn!(
            "restore point {id} was taken from a failing source: {bytes} bytes in {} ranges could not be read (zeros, or an older image's data where its chain has one; `cairn badmap --image {id}` lists them)",
            unreadable.len()
        );
    }
    Ok((id, chain))
}

/// `--verify`: true once the target matched the image.
fn read_back(restore: &Restore, range: Range, progress: &Progress) -> Result<bool> {
    let tpath = &restore.opts.target;
    verify_target(&restore.chain, range, tpath, progress).with_context(|| {
        format!(
            "verification of {} after the restore failed",
            tpath.display()
        )
    })?;
    Ok(true)
}

/// The byte range of the image a restore writes; it lands at target offset `offset - start`.
#[derive(Debug, Clone, Copy)]
struct Range {
    start: u64,
    end: u64,
}

impl Range {
    /// The part of a block's pieces inside the range.
    fn clip(&self, pieces: &[Piece]) -> Vec<Piece> {
        pieces
            .iter()
            .filter_map(|p| {
                let s = p.offset.max(self.start);
                let e = (p.offset + p.len).min(self.end);
                (s < e).then(|| Piece {
                    offset: s,
                    len: e - s,
                    source: p.source,
                })
            })
            .collect()
    }

    /// The restore point's blocks that overlap the range, in order, as (the block's pieces, the
    /// part of them inside the range). The walk starts at the range's first block, so a
    /// one-partition restore plans nothing before its partition.
    fn blocks<'a>(
        self,
        chain: &'a [Image],
    ) -> impl Iterator<Item = Result<(Vec<Piece>, Vec<Piece>)>> + 'a {
        let bs = u64::from(chain.last().expect("non-empty chain").manifest.block_size);
        let mut planner = chain::Planner::new(chain);
        let mut failed = planner.seek(self.start / bs).err();
        let mut done = false;
        std::iter::from_fn(move || loop {
            if done {
                return None;
            }
            if let Some(e) = failed.take() {
                done = true;
                return Some(Err(e));
            }
            let pieces = match planner.next()? {
                Ok(p) => p,
                Err(e) => {
                    done = true;
                    return Some(Err(e));
                }
            };
            if pieces[0].offset >= self.end {
                done = true;
                return None;
            }
            let inside = self.clip(&pieces);
            if !inside.is_empty() {
                return Some(Ok((pieces, inside)));
            }
        })
    }
}
