//! Replacement drives: whole-disk GPT images restored onto larger and smaller loop devices (with
//! the GPT backup relocated and checked by `sgdisk -v`), `--grow-last-partition`, `--partition N`,
//! sector-size mismatches, `--verify`; the partition table in `list`/`show`; `cairn disks`; and the
//! backup-side safety checks (repository on the source, mounted source).
//! Requires root, losetup, sgdisk, sfdisk, mkfs.ext4/e2fsck/resize2fs, blkid, partx.

mod common;

use common::gpt::*;
use common::*;
use serde_json::Value;
use std::path::Path;

/// Source disk, 256 MiB, 512-byte sectors: p1 ext4 [1 MiB, 81 MiB), random data in the gap at
/// 90 MiB, p2 ext4 [100 MiB, 180 MiB), random data outside the partitions at [185 MiB, 187 MiB).
/// Returns the loop device and the files written to each filesystem.
struct SourceDisk {
    disk: LoopDev,
    files1: std::collections::BTreeMap<String, String>,
    files2: std::collections::BTreeMap<String, String>,
    p1: GptPart,
    p2: GptPart,
}

const SRC_SIZE: u64 = 256 * MIB;

fn source_disk(t: &Path, seed: u64) -> SourceDisk {
    require_root();
    let img = t.join("src.img");
    write_sparse_file(&img, SRC_SIZE);
    sgdisk(&[
        "-o",
        "-n",
        "1:2048:+80M",
        "-t",
        "1:8300",
        "-c",
        "1:system",
        "-n",
        &format!("2:{}:+80M", 100 * MIB / SECTOR),
        "-t",
        "2:8300",
        "-c",
        "2:data",
        s(&img),
    ]);
    {
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        write_random_at(&f, 90 * MIB + 4096, 3 * MIB, seed);
        write_random_at(&f, 185 * MIB, 2 * MIB, seed + 1);
        f.sync_all().unwrap();
    }
    assert_gpt_valid(s(&img));
    let disk = LoopDev::attach(&img);
    let q1 = disk.partition(1);
    let q2 = disk.partition(2);
    mkfs(FsKind::Ext4, &q1);
    mkfs(FsKind::Ext4, &q2);
    let files1 = fill_fs(FsKind::Ext4, &q1, &t.join("fill1"), seed + 2);
    let files2 = fill_fs(FsKind::Ext4, &q2, &t.join("fill2"), seed + 3);
    let p1 = gpt_part(&disk.dev, 1);
    let p2 = gpt_part(&disk.dev, 2);
    flush_bufs(&disk.dev);
    SourceDisk {
        disk,
        files1,
        files2,
        p1,
        p2,
    }
}

fn part_range(p: &GptPart) -> (u64, u64) {
    (
        p.first_lba * SECTOR,
        (p.last_lba - p.first_lba + 1) * SECTOR,
    )
}

/// Every byte of both source partitions, and the data in the gap, are on the target at the same
/// offsets; the partitions keep their UUIDs and types; both filesystems are clean and hold the files.
fn assert_partitions_restored(src: &SourceDisk, dst: &LoopDev, t: &Path, tag: &str) {
    flush_bufs(&src.disk.dev);
    flush_bufs(&dst.dev);
    for (n, p) in [(1, &src.p1), (2, &src.p2)] {
        let (off, len) = part_range(p);
        assert_eq!(
            hash_range(dst.path(), off, len),
            hash_range(src.disk.path(), off, len),
            "{tag}: partition {n}'s bytes differ on the target"
        );
        let q = gpt_part(&dst.dev, n);
        assert_eq!(q.uuid, p.uuid, "{tag}: partition {n} lost its PARTUUID");
        assert_eq!(q.type_guid, p.type_guid, "{tag}: partition {n} type");
        assert_eq!(q.first_lba, p.first_lba, "{tag}: partition {n} start");
    }
    assert_eq!(
        hash_range(dst.path(), 90 * MIB, 4 * MIB),
        hash_range(src.disk.path(), 90 * MIB, 4 * MIB),
        "{tag}: the data between the partitions differs"
    );
    assert_eq!(
        gpt_disk_guid(&dst.dev),
        gpt_disk_guid(&src.disk.dev),
        "{tag}: disk GUID"
    );
    let q1 = dst.partition(1);
    e2fsck_clean(&q1);
    assert_eq!(
        read_fs(FsKind::Ext4, &q1, &t.join(format!("{tag}-r1"))),
        src.files1,
        "{tag}: files on partition 1"
    );
}

