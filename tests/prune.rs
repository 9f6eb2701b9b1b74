//! Retention: prune, delete and protect on real chains (docs/prune.md). Every kept point must
//! restore to exactly the bytes it was taken from and verify; removed points are gone; what a dry
//! run says it frees is what the prune frees; an interrupted prune leaves every point restorable
//! and the next prune finishes it; the format-1 fixture still restores and prunes.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

/// A chain with its points' contents: (id, blake3 of the source when the image was taken).
struct Chain {
    _dir: tempfile::TempDir,
    repo: PathBuf,
    points: Vec<(String, String)>,
    work: PathBuf,
}

/// Random changes of 4 KiB to 64 KiB at granule offsets, and one whole block, per step.
fn scribble(path: &Path, size: u64, seed: u64) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    let r = random_vec(seed, 64);
    for i in 0..8 {
        let at = (u64::from(r[i * 2]) * 256 + u64::from(r[i * 2 + 1])) * 4096 % (size - 64 * KIB);
        let len = (u64::from(r[16 + i]) % 16 + 1) * 4096;
        write_random_at(&f, at, len, seed * 100 + i as u64);
    }
    let block = u64::from(r[40]) % (size / MIB) * MIB;
    if seed % 3 == 0 {
        f.write_all_at_zero(block);
    } else {
        write_random_at(&f, block, MIB, seed * 1000);
    }
    f.sync_all().unwrap();
}

trait ZeroBlock {
    fn write_all_at_zero(&self, at: u64);
}

impl ZeroBlock for std::fs::File {
    fn write_all_at_zero(&self, at: u64) {
        std::os::unix::fs::FileExt::write_all_at(self, &vec![0u8; MIB as usize], at).unwrap();
    }
}

/// full, inc, inc, diff, inc, inc, inc of a 12 MiB file with random changes.
fn file_chain() -> Chain {
    let dir = tempdir();
    let src = dir.path().join("src.img");
    let size = 12 * MIB;
    write_mixed_file(&src, size, 1);
    let repo = dir.path().join("repo");
    let mut points = Vec::new();
    for (i, kind) in [
        "--full",
        "--incremental",
        "--incremental",
        "--differential",
        "--incremental",
        "--incremental",
        "--incremental",
    ]
    .iter()
    .enumerate()
    {
        if i > 0 {
            scribble(&src, size, i as u64);
        }
        let v = backup(s(&src), &repo, "disk", &[kind]);
        points.push((id_of(&v), hash_path(&src)));
    }
    Chain {
        work: dir.path().to_path_buf(),
        _dir: dir,
        repo,
        points,
    }
}

fn copy_repo(from: &Path, to: &Path) {
    let o = std::process::Command::new("cp")
        .args(["-a", s(from), s(to)])
        .output()
        .unwrap();
    assert!(o.status.success(), "cp -a: {o:?}");
}

