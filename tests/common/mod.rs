//! Shared helpers for cairn's black-box integration tests.
//!
//! Everything here drives the real `cairn` binary (`CARGO_BIN_EXE_cairn`) and
//! real system tools. Tests that need root, loop devices or filesystem tools
//! FAIL (never skip) with a "precondition missing" message when those are
//! unavailable. Loop devices and mounts are owned by Drop guards so that they
//! are released even when a test panics.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::Duration;

use serde_json::Value;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// Path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_cairn")
}

/// `&Path` -> `&str` (all test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

// ---------------------------------------------------------------------------
// Running cairn
// ---------------------------------------------------------------------------

/// Captured result of one `cairn` invocation.
pub struct Out {
    pub cmd: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    fn from_output(cmd: String, o: Output) -> Out {
        let out = Out {
            cmd,
            status: o.status,
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        };
        out.assert_no_panic();
        out
    }

    /// Human-readable dump for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "command: {}\nstatus: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--------------",
            self.cmd,
            self.status,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// stdout + stderr, lower-cased.
    pub fn text_lower(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr).to_lowercase()
    }

    pub fn assert_no_panic(&self) {
        assert!(
            !self.stderr.contains("panicked") && !self.stdout.contains("panicked"),
            "cairn panicked (must never happen):\n{}",
            self.describe()
        );
    }

    /// Exit 0.
    pub fn ok(&self) -> &Self {
        assert!(
            self.status.success(),
            "expected success (exit 0):\n{}",
            self.describe()
        );
        self
    }

    /// Non-zero exit by normal termination (not killed by a signal).
    pub fn failed(&self) -> &Self {
        assert!(
            !self.status.success(),
            "expected failure (non-zero exit):\n{}",
            self.describe()
        );
        assert!(
            self.status.code().is_some(),
            "cairn was killed by a signal instead of exiting with an error:\n{}",
            self.describe()
        );
        self
    }

    /// A cairn runtime error: exit code 1 and exactly one stderr line starting
    /// with `cairn: error:` (other lines, e.g. warn-level logs, are allowed).
    pub fn error(&self) -> &Self {
        self.failed();
        assert_eq!(
            self.code(),
            Some(1),
            "cairn errors must exit with code 1:\n{}",
            self.describe()
        );
        let n = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("cairn: error:"))
            .count();
        assert_eq!(
            n,
            1,
            "expected exactly one `cairn: error:` line on stderr:\n{}",
            self.describe()
        );
        self
    }

    /// The `cairn: error:` line (panics if absent).
    pub fn error_line(&self) -> String {
        self.stderr
            .lines()
            .find(|l| l.starts_with("cairn: error:"))
            .unwrap_or_else(|| panic!("no `cairn: error:` line on stderr:\n{}", self.describe()))
            .to_string()
    }

    /// stdout parsed as exactly one JSON document.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not exactly one JSON document ({e}):\n{}",
                self.describe()
            )
        })
    }

    pub fn assert_mentions(&self, needle: &str) -> &Self {
        assert!(
            self.text_lower().contains(&needle.to_lowercase()),
            "expected output to mention {needle:?}:\n{}",
            self.describe()
        );
        self
    }
}

fn render_cmd<S: AsRef<OsStr>>(args: &[S], envs: &[(&str, &str)]) -> String {
    let mut c = String::new();
    for (k, v) in envs {
        c.push_str(&format!("{k}={v} "));
    }
    c.push_str("cairn");
    for a in args {
        c.push(' ');
        c.push_str(&a.as_ref().to_string_lossy());
    }
    c
}

/// Run cairn with stdin = /dev/null (never a terminal).
pub fn cairn<S: AsRef<OsStr>>(args: &[S]) -> Out {
    cairn_env(args, &[])
}

pub fn cairn_env<S: AsRef<OsStr>>(args: &[S], envs: &[(&str, &str)]) -> Out {
    let mut cmd = Command::new(bin());
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("failed to run {}: {e}", bin()));
    Out::from_output(render_cmd(args, envs), o)
}

