//! Refusals: restore must refuse dangerous targets and write NOTHING to them;
//! concurrent backups must not corrupt a repository; bad input is an error
//! (exit 1, one line), never a panic.

mod common;

use common::*;
use std::fs;
use std::path::Path;
use std::thread;
use std::time::Duration;

/// Backup a fresh mixed-content file of `size` bytes into `repo`.
fn backed_up_source(t: &Path, repo: &Path, size: u64, seed: u64) -> std::path::PathBuf {
    let src = t.join(format!("source-{seed}.img"));
    write_mixed_file(&src, size, seed);
    backup(s(&src), repo, "src", &[]);
    src
}

#[test]
fn refuse_restore_to_smaller_device() {
    require_root();
    let t = tempdir();
    let repo = t.path().join("repo");
    let src_size = 96 * MIB;
    let dst_size = 64 * MIB;
    backed_up_source(t.path(), &repo, src_size, 1);
    let dst = LoopDev::new_random(&t.path().join("dst.img"), dst_size, 2);
    let before = hash_device(&dst.dev);

    let out = cairn(&["restore", s(&repo), &dst.dev, "--yes"]);
    out.error();
    let line = out.error_line();
    assert!(
        mentions_number(&line, src_size) && mentions_number(&line, dst_size),
        "error must contain both sizes in bytes ({src_size} and {dst_size}):\n{}",
        out.describe()
    );
    assert_eq!(
        hash_device(&dst.dev),
        before,
        "refused restore modified the device"
    );
}

#[test]
fn refuse_restore_to_mounted_device() {
    require_root();
    let t = tempdir();
    let repo = t.path().join("repo");
    let size = 64 * MIB;
    backed_up_source(t.path(), &repo, size, 3);

    let dst = LoopDev::new_zeroed(&t.path().join("dst.img"), size);
    mkfs_ext4(&dst.dev);
    let m = Mount::new(&dst.dev, &t.path().join("mnt"), None);
    populate_tree(&m.dir, 4);
    let files = hash_tree(&m.dir);

    let out = cairn(&["restore", s(&repo), &dst.dev, "--yes"]);
    out.error();

    assert_eq!(hash_tree(&m.dir), files, "mounted filesystem changed");
    m.unmount();
    e2fsck_clean(&dst.dev);
    let m = Mount::new(&dst.dev, &t.path().join("mnt2"), Some("ro"));
    assert_eq!(
        hash_tree(&m.dir),
        files,
        "filesystem content changed after refused restore"
    );
}

#[test]
fn refuse_restore_to_device_holding_repo() {
    require_root();
    let t = tempdir();
    let dev = LoopDev::new_zeroed(&t.path().join("repo-disk.img"), 128 * MIB);
    mkfs_ext4(&dev.dev);
    let m = Mount::new(&dev.dev, &t.path().join("mnt"), None);
    let repo = m.dir.join("repo");
    let src = t.path().join("source.img");
    write_mixed_file(&src, 8 * MIB + 3, 5);
    backup(s(&src), &repo, "inside", &[]);

    let out = cairn(&["restore", s(&repo), &dev.dev, "--yes"]);
    out.error();

    // Repository and filesystem survive.
    cairn(&["verify", s(&repo)]).ok();
    let back = t.path().join("restored.img");
    restore(&repo, s(&back), &[]);
    assert_same_content(&src, &back);
    m.unmount();
    e2fsck_clean(&dev.dev);
}

#[test]
fn refuse_block_device_without_yes_when_not_a_tty() {
    require_root();
    let t = tempdir();
    let repo = t.path().join("repo");
    let size = 64 * MIB;
    backed_up_source(t.path(), &repo, size, 6);
    let dst = LoopDev::new_random(&t.path().join("dst.img"), size, 7);
    let before = hash_device(&dst.dev);

    // stdin is /dev/null (see common::cairn)
    let out = cairn(&["restore", s(&repo), &dst.dev]);
    out.error();
    assert!(
        out.error_line().contains("--yes"),
        "refusal must mention --yes:\n{}",
        out.describe()
    );
    assert_eq!(
        hash_device(&dst.dev),
        before,
        "refused restore modified the device"
    );
}

#[test]
fn refuse_nonexistent_dev_path() {
    let t = tempdir();
    let repo = t.path().join("repo");
    backed_up_source(t.path(), &repo, 2 * MIB + 1, 8);
    let name = format!("/dev/cairn-does-not-exist-{}", std::process::id());
    let target = Path::new(&name);
    assert!(!target.exists());
    let out = cairn(&["restore", s(&repo), &name, "--yes"]);
    out.error();
    let created = target.exists();
    if created {
        let _ = fs::remove_file(target);
    }
    assert!(
        !created,
        "restore created {name} (a regular file under /dev must never be created)"
    );
}

