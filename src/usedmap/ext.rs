//! ext2/3/4: the block bitmap of each block group.
//!
//! Layouts from the kernel's Documentation/filesystems/ext4/ (super.rst, group_descr.rst,
//! blockgroup.rst, bitmaps.rst) and fs/ext4/ext4.h, balloc.c (ext4_num_base_meta_clusters,
//! ext4_bg_num_gdb, descriptor_loc), bitmap.c (ext4_block_bitmap_csum_verify), super.c
//! (ext4_group_desc_csum, ext4_superblock_csum).
//!
//! Used: every cluster the bitmap of an initialised group marks; for a BLOCK_UNINIT group (its
//! bitmap was never written) the blocks the kernel itself would mark when it initialises it (the
//! superblock backup, group descriptors and reserved GDT blocks at its start); and always, whatever
//! the bitmaps say, the boot block, the superblock and its backups, every group descriptor block,
//! every group's block bitmap, inode bitmap and inode table, and the MMP block.

use super::{crc32c_raw, doubt, le16, le32, set_runs, Disk, Doubt, FsMap, Ranges};

const SB_OFFSET: u64 = 1024;
const MAGIC: u16 = 0xEF53;

// s_state
const STATE_VALID: u16 = 0x1;
const STATE_ERROR: u16 = 0x2;

// s_feature_compat
const COMPAT_DIR_PREALLOC: u32 = 0x1;
const COMPAT_IMAGIC_INODES: u32 = 0x2;
const COMPAT_HAS_JOURNAL: u32 = 0x4;
const COMPAT_EXT_ATTR: u32 = 0x8;
const COMPAT_RESIZE_INODE: u32 = 0x10;
const COMPAT_DIR_INDEX: u32 = 0x20;
const COMPAT_LAZY_BG: u32 = 0x40;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;
const COMPAT_FAST_COMMIT: u32 = 0x400;
const COMPAT_STABLE_INODES: u32 = 0x800;
const COMPAT_ORPHAN_FILE: u32 = 0x1000;
const COMPAT_KNOWN: u32 = COMPAT_DIR_PREALLOC
    | COMPAT_IMAGIC_INODES
    | COMPAT_HAS_JOURNAL
    | COMPAT_EXT_ATTR
    | COMPAT_RESIZE_INODE
    | COMPAT_DIR_INDEX
    | COMPAT_LAZY_BG
    | COMPAT_SPARSE_SUPER2
    | COMPAT_FAST_COMMIT
    | COMPAT_STABLE_INODES
    | COMPAT_ORPHAN_FILE;

// s_feature_incompat
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_MMP: u32 = 0x100;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const INCOMPAT_EA_INODE: u32 = 0x400;
const INCOMPAT_DIRDATA: u32 = 0x1000;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const INCOMPAT_LARGEDIR: u32 = 0x4000;
const INCOMPAT_INLINE_DATA: u32 = 0x8000;
const INCOMPAT_ENCRYPT: u32 = 0x10000;
const INCOMPAT_CASEFOLD: u32 = 0x20000;
// Handled explicitly (RECOVER, JOURNAL_DEV) or harmless to the block map. COMPRESSION (0x1) is not
// here: its clusters were never supported by any kernel.
const INCOMPAT_KNOWN: u32 = INCOMPAT_FILETYPE
    | INCOMPAT_RECOVER
    | INCOMPAT_JOURNAL_DEV
    | INCOMPAT_META_BG
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_DIRDATA
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR
    | INCOMPAT_INLINE_DATA
    | INCOMPAT_ENCRYPT
    | INCOMPAT_CASEFOLD;