/// Spawn cairn in the background with stdout/stderr going to files in `logdir`
/// (files, not pipes, so a chatty child can never block on a full pipe).
pub struct Bg {
    pub child: Child,
    pub cmd: String,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl Bg {
    pub fn spawn<S: AsRef<OsStr>>(args: &[S], logdir: &Path, tag: &str) -> Bg {
        let stdout_path = logdir.join(format!("{tag}.stdout"));
        let stderr_path = logdir.join(format!("{tag}.stderr"));
        let child = Command::new(bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout_path).unwrap())
            .stderr(File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("failed to spawn {}: {e}", bin()));
        Bg {
            child,
            cmd: render_cmd(args, &[]),
            stdout_path,
            stderr_path,
        }
    }

    /// Still running?
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Wait for exit and collect output (no panic check: caller decides).
    pub fn finish(mut self) -> Out {
        let status = self.child.wait().unwrap();
        let out = Out {
            cmd: self.cmd.clone(),
            status,
            stdout: fs::read_to_string(&self.stdout_path).unwrap_or_default(),
            stderr: fs::read_to_string(&self.stderr_path).unwrap_or_default(),
        };
        out.assert_no_panic();
        out
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        // Make sure a test that panics never leaves a cairn process behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `cairn backup SRC REPO --name NAME --json [extra..]`, asserting success.
pub fn backup(src: &str, repo: &Path, name: &str, extra: &[&str]) -> Value {
    let mut args = vec!["backup", src, s(repo), "--name", name, "--json"];
    args.extend_from_slice(extra);
    let out = cairn(&args);
    out.ok();
    out.json()
}

/// Same as [`backup`] with extra environment variables; returns the Out too.
pub fn backup_env(
    src: &str,
    repo: &Path,
    name: &str,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> (Value, Out) {
    let mut args = vec!["backup", src, s(repo), "--name", name, "--json"];
    args.extend_from_slice(extra);
    let out = cairn_env(&args, envs);
    out.ok();
    (out.json(), out)
}

/// `cairn restore REPO TARGET --json [extra..]`, asserting success.
pub fn restore(repo: &Path, target: &str, extra: &[&str]) -> Value {
    let mut args = vec!["restore", s(repo), target, "--json"];
    args.extend_from_slice(extra);
    let out = cairn(&args);
    out.ok();
    out.json()
}

/// The image id of a backup/list/restore JSON object, as used in
/// `REPO/images/<ID>` (accepts a string or a number).
pub fn id_of(v: &Value) -> String {
    match &v["id"] {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => panic!("JSON object has no usable \"id\" (got {other}): {v}"),
    }
}

pub fn image_dir(repo: &Path, id: &str) -> PathBuf {
    repo.join("images").join(id)
}

/// Sorted list of `segment-NNNNNN` files in an image directory.
pub fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("segment-"))
        })
        .collect();
    v.sort();
    v
}

/// Sum of apparent sizes of all regular files below `dir`.
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        if m.is_dir() {
            total += dir_size(&e.path());
        } else {
            total += m.len();
        }
    }
    total
}

/// Entries of a directory, empty if it does not exist.
pub fn dir_entries(dir: &Path) -> Vec<PathBuf> {
    match fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Largest `segment-*` file found anywhere below `dir` (0 if none).
pub fn largest_segment_below(dir: &Path) -> u64 {
    let mut best = 0;
    for p in dir_entries(dir) {
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_dir() {
            best = best.max(largest_segment_below(&p));
        } else if p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("segment-"))
        {
            best = best.max(m.len());
        }
    }
    best
}

// ---------------------------------------------------------------------------
// Temp dirs
// ---------------------------------------------------------------------------

/// Fresh temp dir under /var/tmp (ext4 here, O_DIRECT works).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("cairn-test-")
        .tempdir_in("/var/tmp")
        .expect("create temp dir under /var/tmp")
}

