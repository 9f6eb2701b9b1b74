//! The kernel instances trackers leave behind. A clean stop keeps its instance buffering so a
//! restart loses nothing; but an instance nobody will resume traces every write of its disks
//! into megabytes per CPU until reboot. Each instance's name records its state directory, so
//! `tracker status` can tell, for every `cairn-*` instance, whether a tracker reads it, whether a
//! restart would continue from it, or whether it is an orphan that `tracker reset --orphans`
//! removes.

use super::tracefs;
use anyhow::{Context, Result};
use serde::Serialize;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub const PREFIX: &str = "cairn-";
/// Longer names fall back to a hash, which names no directory (NAME_MAX is 255).
const MAX_NAME: usize = 255;

/// Bytes that stand for themselves in an instance name; '/' is written '+', every other byte
/// as %XX, so the state directory can be read back from the name.
fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// The instance of a state directory: `cairn-` and its absolute canonical path encoded.
pub fn name_for(state_dir: &Path) -> String {
    let dir = std::fs::canonicalize(state_dir)
        .or_else(|_| std::path::absolute(state_dir))
        .unwrap_or_else(|_| state_dir.to_path_buf());
    let bytes = dir.as_os_str().as_encoded_bytes();
    let mut name = String::from(PREFIX);
    for &b in bytes {
        match b {
            b'/' => name.push('+'),
            b if plain(b) => name.push(b as char),
            b => name.push_str(&format!("%{b:02X}")),
        }
    }
    if name.len() > MAX_NAME {
        return format!("{PREFIX}h{}", &blake3::hash(bytes).to_hex()[..24]);
    }
    name
}

/// The state directory an instance name records, if it records one.
pub fn state_dir_of(name: &str) -> Option<PathBuf> {
    let enc = name.strip_prefix(PREFIX)?.as_bytes();
    if enc.first() != Some(&b'+') {
        return None;
    }
    let mut out = Vec::with_capacity(enc.len());
    let mut i = 0;
    while i < enc.len() {
        match enc[i] {
            b'+' => out.push(b'/'),
            b'%' => {
                let hex = std::str::from_utf8(enc.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b if plain(b) => out.push(b),
            _ => return None,
        }
        i += 1;
    }
    let s = String::from_utf8(out).ok()?;
    Some(PathBuf::from(s))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// A tracker reads it or is starting on it.
    InUse,
    /// Its tracker stopped cleanly; a restart continues from it without a gap.
    Kept,
    /// Nothing will ever read it again.
    Orphaned,
}

#[derive(Debug, Clone, Serialize)]
pub struct InstanceStatus {
    pub name: String,
    pub state_dir: Option<String>,
    /// Processes that hold its buffers open.
    pub readers: Vec<u32>,
    pub verdict: Verdict,
    pub why: String,
}

/// Every `cairn-*` instance, judged. `own` is the caller's state directory, which also claims
/// its instance when the name is a hash.
pub fn list(own: &Path) -> Result<Vec<InstanceStatus>> {
    let dir = Path::new(tracefs::TRACEFS).join("instances");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        // No tracefs (or no permission to look): there is nothing of ours to report.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let own_name = name_for(own);
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(PREFIX))
        .collect();
    names.sort();
    let readers = readers_by_instance(&dir, &names);
    Ok(names
        .into_iter()
        .map(|name| {
            let state_dir =
                state_dir_of(&name).or_else(|| (name == own_name).then(|| own.to_path_buf()));
            let readers = readers.get(&name).cloned().unwrap_or_default();
            let (verdict, why) = judge(state_dir.as_deref(), &readers);
            InstanceStatus {
                name,
                state_dir: state_dir.map(|d| d.display().to_string()),
                readers,
                verdict,
                why,
            }
        })
        .collect())
}

fn judge(state_dir: Option<&Path>, readers: &[u32]) -> (Verdict, String) {
    if !readers.is_empty() {
        let pids: Vec<String> = readers.iter().map(u32::to_string).collect();
        return (Verdict::InUse, format!("read by pid {}", pids.join(", ")));
    }
    let Some(dir) = state_dir else {
        return (
            Verdict::Orphaned,
            "no tracker reads it and its name records no state directory (left by an older cairn?)"
                .into(),
        );
    };
    if let Some(pid) = super::daemon::lock_holder(dir) {
        return (
            Verdict::InUse,
            format!("the tracker of {} (pid {pid}) holds it", dir.display()),
        );
    }
    if !dir.is_dir() {
        return (
            Verdict::Orphaned,
            format!("its state directory {} is gone", dir.display()),
        );
    }
    match super::daemon::resumable(dir) {
        Ok(()) => (
            Verdict::Kept,
            format!(
                "the tracker of {} stopped cleanly; its restart continues from here",
                dir.display()
            ),
        ),
        Err(why) => (
            Verdict::Orphaned,
            format!(
                "no tracker reads it and a restart would not resume it: {why}; {}",
                dir.display()
            ),
        ),
    }
}

/// Which processes hold files of which instance open, from /proc/*/fd.
fn readers_by_instance(
    instances: &Path,
    names: &[String],
) -> std::collections::BTreeMap<String, Vec<u32>> {
    let mut out: std::collections::BTreeMap<String, Vec<u32>> = Default::default();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Ok(rest) = target.strip_prefix(instances) else {
                continue;
            };
            let Some(name) = rest.components().next() else {
                continue;
            };
            let name = name.as_os_str().to_string_lossy();
            if names.iter().any(|n| *n == name) {
                let pids = out.entry(name.into_owned()).or_default();
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
    }
    out
}

/// The pid holding a flock on `lock`, from /proc/locks (read without taking the lock, so a
/// tracker starting at this moment is not refused).
pub fn flock_holder(lock: &Path) -> Option<u32> {
    let meta = std::fs::metadata(lock).ok()?;
    let dev = meta.dev();
    let want = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 12625 fe:00:1081395 0 EOF"
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str()))
            .then(|| f.get(4)?.parse().ok())
            .flatten()
    })
}

/// Removes every orphaned instance; returns what was removed.
pub fn remove_orphans(own: &Path) -> Result<Vec<InstanceStatus>> {
    let mut removed = Vec::new();
    for i in list(own)? {
        if i.verdict == Verdict::Orphaned {
            tracefs::remove_instance(&Path::new(tracefs::TRACEFS).join("instances").join(&i.name))?;
            removed.push(i);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_record_their_state_directory() {
        for dir in [
            "/var/lib/cairn",
            "/tmp/.tmpAb12/state",
            "/srv/a b+c%d/é",
            "/",
        ] {
            let n = name_for(Path::new(dir));
            assert!(n.starts_with(PREFIX) && !n.contains('/'), "{n}");
            assert_eq!(state_dir_of(&n), Some(PathBuf::from(dir)), "{n}");
        }
        assert_eq!(
            name_for(Path::new("/var/lib/cairn")),
            "cairn-+var+lib+cairn"
        );
        let long = format!("/{}", "x".repeat(300));
        let n = name_for(Path::new(&long));
        assert!(n.len() < 64 && state_dir_of(&n).is_none(), "{n}");
        // Names of older versions (a bare hash) record nothing.
        assert_eq!(state_dir_of("cairn-0123456789ab"), None);
        assert_eq!(state_dir_of("cairn-+bad%zz"), None);
    }
}
