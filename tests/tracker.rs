//! Change tracking: the torture test (many rounds of every kind of write, each followed by an
//! incremental or differential image; every restore point restored and compared byte for byte with
//! a copy of the device taken at that point), the gap cases (killed tracker, clean restart, lost
//! events, resized device) and chain damage.

mod common;

use common::*;
use serde_json::Value;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

const MIB: u64 = 1 << 20;

const INSTANCES: &str = "/sys/kernel/tracing/instances";

/// A test's scratch directory. Its state directories live inside it, and the tracker names each
/// kernel instance after its state directory, so the instances this test made are those whose
/// names start with this prefix. Tests run in parallel (and other suites may trace too), so the
/// count each test must leave unchanged is that of its own instances.
struct Work {
    dir: tempfile::TempDir,
    at_start: Vec<String>,
}

impl Work {
    fn new() -> Work {
        let dir = tempdir();
        let mut w = Work {
            dir,
            at_start: Vec::new(),
        };
        w.at_start = w.own_instances();
        w
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Instance-name prefix of state directories under this one ('/' is written '+').
    fn instance_prefix(&self) -> String {
        let canon = fs::canonicalize(self.path()).unwrap();
        let p = s(&canon);
        assert!(
            p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b)),
            "scratch path {p} needs escaping in instance names"
        );
        format!("cairn-{}+", p.replace('/', "+"))
    }

    fn own_instances(&self) -> Vec<String> {
        let prefix = self.instance_prefix();
        let mut v: Vec<String> = match fs::read_dir(INSTANCES) {
            Ok(d) => d
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix))
                .collect(),
            Err(_) => Vec::new(),
        };
        v.sort();
        v
    }

    /// The kernel instance of a state directory under this one.
    fn instance_of(&self, state: &Path) -> PathBuf {
        let rel = state.strip_prefix(self.path()).unwrap();
        Path::new(INSTANCES).join(format!(
            "{}{}",
            self.instance_prefix(),
            s(rel).replace('/', "+")
        ))
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        let left = self.own_instances();
        if !thread::panicking() {
            assert_eq!(
                left, self.at_start,
                "the test must leave as many cairn-* instances as it found"
            );
        }
    }
}

/// A `cairn tracker run` child with its own state directory. Dropping it kills it and removes its
/// kernel instance and state.
struct Tracker {
    child: Option<Child>,
    dev: String,
    state: PathBuf,
    log: PathBuf,
    extra: Vec<String>,
}

