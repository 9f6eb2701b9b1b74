//! The command line: parse, set up logging, call one module, print the result. Nothing else.

use crate::backup::{self, BackupOptions};
use crate::format::{self, ImageKind};
use crate::progress::{human_bytes, short_bytes, Progress};
use crate::repo::Repository;
use crate::restore::{self, RestoreOptions};
use crate::{list, verify};
use anyhow::{bail, Result};
use clap::{ArgAction, Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "cairn",
    version,
    about = "Sector-level disk imager: full images of disks and partitions, verified restores",
    long_about = "cairn images whole disks and partitions block by block into a repository directory of \
compressed, checksummed images, and restores them byte for byte onto the same or a replacement drive.\n\n\
Examples:\n  cairn backup /dev/sda /mnt/usb/backups          image a whole disk\n  \
cairn list /mnt/usb/backups                     show the images\n  \
cairn verify /mnt/usb/backups                   check every stored block\n  \
cairn restore /mnt/usb/backups /dev/sdb         write the newest image onto /dev/sdb\n\n\
The first backup of a disk is full; later ones are incremental (--differential: since the full).\n\
Run `cairn tracker run /dev/sda` (at boot: tools/cairn-tracker.service) so they read only what\n\
changed; without it they compare-scan (read everything, store what differs).",
    after_help = "Exit status: 0 success, 1 error (one line on stderr says what and what to do), 2 usage error, \
3 backup complete but some source sectors were unreadable (a full image holds zeros there, an incremental \
or differential its parent's data; `cairn badmap` lists them)."
)]
pub struct Cli {
    /// More log output (-v info, -vv debug).
    #[arg(short, long, global = true, action = ArgAction::Count)]
    verbose: u8,
    /// Only errors; no progress bar.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Print one JSON document on stdout instead of the human summary.
    #[arg(long, global = true)]
    json: bool,
    /// The change tracker's state directory (socket and saved state) [env: CAIRN_STATE_DIR;
    /// default: /var/lib/cairn].
    #[arg(long, global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Image a block device (whole disk or partition) or a disk-image file into REPO.
    Backup(BackupArgs),
    /// The change tracker: `run` follows writes to whole disks, `status` reports on it.
    #[command(subcommand)]
    Tracker(TrackerCommand),
    /// Write an image back onto a block device or file.
    Restore(RestoreArgs),
    /// Read every stored block and check it; exit 0 only when everything checked is intact.
    Verify(SelectArgs),
    /// One row per image in REPO.
    List(ListArgs),
    /// An image's unreadable ranges, in ddrescue's mapfile format.
    Badmap(SelectArgs),
    /// Everything one image's manifest records: source, sizes, partition table.
    Show(ShowArgs),
    /// The block devices of this machine, as you check them before overwriting one.
    Disks,
}

#[derive(Args)]
struct ShowArgs {
    /// Repository directory.
    repo: PathBuf,
    #[command(flatten)]
    select: Selection,
}

#[derive(Args)]
struct BackupArgs {
    /// Block device (/dev/sda, /dev/nvme0n1p2, /dev/disk/by-id/...) or regular file.
    source: PathBuf,
    /// Repository directory; created if absent.
    repo: PathBuf,
    /// Take a full image (the default for a name's first image).
    #[arg(long, group = "kind")]
    full: bool,
    /// Only what changed since the previous image of any kind (the default once a full exists).
    /// Restoring it needs the full and every image between.
    #[arg(long, group = "kind")]
    incremental: bool,
    /// Only what changed since the last full image. Restoring it needs only that full.
    #[arg(long, group = "kind")]
    differential: bool,
    /// Series name for this source's images [default: from the disk's WWN/serial, the partition's
    /// PARTUUID, or the file's path].
    #[arg(long)]
    name: Option<String>,
    /// zstd level: 1 is fastest (the device stays the bottleneck), up to 19 for smaller images.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(-7..=19))]
    level: i32,
    /// Split image data into files of at most this size (2G fits FAT32 media).
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    segment_size: u64,
    /// Give up (exit 1, no image kept) when more than this much of the source is unreadable: a
    /// size (64M), a share of the source (0.5%), or `none` to image a failing disk as far as it
    /// can be read [default: 1% of the source, at least 64M: a disk with scattered bad sectors,
    /// the usual case, finishes; one with a failed head or a large damaged area stops before
    /// retries wear it out further: copy it with GNU ddrescue, which reads the good areas first].
    #[arg(long, value_parser = parse_max_bad, value_name = "SIZE|PERCENT%|none")]
    max_bad: Option<backup::MaxBad>,
    /// Block size: the unit read, hashed and compressed (power of two, 64K..16M).
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    block_size: u64,
}

