//! `cairn mount` / `cairn umount`: every restore point of a chain shown read-only, its exact
//! bytes (`--raw`) and its filesystems; a damaged block is EIO for its range only; a mount
//! leaves nothing behind after `umount`, also when its process was killed with SIGKILL.

mod common;

use common::gpt::{hash_range, sgdisk, SECTOR};
use common::*;
use serde_json::Value;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const DISK: u64 = 64 * MIB;
/// Partition 1 (ext4): 1 MiB .. 25 MiB; partition 2 (FAT): 25 MiB .. 41 MiB.
const P1: (u64, u64) = (MIB, 24 * MIB);
const P2: (u64, u64) = (25 * MIB, 16 * MIB);
/// Data outside every partition.
const OUTSIDE: u64 = 48 * MIB;

/// Mounts and loop devices below `dir`, from the kernel's own tables.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    for line in mountinfo.lines() {
        let mp = line.split(' ').nth(4).unwrap_or("");
        if Path::new(mp).starts_with(dir) {
            out.push(format!("mount: {line}"));
        }
    }
    let losetup = require_tool("losetup", "util-linux");
    let o = run_tool(&losetup, &["-a"]);
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        if line.contains(s(dir)) {
            out.push(format!("loop device: {line}"));
        }
    }
    out
}

/// A directory a test mounts restore points at; whatever is still mounted there when it is
/// dropped (a failed test) is ended, so no mount or loop device outlives the test.
struct MountDir {
    dir: PathBuf,
}

impl MountDir {
    fn new(parent: &Path, name: &str) -> MountDir {
        let dir = parent.join(name);
        fs::create_dir_all(&dir).unwrap();
        MountDir {
            dir: dir.canonicalize().unwrap(),
        }
    }

    fn path(&self) -> &Path {
        &self.dir
    }

    /// `cairn mount REPO DIR --background --json [extra]`, asserting success.
    fn mount(&self, repo: &Path, extra: &[&str]) -> Value {
        let mut args = vec!["mount", s(repo), s(&self.dir), "--background", "--json"];
        args.extend_from_slice(extra);
        let out = cairn(&args);
        out.ok();
        out.json()
    }

    /// `cairn umount DIR`, asserting success and that nothing is left below DIR.
    fn umount(&self) {
        cairn(&["umount", s(&self.dir)]).ok();
        let left = leftovers(&self.dir);
        assert!(
            left.is_empty(),
            "`cairn umount` left behind:\n{}",
            left.join("\n")
        );
    }
}

impl Drop for MountDir {
    fn drop(&mut self) {
        if leftovers(&self.dir).is_empty() {
            return;
        }
        let _ = Command::new(bin())
            .args(["umount", s(&self.dir)])
            .stdin(Stdio::null())
            .output();
        if !leftovers(&self.dir).is_empty() {
            let _ = Command::new("umount")
                .args(["-R", "-l", s(&self.dir)])
                .output();
        }
    }
}

/// A GPT loop disk: ext4 on partition 1, FAT (filled with mtools) on 2, data outside both.
struct Disk {
    lo: LoopDev,
}

impl Disk {
    fn new(dir: &Path) -> Disk {
        require_root();
        let file = dir.join("disk.img");
        write_random_file(&file, DISK, 7);
        // The GPT areas start clean; everything else (the gaps) keeps its random bytes.
        sgdisk(&["-Z", s(&file)]);
        sgdisk(&[
            "-n",
            &format!("1:{}:+{}", P1.0 / SECTOR, P1.1 / SECTOR),
            "-t",
            "1:8300",
            "-n",
            &format!("2:{}:+{}", P2.0 / SECTOR, P2.1 / SECTOR),
            "-t",
            "2:0700",
            s(&file),
        ]);
        let lo = LoopDev::attach(&file);
        let disk = Disk { lo };
        mkfs_ext4(&disk.part(1));
        mkfs_vfat(&disk.part(2));
        disk
    }

    fn dev(&self) -> &str {
        &self.lo.dev
    }

    fn part(&self, n: u32) -> String {
        self.lo.partition(n)
    }

