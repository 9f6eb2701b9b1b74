//! `backup` and `restore`: the commands that write an image or a target.

use super::args::{BackupArgs, RestoreArgs};
use super::output::{human_bytes, print_json};
use super::{Ctx, PartialImage};
use crate::backup::{self, BackupOptions, BackupReport};
use crate::format::{self, ImageKind};
use crate::restore::{self, RestoreOptions, RestoreReport};
use anyhow::{bail, Result};
use std::path::Path;

pub(super) fn cmd_backup(a: BackupArgs, ctx: &Ctx) -> Result<()> {
    let opts = backup_options(a, ctx)?;
    let r = backup::run(&opts, &ctx.progress)?;
    if ctx.json {
        print_json(&r);
    } else if !ctx.quiet {
        print_backup(&r);
    }
    if r.bad_bytes > 0 {
        return Err(partial_image(&r, &opts.repo));
    }
    Ok(())
}

/// The library's options from the flags; sizes the format cannot hold are refused here, before
/// anything is opened.
fn backup_options(a: BackupArgs, ctx: &Ctx) -> Result<BackupOptions> {
    let bs = a.block_size;
    if !bs.is_power_of_two()
        || !(u64::from(format::MIN_BLOCK_SIZE)..=u64::from(format::MAX_BLOCK_SIZE)).contains(&bs)
    {
        bail!("--block-size must be a power of two from 64K to 16M");
    }
    if a.segment_size < bs + 4096 {
        bail!("--segment-size must be larger than the block size");
    }
    Ok(BackupOptions {
        kind: requested_kind(&a),
        source: a.source,
        repo: a.repo,
        name: a.name,
        level: a.level,
        segment_size: a.segment_size,
        block_size: bs as u32,
        state_dir: ctx.tracker_state_dir(),
        max_bad: a.max_bad.unwrap_or(backup::MaxBad::Default),
    })
}

/// `--full`, `--incremental` or `--differential` (clap allows one); none lets backup choose.
fn requested_kind(a: &BackupArgs) -> Option<ImageKind> {
    if a.full {
        Some(ImageKind::Full)
    } else if a.incremental {
        Some(ImageKind::Incremental)
    } else if a.differential {
        Some(ImageKind::Differential)
    } else {
        None
    }
}

fn print_backup(r: &BackupReport) {
    if let Some(n) = &r.note {
        eprintln!("note: {n}");
    }
    let how = match (&r.parent, &r.method_reason) {
        (None, _) => String::new(),
        (Some(p), None) => format!(" after {p}, {}", r.method),
        (Some(p), Some(why)) => format!(" after {p}, {} because {why}", r.method),
    };
    eprintln!(
        "{} image {}{how} of {} ({}): {} read, {} data, {} stored, {} of {} blocks zero, {:.1} s ({:.0} MB/s)",
        r.kind,
        r.id,
        r.source,
        r.name,
        human_bytes(r.bytes_read),
        human_bytes(r.data_bytes),
        human_bytes(r.bytes_stored),
        r.blocks_zero,
        r.blocks_total,
        r.duration_ms as f64 / 1000.0,
        r.read_throughput_mb_s
    );
}

/// The error (exit status 3) of a backup that kept its image although sectors were unreadable.
fn partial_image(r: &BackupReport, repo: &Path) -> anyhow::Error {
    anyhow::Error::new(PartialImage(format!(
        "image {} is complete but {} bytes in {} ranges were unreadable ({}); `cairn badmap {} --image {}` lists them",
        r.id,
        r.bad_bytes,
        r.bad_ranges.len(),
        if r.kind == "full" {
            "zeros in the image"
        } else {
            "the parent chain's data stands there, flagged"
        },
        repo.display(),
        r.id
    )))
}

pub(super) fn cmd_restore(a: RestoreArgs, ctx: &Ctx) -> Result<()> {
    let opts = RestoreOptions {
        repo: a.repo,
        target: a.target,
        name: a.select.name,
        image: a.select.image,
        yes: a.yes,
        partition: a.partition,
        grow_last_partition: a.grow_last_partition,
        verify: a.verify,
    };
    let r = restore::run(&opts, &ctx.progress)?;
    if ctx.json {
        print_json(&r);
    } else if !ctx.quiet {
        print_restore(&r);
    }
    Ok(())
}

fn print_restore(r: &RestoreReport) {
    let what = match r.partition {
        Some(n) => format!("partition {n} of image {}", r.id),
        None => format!("image {}", r.id),
    };
    eprintln!(
        "restored {what} ({}) onto {}: {} written, {} zeroed, {:.1} s; every block verified{}",
        r.name,
        r.target,
        human_bytes(r.bytes_written),
        human_bytes(r.bytes_zeroed),
        r.duration_ms as f64 / 1000.0,
        if r.verified {
            ", and read back from the target"
        } else {
            ""
        }
    );
    if let Some((from, to)) = r.partition_table.as_ref().and_then(|c| c.backup_header_lba) {
        eprintln!("GPT backup header moved from LBA {from} to LBA {to} (the drive's end)");
    }
    for h in &r.hints {
        eprintln!("hint: {h}");
    }
}
