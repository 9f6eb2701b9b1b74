//! The command line's grammar: every subcommand, option and `--help` text, and the parsers of
//! sizes; `main` (mod.rs) turns a parsed command into a library call.

use crate::backup;
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
    pub(super) verbose: u8,
    /// Only errors; no progress bar.
    #[arg(short, long, global = true)]
    pub(super) quiet: bool,
    /// Print one JSON document on stdout instead of the human summary.
    #[arg(long, global = true)]
    pub(super) json: bool,
    /// The change tracker's state directory (socket and saved state) [env: CAIRN_STATE_DIR;
    /// default: /var/lib/cairn].
    #[arg(long, global = true, value_name = "DIR")]
    pub(super) state_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub(super) command: Command,
}

#[derive(Subcommand)]
pub(super) enum Command {
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
    /// Show a restore point read-only under DIR: its disk, its partitions, their filesystems.
    #[command(long_about = MOUNT_ABOUT)]
    Mount(MountArgs),
    /// End a `cairn mount`: unmount its filesystems, detach its loop devices, end the view (also
    /// after the mount's process was killed).
    Umount(UmountArgs),
    /// Remove old restore points by keep rules; the points kept stay exactly what they were.
    #[command(long_about = PRUNE_ABOUT)]
    Prune(PruneArgs),
    /// Remove one restore point; the points that depend on it stay restorable.
    Delete(DeleteArgs),
    /// Protect a restore point from prune and delete (--unprotect: lift it).
    Protect(ProtectArgs),
    /// Upgrade a format-1 repository to format 2 (the first backup or prune does it too).
    Upgrade(ListArgs),
}

const PRUNE_ABOUT: &str =
    "Remove old restore points by keep rules, per name: a point is kept when any \
rule keeps it (the union, as restic's forget), the newest point of each name and every protected \
point are always kept, and with no rule prune refuses. Calendar rules count UTC hours, days, ISO \
weeks and months, keeping the newest point of each; --keep-within counts back from the newest \
point, not from now. --max-size then removes the oldest points until the repository fits.\n\n\
A kept point keeps its id and stays bit for bit the same restore point: when the full it depends \
on goes, it becomes a synthetic full; when incrementals below it go, their data is merged into it. \
A merge writes only new indexes: the stored frames are reused where they are. Interrupted (kill, \
power loss), it leaves every point restorable; the next prune finishes the job. See docs/prune.md.";

#[derive(Args)]
pub(super) struct PruneArgs {
    /// Repository directory.
    pub(super) repo: PathBuf,
    /// Only the points of this name [default: every name, each decided on its own].
    #[arg(long)]
    pub(super) name: Option<String>,
    /// Keep the N newest points.
    #[arg(long, value_name = "N")]
    pub(super) keep_last: Option<u32>,
    /// Keep the newest point of each of the last N hours that have one.
    #[arg(long, value_name = "N")]
    pub(super) keep_hourly: Option<u32>,
    /// Keep the newest point of each of the last N days that have one.
    #[arg(long, value_name = "N")]
    pub(super) keep_daily: Option<u32>,
    /// Keep the newest point of each of the last N ISO weeks that have one.
    #[arg(long, value_name = "N")]
    pub(super) keep_weekly: Option<u32>,
    /// Keep the newest point of each of the last N months that have one.
    #[arg(long, value_name = "N")]
    pub(super) keep_monthly: Option<u32>,
    /// Keep every point made within DURATION (30d, 12h, 2weeks) of the newest point.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(super) keep_within: Option<std::time::Duration>,
    /// Then remove the oldest points until the repository holds at most SIZE (never the newest
    /// of a name, never a protected point).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub(super) max_size: Option<u64>,
    /// Print the decision and the space it would free; change nothing.
    #[arg(long)]
    pub(super) dry_run: bool,
    /// Wait up to DURATION for other cairn processes using the repository [default: 0, refuse].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(super) wait: Option<std::time::Duration>,
}

#[derive(Args)]
pub(super) struct DeleteArgs {
    /// Repository directory.
    pub(super) repo: PathBuf,
    /// The image to remove (`cairn list` shows them).
    #[arg(long, required = true)]
    pub(super) image: String,
    /// Print what would happen; change nothing.
    #[arg(long)]
    pub(super) dry_run: bool,
    /// Wait up to DURATION for other cairn processes using the repository [default: 0, refuse].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(super) wait: Option<std::time::Duration>,
}

#[derive(Args)]
pub(super) struct ProtectArgs {
    /// Repository directory.
    pub(super) repo: PathBuf,
    /// The image to protect.
    #[arg(long, required = true)]
    pub(super) image: String,
    /// Lift the protection instead.
    #[arg(long)]
    pub(super) unprotect: bool,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration ({e}); e.g. 30d, 12h, 90s"))
}

