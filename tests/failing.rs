//! Failing sources: read errors are narrowed down to the unreadable sectors, which become zeros
//! recorded in a bad-sector map; the backup finishes with exit status 3. Errors are injected with
//! CAIRN_FAULT_READ (this kernel has no device-mapper; the vm-tests use dm-error).

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
