//! Round trips of real block devices (loop devices) carrying real filesystems.
//! Requires root, losetup, mkfs.ext4/e2fsck, mkfs.vfat/fsck.vfat, sgdisk, partx.

mod common;

use common::*;
use std::path::Path;

/// Build a filesystem on a fresh loop device, fill it with files, then back
/// it up and restore it onto a second (garbage-filled) loop device of the
/// same size: device bytes, fsck and file contents must all match.
fn fs_roundtrip(kind: FsKind, size: u64, seed: u64) {
    require_root();
    let t = tempdir();
    let repo = t.path().join("repo");

    let src = LoopDev::new_zeroed(&t.path().join("src.img"), size);
    mkfs(kind, &src.dev);
    let files = fill_fs(kind, &src.dev, &t.path().join("fill"), seed);
    assert!(files.len() > 20, "populate_tree wrote too few files");
    let src_hash = hash_device(&src.dev);

    let b = backup(&src.dev, &repo, "fs", &[]);
    assert_eq!(b["bytes_read"].as_u64(), Some(size), "backup: {b}");

    // Target pre-filled with random garbage: zero regions of the image must
    // really be zeroed on the device.
    let dst = LoopDev::new_random(&t.path().join("dst.img"), size, seed + 999);
    let r = restore(&repo, &dst.dev, &["--yes"]);
    assert_eq!(id_of(&r), id_of(&b));
    assert_eq!(
        hash_device(&dst.dev),
        src_hash,
        "restored {kind:?} device differs from the source device"
    );
    fsck_clean(kind, &dst.dev);
    assert_eq!(
        read_fs(kind, &dst.dev, &t.path().join("readback")),
        files,
        "files on the restored {kind:?} filesystem differ"
    );
}

#[test]
fn loop_ext4_roundtrip() {
    fs_roundtrip(FsKind::Ext4, 128 * MIB, 100);
}

#[test]
fn loop_vfat_roundtrip() {
    fs_roundtrip(FsKind::Vfat, 96 * MIB, 200);
}

const SECTOR: u64 = 512;

/// GPT disk: p1 ext4 [1 MiB, 81 MiB), gap with random data, p2 vfat
/// [100 MiB, 180 MiB), random data after p2; 256 MiB total.
fn make_gpt_disk(t: &Path, seed: u64) -> LoopDev {
    let sgdisk = require_tool("sgdisk", "gdisk");
    let img = t.join("gpt.img");
    write_sparse_file(&img, 256 * MIB);
    run_tool(
        &sgdisk,
        &[
            "-o",
            "-n",
            "1:2048:+80M",
            "-t",
            "1:8300",
            "-n",
            &format!("2:{}:+80M", 100 * MIB / SECTOR),
            "-t",
            "2:0700",
            s(&img),
        ],
    );
    {
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        write_random_at(&f, 90 * MIB + 123, 4 * MIB + 77, seed); // gap between partitions
        write_random_at(&f, 200 * MIB, 3 * MIB, seed + 1); // after p2
        f.sync_all().unwrap();
    }
    let out = run_tool(&sgdisk, &["-v", s(&img)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("No problems found"),
        "test setup: GPT not clean: {text}"
    );
    LoopDev::attach(&img)
}

#[test]
fn loop_gpt_disk_roundtrip() {
    require_root();
    let t = tempdir();
    let repo = t.path().join("repo");
    let disk = make_gpt_disk(t.path(), 300);
    let p1 = disk.partition(1);
    let p2 = disk.partition(2);
    mkfs(FsKind::Ext4, &p1);
    mkfs(FsKind::Vfat, &p2);
    let files1 = fill_fs(FsKind::Ext4, &p1, &t.path().join("f1"), 301);
    let files2 = fill_fs(FsKind::Vfat, &p2, &t.path().join("f2"), 302);
    let src_hash = hash_device(&disk.dev);

    backup(&disk.dev, &repo, "gpt", &[]);

    let dst = LoopDev::new_random(&t.path().join("dst.img"), 256 * MIB, 303);
    restore(&repo, &dst.dev, &["--yes"]);
    assert_eq!(
        hash_device(&dst.dev),
        src_hash,
        "restored GPT disk differs from the source disk"
    );

    let sgdisk = require_tool("sgdisk", "gdisk");
    let out = run_tool(&sgdisk, &["-v", &dst.dev]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("No problems found"),
        "sgdisk -v on the restored disk: {text}"
    );

    // The restored partitions are usable.
    let q1 = dst.partition(1);
    let q2 = dst.partition(2);
    fsck_clean(FsKind::Ext4, &q1);
    fsck_clean(FsKind::Vfat, &q2);
    assert_eq!(
        read_fs(FsKind::Ext4, &q1, &t.path().join("r1")),
        files1,
        "ext4 partition files differ"
    );
    assert_eq!(
        read_fs(FsKind::Vfat, &q2, &t.path().join("r2")),
        files2,
        "vfat partition files differ"
    );
}

/// Back up a single partition device (/dev/loopNp1) and restore it to a file.
#[test]
fn loop_partition_to_file() {
    require_root();
    let sgdisk = require_tool("sgdisk", "gdisk");
    let t = tempdir();
    let img = t.path().join("disk.img");
    write_sparse_file(&img, 128 * MIB);
    run_tool(
        &sgdisk,
        &["-o", "-n", "1:2048:+60M", "-t", "1:8300", s(&img)],
    );
    let disk = LoopDev::attach(&img);
    let p1 = disk.partition(1);
    mkfs(FsKind::Ext4, &p1);
    fill_fs(FsKind::Ext4, &p1, &t.path().join("m"), 400);
    let part_size = size_of(Path::new(&p1));
    assert_eq!(part_size, 60 * MIB);
    let part_hash = hash_device(&p1);

    let repo = t.path().join("repo");
    let b = backup(&p1, &repo, "part", &[]);
    assert_eq!(b["bytes_read"].as_u64(), Some(part_size), "backup: {b}");

    let out = t.path().join("p1.restored");
    restore(&repo, s(&out), &[]);
    assert_eq!(size_of(&out), part_size, "restored file size");
    assert_eq!(
        hash_path(&out),
        part_hash,
        "restored partition bytes differ"
    );
    e2fsck_clean(s(&out));
}

/// Restoring onto a device larger than the image is allowed; the image's
/// range must match.
#[test]
fn loop_restore_to_larger_device() {
    require_root();
    let t = tempdir();
    let src = t.path().join("src.img");
    write_mixed_file(&src, 64 * MIB, 500);
    let repo = t.path().join("repo");
    backup(s(&src), &repo, "small", &[]);
    let dst = LoopDev::new_random(&t.path().join("dst.img"), 96 * MIB, 501);
    restore(&repo, &dst.dev, &["--yes"]);
    flush_bufs(&dst.dev);
    assert_eq!(
        hash_prefix(dst.path(), 64 * MIB),
        hash_path(&src),
        "first 64 MiB of the larger device differ from the image"
    );
}
