//! Damaged repositories: verify must detect and name the damage; restore must
//! refuse or fail, never silently produce wrong bytes; nothing panics.

mod common;

use common::*;
use std::fs;
use std::path::{Path, PathBuf};

struct Fixture {
    t: tempfile::TempDir,
    src: PathBuf,
    repo: PathBuf,
    id: String,
}

impl Fixture {
    /// 12 MiB + 4321 bytes of mixed data (random first, so the first block is
    /// non-zero), 4 MiB segments so that there are several.
    fn new(seed: u64) -> Fixture {
        let t = tempdir();
        let src = t.path().join("source.img");
        let repo = t.path().join("repo");
        write_mixed_file(&src, 12 * MIB + 4321, seed);
        let b = backup(s(&src), &repo, "victim", &["--segment-size", "4M"]);
        let id = id_of(&b);
        let f = Fixture { t, src, repo, id };
        assert!(
            f.segments().len() >= 2,
            "fixture needs several segments, got {:?}",
            f.segments()
        );
        cairn(&["verify", s(&f.repo)]).ok();
        f
    }

    fn img(&self) -> PathBuf {
        image_dir(&self.repo, &self.id)
    }

    fn segments(&self) -> Vec<PathBuf> {
        segment_files(&self.img())
    }

    fn target(&self, name: &str) -> PathBuf {
        self.t.path().join(name)
    }

    fn verify(&self) -> Out {
        cairn(&["verify", s(&self.repo)])
    }

    fn restore_to(&self, target: &Path) -> Out {
        cairn(&["restore", s(&self.repo), s(target)])
    }

    /// A restore of a damaged image must fail; if a broken implementation
    /// exits 0 anyway, the bytes must at least be right (they will not be).
    fn assert_restore_fails(&self, target: &Path) -> Out {
        let out = self.restore_to(target);
        if out.status.success() && target.exists() {
            assert_eq!(
                hash_path(target),
                hash_path(&self.src),
                "restore of a damaged image exited 0 AND produced wrong bytes:\n{}",
                out.describe()
            );
        }
        out.error();
        out
    }
}

fn assert_not_written(target: &Path) {
    match fs::metadata(target) {
        Err(_) => {}
        Ok(m) => assert_eq!(
            m.len(),
            0,
            "refused restore must not write the target, but {} has {} bytes",
            target.display(),
            m.len()
        ),
    }
}

#[test]
fn flipped_payload_byte_detected() {
    let f = Fixture::new(1);
    // 32-byte segment header + 32-byte frame header + 100 => inside the
    // first stored block's payload.
    flip_byte(&f.segments()[0], 32 + 32 + 100);

    let out = f.verify();
    out.failed();
    out.assert_mentions(&f.id).assert_mentions("segment-000000");
    out.assert_mentions("offset");

    let j = cairn(&["verify", s(&f.repo), "--json"]);
    j.failed();
    let v = j.json();
    assert_eq!(v["ok"], false, "verify --json on damage: {v}");
    let imgs = v["images"].as_array().expect("images array");
    let me = imgs
        .iter()
        .find(|i| id_of(i) == f.id)
        .unwrap_or_else(|| panic!("damaged image missing from verify --json: {v}"));
    assert_eq!(me["status"], "damaged", "{v}");
    let errs = me["errors"].as_array().expect("errors array");
    assert!(
        errs.iter()
            .any(|e| e.as_str().is_some_and(|s| s.contains("segment-000000"))),
        "errors must name segment-000000: {v}"
    );

    f.assert_restore_fails(&f.target("restored.img"));
}

#[test]
fn truncated_segment_detected() {
    let f = Fixture::new(2);
    let seg = f.segments()[0].clone();
    let len = fs::metadata(&seg).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let out = f.verify();
    out.failed();
    out.assert_mentions(&f.id).assert_mentions("segment-000000");

    let out = f.assert_restore_fails(&f.target("restored.img"));
    out.assert_mentions("segment-000000");
}

#[test]
fn truncated_last_segment_detected() {
    let f = Fixture::new(3);
    let segs = f.segments();
    let seg = segs.last().unwrap().clone();
    let name = seg.file_name().unwrap().to_string_lossy().into_owned();
    let len = fs::metadata(&seg).unwrap().len();
    assert!(len > 64 + 10, "last segment unexpectedly small: {len}");
    fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 10)
        .unwrap();

    let out = f.verify();
    out.failed();
    out.assert_mentions(&f.id).assert_mentions(&name);
    f.assert_restore_fails(&f.target("restored.img"));
}

#[test]
fn missing_segment_refused_before_writing() {
    let f = Fixture::new(4);
    let seg = f.segments()[1].clone();
    assert!(seg.ends_with("segment-000001"));
    fs::remove_file(&seg).unwrap();

    let target = f.target("restored.img");
    let out = f.restore_to(&target);
    out.error();
    out.assert_mentions("segment-000001");
    assert_not_written(&target);

    let out = f.verify();
    out.failed();
    out.assert_mentions(&f.id).assert_mentions("segment-000001");
}

