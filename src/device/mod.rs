//! Device I/O: what a block device or image file is (size, sector sizes, identity, whether it is in
//! use) and an I/O queue to read or write it. Knows nothing about the image format.

pub mod buf;
pub mod fault;
pub mod queue;
pub mod sync;
pub mod uring;

use anyhow::{bail, Context, Result};
use buf::AlignedBuf;
use queue::IoQueue;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

mod ioctl {
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    nix::ioctl_read_bad!(blksszget, 0x1268, libc::c_int);
    nix::ioctl_read_bad!(blkpbszget, 0x127b, libc::c_uint);
    nix::ioctl_write_ptr_bad!(blkzeroout, 0x127f, [u64; 2]);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Disk,
    Partition,
    File,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Disk => "disk",
            Kind::Partition => "partition",
            Kind::File => "file",
        }
    }
}

/// Facts about a source or target, from stat, ioctls, sysfs and the udev database.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub path: PathBuf,
    pub kind: Kind,
    pub size: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// (major, minor) for block devices.
    pub devno: Option<(u32, u32)>,
    /// Kernel name ("sda", "loop3p1").
    pub kernel_name: Option<String>,
    /// Whole disk's (major, minor) when this is a partition.
    pub parent_devno: Option<(u32, u32)>,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub wwn: Option<String>,
    pub partuuid: Option<String>,
    pub ptable_id: Option<String>,
    pub rotational: Option<bool>,
}

impl DeviceInfo {
    pub fn is_block(&self) -> bool {
        self.kind != Kind::File
    }

