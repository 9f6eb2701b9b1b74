//! Disks as raw files on the host, built and inspected without root-only operations (no loop
//! devices, no mounts): sgdisk/sfdisk for the GPT, mkfs.ext4 -d and debugfs for ext4, mkfs.vfat and
//! mtools for vfat.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::harness::require_tool;

pub const MIB: u64 = 1 << 20;

/// Runs a host tool, failing the test with its output when it fails. `package` is what provides it.
pub fn run(package: &str, prog: &str, args: &[&str]) -> Output {
    let path = require_tool(prog, package);
    let o = Command::new(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    assert!(
        o.status.success(),
        "{prog} {} failed ({}):\n{}{}",
        args.join(" "),
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A sparse file of `size` bytes.
pub fn blank(path: &Path, size: u64) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// Deterministic pseudo-random bytes (xorshift64*), so that every run builds the same disks.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Compressible text, `len` bytes.
pub fn text(len: usize, seed: u64) -> Vec<u8> {
    let words = [
        "cairn",
        "sector",
        "block",
        "image",
        "restore",
        "granule",
        "rescue",
        "disk",
        "partition",
        "backup",
        "zstd",
        "verify",
        "journal",
        "inode",
        "extent",
    ];
    let r = pseudo_random(len, seed);
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        out.extend_from_slice(words[r[i % r.len()] as usize % words.len()].as_bytes());
        out.push(if r[(i + 1) % r.len()] % 9 == 0 {
            b'\n'
        } else {
            b' '
        });
        i += 2;
    }
    out.truncate(len);
    out
}

pub fn blake3_file(path: &Path) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    let mut f = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return h.finalize();
        }
        h.update(&buf[..n]);
    }
}

/// A partition as sfdisk reports it (sectors of 512 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub start: u64,
    pub size: u64,
    pub type_guid: String,
    pub uuid: String,
    pub name: String,
}

impl Part {
    pub fn offset(&self) -> u64 {
        self.start * 512
    }
    pub fn bytes(&self) -> u64 {
        self.size * 512
    }
}

/// The partition table of a disk image: (label type, disk id, partitions).
pub fn partitions(disk: &Path) -> (String, String, Vec<Part>) {
    let o = run("fdisk", "sfdisk", &["--json", s(disk)]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("sfdisk --json {}: {e}", disk.display()));
    let t = &v["partitiontable"];
    let str_of = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    let parts = t["partitions"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| Part {
                    start: p["start"].as_u64().unwrap(),
                    size: p["size"].as_u64().unwrap(),
                    type_guid: str_of(&p["type"]),
                    uuid: str_of(&p["uuid"]),
                    name: str_of(&p["name"]),
                })
                .collect()
        })
        .unwrap_or_default();
    (str_of(&t["label"]), str_of(&t["id"]), parts)
}

/// Copies `len` bytes at `offset` of `from` into a new file `to`.
pub fn extract(from: &Path, offset: u64, len: u64, to: &Path) {
    let src = File::open(from).unwrap();
    let dst = File::create(to).unwrap();
    let mut buf = vec![0u8; 4 * MIB as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], offset + done).unwrap();
        dst.write_all_at(&buf[..n], done).unwrap();
        done += n as u64;
    }
}

/// Writes all of `from` into `to` at `offset`.
pub fn insert(from: &Path, to: &Path, offset: u64) {
    let data = fs::read(from).unwrap();
    let f = OpenOptions::new().write(true).open(to).unwrap();
    f.write_all_at(&data, offset).unwrap();
}

/// Where the first `n` bytes of `a` and `b` differ, if they do.
pub fn first_difference(a: &Path, b: &Path, n: u64) -> Option<u64> {
    first_difference_at(a, b, 0, n)
}

/// Where bytes `start..start+n` of `a` and `b` differ, if they do.
pub fn first_difference_at(a: &Path, b: &Path, start: u64, n: u64) -> Option<u64> {
    let mut fa = File::open(a).unwrap();
    let mut fb = File::open(b).unwrap();
    fa.seek(SeekFrom::Start(start)).unwrap();
    fb.seek(SeekFrom::Start(start)).unwrap();
    let n = start + n;
    let (mut ba, mut bb) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut off = start;
    while off < n {
        let k = (n - off).min(MIB) as usize;
        fa.read_exact(&mut ba[..k])
            .unwrap_or_else(|e| panic!("{} at {off}: {e}", a.display()));
        if fb.read_exact(&mut bb[..k]).is_err() {
            return Some(off);
        }
        if ba[..k] != bb[..k] {
            let i = ba[..k]
                .iter()
                .zip(&bb[..k])
                .position(|(x, y)| x != y)
                .unwrap();
            return Some(off + i as u64);
        }
        off += k as u64;
    }
    None
}

