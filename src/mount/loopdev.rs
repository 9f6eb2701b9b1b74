//! Read-only loop devices over the view's raw files, with the kernel's ioctls (the libc crate
//! does not define the loop ones): no losetup needed, and each device is set to clear itself
//! (LO_FLAGS_AUTOCLEAR) when its last user — the filesystem mounted on it — goes away.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;

/// `struct loop_info64` of <linux/loop.h>.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` of <linux/loop.h> (Linux 5.8+).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

/// An attached loop device, open; dropping the handle leaves the device to its users
/// (auto-clear detaches it once none is left).
pub struct LoopDevice {
    pub path: PathBuf,
    _file: File,
}

/// Attaches `backing` read-only to a free loop device with logical sectors of `block_size`
/// bytes (0: the kernel's default of 512).
pub fn attach(backing: &Path, block_size: u32) -> Result<LoopDevice> {
    let backing_file = File::open(backing)
        .with_context(|| format!("cannot open {} for a loop device", backing.display()))?;
    let ctl = File::open("/dev/loop-control")
        .context("cannot open /dev/loop-control (is the loop driver loaded?)")?;
    let config = loop_config(&backing_file, backing, block_size);
    // Another process can take the free device between GET_FREE and CONFIGURE (EBUSY): ask
    // again a bounded number of times.
    for _ in 0..16 {
        if let Some(dev) = configure_free(&ctl, &config, backing)? {
            return Ok(dev);
        }
    }
    bail!(
        "no free loop device for {}: others kept taking them",
        backing.display()
    )
}

/// A read-only, auto-clear configuration over `backing_file` (whose path the kernel shows in
/// sysfs, where `umount` finds it), reading it with direct I/O: the filesystem on the device
/// caches what it reads, so the view's own page cache would hold every byte a second time and
/// cost one more copy of each. The kernel falls back to buffered reads by itself where direct
/// I/O cannot be used.
fn loop_config(backing_file: &File, backing: &Path, block_size: u32) -> LoopConfig {
    let mut name = [0u8; LO_NAME_SIZE];
    let bytes = backing.as_os_str().as_encoded_bytes();
    let len = bytes.len().min(LO_NAME_SIZE - 1);
    name[..len].copy_from_slice(&bytes[..len]);
    LoopConfig {
        fd: backing_file.as_raw_fd() as u32,
        block_size,
        info: LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO,
            lo_file_name: name,
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        },
        reserved: [0; 8],
    }
}

/// Configures the loop device the kernel says is free; None when another process took it first.
fn configure_free(ctl: &File, config: &LoopConfig, backing: &Path) -> Result<Option<LoopDevice>> {
    // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number or -1.
    let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
    if n < 0 {
        return Err(std::io::Error::last_os_error())
            .context("no free loop device (LOOP_CTL_GET_FREE)");
    }
    let path = PathBuf::from(format!("/dev/loop{n}"));
    let dev = OpenOptions::new()
        .read(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which `config` is (layout checked
    // above), alive for the call; the kernel takes its own reference to the fd, which the
    // caller keeps open until then.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, config as *const LoopConfig) };
    if rc == 0 {
        return Ok(Some(LoopDevice { path, _file: dev }));
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EBUSY) {
        return Ok(None);
    }
    Err(err).with_context(|| {
        format!(
            "cannot attach {} to {} (LOOP_CONFIGURE)",
            backing.display(),
            path.display()
        )
    })
}

/// The file a loop device reads, from sysfs; None when it is not attached.
pub fn backing_file(loop_name: &str) -> Option<PathBuf> {
    let s = std::fs::read_to_string(format!("/sys/block/{loop_name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(s.trim_end_matches('\n')))
}

/// Every attached loop device whose backing file lies under `dir`, as /dev paths.
pub fn backed_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = rd
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("loop"))
        .filter(|n| backing_file(n).is_some_and(|b| b.starts_with(dir)))
        .map(|n| PathBuf::from(format!("/dev/{n}")))
        .collect();
    out.sort();
    out
}

/// Detaches a loop device (LOOP_CLR_FD). One still in use is marked to clear itself when its
/// last user closes it (the kernel does that for a busy device), so this never fails on a busy
/// device; one already detached is fine.
pub fn detach(dev: &Path) -> Result<()> {
    let f = match File::open(dev) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", dev.display())),
    };
    // SAFETY: LOOP_CLR_FD takes no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD, 0) } != 0 {
        let err = std::io::Error::last_os_error();
        // ENXIO: not attached (any more).
        if err.raw_os_error() != Some(libc::ENXIO) {
            return Err(err).with_context(|| format!("cannot detach {}", dev.display()));
        }
    }
    Ok(())
}