/// The GPT backup header is in the target's last sector and names the primary at LBA 1.
fn assert_backup_header_at_end(dev: &LoopDev, sector: u64) {
    flush_bufs(&dev.dev);
    let size = dev.size();
    let mut h = [0u8; 92];
    let f = std::fs::File::open(dev.path()).unwrap();
    use std::os::unix::fs::FileExt;
    f.read_exact_at(&mut h, size - sector).unwrap();
    assert_eq!(&h[0..8], b"EFI PART", "no GPT header in the last sector");
    let my_lba = u64::from_le_bytes(h[24..32].try_into().unwrap());
    let other = u64::from_le_bytes(h[32..40].try_into().unwrap());
    assert_eq!(my_lba, size / sector - 1, "backup header's own LBA");
    assert_eq!(other, 1, "backup header's pointer to the primary");
}

/// What the hint tells the user: resize2fs wants a fresh `e2fsck -f` (which records the check).
fn grow_ext4(dev: &str) {
    let e2fsck = require_tool("e2fsck", "e2fsprogs");
    run_tool(&e2fsck, &["-f", "-p", dev]);
    run_tool(&require_tool("resize2fs", "e2fsprogs"), &[dev]);
}

#[test]
fn restore_onto_larger_drive_relocates_gpt_backup() {
    let t = tempdir();
    let repo = t.path().join("repo");
    let src = source_disk(t.path(), 1000);
    backup(&src.disk.dev, &repo, "disk", &[]);

    let dst = LoopDev::new_random(&t.path().join("dst.img"), 320 * MIB, 1001);
    let r = restore(&repo, &dst.dev, &["--yes", "--verify"]);
    assert_eq!(r["verified"], Value::Bool(true), "{r}");
    assert_eq!(
        r["partition_table"]["backup_header_lba"],
        serde_json::json!([SRC_SIZE / SECTOR - 1, 320 * MIB / SECTOR - 1]),
        "{r}"
    );
    assert_gpt_valid(&dst.dev);
    assert_backup_header_at_end(&dst, SECTOR);
    assert_partitions_restored(&src, &dst, t.path(), "larger");
    // Without --grow-last-partition the partitions keep their sizes.
    assert_eq!(gpt_part(&dst.dev, 2), src.p2);
    // The old backup copy (last 33 sectors of the image) was cleared.
    assert_eq!(
        hash_range(dst.path(), SRC_SIZE - 33 * SECTOR, 33 * SECTOR),
        hash_range(Path::new("/dev/zero"), 0, 33 * SECTOR),
        "the old backup GPT is still in the middle of the disk"
    );
    // The protective MBR covers the new size.
    let mut lba0 = [0u8; 512];
    use std::os::unix::fs::FileExt;
    std::fs::File::open(dst.path())
        .unwrap()
        .read_exact_at(&mut lba0, 0)
        .unwrap();
    assert_eq!(lba0[446 + 4], 0xee);
    assert_eq!(
        u32::from_le_bytes(lba0[446 + 12..446 + 16].try_into().unwrap()),
        (320 * MIB / SECTOR - 1) as u32,
        "protective MBR size"
    );
}

