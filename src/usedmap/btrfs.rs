//! btrfs: the chunks allocated on the device, from the chunk tree.
//!
//! Layouts from btrfs-progs' kernel-shared/uapi/btrfs_tree.h and ctree.h (struct btrfs_super_block,
//! btrfs_header, btrfs_item, btrfs_key_ptr, btrfs_chunk, btrfs_stripe, btrfs_dev_item, the
//! incompat flags and block group profile bits) and the kernel's Documentation of the on-disk
//! format (superblock mirrors at 64 KiB, 64 MiB, 256 GiB; the first 1 MiB never allocated).
//!
//! Used: the first MiB (boot area and primary superblock), the superblock mirrors, and every
//! device range a chunk's stripe occupies on this device. Space no chunk covers is unallocated
//! and holds nothing btrfs reads. Allocated but unused space inside chunks is imaged (btrfs's
//! free-space information inside chunks is not trusted here). The stripes must add up to the
//! device item's bytes_used.

use super::{crc32c_raw, doubt, le16, le32, le64, Disk, Doubt, FsMap, Ranges};

const FS: &str = "btrfs";
const SB_OFFSET: u64 = 64 * 1024;
const SB_SIZE: u64 = 4096;
const MIRRORS: [u64; 2] = [64 << 20, 256 << 30];
const HEADER: usize = 101;
const CHUNK_ITEM_KEY: u8 = 228;
const CHUNK_TREE_OBJECTID: u64 = 3;

// Incompat flags that do not change where chunks live on a single device.
const INCOMPAT_KNOWN: u64 = 0x1 // MIXED_BACKREF
    | 0x2 // DEFAULT_SUBVOL
    | 0x4 // MIXED_GROUPS
    | 0x8 // COMPRESS_LZO
    | 0x10 // COMPRESS_ZSTD
    | 0x20 // BIG_METADATA
    | 0x40 // EXTENDED_IREF
    | 0x80 // RAID56 (refused below per chunk: one device has no such chunks)
    | 0x100 // SKINNY_METADATA
    | 0x200 // NO_HOLES
    | 0x400 // METADATA_UUID
    | 0x800 // RAID1C34
    | 0x10000; // SIMPLE_QUOTA
const INCOMPAT_METADATA_UUID: u64 = 0x400;
// FREE_SPACE_TREE, FREE_SPACE_TREE_VALID, VERITY, BLOCK_GROUP_TREE.
const RO_KNOWN: u64 = 0xF;
/// Block group profile bits other than DUP (0x20): RAID0/1/10/5/6/1C3/1C4.
const PROFILE_MULTI: u64 = 0x8 | 0x10 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400;
const PROFILE_DUP: u64 = 0x20;

pub(super) fn detect(d: &Disk) -> bool {
    d.peek(SB_OFFSET + 64, 8).is_some_and(|m| &m == b"_BHRfS_M")
}

/// A chunk's logical start, length and its stripes on this device.
struct Chunk {
    logical: u64,
    length: u64,
    physical: Vec<u64>,
}

/// Parses a btrfs_chunk at `c` (whole `c` must hold it), keeping the stripes on `devid`.
fn parse_chunk(c: &[u8], logical: u64, devid: u64) -> Result<Chunk, Doubt> {
    if c.len() < 48 {
        return doubt(FS, "a truncated chunk item");
    }
    let length = le64(c, 0);
    let ty = le64(c, 24);
    let stripes = usize::from(le16(c, 44));
    if stripes == 0 || c.len() < 48 + stripes * 32 {
        return doubt(FS, "a chunk item with a wrong stripe count");
    }
    if ty & PROFILE_MULTI != 0 {
        return doubt(FS, format!("a multi-device chunk profile ({ty:#x})"));
    }
    if length == 0
        || (ty & PROFILE_DUP == 0 && stripes != 1)
        || (ty & PROFILE_DUP != 0 && stripes != 2)
    {
        return doubt(
            FS,
            format!("a chunk of {length} bytes with {stripes} stripes ({ty:#x})"),
        );
    }
    let mut physical = Vec::with_capacity(stripes);
    for i in 0..stripes {
        let s = &c[48 + i * 32..];
        if le64(s, 0) != devid {
            return doubt(
                FS,
                format!(
                    "a chunk stripe on device {} (this is device {devid})",
                    le64(s, 0)
                ),
            );
        }
        physical.push(le64(s, 8));
    }
    Ok(Chunk {
        logical,
        length,
        physical,
    })
}

