//! Round trips through regular files: backup, restore to a fresh path, compare
//! bytes. Also sparse sources, segment splitting, the buffered I/O fallback,
//! tmpfs fallback, image selection and the on-disk repository layout.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// 37 MiB + 1234 bytes: not a multiple of 1 MiB nor of 4096.
const ODD_SIZE: u64 = 37 * MIB + 1234;

fn roundtrip_file(extra_backup: &[&str], envs: &[(&str, &str)]) -> (tempfile::TempDir, String) {
    let t = tempdir();
    let src = t.path().join("source.img");
    let repo = t.path().join("repo");
    let dst = t.path().join("restored.img");
    write_mixed_file(&src, ODD_SIZE, 1);
    let src_hash = hash_path(&src);

    let (b, bout) = backup_env(s(&src), &repo, "mixed", extra_backup, envs);
    assert_eq!(b["kind"], "full", "backup --json: {b}");
    assert_eq!(
        b["bytes_read"].as_u64(),
        Some(ODD_SIZE),
        "bytes_read must equal the source size: {b}"
    );
    if !envs.is_empty() {
        assert!(
            bout.stderr.contains("buffered"),
            "with {envs:?} the backup log must mention \"buffered\":\n{}",
            bout.describe()
        );
    }
    let id = id_of(&b);

    let mut args = vec!["restore", s(&repo), s(&dst), "--json"];
    args.extend_from_slice(&["--name", "mixed"]);
    let rout = cairn_env(&args, envs);
    rout.ok();
    if !envs.is_empty() {
        assert!(
            rout.stderr.contains("buffered"),
            "with {envs:?} the restore log must mention \"buffered\":\n{}",
            rout.describe()
        );
    }
    let r = rout.json();
    assert_eq!(id_of(&r), id, "restore must pick the only image");

    assert_eq!(size_of(&dst), ODD_SIZE, "restored file size");
    assert_eq!(
        hash_path(&dst),
        src_hash,
        "restored bytes differ from source"
    );
    (t, id)
}

#[test]
fn roundtrip_mixed_file_default() {
    let (t, id) = roundtrip_file(&[], &[]);
    let repo = t.path().join("repo");
    let segs = segment_files(&image_dir(&repo, &id));
    assert!(!segs.is_empty(), "image has no segment files");
}

#[test]
fn roundtrip_mixed_file_small_segments() {
    let (t, id) = roundtrip_file(&["--segment-size", "4M"], &[]);
    let repo = t.path().join("repo");
    let segs = segment_files(&image_dir(&repo, &id));
    // ~20 MiB of incompressible random data alone needs several 4 MiB segments.
    assert!(
        segs.len() >= 3,
        "with --segment-size 4M expected several segments, found {segs:?}"
    );
    let names: Vec<String> = segs
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names[0], "segment-000000");
    assert_eq!(names[1], "segment-000001");
    for p in &segs {
        // docs/format.md: "A segment is at most segment_size bytes".
        let len = fs::metadata(p).unwrap().len();
        assert!(
            len <= 4 * MIB,
            "{} is {len} bytes, above --segment-size 4M",
            p.display()
        );
    }
}

#[test]
fn roundtrip_mixed_file_buffered_io() {
    roundtrip_file(&[], &[("CAIRN_IO", "sync")]);
}

/// Leading and trailing zeros: the restored file (with holes) must still have
/// exactly the source size.
#[test]
fn roundtrip_leading_and_trailing_zeros() {
    use Chunk::*;
    let t = tempdir();
    let src = t.path().join("source.img");
    let repo = t.path().join("repo");
    let dst = t.path().join("restored.img");
    let len = 6 * MIB + 1234;
    write_chunks_file(
        &src,
        len,
        &[
            Zero(MIB + 100),
            Random(2 * MIB),
            Text(MIB),
            Zero(2 * MIB + 1234),
        ],
        7,
    );
    backup(s(&src), &repo, "zeros", &[]);
    restore(&repo, s(&dst), &[]);
    assert_same_content(&src, &dst);
}

/// A tiny source smaller than any block (and not sector-aligned).
#[test]
fn roundtrip_tiny_file() {
    let t = tempdir();
    let src = t.path().join("tiny");
    let repo = t.path().join("repo");
    let dst = t.path().join("tiny.restored");
    fs::write(&src, b"hello cairn\n").unwrap();
    backup(s(&src), &repo, "tiny", &[]);
    restore(&repo, s(&dst), &[]);
    assert_same_content(&src, &dst);
}

/// Explicit --block-size values still round-trip.
#[test]
fn roundtrip_block_sizes() {
    let t = tempdir();
    let src = t.path().join("source.img");
    write_mixed_file(&src, 9 * MIB + 4097, 3);
    for (i, bs) in ["64K", "1M", "16M"].iter().enumerate() {
        let repo = t.path().join(format!("repo{i}"));
        let dst = t.path().join(format!("restored{i}"));
        backup(s(&src), &repo, "bs", &["--block-size", bs]);
        restore(&repo, s(&dst), &[]);
        assert_same_content(&src, &dst);
    }
}