#[test]
fn restore_onto_larger_drive_grows_last_partition() {
    let t = tempdir();
    let repo = t.path().join("repo");
    let src = source_disk(t.path(), 1100);
    backup(&src.disk.dev, &repo, "disk", &[]);

    let dst = LoopDev::new_random(&t.path().join("dst.img"), 384 * MIB, 1101);
    let out = cairn(&[
        "restore",
        s(&repo),
        &dst.dev,
        "--yes",
        "--grow-last-partition",
    ]);
    out.ok();
    out.assert_mentions("resize2fs");
    assert_gpt_valid(&dst.dev);
    assert_backup_header_at_end(&dst, SECTOR);
    let q2 = gpt_part(&dst.dev, 2);
    assert_eq!(q2.first_lba, src.p2.first_lba);
    let last_usable = 384 * MIB / SECTOR - 34;
    assert!(
        q2.last_lba <= last_usable && q2.last_lba + 2048 > last_usable,
        "partition 2 should end near the drive's end (LBA {last_usable}), ends at {}",
        q2.last_lba
    );
    assert_eq!(gpt_part(&dst.dev, 1), src.p1, "partition 1 must not change");
    // The old partition's bytes are intact at the start of the grown one.
    flush_bufs(&dst.dev);
    let (off, len) = part_range(&src.p2);
    assert_eq!(
        hash_range(dst.path(), off, len),
        hash_range(src.disk.path(), off, len)
    );
    // The filesystem can be grown into the new space, and keeps its files.
    let q = dst.partition(2);
    assert_eq!(
        size_of(Path::new(&q)),
        (q2.last_lba - q2.first_lba + 1) * SECTOR,
        "the kernel did not pick up the grown partition"
    );
    e2fsck_clean(&q);
    grow_ext4(&q);
    e2fsck_clean(&q);
    assert_eq!(
        read_fs(FsKind::Ext4, &q, &t.path().join("r2")),
        src.files2,
        "files on the grown filesystem"
    );
}

#[test]
fn restore_onto_smaller_drive_that_fits() {
    let t = tempdir();
    let repo = t.path().join("repo");
    let src = source_disk(t.path(), 1200);
    backup(&src.disk.dev, &repo, "disk", &[]);

    let dst = LoopDev::new_random(&t.path().join("dst.img"), 200 * MIB, 1201);
    let r = restore(&repo, &dst.dev, &["--yes", "--verify"]);
    assert_eq!(r["range"], serde_json::json!([0, 200 * MIB]), "{r}");
    assert_gpt_valid(&dst.dev);
    assert_backup_header_at_end(&dst, SECTOR);
    assert_partitions_restored(&src, &dst, t.path(), "smaller");
    flush_bufs(&dst.dev);
    assert_eq!(
        hash_range(dst.path(), 185 * MIB, 2 * MIB),
        hash_range(src.disk.path(), 185 * MIB, 2 * MIB),
        "data outside the partitions that fits must be restored"
    );
    let q2 = dst.partition(2);
    e2fsck_clean(&q2);
    assert_eq!(read_fs(FsKind::Ext4, &q2, &t.path().join("r2")), src.files2);
}

#[test]
fn restore_onto_smaller_drive_refused_when_a_partition_does_not_fit() {
    let t = tempdir();
    let repo = t.path().join("repo");
    let src = source_disk(t.path(), 1300);
    backup(&src.disk.dev, &repo, "disk", &[]);

    let dst = LoopDev::new_random(&t.path().join("dst.img"), 170 * MIB, 1301);
    let before = hash_device(&dst.dev);
    let out = cairn(&["restore", s(&repo), &dst.dev, "--yes"]);
    out.error();
    let line = out.error_line();
    assert!(
        mentions_number(&line, 170 * MIB) && mentions_number(&line, SRC_SIZE),
        "the refusal must name the target's and the image's sizes: {line}"
    );
    assert!(line.contains("partition 2"), "{line}");
    assert!(
        line.contains("does not shrink filesystems"),
        "must say shrinking is out of scope: {line}"
    );
    assert_eq!(hash_device(&dst.dev), before, "the target was written");
    let _ = src;
}

#[test]
fn restore_onto_smaller_drive_refused_when_data_outside_partitions_does_not_fit() {
    let t = tempdir();
    let repo = t.path().join("repo");
    let src = source_disk(t.path(), 1400);
    backup(&src.disk.dev, &repo, "disk", &[]);

    // Partitions end at 180 MiB and fit, but there is data at 185 MiB.
    let dst = LoopDev::new_random(&t.path().join("dst.img"), 184 * MIB, 1401);
    let before = hash_device(&dst.dev);
    let out = cairn(&["restore", s(&repo), &dst.dev, "--yes"]);
    out.error();
    let line = out.error_line();
    assert!(
        mentions_number(&line, 184 * MIB) && mentions_number(&line, SRC_SIZE),
        "the refusal must name the sizes involved: {line}"
    );
    assert!(
        mentions_number(&line, 185 * MIB) && mentions_number(&line, 187 * MIB),
        "the refusal must say where the data is: {line}"
    );
    assert!(
        mentions_number(&line, 187 * MIB + 33 * SECTOR),
        "the refusal must say what size would do: {line}"
    );
    assert!(line.contains("outside its partitions"), "{line}");
    assert_eq!(hash_device(&dst.dev), before, "the target was written");
    let _ = src;
}