const MOUNT_ABOUT: &str = "Show a restore point read-only under DIR, without writing anything anywhere: \
copy single files out, compare, or boot it (qemu -drive file=DIR/disk,format=raw,snapshot=on).\n\n\
Layout:\n  \
DIR/disk      the whole restore point, exactly the source's size\n  \
DIR/pN        partition N's filesystem, mounted read-only; or, when it cannot be mounted\n                \
here, its raw bytes as a file (a one-line note says why)\n  \
DIR/fs        the filesystem of an image without partitions, mounted read-only\n  \
DIR/.raw/pN   every partition's raw bytes (what the loop devices read)\n\
With --raw, DIR/pN are all raw files and nothing is mounted.\n\n\
Mounted read-only: ext2/3/4 (ro,noload), xfs (ro,norecovery), btrfs (ro), NTFS through ntfs-3g, \
vfat and exfat when the kernel has them. Every byte is checked (crc and BLAKE3) before it is \
returned; a damaged block reads as an I/O error (EIO) for exactly its range and is logged with \
its image, segment and offset, never as wrong bytes. While mounted, the repository's removal lock \
is held in shared mode: backups go on, a prune or delete waits until the mount ends. Runs in the foreground until \
Ctrl-C, SIGTERM or `cairn umount DIR`; --background returns once everything is mounted. Needs \
root (FUSE, loop devices, mount).";

#[derive(Args)]
pub(super) struct MountArgs {
    /// Repository directory.
    pub(super) repo: PathBuf,
    /// An existing empty directory to show the restore point in.
    pub(super) dir: PathBuf,
    #[command(flatten)]
    pub(super) select: Selection,
    /// Only raw files (DIR/disk, DIR/pN): no loop devices, no filesystems mounted.
    #[arg(long)]
    pub(super) raw: bool,
    /// Return once everything is mounted; the mount is served by a background process (its
    /// log: /run/cairn/mounts/) until `cairn umount DIR`.
    #[arg(long)]
    pub(super) background: bool,
}

#[derive(Args)]
pub(super) struct UmountArgs {
    /// The directory of a `cairn mount`.
    pub(super) dir: PathBuf,
}

#[derive(Args)]
pub(super) struct ShowArgs {
    /// Repository directory.
    pub(super) repo: PathBuf,
    #[command(flatten)]
    pub(super) select: Selection,
}

#[derive(Args)]
pub(super) struct BackupArgs {
    /// Block device (/dev/sda, /dev/nvme0n1p2, /dev/disk/by-id/...) or regular file.
    pub(super) source: PathBuf,
    /// Repository directory; created if absent.
    pub(super) repo: PathBuf,
    /// Take a full image (the default for a name's first image).
    #[arg(long, group = "kind")]
    pub(super) full: bool,
    /// Only what changed since the previous image of any kind (the default once a full exists).
    /// Restoring it needs the full and every image between.
    #[arg(long, group = "kind")]
    pub(super) incremental: bool,
    /// Only what changed since the last full image. Restoring it needs only that full.
    #[arg(long, group = "kind")]
    pub(super) differential: bool,
    /// Series name for this source's images [default: from the disk's WWN/serial, the partition's
    /// PARTUUID, or the file's path].
    #[arg(long)]
    pub(super) name: Option<String>,
    /// zstd level: 1 is fastest (the device stays the bottleneck), up to 19 for smaller images.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(-7..=19))]
    pub(super) level: i32,
    /// Split image data into files of at most this size (2G fits FAT32 media).
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    pub(super) segment_size: u64,
    /// Give up (exit 1, no image kept) when more than this much of the source is unreadable: a
    /// size (64M), a share of the source (0.5%), or `none` to image a failing disk as far as it
    /// can be read [default: 1% of the source, at least 64M: a disk with scattered bad sectors,
    /// the usual case, finishes; one with a failed head or a large damaged area stops before
    /// retries wear it out further: copy it with GNU ddrescue, which reads the good areas first].
    #[arg(long, value_parser = parse_max_bad, value_name = "SIZE|PERCENT%|none")]
    pub(super) max_bad: Option<backup::MaxBad>,
    /// Block size: the unit read, hashed and compressed (power of two, 64K..16M).
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    pub(super) block_size: u64,
}

#[derive(Args)]
pub(super) struct RestoreArgs {
    /// Repository directory.
    pub(super) repo: PathBuf,
    /// Block device to overwrite, or a file (created sparse if absent).
    pub(super) target: PathBuf,
    #[command(flatten)]
    pub(super) select: Selection,
    /// Do not ask for confirmation before overwriting (for scripts).
    #[arg(long, short = 'y')]
    pub(super) yes: bool,
    /// Restore only partition N of a whole-disk image, onto a partition or device of sufficient size.
    #[arg(long, value_name = "N")]
    pub(super) partition: Option<u32>,
    /// On a larger drive, also extend the last partition to the end (grow its filesystem afterwards).
    #[arg(long)]
    pub(super) grow_last_partition: bool,
    /// Read the target back (O_DIRECT) after writing and compare it with the image's hashes.
    #[arg(long)]
    pub(super) verify: bool,
}

#[derive(Args)]
pub(super) struct Selection {
    /// Series name [default: the only one in the repository].
    #[arg(long)]
    pub(super) name: Option<String>,
    /// Image id from `cairn list` [default: the newest of the name].
    #[arg(long)]
    pub(super) image: Option<String>,
}

#[derive(Args)]
pub(super) struct SelectArgs {
    /// Repository directory.
    pub(super) repo: PathBuf,
    #[command(flatten)]
    pub(super) select: Selection,
}

#[derive(Subcommand)]
pub(super) enum TrackerCommand {
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
pub(super) struct ListArgs {
    /// Repository directory.
    pub(super) repo: PathBuf,
    /// With --json: one object with the rows (`images`) and the repository's `total_bytes` and
    /// `reclaimable_bytes`, instead of the rows alone.
    #[arg(long)]
    pub(super) totals: bool,
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