/// Fresh temp dir under /dev/shm (tmpfs: O_DIRECT refused).
pub fn shm_tempdir() -> tempfile::TempDir {
    assert!(
        Path::new("/dev/shm").is_dir(),
        "precondition missing: /dev/shm (tmpfs) does not exist"
    );
    tempfile::Builder::new()
        .prefix("cairn-test-")
        .tempdir_in("/dev/shm")
        .expect("create temp dir under /dev/shm")
}

// ---------------------------------------------------------------------------
// Test data
// ---------------------------------------------------------------------------

/// Deterministic pseudo-random stream (BLAKE3 XOF keyed by the seed; fast even
/// in debug builds because blake3 uses its SIMD/asm backends).
pub fn rng(seed: u64) -> blake3::OutputReader {
    let mut h = blake3::Hasher::new();
    h.update(b"cairn-test-rng");
    h.update(&seed.to_le_bytes());
    h.finalize_xof()
}

pub fn random_vec(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng(seed).fill(&mut v);
    v
}

const WORDS: &[&str] = &[
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "sector",
    "block",
    "disk",
    "image",
    "cairn",
    "stone",
    "mount",
    "ridge",
    "valley",
    "river",
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "labore",
];

/// Compressible, text-like bytes.
pub fn text_vec(seed: u64, len: usize) -> Vec<u8> {
    let mut r = rng(seed ^ 0x7465_7874);
    let mut idx = vec![0u8; 4096];
    let mut pos = idx.len();
    let mut v = Vec::with_capacity(len + 32);
    let mut line = 0u64;
    while v.len() < len {
        if pos + 2 > idx.len() {
            r.fill(&mut idx);
            pos = 0;
        }
        let a = idx[pos];
        let b = idx[pos + 1];
        pos += 2;
        v.extend_from_slice(WORDS[(a as usize) % WORDS.len()].as_bytes());
        if b % 13 == 0 {
            line += 1;
            v.extend_from_slice(format!(" {line}.\n").as_bytes());
        } else {
            v.push(b' ');
        }
    }
    v.truncate(len);
    v
}

/// Write `len` pseudo-random bytes to `f` at `offset`, streaming.
pub fn write_random_at(f: &File, offset: u64, len: u64, seed: u64) {
    let mut r = rng(seed);
    let mut buf = vec![0u8; 4 * MIB as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        r.fill(&mut buf[..n]);
        f.write_all_at(&buf[..n], offset + done).unwrap();
        done += n as u64;
    }
}

/// A file of `len` pseudo-random bytes.
pub fn write_random_file(path: &Path, len: u64, seed: u64) {
    let f = File::create(path).unwrap();
    write_random_at(&f, 0, len, seed);
    f.sync_all().unwrap();
}

/// A sparse (all-holes) file of `len` bytes.
pub fn write_sparse_file(path: &Path, len: u64) {
    let f = File::create(path).unwrap();
    f.set_len(len).unwrap();
}

#[derive(Clone, Copy, Debug)]
pub enum Chunk {
    Random(u64),
    Text(u64),
    /// Explicitly written zero bytes (not holes).
    Zero(u64),
    /// A repeating non-zero byte pattern.
    Pattern(u64),
}