    /// Runs `f` on partition 1's filesystem, mounted read-write at `at`.
    fn with_ext4(&self, at: &Path, f: impl FnOnce(&Path)) {
        let m = Mount::new(&self.part(1), at, None);
        f(&m.dir);
        m.unmount();
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        // Partitions go before the device.
        let _ = Command::new("partx").args(["-d", &self.lo.dev]).output();
    }
}

fn mtools(tool: &str, args: &[&str]) -> std::process::Output {
    let t = require_tool(tool, "mtools");
    let o = Command::new(&t)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{tool} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// One restore point: its image id, the source disk's bytes then, and the files ext4 held.
struct Point {
    id: String,
    copy: PathBuf,
    ext4: Vec<&'static str>,
}

/// Names of the regular files at the top of a directory, sorted.
fn top_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn check_raw(view: &Path, p: &Point) {
    assert_eq!(size_of(&view.join("disk")), DISK);
    assert_same_content(&view.join("disk"), &p.copy);
    for (n, (start, len)) in [(1, P1), (2, P2)] {
        let f = view.join(format!("p{n}"));
        assert_eq!(size_of(&f), len, "{} has the partition's size", f.display());
        assert_eq!(
            hash_range(&f, 0, len),
            hash_range(&p.copy, start, len),
            "{} holds partition {n}'s bytes of image {}",
            f.display(),
            p.id
        );
    }
}

#[test]
fn every_restore_point_of_a_chain_shows_its_bytes_and_files() {
    let t = tempdir();
    let disk = Disk::new(t.path());
    let repo = t.path().join("repo");
    let work = t.path().join("work");
    let view = MountDir::new(t.path(), "view");
    // The FAT partition's file, written once.
    let fat_file = t.path().join("fat.txt");
    fs::write(&fat_file, text_vec(3, 5000)).unwrap();
    mtools("mcopy", &["-i", &disk.part(2), s(&fat_file), "::/fat.txt"]);
    let a_txt = text_vec(1, 70_000);
    let b_bin = random_vec(2, 3 * MIB as usize + 5);

    let mut points = Vec::new();
    let mut take = |kind: &str, ext4: Vec<&'static str>, n: usize| {
        let copy = t.path().join(format!("point{n}.img"));
        copy_device(disk.dev(), &copy);
        let v = backup(disk.dev(), &repo, "d", &[kind]);
        points.push(Point {
            id: id_of(&v),
            copy,
            ext4,
        });
    };
    disk.with_ext4(&work, |m| fs::write(m.join("a.txt"), &a_txt).unwrap());
    direct_write(disk.dev(), OUTSIDE, MIB as usize, 11);
    take("--full", vec!["a.txt"], 0);
    disk.with_ext4(&work, |m| fs::write(m.join("b.bin"), &b_bin).unwrap());
    direct_write(disk.dev(), OUTSIDE + 2 * MIB, MIB as usize, 12);
    take("--incremental", vec!["a.txt", "b.bin"], 1);
    disk.with_ext4(&work, |m| fs::remove_file(m.join("a.txt")).unwrap());
    direct_write(disk.dev(), OUTSIDE + 4 * MIB, 64 * KIB as usize, 13);
    take("--differential", vec!["b.bin"], 2);

    for p in &points {
        // --raw: the exact bytes of the disk and of each partition.
        let r = view.mount(&repo, &["--raw", "--image", &p.id]);
        assert_eq!(r["image"], p.id.as_str());
        assert_eq!(r["size"], DISK);
        check_raw(view.path(), p);
        assert!(
            !view.path().join(".raw").exists(),
            "--raw shows the partitions as DIR/pN"
        );
        view.umount();

        // The filesystem view: ext4 mounted, FAT raw (no vfat driver here) and readable by mtools.
        let r = view.mount(&repo, &["--image", &p.id]);
        let parts = r["parts"].as_array().unwrap();
        assert_eq!(parts.len(), 2, "{r}");
        let p1 = view.path().join("p1");
        assert_eq!(parts[0]["mounted"], s(&p1), "{r}");
        assert_eq!(top_files(&p1), p.ext4, "files of ext4 at image {}", p.id);
        if p.ext4.contains(&"a.txt") {
            assert_eq!(fs::read(p1.join("a.txt")).unwrap(), a_txt);
        }
        if p.ext4.contains(&"b.bin") {
            assert_eq!(fs::read(p1.join("b.bin")).unwrap(), b_bin);
        }
        let p2 = view.path().join("p2");
        assert!(parts[1]["mounted"].is_null(), "{r}");
        let note = parts[1]["note"].as_str().unwrap();
        assert!(
            note.contains("vfat") && note.contains("mtools"),
            "the note says why FAT stays raw: {note}"
        );
        assert_eq!(parts[1]["raw_file"], s(&p2));
        let o = mtools("mtype", &["-i", s(&p2), "::/fat.txt"]);
        assert_eq!(o.stdout, fs::read(&fat_file).unwrap());
        // The raw bytes under .raw are the partitions' too.
        assert_eq!(
            hash_range(&view.path().join(".raw/p1"), 0, P1.1),
            hash_range(&p.copy, P1.0, P1.1)
        );
        assert_same_content(&view.path().join("disk"), &p.copy);
        view.umount();
    }
}