#[derive(Args)]
struct RestoreArgs {
    /// Repository directory.
    repo: PathBuf,
    /// Block device to overwrite, or a file (created sparse if absent).
    target: PathBuf,
    #[command(flatten)]
    select: Selection,
    /// Do not ask for confirmation before overwriting (for scripts).
    #[arg(long, short = 'y')]
    yes: bool,
    /// Restore only partition N of a whole-disk image, onto a partition or device of sufficient size.
    #[arg(long, value_name = "N")]
    partition: Option<u32>,
    /// On a larger drive, also extend the last partition to the end (grow its filesystem afterwards).
    #[arg(long)]
    grow_last_partition: bool,
    /// Read the target back (O_DIRECT) after writing and compare it with the image's hashes.
    #[arg(long)]
    verify: bool,
}

#[derive(Args)]
struct Selection {
    /// Series name [default: the only one in the repository].
    #[arg(long)]
    name: Option<String>,
    /// Image id from `cairn list` [default: the newest of the name].
    #[arg(long)]
    image: Option<String>,
}

#[derive(Args)]
struct SelectArgs {
    /// Repository directory.
    repo: PathBuf,
    #[command(flatten)]
    select: Selection,
}

#[derive(Subcommand)]
enum TrackerCommand {
    /// Follow writes to these whole disks until SIGTERM (run it at boot: tools/cairn-tracker.service).
    /// Partitions are followed through their disk. Needs root and tracefs.
    Run {
        /// Whole disks, e.g. /dev/sda /dev/nvme0n1.
        #[arg(required = true)]
        devices: Vec<PathBuf>,
        /// Kernel ring buffer per CPU, in KiB. Larger survives longer write bursts; when it
        /// overflows, the next backup compare-scans.
        #[arg(long, default_value_t = 8192)]
        buffer_kb: u64,
        /// How often the buffers are read, in milliseconds.
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
    },
    /// Forget all tracking for the state directory: saved state and the kernel instance (which
    /// keeps buffering after a clean stop). The next backups compare-scan.
    Reset {
        /// Instead, remove every orphaned cairn-* kernel instance (see `tracker status`): ones
        /// no tracker reads and no restart would resume. Nothing else is touched.
        #[arg(long)]
        orphans: bool,
    },
    /// Stop the tracker for good: it removes its kernel instance and exits (a SIGTERM stop keeps
    /// the instance buffering for a restart). With no tracker running, removes the instance its
    /// clean stop kept. The next backups compare-scan.
    Stop,
    /// Per device: tracking since when, continuity, changed bytes since the last full and image;
    /// and every cairn-* kernel instance, in use, kept for a restart, or orphaned.
    Status {
        /// Only this device.
        device: Option<PathBuf>,
    },
}

#[derive(Args)]
struct ListArgs {
    /// Repository directory.
    repo: PathBuf,
}

/// Parses sizes like 4096, 64K, 1M, 2G, 1T (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let unit = s[i..]
                .trim_end_matches(['B', 'b', 'i'])
                .to_ascii_uppercase();
            let mult = match unit.as_str() {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("unknown size unit in {s:?} (use K, M, G or T)")),
            };
            (&s[..i], mult)
        }
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// `--max-bad`: a size, a percentage of the source, or `none`.
fn parse_max_bad(s: &str) -> Result<backup::MaxBad, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("none") {
        return Ok(backup::MaxBad::Unlimited);
    }
    if let Some(p) = s.strip_suffix('%') {
        return match p.trim().parse::<f64>() {
            Ok(v) if (0.0..=100.0).contains(&v) => Ok(backup::MaxBad::Percent(v)),
            _ => Err(format!("{s:?}: a percentage from 0% to 100%")),
        };
    }
    parse_size(s).map(backup::MaxBad::Bytes)
}

