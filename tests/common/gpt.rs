//! Partitioned test disks (sgdisk, sfdisk) and checks on them: `sgdisk -v`, partition geometry
//! from `sgdisk -i`, hashes of byte ranges, loop devices with 4096-byte sectors.

use super::*;

pub const SECTOR: u64 = 512;

/// `sgdisk ARGS` on a file or device, asserting success; returns stdout.
pub fn sgdisk(args: &[&str]) -> String {
    let t = require_tool("sgdisk", "gdisk");
    let o = run_tool(&t, args);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `sgdisk -v` must say "No problems found".
pub fn assert_gpt_valid(dev: &str) {
    let text = sgdisk(&["-v", dev]);
    assert!(
        text.contains("No problems found"),
        "sgdisk -v {dev} found problems:\n{text}"
    );
}

/// One partition as `sgdisk -i N` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptPart {
    pub first_lba: u64,
    pub last_lba: u64,
    pub uuid: String,
    pub type_guid: String,
}

pub fn gpt_part(dev: &str, n: u32) -> GptPart {
    let text = sgdisk(&["-i", &n.to_string(), dev]);
    let field = |name: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("sgdisk -i {n} {dev}: no {name:?} in:\n{text}"))
            .trim()
            .to_string()
    };
    let lba = |name: &str| -> u64 {
        field(name)
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    GptPart {
        first_lba: lba("First sector:"),
        last_lba: lba("Last sector:"),
        uuid: field("Partition unique GUID:").to_lowercase(),
        type_guid: field("Partition GUID code:")
            .split_whitespace()
            .next()
            .unwrap()
            .to_lowercase(),
    }
}

/// The disk GUID `sgdisk -p` prints.
pub fn gpt_disk_guid(dev: &str) -> String {
    let text = sgdisk(&["-p", dev]);
    text.lines()
        .find_map(|l| l.strip_prefix("Disk identifier (GUID):"))
        .unwrap_or_else(|| panic!("no disk GUID in sgdisk -p {dev}:\n{text}"))
        .trim()
        .to_lowercase()
}

/// BLAKE3 of `len` bytes of `path` from `offset` (file or device; flush devices first).
pub fn hash_range(path: &Path, offset: u64, len: u64) -> String {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 4 * MIB as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], offset + done)
            .unwrap_or_else(|e| panic!("read {} at {}: {e}", path.display(), offset + done));
        h.update(&buf[..n]);
        done += n as u64;
    }
    h.finalize().to_hex().to_string()
}

/// Attach `file` as a loop device with the given logical sector size (512 or 4096).
pub fn attach_with_sector_size(file: &Path, sector_size: u32) -> LoopDev {
    LoopDev::attach_with(file, &["--sector-size", &sector_size.to_string()])
}

/// The logical sector size the kernel reports for a device.
pub fn logical_sector_size(dev: &str) -> u64 {
    let t = require_tool("blockdev", "util-linux");
    let o = run_tool(&t, &["--getss", dev]);
    String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
}

/// `blkid -p -s TAG -o value DEV`.
pub fn blkid_value(dev: &str, tag: &str) -> String {
    let t = require_tool("blkid", "util-linux");
    let o = run_tool(&t, &["-p", "-s", tag, "-o", "value", dev]);
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}
