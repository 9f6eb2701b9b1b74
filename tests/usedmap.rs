//! The allocation-map readers (src/usedmap, docs/used-blocks.md) against filesystems made by the
//! real mkfs tools: fill, delete, write again; then every byte outside the returned used ranges is
//! overwritten with 0xFF in a copy, the copy must fsck clean and every file must read back with the
//! same hash, and the used total must be close to what the filesystem says it uses. Damaged maps,
//! dirty journals and unknown features must be refused with their reason.

mod common;

use cairn::usedmap::{probe, UsedMap, Verdict};
use common::*;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A source file that already holds stale bytes everywhere (as an aged disk does), then mkfs.
fn stale_image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = File::create(&p).unwrap();
    let chunk = vec![0xA5u8; MIB as usize];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(MIB);
        f.write_all_at(&chunk[..n as usize], off).unwrap();
        off += n;
    }
    p
}

fn run(tool: &str, package: &str, args: &[&str]) -> std::process::Output {
    let t = require_tool(tool, package);
    run_tool(&t, args)
}

fn probe_file(p: &Path) -> Verdict {
    let f = File::open(p).unwrap();
    probe(&f, size_of(p))
}

fn expect_used(p: &Path, fs: &str) -> UsedMap {
    match probe_file(p) {
        Verdict::Used(m) => {
            assert_eq!(
                m.fs,
                fs,
                "{}: recognised as {} ({})",
                p.display(),
                m.fs,
                m.note
            );
            check_ranges(&m, size_of(p));
            m
        }
        other => panic!("{}: expected a used map of {fs}, got: {other}", p.display()),
    }
}

fn expect_refused(p: &Path, needle: &str) -> String {
    match probe_file(p) {
        Verdict::Refused { why, .. } => {
            assert!(
                why.contains(needle),
                "{}: refused, but the reason {why:?} does not mention {needle:?}",
                p.display()
            );
            assert!(!why.contains('\n'), "the reason is one line: {why:?}");
            why
        }
        other => panic!(
            "{}: expected a refusal ({needle}), got: {other}",
            p.display()
        ),
    }
}

fn check_ranges(m: &UsedMap, size: u64) {
    let mut prev_end: Option<u64> = None;
    for &(o, l) in &m.ranges {
        assert!(l > 0, "empty range at {o}");
        assert!(
            o + l <= size,
            "range {o}+{l} outside the {size}-byte source"
        );
        if let Some(p) = prev_end {
            assert!(o > p, "ranges not ascending, disjoint and coalesced at {o}");
        }
        prev_end = Some(o + l);
    }
}

/// A copy of `img` in which every byte outside `m`'s ranges is 0xFF.
fn scrubbed_copy(img: &Path, m: &UsedMap) -> PathBuf {
    let copy = img.with_extension("scrubbed");
    fs::copy(img, &copy).unwrap();
    let size = size_of(img);
    let f = OpenOptions::new().write(true).open(&copy).unwrap();
    let ff = vec![0xFFu8; MIB as usize];
    let fill = |mut from: u64, to: u64| {
        while from < to {
            let n = (to - from).min(MIB);
            f.write_all_at(&ff[..n as usize], from).unwrap();
            from += n;
        }
    };
    let mut pos = 0;
    for &(o, l) in &m.ranges {
        fill(pos, o);
        pos = o + l;
    }
    fill(pos, size);
    f.sync_all().unwrap();
    copy
}

/// What a filled filesystem holds: file hashes and statvfs's view of used and total bytes.
struct Filled {
    hashes: BTreeMap<String, String>,
    df_used: u64,
    df_total: u64,
}

fn statvfs_of(dir: &Path) -> (u64, u64) {
    let v = nix::sys::statvfs::statvfs(dir).unwrap();
    let frsize = v.fragment_size();
    let total = v.blocks() * frsize;
    let used = (v.blocks() - v.blocks_free()) * frsize;
    (used, total)
}

/// Files written, some deleted, more written: the deleted ones leave stale data in free space.
fn churn(root: &Path, seed: u64) {
    populate_tree(root, seed);
    for i in 0..6u64 {
        fs::write(
            root.join(format!("big{i}.bin")),
            random_vec(seed + 1000 + i, (5 * MIB + i * 4099) as usize),
        )
        .unwrap();
    }
    for i in [0u64, 2, 4] {
        fs::remove_file(root.join(format!("big{i}.bin"))).unwrap();
    }
    fs::remove_file(root.join("random.bin")).unwrap();
    fs::create_dir_all(root.join("again")).unwrap();
    for i in 0..4u64 {
        fs::write(
            root.join("again").join(format!("new{i}.bin")),
            random_vec(seed + 2000 + i, (3 * MIB + i * 31) as usize),
        )
        .unwrap();
    }
}