pub fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    let progress = if cli.quiet {
        Progress::hidden()
    } else {
        Progress::new(true)
    };
    match cli.command {
        Command::Backup(a) => {
            let bs = a.block_size;
            if !bs.is_power_of_two()
                || !(u64::from(format::MIN_BLOCK_SIZE)..=u64::from(format::MAX_BLOCK_SIZE))
                    .contains(&bs)
            {
                bail!("--block-size must be a power of two from 64K to 16M");
            }
            if a.segment_size < bs + 4096 {
                bail!("--segment-size must be larger than the block size");
            }
            let kind = if a.full {
                Some(ImageKind::Full)
            } else if a.incremental {
                Some(ImageKind::Incremental)
            } else if a.differential {
                Some(ImageKind::Differential)
            } else {
                None
            };
            let opts = BackupOptions {
                source: a.source,
                repo: a.repo,
                name: a.name,
                kind,
                level: a.level,
                segment_size: a.segment_size,
                block_size: bs as u32,
                state_dir: crate::tracker::state_dir(cli.state_dir.as_deref()),
                max_bad: a.max_bad.unwrap_or(backup::MaxBad::Default),
            };
            let r = backup::run(&opts, &progress)?;
            if cli.json {
                print_json(&r);
            } else if !cli.quiet {
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
            if r.bad_bytes > 0 {
                return Err(anyhow::Error::new(PartialImage(format!(
                    "image {} is complete but {} bytes in {} ranges were unreadable ({}); `cairn badmap {} --image {}` lists them",
                    r.id,
                    r.bad_bytes,
                    r.bad_ranges.len(),
                    if r.kind == "full" {
                        "zeros in the image"
                    } else {
                        "the parent chain's data stands there, flagged"
                    },
                    opts.repo.display(),
                    r.id
                ))));
            }
        }
        Command::Restore(a) => {
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
            let r = restore::run(&opts, &progress)?;
            if cli.json {
                print_json(&r);
            } else if !cli.quiet {
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
                    if r.verified { ", and read back from the target" } else { "" }
                );
                if let Some((from, to)) =
                    r.partition_table.as_ref().and_then(|c| c.backup_header_lba)
                {
                    eprintln!(
                        "GPT backup header moved from LBA {from} to LBA {to} (the drive's end)"
                    );
                }
                for h in &r.hints {
                    eprintln!("hint: {h}");
                }
            }
        }
        Command::Verify(a) => {
            let repo = Repository::open(&a.repo)?;
            let r = verify::run(
                &repo,
                a.select.name.as_deref(),
                a.select.image.as_deref(),
                &progress,
            )?;
            if cli.json {
                print_json(&r);
            } else if !cli.quiet {
                for i in &r.images {
                    let what = match (i.status, i.restorable) {
                        ("ok", true) => "ok".to_string(),
                        ("intact-with-bad-sectors", true) => {
                            "ok, but the source had unreadable sectors".to_string()
                        }
                        (_, false) if verify::intact(i.status) => {
                            "intact, but not restorable (a parent is damaged)".to_string()
                        }
                        _ => format!("DAMAGED ({} damaged blocks)", i.damaged_blocks),
                    };
                    eprintln!("{} {}: {what}", i.id, i.name.as_deref().unwrap_or("?"));
                    if let Some(u) = i.unreadable.as_ref().filter(|u| u.count > 0) {
                        eprintln!(
                            "  unreadable at this restore point: {} in {} ranges (`cairn badmap --image {}`)",
                            human_bytes(u.bytes),
                            u.count,
                            i.id
                        );
                    }
                    for e in &i.errors {
                        eprintln!("  {e}");
                    }
                }
            }
            if !r.ok {
                let bad: Vec<&str> = r
                    .images
                    .iter()
                    .filter(|i| !verify::intact(i.status) || !i.restorable)
                    .map(|i| i.id.as_str())
                    .collect();
                let first = r
                    .images
                    .iter()
                    .flat_map(|i| i.errors.first())
                    .next()
                    .cloned()
                    .unwrap_or_default();
                bail!(
                    "{} image(s) damaged or unrestorable: {} ({first})",
                    bad.len(),
                    bad.join(", ")
                );
            }
        }
        Command::Badmap(a) => {
            let repo = Repository::open(&a.repo)?;
            let id =
                restore::select_image(&repo, a.select.name.as_deref(), a.select.image.as_deref())?;
            let chain = crate::chain::resolve(&repo, &id)?;
            let unreadable = crate::chain::unreadable_at(&chain)?;
            let m = &chain.last().expect("non-empty chain").manifest;
            if cli.json {
                print_json(&serde_json::json!({
                    "id": id,
                    "size": m.source.size,
                    "unreadable_bytes": unreadable.iter().map(|r| r.1).sum::<u64>(),
                    "bad_ranges": unreadable,
                }));
            } else {
                print!("{}", ddrescue_map(m, &id, &unreadable));
            }
        }
        Command::Tracker(t) => tracker_command(t, cli.state_dir.as_deref(), cli.json)?,
        Command::Show(a) => {
            let repo = Repository::open(&a.repo)?;
            let id =
                restore::select_image(&repo, a.select.name.as_deref(), a.select.image.as_deref())?;
            let (m, _) = repo.load_manifest(&id)?;
            // What is unreadable at this point needs the whole chain; a chain that cannot be
            // read is reported, and the manifest is shown anyway.
            let unreadable = crate::chain::resolve(&repo, &id)
                .and_then(|c| crate::chain::unreadable_at(&c))
                .map(|u| crate::chain::Unreadable::summary(&u))
                .map_err(|e| format!("{e:#}"));
            if cli.json {
                let mut v = serde_json::to_value(&m).expect("serialisable");
                v["unreadable"] = match &unreadable {
                    Ok(u) => serde_json::to_value(u).expect("serialisable"),
                    Err(e) => serde_json::json!({ "error": e }),
                };
                print_json(&v);
            } else {
                for l in list::show_lines(&m, &unreadable) {
                    println!("{l}");
                }
            }
        }
        Command::Disks => {
            let disks = crate::disks::run()?;
            if cli.json {
                print_json(&disks);
            } else {
                for l in crate::disks::render(&disks) {
                    println!("{l}");
                }
            }
        }
        Command::List(a) => {
            let repo = Repository::open(&a.repo)?;
            let rows = list::run(&repo)?;
            if cli.json {
                print_json(&rows);
            } else if rows.is_empty() {
                eprintln!("no images in {}", repo.root.display());
            } else {
                println!(
                    "{:<20} {:<24} {:<12} {:<20} {:>8} {:>8} {:>8}  {:<20} STATUS",
                    "ID", "NAME", "KIND", "PARENT", "SIZE", "DATA", "STORED", "CREATED"
                );
                let gib = |v: Option<u64>| v.map(short_bytes).unwrap_or_else(|| "?".into());
                for r in rows {
                    println!(
                        "{:<20} {:<24} {:<12} {:<20} {:>8} {:>8} {:>8}  {:<20} {}",
                        r.id,
                        r.name.as_deref().unwrap_or("?"),
                        r.kind.unwrap_or("?"),
                        r.parent.as_deref().unwrap_or("-"),
                        gib(r.source_size),
                        gib(r.data_bytes),
                        gib(r.stored_bytes),
                        r.created.as_deref().unwrap_or("?"),
                        r.status
                    );
                    if let Some(t) = &r.partition_table {
                        println!("    {}", list::table_summary(t));
                    }
                }
            }
        }
    }
    Ok(())
}