#[test]
fn restore_one_partition_onto_device_partition_and_file() {
    let t = tempdir();
    let repo = t.path().join("repo");
    let src = source_disk(t.path(), 1500);
    backup(&src.disk.dev, &repo, "disk", &[]);
    let (off, len) = part_range(&src.p2);
    let want = hash_range(src.disk.path(), off, len);

    // Onto a bare device larger than the partition.
    let dev = LoopDev::new_random(&t.path().join("bare.img"), 96 * MIB, 1501);
    let r = restore(&repo, &dev.dev, &["--yes", "--partition", "2", "--verify"]);
    assert_eq!(r["partition"], serde_json::json!(2), "{r}");
    assert_eq!(r["verified"], Value::Bool(true), "{r}");
    flush_bufs(&dev.dev);
    assert_eq!(
        hash_range(dev.path(), 0, len),
        want,
        "partition 2 on a bare device"
    );
    e2fsck_clean(&dev.dev);

    // Onto a partition of another GPT disk; that disk's table stays valid.
    let img = t.path().join("other.img");
    write_sparse_file(&img, 160 * MIB);
    sgdisk(&["-o", "-n", "1:2048:+90M", "-t", "1:8300", s(&img)]);
    let other = LoopDev::attach(&img);
    let q1 = other.partition(1);
    restore(&repo, &q1, &["--yes", "--partition", "2"]);
    flush_bufs(&q1);
    assert_eq!(
        hash_range(Path::new(&q1), 0, len),
        want,
        "partition 2 on a partition"
    );
    assert_gpt_valid(&other.dev);
    assert_eq!(
        read_fs(FsKind::Ext4, &q1, &t.path().join("rq1")),
        src.files2,
        "files of partition 2 restored onto another disk's partition"
    );

    // Onto a file: exactly the partition.
    let file = t.path().join("p2.img");
    restore(&repo, s(&file), &["--partition", "2"]);
    assert_eq!(size_of(&file), len);
    assert_eq!(hash_path(&file), want, "partition 2 to a file");

    // A target smaller than the partition, and a partition that does not exist, are refused.
    let small = LoopDev::new_random(&t.path().join("small.img"), 64 * MIB, 1502);
    let out = cairn(&["restore", s(&repo), &small.dev, "--yes", "--partition", "2"]);
    out.error();
    assert!(
        mentions_number(&out.error_line(), 64 * MIB) && mentions_number(&out.error_line(), len),
        "{}",
        out.describe()
    );
    let out = cairn(&["restore", s(&repo), &small.dev, "--yes", "--partition", "7"]);
    out.error().assert_mentions("no partition 7");
}

#[test]
fn restore_refuses_sector_size_mismatch() {
    let t = tempdir();
    let repo = t.path().join("repo");
    let src = source_disk(t.path(), 1600);
    backup(&src.disk.dev, &repo, "disk", &[]);

    let img = t.path().join("dst4k.img");
    write_random_file(&img, 320 * MIB, 1601);
    let dst = attach_with_sector_size(&img, 4096);
    assert_eq!(
        logical_sector_size(&dst.dev),
        4096,
        "test setup: 4K loop device"
    );
    let before = hash_device(&dst.dev);
    let out = cairn(&["restore", s(&repo), &dst.dev, "--yes"]);
    out.error();
    let line = out.error_line();
    assert!(
        line.contains("512-byte") && line.contains("4096-byte"),
        "must name both sector sizes: {line}"
    );
    assert_eq!(hash_device(&dst.dev), before, "the target was written");
    // A single partition does not depend on the sector size.
    restore(&repo, &dst.dev, &["--yes", "--partition", "1"]);
}