/// Mounts `img` through a loop device, churns files, and returns what it holds.
fn fill_mounted(img: &Path, opts: Option<&str>, seed: u64) -> Filled {
    let lo = LoopDev::attach(img);
    let dir = img.with_extension("mnt");
    let m = Mount::new(&lo.dev, &dir, opts);
    churn(&m.dir, seed);
    nix::unistd::sync();
    let (df_used, df_total) = statvfs_of(&m.dir);
    let hashes = hash_tree(&m.dir);
    m.unmount();
    drop(lo);
    Filled {
        hashes,
        df_used,
        df_total,
    }
}

/// Mounts a scrubbed copy read-only and compares every file's hash.
fn verify_mounted(copy: &Path, opts: &str, want: &BTreeMap<String, String>) {
    let lo = LoopDev::attach_with(copy, &["-r"]);
    let dir = copy.with_extension("mnt2");
    let m = Mount::new(&lo.dev, &dir, Some(opts));
    let got = hash_tree(&m.dir);
    m.unmount();
    drop(lo);
    assert_eq!(
        &got,
        want,
        "files on the scrubbed copy {} differ from the originals",
        copy.display()
    );
}

/// The used total lies between what statvfs counts as used and that plus the filesystem's own
/// overhead (metadata that statvfs leaves out of its total), with 2% of the size as slack.
fn assert_close_to_df(m: &UsedMap, f: &Filled, size: u64) {
    let used = m.used_bytes();
    let overhead = size.saturating_sub(f.df_total);
    let slack = size / 50;
    assert!(
        used + slack >= f.df_used,
        "{}: used map {used} bytes is below statvfs's used {} bytes",
        m.fs,
        f.df_used
    );
    assert!(
        used <= f.df_used + overhead + slack,
        "{}: used map {used} bytes is far above statvfs's used {} + overhead {overhead} ({})",
        m.fs,
        f.df_used,
        m.note
    );
    assert!(
        used < size / 2,
        "{}: {used} of {size} bytes used: the test filesystem is meant to be mostly free",
        m.fs
    );
}

// ---------------------------------------------------------------------------
// ext2/3/4
// ---------------------------------------------------------------------------

const EXT_SIZE: u64 = 256 * MIB;

fn ext_case(mkfs: &str, opts: &[&str], fs: &str) {
    require_root();
    let t = tempdir();
    let img = stale_image(t.path(), "ext.img", EXT_SIZE);
    let mut args = vec!["-q", "-F"];
    args.extend_from_slice(opts);
    args.push(s(&img));
    run(mkfs, "e2fsprogs", &args);
    let filled = fill_mounted(&img, None, 7);
    let m = expect_used(&img, fs);
    assert_close_to_df(&m, &filled, EXT_SIZE);
    let copy = scrubbed_copy(&img, &m);
    run("e2fsck", "e2fsprogs", &["-fn", s(&copy)]);
    verify_mounted(&copy, "ro", &filled.hashes);
    eprintln!(
        "{fs} {opts:?}: {} of {EXT_SIZE} bytes used in {} ranges; statvfs used {} ({})",
        m.used_bytes(),
        m.ranges.len(),
        filled.df_used,
        m.note
    );
}

#[test]
fn ext4_default() {
    ext_case("mkfs.ext4", &["-b", "4096"], "ext4");
}

#[test]
fn ext4_without_flex_bg() {
    ext_case("mkfs.ext4", &["-b", "4096", "-O", "^flex_bg"], "ext4");
}

#[test]
fn ext4_metadata_csum_64bit() {
    ext_case(
        "mkfs.ext4",
        &["-b", "4096", "-O", "metadata_csum,64bit"],
        "ext4",
    );
}

#[test]
fn ext4_1k_blocks_meta_bg() {
    ext_case(
        "mkfs.ext4",
        &["-b", "1024", "-O", "meta_bg,^resize_inode"],
        "ext4",
    );
}

#[test]
fn ext4_bigalloc_sparse_super2() {
    ext_case(
        "mkfs.ext4",
        &["-O", "bigalloc,sparse_super2", "-C", "16384"],
        "ext4",
    );
}

