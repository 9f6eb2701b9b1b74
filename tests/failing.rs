//! Failing sources: media errors are narrowed down to the unreadable sectors, recorded in a
//! bad-sector map (zeros in a full image; the parent chain's data in an incremental), and the backup
//! finishes with exit status 3; a source that goes away or changes size aborts the backup. Errors
//! are injected with CAIRN_FAULT_READ (this kernel has no device-mapper; the vm-tests use dm-error).

mod common;

use common::*;
use serde_json::Value;
use std::fs;
use std::path::Path;

const MIB: u64 = 1 << 20;

/// Expected content: the source with the bad ranges zeroed.
fn zeroed(src: &Path, bad: &[(u64, u64)]) -> Vec<u8> {
    let mut v = fs::read(src).unwrap();
    for &(o, l) in bad {
        v[o as usize..(o + l) as usize].fill(0);
    }
    v
}

fn backup_failing(src: &str, repo: &Path, faults: &str, extra: &[&str]) -> Out {
    let mut args = vec!["backup", src, s(repo), "--name", "failing", "--json"];
    args.extend_from_slice(extra);
    cairn_env(&args, &[("CAIRN_FAULT_READ", faults)])
}

fn check_partial(out: &Out, expect_bad: &[(u64, u64)]) -> Value {
    assert_eq!(
        out.code(),
        Some(3),
        "a backup with unreadable sectors exits 3:\n{}",
        out.describe()
    );
    assert!(out.stderr.contains("cairn: warning:"), "{}", out.stderr);
    let r = out.json();
    let got: Vec<(u64, u64)> = r["bad_ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_u64().unwrap()))
        .collect();
    assert_eq!(
        got, expect_bad,
        "bad ranges narrowed to exactly the failing sectors"
    );
    r
}

#[test]
fn unreadable_sectors_become_a_bad_map_and_the_rest_is_exact() {
    let work = tempdir();
    let w = work.path();
    let src = w.join("src.img");
    write_random_file(&src, 32 * MIB, 11);
    let repo = w.join("repo");
    // 1 KiB inside one block, and 12.5 KiB spanning a block boundary.
    let faults = format!("{}:1024,{}:12800", 5 * MIB + 512, 20 * MIB - 4096);
    let out = backup_failing(s(&src), &repo, &faults, &[]);
    let bad = vec![(5 * MIB + 512, 1024), (20 * MIB - 4096, 12800)];
    let r = check_partial(&out, &bad);
    assert_eq!(r["bad_bytes"], 1024 + 12800);

    let v = cairn(&["verify", s(&repo), "--json"]);
    v.ok();
    assert_eq!(v.json()["images"][0]["status"], "intact-with-bad-sectors");

    let map = cairn(&["badmap", s(&repo)]);
    map.ok();
    let lines: Vec<&str> = map.stdout.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        lines,
        vec![
            "0x02000000     +               1",
            "0x00000000  0x00500200  +",
            "0x00500200  0x00000400  -",
            "0x00500600  0x00EFEA00  +",
            "0x013FF000  0x00003200  -",
            "0x01402200  0x00BFDE00  +",
        ],
        "ddrescue mapfile:\n{}",
        map.stdout
    );

    let out_file = w.join("restored.img");
    let rr = cairn(&["restore", s(&repo), s(&out_file), "--json"]);
    rr.ok();
    assert!(
        rr.stderr.contains("failing source"),
        "restore warns: {}",
        rr.stderr
    );
    assert!(
        fs::read(&out_file).unwrap() == zeroed(&src, &bad),
        "restored = source with the bad sectors zeroed"
    );
}

#[test]
fn max_bad_bounds_how_much_may_be_lost() {
    let work = tempdir();
    let w = work.path();
    let src = w.join("src.img");
    write_random_file(&src, 8 * MIB, 12);
    let repo = w.join("repo");
    let out = backup_failing(
        s(&src),
        &repo,
        &format!("{}:8192", 3 * MIB),
        &["--max-bad", "4K"],
    );
    out.error();
    assert!(out.stderr.contains("max-bad"), "{}", out.stderr);
    let list = cairn(&["list", s(&repo), "--json"]).json();
    assert_eq!(list.as_array().unwrap().len(), 0, "no image is kept");
}