    /// Probes an existing path. Follows symlinks (/dev/disk/by-id/...).
    pub fn probe(path: &Path) -> Result<DeviceInfo> {
        let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
        let ft = meta.file_type();
        if ft.is_file() {
            return Ok(DeviceInfo {
                path: path.to_path_buf(),
                kind: Kind::File,
                size: meta.len(),
                logical_sector_size: 512,
                physical_sector_size: 512,
                devno: None,
                kernel_name: None,
                parent_devno: None,
                model: None,
                serial: None,
                wwn: None,
                partuuid: None,
                ptable_id: None,
                rotational: None,
            });
        }
        if !ft.is_block_device() {
            bail!(
                "{} is neither a block device nor a regular file",
                path.display()
            );
        }
        let rdev = meta.rdev();
        let devno = (libc::major(rdev), libc::minor(rdev));
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let fd = file.as_raw_fd();
        let mut size = 0u64;
        let mut lss: libc::c_int = 0;
        let mut pss: libc::c_uint = 0;
        // SAFETY: fd is an open block device; each ioctl writes one integer into the given place.
        unsafe {
            ioctl::blkgetsize64(fd, &mut size)
                .with_context(|| format!("BLKGETSIZE64 on {}", path.display()))?;
            ioctl::blksszget(fd, &mut lss)
                .with_context(|| format!("BLKSSZGET on {}", path.display()))?;
            ioctl::blkpbszget(fd, &mut pss)
                .with_context(|| format!("BLKPBSZGET on {}", path.display()))?;
        }
        let sys = sysfs_dir(devno);
        let kernel_name = sys
            .as_ref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned());
        let is_partition = sys.as_ref().is_some_and(|p| p.join("partition").exists());
        let (parent_devno, disk_sys) = if is_partition {
            let parent = sys.as_ref().and_then(|p| p.parent()).map(Path::to_path_buf);
            (
                parent.as_ref().and_then(|p| read_devno(&p.join("dev"))),
                parent,
            )
        } else {
            (None, sys.clone())
        };
        let udev = udev_props(devno);
        let disk_udev = parent_devno.map(udev_props).unwrap_or_else(|| udev.clone());
        let attr = |rel: &str| disk_sys.as_ref().and_then(|d| read_trimmed(&d.join(rel)));
        let prop = |props: &[(String, String)], key: &str| {
            props
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
        };
        Ok(DeviceInfo {
            path: path.to_path_buf(),
            kind: if is_partition {
                Kind::Partition
            } else {
                Kind::Disk
            },
            size,
            logical_sector_size: lss as u32,
            physical_sector_size: pss,
            devno: Some(devno),
            kernel_name,
            parent_devno,
            model: attr("device/model").or_else(|| prop(&disk_udev, "ID_MODEL")),
            serial: attr("device/serial")
                .or_else(|| prop(&disk_udev, "ID_SERIAL_SHORT"))
                .or_else(|| attr("serial")),
            wwn: attr("wwid")
                .or_else(|| attr("device/wwid"))
                .or_else(|| prop(&disk_udev, "ID_WWN")),
            partuuid: if is_partition {
                prop(&udev, "ID_PART_ENTRY_UUID")
            } else {
                None
            },
            ptable_id: prop(&disk_udev, "ID_PART_TABLE_UUID"),
            rotational: attr("queue/rotational").map(|v| v == "1"),
        })
    }

    /// A stable default series name: WWN or serial for a disk, PARTUUID for a partition, else the
    /// kernel name or the path.
    pub fn default_name(&self) -> String {
        let raw = match self.kind {
            Kind::Disk => self
                .wwn
                .as_ref()
                .map(|w| format!("disk-{w}"))
                .or_else(|| self.serial.as_ref().map(|s| format!("disk-{s}"))),
            Kind::Partition => self.partuuid.as_ref().map(|u| format!("part-{u}")),
            Kind::File => None,
        };
        let raw = raw.unwrap_or_else(|| match (&self.kernel_name, self.kind) {
            (Some(k), _) => k.clone(),
            (None, _) => format!("file-{}", self.path.display()),
        });
        sanitize_name(&raw)
    }

    /// Why this device must not be written, if it is mounted, used as swap or held by another
    /// device (LVM, RAID, dm), itself or through one of its partitions.
    pub fn in_use_reason(&self) -> Option<String> {
        let devno = self.devno?;
        let mut devs = vec![(devno, self.path.display().to_string())];
        if let Some(sys) = sysfs_dir(devno) {
            for part in partitions_of(&sys) {
                if let Some(d) = read_devno(&part.join("dev")) {
                    devs.push((
                        d,
                        format!("partition {}", part.file_name()?.to_string_lossy()),
                    ));
                }
            }
        }
        let mounts = mounted_devnos();
        let swaps = swap_devnos();
        for (d, label) in &devs {
            if let Some(mp) = mounts.iter().find(|(m, _)| m == d).map(|(_, p)| p) {
                return Some(format!("{label} is mounted at {mp}"));
            }
            if swaps.contains(d) {
                return Some(format!("{label} is in use as swap"));
            }
            if let Some(h) = sysfs_dir(*d).and_then(|s| first_entry(&s.join("holders"))) {
                return Some(format!(
                    "{label} is held by {h} (LVM, RAID or device-mapper)"
                ));
            }
        }
        None
    }

    /// True when the filesystem holding `path` lives on this device or on one of its partitions,
    /// or this device is a partition of the disk holding it.
    pub fn holds(&self, path: &Path) -> bool {
        let Some(devno) = self.devno else {
            return false;
        };
        let Ok(meta) = std::fs::metadata(path) else {
            return false;
        };
        let fs_dev = (libc::major(meta.dev()), libc::minor(meta.dev()));
        let fs_disk = sysfs_dir(fs_dev)
            .filter(|s| s.join("partition").exists())
            .and_then(|s| s.parent().and_then(|p| read_devno(&p.join("dev"))));
        fs_dev == devno
            || fs_disk == Some(devno)
            || (self.parent_devno.is_some() && self.parent_devno == Some(fs_dev))
    }
}

/// Names of the series come from hardware strings; keep them to the repository's alphabet.
pub fn sanitize_name(raw: &str) -> String {
    let mut s: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':') {
                c
            } else {
                '-'
            }
        })
        .collect();
    while s.starts_with(|c: char| !c.is_ascii_alphanumeric()) {
        s.remove(0);
    }
    s.truncate(128);
    if s.is_empty() {
        s.push_str("source");
    }
    s
}

