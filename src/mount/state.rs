//! What a mount set up, kept outside the view (/run/cairn/mounts) so `cairn umount` can undo it
//! even after the serving process was killed: the view is then dead and cannot be read.
//!
//! The record is a help, not the truth: `umount` also finds the mounts below DIR in
//! /proc/self/mountinfo and the loop devices reading files below DIR in sysfs, so a kill between
//! a step and its record leaves nothing it cannot find.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const RUN_DIR: &str = "/run/cairn/mounts";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub dir: PathBuf,
    pub pid: u32,
    /// The serving process's start time (field 22 of /proc/PID/stat), so a reused pid is not
    /// mistaken for it.
    pub start_time: u64,
    pub image: String,
    pub log: Option<PathBuf>,
    /// The repository, canonical (absent in records of older versions).
    #[serde(default)]
    pub repo: Option<PathBuf>,
}

/// The record's path for the mount at `dir` (an absolute, canonical path).
pub fn path_for(dir: &Path) -> PathBuf {
    let h = blake3::hash(dir.as_os_str().as_encoded_bytes());
    Path::new(RUN_DIR).join(format!("{}.json", &h.to_hex()[..16]))
}

pub fn log_path_for(dir: &Path) -> PathBuf {
    path_for(dir).with_extension("log")
}

pub fn write(state: &State) -> Result<()> {
    std::fs::create_dir_all(RUN_DIR).with_context(|| format!("cannot create {RUN_DIR}"))?;
    let path = path_for(&state.dir);
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_string_pretty(state).expect("serialisable");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))
}

pub fn read(dir: &Path) -> Option<State> {
    let bytes = std::fs::read(path_for(dir)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Every record in the run directory.
pub fn all() -> Vec<State> {
    let Ok(rd) = std::fs::read_dir(RUN_DIR) else {
        return Vec::new();
    };
    rd.flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| serde_json::from_slice(&std::fs::read(p).ok()?).ok())
        .collect()
}

pub fn remove(dir: &Path) {
    let _ = std::fs::remove_file(path_for(dir));
}

/// A running process's start time in clock ticks since boot; None when it does not exist or
/// has exited (a zombie not yet reaped).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let mut rest = stat[stat.rfind(')')? + 1..].split_whitespace();
    if matches!(rest.next(), Some("Z" | "X")) {
        return None;
    }
    rest.nth(18)?.parse().ok()
}

/// True when the record's process is still the one that wrote it.
pub fn server_alive(s: &State) -> bool {
    start_time(s.pid) == Some(s.start_time)
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let digit = |k: usize| u32::from(b[i + k] - b'0');
            out.push((digit(1) * 64 + digit(2) * 8 + digit(3)) as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount_point = unescape(left.split(' ').nth(4)?);
            let mut r = right.split(' ');
            Some(MountEntry {
                mount_point: PathBuf::from(mount_point),
                fstype: r.next()?.to_string(),
                source: unescape(r.next()?),
            })
        })
        .collect()
}

pub fn mounts() -> Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    Ok(parse_mountinfo(&text))
}

/// True for the FUSE view of a cairn mount.
pub fn is_view(m: &MountEntry) -> bool {
    m.fstype.starts_with("fuse") && m.source.starts_with("cairn:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let text =
            "36 35 98:0 / /mnt/a\\040b rw,noatime shared:1 - fuse.cairn cairn:abc ro,user_id=0\n\
                    37 36 7:0 / /mnt/a\\040b/p1 ro,relatime - ext4 /dev/loop0 ro,norecovery\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/a b"));
        assert!(is_view(&m[0]));
        assert_eq!(m[1].fstype, "ext4");
        assert_eq!(m[1].source, "/dev/loop0");
        assert!(!is_view(&m[1]));
    }

    #[test]
    fn own_start_time() {
        assert!(start_time(std::process::id()).is_some());
    }
}