/// Write a file made of the given chunks (in order), then extend it with
/// random bytes up to exactly `len` (chunks are cut at `len`).
pub fn write_chunks_file(path: &Path, len: u64, chunks: &[Chunk], seed: u64) {
    let mut f = File::create(path).unwrap();
    let mut off = 0u64;
    let zeros = vec![0u8; MIB as usize];
    for (i, c) in chunks.iter().enumerate() {
        if off >= len {
            break;
        }
        let seed = seed.wrapping_mul(1000).wrapping_add(i as u64);
        let (n, data): (u64, Option<Vec<u8>>) = match *c {
            Chunk::Random(n) => (n.min(len - off), None),
            Chunk::Text(n) => {
                let n = n.min(len - off);
                (n, Some(text_vec(seed, n as usize)))
            }
            Chunk::Pattern(n) => {
                let n = n.min(len - off);
                let pat: Vec<u8> = (0..n).map(|i| (i % 251) as u8 | 0x01).collect();
                (n, Some(pat))
            }
            Chunk::Zero(n) => {
                let n = n.min(len - off);
                let mut left = n;
                while left > 0 {
                    let k = left.min(zeros.len() as u64) as usize;
                    f.write_all(&zeros[..k]).unwrap();
                    left -= k as u64;
                }
                off += n;
                continue;
            }
        };
        match data {
            Some(d) => f.write_all(&d).unwrap(),
            None => {
                write_random_at(&f, off, n, seed);
                f.seek(SeekFrom::Start(off + n)).unwrap();
            }
        }
        off += n;
    }
    if off < len {
        write_random_at(&f, off, len - off, seed ^ 0xdead_beef);
    }
    f.set_len(len).unwrap();
    f.sync_all().unwrap();
}

/// Standard mixed-content file: random, text, zero runs, patterns, with
/// unaligned chunk boundaries; ends with random data.
pub fn write_mixed_file(path: &Path, len: u64, seed: u64) {
    use Chunk::*;
    let plan = [
        Random(5 * MIB + 17),
        Zero(3 * MIB + 12_293),
        Text(2 * MIB + 333),
        Zero(8 * MIB),
        Pattern(MIB + 1),
        Random(7 * MIB + 4095),
        Text(3 * MIB),
        Zero(4 * MIB + 512),
    ];
    write_chunks_file(path, len, &plan, seed);
}

// ---------------------------------------------------------------------------
// Hashing and sizes
// ---------------------------------------------------------------------------

/// BLAKE3 of everything readable from `path` (file or block device).
pub fn hash_path(path: &Path) -> String {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 4 * MIB as usize];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().to_hex().to_string()
}

/// BLAKE3 of the first `len` bytes of `path`.
pub fn hash_prefix(path: &Path, len: u64) -> String {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = blake3::Hasher::new();
    let mut r = f.take(len);
    let mut buf = vec![0u8; 4 * MIB as usize];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
        h.update(&buf[..n]);
    }
    assert_eq!(total, len, "{} is shorter than {len}", path.display());
    h.finalize().to_hex().to_string()
}

/// Hash a block device after flushing its buffer cache so that we read what
/// is really on the device.
pub fn hash_device(dev: &str) -> String {
    flush_bufs(dev);
    hash_path(Path::new(dev))
}

pub fn flush_bufs(dev: &str) {
    let blockdev = require_tool("blockdev", "util-linux");
    run_tool(&blockdev, &["--flushbufs", dev]);
}

/// Size in bytes of a file or block device.
pub fn size_of(path: &Path) -> u64 {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.seek(SeekFrom::End(0)).unwrap()
}

/// Allocated bytes (st_blocks * 512).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().blocks() * 512
}

pub fn flip_byte(path: &Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, offset).unwrap();
    f.sync_all().unwrap();
}

/// Compare two files byte-for-byte (by hash) and by size.
pub fn assert_same_content(a: &Path, b: &Path) {
    let (la, lb) = (size_of(a), size_of(b));
    assert_eq!(
        la,
        lb,
        "size differs: {} has {la} bytes, {} has {lb} bytes",
        a.display(),
        b.display()
    );
    let (ha, hb) = (hash_path(a), hash_path(b));
    assert_eq!(
        ha,
        hb,
        "content differs: {} vs {}",
        a.display(),
        b.display()
    );
}

