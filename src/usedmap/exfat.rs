//! exFAT: the allocation bitmap.
//!
//! Layout from Microsoft's "exFAT file system specification" (section 3.1 Main Boot Sector, 3.4
//! Main and Backup Boot Checksum, 4 File Allocation Table, 7.1 Allocation Bitmap Directory Entry,
//! 7.2 Up-case Table Directory Entry) and the Linux driver's fs/exfat/exfat_raw.h.
//!
//! The bitmap, not the FAT, says which clusters are allocated (a contiguous file has no FAT chain).
//! Used: the boot regions, the FAT(s) and everything up to the cluster heap, plus every cluster the
//! bitmap marks (the bitmap, the up-case table and the root directory are themselves marked; their
//! chains are added as well).

use super::{doubt, le16, le32, le64, set_runs, Disk, Doubt, FsMap, Ranges};

const FS: &str = "exfat";
const VOLUME_DIRTY: u16 = 0x2;
const MEDIA_FAILURE: u16 = 0x4;
const ENTRY_BITMAP: u8 = 0x81;
const ENTRY_UPCASE: u8 = 0x82;

pub(super) fn detect(d: &Disk) -> bool {
    d.peek(3, 8).is_some_and(|m| &m == b"EXFAT   ")
}

struct Vol<'a> {
    d: &'a Disk<'a>,
    cluster: u64,
    fat_byte: u64,
    heap_byte: u64,
    clusters: u64,
}

impl Vol<'_> {
    fn cluster_byte(&self, c: u64) -> Result<u64, Doubt> {
        if c < 2 || c >= self.clusters + 2 {
            return doubt(FS, format!("cluster {c} is outside the cluster heap"));
        }
        Ok(self.heap_byte + (c - 2) * self.cluster)
    }

    /// The clusters of a FAT chain from `first`: exactly enough for `len` bytes when the length is
    /// known, else up to the end-of-chain mark (at most `max_bytes`). A loop, a free entry inside
    /// the chain or a chain of the wrong length is a doubt.
    fn chain(
        &self,
        first: u64,
        len: Option<u64>,
        max_bytes: u64,
        what: &str,
    ) -> Result<Vec<u64>, Doubt> {
        let want = len.map(|l| l.div_ceil(self.cluster).max(1));
        let cap = want
            .unwrap_or_else(|| max_bytes.div_ceil(self.cluster))
            .min(self.clusters);
        let mut out = Vec::new();
        let mut c = first;
        loop {
            self.cluster_byte(c)?;
            out.push(c);
            if Some(out.len() as u64) == want {
                return Ok(out);
            }
            if out.len() as u64 >= cap {
                return doubt(
                    FS,
                    format!("the {what}'s cluster chain is longer than it can be"),
                );
            }
            let e = self.d.read(FS, self.fat_byte + c * 4, 4, "the FAT")?;
            match u64::from(le32(&e, 0)) {
                0xFFFF_FFFF if want.is_none() => return Ok(out),
                0xFFFF_FFFF => {
                    return doubt(
                        FS,
                        format!("the {what}'s cluster chain ends before its length"),
                    )
                }
                0 | 0xFFFF_FFF7 => {
                    return doubt(
                        FS,
                        format!("the {what}'s cluster chain hits a free or bad cluster"),
                    )
                }
                next => c = next,
            }
        }
    }
}

/// Section 3.4: the boot checksum over sectors 0..11, skipping VolumeFlags and PercentInUse.
fn boot_checksum(region: &[u8], bps: usize) -> u32 {
    let mut sum = 0u32;
    for (i, &b) in region[..11 * bps].iter().enumerate() {
        if i == 106 || i == 107 || i == 112 {
            continue;
        }
        sum = sum.rotate_right(1).wrapping_add(u32::from(b));
    }
    sum
}

