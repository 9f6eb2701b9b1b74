//! The filesystems mounted from the view's raw files (through loop devices), and taking them
//! down again.

use super::layout::Part;
use super::{loopdev, probe, state, PartReport};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

/// Mounts every partition this machine can mount read-only below `dir` (the view, serving) and
/// says for each where it is, or why it stays raw.
pub fn mount_parts(dir: &Path, parts: &[Part], sector_size: u32, raw: bool) -> Vec<PartReport> {
    parts
        .iter()
        .map(|p| mount_one(dir, p, sector_size, raw))
        .collect()
}

fn mount_one(dir: &Path, p: &Part, sector_size: u32, raw: bool) -> PartReport {
    let mounted = match &p.mounter {
        Ok(how) => {
            let target = dir.join(&p.name);
            match mount_part(&dir.join(&p.raw_rel), &target, how, sector_size) {
                Ok(()) => Ok(target),
                Err(e) => Err(format!(
                    "mounting it failed ({e:#}); its bytes are {}",
                    dir.join(&p.raw_rel).display()
                )),
            }
        }
        Err(why) => Err(why.clone()),
    };
    // Where its raw bytes are shown: DIR/pN itself when it is not mounted there.
    let raw_file = match (&mounted, p.number) {
        (Err(_), Some(_)) => dir.join(&p.name),
        _ => dir.join(&p.raw_rel),
    };
    let (mounted, note) = match mounted {
        Ok(t) => (Some(t), None),
        Err(n) if raw => (None, (n != "--raw").then_some(n)),
        Err(n) => (
            None,
            Some(n.replace("FILE", &raw_file.display().to_string())),
        ),
    };
    PartReport {
        number: p.number,
        start: p.start,
        size: p.size,
        raw_file,
        filesystem: p.fs.name().to_string(),
        mounted,
        note,
    }
}

/// Loop-attaches `raw` (a file of the view) read-only and mounts its filesystem on `target`.
fn mount_part(raw: &Path, target: &Path, how: &probe::Mounter, sector_size: u32) -> Result<()> {
    use nix::mount::MsFlags;
    let dev = loopdev::attach(raw, sector_size)?;
    match how {
        probe::Mounter::Kernel { fstype, data } => {
            nix::mount::mount(
                Some(&dev.path),
                target,
                Some(*fstype),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                (!data.is_empty()).then_some(*data),
            )
            .with_context(|| {
                format!(
                    "mount -t {fstype} -o ro{}{data} {} {}",
                    if data.is_empty() { "" } else { "," },
                    dev.path.display(),
                    target.display()
                )
            })?;
        }
        probe::Mounter::Ntfs3g(prog) => {
            let out = std::process::Command::new(prog)
                .args(["-o", "ro,nosuid,nodev"])
                .arg(&dev.path)
                .arg(target)
                .stdin(std::process::Stdio::null())
                .output()
                .with_context(|| format!("cannot run {}", prog.display()))?;
            if !out.status.success() {
                bail!(
                    "ntfs-3g failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
    }
    // The mount holds the device now; auto-clear detaches it when the mount goes.
    drop(dev);
    Ok(())
}

/// Unmounts every filesystem mounted below `dir` (deepest first) and detaches every loop device
/// reading a file below it. A busy filesystem stops it with a message saying so; nothing is
/// detached lazily.
pub fn release(dir: &Path) -> Result<()> {
    let mut below: Vec<PathBuf> = state::mounts()?
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p != dir && p.starts_with(dir))
        .collect();
    below.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    below.dedup();
    for p in &below {
        if let Err(e) = nix::mount::umount2(p, nix::mount::MntFlags::empty()) {
            match e {
                // Unmounted meanwhile.
                nix::errno::Errno::EINVAL => {}
                nix::errno::Errno::EBUSY => bail!(
                    "{} is busy: a process has files open there (`fuser -vm {}` names it); close them and run `cairn umount {}` again",
                    p.display(),
                    p.display(),
                    dir.display()
                ),
                e => return Err(anyhow!(e).context(format!("cannot unmount {}", p.display()))),
            }
        }
    }
    for dev in loopdev::backed_under(dir) {
        loopdev::detach(&dev)?;
    }
    Ok(())
}