/// Relative path -> BLAKE3 of every regular file below `root`.
pub fn hash_tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                walk(root, &p, out);
            } else if ft.is_file() {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, hash_path(&p));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Populate a mounted filesystem with a small tree of files (random, text,
/// empty, tiny, nested directories). Total ~ 8 MiB.
pub fn populate_tree(root: &Path, seed: u64) {
    let d1 = root.join("docs");
    let d2 = root.join("data").join("nested");
    fs::create_dir_all(&d1).unwrap();
    fs::create_dir_all(&d2).unwrap();
    fs::write(d1.join("readme.txt"), text_vec(seed, 100_000)).unwrap();
    fs::write(d1.join("empty"), b"").unwrap();
    fs::write(d1.join("one"), b"x").unwrap();
    fs::write(
        root.join("random.bin"),
        random_vec(seed + 1, 3 * MIB as usize + 7),
    )
    .unwrap();
    fs::write(d2.join("blob.bin"), random_vec(seed + 2, 4 * MIB as usize)).unwrap();
    fs::write(d2.join("notes.txt"), text_vec(seed + 3, 777_777)).unwrap();
    for i in 0..20 {
        fs::write(
            d2.join(format!("small{i}.dat")),
            random_vec(seed + 100 + i, 1000 + 997 * i as usize),
        )
        .unwrap();
    }
}

// ---------------------------------------------------------------------------
// Preconditions and system tools
// ---------------------------------------------------------------------------

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "precondition missing: this test must run as root (it needs loop devices and mount)"
    );
    assert!(
        Path::new("/dev/loop-control").exists(),
        "precondition missing: /dev/loop-control does not exist (loop driver not available)"
    );
}

/// Locate a system tool or FAIL with a message saying what is missing.
pub fn require_tool(name: &str, package: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        dirs.push(PathBuf::from(d));
    }
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("precondition missing: required tool `{name}` not found in PATH (install {package})");
}

/// Run a system tool, asserting exit 0.
pub fn run_tool<S: AsRef<OsStr>>(tool: &Path, args: &[S]) -> Output {
    let o = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("failed to run {}: {e}", tool.display()));
    assert!(
        o.status.success(),
        "`{} {}` failed with {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        tool.display(),
        args.iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" "),
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

pub fn mkfs_ext4(dev: &str) {
    let t = require_tool("mkfs.ext4", "e2fsprogs");
    run_tool(&t, &["-q", "-F", dev]);
}

pub fn mkfs_vfat(dev: &str) {
    let t = require_tool("mkfs.vfat", "dosfstools");
    run_tool(&t, &[dev]);
}

/// `e2fsck -fn` must report a clean filesystem.
pub fn e2fsck_clean(dev: &str) {
    let t = require_tool("e2fsck", "e2fsprogs");
    run_tool(&t, &["-fn", dev]);
}

/// `fsck.vfat -n` must report a clean filesystem.
pub fn fsck_vfat_clean(dev: &str) {
    let t = require_tool("fsck.vfat", "dosfstools");
    run_tool(&t, &["-n", dev]);
}

// ---------------------------------------------------------------------------
// Loop devices and mounts (Drop guards)
// ---------------------------------------------------------------------------

/// A loop device attached with `losetup --find --show -P FILE`; detached on drop.
pub struct LoopDev {
    pub dev: String,
    pub backing: PathBuf,
}

impl LoopDev {
    pub fn attach(file: &Path) -> LoopDev {
        LoopDev::attach_with(file, &[])
    }

    /// `losetup --find --show -P [extra...] FILE`.
    pub fn attach_with(file: &Path, extra: &[&str]) -> LoopDev {
        require_root();
        let losetup = require_tool("losetup", "util-linux");
        let mut args = vec!["--find", "--show", "-P"];
        args.extend_from_slice(extra);
        args.push(s(file));
        let o = run_tool(&losetup, &args);
        let dev = String::from_utf8_lossy(&o.stdout).trim().to_string();
        assert!(
            dev.starts_with("/dev/loop"),
            "losetup printed an unexpected device name: {dev:?}"
        );
        LoopDev {
            dev,
            backing: file.to_path_buf(),
        }
    }

    /// Create a backing file of `size` bytes (sparse, i.e. zeros) and attach it.
    pub fn new_zeroed(file: &Path, size: u64) -> LoopDev {
        write_sparse_file(file, size);
        LoopDev::attach(file)
    }