#[test]
fn a_damaged_block_is_eio_for_its_range_and_nothing_else() {
    require_root();
    let t = tempdir();
    let src = t.path().join("src.img");
    let repo = t.path().join("repo");
    let size = 8 * MIB;
    write_random_file(&src, size, 21);
    let id = id_of(&backup(s(&src), &repo, "f", &[]));
    let segment = &segment_files(&image_dir(&repo, &id))[0];
    // Random data is stored as it is: the middle of the segment is the middle of some block.
    flip_byte(segment, size_of(segment) / 2);
    let view = MountDir::new(t.path(), "view");
    let r = view.mount(&repo, &["--raw"]);
    // The mount holds the repository's removal lock in shared mode: a backup goes on (it only
    // adds an image), a prune is refused and names the mount.
    cairn(&["backup", s(&src), s(&repo), "--name", "f"]).ok();
    let p = cairn(&["prune", s(&repo), "--keep-last", "1"]);
    p.error();
    p.assert_mentions("in use by");
    p.assert_mentions("mount");
    let disk = fs::File::open(view.path().join("disk")).unwrap();
    let want = fs::read(&src).unwrap();
    let mut bad = Vec::new();
    let mut buf = vec![0u8; MIB as usize];
    for b in 0..size / MIB {
        match disk.read_exact_at(&mut buf, b * MIB) {
            Ok(()) => assert!(
                buf[..] == want[(b * MIB) as usize..((b + 1) * MIB) as usize],
                "block {b} read without error must hold the source's bytes"
            ),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "block {b}: {e}");
                bad.push(b);
            }
        }
    }
    assert_eq!(bad.len(), 1, "exactly the damaged block fails: {bad:?}");
    let b = bad[0];
    // Every page of the damaged block fails; the pages next to it read correctly.
    let mut page = vec![0u8; 4096];
    for off in [b * MIB, b * MIB + MIB / 2, (b + 1) * MIB - 4096] {
        let e = disk.read_exact_at(&mut page, off).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "offset {off}");
    }
    for off in [b * MIB - 4096, (b + 1) * MIB] {
        if off + 4096 <= size && off < size {
            disk.read_exact_at(&mut page, off).unwrap();
            assert!(page[..] == want[off as usize..off as usize + 4096]);
        }
    }
    drop(disk);
    let log = fs::read_to_string(r["log"].as_str().unwrap()).unwrap();
    assert!(
        log.contains(&id) && log.contains("segment-") && log.contains("offset"),
        "the log names image, segment and offset:\n{log}"
    );
    view.umount();
}