/// Change one digit of the manifest's JSON body: still valid JSON, but the
/// checksum in the first line no longer matches.
#[test]
fn corrupt_manifest_body_detected() {
    let f = Fixture::new(5);
    let mpath = f.img().join("manifest");
    let mut m = fs::read(&mpath).unwrap();
    let nl = m.iter().position(|&b| b == b'\n').unwrap();
    let pos = (nl + 1..m.len())
        .find(|&i| m[i].is_ascii_digit())
        .expect("manifest body contains a digit");
    m[pos] = if m[pos] == b'9' { b'1' } else { m[pos] + 1 };
    fs::write(&mpath, &m).unwrap();

    let list = cairn(&["list", s(&f.repo)]);
    let text = list.text_lower();
    assert!(
        text.contains("manifest") || text.contains("corrupt"),
        "list must report the corrupt manifest:\n{}",
        list.describe()
    );
    let listj = cairn(&["list", s(&f.repo), "--json"]);
    if listj.status.success() {
        // If list still succeeds, the image must not look healthy.
        let v = listj.json();
        for e in v.as_array().expect("list --json array") {
            if id_of(e) == f.id {
                assert_ne!(e["status"], "ok", "corrupt image listed as ok: {v}");
                assert_ne!(
                    e["status"], "complete",
                    "corrupt image listed as complete: {v}"
                );
            }
        }
    }

    let out = f.verify();
    out.failed();
    out.assert_mentions("manifest");

    let target = f.target("restored.img");
    let out = f.restore_to(&target);
    out.error();
    out.assert_mentions("manifest");
    assert_not_written(&target);
}

#[test]
fn unknown_manifest_version_refused() {
    let f = Fixture::new(6);
    let mpath = f.img().join("manifest");
    let m = fs::read(&mpath).unwrap();
    let rest = m
        .strip_prefix(b"cairn-manifest 2 ".as_slice())
        .expect("manifest starts with `cairn-manifest 2 `");
    let mut new = b"cairn-manifest 99 ".to_vec();
    new.extend_from_slice(rest);
    fs::write(&mpath, &new).unwrap();

    let list = cairn(&["list", s(&f.repo)]);
    list.assert_mentions("version");

    let out = f.verify();
    out.failed();
    out.assert_mentions("version").assert_mentions("99");

    let target = f.target("restored.img");
    let out = f.restore_to(&target);
    out.error();
    out.assert_mentions("version");
    assert_not_written(&target);
}

#[test]
fn flipped_index_byte_detected() {
    let f = Fixture::new(7);
    let idx = f.img().join("index");
    let len = fs::metadata(&idx).unwrap().len();
    assert!(len > 0, "index is empty");
    flip_byte(&idx, len / 2);

    let out = f.verify();
    out.failed();
    out.assert_mentions(&f.id).assert_mentions("index");

    f.assert_restore_fails(&f.target("restored.img"));
}

/// Damage in one image must not make verify fail for, or name, the others
/// when they are checked individually; `verify --image` of a healthy image
/// passes.
#[test]
fn damage_is_isolated_to_its_image() {
    let f = Fixture::new(8);
    let other_src = f.t.path().join("other.img");
    write_mixed_file(&other_src, 5 * MIB + 9, 88);
    let other = id_of(&backup(s(&other_src), &f.repo, "healthy", &[]));
    flip_byte(&f.segments()[0], 32 + 32 + 100);

    let all = f.verify();
    all.failed();
    all.assert_mentions(&f.id);

    cairn(&["verify", s(&f.repo), "--image", &other]).ok();
    cairn(&["verify", s(&f.repo), "--name", "healthy"]).ok();
    let dst = f.target("healthy.restored");
    restore(&f.repo, s(&dst), &["--name", "healthy"]);
    assert_same_content(&other_src, &dst);
}

/// A parent whose manifest was replaced by another valid one (its hash no longer matches what
/// the child recorded): restore refuses the child, and verify must say the same — before, verify
/// walked parent ids only and called the child restorable.
#[test]
fn replaced_parent_makes_verify_and_restore_agree() {
    let f = Fixture::new(31);
    let full = f.id.clone();
    write_mixed_file(&f.src, 12 * MIB + 4321, 32);
    let inc = id_of(&backup(
        s(&f.src),
        &f.repo,
        "victim",
        &["--segment-size", "4M"],
    ));
    // Rewrite the full's manifest as another valid manifest: same content, new header hash.
    let path = image_dir(&f.repo, &full).join("manifest");
    let bytes = fs::read(&path).unwrap();
    let nl = bytes.iter().position(|&c| c == b'\n').unwrap();
    let header = std::str::from_utf8(&bytes[..nl]).unwrap();
    let mut body: serde_json::Value = serde_json::from_slice(&bytes[nl + 1..]).unwrap();
    body["tool_version"] = serde_json::Value::String("cairn (replaced)".into());
    let body = serde_json::to_vec_pretty(&body).unwrap();
    let prefix = &header[..header.find("blake3=").unwrap()];
    let mut out = format!("{prefix}blake3={}\n", blake3::hash(&body).to_hex()).into_bytes();
    out.extend_from_slice(&body);
    fs::write(&path, out).unwrap();

    let j = cairn(&["verify", s(&f.repo), "--json"]).json();
    let status = |id: &str| {
        j["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == id)
            .unwrap_or_else(|| panic!("{id} missing from verify: {j}"))
            .clone()
    };
    assert_eq!(status(&full)["restorable"], true, "{j}");
    let child = status(&inc);
    assert_eq!(child["restorable"], false, "{j}");
    assert!(
        child["errors"].to_string().contains("replaced"),
        "the reason names the replaced parent: {child}"
    );
    assert_eq!(j["ok"], false, "{j}");
    let target = f.target("out.img");
    let r = cairn(&["restore", s(&f.repo), s(&target), "--image", &inc, "--yes"]);
    r.failed();
    r.assert_mentions("replaced");
    assert!(
        !target.exists(),
        "a refused restore must not create the target"
    );
}