fn sysfs_dir(devno: (u32, u32)) -> Option<PathBuf> {
    std::fs::canonicalize(format!("/sys/dev/block/{}:{}", devno.0, devno.1)).ok()
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn read_devno(p: &Path) -> Option<(u32, u32)> {
    let s = read_trimmed(p)?;
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn first_entry(dir: &Path) -> Option<String> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .next()
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

fn partitions_of(disk_sys: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(disk_sys) else {
        return Vec::new();
    };
    rd.flatten()
        .map(|e| e.path())
        .filter(|p| p.join("partition").exists())
        .collect()
}

fn udev_props(devno: (u32, u32)) -> Vec<(String, String)> {
    let Ok(s) = std::fs::read_to_string(format!("/run/udev/data/b{}:{}", devno.0, devno.1)) else {
        return Vec::new();
    };
    s.lines()
        .filter_map(|l| l.strip_prefix("E:"))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// True when a new file at `path` would land on devtmpfs (RAM-backed /dev), where a mistyped
/// device name must not silently become a regular file. Decided from the mount table, so /dev/shm
/// (tmpfs) stays usable.
pub fn on_devtmpfs(path: &Path) -> bool {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut dir = abs.parent().map(Path::to_path_buf).unwrap_or_default();
    while !dir.exists() {
        match dir.parent() {
            Some(p) => dir = p.to_path_buf(),
            None => break,
        }
    }
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    let Ok(s) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return abs.starts_with("/dev");
    };
    // The longest mount point containing the directory decides; its fstype follows " - ".
    s.lines()
        .filter_map(|l| {
            let mp = l.split(' ').nth(4)?;
            let fstype = l.split(" - ").nth(1)?.split(' ').next()?;
            dir.starts_with(unescape_mount_path(mp))
                .then(|| (mp.len(), fstype == "devtmpfs"))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, dev)| dev)
        .unwrap_or(false)
}

fn unescape_mount_path(p: &str) -> String {
    p.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// (devno, mount point) for every mounted filesystem, from /proc/self/mountinfo.
fn mounted_devnos() -> Vec<((u32, u32), String)> {
    let Ok(s) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    s.lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let devno = f.nth(2)?;
            let mp = f.nth(1)?;
            let (a, b) = devno.split_once(':')?;
            Some(((a.parse().ok()?, b.parse().ok()?), mp.to_string()))
        })
        .collect()
}

fn swap_devnos() -> Vec<(u32, u32)> {
    let Ok(s) = std::fs::read_to_string("/proc/swaps") else {
        return Vec::new();
    };
    s.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|p| std::fs::metadata(p).ok())
        .filter(|m| m.file_type().is_block_device())
        .map(|m| (libc::major(m.rdev()), libc::minor(m.rdev())))
        .collect()
}

/// How to do I/O: the environment variable CAIRN_IO=sync forces buffered pread/pwrite, and
/// CAIRN_IO=no-uring pread/pwrite with O_DIRECT (for tests, and for systems where io_uring
/// misbehaves).
fn forced_sync() -> bool {
    std::env::var("CAIRN_IO").is_ok_and(|v| v == "sync")
}

/// An open device or file with its I/O queue. The queue is declared first so it is dropped before
/// the file: the sync queue keeps a raw copy of the descriptor, and dropping an io_uring queue
/// waits for the transfers it has in flight (its ring holds its own reference to the file).
pub struct Handle {
    pub queue: Box<dyn IoQueue>,
    pub file: File,
    pub direct: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    /// Write an existing block device (exclusive open) or a regular file (created if absent).
    Write,
}

/// Opens `path` and builds the fastest queue the system allows over it: io_uring with O_DIRECT and
/// `buffers` registered, else buffered pread/pwrite, saying why in one log line.
pub fn open(
    path: &Path,
    access: Access,
    is_block: bool,
    depth: usize,
    buffers: &[AlignedBuf],
) -> Result<Handle> {
    let base = |direct: bool| {
        let mut o = OpenOptions::new();
        match access {
            Access::Read => {
                o.read(true);
            }
            Access::Write => {
                o.write(true);
                if !is_block {
                    o.create(true).mode(0o600);
                }
            }
        }
        let extra = if direct { libc::O_DIRECT } else { 0 };
        // O_EXCL on a block device: the open fails with EBUSY when it is mounted or claimed.
        let excl = if access == Access::Write && is_block {
            libc::O_EXCL
        } else {
            0
        };
        o.custom_flags(extra | excl | libc::O_CLOEXEC);
        o.open(path)
    };
    let describe_open_err = |e: std::io::Error| -> anyhow::Error {
        if e.raw_os_error() == Some(libc::EBUSY) {
            anyhow::anyhow!(
                "{} is in use (mounted, or opened exclusively by another program)",
                path.display()
            )
        } else {
            anyhow::Error::new(e).context(format!("cannot open {}", path.display()))
        }
    };
    let why_sync = if forced_sync() {
        Some("CAIRN_IO=sync".to_string())
    } else {
        match base(true) {
            Ok(file) => match uring_unless_disabled(file.as_raw_fd(), depth, buffers) {
                Ok(q) => {
                    tracing::debug!("{}: {}", path.display(), q.describe());
                    return Ok(Handle {
                        queue: with_faults(Box::new(q), access),
                        file,
                        direct: true,
                    });
                }
                Err(e) => {
                    // Still O_DIRECT: a buffered read of a whole disk can return pages cached
                    // before a write through one of its partitions (separate page caches).
                    tracing::warn!(
                        "{}: io_uring unavailable ({e}); using pread/pwrite with O_DIRECT",
                        path.display()
                    );
                    let why = format!("io_uring unavailable: {e}");
                    let q = sync::SyncQueue::new(file.as_raw_fd(), depth, why);
                    return Ok(Handle {
                        queue: with_faults(Box::new(q), access),
                        file,
                        direct: true,
                    });
                }
            },
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                Some(format!("O_DIRECT refused by {}", fs_name(path)))
            }
            Err(e) => return Err(describe_open_err(e)),
        }
    };
    let why = why_sync.expect("set above");
    let file = base(false).map_err(describe_open_err)?;
    tracing::warn!(
        "{}: using buffered pread/pwrite I/O ({why})",
        path.display()
    );
    let q = sync::SyncQueue::new(file.as_raw_fd(), depth, why);
    Ok(Handle {
        queue: with_faults(Box::new(q), access),
        file,
        direct: false,
    })
}

