//! FAT12/16/32: the file allocation table.
//!
//! Layout and type rules from Microsoft's "FAT: General Overview of On-Disk Format" (fatgen103:
//! BPB fields, the cluster-count rule for FAT12/16/32, the clean-shutdown bits in FAT[1]) and the
//! Linux driver's fs/fat/inode.c (the BPB state byte with FAT_STATE_DIRTY).
//!
//! Used: the reserved sectors (boot sector, FSInfo, backup boot sector), every FAT copy, the FAT12/16
//! root directory, and every cluster whose FAT entry is not zero (chained, end of chain or bad).
//! The copies must agree (unless FAT32 mirroring is off, when only the active one counts).

use super::{doubt, le16, le32, Disk, Doubt, FsMap, Ranges};

pub(super) fn detect(d: &Disk) -> bool {
    let Some(b) = d.peek(0, 512) else {
        return false;
    };
    looks_like_fat(&b)
}

fn looks_like_fat(b: &[u8]) -> bool {
    let jump = b[0] == 0xEB && b[2] == 0x90 || b[0] == 0xE9;
    let bps = le16(b, 11);
    let spc = b[13];
    jump && b[510] == 0x55
        && b[511] == 0xAA
        && &b[3..11] != b"NTFS    "
        && &b[3..11] != b"EXFAT   "
        && matches!(bps, 512 | 1024 | 2048 | 4096)
        && spc.is_power_of_two()
        && le16(b, 14) >= 1
        && b[16] >= 1
}

const FS: &str = "vfat";