/// Bytes `offset..offset+len` of a file are all zero.
pub fn is_zero(path: &Path, offset: u64, len: u64) -> bool {
    let mut f = File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let mut left = len;
    while left > 0 {
        let k = left.min(MIB) as usize;
        f.read_exact(&mut buf[..k]).unwrap();
        if buf[..k].iter().any(|&b| b != 0) {
            return false;
        }
        left -= k as u64;
    }
    true
}

// ---------------------------------------------------------------------------------------------------
// vfat through mtools
// ---------------------------------------------------------------------------------------------------

/// A vfat filesystem image of `size` bytes labelled `label`, holding `files` (path -> bytes; parent
/// directories are created).
pub fn vfat_image(path: &Path, size: u64, label: &str, files: &[(&str, Vec<u8>)]) {
    blank(path, size);
    run("dosfstools", "mkfs.vfat", &["-n", label, s(path)]);
    let tmp = tempfile::tempdir().unwrap();
    for (name, data) in files {
        let mut dir = String::new();
        let parts: Vec<&str> = name.split('/').collect();
        for d in &parts[..parts.len() - 1] {
            dir.push('/');
            dir.push_str(d);
            let o = Command::new(require_tool("mmd", "mtools"))
                .args(["-D", "s", "-i", s(path), &format!("::{dir}")])
                .output()
                .unwrap();
            // "already exists" is fine: several files share a directory.
            let _ = o;
        }
        let local = tmp.path().join("f");
        fs::write(&local, data).unwrap();
        run(
            "mtools",
            "mcopy",
            &["-o", "-i", s(path), s(&local), &format!("::/{name}")],
        );
    }
}

/// A file from a vfat image.
pub fn mcopy_out(image: &Path, name: &str) -> Result<Vec<u8>, String> {
    let o = Command::new(require_tool("mcopy", "mtools"))
        .args(["-n", "-i", s(image), &format!("::/{name}"), "-"])
        .output()
        .map_err(|e| e.to_string())?;
    if o.status.success() {
        Ok(o.stdout)
    } else {
        Err(String::from_utf8_lossy(&o.stderr).trim().to_string())
    }
}

/// A directory tree from a vfat image into `dest`.
pub fn mcopy_tree(image: &Path, dir: &str, dest: &Path) -> Result<(), String> {
    let o = Command::new(require_tool("mcopy", "mtools"))
        .args(["-s", "-n", "-i", s(image), &format!("::/{dir}"), s(dest)])
        .output()
        .map_err(|e| e.to_string())?;
    if o.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).trim().to_string())
    }
}

// ---------------------------------------------------------------------------------------------------
// ext4 through e2fsprogs
// ---------------------------------------------------------------------------------------------------

/// An ext4 filesystem image of `size` bytes, populated from `dir` (or empty).
pub fn ext4_image(path: &Path, size: u64, label: &str, dir: Option<&Path>) {
    blank(path, size);
    let mut args = vec![
        "-q",
        "-F",
        "-t",
        "ext4",
        "-L",
        label,
        "-E",
        "root_owner=0:0",
    ];
    if let Some(d) = dir {
        args.extend(["-d", s(d)]);
    }
    args.push(s(path));
    run("e2fsprogs", "mke2fs", &args);
}

/// A regular file from an ext4 image (debugfs, read-only).
pub fn ext4_file(image: &Path, name: &str, dest: &Path) -> Vec<u8> {
    let _ = fs::remove_file(dest);
    run(
        "e2fsprogs",
        "debugfs",
        &["-R", &format!("dump -p /{name} {}", s(dest)), s(image)],
    );
    fs::read(dest).unwrap_or_else(|e| {
        panic!(
            "debugfs could not dump /{name} from {}: {e}",
            image.display()
        )
    })
}