/// CAIRN_IO=no-uring behaves as if io_uring were unavailable (the seccomp case), for tests.
fn uring_unless_disabled(
    fd: std::os::fd::RawFd,
    depth: usize,
    buffers: &[AlignedBuf],
) -> std::io::Result<uring::UringQueue> {
    if std::env::var("CAIRN_IO").is_ok_and(|v| v == "no-uring") {
        return Err(std::io::Error::from_raw_os_error(libc::ENOSYS));
    }
    uring::UringQueue::new(fd, depth, buffers)
}

/// Reads see injected errors when CAIRN_FAULT_READ is set (see fault.rs).
fn with_faults(q: Box<dyn IoQueue>, access: Access) -> Box<dyn IoQueue> {
    match (access, fault::Faults::from_env()) {
        (Access::Read, Some(f)) => {
            tracing::warn!("CAIRN_FAULT_READ is set: injecting read errors");
            Box::new(fault::FaultyQueue::new(q, f))
        }
        _ => q,
    }
}

fn fs_name(path: &Path) -> String {
    let dir = if path.exists() {
        path.to_path_buf()
    } else {
        path.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    match nix::sys::statfs::statfs(&dir) {
        Ok(s) if s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC => "tmpfs".into(),
        _ => "this filesystem".into(),
    }
}

/// Makes `[offset, offset+len)` read back as zeros, and nothing outside it.
///
/// On a block device the kernel zeroes only whole logical sectors (BLKZEROOUT answers EINVAL to
/// anything else, and on a 4Kn disk a 512-aligned range is not enough): the sector-aligned middle
/// goes to BLKZEROOUT, and the unaligned edges are written as zero bytes through `file`, which must
/// therefore be open without O_DIRECT. On a regular file: a punched hole, or zeros written where the
/// filesystem cannot punch holes.
pub fn zero_range(file: &File, is_block: bool, offset: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let end = offset
        .checked_add(len)
        .with_context(|| format!("zeroing {len} bytes at offset {offset}: range overflows"))?;
    if is_block {
        let mut lss: libc::c_int = 0;
        // SAFETY: fd is an open block device; BLKSSZGET writes one int into `lss`.
        unsafe { ioctl::blksszget(file.as_raw_fd(), &mut lss) }
            .context("BLKSSZGET on the target")?;
        let sector = u64::try_from(lss)
            .ok()
            .filter(|s| s.is_power_of_two() && *s >= 512)
            .with_context(|| format!("the target reports a logical sector size of {lss}"))?;
        let middle_start = offset.next_multiple_of(sector).min(end);
        let middle_end = (end / sector * sector).max(middle_start);
        if (offset < middle_start || middle_end < end) && is_direct(file)? {
            bail!(
                "cannot zero [{offset}, {end}): its edges are not aligned to the {sector}-byte \
                 sectors and the descriptor is O_DIRECT"
            );
        }
        if middle_end > middle_start {
            // BLKZEROOUT drops the page cache of every page it touches, and when another
            // descriptor holds the device exclusively (restore's own queue does) it fails with
            // EBUSY if one of them is dirty: a buffered write just before, next to this range,
            // leaves such a page. So that span is written back first, and the edges after.
            // 64 KiB: a multiple of every page size Linux runs with.
            let page = 64 << 10;
            let span_start = middle_start / page * page;
            let span_len = middle_end.next_multiple_of(page) - span_start;
            // SAFETY: plain syscall on an open descriptor; it reads no memory of ours.
            let rc = unsafe {
                libc::sync_file_range(
                    file.as_raw_fd(),
                    span_start as libc::off64_t,
                    span_len as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error()).with_context(|| {
                    format!("writing back the target's cache at offset {span_start}")
                });
            }
            let range = [middle_start, middle_end - middle_start];
            // SAFETY: BLKZEROOUT reads two u64s from the pointer; fd is an open block device.
            unsafe { ioctl::blkzeroout(file.as_raw_fd(), &range) }.with_context(|| {
                format!(
                    "zeroing {} bytes at offset {middle_start}",
                    middle_end - middle_start
                )
            })?;
        }
        write_zeros(file, offset, middle_start)?;
        write_zeros(file, middle_end, end)?;
        return Ok(());
    }
    match nix::fcntl::fallocate(
        file.as_raw_fd(),
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        len as i64,
    ) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP) => write_zeros(file, offset, end),
        Err(e) => Err(anyhow::Error::new(e))
            .with_context(|| format!("punching a hole of {len} bytes at offset {offset}")),
    }
}

