//! `--json` output: exactly one JSON document on stdout with the documented
//! keys and consistent values.

mod common;

use common::*;
use serde_json::Value;

fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key:?} must be a non-negative integer in {v}"))
}

#[test]
fn backup_json_counts_blocks() {
    use Chunk::*;
    let t = tempdir();
    let src = t.path().join("source.img");
    let repo = t.path().join("repo");
    // 10 blocks of 64 KiB: 2 random, 4 zero, 4 text.
    let bs = 64 * KIB;
    write_chunks_file(
        &src,
        10 * bs,
        &[Random(2 * bs), Zero(4 * bs), Text(4 * bs)],
        1,
    );

    let b = backup(s(&src), &repo, "json", &["--block-size", "64K", "--full"]);
    for key in [
        "id",
        "name",
        "kind",
        "method",
        "bytes_read",
        "bytes_stored",
        "blocks_total",
        "blocks_zero",
        "blocks_stored",
        "duration_ms",
    ] {
        assert!(b.get(key).is_some(), "backup --json lacks {key:?}: {b}");
    }
    id_of(&b);
    assert_eq!(b["name"], "json");
    assert_eq!(b["kind"], "full");
    assert_eq!(b["method"], "full");
    assert_eq!(num(&b, "bytes_read"), 10 * bs);
    assert_eq!(num(&b, "blocks_total"), 10, "{b}");
    assert_eq!(num(&b, "blocks_zero"), 4, "{b}");
    assert_eq!(num(&b, "blocks_stored"), 6, "{b}");
    num(&b, "duration_ms");
    let stored = num(&b, "bytes_stored");
    // 2 random blocks are incompressible; text compresses.
    assert!(
        stored >= 2 * bs && stored <= 6 * bs + 4 * KIB,
        "bytes_stored {stored} implausible: {b}"
    );
}

#[test]
fn list_restore_verify_json() {
    let t = tempdir();
    let repo = t.path().join("repo");
    let a = t.path().join("a.img");
    let bsrc = t.path().join("b.img");
    write_mixed_file(&a, 6 * MIB + 100, 2);
    write_mixed_file(&bsrc, 2 * MIB + 1, 3);
    let ia = id_of(&backup(s(&a), &repo, "alpha", &[]));
    let ib = id_of(&backup(s(&bsrc), &repo, "beta", &[]));

    let list = cairn(&["list", s(&repo), "--json"]);
    list.ok();
    let v = list.json();
    let arr = v.as_array().expect("list --json must be an array");
    assert_eq!(arr.len(), 2, "{v}");
    for e in arr {
        for key in [
            "id",
            "name",
            "kind",
            "parent",
            "created",
            "source_size",
            "data_bytes",
            "stored_bytes",
            "status",
        ] {
            assert!(e.get(key).is_some(), "list entry lacks {key:?}: {e}");
        }
        assert_eq!(e["kind"], "full", "{e}");
        assert!(
            e["parent"].is_null(),
            "full image must have parent null: {e}"
        );
        let id = id_of(e);
        let (name, size) = if id == ia {
            ("alpha", 6 * MIB + 100)
        } else if id == ib {
            ("beta", 2 * MIB + 1)
        } else {
            panic!("unknown id in list: {e}")
        };
        assert_eq!(e["name"], name, "{e}");
        assert_eq!(num(e, "source_size"), size, "{e}");
        assert!(
            num(e, "data_bytes") <= size,
            "data_bytes > source_size: {e}"
        );
        num(e, "stored_bytes");
    }

    let dst = t.path().join("alpha.restored");
    let r = restore(&repo, s(&dst), &["--name", "alpha"]);
    for key in ["id", "target", "bytes_written"] {
        assert!(r.get(key).is_some(), "restore --json lacks {key:?}: {r}");
    }
    assert_eq!(id_of(&r), ia);
    assert_eq!(r["target"], s(&dst), "{r}");
    let written = num(&r, "bytes_written");
    assert!(
        written > 0 && written <= 6 * MIB + 100,
        "bytes_written {written} implausible: {r}"
    );
    assert_same_content(&a, &dst);

    let ver = cairn(&["verify", s(&repo), "--json"]);
    ver.ok();
    let v = ver.json();
    assert_eq!(v["ok"], true, "{v}");
    let imgs = v["images"].as_array().expect("verify images array");
    assert_eq!(imgs.len(), 2, "{v}");
    for i in imgs {
        assert!(i.get("name").is_some(), "{i}");
        assert_eq!(i["status"], "ok", "{i}");
        assert_eq!(
            i["errors"].as_array().map(|a| a.len()),
            Some(0),
            "errors must be an empty array: {i}"
        );
    }
    let mut ids: Vec<String> = imgs.iter().map(id_of).collect();
    ids.sort();
    let mut want = vec![ia.clone(), ib];
    want.sort();
    assert_eq!(ids, want);

    // --image narrows verify to one image.
    let one = cairn(&["verify", s(&repo), "--image", &ia, "--json"]);
    one.ok();
    let v = one.json();
    let imgs = v["images"].as_array().expect("images array");
    assert_eq!(imgs.len(), 1, "{v}");
    assert_eq!(id_of(&imgs[0]), ia);
}

/// `cairn list --json | head -1`: the reader goes away before cairn writes. The command's work is
/// done, so it exits 0 with no panic message (Rust ignores SIGPIPE, so `println!` used to panic).
#[test]
fn a_closed_stdout_is_not_a_panic() {
    let t = tempdir();
    let src = t.path().join("d.img");
    write_random_file(&src, 1 << 20, 5);
    let repo = t.path().join("repo");
    cairn(&["backup", s(&src), s(&repo), "--name", "d", "-q"]).ok();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(bin())
        .args(["list", s(&repo), "--json"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}