#[test]
fn an_unknown_image_fails_clearly_and_leaves_the_directory_untouched() {
    require_root();
    let t = tempdir();
    let src = t.path().join("src.img");
    let repo = t.path().join("repo");
    write_random_file(&src, 2 * MIB, 5);
    backup(s(&src), &repo, "f", &[]);
    let view = MountDir::new(t.path(), "view");
    for extra in [&[][..], &["--background"][..]] {
        let mut args = vec![
            "mount",
            s(&repo),
            s(view.path()),
            "--image",
            "20990101T000000Z",
        ];
        args.extend_from_slice(extra);
        let out = cairn(&args);
        out.error();
        assert!(
            out.error_line().contains("20990101T000000Z"),
            "{}",
            out.describe()
        );
        assert!(leftovers(view.path()).is_empty(), "nothing was mounted");
        assert_eq!(fs::read_dir(view.path()).unwrap().count(), 0);
    }
}

#[test]
fn umount_clears_everything_after_the_server_was_killed() {
    let t = tempdir();
    let disk = Disk::new(t.path());
    let repo = t.path().join("repo");
    let work = t.path().join("work");
    disk.with_ext4(&work, |m| fs::write(m.join("x"), b"x").unwrap());
    backup(disk.dev(), &repo, "d", &[]);
    let view = MountDir::new(t.path(), "view");
    let r = view.mount(&repo, &[]);
    assert_eq!(fs::read(view.path().join("p1/x")).unwrap(), b"x");
    let pid = r["pid"].as_u64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The server is not our child (it was forked away): wait until the kernel has reaped it,
    // bounded.
    let gone = (0..500).any(|_| {
        let alive = fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        });
        if alive {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        !alive
    });
    assert!(gone, "the killed server {pid} is still running");
    assert!(
        !leftovers(view.path()).is_empty(),
        "a killed server leaves its mounts behind (what umount must clear)"
    );
    let out = cairn(&["umount", s(view.path()), "--json"]);
    out.ok();
    assert_eq!(out.json()["server_was_dead"], true);
    let left = leftovers(view.path());
    assert!(left.is_empty(), "left behind:\n{}", left.join("\n"));
}

/// Waits (bounded) until a foreground `cairn mount` says it is serving.
fn wait_serving(bg: &mut Bg, stdout: &Path) {
    let ready = (0..1000).any(|_| {
        if fs::read_to_string(stdout).is_ok_and(|t| t.contains("Serving until")) {
            return true;
        }
        assert!(bg.running(), "the mount ended before it was ready");
        std::thread::sleep(std::time::Duration::from_millis(10));
        false
    });
    assert!(ready, "the foreground mount did not get ready");
}