#[test]
fn ext4_uninit_bg_without_metadata_csum() {
    ext_case("mkfs.ext4", &["-O", "^metadata_csum,uninit_bg"], "ext4");
}

#[test]
fn ext3() {
    ext_case("mkfs.ext3", &[], "ext3");
}

#[test]
fn ext2() {
    ext_case("mkfs.ext2", &[], "ext2");
}

/// `dumpe2fs`'s "Block bitmap at N" for group 0.
fn ext_group0_block_bitmap(img: &Path) -> u64 {
    let o = run("dumpe2fs", "e2fsprogs", &[s(img)]);
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("Block bitmap at "))
        .expect("dumpe2fs prints group 0's block bitmap");
    line.trim_start()["Block bitmap at ".len()..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn small_ext(t: &Path, opts: &[&str]) -> PathBuf {
    let img = stale_image(t, "small.img", 64 * MIB);
    let mut args = vec!["-q", "-F", "-b", "4096"];
    args.extend_from_slice(opts);
    args.push(s(&img));
    run("mkfs.ext4", "e2fsprogs", &args);
    img
}

#[test]
fn ext_refusals() {
    let t = tempdir();

    // A block bitmap whose checksum fails (metadata_csum): one bit flipped in an unused part.
    let img = small_ext(t.path(), &["-O", "metadata_csum"]);
    expect_used(&img, "ext4");
    let bitmap = ext_group0_block_bitmap(&img);
    flip_byte(&img, bitmap * 4096 + 2000);
    expect_refused(&img, "block bitmap checksum mismatch");

    // Without checksums, a flipped bitmap disagrees with the descriptor's free count.
    let img = small_ext(t.path(), &["-O", "^metadata_csum,^uninit_bg"]);
    let bitmap = ext_group0_block_bitmap(&img);
    flip_byte(&img, bitmap * 4096 + 2000);
    expect_refused(&img, "free clusters, its descriptor says");

    // A journal that needs replay.
    let img = small_ext(t.path(), &[]);
    run(
        "debugfs",
        "e2fsprogs",
        &["-w", "-R", "feature needs_recovery", s(&img)],
    );
    expect_refused(&img, "journal needs recovery");

    // An incompatible feature nobody knows (bit 31), with the superblock checksum made right so
    // that the feature check itself is what refuses.
    let img = small_ext(t.path(), &[]);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut sb = vec![0u8; 1024];
    f.read_exact_at(&mut sb, 1024).unwrap();
    let incompat = u32::from_le_bytes(sb[0x60..0x64].try_into().unwrap()) | 0x8000_0000;
    sb[0x60..0x64].copy_from_slice(&incompat.to_le_bytes());
    // ext4 stores Linux's crc32c(~0, ..) without the final inversion the crate applies.
    let csum = !crc32c::crc32c(&sb[..0x3FC]);
    sb[0x3FC..0x400].copy_from_slice(&csum.to_le_bytes());
    f.write_all_at(&sb, 1024).unwrap();
    drop(f);
    expect_refused(&img, "unknown incompatible feature flags 0x80000000");

    // A superblock whose checksum fails.
    let img = small_ext(t.path(), &[]);
    flip_byte(&img, 1024 + 0x78); // the volume name
    expect_refused(&img, "superblock checksum mismatch");
}

/// Real images with random damage in their first megabytes: never a panic, never a range outside
/// the source; a map that is still returned keeps the superblock area.
#[test]
fn damaged_real_images_never_panic() {
    let t = tempdir();
    let img = small_ext(t.path(), &["-O", "metadata_csum,64bit"]);
    let pristine = fs::read(&img).unwrap();
    let size = pristine.len() as u64;
    let mut rng_state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    for _ in 0..300 {
        let mut b = pristine.clone();
        for _ in 0..1 + next() % 8 {
            let at = (next() % (2 * MIB)) as usize;
            b[at] = next() as u8;
        }
        if let Verdict::Used(m) = probe(&b, size) {
            check_ranges(&m, size);
            assert!(
                m.ranges[0].0 == 0,
                "the boot block and superblock are always used"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// FAT12/16/32 (no vfat driver in this kernel: mtools reads and writes the files)
// ---------------------------------------------------------------------------

fn mtools(tool: &str, img: &Path, args: &[&str]) {
    let mut a = vec!["-i", s(img)];
    a.extend_from_slice(args);
    run(tool, "mtools", &a);
}

/// `fsck.fat -n -v`'s "N/M clusters": the used cluster count dosfstools itself finds.
fn fsck_fat_used_clusters(img: &Path) -> u64 {
    let o = run("fsck.fat", "dosfstools", &["-n", s(img)]);
    let text = String::from_utf8_lossy(&o.stdout);
    let tail = text
        .lines()
        .find_map(|l| l.split(" files, ").nth(1))
        .unwrap_or_else(|| panic!("fsck.fat printed no cluster count: {text}"));
    tail.split('/').next().unwrap().trim().parse().unwrap()
}

fn fat_case(bits: &str, size: u64, file_scale: u64) {
    let t = tempdir();
    let img = stale_image(t.path(), "fat.img", size);
    run("mkfs.fat", "dosfstools", &["-F", bits, s(&img)]);
    // Written, partly deleted, written again, through mtools (the layout mtools picks is as good
    // as the kernel's for this purpose: both leave freed clusters with their old bytes).
    let local = t.path().join("files");
    fs::create_dir_all(local.join("sub")).unwrap();
    for i in 0..8u64 {
        fs::write(
            local.join(format!("f{i}.bin")),
            random_vec(50 + i, (file_scale * (i + 1) + i * 977) as usize),
        )
        .unwrap();
    }
    fs::write(local.join("sub").join("notes.txt"), text_vec(9, 30_000)).unwrap();
    fs::write(local.join("empty"), b"").unwrap();
    let list: Vec<String> = fs::read_dir(&local)
        .unwrap()
        .map(|e| s(&e.unwrap().path()).to_string())
        .collect();
    let mut args = vec!["-s"];
    args.extend(list.iter().map(|p| p.as_str()));
    args.push("::/");
    mtools("mcopy", &img, &args);
    for i in [1u64, 4, 6] {
        mtools("mdel", &img, &[&format!("::/f{i}.bin")]);
        fs::remove_file(local.join(format!("f{i}.bin"))).unwrap();
    }
    let again = local.join("again.bin");
    fs::write(&again, random_vec(77, (file_scale * 2 + 5) as usize)).unwrap();
    mtools("mcopy", &img, &[s(&again), "::/"]);
    let want = hash_tree(&local);

    let m = expect_used(&img, "vfat");
    assert!(m.note.starts_with(&format!("FAT{bits}")), "{}", m.note);
    let copy = scrubbed_copy(&img, &m);
    run("fsck.fat", "dosfstools", &["-n", s(&copy)]);
    let out = t.path().join("out");
    fs::create_dir_all(&out).unwrap();
    mtools("mcopy", &copy, &["-s", "-n", "::/*", s(&out)]);
    assert_eq!(
        hash_tree(&out),
        want,
        "files read back from the scrubbed FAT{bits} copy"
    );

    // The used total is exactly what dosfstools counts: everything before the data area plus the
    // used clusters.
    let o = run("fsck.fat", "dosfstools", &["-n", "-v", s(&img)]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let field = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.contains(name))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("fsck.fat -v prints {name}: {text}"))
            .parse()
            .unwrap()
    };
    let cluster_size = field("bytes per cluster");
    let data_start = text
        .lines()
        .find(|l| l.contains("Data area starts at byte"))
        .and_then(|l| l.split("byte ").nth(1))
        .and_then(|w| w.split_whitespace().next())
        .unwrap()
        .parse::<u64>()
        .unwrap();
    let used_clusters = fsck_fat_used_clusters(&img);
    // Sectors past the volume's end (mkfs.fat rounds the size down) are imaged as they are.
    let past_end = size - field("sectors total") * 512;
    let expected = data_start + used_clusters * cluster_size + past_end;
    assert_eq!(
        m.used_bytes(),
        expected,
        "FAT{bits}: the used map against dosfstools' count ({used_clusters} clusters of {cluster_size} after {data_start} bytes; {})",
        m.note
    );
    assert!(
        m.used_bytes() < size / 2,
        "FAT{bits}: the test volume is meant to be mostly free"
    );
    eprintln!(
        "FAT{bits}: {} of {size} bytes used ({})",
        m.used_bytes(),
        m.note
    );
}

#[test]
fn fat12() {
    fat_case("12", 8 * MIB, 150 * KIB);
}

#[test]
fn fat16() {
    fat_case("16", 64 * MIB, MIB);
}

#[test]
fn fat32() {
    fat_case("32", 300 * MIB, 3 * MIB);
}

#[test]
fn fat_refusals() {
    let t = tempdir();
    let make = |name: &str| {
        let img = stale_image(t.path(), name, 64 * MIB);
        run("mkfs.fat", "dosfstools", &["-F", "16", s(&img)]);
        img
    };
    // The two FATs disagree.
    let img = make("a.img");
    let f = OpenOptions::new().write(true).open(&img).unwrap();
    let reserved = 4 * 512; // mkfs.fat's FAT16 default; the FAT starts after them
    f.write_all_at(&[0x34, 0x12], reserved + 2 * 40).unwrap();
    drop(f);
    expect_refused(&img, "FAT copy 2 disagrees");
    // The dirty bit the Linux driver sets while mounted.
    let img = make("b.img");
    let f = OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&[1], 37).unwrap();
    drop(f);
    expect_refused(&img, "marked dirty");
}

// ---------------------------------------------------------------------------
// Linux swap
// ---------------------------------------------------------------------------

#[test]
fn swap_header_only() {
    let t = tempdir();
    let size = 64 * MIB;
    let img = stale_image(t.path(), "swap.img", size);
    run("mkswap", "util-linux", &[s(&img)]);
    let uuid = |p: &Path| {
        let o = run("blkid", "util-linux", &["-p", "-o", "export", s(p)]);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            text.contains("TYPE=swap"),
            "blkid sees swap on {}: {text}",
            p.display()
        );
        text.lines()
            .find(|l| l.starts_with("UUID="))
            .unwrap()
            .to_string()
    };
    let m = expect_used(&img, "swap");
    assert_eq!(m.ranges, vec![(0, 4096)], "{}", m.note);
    let copy = scrubbed_copy(&img, &m);
    assert_eq!(uuid(&copy), uuid(&img));

    // A hibernation image replaces the magic: everything must be imaged.
    let f = OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(b"S1SUSPEND\0", 4096 - 10).unwrap();
    drop(f);
    expect_refused(&img, "hibernation image");
}

// ---------------------------------------------------------------------------
// exFAT (through exfat-fuse: this kernel has no exfat driver)
// ---------------------------------------------------------------------------

/// A FUSE daemon run in the foreground (`-d`), so that after `umount` its exit says that it has
/// written everything (a plain FUSE unmount returns before the daemon's last writes).
struct FuseMount {
    child: std::process::Child,
    dir: PathBuf,
}

fn is_mountpoint(dir: &Path) -> bool {
    let want = fs::canonicalize(dir).unwrap();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(s(&want)))
}