fn is_direct(file: &File) -> Result<bool> {
    let flags = nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
        .context("F_GETFL on the target")?;
    Ok(flags & libc::O_DIRECT != 0)
}

/// Writes zero bytes over `[from, to)` through a buffered descriptor (any alignment).
fn write_zeros(file: &File, from: u64, to: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    if from >= to {
        return Ok(());
    }
    if is_direct(file)? {
        bail!("cannot write zeros at offset {from} through an O_DIRECT descriptor");
    }
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(to - from) as usize];
    let mut at = from;
    while at < to {
        let n = (to - at).min(CHUNK) as usize;
        file.write_all_at(&zeros[..n], at)
            .with_context(|| format!("writing {n} zero bytes at offset {at}"))?;
        at += n as u64;
    }
    Ok(())
}

/// Root is needed for block devices; say so plainly instead of a bare EACCES.
pub fn require_root_for(path: &Path) -> Result<()> {
    let is_block = std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    if is_block && !nix::unistd::geteuid().is_root() {
        bail!(
            "{} is a block device: run cairn as root (sudo)",
            path.display()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Listing block devices (`cairn disks`): read-only helpers over sysfs, udev and the mount table.
// ---------------------------------------------------------------------------------------------

/// The sysfs directory of a block device (/sys/devices/.../block/sda[/sda1]).
pub fn sysfs_dir_of(devno: (u32, u32)) -> Option<PathBuf> {
    sysfs_dir(devno)
}

/// The udev database's properties of a device (empty where udev does not run).
pub fn udev_properties(devno: (u32, u32)) -> Vec<(String, String)> {
    udev_props(devno)
}

/// Mount points of the filesystem on `devno`.
pub fn mount_points(devno: (u32, u32)) -> Vec<String> {
    mounted_devnos()
        .into_iter()
        .filter(|(d, _)| *d == devno)
        .map(|(_, p)| unescape_mount_path(&p))
        .collect()
}

/// True when `devno` is an active swap device.
pub fn is_swap(devno: (u32, u32)) -> bool {
    swap_devnos().contains(&devno)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sanitized() {
        assert_eq!(sanitize_name("disk-ATA WDC/123"), "disk-ATA-WDC-123");
        assert_eq!(sanitize_name("file-/var/tmp/x.img"), "file--var-tmp-x.img");
        assert_eq!(sanitize_name("///"), "source");
    }

    #[test]
    fn devtmpfs_is_told_apart_from_dev_shm() {
        assert!(on_devtmpfs(Path::new("/dev/cairn-no-such-disk")));
        assert!(!on_devtmpfs(Path::new("/dev/shm/cairn-target.img")));
        assert!(!on_devtmpfs(Path::new("/var/tmp/cairn-target.img")));
    }

    #[test]
    fn regular_files_probe_as_files() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(12345).unwrap();
        let info = DeviceInfo::probe(f.path()).unwrap();
        assert_eq!(info.kind, Kind::File);
        assert_eq!(info.size, 12345);
        assert!(info.in_use_reason().is_none());
    }
}