#[test]
fn four_k_sector_disk_restores_onto_larger_4k_drive() {
    require_root();
    let t = tempdir();
    let repo = t.path().join("repo");
    let img = t.path().join("src4k.img");
    write_sparse_file(&img, 128 * MIB);
    let src = attach_with_sector_size(&img, 4096);
    sgdisk(&[
        "-o",
        "-n",
        "1:256:+40M",
        "-t",
        "1:8300",
        "-n",
        "2:0:+40M",
        "-t",
        "2:8300",
        &src.dev,
    ]);
    assert_gpt_valid(&src.dev);
    let q2 = src.partition(2);
    mkfs(FsKind::Ext4, &q2);
    let files = fill_fs(FsKind::Ext4, &q2, &t.path().join("fill"), 1700);
    let p2 = gpt_part(&src.dev, 2);
    let b = backup(&src.dev, &repo, "disk4k", &[]);
    let _ = b;

    let shown = cairn(&["show", s(&repo), "--json"]);
    shown.ok();
    assert_eq!(shown.json()["partition_table"]["sector_size"], 4096);

    let dimg = t.path().join("dst4k.img");
    write_random_file(&dimg, 192 * MIB, 1701);
    let dst = attach_with_sector_size(&dimg, 4096);
    restore(
        &repo,
        &dst.dev,
        &["--yes", "--verify", "--grow-last-partition"],
    );
    assert_gpt_valid(&dst.dev);
    assert_backup_header_at_end(&dst, 4096);
    let q = gpt_part(&dst.dev, 2);
    assert_eq!(q.first_lba, p2.first_lba);
    assert!(q.last_lba > p2.last_lba, "partition 2 was not grown");
    flush_bufs(&dst.dev);
    let (off, len) = (p2.first_lba * 4096, (p2.last_lba - p2.first_lba + 1) * 4096);
    assert_eq!(
        hash_range(dst.path(), off, len),
        hash_range(src.path(), off, len)
    );
    let dq2 = dst.partition(2);
    e2fsck_clean(&dq2);
    assert_eq!(read_fs(FsKind::Ext4, &dq2, &t.path().join("r")), files);
}