    /// Create a backing file of `size` pseudo-random bytes and attach it.
    pub fn new_random(file: &Path, size: u64, seed: u64) -> LoopDev {
        write_random_file(file, size, seed);
        LoopDev::attach(file)
    }

    pub fn path(&self) -> &Path {
        Path::new(&self.dev)
    }

    pub fn size(&self) -> u64 {
        size_of(self.path())
    }

    /// Device node of partition `n` (`/dev/loopNpM`), running `partx -a` if
    /// the kernel did not create it by itself.
    pub fn partition(&self, n: u32) -> String {
        let p = format!("{}p{}", self.dev, n);
        if Path::new(&p).exists() {
            return p;
        }
        let partx = require_tool("partx", "util-linux");
        let o = Command::new(&partx)
            .args(["-a", &self.dev])
            .stdin(Stdio::null())
            .output()
            .expect("run partx");
        // Polling a real condition (the device node exists), bounded.
        for _ in 0..500 {
            if Path::new(&p).exists() {
                return p;
            }
            thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "partition {p} did not appear after `partx -a {}` (status {:?}, stderr: {})",
            self.dev,
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let Ok(losetup) = std::panic::catch_unwind(|| require_tool("losetup", "util-linux")) else {
            return;
        };
        for _ in 0..50 {
            match Command::new(&losetup).args(["-d", &self.dev]).output() {
                Ok(o) if o.status.success() => return,
                _ => thread::sleep(Duration::from_millis(100)),
            }
        }
        eprintln!("warning: could not detach {}", self.dev);
    }
}

/// A mount; unmounted on drop (lazy unmount as a last resort).
pub struct Mount {
    pub dir: PathBuf,
}

impl Mount {
    pub fn new(dev: &str, dir: &Path, options: Option<&str>) -> Mount {
        require_root();
        fs::create_dir_all(dir).unwrap();
        let mount = require_tool("mount", "mount");
        let mut args: Vec<&str> = Vec::new();
        if let Some(o) = options {
            args.push("-o");
            args.push(o);
        }
        args.push(dev);
        args.push(s(dir));
        run_tool(&mount, &args);
        Mount {
            dir: dir.to_path_buf(),
        }
    }

    /// Unmount now (asserting success), consuming the guard.
    pub fn unmount(self) {
        let umount = require_tool("umount", "mount");
        run_tool(&umount, &[s(&self.dir)]);
        std::mem::forget(self);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let Ok(umount) = std::panic::catch_unwind(|| require_tool("umount", "mount")) else {
            return;
        };
        for _ in 0..20 {
            match Command::new(&umount).arg(&self.dir).output() {
                Ok(o) if o.status.success() => return,
                _ => thread::sleep(Duration::from_millis(100)),
            }
        }
        let _ = Command::new(&umount).arg("-l").arg(&self.dir).output();
    }
}

// ---------------------------------------------------------------------------
// Tracker instances in tracefs (tools/test checks the whole suite; these let a
// test check its own cleanup)
// ---------------------------------------------------------------------------

/// Where `cairn tracker run` creates its kernel instance, `cairn-<hash of its state dir>`.
pub const TRACE_INSTANCES: &str = "/sys/kernel/tracing/instances";

/// Names of the `cairn-*` tracefs instances that exist now, sorted. Empty when tracefs is not
/// mounted (no tracker has run since boot: a tracker mounts it first).
pub fn cairn_instances() -> Vec<String> {
    let dir = Path::new(TRACE_INSTANCES);
    let entries = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!(
            "precondition missing: cannot list {} ({e}); the tracker tests run as root",
            dir.display()
        ),
    };
    let mut names: Vec<String> = entries
        .map(|e| e.unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("cairn-"))
        .collect();
    names.sort();
    names
}