/// 1 GiB sparse file with a few MiB of data: small image, sparse restore.
#[test]
fn sparse_source_small_image_and_sparse_restore() {
    let t = tempdir();
    let src = t.path().join("sparse.img");
    let repo = t.path().join("repo");
    let dst = t.path().join("restored.img");

    write_sparse_file(&src, GIB);
    let f = fs::OpenOptions::new().write(true).open(&src).unwrap();
    write_random_at(&f, 0, MIB, 11); // 1 MiB random at the start
    write_random_at(&f, 300 * MIB, 2 * MIB, 12); // 2 MiB random
    {
        use std::os::unix::fs::FileExt;
        f.write_all_at(&text_vec(13, MIB as usize), 640 * MIB)
            .unwrap(); // 1 MiB text
    }
    write_random_at(&f, GIB - MIB, MIB, 14); // 1 MiB random at the very end
    f.sync_all().unwrap();
    drop(f);
    let nonzero_bytes = 5 * MIB;
    let random_bytes = 4 * MIB;

    let b = backup(s(&src), &repo, "sparse", &[]);
    let id = id_of(&b);
    assert_eq!(b["bytes_read"].as_u64(), Some(GIB), "bytes_read: {b}");

    let stored_on_disk = dir_size(&image_dir(&repo, &id));
    assert!(
        stored_on_disk < 16 * MIB,
        "image of a 1 GiB sparse file with 5 MiB of data takes {stored_on_disk} bytes (want < 16 MiB)"
    );

    let list = cairn(&["list", s(&repo), "--json"]);
    list.ok();
    let arr = list.json();
    let arr = arr.as_array().expect("list --json must be an array");
    assert_eq!(arr.len(), 1, "list: {arr:?}");
    let e = &arr[0];
    assert_eq!(e["source_size"].as_u64(), Some(GIB), "source_size: {e}");
    let data = e["data_bytes"].as_u64().expect("data_bytes is a number");
    let stored = e["stored_bytes"]
        .as_u64()
        .expect("stored_bytes is a number");
    assert!(
        data >= nonzero_bytes && data <= 64 * MIB,
        "data_bytes {data} implausible: 5 MiB of non-zero data in 1 GiB"
    );
    assert!(
        stored >= random_bytes && stored < 16 * MIB,
        "stored_bytes {stored} implausible: 4 MiB is incompressible random data"
    );
    assert!(
        stored <= stored_on_disk,
        "stored_bytes {stored} exceeds the bytes actually in images/{id} ({stored_on_disk})"
    );

    restore(&repo, s(&dst), &[]);
    assert_same_content(&src, &dst);
    let alloc = allocated_bytes(&dst);
    assert!(
        alloc < 64 * MIB,
        "restored file is not sparse: {alloc} bytes allocated for a 1 GiB file with 5 MiB of data"
    );
}

/// Source and repository on tmpfs, where O_DIRECT is refused: cairn must fall
/// back to buffered I/O by itself.
#[test]
fn tmpfs_source_and_repo_fall_back() {
    let shm = shm_tempdir();
    let t = tempdir();

    // source on tmpfs, repo on ext4
    let src = shm.path().join("source.img");
    write_mixed_file(&src, 9 * MIB + 77, 21);
    let repo = t.path().join("repo");
    let dst = t.path().join("restored.img");
    backup(s(&src), &repo, "shm-src", &[]);
    restore(&repo, s(&dst), &[]);
    assert_same_content(&src, &dst);

    // source on ext4, repo (and restore target) on tmpfs
    let src2 = t.path().join("source2.img");
    write_mixed_file(&src2, 7 * MIB + 5, 22);
    let repo2 = shm.path().join("repo");
    let dst2 = shm.path().join("restored2.img");
    // The target must exist: cairn never creates new paths under /dev, and
    // /dev/shm is under /dev.
    fs::File::create(&dst2).unwrap();
    backup(s(&src2), &repo2, "shm-repo", &[]);
    restore(&repo2, s(&dst2), &[]);
    assert_same_content(&src2, &dst2);
}

