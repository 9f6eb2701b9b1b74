//! `cairn umount DIR`: ends a mount, also one whose serving process was killed.

use super::{absolute_dir, filesystems, loopdev, state};
use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::Signal;
use serde::Serialize;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// How long `umount` waits for the serving process to end once its filesystems are gone.
const SERVER_EXIT_TIMEOUT_MS: i32 = 30_000;

#[derive(Debug, Clone, Serialize)]
pub struct UmountReport {
    pub dir: PathBuf,
    /// The serving process was gone already (killed) and its leftovers were cleared.
    pub server_was_dead: bool,
}

/// Ends the cairn mount at `dir`: its filesystems, its loop devices, its view — also when the
/// serving process was killed and left them behind.
pub fn umount(dir: &Path) -> Result<UmountReport> {
    let dir = absolute_dir(dir)?;
    let st = state::read(&dir);
    if !view_mounted(&dir)? && st.is_none() {
        bail!("{} is not a cairn mount", dir.display());
    }
    let alive = st.as_ref().filter(|s| state::server_alive(s));
    release_below(&dir, alive.is_some())?;
    // The view goes here, not in the server: a busy one (a VM booted from DIR/disk, a shell in
    // DIR) is refused at once and keeps serving, and the server then ends on its own.
    if view_mounted(&dir)? {
        unmount_view(&dir)?;
    }
    if let Some(s) = alive {
        end_server(s)?;
    }
    if let Some(log) = st.as_ref().and_then(|s| s.log.as_ref()) {
        let _ = std::fs::remove_file(log);
    }
    state::remove(&dir);
    Ok(UmountReport {
        dir,
        server_was_dead: st.is_some() && alive.is_none(),
    })
}

fn unmount_view(dir: &Path) -> Result<()> {
    match nix::mount::umount2(dir, nix::mount::MntFlags::empty()) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => bail!(
            "{} is busy: a process has a file open there (`fuser -vm {}` names it; a VM booted \
             from DIR/disk must be stopped first); close it and run `cairn umount {}` again",
            dir.display(),
            dir.display(),
            dir.display()
        ),
        Err(e) => Err(anyhow!(e).context(format!("cannot unmount the view at {}", dir.display()))),
    }
}

fn view_mounted(dir: &Path) -> Result<bool> {
    Ok(state::mounts()?
        .iter()
        .any(|m| m.mount_point == dir && state::is_view(m)))
}

/// The filesystems and loop devices below `dir`, gone.
fn release_below(dir: &Path, server_alive: bool) -> Result<()> {
    match filesystems::release(dir) {
        Ok(()) => Ok(()),
        // Below a dead view the mount points cannot be looked up any more: detach the whole
        // tree at once; each filesystem goes when its last user does, then its loop device.
        Err(e) if !server_alive && is_unreachable(&e) => {
            nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH)
                .with_context(|| format!("cannot detach {}", dir.display()))?;
            for dev in loopdev::backed_under(dir) {
                loopdev::detach(&dev)?;
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn is_unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<nix::errno::Errno>()
            .is_some_and(|e| matches!(e, nix::errno::Errno::ENOTCONN | nix::errno::Errno::ENOENT))
    })
}

/// Asks the serving process to end (SIGTERM) and waits for it, bounded.
fn end_server(s: &state::State) -> Result<()> {
    let pid = i32::try_from(s.pid).context("pid out of range")?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        // Gone between the check and now.
        return Ok(());
    }
    // SAFETY: fd was just returned by pidfd_open and is owned by nothing else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM)
        .with_context(|| format!("cannot signal the serving process {pid}"))?;
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, SERVER_EXIT_TIMEOUT_MS) };
    if n == 0 {
        bail!(
            "the serving process {pid} did not end within {} s; its log: {}",
            SERVER_EXIT_TIMEOUT_MS / 1000,
            s.log
                .as_ref()
                .map(|l| l.display().to_string())
                .unwrap_or_else(|| "its stderr".into())
        );
    }
    Ok(())
}