impl FuseMount {
    fn new(tool: &str, package: &str, img: &Path, dir: &Path, opts: &str) -> FuseMount {
        fs::create_dir_all(dir).unwrap();
        let t = require_tool(tool, package);
        let mut child = std::process::Command::new(&t)
            .args(["-d", "-o", opts, s(img), s(dir)])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Polling a real condition (the mount exists), bounded.
        for _ in 0..1000 {
            if is_mountpoint(dir) {
                return FuseMount {
                    child,
                    dir: dir.to_path_buf(),
                };
            }
            if let Some(st) = child.try_wait().unwrap() {
                panic!("{tool} {} exited with {st} before mounting", img.display());
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = child.kill();
        panic!("{tool} did not mount {} within 10 s", img.display());
    }

    fn unmount(mut self) {
        run("umount", "mount", &[s(&self.dir)]);
        let st = self.child.wait().unwrap();
        assert!(st.success(), "the FUSE daemon exited with {st}");
        std::mem::forget(self);
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).output();
        let _ = self.child.wait();
    }
}

#[test]
fn exfat() {
    let t = tempdir();
    let size = 256 * MIB;
    let img = stale_image(t.path(), "exfat.img", size);
    run("mkfs.exfat", "exfatprogs", &[s(&img)]);
    // exfat-fuse runs as fuseblk for root: it needs a block device.
    let lo = LoopDev::attach(&img);
    let m = FuseMount::new(
        "mount.exfat-fuse",
        "exfat-fuse",
        lo.path(),
        &t.path().join("mnt"),
        "rw",
    );
    churn(&m.dir, 21);
    let (df_used, df_total) = statvfs_of(&m.dir);
    let hashes = hash_tree(&m.dir);
    m.unmount();
    drop(lo);
    let filled = Filled {
        hashes,
        df_used,
        df_total,
    };

    let map = expect_used(&img, "exfat");
    assert_close_to_df(&map, &filled, size);
    let copy = scrubbed_copy(&img, &map);
    run("fsck.exfat", "exfatprogs", &["-n", s(&copy)]);
    let lo = LoopDev::attach_with(&copy, &["-r"]);
    let m = FuseMount::new(
        "mount.exfat-fuse",
        "exfat-fuse",
        lo.path(),
        &t.path().join("mnt2"),
        "ro",
    );
    let got = hash_tree(&m.dir);
    m.unmount();
    drop(lo);
    assert_eq!(
        got, filled.hashes,
        "files read back from the scrubbed exFAT copy"
    );
    eprintln!(
        "exfat: {} of {size} bytes used; statvfs used {} ({})",
        map.used_bytes(),
        filled.df_used,
        map.note
    );

    // The dirty flag (VolumeFlags bit 1; outside the boot checksum).
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut flags = [0u8; 2];
    f.read_exact_at(&mut flags, 106).unwrap();
    f.write_all_at(&[flags[0] | 2, flags[1]], 106).unwrap();
    drop(f);
    expect_refused(&img, "marked dirty");
    // A damaged boot region.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&copy)
        .unwrap();
    f.write_all_at(b"X", 120).unwrap();
    drop(f);
    expect_refused(&copy, "checksum does not match");
}

// ---------------------------------------------------------------------------
// xfs
// ---------------------------------------------------------------------------

const XFS_SIZE: u64 = 512 * MIB;

#[test]
fn xfs() {
    require_root();
    let t = tempdir();
    let img = stale_image(t.path(), "xfs.img", XFS_SIZE);
    run("mkfs.xfs", "xfsprogs", &["-q", "-f", s(&img)]);
    let filled = fill_mounted(&img, None, 31);
    let m = expect_used(&img, "xfs");
    assert_close_to_df(&m, &filled, XFS_SIZE);
    let copy = scrubbed_copy(&img, &m);
    run("xfs_repair", "xfsprogs", &["-n", s(&copy)]);
    verify_mounted(&copy, "ro,nouuid", &filled.hashes);
    eprintln!(
        "xfs: {} of {XFS_SIZE} bytes used in {} ranges; statvfs used {} ({})",
        m.used_bytes(),
        m.ranges.len(),
        filled.df_used,
        m.note
    );

    // An unknown incompatible feature, with the superblock's checksum made right.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&copy)
        .unwrap();
    let mut sb = vec![0u8; 512];
    f.read_exact_at(&mut sb, 0).unwrap();
    let incompat = u32::from_be_bytes(sb[216..220].try_into().unwrap()) | 0x8000_0000;
    sb[216..220].copy_from_slice(&incompat.to_be_bytes());
    sb[224..228].fill(0);
    let crc = crc32c::crc32c(&sb);
    sb[224..228].copy_from_slice(&crc.to_le_bytes());
    f.write_all_at(&sb, 0).unwrap();
    drop(f);
    expect_refused(&copy, "unknown incompatible feature flags 0x80000000");
    // A damaged free-space tree block: the AGF of AG 0 names its root.
    let f = File::open(&img).unwrap();
    let mut agf = vec![0u8; 512];
    f.read_exact_at(&mut agf, 512).unwrap();
    let root = u32::from_be_bytes(agf[16..20].try_into().unwrap()) as u64;
    drop(f);
    let damaged = t.path().join("damaged.img");
    fs::copy(&img, &damaged).unwrap();
    flip_byte(&damaged, root * 4096 + 100);
    expect_refused(&damaged, "fails its checksum");
}

#[test]
fn xfs_dirty_log_refused() {
    require_root();
    let t = tempdir();
    let img = stale_image(t.path(), "xfs.img", XFS_SIZE);
    run("mkfs.xfs", "xfsprogs", &["-q", "-f", s(&img)]);
    let lo = LoopDev::attach(&img);
    let m = Mount::new(&lo.dev, &t.path().join("mnt"), None);
    fs::write(m.dir.join("a"), random_vec(1, MIB as usize)).unwrap();
    nix::unistd::sync();
    fs::write(m.dir.join("b"), random_vec(2, MIB as usize)).unwrap();
    // A forced shutdown after a log flush leaves committed transactions and no unmount record.
    run(
        "xfs_io",
        "xfsprogs",
        &["-x", "-c", "shutdown -f", s(&m.dir)],
    );
    m.unmount();
    drop(lo);
    expect_refused(&img, "log is not clean");
}

// ---------------------------------------------------------------------------
// btrfs
// ---------------------------------------------------------------------------

const BTRFS_SIZE: u64 = 512 * MIB;

/// Rewrites the btrfs superblock at 64 KiB through `edit`, with its crc32c made right again.
fn edit_btrfs_super(img: &Path, edit: impl FnOnce(&mut [u8])) {
    let f = OpenOptions::new().read(true).write(true).open(img).unwrap();
    let mut sb = vec![0u8; 4096];
    f.read_exact_at(&mut sb, 65536).unwrap();
    edit(&mut sb);
    let crc = crc32c::crc32c(&sb[32..]);
    sb[..4].copy_from_slice(&crc.to_le_bytes());
    f.write_all_at(&sb, 65536).unwrap();
}

#[test]
fn btrfs() {
    require_root();
    let t = tempdir();
    let img = stale_image(t.path(), "btrfs.img", BTRFS_SIZE);
    run("mkfs.btrfs", "btrfs-progs", &["-q", "-f", s(&img)]);
    let lo = LoopDev::attach(&img);
    let m = Mount::new(&lo.dev, &t.path().join("mnt"), None);
    churn(&m.dir, 41);
    nix::unistd::sync();
    let o = run(
        "btrfs",
        "btrfs-progs",
        &["filesystem", "usage", "-b", s(&m.dir)],
    );
    let usage = String::from_utf8_lossy(&o.stdout).into_owned();
    let allocated: u64 = usage
        .lines()
        .find_map(|l| l.trim().strip_prefix("Device allocated:"))
        .unwrap_or_else(|| panic!("btrfs filesystem usage prints Device allocated: {usage}"))
        .trim()
        .parse()
        .unwrap();
    let hashes = hash_tree(&m.dir);
    m.unmount();
    drop(lo);
    // The kernel remembers the fsid's device; let the copy be scanned afresh.
    run("btrfs", "btrfs-progs", &["device", "scan", "--forget"]);

    let map = expect_used(&img, "btrfs");
    // Allocated chunks, the first MiB and the 64 MiB mirror: nothing else.
    let expected_max = allocated + MIB + 4096;
    assert!(
        map.used_bytes() >= allocated && map.used_bytes() <= expected_max,
        "btrfs: used map {} bytes, the kernel says {allocated} allocated ({})",
        map.used_bytes(),
        map.note
    );
    assert!(map.used_bytes() < BTRFS_SIZE / 2, "{}", map.note);
    let copy = scrubbed_copy(&img, &map);
    run("btrfs", "btrfs-progs", &["check", "--readonly", s(&copy)]);
    verify_mounted(&copy, "ro", &hashes);
    run("btrfs", "btrfs-progs", &["device", "scan", "--forget"]);
    eprintln!(
        "btrfs: {} of {BTRFS_SIZE} bytes used; kernel: {allocated} allocated ({})",
        map.used_bytes(),
        map.note
    );

    // A log tree (fsync'd changes not yet in a commit) must be replayed: refused.
    let dirty = t.path().join("dirty.img");
    fs::copy(&img, &dirty).unwrap();
    edit_btrfs_super(&dirty, |sb| {
        sb[96..104].copy_from_slice(&(1u64 << 30).to_le_bytes())
    });
    expect_refused(&dirty, "log tree needs replay");
    // An incompatible feature nobody knows.
    let unknown = t.path().join("unknown.img");
    fs::copy(&img, &unknown).unwrap();
    edit_btrfs_super(&unknown, |sb| sb[188 + 7] |= 0x80);
    expect_refused(&unknown, "incompatible feature flags 0x8000000000000000");
    // A damaged superblock.
    flip_byte(&img, 65536 + 300);
    expect_refused(&img, "superblock checksum mismatch");
}

/// A btrfs superblock left behind at 64 KiB by an earlier filesystem next to a new ext4: which
/// one is live cannot be told, so neither map is trusted.
#[test]
fn two_signatures_refused() {
    let t = tempdir();
    let img = small_ext(t.path(), &[]);
    let f = OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(b"_BHRfS_M", 65536 + 64).unwrap();
    drop(f);
    expect_refused(&img, "more than one filesystem");
}
