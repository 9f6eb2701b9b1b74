//! Image order, identity and damage: the newest point comes from the repository's sequence, not
//! the clock; an unreadable newest image is never replaced by an older one; a backup never writes
//! onto a broken chain.

mod common;

use common::*;
use serde_json::Value;
use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Command, Stdio};

/// Overwrites `len` bytes at `offset` of a file with data from `seed`.
fn scribble(path: &Path, offset: u64, len: usize, seed: u64) {
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&random_vec(seed, len)).unwrap();
    f.sync_all().unwrap();
}

fn list_ids(repo: &Path) -> Vec<String> {
    let out = cairn(&["list", s(repo), "--json"]);
    out.ok();
    out.json()
        .as_array()
        .expect("list --json is an array")
        .iter()
        .map(id_of)
        .collect()
}

fn verify_status(report: &Value, id: &str) -> String {
    report["images"]
        .as_array()
        .expect("verify report has images")
        .iter()
        .find(|i| i["id"] == id)
        .unwrap_or_else(|| panic!("verify does not report image {id}: {report}"))["status"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Restores the newest point of `name` (no `--image`) and checks its bytes against `truth`.
fn assert_newest_restores_to(repo: &Path, name: &str, truth: &Path, expect_id: &str) {
    let out = truth.with_extension("restored");
    let _ = fs::remove_file(&out);
    let r = restore(repo, s(&out), &["--name", name]);
    assert_eq!(id_of(&r), expect_id, "restore chose another image: {r}");
    assert_same_content(&out, truth);
    fs::remove_file(&out).unwrap();
}

#[test]
fn a_backup_under_a_clock_set_years_back_is_the_newest_point() {
    let faketime = require_tool("faketime", "faketime");
    let work = tempdir();
    let w = work.path();
    let src = w.join("src.img");
    let repo = w.join("repo");
    write_random_file(&src, 8 * MIB, 1);
    let full = backup(s(&src), &repo, "t", &[]);

    // The rescue system's clock says 2019: two backups, the second within the same fake second.
    let mut ids = vec![id_of(&full)];
    for round in 0..2u64 {
        scribble(&src, (3 + round) * MIB, 65536, 2 + round);
        let o = Command::new(&faketime)
            .args(["2019-01-01 00:00:00", bin(), "backup", s(&src), s(&repo)])
            .args(["--name", "t", "--json"])
            .stdin(Stdio::null())
            .output()
            .expect("run faketime");
        assert!(
            o.status.success(),
            "backup under faketime failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let r: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(
            id_of(&r).starts_with("2019"),
            "faketime did not take effect: {r}"
        );
        assert_eq!(
            r["parent"],
            ids.last().unwrap().as_str(),
            "round {round}: the parent must be the newest point, whatever the clock: {r}"
        );
        ids.push(id_of(&r));
    }
    assert_ne!(ids[1], ids[2], "ids stay unique when the clock repeats");
    assert_eq!(
        list_ids(&repo),
        ids,
        "list shows the images in backup order"
    );
    let truth = w.join("truth.img");
    fs::copy(&src, &truth).unwrap();
    assert_newest_restores_to(&repo, "t", &truth, &ids[2]);

    // The next backup, with the clock right again, builds on the image of the wrong clock.
    scribble(&src, 5 * MIB, 65536, 9);
    let next = backup(s(&src), &repo, "t", &[]);
    assert_eq!(next["kind"], "incremental");
    assert_eq!(
        next["parent"], ids[2],
        "the next incremental's parent is the image taken under the wrong clock: {next}"
    );
    ids.push(id_of(&next));
    assert_eq!(list_ids(&repo), ids);
    fs::copy(&src, &truth).unwrap();
    assert_newest_restores_to(&repo, "t", &truth, &ids[3]);
}

#[test]
fn restore_by_name_refuses_when_the_newest_manifest_is_damaged() {
    let work = tempdir();
    let w = work.path();
    let src = w.join("src.img");
    let repo = w.join("repo");
    write_random_file(&src, 8 * MIB, 10);
    backup(s(&src), &repo, "t", &[]);
    scribble(&src, MIB, 65536, 11);
    let older = id_of(&backup(s(&src), &repo, "t", &[]));
    let older_truth = w.join("older.img");
    fs::copy(&src, &older_truth).unwrap();
    scribble(&src, 2 * MIB, 65536, 12);
    let newest = id_of(&backup(s(&src), &repo, "t", &[]));
    let newest_truth = w.join("newest.img");
    fs::copy(&src, &newest_truth).unwrap();

    let manifest = image_dir(&repo, &newest).join("manifest");
    flip_byte(&manifest, fs::metadata(&manifest).unwrap().len() - 40);

    let target = w.join("target.img");
    let out = cairn(&["restore", s(&repo), s(&target), "--name", "t"]);
    out.error();
    assert!(
        out.error_line().contains(&newest),
        "the error must name the damaged newest image {newest}: {}",
        out.describe()
    );
    out.assert_mentions("--image").assert_mentions("verify");
    assert!(!target.exists(), "nothing may be written");
    // `show` picks the same way.
    cairn(&["show", s(&repo), "--name", "t"]).error();

    // An older point is still there for whoever asks for it by id.
    restore(repo.as_path(), s(&target), &["--image", &older]);
    assert_same_content(&target, &older_truth);
    fs::remove_file(&target).unwrap();

    let v = cairn(&["verify", s(&repo), "--name", "t", "--json"]);
    v.failed();
    let report = v.json();
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(verify_status(&report, &newest), "damaged", "{report}");
    assert_eq!(verify_status(&report, &older), "ok", "{report}");

    // A damaged image that provably is not the newest (a later backup holds the repository's
    // highest sequence) does not block restoring the newest point.
    scribble(&src, 3 * MIB, 65536, 13);
    let later = backup(s(&src), &repo, "t", &[]);
    assert_eq!(
        later["parent"], older,
        "the damaged image is never a parent: {later}"
    );
    fs::copy(&src, &newest_truth).unwrap();
    assert_newest_restores_to(&repo, "t", &newest_truth, &id_of(&later));
}

/// F, I1, I2, then I1 removed by hand: the next backup is relative to F (the last restorable
/// point) by compare-scan and says so; it never builds on I2.
fn assert_skips_the_broken_chain(r: &Value, full: &str, broken: &str) {
    assert_eq!(r["kind"], "incremental", "{r}");
    assert_eq!(
        r["parent"], full,
        "the parent must be the last restorable point: {r}"
    );
    assert_eq!(r["method"], "compare-scan", "{r}");
    let note = r["note"].as_str().unwrap_or_default();
    assert!(
        note.contains(broken) && note.contains(full),
        "the note must name the broken image and the parent taken instead: {r}"
    );
}

#[test]
fn an_untracked_backup_after_a_middle_image_was_deleted_builds_on_the_last_restorable_point() {
    let work = tempdir();
    let w = work.path();
    let src = w.join("src.img");
    let repo = w.join("repo");
    write_random_file(&src, 8 * MIB, 20);
    let full = id_of(&backup(s(&src), &repo, "t", &[]));
    scribble(&src, MIB, 65536, 21);
    let middle = id_of(&backup(s(&src), &repo, "t", &[]));
    scribble(&src, 2 * MIB, 65536, 22);
    let last = id_of(&backup(s(&src), &repo, "t", &[]));
    fs::remove_dir_all(image_dir(&repo, &middle)).unwrap();
    scribble(&src, 3 * MIB, 65536, 23);

    let r = backup(s(&src), &repo, "t", &[]);
    assert_skips_the_broken_chain(&r, &full, &last);
    let truth = w.join("truth.img");
    fs::copy(&src, &truth).unwrap();
    assert_newest_restores_to(&repo, "t", &truth, &id_of(&r));
}

#[test]
fn a_tracked_backup_after_a_middle_image_was_deleted_builds_on_the_last_restorable_point() {
    require_root();
    let work = tempdir();
    let w = work.path();
    let disk = LoopDev::new_zeroed(&w.join("disk.img"), 32 * MIB);
    let state = w.join("state");
    let repo = w.join("repo");
    let _tracker = TrackerProc::start(&disk.dev, &state);
    let backup_tracked = || {
        let out = cairn_env(
            &["backup", &disk.dev, s(&repo), "--name", "disk", "--json"],
            &[("CAIRN_STATE_DIR", s(&state))],
        );
        out.ok();
        out.json()
    };
    direct_write(&disk.dev, MIB, 65536, 30);
    let full = id_of(&backup_tracked());
    direct_write(&disk.dev, 5 * MIB, 8192, 31);
    let middle = backup_tracked();
    assert_eq!(middle["method"], "tracked", "{middle}");
    direct_write(&disk.dev, 9 * MIB, 8192, 32);
    let last = backup_tracked();
    assert_eq!(last["method"], "tracked", "{last}");
    fs::remove_dir_all(image_dir(&repo, &id_of(&middle))).unwrap();
    direct_write(&disk.dev, 13 * MIB, 8192, 33);

    let r = backup_tracked();
    assert_skips_the_broken_chain(&r, &full, &id_of(&last));
    let truth = w.join("truth.img");
    copy_device(&disk.dev, &truth);
    assert_newest_restores_to(&repo, "disk", &truth, &id_of(&r));

    // The compare-scan re-establishes continuity: the next one is tracked again, and exact.
    direct_write(&disk.dev, 17 * MIB, 8192, 34);
    let r2 = backup_tracked();
    assert_eq!(r2["method"], "tracked", "{r2}");
    assert_eq!(r2["parent"], r["id"], "{r2}");
    copy_device(&disk.dev, &truth);
    assert_newest_restores_to(&repo, "disk", &truth, &id_of(&r2));
}