fn listed_ids(repo: &Path) -> Vec<String> {
    cairn(&["list", s(repo), "--json"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(id_of)
        .collect()
}

/// Restores point `id` and checks it is `want` byte for byte, then verifies it.
fn assert_point(repo: &Path, work: &Path, id: &str, want: &str) {
    let target = work.join(format!("restored-{id}.img"));
    let _ = std::fs::remove_file(&target);
    restore(repo, s(&target), &["--image", id, "-y"]);
    assert_eq!(
        hash_path(&target),
        want,
        "point {id} does not restore to the bytes it was taken from"
    );
    std::fs::remove_file(&target).unwrap();
    cairn(&["verify", s(repo), "--image", id, "--json"]).ok();
}

fn prune_json(repo: &Path, args: &[&str]) -> Value {
    let mut a = vec!["prune", s(repo), "--json"];
    a.extend_from_slice(args);
    cairn(&a).ok().json()
}

fn kept_ids(report: &Value) -> Vec<String> {
    report["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["keep"] == true)
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect()
}

/// Each kind of rule on copies of one chain: the points the decision keeps are exactly the
/// repository's images afterwards, each restores byte-exact and verifies, and the space freed is
/// what the dry run announced.
#[test]
fn each_rule_keeps_exact_points_and_frees_what_the_dry_run_said() {
    let chain = file_chain();
    let ids: Vec<&str> = chain.points.iter().map(|(id, _)| id.as_str()).collect();
    let want: BTreeMap<&str, &str> = chain
        .points
        .iter()
        .map(|(id, h)| (id.as_str(), h.as_str()))
        .collect();
    let total = |r: &Value| r["bytes_before"].as_u64().unwrap();
    let cases: Vec<(Vec<String>, Option<Vec<&str>>)> = vec![
        // The full and the first incrementals go: the differential's full goes too.
        (
            vec!["--keep-last".into(), "3".into()],
            Some(ids[4..].to_vec()),
        ),
        (
            vec!["--keep-last".into(), "1".into()],
            Some(ids[6..].to_vec()),
        ),
        // Everything was taken within the same minute: one daily point (the newest) plus last 2.
        (
            vec![
                "--keep-daily".into(),
                "1".into(),
                "--keep-last".into(),
                "2".into(),
            ],
            Some(ids[5..].to_vec()),
        ),
        (vec!["--keep-within".into(), "1h".into()], Some(ids.clone())),
        (
            vec![
                "--keep-hourly".into(),
                "1".into(),
                "--keep-weekly".into(),
                "1".into(),
                "--keep-monthly".into(),
                "1".into(),
            ],
            Some(ids[6..].to_vec()),
        ),
        // A size the repository cannot reach without its newest point: only the newest is left.
        (
            vec!["--max-size".into(), "1".into()],
            Some(ids[6..].to_vec()),
        ),
    ];
    for (n, (rules, expect)) in cases.into_iter().enumerate() {
        let repo = chain.work.join(format!("case-{n}"));
        copy_repo(&chain.repo, &repo);
        let rules: Vec<&str> = rules.iter().map(String::as_str).collect();
        let mut dry = rules.clone();
        dry.push("--dry-run");
        let plan = prune_json(&repo, &dry);
        assert_eq!(
            listed_ids(&repo).len(),
            ids.len(),
            "a dry run changed nothing"
        );
        let done = prune_json(&repo, &rules);
        let kept = kept_ids(&done);
        assert_eq!(
            kept,
            kept_ids(&plan),
            "{rules:?}: the dry run decided the same"
        );
        if let Some(e) = &expect {
            assert_eq!(kept, *e, "{rules:?}");
        }
        assert_eq!(
            listed_ids(&repo),
            kept,
            "{rules:?}: removed points are gone"
        );
        assert_eq!(
            done["freed_bytes"], plan["freed_bytes"],
            "{rules:?}: the prune freed what the dry run said ({plan})"
        );
        assert_eq!(total(&done), total(&plan));
        assert_eq!(
            done["bytes_after"].as_u64().unwrap(),
            dir_size(&repo.join("images")) + dir_size(&repo.join("segments")),
            "{rules:?}: what the report says is left is what is on disk"
        );
        for id in &kept {
            assert_point(&repo, &chain.work, id, want[id.as_str()]);
        }
        cairn(&["verify", s(&repo)]).ok();
        std::fs::remove_dir_all(&repo).unwrap();
    }
}

/// A second prune of an already pruned chain (a synthetic full pruned again, windows of windows)
/// and a later backup on top: every point stays exact.
#[test]
fn pruning_twice_and_backing_up_after_keeps_points_exact() {
    let chain = file_chain();
    let repo = &chain.repo;
    let want: BTreeMap<String, String> = chain.points.iter().cloned().collect();
    prune_json(repo, &["--keep-last", "5"]);
    prune_json(repo, &["--keep-last", "2"]);
    let kept = listed_ids(repo);
    assert_eq!(kept.len(), 2);
    for id in &kept {
        assert_point(repo, &chain.work, id, &want[id]);
    }
    // A backup after the prune takes the newest kept point as its parent.
    let src = chain.work.join("src.img");
    scribble(&src, 12 * MIB, 40);
    let v = backup(s(&src), repo, "disk", &["--incremental"]);
    assert_point(repo, &chain.work, &id_of(&v), &hash_path(&src));
    prune_json(repo, &["--keep-last", "1"]);
    assert_point(repo, &chain.work, &id_of(&v), &hash_path(&src));
}

/// `delete` of a middle incremental merges it into its successor; a protected point is refused
/// by delete and survives prune.
#[test]
fn delete_merges_into_the_successor_and_protect_refuses() {
    let chain = file_chain();
    let repo = &chain.repo;
    let want: BTreeMap<String, String> = chain.points.iter().cloned().collect();
    let ids: Vec<String> = chain.points.iter().map(|p| p.0.clone()).collect();
    let r = cairn(&["delete", s(repo), "--image", &ids[1], "--json"])
        .ok()
        .json();
    let rewritten = r["rewritten"].as_array().unwrap();
    assert_eq!(rewritten.len(), 1, "{r}");
    assert_eq!(rewritten[0]["id"], ids[2].as_str());
    assert_eq!(rewritten[0]["parent"], ids[0].as_str());
    assert!(!listed_ids(repo).contains(&ids[1]));
    for id in listed_ids(repo) {
        assert_point(repo, &chain.work, &id, &want[&id]);
    }
    cairn(&["protect", s(repo), "--image", &ids[0]]).ok();
    let e = cairn(&["delete", s(repo), "--image", &ids[0]]);
    e.error();
    e.assert_mentions("protected");
    let r = prune_json(repo, &["--keep-last", "1"]);
    assert_eq!(kept_ids(&r), vec![ids[0].clone(), ids[6].clone()]);
    for id in [&ids[0], &ids[6]] {
        assert_point(repo, &chain.work, id, &want[id]);
    }
    cairn(&["protect", s(repo), "--image", &ids[0], "--unprotect"]).ok();
    prune_json(repo, &["--keep-last", "1"]);
    assert_eq!(listed_ids(repo), vec![ids[6].clone()]);
    assert_point(repo, &chain.work, &ids[6], &want[&ids[6]]);
    let e = cairn(&["prune", s(repo)]);
    e.error();
    e.assert_mentions("no keep rule");
}

/// kill -9 at every step of a prune (the process kills itself at step N, `CAIRN_FAULT_PRUNE_KILL_AT`),
/// then: every image still listed restores to its point's bytes; a prune with the same rules
/// finishes; every kept point is exact and nothing of the removed ones is left.
#[test]
fn a_prune_killed_at_any_step_leaves_every_point_exact_and_the_next_prune_finishes() {
    let chain = file_chain();
    let want: BTreeMap<String, String> = chain.points.iter().cloned().collect();
    let mut finished = false;
    for n in 1..200u64 {
        let repo = chain.work.join(format!("kill-{n}"));
        copy_repo(&chain.repo, &repo);
        let kill = n.to_string();
        let out = cairn_env(
            &["prune", s(&repo), "--keep-last", "2", "--json"],
            &[("CAIRN_FAULT_PRUNE_KILL_AT", &kill)],
        );
        if out.status.success() {
            finished = true;
            std::fs::remove_dir_all(&repo).unwrap();
            assert!(n > 5, "the prune has more steps than {n}");
            break;
        }
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(9), "{}", out.describe());
        for id in listed_ids(&repo) {
            assert_point(&repo, &chain.work, &id, &want[&id]);
        }
        let r = prune_json(&repo, &["--keep-last", "2"]);
        let kept = kept_ids(&r);
        assert_eq!(listed_ids(&repo), kept);
        assert_eq!(kept.len(), 2);
        for id in &kept {
            assert_point(&repo, &chain.work, id, &want[id]);
        }
        assert!(
            std::fs::read_dir(repo.join("tmp"))
                .unwrap()
                .next()
                .is_none(),
            "step {n}: leftovers in tmp/"
        );
        let report = cairn(&["list", s(&repo), "--json", "--totals"]).ok().json();
        assert_eq!(
            report["reclaimable_bytes"], 0,
            "step {n}: garbage left: {report}"
        );
        std::fs::remove_dir_all(&repo).unwrap();
    }
    assert!(finished, "the prune never ran to its end");
}

/// The format-1 fixture (made by cairn before format 2) restores each point exactly, and is
/// pruned: the kept points stay exact and verify.
#[test]
fn the_format_1_fixture_restores_and_is_pruned() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1-repo");
    let points: Vec<(String, String)> = std::fs::read_to_string(fixture.with_extension("points"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_string(), f[2].to_string())
        })
        .collect();
    assert_eq!(points.len(), 4);
    let dir = tempdir();
    let repo = dir.path().join("repo");
    copy_repo(&fixture, &repo);
    let sha = |p: &Path| {
        let o = std::process::Command::new("sha256sum")
            .arg(p)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let check = |id: &str, want: &str| {
        let t = dir.path().join("t.img");
        let _ = std::fs::remove_file(&t);
        restore(&repo, s(&t), &["--image", id, "-y"]);
        assert_eq!(sha(&t), want, "point {id}");
        cairn(&["verify", s(&repo), "--image", id]).ok();
    };
    for (id, want) in &points {
        check(id, want);
    }
    let r = prune_json(&repo, &["--keep-last", "2"]);
    assert_eq!(kept_ids(&r), vec![points[2].0.clone(), points[3].0.clone()]);
    for (id, want) in &points[2..] {
        check(id, want);
    }
    let marker: Value =
        serde_json::from_slice(&std::fs::read(repo.join("cairn-repository")).unwrap()).unwrap();
    assert_eq!(
        marker["version"], 2,
        "the first write upgraded the repository"
    );
}

/// A restore running while a prune wants the repository: the prune waits (naming who it waits
/// for when it gives up), and the restore is exact.
#[test]
fn a_prune_waits_for_readers_and_names_them() {
    let chain = file_chain();
    let repo = &chain.repo;
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(repo.join("lock.remove"))
        .unwrap();
    // SAFETY: flock on an open descriptor; no memory involved.
    assert_eq!(
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_SH) },
        0
    );
    let me = std::process::id();
    let record = repo.join("lock.readers").join(format!("{me}.test"));
    std::fs::create_dir_all(record.parent().unwrap()).unwrap();
    std::fs::write(&record, format!("{me} the-test-holding-the-lock\n")).unwrap();
    let e = cairn(&["prune", s(repo), "--keep-last", "1"]);
    e.error();
    e.assert_mentions(&format!("pid {me} the-test-holding-the-lock"));
    let e = cairn(&["prune", s(repo), "--keep-last", "1", "--wait", "300ms"]);
    e.error();
    e.assert_mentions("waited");
    drop(lock);
    std::fs::remove_file(&record).unwrap();
    // A real reader and a prune at once: whichever gets the lock first, the restore is exact.
    let (newest, want) = chain.points.last().unwrap().clone();
    let target = chain.work.join("during.img");
    let mut bg = Bg::spawn(
        &["restore", s(repo), s(&target), "--image", &newest, "-y"],
        &chain.work,
        "restore",
    );
    // The restore holds the lock once its record appears (or it is already done).
    while bg.running()
        && std::fs::read_dir(repo.join("lock.readers")).map_or(true, |mut d| d.next().is_none())
    {
        std::thread::yield_now();
    }
    let p = cairn(&[
        "prune",
        s(repo),
        "--keep-last",
        "1",
        "--wait",
        "10min",
        "--json",
    ]);
    p.ok();
    bg.finish().ok();
    assert_eq!(hash_path(&target), want);
    assert_point(repo, &chain.work, &newest, &want);
}