pub(super) fn read(d: &Disk) -> Result<FsMap, Doubt> {
    let b = d.read(FS, 0, 512, "the boot sector")?;
    if !looks_like_fat(&b) {
        return doubt(FS, "the boot sector changed while it was read");
    }
    let bps = u64::from(le16(&b, 11));
    let spc = u64::from(b[13]);
    let reserved = u64::from(le16(&b, 14));
    let nfats = u64::from(b[16]);
    let root_entries = u64::from(le16(&b, 17));
    let total16 = u64::from(le16(&b, 19));
    let fatsz16 = u64::from(le16(&b, 22));
    let total32 = u64::from(le32(&b, 32));
    let fatsz32 = u64::from(le32(&b, 36));
    let total = if total16 != 0 { total16 } else { total32 };
    let fatsz = if fatsz16 != 0 { fatsz16 } else { fatsz32 };
    if total == 0 || fatsz == 0 {
        return doubt(FS, "the boot sector gives no sector count or FAT size");
    }
    let root_sectors = (root_entries * 32).div_ceil(bps);
    let data_start = reserved + nfats * fatsz + root_sectors;
    if data_start >= total {
        return doubt(
            FS,
            format!("the FATs and root directory ({data_start} sectors) fill the whole volume ({total})"),
        );
    }
    let clusters = (total - data_start) / spc;
    let (bits, name) = if clusters < 4085 {
        (12u64, "FAT12")
    } else if clusters < 65525 {
        (16, "FAT16")
    } else {
        (32, "FAT32")
    };
    if bits == 32 && (root_entries != 0 || fatsz16 != 0) {
        return doubt(
            FS,
            "a FAT32 volume with a FAT12/16 root directory or FAT size",
        );
    }
    if bits != 32 && root_entries == 0 {
        return doubt(FS, format!("a {name} volume without a root directory"));
    }
    let fs_end = total * bps;
    if fs_end > d.size {
        return doubt(
            FS,
            format!(
                "the volume ({fs_end} bytes) is larger than the source ({} bytes)",
                d.size
            ),
        );
    }
    let entries = clusters + 2;
    let fat_bytes = fatsz * bps;
    if fat_bytes * 8 < entries * bits {
        return doubt(
            FS,
            format!("the FAT ({fat_bytes} bytes) is too small for {clusters} clusters"),
        );
    }
    // The Linux driver's "dirty" state byte (fs/fat/inode.c, FAT_STATE_DIRTY).
    let state = if bits == 32 { b[65] } else { b[37] };
    if state & 1 != 0 {
        return doubt(
            FS,
            "the volume is marked dirty (mounted, or not cleanly unmounted)",
        );
    }
    // FAT32 may turn mirroring off and name one active FAT; the others are then stale.
    let ext_flags = if bits == 32 { le16(&b, 40) } else { 0 };
    let (first_fat, compared) = if ext_flags & 0x80 != 0 {
        let active = u64::from(ext_flags & 0xF);
        if active >= nfats {
            return doubt(FS, format!("active FAT {active} of {nfats}"));
        }
        (active, 1)
    } else {
        (0, nfats)
    };

    let cluster_bytes = spc * bps;
    let data_byte = data_start * bps;
    let mut used = Ranges::new();
    used.add(0, data_byte);
    let eoc_min = match bits {
        12 => 0xFF8,
        16 => 0xFFF8,
        _ => 0x0FFF_FFF8,
    };
    let bad = eoc_min - 1;
    let mut used_clusters = 0u64;

    // Stream the FAT in pieces (whole entries; FAT12 is at most 6 KiB and read at once).
    let needed = (entries * bits).div_ceil(8);
    let piece = if bits == 12 { needed } else { 1 << 20 };
    let fat_at = |n: u64| (reserved + n * fatsz) * bps;
    let mut off = 0u64;
    while off < needed {
        let len = piece.min(needed - off);
        let chunk = d.read(FS, fat_at(first_fat) + off, len, "the FAT")?;
        for n in 1..compared {
            let other = d.read(FS, fat_at(n) + off, len, "a FAT copy")?;
            if other != chunk {
                return doubt(
                    FS,
                    format!(
                        "FAT copy {} disagrees with FAT 1 near byte {off} of the FAT",
                        n + 1
                    ),
                );
            }
        }
        let first_entry = off * 8 / bits;
        let count = (len * 8 / bits).min(entries - first_entry);
        for i in 0..count {
            let e = first_entry + i;
            let v = match bits {
                12 => {
                    let at = (e * 3 / 2) as usize;
                    let w = le16(&chunk, at);
                    u64::from(if e & 1 == 0 { w & 0xFFF } else { w >> 4 })
                }
                16 => u64::from(le16(&chunk, (i * 2) as usize)),
                _ => u64::from(le32(&chunk, (i * 4) as usize) & 0x0FFF_FFFF),
            };
            if e == 1 {
                // Clean-shutdown and no-error bits of FAT[1] (FAT16 0x8000/0x4000, FAT32
                // 0x08000000/0x04000000); FAT12 has none.
                let (clean, ok) = match bits {
                    16 => (0x8000, 0x4000),
                    32 => (0x0800_0000, 0x0400_0000),
                    _ => (0, 0),
                };
                if v & clean != clean {
                    return doubt(
                        FS,
                        "the FAT's clean-shutdown bit is clear (not cleanly unmounted)",
                    );
                }
                if v & ok != ok {
                    return doubt(
                        FS,
                        "the FAT's hard-error bit is set (an I/O error was seen)",
                    );
                }
                continue;
            }
            if e < 2 || v == 0 {
                continue;
            }
            if v == 1 || (v >= entries && v < bad) {
                return doubt(FS, format!("cluster {e} has an invalid FAT entry {v:#x}"));
            }
            used_clusters += 1;
            used.add(data_byte + (e - 2) * cluster_bytes, cluster_bytes);
        }
        off += len;
    }
    let mut note =
        format!("{name}, {clusters} clusters of {cluster_bytes} bytes, {used_clusters} used");
    if bits == 32 {
        // FSInfo's free count is a hint the specification allows to be wrong: reported, not trusted.
        let fsinfo = u64::from(le16(&b, 48));
        if fsinfo != 0 && fsinfo < reserved {
            let fi = d.read(FS, fsinfo * bps, 512, "the FSInfo sector")?;
            let free = le32(&fi, 488);
            if le32(&fi, 0) == 0x4161_5252
                && free != 0xFFFF_FFFF
                && u64::from(free) != clusters - used_clusters
            {
                note.push_str(&format!(" (FSInfo's free-count hint says {free})"));
            }
        }
    }
    Ok(FsMap {
        fs: FS,
        ranges: used,
        fs_end,
        note,
    })
}
