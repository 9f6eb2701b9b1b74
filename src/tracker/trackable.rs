//! Which disks the tracker can follow. It needs to see a write both queued and completed
//! (`block_rq_complete`, which only request-based devices emit — those with an `mq` directory in
//! sysfs). Bio-based devices (device-mapper, md, and others without `mq`) pass their writes on
//! to the disks under them, where completions happen under another device number; hidden NVMe
//! multipath paths carry the writes of their multipath head. Those are refused, naming what to
//! track instead. The one bio-based device that is followed is an NVMe multipath head, together
//! with its paths, where its writes complete.

use std::path::Path;

/// The hidden paths whose events belong to `name`, or why `name` cannot be tracked.
/// `sys_block` is /sys/block (a fake tree in tests).
pub fn classify(sys_block: &Path, name: &str) -> Result<Vec<String>, String> {
    let dir = sys_block.join(name);
    if !dir.is_dir() {
        return Err(format!("{name} is not in {}", sys_block.display()));
    }
    if let Some((subsys, _ctrl, ns)) = nvme_path_parts(name) {
        return Err(format!(
            "{name} is a hidden NVMe multipath path: its writes arrive through the multipath \
             head, track /dev/nvme{subsys}n{ns} instead"
        ));
    }
    if read_trimmed(&dir.join("hidden")).as_deref() == Some("1") {
        return Err(format!(
            "{name} is a hidden disk: its writes arrive through another device; track that one"
        ));
    }
    if dir.join("mq").is_dir() {
        return Ok(Vec::new());
    }
    if let Some((subsys, ns)) = nvme_head_parts(name) {
        let paths = nvme_paths(sys_block, subsys, ns);
        if !paths.is_empty() {
            return Ok(paths);
        }
    }
    let what = if dir.join("dm").is_dir() {
        let dm = read_trimmed(&dir.join("dm/name")).unwrap_or_default();
        format!("a device-mapper device ({dm})")
    } else if dir.join("md").is_dir() {
        "an md RAID device".to_string()
    } else {
        "a bio-based device".to_string()
    };
    let mut under: Vec<String> = std::fs::read_dir(dir.join("slaves"))
        .map(|d| {
            d.flatten()
                .map(|e| format!("/dev/{}", e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default();
    under.sort();
    let instead = if under.is_empty() {
        "it cannot be tracked; its backups compare-scan".to_string()
    } else {
        format!(
            "track the disks under it instead ({}; partitions are followed through their disk)",
            under.join(", ")
        )
    };
    Err(format!(
        "{name} is {what}, with no request queue (no {}): the tracker cannot see its writes \
         complete; {instead}",
        dir.join("mq").display()
    ))
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Splits "nvme<digits>" off the front; returns the digits and the rest.
fn digits_after<'a>(s: &'a str, prefix: &str) -> Option<(&'a str, &'a str)> {
    let rest = s.strip_prefix(prefix)?;
    let n = rest.bytes().take_while(u8::is_ascii_digit).count();
    (n > 0).then(|| rest.split_at(n))
}

/// nvme<S>c<C>n<N> → (S, C, N).
fn nvme_path_parts(name: &str) -> Option<(&str, &str, &str)> {
    let (s, rest) = digits_after(name, "nvme")?;
    let (c, rest) = digits_after(rest, "c")?;
    let (n, rest) = digits_after(rest, "n")?;
    rest.is_empty().then_some((s, c, n))
}

/// nvme<S>n<N> → (S, N).
fn nvme_head_parts(name: &str) -> Option<(&str, &str)> {
    let (s, rest) = digits_after(name, "nvme")?;
    let (n, rest) = digits_after(rest, "n")?;
    rest.is_empty().then_some((s, n))
}

fn nvme_paths(sys_block: &Path, subsys: &str, ns: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(sys_block)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| nvme_path_parts(n).is_some_and(|(s, _, x)| s == subsys && x == ns))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn disk(root: &Path, name: &str, dirs: &[&str], files: &[(&str, &str)]) {
        fs::create_dir_all(root.join(name)).unwrap();
        for d in dirs {
            fs::create_dir_all(root.join(name).join(d)).unwrap();
        }
        for (f, v) in files {
            fs::write(root.join(name).join(f), v).unwrap();
        }
    }

    #[test]
    fn request_based_disks_are_tracked_and_bio_based_ones_refused_naming_what_to_track() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        disk(r, "sda", &["mq", "queue", "slaves"], &[("hidden", "0\n")]);
        disk(r, "loop3", &["mq", "queue"], &[]);
        disk(
            r,
            "dm-0",
            &["queue", "dm", "slaves/sdb", "slaves/sdc"],
            &[("dm/name", "vg-root\n")],
        );
        disk(
            r,
            "md127",
            &["queue", "md", "slaves/sdd1", "slaves/sde1"],
            &[],
        );
        disk(r, "zram0", &["queue", "slaves"], &[]);
        // NVMe multipath: a bio-based head and its hidden, request-based paths.
        disk(r, "nvme0n1", &["queue"], &[("hidden", "0\n")]);
        disk(r, "nvme0c0n1", &["mq", "queue"], &[("hidden", "1\n")]);
        disk(r, "nvme0c1n1", &["mq", "queue"], &[("hidden", "1\n")]);
        disk(r, "nvme0c1n2", &["mq", "queue"], &[("hidden", "1\n")]);
        disk(r, "nvme1n1", &["mq", "queue"], &[]);

        assert_eq!(classify(r, "sda"), Ok(vec![]));
        assert_eq!(classify(r, "loop3"), Ok(vec![]));
        assert_eq!(classify(r, "nvme1n1"), Ok(vec![]), "a plain NVMe namespace");
        assert_eq!(
            classify(r, "nvme0n1"),
            Ok(vec!["nvme0c0n1".to_string(), "nvme0c1n1".to_string()]),
            "a multipath head is followed through its paths of the same namespace"
        );
        let e = classify(r, "dm-0").unwrap_err();
        assert!(e.contains("device-mapper") && e.contains("vg-root"), "{e}");
        assert!(e.contains("/dev/sdb, /dev/sdc"), "{e}");
        let e = classify(r, "md127").unwrap_err();
        assert!(
            e.contains("md RAID") && e.contains("/dev/sdd1, /dev/sde1"),
            "{e}"
        );
        let e = classify(r, "zram0").unwrap_err();
        assert!(
            e.contains("bio-based") && e.contains("cannot be tracked"),
            "{e}"
        );
        let e = classify(r, "nvme0c1n1").unwrap_err();
        assert!(e.contains("hidden NVMe multipath path"), "{e}");
        assert!(e.contains("/dev/nvme0n1"), "{e}");
        assert!(classify(r, "sdz").is_err());
    }

    #[test]
    fn nvme_names() {
        assert_eq!(nvme_path_parts("nvme12c3n45"), Some(("12", "3", "45")));
        assert_eq!(nvme_path_parts("nvme0n1"), None);
        assert_eq!(nvme_path_parts("nvme0c1n1p2"), None);
        assert_eq!(nvme_head_parts("nvme0n1"), Some(("0", "1")));
        assert_eq!(nvme_head_parts("nvme0n1p1"), None);
        assert_eq!(nvme_head_parts("nvmen1"), None);
    }
}