impl Tracker {
    fn start(dev: &str, state: &Path, extra: &[&str]) -> Tracker {
        let mut t = Tracker {
            child: None,
            dev: dev.to_string(),
            state: state.to_path_buf(),
            log: state.with_extension("log"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        t.spawn();
        t
    }

    fn spawn(&mut self) {
        let mut args = vec![
            "tracker".to_string(),
            "run".into(),
            self.dev.clone(),
            "--interval-ms".into(),
            "20".into(),
        ];
        args.extend(self.extra.iter().cloned());
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(bin())
            .args(&args)
            .env("CAIRN_STATE_DIR", &self.state)
            .env("CAIRN_FAULT_TRACKER", self.fault_dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn tracker");
        self.child = Some(child);
        // Wait for a real condition: the daemon answers status.
        for _ in 0..1000 {
            let o = self.status();
            if o.status.success() && o.json()["running"] == Value::Bool(true) {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "tracker exited with {st}: {}",
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "tracker did not come up: {}",
            fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// Where `inject` puts the daemon's one-shot fault triggers.
    fn fault_dir(&self) -> PathBuf {
        self.state.with_extension("faults")
    }

    /// Makes the next drain of block events at `site` (loop, status, cut, stop) lose what it read
    /// and fail, as a garbled ring-buffer page would.
    fn inject(&self, site: &str) {
        fs::create_dir_all(self.fault_dir()).unwrap();
        fs::write(self.fault_dir().join(site), b"").unwrap();
    }

    fn injected_fault_fired(&self, site: &str) -> bool {
        !self.fault_dir().join(site).exists()
    }

    fn status(&self) -> Out {
        cairn_env(
            &["tracker", "status", "--json"],
            &[("CAIRN_STATE_DIR", s(&self.state))],
        )
    }

    fn signal(&mut self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.as_ref().expect("running").id() as i32);
        nix::sys::signal::kill(pid, sig).unwrap();
    }

    /// SIGTERM (clean stop, state saved) or SIGKILL, and wait for the exit.
    fn stop(&mut self, sig: nix::sys::signal::Signal) {
        self.signal(sig);
        let st = self.child.take().unwrap().wait().unwrap();
        if sig == nix::sys::signal::Signal::SIGTERM {
            assert!(
                st.success(),
                "tracker did not stop cleanly: {st}: {}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new(bin())
            .args(["tracker", "reset"])
            .env("CAIRN_STATE_DIR", &self.state)
            .output();
    }
}

fn backup_with(dev: &str, repo: &Path, state: &Path, kind: &str) -> Value {
    let mut args = vec!["backup", dev, s(repo), "--name", "disk", "--json"];
    if !kind.is_empty() {
        args.push(kind);
    }
    let out = cairn_env(&args, &[("CAIRN_STATE_DIR", s(state))]);
    out.ok();
    out.json()
}

/// Deterministic xorshift, so every seed replays the same rounds.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn tool(name: &str, package: &str, args: &[&str]) {
    let t = require_tool(name, package);
    run_tool(&t, args);
}

/// Buffered write through the page cache (odd sizes and offsets allowed), flushed.
fn buffered_write(dev: &str, offset: u64, len: usize, seed: u64) {
    let mut f = OpenOptions::new().write(true).open(dev).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&random_vec(seed, len))
        .unwrap_or_else(|e| panic!("buffered write of {len} bytes at {offset} of {dev}: {e}"));
    f.sync_all()
        .unwrap_or_else(|e| panic!("fsync of {dev} after a buffered write at {offset}: {e}"));
    drop(f);
    flush_bufs(dev);
}

/// First differing 4 KiB block of two files, for a useful failure message.
fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut off = 0u64;
    loop {
        let na = fa.read(&mut ba).unwrap();
        let nb = fb.read(&mut bb).unwrap();
        if na != nb {
            return Some(off + na.min(nb) as u64);
        }
        if na == 0 {
            return None;
        }
        if let Some(i) = ba[..na].iter().zip(&bb[..nb]).position(|(x, y)| x != y) {
            return Some(off + i as u64 / 4096 * 4096);
        }
        off += na as u64;
    }
}

fn assert_restores_to(repo: &Path, id: &str, truth: &Path, work: &Path, what: &str) {
    let out = work.join(format!("restored-{id}.img"));
    let _ = fs::remove_file(&out);
    restore(repo, s(&out), &["--image", id]);
    if let Some(at) = first_difference(&out, truth) {
        panic!("{what}: restore of image {id} differs from the device copy at byte {at}");
    }
    fs::remove_file(&out).unwrap();
}

/// Layout of the torture disk (192 MiB): GPT, p1 ext4 at 1..97 MiB, p2 raw at 100..180 MiB; the
/// gaps 97..100 MiB and 180..191 MiB are written directly through the whole disk.
fn torture_disk(work: &Path) -> (LoopDev, String, String) {
    let disk = LoopDev::new_zeroed(&work.join("disk.img"), 192 * MIB);
    tool("sgdisk", "gdisk", &["-Z", &disk.dev]);
    tool(
        "sgdisk",
        "gdisk",
        &["-n", "1:2048:+96M", "-n", "2:204800:+80M", &disk.dev],
    );
    tool("partx", "util-linux", &["-u", &disk.dev]);
    let p1 = disk.partition(1);
    let p2 = disk.partition(2);
    mkfs_ext4(&p1);
    (disk, p1, p2)
}

fn torture(seed: u64) {
    require_root();
    let work = Work::new();
    let w = work.path();
    let (disk, _p1, p2) = torture_disk(w);
    let state = w.join("state");
    let mut tracker = Tracker::start(&disk.dev, &state, &[]);
    let mnt = w.join("mnt");
    let mount = Mount::new(&disk.partition(1), &mnt, None);
    let repo = w.join("repo");
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    // (image id, truth file, kind) of every restore point to check.
    let mut points: Vec<(String, PathBuf, String)> = Vec::new();
    let mut files: Vec<PathBuf> = Vec::new();
    let rounds = 8;
    for round in 0..rounds {
        let mut background: Option<std::thread::JoinHandle<()>> = None;
        let mut race: Option<(u64, u64)> = None;
        if round > 0 {
            for op in 0..(3 + rng.below(5)) {
                let s2 = seed * 1000 + round * 100 + op;
                match rng.below(8) {
                    0 => {
                        // O_DIRECT through the whole disk, in a gap between partitions.
                        let base = if rng.below(2) == 0 {
                            97 * MIB
                        } else {
                            180 * MIB
                        };
                        let off = base + rng.below(2 * MIB / 4096) * 4096;
                        direct_write(&disk.dev, off, 4096 * (1 + rng.below(16)) as usize, s2);
                    }
                    1 => {
                        // Buffered, unaligned, through the partition device.
                        let off = rng.below(79 * MIB) + 1;
                        buffered_write(&p2, off, (1 + rng.below(20000)) as usize, s2);
                    }
                    2 => {
                        // A new file in the filesystem.
                        let f = mnt.join(format!("f{round}-{op}.dat"));
                        fs::write(&f, random_vec(s2, (1 + rng.below(2 * MIB)) as usize)).unwrap();
                        files.push(f);
                    }
                    3 => {
                        // Overwrite the middle of an existing file, or delete one.
                        if let Some(f) = files
                            .get(rng.below(files.len().max(1) as u64) as usize)
                            .cloned()
                        {
                            if rng.below(3) == 0 {
                                fs::remove_file(&f).unwrap();
                                files.retain(|x| x != &f);
                            } else {
                                let len = fs::metadata(&f).unwrap().len();
                                let mut h = OpenOptions::new().write(true).open(&f).unwrap();
                                h.seek(SeekFrom::Start(rng.below(len.max(1)))).unwrap();
                                h.write_all(&random_vec(s2, 5000)).unwrap();
                            }
                        }
                    }
                    4 => {
                        // Discard (the loop device punches a hole: reads back zero).
                        let off = rng.below(78 * MIB / 65536) * 65536;
                        let len = 65536 * (1 + rng.below(16));
                        tool(
                            "blkdiscard",
                            "util-linux",
                            &["-o", &off.to_string(), "-l", &len.to_string(), &p2],
                        );
                    }
                    5 => {
                        // Write-zeroes: rwbs "N", which a filter on "W" would miss.
                        let off = rng.below(78 * MIB / 4096) * 4096;
                        let len = 4096 * (1 + rng.below(64));
                        tool(
                            "blkdiscard",
                            "util-linux",
                            &["-z", "-o", &off.to_string(), "-l", &len.to_string(), &p2],
                        );
                    }
                    6 => {
                        // Zero a range inside a file.
                        if let Some(f) = files.first() {
                            let len = fs::metadata(f).unwrap().len();
                            if len > 8192 {
                                tool(
                                    "fallocate",
                                    "util-linux",
                                    &["-z", "-o", "4096", "-l", &(len / 2).to_string(), s(f)],
                                );
                            }
                        }
                    }
                    _ => {
                        // Writes racing with the backup itself, started after this round's other
                        // writes (a buffered write to p2 while they run would collide with them).
                        race = Some((rng.below(60) * MIB, s2));
                    }
                }
            }
        }
        if let Some((start, s2)) = race {
            // Their final state must be in the next image (this restore point is then not
            // compared). Drop p2's page cache first: O_DIRECT writes colliding with cached pages
            // make the kernel flag the device with EIO for the next fsync ("Page cache
            // invalidation failure on direct I/O").
            flush_bufs(&p2);
            let p2c = p2.clone();
            background = Some(thread::spawn(move || {
                for i in 0..64u64 {
                    direct_write(&p2c, start + i * 65536, 65536, s2 + i);
                }
            }));
        }
        tool("sync", "coreutils", &[]);
        // Quiesce the filesystem so the image and the copy see the same device.
        tool("fsfreeze", "util-linux", &["-f", s(&mnt)]);
        let kind = match (round, rng.below(3)) {
            (0, _) => "--full",
            (_, 0) => "--differential",
            _ => "--incremental",
        };
        let r = backup_with(&disk.dev, &repo, &state, kind);
        let id = id_of(&r);
        if round > 0 {
            assert_eq!(
                r["method"], "tracked",
                "round {round}: expected a tracked backup: {r}"
            );
        }
        let racing = background.is_some();
        if let Some(b) = background {
            b.join().unwrap();
        }
        if !racing {
            let truth = w.join(format!("truth-{round}.img"));
            copy_device(&disk.dev, &truth);
            points.push((id, truth, kind.to_string()));
        }
        tool("fsfreeze", "util-linux", &["-u", s(&mnt)]);
    }
    drop(mount);
    tracker.stop(nix::sys::signal::Signal::SIGTERM);
    let v = cairn(&["verify", s(&repo), "--json"]);
    v.ok();
    assert_eq!(v.json()["ok"], Value::Bool(true));
    assert!(
        points.len() >= rounds as usize / 2,
        "too few checked restore points"
    );
    for (id, truth, kind) in &points {
        assert_restores_to(&repo, id, truth, w, &format!("seed {seed}, {kind}"));
    }
}

#[test]
fn torture_seed_1() {
    torture(1);
}

#[test]
fn torture_seed_2() {
    torture(2);
}

#[test]
fn torture_seed_3() {
    torture(3);
}

/// One full image with the tracker running, then `gap` happens, then a write; the next
/// incremental must say compare-scan (mentioning `why`) and restore exactly.
fn gap_case(gap: impl FnOnce(&mut Tracker, &LoopDev), why: &str, tracker_args: &[&str]) {
    require_root();
    let work = Work::new();
    let w = work.path();
    let disk = LoopDev::new_zeroed(&w.join("disk.img"), 64 * MIB);
    direct_write(&disk.dev, 5 * MIB, 3 * MIB as usize, 1);
    let state = w.join("state");
    let repo = w.join("repo");
    let mut tracker = Tracker::start(&disk.dev, &state, tracker_args);
    backup_with(&disk.dev, &repo, &state, "--full");
    direct_write(&disk.dev, 10 * MIB, 8192, 2);
    let r = backup_with(&disk.dev, &repo, &state, "");
    assert_eq!(r["method"], "tracked", "before the gap: {r}");
    gap(&mut tracker, &disk);
    direct_write(&disk.dev, 20 * MIB, 4096, 3);
    let r = backup_with(&disk.dev, &repo, &state, "");
    assert_eq!(r["method"], "compare-scan", "after the gap: {r}");
    let reason = r["method_reason"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        reason.contains(why),
        "reason {reason:?} should mention {why:?}"
    );
    let truth = w.join("truth.img");
    copy_device(&disk.dev, &truth);
    assert_restores_to(&repo, &id_of(&r), &truth, w, "after the gap");
    // The compare-scan re-establishes continuity: the next one is tracked again, and exact.
    direct_write(&disk.dev, 30 * MIB, 4096, 4);
    let r = backup_with(&disk.dev, &repo, &state, "");
    assert_eq!(r["method"], "tracked", "after the compare-scan: {r}");
    copy_device(&disk.dev, &truth);
    assert_restores_to(&repo, &id_of(&r), &truth, w, "after recovery");
}

#[test]
fn killed_tracker_forces_compare_scan() {
    gap_case(
        |t, d| {
            t.stop(nix::sys::signal::Signal::SIGKILL);
            // Written while no tracker runs: only a compare-scan can find it.
            direct_write(&d.dev, 40 * MIB, 4096, 9);
            t.spawn();
        },
        "killed",
        &[],
    );
}

#[test]
fn lost_events_force_compare_scan() {
    gap_case(
        |t, d| {
            // A paused tracker with a tiny buffer: thousands of writes overflow it.
            t.signal(nix::sys::signal::Signal::SIGSTOP);
            let mut f = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT | libc::O_SYNC)
                .open(&d.dev)
                .unwrap();
            let layout = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
            // SAFETY: non-zero layout, freed below.
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            // SAFETY: ptr is valid for 4096 bytes.
            let buf = unsafe { std::slice::from_raw_parts(ptr, 4096) };
            for i in 0..3000u64 {
                f.seek(SeekFrom::Start(32 * MIB + (i % 2048) * 4096))
                    .unwrap();
                f.write_all(buf).unwrap();
            }
            // SAFETY: allocated above with this layout.
            unsafe { std::alloc::dealloc(ptr, layout) };
            t.signal(nix::sys::signal::Signal::SIGCONT);
        },
        "dropped",
        &["--buffer-kb", "8"],
    );
}

#[test]
fn resized_device_forces_compare_scan() {
    gap_case(
        |_, d| {
            let f = OpenOptions::new().write(true).open(&d.backing).unwrap();
            f.set_len(80 * MIB).unwrap();
            tool("losetup", "util-linux", &["-c", &d.dev]);
            direct_write(&d.dev, 70 * MIB, 8192, 7);
        },
        "size",
        &[],
    );
}

const INJECTED: &str = "injected fault";

#[test]
fn event_error_in_the_status_handler_breaks_continuity() {
    gap_case(
        |t, _| {
            t.inject("status");
            let st = t.status();
            st.ok();
            assert!(t.injected_fault_fired("status"), "status did not drain");
            let consumers = st.json()["devices"][0]["consumers"].clone();
            assert!(
                consumers[0]["continuity_since_image"]
                    .as_str()
                    .unwrap()
                    .contains(INJECTED),
                "status should report the broken continuity: {consumers}"
            );
        },
        INJECTED,
        &[],
    );
}

#[test]
fn event_error_in_the_drain_loop_breaks_continuity() {
    gap_case(
        |t, _| {
            t.inject("loop");
            // A real condition: the daemon removes the trigger when the fault fires.
            for _ in 0..1000 {
                if t.injected_fault_fired("loop") {
                    return;
                }
                thread::sleep(Duration::from_millis(10));
            }
            panic!("the drain loop never ran");
        },
        INJECTED,
        &[],
    );
}

#[test]
fn event_error_during_a_cut_breaks_continuity() {
    gap_case(|t, _| t.inject("cut"), INJECTED, &[]);
}

#[test]
fn event_error_at_a_clean_stop_breaks_continuity() {
    gap_case(
        |t, _| {
            t.inject("stop");
            t.stop(nix::sys::signal::Signal::SIGTERM);
            assert!(t.injected_fault_fired("stop"), "the stop did not drain");
            t.spawn();
        },
        INJECTED,
        &[],
    );
}

#[test]
fn clean_restart_keeps_tracking_without_a_gap() {
    require_root();
    let work = Work::new();
    let w = work.path();
    let disk = LoopDev::new_zeroed(&w.join("disk.img"), 64 * MIB);
    direct_write(&disk.dev, MIB, MIB as usize, 1);
    let state = w.join("state");
    let repo = w.join("repo");
    let mut tracker = Tracker::start(&disk.dev, &state, &[]);
    backup_with(&disk.dev, &repo, &state, "--full");
    tracker.stop(nix::sys::signal::Signal::SIGTERM);
    // The kernel instance keeps buffering while the daemon is down.
    direct_write(&disk.dev, 9 * MIB, 12288, 2);
    blkzero(&disk.dev, MIB, 65536);
    tracker.spawn();
    let r = backup_with(&disk.dev, &repo, &state, "");
    assert_eq!(r["method"], "tracked", "{r}");
    let truth = w.join("truth.img");
    copy_device(&disk.dev, &truth);
    assert_restores_to(&repo, &id_of(&r), &truth, w, "after a clean restart");
}

fn instances_in_status(st: &Out) -> Vec<Value> {
    st.ok();
    st.json()["instances"].as_array().unwrap().clone()
}

fn verdict_of(instances: &[Value], name: &Path) -> Option<(String, String)> {
    let name = name.file_name().unwrap().to_str().unwrap();
    instances.iter().find(|i| i["name"] == name).map(|i| {
        (
            i["verdict"].as_str().unwrap().to_string(),
            i["why"].as_str().unwrap().to_string(),
        )
    })
}

#[test]
fn status_lists_orphaned_instances_and_reset_removes_only_those() {
    require_root();
    let work = Work::new();
    let w = work.path();
    let disk = LoopDev::new_zeroed(&w.join("disk.img"), 32 * MIB);
    let repo = w.join("repo");
    // Killed: nobody will resume its instance (a restart makes a new one).
    let killed_state = w.join("killed");
    let mut killed = Tracker::start(&disk.dev, &killed_state, &[]);
    backup_with(&disk.dev, &repo, &killed_state, "--full");
    killed.stop(nix::sys::signal::Signal::SIGKILL);
    // Stopped cleanly, then its state directory deleted.
    let gone_state = w.join("gone");
    let mut gone = Tracker::start(&disk.dev, &gone_state, &[]);
    gone.stop(nix::sys::signal::Signal::SIGTERM);
    fs::remove_dir_all(&gone_state).unwrap();
    // Stopped cleanly: kept for its restart, which must not lose it.
    let kept_state = w.join("kept");
    let kept_repo = w.join("kept-repo");
    let mut kept = Tracker::start(&disk.dev, &kept_state, &[]);
    backup_with(&disk.dev, &kept_repo, &kept_state, "--full");
    kept.stop(nix::sys::signal::Signal::SIGTERM);
    // Running.
    let live_state = w.join("live");
    let live = Tracker::start(&disk.dev, &live_state, &[]);

    let list = instances_in_status(&live.status());
    let (v, why) = verdict_of(&list, &work.instance_of(&killed_state)).expect("killed listed");
    assert_eq!(v, "orphaned", "{why}");
    assert!(why.contains("did not stop cleanly"), "{why}");
    let (v, why) = verdict_of(&list, &work.instance_of(&gone_state)).expect("gone listed");
    assert_eq!(v, "orphaned", "{why}");
    assert!(why.contains("is gone"), "{why}");
    let (v, why) = verdict_of(&list, &work.instance_of(&kept_state)).expect("kept listed");
    assert_eq!(v, "kept", "{why}");
    let (v, why) = verdict_of(&list, &work.instance_of(&live_state)).expect("live listed");
    assert_eq!(v, "in-use", "{why}");
    // The human form says so too, and where to go from there.
    let text = cairn_env(
        &["tracker", "status"],
        &[("CAIRN_STATE_DIR", s(&gone_state))],
    );
    text.ok();
    assert!(
        text.stdout.contains("ORPHANED") && text.stdout.contains("reset --orphans"),
        "{}",
        text.stdout
    );

    let out = cairn_env(
        &["tracker", "reset", "--orphans", "--json"],
        &[("CAIRN_STATE_DIR", s(&live_state))],
    );
    out.ok();
    assert!(!work.instance_of(&killed_state).exists());
    assert!(!work.instance_of(&gone_state).exists());
    assert!(
        work.instance_of(&kept_state).exists(),
        "a kept instance stays"
    );
    assert!(
        work.instance_of(&live_state).exists(),
        "an instance in use stays"
    );
    // The kept one still resumes without a gap.
    direct_write(&disk.dev, 3 * MIB, 4096, 1);
    kept.spawn();
    let r = backup_with(&disk.dev, &kept_repo, &kept_state, "");
    assert_eq!(r["method"], "tracked", "{r}");
    drop(live);
}

#[test]
fn stop_removes_the_instance_and_the_next_backup_compare_scans() {
    require_root();
    let work = Work::new();
    let w = work.path();
    let disk = LoopDev::new_zeroed(&w.join("disk.img"), 32 * MIB);
    let repo = w.join("repo");
    let state = w.join("state");
    let mut tracker = Tracker::start(&disk.dev, &state, &[]);
    let instance = work.instance_of(&state);
    assert!(
        instance.is_dir(),
        "{} exists while running",
        instance.display()
    );
    backup_with(&disk.dev, &repo, &state, "--full");
    let env = [("CAIRN_STATE_DIR", s(&state))];
    cairn_env(&["tracker", "stop"], &env).ok();
    assert!(!instance.exists(), "stop removes the instance");
    let st = tracker.child.take().unwrap().wait().unwrap();
    assert!(st.success(), "the tracker exits cleanly after stop: {st}");
    // Restarted later: what happened meanwhile was not seen.
    direct_write(&disk.dev, 7 * MIB, 4096, 3);
    tracker.spawn();
    let r = backup_with(&disk.dev, &repo, &state, "");
    assert_eq!(r["method"], "compare-scan", "{r}");
    assert!(
        r["method_reason"]
            .as_str()
            .unwrap()
            .contains("stopped for good"),
        "{r}"
    );
    // A SIGTERM stop keeps the instance; `tracker stop` afterwards (a disabled unit's
    // ExecStopPost) removes it.
    tracker.stop(nix::sys::signal::Signal::SIGTERM);
    assert!(instance.is_dir(), "a clean stop keeps the instance");
    cairn_env(&["tracker", "stop"], &env).ok();
    assert!(
        !instance.exists(),
        "stop without a tracker removes the kept instance"
    );
    tracker.spawn();
    let r = backup_with(&disk.dev, &repo, &state, "");
    assert_eq!(r["method"], "compare-scan", "{r}");
    assert!(
        r["method_reason"]
            .as_str()
            .unwrap()
            .contains("stopped for good"),
        "{r}"
    );
}

#[test]
fn unreadable_ranges_stay_dirty_for_the_next_backup() {
    require_root();
    let work = Work::new();
    let w = work.path();
    let disk = LoopDev::new_zeroed(&w.join("disk.img"), 32 * MIB);
    direct_write(&disk.dev, MIB, 4 * MIB as usize, 1);
    let state = w.join("state");
    let repo = w.join("repo");
    let _tracker = Tracker::start(&disk.dev, &state, &[]);
    backup_with(&disk.dev, &repo, &state, "--full");
    direct_write(&disk.dev, 8 * MIB, 65536, 2);
    // The incremental reads the 64 KiB written; 8 KiB of it fail.
    let bad = (8 * MIB + 16384, 8192u64);
    let out = cairn_env(
        &["backup", &disk.dev, s(&repo), "--name", "disk", "--json"],
        &[
            ("CAIRN_STATE_DIR", s(&state)),
            ("CAIRN_FAULT_READ", &format!("{}:{}", bad.0, bad.1)),
        ],
    );
    assert_eq!(out.code(), Some(3), "{}", out.describe());
    let r = out.json();
    assert_eq!(r["method"], "tracked", "{r}");
    assert_eq!(r["bad_ranges"], serde_json::json!([[bad.0, bad.1]]), "{r}");
    // Nothing written since, and the disk reads fine now: the unreadable range is read again.
    let r = backup_with(&disk.dev, &repo, &state, "");
    assert_eq!(r["method"], "tracked", "{r}");
    assert!(
        r["bytes_read"].as_u64().unwrap() >= bad.1,
        "the next backup must read the unreadable range again: {r}"
    );
    assert_eq!(r["bad_ranges"], serde_json::json!([]), "{r}");
    let truth = w.join("truth.img");
    copy_device(&disk.dev, &truth);
    assert_restores_to(&repo, &id_of(&r), &truth, w, "after re-reading bad ranges");
    // Read again, they are clean: the one after reads nothing.
    let r = backup_with(&disk.dev, &repo, &state, "");
    assert_eq!(r["bytes_read"], 0, "{r}");
}

fn blkzero(dev: &str, off: u64, len: u64) {
    tool(
        "blkdiscard",
        "util-linux",
        &["-z", "-o", &off.to_string(), "-l", &len.to_string(), dev],
    );
}

#[test]
fn failed_backup_keeps_its_changes_for_the_next_one() {
    require_root();
    let work = Work::new();
    let w = work.path();
    let disk = LoopDev::new_zeroed(&w.join("disk.img"), 64 * MIB);
    let state = w.join("state");
    // The repository on a small tmpfs: the incremental below does not fit, and fails after its cut.
    let small = w.join("small");
    fs::create_dir(&small).unwrap();
    tool(
        "mount",
        "mount",
        &["-t", "tmpfs", "-o", "size=6m", "tmpfs", s(&small)],
    );
    let _tmpfs = Mount { dir: small.clone() };
    let repo = small.join("repo");
    let _tracker = Tracker::start(&disk.dev, &state, &[]);
    backup_with(&disk.dev, &repo, &state, "--full");
    direct_write(&disk.dev, 3 * MIB, 8 * MIB as usize, 5);
    let out = cairn_env(
        &["backup", &disk.dev, s(&repo), "--name", "disk", "--json"],
        &[("CAIRN_STATE_DIR", s(&state))],
    );
    out.failed();
    assert!(
        out.text_lower().contains("full"),
        "the error should say the destination is full: {}",
        out.stderr
    );
    tool("mount", "mount", &["-o", "remount,size=64m", s(&small)]);
    let r = backup_with(&disk.dev, &repo, &state, "");
    assert_eq!(r["method"], "tracked", "{r}");
    assert!(
        r["data_bytes"].as_u64().unwrap() >= 8 * MIB,
        "the failed backup's changes are still there: {r}"
    );
    let truth = w.join("truth.img");
    copy_device(&disk.dev, &truth);
    assert_restores_to(&repo, &id_of(&r), &truth, w, "after a failed backup");
}

#[test]
fn chain_damage_is_reported_per_restore_point() {
    require_root();
    let work = Work::new();
    let w = work.path();
    let disk = LoopDev::new_zeroed(&w.join("disk.img"), 32 * MIB);
    let repo = w.join("repo");
    let state = w.join("no-tracker");
    let mut ids = Vec::new();
    let kinds = [
        "--full",
        "--incremental",
        "--incremental",
        "--differential",
        "--incremental",
    ];
    for (i, kind) in kinds.iter().enumerate() {
        direct_write(&disk.dev, (i as u64 * 5 + 1) * MIB, 65536, i as u64 + 10);
        let r = backup_with(&disk.dev, &repo, &state, kind);
        ids.push(id_of(&r));
    }
    // ids: F, I1, I2 (after I1), D (after F), I3 (after D). Damage I1.
    let seg = image_dir(&repo, &ids[1]).join("segment-000000");
    flip_byte(&seg, 32 + 32 + 10);
    let v = cairn(&["verify", s(&repo), "--json"]);
    v.failed();
    let report = v.json();
    let status = |id: &str| -> (String, bool) {
        let img = report["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == id)
            .unwrap()
            .clone();
        (
            img["status"].as_str().unwrap().to_string(),
            img["restorable"].as_bool().unwrap(),
        )
    };
    assert_eq!(
        status(&ids[0]),
        ("ok".into(), true),
        "the full stays restorable"
    );
    assert_eq!(
        status(&ids[1]),
        ("damaged".into(), false),
        "the damaged incremental"
    );
    assert!(
        !status(&ids[2]).1,
        "a later incremental depends on the damaged one"
    );
    assert_eq!(
        status(&ids[3]),
        ("ok".into(), true),
        "the differential depends only on the full"
    );
    assert_eq!(
        status(&ids[4]),
        ("ok".into(), true),
        "an incremental after the differential"
    );
    // Restoring the unrestorable point fails before writing anything, naming the damaged image.
    let target = w.join("target.img");
    let out = cairn(&[
        "restore",
        s(&repo),
        s(&target),
        "--image",
        &ids[2],
        "--json",
    ]);
    out.failed();
    assert!(
        out.stderr.contains(&ids[1]),
        "error should name the damaged image: {}",
        out.stderr
    );
    assert!(
        !target.exists(),
        "nothing may be written, not even the target file"
    );
    // Damage a differential: only it is affected.
    let seg = image_dir(&repo, &ids[3]).join("segment-000000");
    flip_byte(&seg, 32 + 32 + 10);
    let v = cairn(&["verify", s(&repo), "--json"]).json();
    let d = v["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == ids[3].as_str())
        .unwrap()
        .clone();
    assert_eq!(d["status"], "damaged");
    let i3 = v["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == ids[4].as_str())
        .unwrap()
        .clone();
    assert_eq!(
        i3["restorable"], false,
        "I3 was taken after the differential"
    );
    let f = v["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == ids[0].as_str())
        .unwrap()
        .clone();
    assert_eq!(f["restorable"], true);
}

#[test]
fn differential_needs_only_its_full() {
    require_root();
    let work = Work::new();
    let w = work.path();
    let disk = LoopDev::new_zeroed(&w.join("disk.img"), 32 * MIB);
    let state = w.join("state");
    let repo = w.join("repo");
    let _t = Tracker::start(&disk.dev, &state, &[]);
    direct_write(&disk.dev, MIB, 65536, 1);
    let full = backup_with(&disk.dev, &repo, &state, "");
    assert_eq!(full["kind"], "full", "the first backup of a name is full");
    direct_write(&disk.dev, 2 * MIB, 4096, 2);
    let i1 = backup_with(&disk.dev, &repo, &state, "");
    assert_eq!(i1["kind"], "incremental");
    direct_write(&disk.dev, 3 * MIB, 4096, 3);
    let d = backup_with(&disk.dev, &repo, &state, "--differential");
    assert_eq!(d["kind"], "differential");
    assert_eq!(d["method"], "tracked");
    assert_eq!(
        d["parent"], full["id"],
        "a differential's parent is the full"
    );
    // It holds both changes since the full, so deleting the incremental does not matter.
    fs::remove_dir_all(image_dir(&repo, &id_of(&i1))).unwrap();
    let truth = w.join("truth.img");
    copy_device(&disk.dev, &truth);
    assert_restores_to(
        &repo,
        &id_of(&d),
        &truth,
        w,
        "differential without the incremental",
    );
    let list = cairn(&["list", s(&repo), "--json"]).json();
    let kinds: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["full", "differential"]);
}

#[test]
fn compare_scan_stores_only_the_changed_granules() {
    let work = Work::new();
    let w = work.path();
    let src = w.join("src.img");
    write_random_file(&src, 64 * MIB, 21);
    let repo = w.join("repo");
    let state = w.join("no-tracker");
    backup_with(s(&src), &repo, &state, "");
    // Three 4 KiB writes in three different 1 MiB blocks, and one block zeroed.
    let mut f = OpenOptions::new().write(true).open(&src).unwrap();
    for (i, off) in [MIB + 4096, 17 * MIB, 40 * MIB + 12288]
        .into_iter()
        .enumerate()
    {
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&random_vec(100 + i as u64, 4096)).unwrap();
    }
    f.seek(SeekFrom::Start(50 * MIB)).unwrap();
    f.write_all(&vec![0u8; MIB as usize]).unwrap();
    drop(f);
    let r = backup_with(s(&src), &repo, &state, "");
    assert_eq!(r["method"], "compare-scan", "{r}");
    assert_eq!(
        r["data_bytes"],
        3 * 4096,
        "only the changed granules are stored: {r}"
    );
    assert!(r["bytes_stored"].as_u64().unwrap() < 64 * 1024, "{r}");
    assert_restores_to(
        &repo,
        &id_of(&r),
        &src,
        w,
        "compare-scan at granule resolution",
    );
}

/// Writes `count` 4 KiB granules with O_DIRECT, every other one from the start of `dev`: as many
/// separate changed runs.
fn write_every_other_granule(dev: &str, count: u64, seed: u64) {
    let mut f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap();
    let layout = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
    // SAFETY: layout has non-zero size; the buffer is filled before use and freed below.
    let ptr = unsafe { std::alloc::alloc(layout) };
    assert!(!ptr.is_null());
    // SAFETY: ptr is valid for 4096 bytes, allocated above.
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, 4096) };
    for i in 0..count {
        buf.copy_from_slice(&random_vec(seed + i, 4096));
        f.seek(SeekFrom::Start(i * 2 * 4096)).unwrap();
        f.write_all(buf).unwrap();
    }
    // SAFETY: allocated above with the same layout; `buf` is not used after this.
    unsafe { std::alloc::dealloc(ptr, layout) };
}

/// A differential after a gap compare-scans and hands the tracker every granule it found
/// changed since the full, streamed in batches while it runs; with them the since-full set is
/// whole again, so the next differential is tracked — and holds the gap's writes, which only
/// that repair set carries.
#[test]
fn a_differential_compare_scan_repairs_the_since_full_set_in_batches() {
    require_root();
    let work = Work::new();
    let w = work.path();
    let disk = LoopDev::new_zeroed(&w.join("disk.img"), 64 * MIB);
    let state = w.join("state");
    let repo = w.join("repo");
    let mut tracker = Tracker::start(&disk.dev, &state, &[]);
    let full = backup_with(&disk.dev, &repo, &state, "--full");
    tracker.stop(nix::sys::signal::Signal::SIGKILL);
    // Written while no tracker runs, in more runs than one batch of 4096.
    write_every_other_granule(&disk.dev, 7000, 7000);
    tracker.spawn();
    let d1 = backup_with(&disk.dev, &repo, &state, "--differential");
    assert_eq!(
        (d1["kind"].as_str(), d1["method"].as_str()),
        (Some("differential"), Some("compare-scan")),
        "{d1}"
    );
    direct_write(&disk.dev, 60 * MIB, 4096, 8);
    let d2 = backup_with(&disk.dev, &repo, &state, "--differential");
    assert_eq!(
        d2["method"], "tracked",
        "the repair made the set whole: {d2}"
    );
    assert_eq!(d2["parent"], full["id"]);
    assert!(
        d2["data_bytes"].as_u64().unwrap() >= 7001 * 4096,
        "the tracked differential holds the gap's writes: {d2}"
    );
    let truth = w.join("truth.img");
    copy_device(&disk.dev, &truth);
    fs::remove_dir_all(image_dir(&repo, &id_of(&d1))).unwrap();
    assert_restores_to(&repo, &id_of(&d2), &truth, w, "the repaired differential");
}

/// More changed runs than one batch holds (4096), carried through a clean restart (so through
/// the saved binary state) and a cut's streamed reply: the incremental holds every one of them.
#[test]
fn thousands_of_scattered_runs_survive_a_restart_and_stream_through_a_cut() {
    require_root();
    let work = Work::new();
    let w = work.path();
    let disk = LoopDev::new_zeroed(&w.join("disk.img"), 64 * MIB);
    let state = w.join("state");
    let repo = w.join("repo");
    let mut tracker = Tracker::start(&disk.dev, &state, &[]);
    backup_with(&disk.dev, &repo, &state, "--full");
    // Every other 4 KiB granule of the first 48 MiB: 6000 separate runs.
    let runs = 6000u64;
    write_every_other_granule(&disk.dev, runs, 1000);
    tracker.stop(nix::sys::signal::Signal::SIGTERM);
    let saved = fs::read(state.join("tracker-state")).expect("the state file of this version");
    assert_eq!(
        &saved[..8],
        b"CAIRNTRK",
        "the state is saved in the binary format"
    );
    assert!(!state.join("tracker-state.json").exists());
    tracker.spawn();
    let r = backup_with(&disk.dev, &repo, &state, "");
    assert_eq!(r["method"], "tracked", "{r}");
    assert!(
        r["data_bytes"].as_u64().unwrap() >= runs * 4096,
        "every scattered granule is in the incremental: {r}"
    );
    let truth = w.join("truth.img");
    copy_device(&disk.dev, &truth);
    assert_restores_to(&repo, &id_of(&r), &truth, w, "after 6000 scattered runs");
}