#[test]
fn failing_block_device_is_narrowed_to_its_logical_sectors() {
    require_root();
    let work = tempdir();
    let w = work.path();
    for sector in [512u64, 4096] {
        let file = w.join(format!("disk-{sector}.img"));
        write_random_file(&file, 16 * MIB, sector);
        let dev = common::gpt::attach_with_sector_size(&file, sector as u32);
        let repo = w.join(format!("repo-{sector}"));
        // One byte unreadable: the whole logical sector around it is lost, nothing more.
        let out = backup_failing(&dev.dev, &repo, &format!("{}:1", 7 * MIB + 100), &[]);
        let bad = vec![(7 * MIB, sector)];
        check_partial(&out, &bad);
        let restored = w.join(format!("restored-{sector}.img"));
        restore(&repo, s(&restored), &[]);
        assert!(
            fs::read(&restored).unwrap() == zeroed(&file, &bad),
            "sector size {sector}"
        );
    }
}

fn ranges_of(v: &Value) -> Vec<(u64, u64)> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array of ranges: {v}"))
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_u64().unwrap()))
        .collect()
}

/// The repository's files and their hashes, without the lock file (it records the last pid).
fn repo_state(repo: &Path) -> std::collections::BTreeMap<String, String> {
    let mut t = hash_tree(repo);
    t.remove("lock");
    t
}

/// The `-` lines of a ddrescue mapfile, as (offset, length).
fn map_minus(map: &str) -> Vec<(u64, u64)> {
    map.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && f[2] == "-").then(|| {
                let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
                (hex(f[0]), hex(f[1]))
            })
        })
        .collect()
}