/// Two images of one name: default restore picks the newest, --image picks
/// an older one; with two names, --name selects.
#[test]
fn restore_selects_image_and_name() {
    let t = tempdir();
    let repo = t.path().join("repo");
    let v1 = t.path().join("v1.img");
    let v2 = t.path().join("v2.img");
    let other = t.path().join("other.img");
    write_mixed_file(&v1, 5 * MIB + 3, 31);
    fs::copy(&v1, &v2).unwrap();
    {
        let f = fs::OpenOptions::new().write(true).open(&v2).unwrap();
        write_random_at(&f, 2 * MIB + 5, 100_000, 32);
    }
    write_random_file(&other, 3 * MIB + 1, 33);

    let id1 = id_of(&backup(s(&v1), &repo, "disk", &[]));
    // --full: a second backup of an existing name may default to another kind.
    let id2 = id_of(&backup(s(&v2), &repo, "disk", &["--full"]));
    assert_ne!(id1, id2, "two backups must get distinct ids");

    let newest = t.path().join("newest.img");
    let r = restore(&repo, s(&newest), &[]);
    assert_eq!(id_of(&r), id2, "default restore must pick the newest image");
    assert_same_content(&v2, &newest);

    let older = t.path().join("older.img");
    let r = restore(&repo, s(&older), &["--image", &id1]);
    assert_eq!(id_of(&r), id1);
    assert_same_content(&v1, &older);

    // A second name makes the default ambiguous; --name resolves it.
    backup(s(&other), &repo, "other", &[]);
    let amb = t.path().join("ambiguous.img");
    let out = cairn(&["restore", s(&repo), s(&amb)]);
    out.error();
    assert!(
        fs::metadata(&amb).map(|m| m.len() == 0).unwrap_or(true),
        "a refused restore must not write the target"
    );
    let by_name = t.path().join("by-name.img");
    restore(&repo, s(&by_name), &["--name", "other"]);
    assert_same_content(&other, &by_name);
    let by_name2 = t.path().join("by-name2.img");
    let r = restore(&repo, s(&by_name2), &["--name", "disk"]);
    assert_eq!(id_of(&r), id2);
    assert_same_content(&v2, &by_name2);
}

/// On-disk layout and permissions of a repository.
#[test]
fn repository_layout_and_permissions() {
    let t = tempdir();
    let src = t.path().join("source.img");
    let repo = t.path().join("repo");
    write_mixed_file(&src, 3 * MIB + 11, 41);
    let id = id_of(&backup(s(&src), &repo, "layout", &[]));

    assert!(
        repo.join("cairn-repository").is_file(),
        "marker file missing"
    );
    assert!(repo.join("lock").exists(), "lock file missing");
    let img = image_dir(&repo, &id);
    for f in ["manifest", "index", "segment-000000"] {
        assert!(img.join(f).is_file(), "{} missing", img.join(f).display());
    }
    assert!(
        dir_entries(&repo.join("tmp")).is_empty(),
        "REPO/tmp must be empty after a completed backup: {:?}",
        dir_entries(&repo.join("tmp"))
    );

    // manifest: "cairn-manifest 2 blake3=<64 hex>\n" + JSON body
    let m = fs::read(img.join("manifest")).unwrap();
    let nl = m
        .iter()
        .position(|&b| b == b'\n')
        .expect("manifest has a first line");
    let first = std::str::from_utf8(&m[..nl]).unwrap();
    let hex = first
        .strip_prefix("cairn-manifest 2 blake3=")
        .unwrap_or_else(|| panic!("bad manifest first line: {first:?}"));
    assert!(
        hex.len() == 64 && hex.bytes().all(|c| c.is_ascii_hexdigit()),
        "bad blake3 in manifest first line: {first:?}"
    );
    let body: serde_json::Value = serde_json::from_slice(&m[nl + 1..])
        .unwrap_or_else(|e| panic!("manifest body is not JSON: {e}"));
    assert!(body.is_object(), "manifest body must be a JSON object");

    // segment header is 32 bytes, then a 32-byte frame header + payload
    let seg0 = fs::metadata(img.join("segment-000000")).unwrap().len();
    assert!(seg0 > 64, "segment-000000 too short: {seg0}");

    check_modes(&repo);
}

fn check_modes(dir: &Path) {
    let mode = fs::metadata(dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode,
        0o700,
        "repository directory {} has mode {mode:o}, want 700",
        dir.display()
    );
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            check_modes(&p);
        } else {
            let mode = e.metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(
                mode,
                0o600,
                "repository file {} has mode {mode:o}, want 600",
                p.display()
            );
        }
    }
}

/// Without io_uring (seccomp-confined or old kernels) cairn still reads and writes with O_DIRECT,
/// through pread/pwrite.
#[test]
fn roundtrip_without_io_uring_keeps_o_direct() {
    let t = tempdir();
    let src = t.path().join("source.img");
    let repo = t.path().join("repo");
    let dst = t.path().join("restored.img");
    write_mixed_file(&src, ODD_SIZE, 3);
    let envs = [("CAIRN_IO", "no-uring")];
    let (_, bout) = backup_env(s(&src), &repo, "mixed", &[], &envs);
    assert!(
        bout.stderr.contains("io_uring unavailable") && bout.stderr.contains("O_DIRECT"),
        "{}",
        bout.describe()
    );
    let rout = cairn_env(&["restore", s(&repo), s(&dst), "--json"], &envs);
    rout.ok();
    assert!(rout.stderr.contains("O_DIRECT"), "{}", rout.describe());
    assert_eq!(
        hash_path(&dst),
        hash_path(&src),
        "restored bytes differ from source"
    );
}