/// Remembers the `cairn-*` instances present when it is made; [`assert_none_added`] (and its drop,
/// unless the test is already failing) fails naming each instance that appeared since and is still
/// there. Make it before the trackers it watches, so that they are dropped (and clean up) first.
///
/// It sees the whole machine: a tracker that another test of the same binary runs in parallel
/// counts too. Use it where no other tracker can start meanwhile, or compare against the instance
/// your own tracker created.
///
/// [`assert_none_added`]: TraceInstanceGuard::assert_none_added
pub struct TraceInstanceGuard {
    before: BTreeSet<String>,
}

impl TraceInstanceGuard {
    pub fn new() -> TraceInstanceGuard {
        TraceInstanceGuard {
            before: cairn_instances().into_iter().collect(),
        }
    }

    /// Instances present now that were not when the guard was made, sorted.
    pub fn added(&self) -> Vec<String> {
        cairn_instances()
            .into_iter()
            .filter(|n| !self.before.contains(n))
            .collect()
    }

    /// Fails the test when an instance was added since [`TraceInstanceGuard::new`]; `what` says
    /// what should have removed it (e.g. "tracker stop").
    pub fn assert_none_added(&self, what: &str) {
        let added = self.added();
        assert!(
            added.is_empty(),
            "{what} left tracefs instances behind in {TRACE_INSTANCES}: {}",
            added.join(", ")
        );
    }
}

impl Drop for TraceInstanceGuard {
    fn drop(&mut self) {
        // A second panic while unwinding would abort the test binary and hide the first failure.
        if !thread::panicking() {
            self.assert_none_added("the test");
        }
    }
}

/// Byte size as it may appear in a message: digits only, tolerating
/// thousands separators.
pub fn mentions_number(text: &str, n: u64) -> bool {
    let cleaned: String = text
        .chars()
        .filter(|c| !matches!(c, ',' | '_' | '\''))
        .collect();
    let needle = n.to_string();
    // must be a whole number, not part of a longer one
    cleaned.match_indices(&needle).any(|(i, _)| {
        let before = cleaned[..i].chars().next_back();
        let after = cleaned[i + needle.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_digit()) && !after.is_some_and(|c| c.is_ascii_digit())
    })
}

// ---------------------------------------------------------------------------
// Filesystems on devices. ext4 goes through a real mount. This machine's
// kernel has no vfat driver, so FAT filesystems are filled and read with
// mtools (userspace) instead of a mount.
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsKind {
    Ext4,
    Vfat,
}

pub fn mkfs(kind: FsKind, dev: &str) {
    match kind {
        FsKind::Ext4 => mkfs_ext4(dev),
        FsKind::Vfat => mkfs_vfat(dev),
    }
}

pub fn fsck_clean(kind: FsKind, dev: &str) {
    match kind {
        FsKind::Ext4 => e2fsck_clean(dev),
        FsKind::Vfat => fsck_vfat_clean(dev),
    }
}