#[test]
fn list_and_show_display_the_partition_table() {
    let t = tempdir();
    let repo = t.path().join("repo");
    let src = source_disk(t.path(), 1800);
    let b = backup(&src.disk.dev, &repo, "disk", &[]);
    let id = id_of(&b);

    let out = cairn(&["list", s(&repo), "--json"]);
    out.ok();
    let rows = out.json();
    let table = &rows[0]["partition_table"];
    assert_eq!(table["kind"], "gpt", "{rows}");
    assert_eq!(table["sector_size"], 512);
    assert_eq!(table["disk_id"], gpt_disk_guid(&src.disk.dev).as_str());
    let parts = table["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 2, "{table}");
    for (p, want) in parts.iter().zip([&src.p1, &src.p2]) {
        let (off, len) = part_range(want);
        assert_eq!(p["start"].as_u64(), Some(off), "{p}");
        assert_eq!(p["size"].as_u64(), Some(len), "{p}");
        assert_eq!(p["uuid"], want.uuid.as_str(), "{p}");
        assert_eq!(p["type_id"], want.type_guid.as_str(), "{p}");
        assert_eq!(p["type_name"], "Linux filesystem", "{p}");
    }
    assert_eq!(parts[0]["name"], "system");
    assert_eq!(parts[1]["name"], "data");

    let out = cairn(&["list", s(&repo)]);
    out.ok();
    assert!(out.stdout.contains("GPT"), "{}", out.describe());

    let out = cairn(&["show", s(&repo), "--image", &id]);
    out.ok();
    for needle in [&src.p1.uuid, &src.p2.uuid, &gpt_disk_guid(&src.disk.dev)] {
        assert!(out.stdout.contains(needle.as_str()), "{}", out.describe());
    }
    assert!(out.stdout.contains("\"data\""), "{}", out.describe());
    let out = cairn(&["show", s(&repo), "--image", &id, "--json"]);
    out.ok();
    assert_eq!(out.json()["partition_table"], *table);

    // An MBR disk.
    let img = t.path().join("mbr.img");
    write_sparse_file(&img, 64 * MIB);
    let sfdisk = require_tool("sfdisk", "fdisk");
    let mut child = std::process::Command::new(&sfdisk)
        .arg(s(&img))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: dos\nlabel-id: 0x12345678\nstart=2048, size=40960, type=83, bootable\nstart=43008, type=82\n")
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk failed");
    backup(s(&img), &repo, "mbr", &[]);
    let out = cairn(&["show", s(&repo), "--name", "mbr", "--json"]);
    out.ok();
    let m = out.json();
    let table = &m["partition_table"];
    assert_eq!(table["kind"], "mbr", "{m}");
    assert_eq!(table["disk_id"], "12345678");
    let parts = table["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0]["start"].as_u64(), Some(MIB));
    assert_eq!(parts[0]["size"].as_u64(), Some(20 * MIB));
    assert_eq!(parts[0]["bootable"], true);
    assert_eq!(parts[1]["type_id"], "0x82");
    assert_eq!(parts[1]["size"].as_u64(), Some(64 * MIB - 43008 * 512));

    // A partition image records no table.
    backup(&src.disk.partition(1), &repo, "p1", &[]);
    let out = cairn(&["show", s(&repo), "--name", "p1", "--json"]);
    out.ok();
    assert!(out.json().get("partition_table").is_none());
}

#[test]
fn disks_lists_devices_partitions_filesystems_and_use() {
    let t = tempdir();
    let src = source_disk(t.path(), 1900);
    let q1 = src.disk.partition(1);
    let q2 = src.disk.partition(2);
    let tune2fs = require_tool("tune2fs", "e2fsprogs");
    run_tool(&tune2fs, &["-L", "cairn-sys", &q1]);
    let m = Mount::new(&q2, &t.path().join("mnt"), None);

    let out = cairn(&["disks", "--json"]);
    out.ok();
    let all = out.json();
    let name = src.disk.dev.trim_start_matches("/dev/");
    let d = all
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("{name} not listed: {all}"));
    assert_eq!(d["path"], src.disk.dev.as_str());
    assert_eq!(d["size"].as_u64(), Some(SRC_SIZE));
    assert_eq!(d["logical_sector_size"], 512);
    assert_eq!(d["transport"], "loop");
    assert_eq!(d["partition_table"], "gpt");
    assert_eq!(d["disk_id"], gpt_disk_guid(&src.disk.dev).as_str());
    let why = d["in_use"]
        .as_str()
        .unwrap_or_else(|| panic!("disk not in use: {d}"));
    assert!(why.contains("mounted"), "{why}");
    let parts = d["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 2, "{d}");
    let p1 = &parts[0];
    assert_eq!(p1["path"], q1.as_str());
    assert_eq!(p1["number"], 1);
    assert_eq!(p1["start"].as_u64(), Some(MIB));
    assert_eq!(p1["size"].as_u64(), Some(80 * MIB));
    assert_eq!(p1["filesystem"]["type"], "ext4");
    assert_eq!(p1["filesystem"]["label"], "cairn-sys");
    assert_eq!(p1["filesystem"]["uuid"], blkid_value(&q1, "UUID").as_str());
    assert_eq!(p1["partuuid"], src.p1.uuid.as_str());
    assert_eq!(p1["part_name"], "system");
    assert!(p1["in_use"].is_null(), "{p1}");
    let p2 = &parts[1];
    assert_eq!(
        p2["mountpoints"],
        serde_json::json!([s(&std::fs::canonicalize(&m.dir).unwrap())])
    );
    assert!(p2["in_use"].as_str().unwrap().contains("mounted"), "{p2}");

    let out = cairn(&["disks"]);
    out.ok();
    assert!(out.stdout.contains(&src.disk.dev), "{}", out.describe());
    assert!(out.stdout.contains("cairn-sys"), "{}", out.describe());
    assert!(out.stdout.contains("IN USE"), "{}", out.describe());
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// Safety on the backup side
// ---------------------------------------------------------------------------------------------

#[test]
fn backup_refuses_repository_on_the_source_device() {
    require_root();
    let t = tempdir();
    // A filesystem device holding the repository.
    let dev = LoopDev::new_zeroed(&t.path().join("fs.img"), 64 * MIB);
    mkfs(FsKind::Ext4, &dev.dev);
    let m = Mount::new(&dev.dev, &t.path().join("mnt"), None);
    let repo = m.dir.join("repo");
    let out = cairn(&["backup", &dev.dev, s(&repo), "--name", "x"]);
    out.error();
    out.assert_mentions("is on the source device");
    assert!(!repo.join("images").exists(), "an image was written");

    // A whole disk whose partition holds the repository.
    let src = source_disk(t.path(), 2000);
    let q1 = src.disk.partition(1);
    let m1 = Mount::new(&q1, &t.path().join("mnt1"), None);
    let repo1 = m1.dir.join("repo");
    let out = cairn(&["backup", &src.disk.dev, s(&repo1), "--name", "y"]);
    out.error();
    out.assert_mentions("is on the source device");
    m1.unmount();
    m.unmount();
}

#[test]
fn backup_of_mounted_read_write_filesystem_warns() {
    require_root();
    let t = tempdir();
    let dev = LoopDev::new_zeroed(&t.path().join("fs.img"), 64 * MIB);
    mkfs(FsKind::Ext4, &dev.dev);
    let m = Mount::new(&dev.dev, &t.path().join("mnt"), None);
    populate_tree(&m.dir, 2100);
    let repo = t.path().join("repo");
    let out = cairn(&["backup", &dev.dev, s(&repo), "--name", "live", "--json"]);
    out.ok();
    assert!(
        out.stderr.contains("may be inconsistent"),
        "no warning about a mounted read-write source:\n{}",
        out.describe()
    );
    assert_eq!(out.json()["source_size"].as_u64(), Some(64 * MIB));
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// MBR disks and image chains
// ---------------------------------------------------------------------------------------------

/// `sfdisk DEV < script`.
fn sfdisk(dev: &str, script: &str) {
    let t = require_tool("sfdisk", "fdisk");
    let mut child = std::process::Command::new(&t)
        .arg(dev)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk {dev} failed");
}

/// (start, sectors) of MBR partition `n` from `sfdisk --json`.
fn mbr_part(dev: &str, n: usize) -> (u64, u64) {
    let t = require_tool("sfdisk", "fdisk");
    let o = run_tool(&t, &["--json", dev]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let p = &v["partitiontable"]["partitions"][n - 1];
    (p["start"].as_u64().unwrap(), p["size"].as_u64().unwrap())
}

#[test]
fn mbr_disk_onto_larger_drive_with_grow_and_onto_smaller_drive() {
    require_root();
    let t = tempdir();
    let repo = t.path().join("repo");
    let img = t.path().join("mbr.img");
    write_sparse_file(&img, 128 * MIB);
    sfdisk(
        s(&img),
        "label: dos\nlabel-id: 0xcafe0001\nstart=2048, size=61440, type=83\nstart=65536, size=81920, type=83\n",
    );
    let src = LoopDev::attach(&img);
    let q2 = src.partition(2);
    mkfs(FsKind::Ext4, &q2);
    let files = fill_fs(FsKind::Ext4, &q2, &t.path().join("fill"), 2200);
    backup(&src.dev, &repo, "mbr", &[]);
    flush_bufs(&src.dev);
    let (start, sectors) = mbr_part(&src.dev, 2);
    let want = hash_range(src.path(), start * SECTOR, sectors * SECTOR);

    // Larger, growing partition 2 to the end.
    // The larger drive held a GPT before: its backup header must not survive next to the MBR.
    let big_img = t.path().join("big.img");
    write_random_file(&big_img, 192 * MIB, 2201);
    sgdisk(&["-o", "-n", "1:2048:+100M", s(&big_img)]);
    let big = LoopDev::attach(&big_img);
    let out = cairn(&[
        "restore",
        s(&repo),
        &big.dev,
        "--yes",
        "--verify",
        "--grow-last-partition",
    ]);
    out.ok();
    out.assert_mentions("resize2fs");
    let (bstart, bsectors) = mbr_part(&big.dev, 2);
    assert_eq!(bstart, start);
    assert_eq!(
        bsectors,
        192 * MIB / SECTOR - start,
        "partition 2 not grown to the end"
    );
    assert_eq!(mbr_part(&big.dev, 1), mbr_part(&src.dev, 1));
    flush_bufs(&big.dev);
    assert_ne!(
        hash_range(big.path(), 192 * MIB - SECTOR, 8),
        blake3::hash(b"EFI PART").to_hex().to_string(),
        "the old GPT backup header is still in the last sector"
    );
    flush_bufs(&big.dev);
    assert_eq!(
        hash_range(big.path(), start * SECTOR, sectors * SECTOR),
        want
    );
    let b2 = big.partition(2);
    assert_eq!(size_of(Path::new(&b2)), bsectors * SECTOR);
    grow_ext4(&b2);
    e2fsck_clean(&b2);
    assert_eq!(read_fs(FsKind::Ext4, &b2, &t.path().join("rb")), files);

    // Smaller: the partitions end at 72 MiB, so a 100 MiB drive holds them.
    let small = LoopDev::new_random(&t.path().join("small.img"), 100 * MIB, 2202);
    restore(&repo, &small.dev, &["--yes", "--verify"]);
    assert_eq!(mbr_part(&small.dev, 2), (start, sectors));
    flush_bufs(&small.dev);
    assert_eq!(
        hash_range(small.path(), start * SECTOR, sectors * SECTOR),
        want
    );
    e2fsck_clean(&small.partition(2));

    // Smaller than the end of partition 2 (72 MiB): refused, nothing written.
    let tiny = LoopDev::new_random(&t.path().join("tiny.img"), 64 * MIB, 2203);
    let before = hash_device(&tiny.dev);
    let out = cairn(&["restore", s(&repo), &tiny.dev, "--yes"]);
    out.error();
    assert!(
        mentions_number(&out.error_line(), 64 * MIB)
            && mentions_number(&out.error_line(), 128 * MIB),
        "{}",
        out.describe()
    );
    assert_eq!(hash_device(&tiny.dev), before, "the target was written");
}

/// A full and an incremental image of a GPT disk: the incremental restore point goes onto a
/// larger drive, is verified (partly overridden extents included) and its GPT relocated.
#[test]
fn incremental_chain_onto_larger_drive() {
    let t = tempdir();
    let repo = t.path().join("repo");
    let src = source_disk(t.path(), 2300);
    backup(&src.disk.dev, &repo, "disk", &["--full"]);
    // Change some bytes of partition 2 and of the gap, inside blocks that also keep old data.
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&src.disk.dev)
            .unwrap();
        write_random_at(&f, 150 * MIB + 8192, 12288, 2301);
        write_random_at(&f, 91 * MIB + 4096, 4096, 2302);
        f.sync_all().unwrap();
    }
    flush_bufs(&src.disk.dev);
    let inc = backup(&src.disk.dev, &repo, "disk", &["--incremental"]);
    assert_eq!(inc["kind"], "incremental", "{inc}");

    let dst = LoopDev::new_random(&t.path().join("dst.img"), 300 * MIB, 2303);
    let r = restore(&repo, &dst.dev, &["--yes", "--verify"]);
    assert_eq!(r["chain"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(r["verified"], Value::Bool(true), "{r}");
    assert_gpt_valid(&dst.dev);
    assert_backup_header_at_end(&dst, SECTOR);
    flush_bufs(&dst.dev);
    let n = SRC_SIZE - 33 * SECTOR;
    assert_eq!(
        hash_range(dst.path(), 34 * SECTOR, n - 34 * SECTOR),
        hash_range(src.disk.path(), 34 * SECTOR, n - 34 * SECTOR),
        "the restored incremental point differs from the source between the GPT copies"
    );
}

/// An image whose primary GPT is damaged (only the backup is intact) cannot be relocated: refused
/// before anything is written, saying why. The same-size restore still works, byte for byte.
#[test]
fn damaged_primary_gpt_is_refused_on_another_size_before_writing() {
    require_root();
    let t = tempdir();
    let repo = t.path().join("repo");
    let img = t.path().join("damaged.img");
    write_sparse_file(&img, 64 * MIB);
    sgdisk(&["-o", "-n", "1:2048:+20M", "-t", "1:8300", s(&img)]);
    {
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        write_random_at(&f, MIB, 4 * MIB, 2400);
        f.sync_all().unwrap();
    }
    flip_byte(&img, SECTOR + 40); // the primary header's CRC no longer matches
    backup(s(&img), &repo, "damaged", &[]);

    let dst = LoopDev::new_random(&t.path().join("dst.img"), 96 * MIB, 2401);
    let before = hash_device(&dst.dev);
    let out = cairn(&["restore", s(&repo), &dst.dev, "--yes"]);
    out.error();
    let line = out.error_line();
    assert!(line.contains("primary GPT"), "{line}");
    assert!(line.contains("nothing was written"), "{line}");
    assert_eq!(hash_device(&dst.dev), before, "the target was written");

    let same = LoopDev::new_random(&t.path().join("same.img"), 64 * MIB, 2402);
    restore(&repo, &same.dev, &["--yes"]);
    assert_eq!(hash_device(&same.dev), hash_path(&img));
}