#[test]
fn an_incremental_keeps_the_parents_data_where_the_source_is_unreadable() {
    let work = tempdir();
    let w = work.path();
    let src = w.join("src.img");
    write_random_file(&src, 16 * MIB, 21);
    let repo = w.join("repo");
    let old = fs::read(&src).unwrap();
    let full = backup(s(&src), &repo, "failing", &[]);
    let full_id = id_of(&full);

    // Changes: one inside the granule that will fail, one elsewhere. A second range fails where
    // nothing changed.
    let changed = 5 * MIB + 4096;
    let f = fs::OpenOptions::new().write(true).open(&src).unwrap();
    write_random_at(&f, changed + 100, 3000, 22);
    write_random_at(&f, 12 * MIB, 8192, 23);
    drop(f);
    let new = fs::read(&src).unwrap();
    let faults = format!("{}:512,{}:1", changed + 512, 9 * MIB + 10);
    let out = backup_failing(s(&src), &repo, &faults, &[]);
    // Index entries are whole 4 KiB granules: nothing is stored for the granule around each bad
    // sector, so the parent's data stands (and is flagged) for all of it.
    let granules = vec![(changed, 4096), (9 * MIB, 4096)];
    let r = check_partial(&out, &granules);
    assert_eq!(r["kind"], "incremental");
    assert_eq!(r["method"], "compare-scan");
    let inc_id = id_of(&r);

    // The restore of the incremental gives the parent's bytes in those granules, the new bytes
    // everywhere else.
    let mut expect = new.clone();
    for &(o, l) in &granules {
        let (o, l) = (o as usize, l as usize);
        expect[o..o + l].copy_from_slice(&old[o..o + l]);
    }
    let restored = w.join("restored.img");
    let rr = cairn(&[
        "restore",
        s(&repo),
        s(&restored),
        "--image",
        &inc_id,
        "--json",
    ]);
    rr.ok();
    assert!(
        rr.stderr.contains("failing source") && rr.stderr.contains("8192 bytes in 2 ranges"),
        "restore warns with the point's own unreadable bytes: {}",
        rr.stderr
    );
    assert!(
        fs::read(&restored).unwrap() == expect,
        "restored incremental = the new source with the parent's data in the unreadable granules"
    );

    let v = cairn(&["verify", s(&repo), "--json"]);
    v.ok();
    let v = v.json();
    let point = |v: &Value, id: &str| -> Value {
        v["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == id)
            .unwrap_or_else(|| panic!("{id} not in verify output: {v}"))
            .clone()
    };
    assert_eq!(
        ranges_of(&point(&v, &inc_id)["unreadable"]["ranges"]),
        granules
    );
    assert_eq!(point(&v, &inc_id)["unreadable"]["bytes"], 8192);
    assert_eq!(point(&v, &full_id)["unreadable"]["count"], 0, "{v}");
    let show = |id: &str| cairn(&["show", s(&repo), "--image", id, "--json"]).json();
    assert_eq!(ranges_of(&show(&inc_id)["unreadable"]["ranges"]), granules);
    assert_eq!(show(&full_id)["unreadable"]["count"], 0);
    let map = cairn(&["badmap", s(&repo), "--image", &inc_id]);
    map.ok();
    assert_eq!(map_minus(&map.stdout), granules, "{}", map.stdout);

    // A later backup that reads those ranges clears them, whether it stores them (the changed
    // granule) or not (the unchanged one, equal to the parent's data).
    let third = backup(s(&src), &repo, "failing", &[]);
    let third_id = id_of(&third);
    assert_eq!(third["bad_bytes"], 0);
    let v = cairn(&["verify", s(&repo), "--json"]).json();
    assert_eq!(point(&v, &third_id)["unreadable"]["count"], 0, "{v}");
    assert_eq!(point(&v, &inc_id)["unreadable"]["count"], 2, "{v}");
    assert_eq!(show(&third_id)["unreadable"]["count"], 0);
    let map = cairn(&["badmap", s(&repo), "--image", &third_id]);
    assert_eq!(map_minus(&map.stdout), vec![], "{}", map.stdout);
    let restored3 = w.join("restored3.img");
    let rr = cairn(&["restore", s(&repo), s(&restored3), "--image", &third_id]);
    rr.ok();
    assert!(!rr.stderr.contains("failing source"), "{}", rr.stderr);
    assert!(
        fs::read(&restored3).unwrap() == new,
        "third point = the source"
    );
}

#[test]
fn a_source_that_goes_away_or_changes_size_aborts_and_keeps_nothing() {
    let work = tempdir();
    let w = work.path();
    let src = w.join("src.img");
    let size = 8 * MIB;
    write_random_file(&src, size, 31);
    let repo = w.join("repo");
    let at = 3 * MIB + 4096;
    // The first image of a name, then an incremental: neither leaves anything behind.
    for step in ["full", "incremental"] {
        let before = repo.exists().then(|| repo_state(&repo));
        for (faults, says) in [
            (format!("ENODEV@{at}:512"), "went away during the backup"),
            (format!("ENXIO@{at}:512"), "went away during the backup"),
            (format!("ENOMEDIUM@{at}:512"), "went away during the backup"),
            (format!("ENOLINK@{at}:512"), "not a bad sector"),
            (format!("EREMOTEIO@{at}:512"), "not a bad sector"),
            (format!("size={}@{at}", size / 2), "changed size"),
            (format!("size={}@{at}", size * 2), "changed size"),
            (format!("size=0@{at}"), "went away during the backup"),
        ] {
            let out = backup_failing(s(&src), &repo, &faults, &[]);
            out.error();
            let line = out.error_line();
            assert!(line.contains(says), "{faults}: {line}");
            assert!(line.contains(s(&src)), "{faults}: names the source: {line}");
            if let Some(errno) = faults.split('@').next().filter(|e| e.starts_with('E')) {
                assert!(line.contains(errno), "{faults}: names {errno}: {line}");
            }
            assert!(
                !out.stderr.contains("narrowing it down"),
                "{faults}: not bisected as a bad sector: {}",
                out.stderr
            );
            let list = cairn(&["list", s(&repo), "--json"]).json();
            let n = if step == "full" { 0 } else { 1 };
            assert_eq!(list.as_array().unwrap().len(), n, "{faults}: no image kept");
            assert_eq!(
                dir_entries(&repo.join("tmp")),
                Vec::<std::path::PathBuf>::new()
            );
            if let Some(before) = &before {
                assert_eq!(&repo_state(&repo), before, "{faults}: repository unchanged");
            }
        }
        backup(s(&src), &repo, "failing", &[]);
    }
}

#[test]
fn media_errors_are_narrowed_down_whatever_their_errno() {
    let work = tempdir();
    let w = work.path();
    let src = w.join("src.img");
    write_random_file(&src, 8 * MIB, 41);
    let repo = w.join("repo");
    let faults = format!(
        "EIO@{}:512,ENODATA@{}:1,EILSEQ@{}:1024,ETIMEDOUT@{}:1",
        MIB,
        2 * MIB + 700,
        3 * MIB + 1024,
        6 * MIB + 4095
    );
    let out = backup_failing(s(&src), &repo, &faults, &[]);
    let bad = vec![
        (MIB, 512),
        (2 * MIB + 512, 512),
        (3 * MIB + 1024, 1024),
        (6 * MIB + 3584, 512),
    ];
    check_partial(&out, &bad);
    let restored = w.join("restored.img");
    restore(&repo, s(&restored), &[]);
    assert!(fs::read(&restored).unwrap() == zeroed(&src, &bad));
}

/// 400 000 scattered bad sectors: as JSON their list alone would pass the manifest's 16 MiB cap;
/// the image must still be committed, verified, mapped and restored.
#[test]
fn hundreds_of_thousands_of_bad_sectors_fit_in_an_image() {
    let work = tempdir();
    let w = work.path();
    let src = w.join("src.img");
    let size = 400 * MIB;
    write_sparse_file(&src, size);
    let f = fs::OpenOptions::new().write(true).open(&src).unwrap();
    write_random_at(&f, 0, 4 * MIB, 51);
    write_random_at(&f, 200 * MIB, 4 * MIB, 52);
    drop(f);
    let repo = w.join("repo");
    // Every other 512-byte sector from 512 on, 400 000 times: bisecting costs one read per good
    // sector, the injection nothing per range.
    let count = 400_000u64;
    let faults = format!("512:512/1024*{count}");
    let bad: Vec<(u64, u64)> = (0..count).map(|k| (512 + k * 1024, 512)).collect();
    let out = backup_failing(s(&src), &repo, &faults, &["--max-bad", "none", "--quiet"]);
    let r = check_partial(&out, &bad);
    assert_eq!(r["bad_bytes"], count * 512);
    let id = id_of(&r);
    let manifest = image_dir(&repo, &id).join("manifest");
    assert!(
        fs::metadata(&manifest).unwrap().len() < 64 << 10,
        "the bad ranges are not in the manifest's JSON"
    );

    cairn(&["verify", s(&repo)]).ok();
    let map = cairn(&["badmap", s(&repo)]);
    map.ok();
    assert_eq!(
        map_minus(&map.stdout),
        bad,
        "badmap lists exactly the injected sectors"
    );
    let restored = w.join("restored.img");
    restore(&repo, s(&restored), &[]);
    assert!(fs::read(&restored).unwrap() == zeroed(&src, &bad));
}

#[test]
fn a_damaged_bad_range_list_is_reported() {
    let work = tempdir();
    let w = work.path();
    let src = w.join("src.img");
    write_random_file(&src, 4 * MIB, 61);
    let repo = w.join("repo");
    let out = backup_failing(s(&src), &repo, &format!("{}:512", MIB), &[]);
    let id = id_of(&check_partial(&out, &[(MIB, 512)]));
    flip_byte(&image_dir(&repo, &id).join("badranges"), 30);
    let v = cairn(&["verify", s(&repo), "--json"]);
    v.error();
    assert_eq!(v.json()["images"][0]["status"], "damaged");
    cairn(&["badmap", s(&repo)])
        .error()
        .assert_mentions("badranges");
    cairn(&["restore", s(&repo), s(&w.join("r.img"))])
        .error()
        .assert_mentions("badranges");
}