fn tracker_command(
    t: TrackerCommand,
    state_dir: Option<&std::path::Path>,
    json: bool,
) -> Result<()> {
    let dir = crate::tracker::state_dir(state_dir);
    match t {
        TrackerCommand::Run {
            devices,
            buffer_kb,
            interval_ms,
        } => {
            let opts = crate::tracker::daemon::DaemonOptions {
                devices,
                state_dir: dir,
                buffer_kb,
                interval: std::time::Duration::from_millis(interval_ms.max(1)),
            };
            crate::tracker::daemon::run(&opts)
        }
        TrackerCommand::Reset { orphans: true } => {
            let removed = crate::tracker::instances::remove_orphans(&dir)?;
            if json {
                print_json(&serde_json::json!({ "removed": removed }));
            } else if removed.is_empty() {
                eprintln!("no orphaned instances");
            }
            for i in &removed {
                eprintln!("removed {} ({})", i.name, i.why);
            }
            Ok(())
        }
        TrackerCommand::Stop => {
            match crate::tracker::stop(&dir)? {
                Some(instance) => eprintln!("tracker stopped for good; removed {instance}"),
                None => eprintln!("no tracker is running and no kernel instance was kept"),
            }
            Ok(())
        }
        TrackerCommand::Reset { orphans: false } => {
            let removed = crate::tracker::daemon::reset(&dir)?;
            eprintln!(
                "{}",
                if removed {
                    "tracking state removed"
                } else {
                    "nothing to remove"
                }
            );
            Ok(())
        }
        TrackerCommand::Status { device } => {
            let (saved, mut devices) = crate::tracker::status(&dir)?;
            let instances = crate::tracker::instances::list(&dir)?;
            let running = matches!(saved, crate::tracker::Saved::Running);
            if let Some(d) = device {
                let want = std::fs::canonicalize(&d).unwrap_or(d.clone());
                devices.retain(|s| {
                    std::fs::canonicalize(&s.device).unwrap_or_else(|_| s.device.clone().into())
                        == want
                });
                if devices.is_empty() {
                    bail!("{} is not tracked", d.display());
                }
            }
            if json {
                let note = match &saved {
                    crate::tracker::Saved::Nothing(n) => Some(n.clone()),
                    _ => None,
                };
                print_json(&serde_json::json!({
                    "running": running,
                    "note": note,
                    "devices": devices,
                    "instances": instances,
                }));
                return Ok(());
            }
            match &saved {
                crate::tracker::Saved::Running => println!("tracker: running"),
                crate::tracker::Saved::Stopped => {
                    println!("tracker: NOT running (saved state shown)")
                }
                crate::tracker::Saved::Nothing(n) => println!("tracker: NOT running: {n}"),
            }
            print_instances(&instances);
            for d in devices {
                println!(
                    "{} ({}:{}, {}), tracking since {}",
                    d.device,
                    d.disk.0,
                    d.disk.1,
                    short_bytes(d.size),
                    d.tracking_since
                );
                if d.continuity != "intact" {
                    println!("  {}", d.continuity);
                }
                if d.consumers.is_empty() {
                    println!("  no backups taken with the tracker yet");
                }
                for c in d.consumers {
                    println!("  {} (bytes {}..{})", c.consumer, c.start, c.start + c.len);
                    println!(
                        "    since last image: {} changed, continuity {}",
                        short_bytes(c.changed_bytes_since_image),
                        c.continuity_since_image
                    );
                    println!(
                        "    since last full:  {} changed, continuity {}",
                        short_bytes(c.changed_bytes_since_full),
                        c.continuity_since_full
                    );
                }
            }
            Ok(())
        }
    }
}