// s_feature_ro_compat
const RO_SPARSE_SUPER: u32 = 0x1;
const RO_LARGE_FILE: u32 = 0x2;
const RO_BTREE_DIR: u32 = 0x4;
const RO_HUGE_FILE: u32 = 0x8;
const RO_GDT_CSUM: u32 = 0x10;
const RO_DIR_NLINK: u32 = 0x20;
const RO_EXTRA_ISIZE: u32 = 0x40;
const RO_QUOTA: u32 = 0x100;
const RO_BIGALLOC: u32 = 0x200;
const RO_METADATA_CSUM: u32 = 0x400;
const RO_READONLY: u32 = 0x1000;
const RO_PROJECT: u32 = 0x2000;
const RO_SHARED_BLOCKS: u32 = 0x4000;
const RO_VERITY: u32 = 0x8000;
const RO_ORPHAN_PRESENT: u32 = 0x10000;
// HAS_SNAPSHOT (0x80, next3) and REPLICA (0x800) are left out: blocks they own are not described
// by the bitmaps in a way this reader knows.
const RO_KNOWN: u32 = RO_SPARSE_SUPER
    | RO_LARGE_FILE
    | RO_BTREE_DIR
    | RO_HUGE_FILE
    | RO_GDT_CSUM
    | RO_DIR_NLINK
    | RO_EXTRA_ISIZE
    | RO_QUOTA
    | RO_BIGALLOC
    | RO_METADATA_CSUM
    | RO_READONLY
    | RO_PROJECT
    | RO_SHARED_BLOCKS
    | RO_VERITY
    | RO_ORPHAN_PRESENT;

// bg_flags
const BG_BLOCK_UNINIT: u16 = 0x2;

/// The checksum type metadata_csum allows (s_checksum_type).
const CSUM_TYPE_CRC32C: u8 = 1;

pub(super) fn detect(d: &Disk) -> bool {
    d.peek(SB_OFFSET + 0x38, 2)
        .is_some_and(|m| u16::from_le_bytes([m[0], m[1]]) == MAGIC)
}

struct Geometry {
    block_size: u64,
    blocks_count: u64,
    first_data_block: u64,
    blocks_per_group: u64,
    clusters_per_group: u64,
    desc_size: u64,
    descs_per_block: u64,
    gdb_count: u64,
    reserved_gdt: u64,
    first_meta_bg: u64,
    incompat: u32,
    ro: u32,
    compat: u32,
    backup_bgs: [u32; 2],
    csum_seed: u32,
}

impl Geometry {
    fn has(&self, ro: u32) -> bool {
        self.ro & ro != 0
    }

    /// ext4_bg_has_super.
    fn has_super(&self, g: u64) -> bool {
        if g == 0 {
            return true;
        }
        if self.compat & COMPAT_SPARSE_SUPER2 != 0 {
            return g == u64::from(self.backup_bgs[0]) || g == u64::from(self.backup_bgs[1]);
        }
        if g <= 1 || !self.has(RO_SPARSE_SUPER) {
            return true;
        }
        if g & 1 == 0 {
            return false;
        }
        [3u64, 5, 7].iter().any(|&b| {
            let mut p = b;
            while p < g {
                p *= b;
            }
            p == g
        })
    }

    fn meta_bg(&self) -> bool {
        self.incompat & INCOMPAT_META_BG != 0
    }

    /// ext4_num_base_meta_clusters (in blocks): superblock backup, descriptor blocks and reserved
    /// GDT blocks at the start of group `g`.
    fn base_meta_blocks(&self, g: u64) -> u64 {
        let sup = u64::from(self.has_super(g));
        if !self.meta_bg() || g < self.first_meta_bg.saturating_mul(self.descs_per_block) {
            if sup == 0 {
                return 0;
            }
            let gdb = if self.meta_bg() {
                self.first_meta_bg
            } else {
                self.gdb_count
            };
            sup + gdb + self.reserved_gdt
        } else {
            let r = g % self.descs_per_block;
            let meta = u64::from(r == 0 || r == 1 || r == self.descs_per_block - 1);
            sup + meta
        }
    }

    fn group_first_block(&self, g: u64) -> u64 {
        self.first_data_block + g * self.blocks_per_group
    }

    fn blocks_in_group(&self, g: u64) -> u64 {
        let first = self.group_first_block(g);
        (self.blocks_count - first).min(self.blocks_per_group)
    }