/// Pruning a full and five incrementals down to two points writes new indexes and manifests, not
/// data: the bytes the prune process writes (/proc/PID/io write_bytes, read before it is reaped)
/// are at most twice the merged incrementals' stored bytes plus the indexes.
#[test]
fn a_merge_writes_at_most_twice_the_merged_incrementals_and_indexes() {
    let chain = file_chain();
    let repo = &chain.repo;
    let ids: Vec<String> = chain.points.iter().map(|p| p.0.clone()).collect();
    let stored = |id: &str| {
        let m = std::fs::read_to_string(repo.join("images").join(id).join("manifest")).unwrap();
        let v: Value = serde_json::from_str(m.split_once('\n').unwrap().1).unwrap();
        (
            v["stats"]["stored_bytes"].as_u64().unwrap() - v["index"]["size"].as_u64().unwrap(),
            v["index"]["size"].as_u64().unwrap(),
            m.len() as u64,
        )
    };
    // --keep-last 2 removes the full, i1, i2, the differential and i4; it rewrites i5.
    let mut bound = 0u64;
    for (n, id) in ids.iter().enumerate().take(6) {
        let (data, index, manifest) = stored(id);
        bound += index + manifest;
        if n > 0 {
            bound += data;
        }
    }
    let (written, out) = run_measuring_writes(&["prune", s(repo), "--keep-last", "2", "--json"]);
    assert!(out.status.success(), "{}", out.describe());
    assert!(
        written <= 2 * bound,
        "prune wrote {written} bytes; the merged incrementals and the indexes are {bound}"
    );
    eprintln!("prune wrote {written} bytes (bound {})", 2 * bound);
    let want: BTreeMap<String, String> = chain.points.iter().cloned().collect();
    for id in listed_ids(repo) {
        assert_point(repo, &chain.work, &id, &want[&id]);
    }
}