pub(super) fn read(d: &Disk) -> Result<FsMap, Doubt> {
    let sb = d.read(FS, SB_OFFSET, SB_SIZE, "the superblock")?;
    let csum_type = le16(&sb, 196);
    if csum_type != 0 {
        return doubt(
            FS,
            format!("checksum type {csum_type} (only crc32c is checked here)"),
        );
    }
    let stored = le32(&sb, 0);
    if !crc32c_raw(!0, &sb[32..]) != stored {
        return doubt(FS, "superblock checksum mismatch");
    }
    if le64(&sb, 48) != SB_OFFSET {
        return doubt(FS, "the superblock does not record its own offset");
    }
    let log_root = le64(&sb, 96);
    if log_root != 0 {
        return doubt(
            FS,
            "the log tree needs replay (fsync'd data not yet committed)",
        );
    }
    let incompat = le64(&sb, 188);
    if incompat & !INCOMPAT_KNOWN != 0 {
        return doubt(
            FS,
            format!(
                "unknown or unsupported incompatible feature flags {:#x}",
                incompat & !INCOMPAT_KNOWN
            ),
        );
    }
    let ro = le64(&sb, 180);
    if ro & !RO_KNOWN != 0 {
        return doubt(
            FS,
            format!(
                "unknown read-only-compatible feature flags {:#x}",
                ro & !RO_KNOWN
            ),
        );
    }
    let num_devices = le64(&sb, 136);
    if num_devices != 1 {
        return doubt(
            FS,
            format!("a filesystem of {num_devices} devices (only single-device ones are read)"),
        );
    }
    let nodesize = u64::from(le32(&sb, 148));
    if !(4096..=65536).contains(&nodesize) || !nodesize.is_power_of_two() {
        return doubt(FS, format!("implausible node size {nodesize}"));
    }
    let fsid: [u8; 16] = if incompat & INCOMPAT_METADATA_UUID != 0 {
        sb[571..587].try_into().unwrap_or_default()
    } else {
        sb[32..48].try_into().unwrap_or_default()
    };
    let dev = &sb[201..299];
    let devid = le64(dev, 0);
    let dev_total = le64(dev, 8);
    let dev_used = le64(dev, 16);
    if dev_total > d.size {
        return doubt(
            FS,
            format!(
                "the device item says {dev_total} bytes, the source has {}",
                d.size
            ),
        );
    }

    // The system chunks, which map the chunk tree itself.
    let array_size = le32(&sb, 160) as usize;
    if array_size > 2048 {
        return doubt(FS, "an oversized system chunk array");
    }
    let array = &sb[811..811 + array_size];
    let mut sys = Vec::new();
    let mut at = 0;
    while at < array.len() {
        let key = &array[at..];
        if key.len() < 17 + 48 || key[8] != CHUNK_ITEM_KEY {
            return doubt(FS, "a malformed system chunk array");
        }
        let stripes = usize::from(le16(key, 17 + 44));
        let end = 17 + 48 + stripes * 32;
        if key.len() < end {
            return doubt(FS, "a truncated system chunk array");
        }
        sys.push(parse_chunk(&key[17..end], le64(key, 9), devid)?);
        at += end;
    }

    let mut walk = Walk {
        d,
        sys: &sys,
        nodesize,
        fsid,
        devid,
        chunks: Vec::new(),
        visits: 0,
    };
    walk.node(le64(&sb, 88), u32::from(sb[199]))?;

    let mut used = Ranges::new();
    used.add(0, 1 << 20);
    for m in MIRRORS {
        used.add(m, SB_SIZE);
    }
    let mut allocated = 0u64;
    for c in &walk.chunks {
        for &p in &c.physical {
            if p.checked_add(c.length).is_none_or(|e| e > dev_total) {
                return doubt(
                    FS,
                    format!("chunk {} lies past the device's end", c.logical),
                );
            }
            used.add(p, c.length);
            allocated += c.length;
        }
    }
    if allocated != dev_used {
        return doubt(
            FS,
            format!("the chunks allocate {allocated} bytes on the device, its device item says {dev_used}"),
        );
    }
    Ok(FsMap {
        fs: FS,
        ranges: used,
        fs_end: dev_total,
        note: format!(
            "{} chunks allocating {allocated} of {dev_total} bytes",
            walk.chunks.len()
        ),
    })
}

struct Walk<'a, 'b> {
    d: &'a Disk<'b>,
    sys: &'a [Chunk],
    nodesize: u64,
    fsid: [u8; 16],
    devid: u64,
    chunks: Vec<Chunk>,
    visits: u64,
}

impl Walk<'_, '_> {
    fn physical(&self, logical: u64) -> Result<u64, Doubt> {
        self.sys
            .iter()
            .find(|c| c.logical <= logical && logical - c.logical < c.length)
            .map(|c| c.physical[0] + (logical - c.logical))
            .map_or_else(
                || {
                    doubt(
                        FS,
                        format!("chunk tree node {logical} is in no system chunk"),
                    )
                },
                Ok,
            )
    }

    fn node(&mut self, logical: u64, level: u32) -> Result<(), Doubt> {
        self.visits += 1;
        if level >= 8 || self.visits > 1 << 20 {
            return doubt(FS, "the chunk tree is implausibly deep or large");
        }
        let at = self.physical(logical)?;
        let b = self.d.read(FS, at, self.nodesize, "a chunk tree node")?;
        if !crc32c_raw(!0, &b[32..]) != le32(&b, 0) {
            return doubt(FS, format!("chunk tree node {logical} fails its checksum"));
        }
        if le64(&b, 48) != logical
            || b[32..48] != self.fsid
            || le64(&b, 88) != CHUNK_TREE_OBJECTID
            || u32::from(b[100]) != level
        {
            return doubt(
                FS,
                format!("chunk tree node {logical} has a wrong address, fsid, owner or level"),
            );
        }
        let n = le32(&b, 96) as usize;
        let item = if level == 0 { 25 } else { 33 };
        if HEADER + n * item > b.len() {
            return doubt(FS, format!("chunk tree node {logical} claims {n} items"));
        }
        for i in 0..n {
            let it = &b[HEADER + i * item..];
            if level > 0 {
                self.node(le64(it, 17), level - 1)?;
                continue;
            }
            if it[8] != CHUNK_ITEM_KEY {
                continue;
            }
            let off = HEADER + le32(it, 17) as usize;
            let size = le32(it, 21) as usize;
            let Some(data) = b.get(off..off.saturating_add(size)) else {
                return doubt(
                    FS,
                    format!("chunk tree node {logical} has an item outside it"),
                );
            };
            let c = parse_chunk(data, le64(it, 9), self.devid)?;
            self.chunks.push(c);
        }
        Ok(())
    }
}