pub(super) fn read(d: &Disk) -> Result<FsMap, Doubt> {
    let b = d.read(FS, 0, 512, "the boot sector")?;
    if b[11..64].iter().any(|&x| x != 0) {
        return doubt(FS, "the boot sector's legacy BPB area is not zero");
    }
    if b[510] != 0x55 || b[511] != 0xAA {
        return doubt(FS, "the boot sector lacks its 0x55AA signature");
    }
    let bps_shift = u32::from(b[108]);
    let spc_shift = u32::from(b[109]);
    if !(9..=12).contains(&bps_shift) || spc_shift > 25 - bps_shift {
        return doubt(
            FS,
            format!("implausible sector or cluster size shifts {bps_shift}, {spc_shift}"),
        );
    }
    let bps = 1u64 << bps_shift;
    let region = d.read(FS, 0, 12 * bps, "the main boot region")?;
    let sum = boot_checksum(&region, bps as usize);
    let stored = &region[11 * bps as usize..];
    if stored
        .chunks(4)
        .any(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) != sum)
    {
        return doubt(FS, "the main boot region's checksum does not match");
    }
    let volume_length = le64(&b, 72);
    let fat_offset = u64::from(le32(&b, 80));
    let fat_length = u64::from(le32(&b, 84));
    let heap_offset = u64::from(le32(&b, 88));
    let clusters = u64::from(le32(&b, 92));
    let root = u64::from(le32(&b, 96));
    let revision = le16(&b, 104);
    let flags = le16(&b, 106);
    let nfats = u64::from(b[110]);
    if revision >> 8 != 1 {
        return doubt(
            FS,
            format!(
                "file system revision {}.{} (only 1.x is known)",
                revision >> 8,
                revision & 0xFF
            ),
        );
    }
    if flags & VOLUME_DIRTY != 0 {
        return doubt(
            FS,
            "the volume is marked dirty (mounted, or not cleanly unmounted)",
        );
    }
    if flags & MEDIA_FAILURE != 0 {
        return doubt(FS, "the volume records a media failure");
    }
    if nfats != 1 {
        // TexFAT's second FAT and bitmap, and which of them is active, are not read here.
        return doubt(
            FS,
            format!("{nfats} FATs (only the single-FAT layout is read)"),
        );
    }
    let cluster = bps << spc_shift;
    if fat_offset < 24
        || heap_offset < fat_offset + fat_length
        || fat_length * bps < (clusters + 2) * 4
        || (heap_offset + clusters * (1 << spc_shift)) > volume_length
    {
        return doubt(FS, "the FAT and cluster heap do not fit the volume");
    }
    let fs_end = volume_length.checked_mul(bps).filter(|&e| e <= d.size);
    let Some(fs_end) = fs_end else {
        return doubt(
            FS,
            format!("the volume ({volume_length} sectors) is larger than the source"),
        );
    };
    let v = Vol {
        d,

        cluster,
        fat_byte: fat_offset * bps,
        heap_byte: heap_offset * bps,
        clusters,
    };
    let mut used = Ranges::new();
    used.add(0, v.heap_byte);

    // The root directory: find the allocation bitmap and up-case table entries.
    let root_chain = v.chain(root, None, 256 << 20, "root directory")?;
    let mut bitmap = None;
    let mut upcase = None;
    'dir: for &c in &root_chain {
        let at = v.cluster_byte(c)?;
        used.add(at, cluster);
        let data = d.read(FS, at, cluster, "the root directory")?;
        for e in data.chunks(32) {
            match e[0] {
                0 => break 'dir,
                ENTRY_BITMAP => {
                    if e[1] & 1 != 0 {
                        return doubt(FS, "a second allocation bitmap (TexFAT)");
                    }
                    if bitmap.is_some() {
                        return doubt(FS, "two allocation bitmap entries");
                    }
                    bitmap = Some((u64::from(le32(e, 20)), le64(e, 24)));
                }
                ENTRY_UPCASE => upcase = Some((u64::from(le32(e, 20)), le64(e, 24))),
                _ => {}
            }
        }
    }
    let Some((bm_first, bm_len)) = bitmap else {
        return doubt(FS, "no allocation bitmap entry in the root directory");
    };
    if bm_len < clusters.div_ceil(8) {
        return doubt(
            FS,
            format!("the allocation bitmap ({bm_len} bytes) is too short for {clusters} clusters"),
        );
    }
    if let Some((first, len)) = upcase {
        for c in v.chain(first, Some(len.max(1)), 0, "up-case table")? {
            used.add(v.cluster_byte(c)?, cluster);
        }
    }
    let bm_chain = v.chain(bm_first, Some(bm_len), 0, "allocation bitmap")?;
    let mut bits_done = 0u64;
    let mut used_clusters = 0u64;
    let mut runs = Ranges::new();
    for &c in &bm_chain {
        let at = v.cluster_byte(c)?;
        used.add(at, cluster);
        if bits_done >= clusters {
            continue;
        }
        let data = d.read(FS, at, cluster, "the allocation bitmap")?;
        let n = (clusters - bits_done).min(cluster * 8);
        let heap = v.heap_byte;
        set_runs(&data, n, |s, l| {
            used_clusters += l;
            runs.add(heap + (bits_done + s) * cluster, l * cluster);
        });
        bits_done += n;
    }
    for (o, l) in runs.finish(u64::MAX) {
        used.add(o, l);
    }
    Ok(FsMap {
        fs: FS,
        ranges: used,
        fs_end,
        note: format!("{clusters} clusters of {cluster} bytes, {used_clusters} used"),
    })
}