    /// descriptor_loc: the block that holds descriptor block `nr`.
    fn descriptor_block(&self, nr: u64) -> u64 {
        let sb_block = if self.block_size == 1024 { 1 } else { 0 };
        if !self.meta_bg() || nr < self.first_meta_bg {
            return sb_block + nr + 1;
        }
        let bg = self.descs_per_block * nr;
        let mut has_super = u64::from(self.has_super(bg));
        if self.block_size == 1024 && nr == 0 && self.first_data_block == 0 {
            has_super += 1;
        }
        self.group_first_block(bg) + has_super
    }
}

pub(super) fn read(d: &Disk) -> Result<FsMap, Doubt> {
    let sb = d.read("ext", SB_OFFSET, 1024, "the superblock")?;
    let compat = le32(&sb, 0x5C);
    let incompat = le32(&sb, 0x60);
    let ro = le32(&sb, 0x64);
    let rev = le32(&sb, 0x4C);
    let fs: &'static str = if incompat & (INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG) != 0
        || ro & (RO_HUGE_FILE | RO_GDT_CSUM | RO_METADATA_CSUM | RO_BIGALLOC) != 0
    {
        "ext4"
    } else if compat & COMPAT_HAS_JOURNAL != 0 {
        "ext3"
    } else {
        "ext2"
    };
    let no = |why: String| -> Result<FsMap, Doubt> { doubt(fs, why) };

    // Superblock checksum first: nothing else in it is worth reading if it fails.
    let csum = ro & RO_METADATA_CSUM != 0;
    if csum {
        if sb[0x175] != CSUM_TYPE_CRC32C {
            return no(format!("unknown metadata checksum type {}", sb[0x175]));
        }
        let want = le32(&sb, 0x3FC);
        let got = crc32c_raw(!0, &sb[..0x3FC]);
        if want != got {
            return no(format!(
                "superblock checksum mismatch (stored {want:#010x}, computed {got:#010x})"
            ));
        }
    }
    if rev == 0 && (compat | incompat | ro) != 0 {
        return no("revision 0 superblock with feature flags".into());
    }
    if incompat & INCOMPAT_JOURNAL_DEV != 0 {
        return no("an external journal device, not a filesystem".into());
    }
    if incompat & INCOMPAT_RECOVER != 0 {
        return no(
            "the journal needs recovery (needs_recovery is set: mounted, or not cleanly unmounted)"
                .into(),
        );
    }
    if incompat & !INCOMPAT_KNOWN != 0 {
        return no(format!(
            "unknown incompatible feature flags {:#x}",
            incompat & !INCOMPAT_KNOWN
        ));
    }
    if ro & !RO_KNOWN != 0 {
        return no(format!(
            "unknown read-only-compatible feature flags {:#x}",
            ro & !RO_KNOWN
        ));
    }
    if compat & !COMPAT_KNOWN != 0 {
        return no(format!(
            "unknown compatible feature flags {:#x}",
            compat & !COMPAT_KNOWN
        ));
    }
    let state = le16(&sb, 0x3A);
    if state & STATE_ERROR != 0 {
        return no("the filesystem is marked as having errors".into());
    }
    if state & STATE_VALID == 0 {
        return no("the filesystem was not cleanly unmounted (s_state lacks VALID_FS)".into());
    }

    let log_block = le32(&sb, 0x18);
    let log_cluster = le32(&sb, 0x1C);
    if log_block > 6 {
        return no(format!("implausible block size 2^(10+{log_block})"));
    }
    let block_size = 1024u64 << log_block;
    let bigalloc = ro & RO_BIGALLOC != 0;
    let cluster_size = if bigalloc {
        if log_cluster < log_block || log_cluster > 29 {
            return no(format!("implausible cluster size 2^(10+{log_cluster})"));
        }
        1024u64 << log_cluster
    } else {
        block_size
    };
    let blocks_per_cluster = cluster_size / block_size;
    let bits64 = incompat & INCOMPAT_64BIT != 0;
    let hi = |at: usize| {
        if bits64 {
            u64::from(le32(&sb, at)) << 32
        } else {
            0
        }
    };
    let blocks_count = u64::from(le32(&sb, 0x04)) | hi(0x150);
    let free_blocks = u64::from(le32(&sb, 0x0C)) | hi(0x158);
    let first_data_block = u64::from(le32(&sb, 0x14));
    let blocks_per_group = u64::from(le32(&sb, 0x20));
    let clusters_per_group = if bigalloc {
        u64::from(le32(&sb, 0x24))
    } else {
        blocks_per_group
    };
    let desc_size = if bits64 {
        u64::from(le16(&sb, 0xFE))
    } else {
        32
    };
    if bits64 && (!(64..=1024).contains(&desc_size) || !desc_size.is_power_of_two()) {
        return no(format!("implausible group descriptor size {desc_size}"));
    }
    if blocks_per_group == 0
        || clusters_per_group == 0
        || clusters_per_group > block_size * 8
        || clusters_per_group * blocks_per_cluster != blocks_per_group
    {
        return no(format!(
            "implausible group geometry ({blocks_per_group} blocks, {clusters_per_group} clusters per group)"
        ));
    }
    if first_data_block >= blocks_count
        || (block_size == 1024) != (first_data_block == 1) && !bigalloc
    {
        return no(format!(
            "first data block {first_data_block} does not fit a {block_size}-byte block size"
        ));
    }
    let fs_bytes = blocks_count
        .checked_mul(block_size)
        .filter(|&b| b <= d.size);
    let Some(fs_end) = fs_bytes else {
        return no(format!(
            "the filesystem ({blocks_count} blocks of {block_size}) is larger than the source ({} bytes)",
            d.size
        ));
    };
    let groups = (blocks_count - first_data_block).div_ceil(blocks_per_group);
    let descs_per_block = block_size / desc_size;
    let uuid = &sb[0x68..0x78];
    let csum_seed = if incompat & INCOMPAT_CSUM_SEED != 0 {
        le32(&sb, 0x270)
    } else {
        crc32c_raw(!0, uuid)
    };
    let g = Geometry {
        block_size,
        blocks_count,
        first_data_block,
        blocks_per_group,
        clusters_per_group,
        desc_size,
        descs_per_block,
        gdb_count: groups.div_ceil(descs_per_block),
        reserved_gdt: u64::from(le16(&sb, 0xCE)),
        first_meta_bg: u64::from(le32(&sb, 0x104)),
        incompat,
        ro,
        compat,
        backup_bgs: [le32(&sb, 0x24C), le32(&sb, 0x250)],
        csum_seed,
    };
    if g.meta_bg() && g.first_meta_bg > g.gdb_count {
        return no(format!(
            "first_meta_bg {} beyond the {} descriptor blocks",
            g.first_meta_bg, g.gdb_count
        ));
    }
    if !g.meta_bg() && g.reserved_gdt > block_size / 4 {
        return no(format!(
            "implausible reserved GDT blocks {}",
            g.reserved_gdt
        ));
    }

    let mut used = Ranges::new();
    let bs = block_size;
    let in_fs = |b: u64, what: &str| -> Result<u64, Doubt> {
        if b >= blocks_count {
            doubt(
                fs,
                format!("{what} at block {b} lies past the filesystem's {blocks_count} blocks"),
            )
        } else {
            Ok(b)
        }
    };
    // Boot block, superblock and the rest of group 0's first block.
    used.add(0, (first_data_block + 1) * bs);
    if incompat & INCOMPAT_MMP != 0 {
        let mmp = u64::from(le32(&sb, 0x168)) | (u64::from(le32(&sb, 0x16C)) << 32);
        used.add(in_fs(mmp, "the MMP block")? * bs, bs);
    }

    // Descriptors, one descriptor block at a time (bounded memory for any group count).
    let mut desc_total_free = 0u64;
    let mut bitmap_ranges = Ranges::new();
    let mut uninit_groups = 0u64;
    for nr in 0..g.gdb_count {
        let dblock = in_fs(g.descriptor_block(nr), "a group descriptor block")?;
        used.add(dblock * bs, bs);
        let block = d.read(fs, dblock * bs, bs, "a group descriptor block")?;
        for i in 0..descs_per_block {
            let group = nr * descs_per_block + i;
            if group >= groups {
                break;
            }
            let off = (i * desc_size) as usize;
            let desc = &block[off..off + desc_size as usize];
            check_desc_csum(&g, fs, group, desc, uuid)?;
            let hi = |at: usize| {
                if desc_size >= 64 {
                    u64::from(le32(desc, at)) << 32
                } else {
                    0
                }
            };
            let hi16 = |at: usize| {
                if desc_size >= 64 {
                    u64::from(le16(desc, at)) << 16
                } else {
                    0
                }
            };
            let block_bitmap = in_fs(u64::from(le32(desc, 0x00)) | hi(0x20), "a block bitmap")?;
            let inode_bitmap = in_fs(u64::from(le32(desc, 0x04)) | hi(0x24), "an inode bitmap")?;
            let inode_table = in_fs(u64::from(le32(desc, 0x08)) | hi(0x28), "an inode table")?;
            let free = u64::from(le16(desc, 0x0C)) | hi16(0x2C);
            let flags = le16(desc, 0x12);
            desc_total_free += free;

            let inodes_per_group = u64::from(le32(&sb, 0x28));
            let inode_size = if rev == 0 {
                128
            } else {
                u64::from(le16(&sb, 0x58))
            };
            let itable_blocks = (inodes_per_group * inode_size).div_ceil(bs);
            if inode_table + itable_blocks > blocks_count {
                return no(format!(
                    "group {group}'s inode table runs past the end of the filesystem"
                ));
            }
            used.add(block_bitmap * bs, bs);
            used.add(inode_bitmap * bs, bs);
            used.add(inode_table * bs, itable_blocks * bs);

            let first = g.group_first_block(group);
            let base = g.base_meta_blocks(group).min(g.blocks_in_group(group));
            used.add(first * bs, base * bs);

            // A group whose bitmap was never initialised holds nothing but its base metadata
            // (ext4_init_block_bitmap) and metadata placed in it, all added above.
            if flags & BG_BLOCK_UNINIT != 0 && (g.has(RO_GDT_CSUM) || csum) {
                uninit_groups += 1;
                continue;
            }
            let bitmap = d.read(fs, block_bitmap * bs, bs, "a block bitmap")?;
            let group_clusters = g.blocks_in_group(group).div_ceil(blocks_per_cluster);
            if csum {
                check_bitmap_csum(&g, fs, group, desc, &bitmap)?;
            }
            let mut used_clusters = 0u64;
            let base_byte = first * bs;
            set_runs(&bitmap, group_clusters, |c, n| {
                used_clusters += n;
                bitmap_ranges.add(base_byte + c * cluster_size, n * cluster_size);
            });
            let bitmap_free = group_clusters - used_clusters;
            if bitmap_free != free {
                return no(format!(
                    "group {group}'s bitmap has {bitmap_free} free clusters, its descriptor says {free}"
                ));
            }
        }
    }
    // The superblock count is updated lazily while mounted, but exact after a clean unmount (and
    // RECOVER is refused above). Uninitialised groups' counts are the descriptors' own.
    let free_clusters = free_blocks / blocks_per_cluster;
    if desc_total_free != free_clusters {
        return no(format!(
            "the group descriptors count {desc_total_free} free clusters, the superblock {free_clusters}"
        ));
    }
    // Superblock backups and their descriptor copies: in the base metadata of each group, added
    // above. Bitmap runs are ascending within a group; `used` sorts everything at the end.
    for (o, l) in bitmap_ranges.finish(u64::MAX) {
        used.add(o, l);
    }
    let mut features = Vec::new();
    if g.incompat & INCOMPAT_FLEX_BG != 0 {
        features.push("flex_bg");
    }
    if g.meta_bg() {
        features.push("meta_bg");
    }
    if bits64 {
        features.push("64bit");
    }
    if csum {
        features.push("metadata_csum");
    } else if g.has(RO_GDT_CSUM) {
        features.push("uninit_bg");
    }
    if bigalloc {
        features.push("bigalloc");
    }
    Ok(FsMap {
        fs,
        ranges: used,
        fs_end,
        note: format!(
            "{groups} groups of {blocks_per_group} blocks of {block_size} bytes ({uninit_groups} uninitialised){}{}",
            if features.is_empty() { "" } else { "; " },
            features.join(", ")
        ),
    })
}