/// A directory tree from an ext4 image, copied to `dest/<basename of dir>`.
pub fn ext4_tree(image: &Path, dir: &str, dest: &Path) -> PathBuf {
    fs::create_dir_all(dest).unwrap();
    run(
        "e2fsprogs",
        "debugfs",
        &["-R", &format!("rdump /{dir} {}", s(dest)), s(image)],
    );
    let out = dest.join(dir.rsplit('/').next().unwrap());
    assert!(
        out.is_dir(),
        "debugfs rdump /{dir} from {} made nothing",
        image.display()
    );
    out
}

/// `e2fsck -fn` (forced full check, no changes) exits 0.
pub fn e2fsck_clean(image: &Path) -> Result<(), String> {
    fsck_clean("e2fsck", "e2fsprogs", &["-f", "-n"], image)
}

/// `fsck.vfat -n` exits 0.
pub fn fsck_vfat_clean(image: &Path) -> Result<(), String> {
    fsck_clean("fsck.vfat", "dosfstools", &["-n"], image)
}

/// Runs a read-only filesystem check on `image`; Err carries its exit status and output.
fn fsck_clean(tool: &str, package: &str, args: &[&str], image: &Path) -> Result<(), String> {
    let o = Command::new(require_tool(tool, package))
        .args(args)
        .arg(s(image))
        .output()
        .unwrap();
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{tool} {} {} exited {}:\n{}{}",
            args.join(" "),
            image.display(),
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

// ---------------------------------------------------------------------------------------------------
// The source disk of the backup/restore scenarios
// ---------------------------------------------------------------------------------------------------

/// A 64 MiB disk: GPT, partition 1 ext4 "data" (36 MiB), partition 2 vfat "share" (20 MiB), with files.
pub struct SourceDisk {
    pub path: PathBuf,
    pub size: u64,
    pub parts: Vec<Part>,
    pub ext4_files: Vec<(String, Vec<u8>)>,
    pub vfat_files: Vec<(String, Vec<u8>)>,
}

pub fn source_disk(dir: &Path) -> SourceDisk {
    let size = 64 * MIB;
    let path = dir.join("source.img");
    blank(&path, size);
    run(
        "gdisk",
        "sgdisk",
        &[
            "-n",
            "1:2048:+36M",
            "-t",
            "1:8300",
            "-c",
            "1:data",
            "-n",
            "2:0:+20M",
            "-t",
            "2:0700",
            "-c",
            "2:share",
            s(&path),
        ],
    );
    let (label, _, parts) = partitions(&path);
    assert_eq!(label, "gpt");
    assert_eq!(parts.len(), 2, "sgdisk made {parts:?}");

    let ext4_files: Vec<(String, Vec<u8>)> = vec![
        (
            "hello.txt".into(),
            b"hello from cairn's vm-tests\n".to_vec(),
        ),
        (
            "data/random.bin".into(),
            pseudo_random(3 * MIB as usize + 12345, 1),
        ),
        ("data/text.txt".into(), text(400_000, 2)),
        ("data/mostly-zero.bin".into(), {
            let mut v = vec![0u8; MIB as usize];
            v.extend(pseudo_random(256 * 1024, 3));
            v
        }),
        ("deep/a/b/c/leaf.txt".into(), text(5000, 4)),
    ];
    let tree = dir.join("ext4-tree");
    for (name, data) in &ext4_files {
        let p = tree.join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, data).unwrap();
    }
    let p1 = dir.join("p1.img");
    ext4_image(&p1, parts[0].bytes(), "cairn-data", Some(&tree));
    insert(&p1, &path, parts[0].offset());

    let vfat_files: Vec<(String, Vec<u8>)> = vec![
        (
            "README.TXT".into(),
            b"cairn vm-tests: vfat partition\r\n".to_vec(),
        ),
        ("random.bin".into(), pseudo_random(1_500_000, 5)),
        ("docs/notes.txt".into(), text(70_000, 6)),
    ];
    let p2 = dir.join("p2.img");
    let refs: Vec<(&str, Vec<u8>)> = vfat_files
        .iter()
        .map(|(n, d)| (n.as_str(), d.clone()))
        .collect();
    vfat_image(&p2, parts[1].bytes(), "CAIRNSHARE", &refs);
    insert(&p2, &path, parts[1].offset());
    fs::remove_file(&p1).unwrap();
    fs::remove_file(&p2).unwrap();

    SourceDisk {
        path,
        size,
        parts,
        ext4_files,
        vfat_files,
    }
}