#[test]
fn refuse_missing_segment_on_block_device() {
    require_root();
    let t = tempdir();
    let repo = t.path().join("repo");
    let size = 64 * MIB;
    let src = t.path().join("source.img");
    write_random_file(&src, size, 9);
    let id = id_of(&backup(s(&src), &repo, "src", &["--segment-size", "8M"]));
    let segs = segment_files(&image_dir(&repo, &id));
    assert!(segs.len() >= 4, "expected several segments: {segs:?}");
    // Remove a segment in the middle: a restore that does not check first
    // would already have written the beginning.
    fs::remove_file(&segs[segs.len() / 2]).unwrap();

    let dst = LoopDev::new_random(&t.path().join("dst.img"), size, 10);
    let before = hash_device(&dst.dev);
    let out = cairn(&["restore", s(&repo), &dst.dev, "--yes"]);
    out.error();
    assert_eq!(
        hash_device(&dst.dev),
        before,
        "restore of an image with a missing segment modified the device"
    );
}

#[test]
fn refuse_non_repository_directory() {
    let t = tempdir();
    let dir = t.path().join("not-a-repo");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("precious.txt"), b"do not touch").unwrap();
    let src = t.path().join("source.img");
    write_random_file(&src, MIB, 11);

    let out = cairn(&["backup", s(&src), s(&dir), "--name", "x"]);
    out.error();
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec!["precious.txt"],
        "non-repository dir was modified"
    );
    assert_eq!(fs::read(dir.join("precious.txt")).unwrap(), b"do not touch");
}

#[test]
fn backup_of_nonexistent_source_is_one_line_error() {
    let t = tempdir();
    let repo = t.path().join("repo");
    let out = cairn(&["backup", "/nonexistent", s(&repo), "--name", "x"]);
    out.error();
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one line on stderr:\n{}",
        out.describe()
    );
    assert!(lines[0].starts_with("cairn: error:"));
}

#[test]
fn usage_errors_exit_2() {
    let out = cairn(&["frobnicate"]);
    assert_eq!(
        out.code(),
        Some(2),
        "unknown subcommand:\n{}",
        out.describe()
    );
    let out = cairn(&["backup"]);
    assert_eq!(
        out.code(),
        Some(2),
        "missing arguments:\n{}",
        out.describe()
    );
    let out = cairn(&["backup", "a", "b", "--segment-size", "lots"]);
    assert!(
        matches!(out.code(), Some(1) | Some(2)),
        "bad size must be a clean error:\n{}",
        out.describe()
    );
}

/// Two backups into one repository at once: the second either fails with a
/// message about the lock, or waits; either way the repository ends up valid.
#[test]
fn concurrent_backups_are_serialised_by_the_lock() {
    let t = tempdir();
    let repo = t.path().join("repo");
    let big = t.path().join("big.img");
    write_random_file(&big, 256 * MIB, 12);
    let small = t.path().join("small.img");
    write_mixed_file(&small, 4 * MIB + 5, 13);

    let mut first = Bg::spawn(
        &["backup", s(&big), s(&repo), "--name", "big", "--json"],
        t.path(),
        "first",
    );
    // Poll (real condition): the first backup's in-progress dir exists.
    loop {
        if !dir_entries(&repo.join("tmp")).is_empty() {
            break;
        }
        if !first.running() {
            let out = first.finish();
            panic!(
                "first backup ended before its REPO/tmp entry was observed:\n{}",
                out.describe()
            );
        }
        thread::sleep(Duration::from_millis(1));
    }
    let second = cairn(&["backup", s(&small), s(&repo), "--name", "small", "--json"]);
    let first = first.finish();
    first.ok();

    if second.status.success() {
        // It waited for the lock.
        second.json();
    } else {
        second.error();
        second.assert_mentions("lock");
    }

    let v = cairn(&["verify", s(&repo), "--json"]);
    v.ok();
    assert_eq!(v.json()["ok"], true);
    assert!(
        dir_entries(&repo.join("tmp")).is_empty(),
        "REPO/tmp not empty after both backups ended"
    );
    let dst = t.path().join("big.restored");
    restore(&repo, s(&dst), &["--name", "big"]);
    assert_same_content(&big, &dst);
}