/// ext4_group_desc_csum: crc32c (metadata_csum) or crc16 (uninit_bg / gdt_csum) over the
/// descriptor with its checksum field left out.
fn check_desc_csum(
    g: &Geometry,
    fs: &'static str,
    group: u64,
    desc: &[u8],
    uuid: &[u8],
) -> Result<(), Doubt> {
    const CSUM_AT: usize = 0x1E;
    let want = le16(desc, CSUM_AT);
    let le_group = (group as u32).to_le_bytes();
    let got = if g.has(RO_METADATA_CSUM) {
        let mut c = crc32c_raw(g.csum_seed, &le_group);
        c = crc32c_raw(c, &desc[..CSUM_AT]);
        c = crc32c_raw(c, &[0, 0]);
        c = crc32c_raw(c, &desc[CSUM_AT + 2..]);
        (c & 0xFFFF) as u16
    } else if g.has(RO_GDT_CSUM) {
        let mut c = crc16(!0, uuid);
        c = crc16(c, &le_group);
        c = crc16(c, &desc[..CSUM_AT]);
        if desc.len() > CSUM_AT + 2 {
            c = crc16(c, &desc[CSUM_AT + 2..]);
        }
        c
    } else {
        return Ok(());
    };
    if want != got {
        return doubt(
            fs,
            format!("group {group}'s descriptor checksum mismatch (stored {want:#06x}, computed {got:#06x})"),
        );
    }
    Ok(())
}