impl SourceDisk {
    /// `target` holds what this disk held: every byte of the source is on it, except on a larger
    /// target the GPT's own bookkeeping (protective MBR, primary header, backup header and array
    /// moved to the target's end); the partition table reads the same and verifies clean; both
    /// filesystems check clean, and every file reads back equal.
    pub fn assert_restored_on(&self, target: &Path, scratch: &Path) {
        let target_size = fs::metadata(target).unwrap().len();
        // LBA 0 (protective MBR) and 1 (primary header) name the disk's last sector; the primary
        // entry array (LBA 2..34) and everything up to the source's backup array are the source's.
        let gpt_tail = 33 * 512;
        let ranges: Vec<(u64, u64)> = if target_size == self.size {
            vec![(0, self.size)]
        } else {
            vec![(1024, self.size - gpt_tail - 1024)]
        };
        for (off, len) in ranges {
            if let Some(at) = first_difference_at(&self.path, target, off, len) {
                panic!(
                    "restored disk {} differs from the source {} at byte {at} (compared {off}..{})",
                    target.display(),
                    self.path.display(),
                    off + len
                );
            }
        }
        if target_size > self.size {
            assert!(
                is_zero(target, self.size, target_size - self.size - gpt_tail),
                "the restored disk has data between the source's size and its relocated GPT backup"
            );
        }
        let (label, id, parts) = partitions(target);
        let (_, src_id, _) = partitions(&self.path);
        assert_eq!(label, "gpt", "restored disk has no GPT");
        assert_eq!(id, src_id, "restored disk GUID differs");
        assert_eq!(parts, self.parts, "restored partition table differs");
        let v = run("gdisk", "sgdisk", &["-v", s(target)]);
        let text = String::from_utf8_lossy(&v.stdout);
        assert!(
            text.contains("No problems found"),
            "sgdisk -v finds problems with the restored GPT:\n{text}"
        );

        fs::create_dir_all(scratch).unwrap();
        let p1 = scratch.join("restored-p1.img");
        let p2 = scratch.join("restored-p2.img");
        extract(target, parts[0].offset(), parts[0].bytes(), &p1);
        extract(target, parts[1].offset(), parts[1].bytes(), &p2);
        e2fsck_clean(&p1).unwrap_or_else(|e| panic!("restored ext4 partition: {e}"));
        fsck_vfat_clean(&p2).unwrap_or_else(|e| panic!("restored vfat partition: {e}"));
        for (name, data) in &self.ext4_files {
            let got = ext4_file(&p1, name, &scratch.join("dumped"));
            assert!(
                got == *data,
                "ext4 file {name} differs after restore ({} bytes, expected {})",
                got.len(),
                data.len()
            );
        }
        for (name, data) in &self.vfat_files {
            let got = mcopy_out(&p2, name).unwrap_or_else(|e| panic!("vfat file {name}: {e}"));
            assert!(
                got == *data,
                "vfat file {name} differs after restore ({} bytes, expected {})",
                got.len(),
                data.len()
            );
        }
        fs::remove_file(&p1).unwrap();
        fs::remove_file(&p2).unwrap();
    }

    /// `sha256sum` lines (relative names) the guest should print for the ext4 partition's files.
    pub fn ext4_sha256(&self, scratch: &Path) -> Vec<String> {
        sha256_lines(&self.ext4_files, scratch)
    }

    pub fn vfat_sha256(&self, scratch: &Path) -> Vec<String> {
        sha256_lines(&self.vfat_files, scratch)
    }
}

fn sha256_lines(files: &[(String, Vec<u8>)], scratch: &Path) -> Vec<String> {
    fs::create_dir_all(scratch).unwrap();
    let mut lines: Vec<String> = files
        .iter()
        .map(|(name, data)| {
            let p = scratch.join("sha-input");
            fs::write(&p, data).unwrap();
            let o = run("coreutils", "sha256sum", &[s(&p)]);
            let hex = String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()
                .unwrap()
                .to_string();
            format!("{hex}  ./{name}")
        })
        .collect();
    lines.sort();
    lines
}

/// The `sha256sum` lines of a step's output, sorted, with case folded for vfat's names.
pub fn sorted_lines(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    v.sort();
    v
}