/// Runs cairn and returns the bytes it wrote to storage (write_bytes of /proc/PID/io, read after
/// it exited but before it is reaped: waitid with WNOWAIT).
fn run_measuring_writes(args: &[&str]) -> (u64, Out) {
    let dir = tempdir();
    let bg = Bg::spawn(args, dir.path(), "measured");
    let pid = bg.child.id() as libc::id_t;
    // SAFETY: waitid writes only into the zeroed siginfo it is given.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above; WNOWAIT leaves the child to be reaped by `finish`.
    let r = unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT) };
    assert_eq!(r, 0, "waitid: {}", std::io::Error::last_os_error());
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    let field = |k: &str| -> u64 {
        io.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in /proc/{pid}/io: {io}"))
            .trim()
            .parse()
            .unwrap()
    };
    let written = field("write_bytes:");
    (written, bg.finish())
}

/// A chain of a loop device (O_DIRECT writes between backups), pruned: the kept points restore
/// to the device's contents when they were taken.
#[test]
fn a_loop_device_chain_pruned_keeps_exact_points() {
    require_root();
    let dir = tempdir();
    let dev = LoopDev::new_random(&dir.path().join("disk.img"), 16 * MIB, 7);
    let repo = dir.path().join("repo");
    let mut points = Vec::new();
    for i in 0..5u64 {
        if i > 0 {
            direct_write(&dev.dev, (i * 3 + 1) * 256 * KIB, 64 * KIB as usize, 70 + i);
            direct_write(
                &dev.dev,
                (i % 2) * 8 * MIB + 4 * KIB * i,
                4 * KIB as usize,
                80 + i,
            );
        }
        let kind = if i == 0 {
            "--full"
        } else if i == 3 {
            "--differential"
        } else {
            "--incremental"
        };
        let v = backup(&dev.dev, &repo, "loop", &[kind]);
        let copy = dir.path().join(format!("state-{i}"));
        copy_device(&dev.dev, &copy);
        points.push((id_of(&v), hash_path(&copy)));
        std::fs::remove_file(&copy).unwrap();
    }
    let r = prune_json(&repo, &["--keep-last", "2"]);
    assert_eq!(kept_ids(&r), vec![points[3].0.clone(), points[4].0.clone()]);
    for (id, want) in &points[3..] {
        assert_point(&repo, dir.path(), id, want);
    }
}