/// ext4_block_bitmap_csum_verify: crc32c over clusters_per_group / 8 bytes of the bitmap, the
/// high 16 bits stored only in descriptors large enough to hold them.
fn check_bitmap_csum(
    g: &Geometry,
    fs: &'static str,
    group: u64,
    desc: &[u8],
    bitmap: &[u8],
) -> Result<(), Doubt> {
    const HI_END: u64 = 0x3A;
    let len = (g.clusters_per_group / 8) as usize;
    let mut got = crc32c_raw(g.csum_seed, &bitmap[..len.min(bitmap.len())]);
    let mut want = u32::from(le16(desc, 0x18));
    if g.desc_size >= HI_END {
        want |= u32::from(le16(desc, 0x38)) << 16;
    } else {
        got &= 0xFFFF;
    }
    if want != got {
        return doubt(
            fs,
            format!("group {group}'s block bitmap checksum mismatch (stored {want:#x}, computed {got:#x})"),
        );
    }
    Ok(())
}

/// The CRC-16 (polynomial 0x8005, reflected) of lib/crc16.c, which uninit_bg descriptors use.
fn crc16(mut crc: u16, data: &[u8]) -> u16 {
    for &b in data {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_super_groups() {
        let g = Geometry {
            block_size: 4096,
            blocks_count: 1 << 30,
            first_data_block: 0,
            blocks_per_group: 32768,
            clusters_per_group: 32768,
            desc_size: 64,
            descs_per_block: 64,
            gdb_count: 512,
            reserved_gdt: 0,
            first_meta_bg: 0,
            incompat: 0,
            ro: RO_SPARSE_SUPER,
            compat: 0,
            backup_bgs: [0, 0],
            csum_seed: 0,
        };
        let with: Vec<u64> = (0..100).filter(|&n| g.has_super(n)).collect();
        assert_eq!(with, vec![0, 1, 3, 5, 7, 9, 25, 27, 49, 81]);
    }

    #[test]
    fn crc16_known_value() {
        // CRC-16/ARC of "123456789" is 0xBB3D (init 0).
        assert_eq!(crc16(0, b"123456789"), 0xBB3D);
    }
}