fn print_instances(instances: &[crate::tracker::instances::InstanceStatus]) {
    use crate::tracker::instances::Verdict;
    for i in instances {
        let what = match i.verdict {
            Verdict::InUse => "in use",
            Verdict::Kept => "kept for a restart",
            Verdict::Orphaned => "ORPHANED",
        };
        println!("kernel instance {}: {what}: {}", i.name, i.why);
    }
    if instances.iter().any(|i| i.verdict == Verdict::Orphaned) {
        println!(
            "  orphaned instances trace every write of their disks until reboot: \
             remove them with `cairn tracker reset --orphans`"
        );
    }
}

/// A backup that finished, but with unreadable sectors: exit status 3, so scripts can tell.
#[derive(Debug)]
pub struct PartialImage(pub String);

impl std::fmt::Display for PartialImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PartialImage {}

/// GNU ddrescue's mapfile of a restore point: '+' read fine, '-' unreadable (`bad`).
fn ddrescue_map(m: &crate::format::Manifest, id: &str, bad: &[(u64, u64)]) -> String {
    let mut out = format!(
        "# Mapfile. Created by cairn {} for image {id} of {}\n# current_pos  current_status  current_pass\n0x{:08X}     +               1\n#      pos        size  status\n",
        env!("CARGO_PKG_VERSION"),
        m.source.path,
        m.source.size
    );
    let mut at = 0u64;
    for &(o, l) in bad {
        if o > at {
            out.push_str(&format!("0x{at:08X}  0x{:08X}  +\n", o - at));
        }
        out.push_str(&format!("0x{o:08X}  0x{l:08X}  -\n"));
        at = o + l;
    }
    if at < m.source.size {
        out.push_str(&format!("0x{at:08X}  0x{:08X}  +\n", m.source.size - at));
    }
    out
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serialisable"));
}

fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => tracing::Level::ERROR,
        (false, 0) => tracing::Level::WARN,
        (false, 1) => tracing::Level::INFO,
        (false, _) => tracing::Level::DEBUG,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .init();
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
