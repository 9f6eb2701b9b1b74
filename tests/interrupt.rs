//! A backup killed with SIGKILL mid-way must leave the repository consistent:
//! earlier images intact, the partial image invisible, the next backup
//! succeeding and cleaning up REPO/tmp.

mod common;

use common::*;
use std::os::unix::process::ExitStatusExt;
use std::thread;
use std::time::Duration;

#[test]
fn killed_backup_leaves_repository_consistent() {
    let t = tempdir();
    let repo = t.path().join("repo");

    // One complete image first.
    let small = t.path().join("small.img");
    write_mixed_file(&small, 4 * MIB + 5, 1);
    let first_id = id_of(&backup(s(&small), &repo, "small", &[]));

    // ~1 GiB of incompressible data so the backup runs long enough.
    let big = t.path().join("big.img");
    write_random_file(&big, GIB, 2);

    let mut bg = Bg::spawn(
        &[
            "backup",
            s(&big),
            s(&repo),
            "--name",
            "big",
            "--segment-size",
            "256M",
        ],
        t.path(),
        "big-backup",
    );
    // Poll a real condition: an in-progress segment in REPO/tmp > 8 MiB.
    let tmp = repo.join("tmp");
    loop {
        if largest_segment_below(&tmp) > 8 * MIB {
            break;
        }
        if !bg.running() {
            let out = bg.finish();
            panic!(
                "backup ended before an in-progress segment > 8 MiB appeared in REPO/tmp:\n{}",
                out.describe()
            );
        }
        thread::sleep(Duration::from_millis(2));
    }
    bg.child.kill().expect("send SIGKILL");
    let out = bg.finish();
    assert_eq!(
        out.status.signal(),
        Some(9),
        "the backup was supposed to be killed mid-way but exited by itself:\n{}",
        out.describe()
    );
    assert!(
        !dir_entries(&tmp).is_empty(),
        "an interrupted backup should leave its directory in REPO/tmp"
    );

    // Only the earlier complete image is visible.
    let list = cairn(&["list", s(&repo), "--json"]);
    list.ok();
    let v = list.json();
    let arr = v.as_array().expect("list --json array");
    let ids: Vec<String> = arr.iter().map(id_of).collect();
    assert_eq!(ids, vec![first_id.clone()], "list after kill: {v}");
    assert!(
        arr.iter().all(|e| e["name"] != "big"),
        "partial image listed: {v}"
    );

    let ver = cairn(&["verify", s(&repo), "--json"]);
    ver.ok();
    assert_eq!(ver.json()["ok"], true, "verify after kill: {}", ver.stdout);

    // The next backup succeeds and cleans REPO/tmp.
    let small2 = t.path().join("small2.img");
    write_mixed_file(&small2, 3 * MIB + 77, 3);
    let second_id = id_of(&backup(s(&small2), &repo, "small2", &[]));
    assert!(
        dir_entries(&tmp).is_empty(),
        "REPO/tmp not cleaned by the next backup: {:?}",
        dir_entries(&tmp)
    );

    let list = cairn(&["list", s(&repo), "--json"]);
    list.ok();
    let mut ids: Vec<String> = list
        .json()
        .as_array()
        .expect("list --json array")
        .iter()
        .map(id_of)
        .collect();
    ids.sort();
    let mut want = vec![first_id, second_id];
    want.sort();
    assert_eq!(ids, want);
    cairn(&["verify", s(&repo)]).ok();

    let d1 = t.path().join("small.restored");
    restore(&repo, s(&d1), &["--name", "small"]);
    assert_same_content(&small, &d1);
    let d2 = t.path().join("small2.restored");
    restore(&repo, s(&d2), &["--name", "small2"]);
    assert_same_content(&small2, &d2);
}