/// After a merge one block's pieces can be dozens of windows of one stored frame (the full's
/// block, cut up by the incrementals' changes). A restore reads and decodes each frame once, so
/// its memory is that of any restore: reading the frame once per window held dozens of copies
/// of it per block in flight (here twice to three times the memory of a plain restore; 790 MiB
/// for a 1 GiB source in tools/bench --only retention).
#[test]
fn restoring_a_merged_point_reads_each_stored_frame_once() {
    let dir = tempdir();
    let src = dir.path().join("src.img");
    let size = 64 * MIB;
    write_random_file(&src, size, 3);
    let repo = dir.path().join("repo");
    backup(s(&src), &repo, "disk", &["--full"]);
    let f = OpenOptions::new().write(true).open(&src).unwrap();
    for round in 0..20u64 {
        // 1% of the granules, spread over every block.
        let r = random_vec(500 + round, 2 * 164);
        for i in 0..164 {
            let granule = (u64::from(r[2 * i]) << 8 | u64::from(r[2 * i + 1])) % (size / 4096);
            write_random_at(&f, granule * 4096, 4096, round * 1000 + i as u64);
        }
        backup(s(&src), &repo, "disk", &[]);
    }
    let want = hash_path(&src);
    prune_json(&repo, &["--keep-last", "1"]);
    let target = dir.path().join("restored.img");
    let time = require_tool("time", "time");
    let rss_file = dir.path().join("rss");
    let out = std::process::Command::new(&time)
        .args([
            "-f",
            "%M",
            "-o",
            s(&rss_file),
            bin(),
            "restore",
            s(&repo),
            s(&target),
            "-y",
            "-q",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "restore: {out:?}");
    assert_eq!(
        hash_path(&target),
        want,
        "the merged point restores exactly"
    );
    let rss_kib: u64 = std::fs::read_to_string(&rss_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    eprintln!(
        "restore of the merged point: peak RSS {} MiB",
        rss_kib / 1024
    );
    assert!(
        rss_kib < 48 * 1024,
        "restoring the merged point peaked at {} MiB",
        rss_kib / 1024
    );
}