#[test]
fn a_foreground_mount_ends_on_sigterm_and_on_umount_and_refuses_to_pull_a_busy_filesystem() {
    let t = tempdir();
    let src = t.path().join("fs.img");
    let repo = t.path().join("repo");
    // An image without partitions: its filesystem is DIR/fs.
    write_sparse_file(&src, 32 * MIB);
    mkfs_ext4(s(&src));
    let m = Mount::new(s(&src), &t.path().join("work"), Some("loop"));
    populate_tree(&m.dir, 9);
    let files = hash_tree(&m.dir);
    m.unmount();
    backup(s(&src), &repo, "f", &[]);
    let view = MountDir::new(t.path(), "view");

    // Ended by SIGTERM.
    let mut bg = Bg::spawn(&["mount", s(&repo), s(view.path())], t.path(), "fg1");
    wait_serving(&mut bg, &t.path().join("fg1.stdout"));
    assert_eq!(hash_tree(&view.path().join("fs")), files);
    assert_same_content(&view.path().join("disk"), &src);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(bg.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    bg.finish().ok();
    let left = leftovers(view.path());
    assert!(left.is_empty(), "SIGTERM left behind:\n{}", left.join("\n"));

    // Ended by `cairn umount`, once the file held open in it is closed.
    let mut bg = Bg::spawn(&["mount", s(&repo), s(view.path())], t.path(), "fg2");
    wait_serving(&mut bg, &t.path().join("fg2.stdout"));
    let held = fs::File::open(view.path().join("fs/random.bin")).unwrap();
    let busy = cairn(&["umount", s(view.path())]);
    busy.error();
    assert!(busy.error_line().contains("busy"), "{}", busy.describe());
    // Nothing was pulled away: the open file and the view still read right.
    let mut head = vec![0u8; 4096];
    held.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(hash_tree(&view.path().join("fs")), files);
    assert!(bg.running(), "a refused umount leaves the server serving");
    drop(held);
    view.umount();
    bg.finish().ok();
}

#[test]
fn parallel_readers_get_the_right_bytes() {
    require_root();
    let t = tempdir();
    let src = t.path().join("src.img");
    let repo = t.path().join("repo");
    write_mixed_file(&src, 24 * MIB, 31);
    backup(s(&src), &repo, "f", &[]);
    let view = MountDir::new(t.path(), "view");
    view.mount(&repo, &["--raw"]);
    let want = fs::read(&src).unwrap();
    let disk = view.path().join("disk");
    std::thread::scope(|scope| {
        for k in 0..4u64 {
            let (want, disk) = (&want, &disk);
            scope.spawn(move || {
                let f = fs::File::open(disk).unwrap();
                // Each reader walks the disk from its own start, in odd-sized steps.
                let step = 300_001 + k as usize * 77_777;
                let mut buf = vec![0u8; step];
                let mut off = (k * 6 * MIB) as usize;
                for _ in 0..want.len() / step {
                    let n = step.min(want.len() - off);
                    f.read_exact_at(&mut buf[..n], off as u64).unwrap();
                    assert!(buf[..n] == want[off..off + n], "reader {k} at {off}");
                    off = (off + n) % want.len();
                }
            });
        }
    });
    view.umount();
}

#[test]
fn a_running_mount_names_itself_as_the_holder_of_its_repository() {
    require_root();
    let t = tempdir();
    let src = t.path().join("src.img");
    let repo = t.path().join("repo");
    let other = t.path().join("other");
    write_random_file(&src, 2 * MIB, 9);
    backup(s(&src), &repo, "f", &[]);
    backup(s(&src), &other, "f", &[]);
    let view = MountDir::new(t.path(), "view");
    let report = view.mount(&repo, &["--raw"]);
    let pid = report["pid"].as_u64().unwrap() as u32;
    let holders = cairn::mount::holders(&repo);
    assert_eq!(
        holders,
        vec![cairn::mount::Holder {
            dir: view.path().to_path_buf(),
            pid,
            image: report["image"].as_str().unwrap().to_string(),
        }]
    );
    let note = cairn::mount::holders_note(&repo);
    assert!(
        note.contains(&format!("`cairn umount {}`", s(view.path()))),
        "{note}"
    );
    assert!(cairn::mount::holders(&other).is_empty());
    // A prune meanwhile is refused and names the mount's serving process; a backup goes on.
    let refused = cairn(&["prune", s(&repo), "--keep-last", "1"]);
    refused.error();
    refused.assert_mentions(&format!("pid {pid} "));
    refused.assert_mentions("mount");
    cairn(&["backup", s(&src), s(&repo), "--name", "f"]).ok();
    view.umount();
    assert!(cairn::mount::holders(&repo).is_empty());
}

#[test]
fn umount_of_a_view_in_use_is_refused_at_once_and_works_once_it_is_closed() {
    require_root();
    let t = tempdir();
    let src = t.path().join("src.img");
    let repo = t.path().join("repo");
    write_random_file(&src, 2 * MIB, 13);
    backup(s(&src), &repo, "f", &[]);
    let view = MountDir::new(t.path(), "view");
    view.mount(&repo, &["--raw"]);
    // What a VM booted from DIR/disk does: keep it open.
    let open = fs::File::open(view.path().join("disk")).unwrap();
    let refused = cairn(&["umount", s(view.path())]);
    refused.error();
    assert!(
        refused.error_line().contains("is busy"),
        "{}",
        refused.describe()
    );
    let mut byte = [0u8; 1];
    open.read_exact_at(&mut byte, 0).unwrap();
    assert_eq!(byte[0], fs::read(&src).unwrap()[0], "still serving");
    drop(open);
    view.umount();
}
