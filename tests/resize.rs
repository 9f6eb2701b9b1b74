//! Chains whose source changes size: a region that lay outside the source at some image of the
//! chain reads as zero from that image on, unless a later image stores it. Every restore point is
//! restored and compared byte for byte with a copy of the source taken when it was imaged, and
//! `verify` and `restore --verify` must agree with what restore wrote.

mod common;

use common::*;
use serde_json::Value;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

fn set_len(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Restores `id` into a fresh file (with `--verify`) and compares it with `truth`.
fn assert_point(repo: &Path, id: &str, truth: &Path, work: &Path) {
    let out = work.join(format!("restored-{id}.img"));
    let _ = fs::remove_file(&out);
    let r = cairn(&[
        "restore",
        s(repo),
        s(&out),
        "--image",
        id,
        "--verify",
        "--yes",
        "--json",
    ]);
    r.ok();
    assert_eq!(r.json()["verified"], Value::Bool(true), "{}", r.describe());
    assert_same_content(truth, &out);
    fs::remove_file(&out).unwrap();
}

fn assert_verify_ok(repo: &Path) {
    let v = cairn(&["verify", s(repo), "--json"]);
    v.ok();
    let j = v.json();
    assert_eq!(j["ok"], Value::Bool(true), "{j}");
    for img in j["images"].as_array().unwrap() {
        assert_eq!(img["restorable"], Value::Bool(true), "{img}");
    }
}

/// The reproduction from the issue: 64 MiB of random data, shrunk to 48 MiB, grown back to
/// 64 MiB with zeros; before the fix the last 16 MiB came back as the full image's old data.
#[test]
fn shrunk_then_grown_file_restores_zeros_not_the_full_images_data() {
    let work = tempdir();
    let w = work.path();
    let src = w.join("d.img");
    let repo = w.join("r");
    write_random_file(&src, 64 * MIB, 1);
    let mut points: Vec<(String, PathBuf)> = Vec::new();
    for (step, len) in [(0, 64 * MIB), (1, 48 * MIB), (2, 64 * MIB)] {
        if step > 0 {
            set_len(&src, len);
        }
        let r = backup(s(&src), &repo, "t", &[]);
        let truth = w.join(format!("truth-{step}.img"));
        fs::copy(&src, &truth).unwrap();
        points.push((id_of(&r), truth));
    }
    let out = w.join("out.img");
    restore(&repo, s(&out), &["--name", "t", "--yes"]);
    assert_same_content(&src, &out);
    for (id, truth) in &points {
        assert_point(&repo, id, truth, w);
    }
    assert_verify_ok(&repo);
}

/// Sizes that are not a multiple of the granule: the tail granule of a shrunk image is partly
/// outside its source, and those bytes must read as zero after the source grows again, while a
/// later image that does store them wins.
#[test]
fn unaligned_shrink_and_growth_keep_every_point_exact() {
    let work = tempdir();
    let w = work.path();
    let src = w.join("d.img");
    let repo = w.join("r");
    write_random_file(&src, 20 * MIB + 4096 * 3, 2);
    let mut points: Vec<(String, PathBuf)> = Vec::new();
    let steps: [(u64, Option<(u64, u64)>); 6] = [
        (20 * MIB + 4096 * 3, None),
        (12 * MIB + 1000, None), // shrink into the middle of a granule
        (16 * MIB, None),        // grow: zeros past 12 MiB + 1000
        (16 * MIB, Some((13 * MIB, 8192))), // new data inside the regrown region
        (5 * MIB + 512, None),   // shrink again, below every earlier size
        (20 * MIB + 4096 * 3, None), // and back to the original size
    ];
    for (step, (len, write)) in steps.into_iter().enumerate() {
        set_len(&src, len);
        if let Some((off, n)) = write {
            let f = OpenOptions::new().write(true).open(&src).unwrap();
            write_random_at(&f, off, n, 100 + step as u64);
        }
        let kind = if step == 4 { "--differential" } else { "" };
        let extra: Vec<&str> = if kind.is_empty() { vec![] } else { vec![kind] };
        let r = backup(s(&src), &repo, "t", &extra);
        let truth = w.join(format!("truth-{step}.img"));
        fs::copy(&src, &truth).unwrap();
        points.push((id_of(&r), truth));
    }
    for (id, truth) in &points {
        assert_point(&repo, id, truth, w);
    }
    assert_verify_ok(&repo);
}

/// The same on a loop device resized under a running tracker (`losetup -c`): the size change
/// breaks continuity, the compare-scans that follow must not inherit the full image's bytes past
/// the shrunk size, and tracking resumes exactly afterwards.
#[test]
fn loop_device_resized_under_a_running_tracker() {
    require_root();
    let losetup = require_tool("losetup", "util-linux");
    let work = tempdir();
    let w = work.path();
    let backing = w.join("disk.img");
    write_random_file(&backing, 64 * MIB, 3);
    let disk = LoopDev::attach(&backing);
    let dev = s(disk.path()).to_string();
    let state = w.join("state");
    let repo = w.join("repo");
    let tracker = TrackerProc::start(&dev, &state);
    let backup_tracked = |what: &str| -> Value {
        let o = cairn_env(
            &["backup", &dev, s(&repo), "--name", "disk", "--json"],
            &[("CAIRN_STATE_DIR", s(&state))],
        );
        o.ok();
        let j = o.json();
        eprintln!("{what}: {} {}", j["method"], j["method_reason"]);
        j
    };
    let snapshot = |step: usize| -> PathBuf {
        let truth = w.join(format!("truth-{step}.img"));
        let mut from = File::open(&dev).unwrap();
        let mut to = File::create(&truth).unwrap();
        std::io::copy(&mut from, &mut to).unwrap();
        truth
    };
    let resize = |len: u64| {
        set_len(&backing, len);
        let o = run_tool(&losetup, &["-c", &dev]);
        assert!(o.status.success(), "losetup -c: {o:?}");
        assert_eq!(
            disk.size(),
            len,
            "the loop device did not take the new size"
        );
    };
    let mut points = Vec::new();
    let r = backup_tracked("full");
    assert_eq!(r["method"], "full");
    points.push((id_of(&r), snapshot(0)));

    resize(48 * MIB);
    let r = backup_tracked("after shrink");
    assert_eq!(r["method"], "compare-scan", "a size change is a gap: {r}");
    points.push((id_of(&r), snapshot(1)));

    resize(64 * MIB);
    let r = backup_tracked("after growth");
    assert_eq!(r["method"], "compare-scan", "a size change is a gap: {r}");
    points.push((id_of(&r), snapshot(2)));

    // Tracking is exact again after the compare-scan, inside the regrown region too.
    {
        let f = OpenOptions::new().write(true).open(&dev).unwrap();
        write_random_at(&f, 56 * MIB, 3 * 4096, 9);
        f.sync_all().unwrap();
    }
    let r = backup_tracked("tracked after growth");
    assert_eq!(r["method"], "tracked", "{r}");
    points.push((id_of(&r), snapshot(3)));

    drop(tracker);
    for (id, truth) in &points {
        assert_point(&repo, id, truth, w);
    }
    assert_verify_ok(&repo);
    drop(disk);
}