fn mtools(tool: &str, args: &[&str]) {
    let t = require_tool(tool, "mtools");
    let o = Command::new(&t)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("failed to run {}: {e}", t.display()));
    assert!(
        o.status.success(),
        "`{tool} {}` failed with {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        args.join(" "),
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Write a tree of files (see [`populate_tree`]) into the filesystem on
/// `dev`; returns relative path -> hash of what was written. `work` is a
/// scratch directory (mount point or staging area) that must not exist yet.
pub fn fill_fs(kind: FsKind, dev: &str, work: &Path, seed: u64) -> BTreeMap<String, String> {
    match kind {
        FsKind::Ext4 => {
            let m = Mount::new(dev, work, None);
            populate_tree(&m.dir, seed);
            let files = hash_tree(&m.dir);
            m.unmount();
            files
        }
        FsKind::Vfat => {
            fs::create_dir_all(work).unwrap();
            populate_tree(work, seed);
            let files = hash_tree(work);
            let mut args = vec!["-i", dev, "-s", "-Q"];
            let entries: Vec<String> = dir_entries(work).iter().map(|p| s(p).to_string()).collect();
            args.extend(entries.iter().map(|e| e.as_str()));
            args.push("::/");
            mtools("mcopy", &args);
            files
        }
    }
}

/// Read back every file of the filesystem on `dev` (read-only).
pub fn read_fs(kind: FsKind, dev: &str, work: &Path) -> BTreeMap<String, String> {
    match kind {
        FsKind::Ext4 => {
            let m = Mount::new(dev, work, Some("ro"));
            let files = hash_tree(&m.dir);
            m.unmount();
            files
        }
        FsKind::Vfat => {
            fs::create_dir_all(work).unwrap();
            let dest = format!("{}/", s(work));
            mtools("mcopy", &["-i", dev, "-s", "-Q", "-n", "::/*", &dest]);
            hash_tree(work)
        }
    }
}
pub mod gpt;

// ---------------------------------------------------------------------------
// A change tracker for a test
// ---------------------------------------------------------------------------

/// A `cairn tracker run DEV` with its own state directory, up and answering `status` when
/// `start` returns. Dropping it kills it and removes its kernel instance and state (`tracker
/// reset`). tests/tracker.rs has a richer one (restarts, signals); this is for tests that only
/// need a tracker running.
pub struct TrackerProc {
    child: Child,
    state: PathBuf,
    log: PathBuf,
}

impl TrackerProc {
    pub fn start(dev: &str, state: &Path) -> TrackerProc {
        let log = state.with_extension("log");
        let logf = File::create(&log).unwrap();
        let child = Command::new(bin())
            .args(["tracker", "run", dev, "--interval-ms", "20"])
            .env("CAIRN_STATE_DIR", state)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("spawn tracker");
        let mut t = TrackerProc {
            child,
            state: state.to_path_buf(),
            log,
        };
        // Wait for a real condition: the daemon answers status.
        for _ in 0..1000 {
            let o = cairn_env(
                &["tracker", "status", "--json"],
                &[("CAIRN_STATE_DIR", s(&t.state))],
            );
            if o.status.success() && o.json()["running"] == Value::Bool(true) {
                return t;
            }
            if let Ok(Some(st)) = t.child.try_wait() {
                panic!(
                    "tracker exited with {st}: {}",
                    fs::read_to_string(&t.log).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "tracker did not come up: {}",
            fs::read_to_string(&t.log).unwrap_or_default()
        );
    }
}

impl Drop for TrackerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new(bin())
            .args(["tracker", "reset"])
            .env("CAIRN_STATE_DIR", &self.state)
            .output();
    }
}

// ---------------------------------------------------------------------------
// Writing to block devices under test
// ---------------------------------------------------------------------------

/// O_DIRECT write of `len` random bytes at `offset` of a block device (4 KiB aligned).
pub fn direct_write(dev: &str, offset: u64, len: usize, seed: u64) {
    let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
    let data = random_vec(seed, len);
    // An aligned copy: O_DIRECT needs an aligned user buffer.
    let mut f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap();
    // SAFETY: layout has non-zero size; the buffer is written fully before use and freed below.
    let ptr = unsafe { std::alloc::alloc(layout) };
    assert!(!ptr.is_null());
    // SAFETY: ptr is valid for len bytes.
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
    buf.copy_from_slice(&data);
    f.seek(SeekFrom::Start(offset)).unwrap();
    let r = f.write_all(buf);
    // SAFETY: allocated above with the same layout.
    unsafe { std::alloc::dealloc(ptr, layout) };
    r.unwrap();
}

/// Copies a whole device into a file (the truth a restore point must reproduce).
pub fn copy_device(dev: &str, to: &Path) {
    flush_bufs(dev);
    let mut src = File::open(dev).unwrap();
    let mut dst = File::create(to).unwrap();
    std::io::copy(&mut src, &mut dst).unwrap();
    // Leave no cached pages for later O_DIRECT writes to collide with.
    flush_bufs(dev);
}
