//! A long incremental chain under a tight descriptor limit: segment files are kept open through a
//! bounded cache, so restoring (and compare-scanning against) a chain of many images needs a
//! fixed number of descriptors; running out of them is an error, never "store the block again".

mod common;

use common::*;
use serde_json::Value;
use std::fs::{self, OpenOptions};
use std::process::{Command, Stdio};

/// Images in the chain: well above the descriptor limit the commands run under.
const CHAIN: u64 = 120;
/// `ulimit -n` for the commands under test.
const NOFILE: u32 = 48;

/// `cairn ARGS` under `ulimit -n NOFILE`.
fn cairn_limited(args: &[&str]) -> Value {
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n {NOFILE} && exec \"$0\" \"$@\""))
        .arg(bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run sh");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "cairn {args:?} under ulimit -n {NOFILE}: {}\n{stderr}",
        o.status
    );
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"))
}

#[test]
fn chain_longer_than_the_descriptor_limit_restores_and_compare_scans_exactly() {
    let work = tempdir();
    let w = work.path();
    let src = w.join("d.img");
    let repo = w.join("r");
    let len = 8 * MIB;
    write_random_file(&src, len, 7);
    backup(s(&src), &repo, "t", &[]);
    // Each incremental changes one granule of its own, spread over every block, so the newest
    // point needs a segment of every image of the chain.
    let f = OpenOptions::new().write(true).open(&src).unwrap();
    let granules = len / 4096;
    for i in 1..CHAIN {
        let g = (i * 37) % granules;
        write_random_at(&f, g * 4096, 4096, 1000 + i);
        let r = backup(s(&src), &repo, "t", &[]);
        assert_eq!(
            r["data_bytes"], 4096,
            "image {i} stores its one granule: {r}"
        );
    }
    // A compare-scan against the whole chain, under the limit: exactly the changed granule.
    write_random_at(&f, 4096 * 3, 4096, 99);
    let r = cairn_limited(&["backup", s(&src), s(&repo), "--name", "t", "--json"]);
    assert_eq!(r["method"], "compare-scan", "{r}");
    assert_eq!(
        r["data_bytes"], 4096,
        "a compare-scan that ran out of descriptors stored more than what changed: {r}"
    );
    let out = w.join("out.img");
    let r = cairn_limited(&[
        "restore",
        s(&repo),
        s(&out),
        "--name",
        "t",
        "--verify",
        "--yes",
        "--json",
    ]);
    assert_eq!(
        r["chain"].as_array().map(Vec::len),
        Some(CHAIN as usize + 1)
    );
    assert_same_content(&src, &out);
    fs::remove_file(&out).unwrap();
}
