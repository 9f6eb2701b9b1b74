//! xfs: the free-space B+tree by block number (bnobt) of each allocation group.
//!
//! Layouts from xfsprogs' libxfs/xfs_format.h (struct xfs_dsb, xfs_agf, xfs_btree_block short form,
//! xfs_alloc_rec, feature bits), xfs_log_format.h (xlog_rec_header, xlog_op_header,
//! XLOG_UNMOUNT_TRANS) and the kernel's fs/xfs/xfs_log_recover.c (xlog_find_head's cycle search and
//! xlog_check_unmount_rec: a log is clean when its last record is a lone unmount record that ends
//! at the head).
//!
//! Used: in each AG, everything that is not a free extent of the bnobt (so the superblock, AGF,
//! AGI, AGFL, every btree and inode chunk, the internal log, and the AGFL's reserve blocks are
//! all used), plus the internal log explicitly. Free counts are cross-checked: the records against
//! each AGF's freeblks and longest, and the AGFs against the superblock's fdblocks.

use super::{be16, be32, be64, crc32c_raw, doubt, Disk, Doubt, FsMap, Ranges};

const FS: &str = "xfs";
const SB_CRC_OFF: usize = 224;
const AGF_CRC_OFF: usize = 216;
const BT_CRC_OFF: usize = 52;

// sb_features_incompat (v5)
const INCOMPAT_FTYPE: u32 = 1 << 0;
const INCOMPAT_SPINODES: u32 = 1 << 1;
const INCOMPAT_META_UUID: u32 = 1 << 2;
const INCOMPAT_BIGTIME: u32 = 1 << 3;
const INCOMPAT_NEEDSREPAIR: u32 = 1 << 4;
const INCOMPAT_NREXT64: u32 = 1 << 5;
const INCOMPAT_EXCHRANGE: u32 = 1 << 6;
const INCOMPAT_PARENT: u32 = 1 << 7;
const INCOMPAT_KNOWN: u32 = INCOMPAT_FTYPE
    | INCOMPAT_SPINODES
    | INCOMPAT_META_UUID
    | INCOMPAT_BIGTIME
    | INCOMPAT_NEEDSREPAIR
    | INCOMPAT_NREXT64
    | INCOMPAT_EXCHRANGE
    | INCOMPAT_PARENT;
// sb_features_ro_compat: FINOBT, RMAPBT, REFLINK, INOBTCNT.
const RO_KNOWN: u32 = 0xF;

pub(super) fn detect(d: &Disk) -> bool {
    d.peek(0, 4).is_some_and(|m| &m == b"XFSB")
}

/// xfs stores crc32c with the usual final inversion, little-endian, computed with the field zeroed.
fn crc_ok(buf: &[u8], off: usize) -> bool {
    let mut b = buf.to_vec();
    let stored = u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]]);
    b[off..off + 4].fill(0);
    !crc32c_raw(!0, &b) == stored
}

struct Geo {
    bs: u64,
    v5: bool,
    uuid: [u8; 16],
}

pub(super) fn read(d: &Disk) -> Result<FsMap, Doubt> {
    let sb0 = d.read(FS, 0, 512, "the superblock")?;
    let sectsize = u64::from(be16(&sb0, 102));
    if !(512..=32768).contains(&sectsize) || !sectsize.is_power_of_two() {
        return doubt(FS, format!("implausible sector size {sectsize}"));
    }
    let sb = d.read(FS, 0, sectsize, "the superblock")?;
    let version = be16(&sb, 100) & 0xF;
    let v5 = match version {
        5 => true,
        4 => false,
        v => return doubt(FS, format!("superblock version {v} (4 and 5 are known)")),
    };
    if v5 && !crc_ok(&sb, SB_CRC_OFF) {
        return doubt(FS, "superblock checksum mismatch");
    }
    if sb[126] != 0 {
        return doubt(FS, "mkfs did not finish (sb_inprogress is set)");
    }
    if v5 {
        let incompat = be32(&sb, 216);
        if incompat & INCOMPAT_NEEDSREPAIR != 0 {
            return doubt(FS, "the filesystem needs xfs_repair (needsrepair is set)");
        }
        if incompat & !INCOMPAT_KNOWN != 0 {
            return doubt(
                FS,
                format!(
                    "unknown incompatible feature flags {:#x}",
                    incompat & !INCOMPAT_KNOWN
                ),
            );
        }
        let ro = be32(&sb, 212);
        if ro & !RO_KNOWN != 0 {
            return doubt(
                FS,
                format!(
                    "unknown read-only-compatible feature flags {:#x}",
                    ro & !RO_KNOWN
                ),
            );
        }
        if be32(&sb, 220) != 0 {
            return doubt(
                FS,
                "the log holds incompatible items (log_incompat is set): it needs replay",
            );
        }
    }
    let bs = u64::from(be32(&sb, 4));
    let dblocks = be64(&sb, 8);
    let logstart = be64(&sb, 48);
    let agblocks = u64::from(be32(&sb, 84));
    let agcount = u64::from(be32(&sb, 88));
    let logblocks = u64::from(be32(&sb, 96));
    let agblklog = u32::from(sb[124]);
    let fdblocks = be64(&sb, 144);
    if !(512..=65536).contains(&bs) || !bs.is_power_of_two() || u64::from(be16(&sb, 102)) > bs {
        return doubt(FS, format!("implausible block size {bs}"));
    }
    if agblocks < 16 || agcount == 0 || agblklog > 31 || agblocks > 1 << agblklog {
        return doubt(
            FS,
            format!("implausible allocation groups ({agcount} of {agblocks} blocks)"),
        );
    }
    if dblocks > agcount * agblocks || dblocks <= (agcount - 1) * agblocks {
        return doubt(
            FS,
            format!("{agcount} groups of {agblocks} blocks do not make {dblocks} blocks"),
        );
    }
    let Some(fs_end) = dblocks.checked_mul(bs).filter(|&e| e <= d.size) else {
        return doubt(
            FS,
            format!("the filesystem ({dblocks} blocks of {bs}) is larger than the source"),
        );
    };
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&sb[32..48]);
    let g = Geo { bs, v5, uuid };
    let mut used = Ranges::new();

    // The internal log (logstart 0: external log device).
    if logstart != 0 {
        let agno = logstart >> agblklog;
        let agbno = logstart & ((1u64 << agblklog) - 1);
        let start = (agno * agblocks + agbno) * bs;
        let len = logblocks * bs;
        if agno >= agcount || start.saturating_add(len) > fs_end {
            return doubt(FS, "the internal log lies outside the filesystem");
        }
        check_log_clean(d, start, len)?;
        used.add(start, len);
    }

    let mut total_free = 0u64;
    let mut agfl_and_btree = 0u64;
    for agno in 0..agcount {
        let ag_byte = agno * agblocks * bs;
        let agf = d.read(FS, ag_byte + sectsize, sectsize, "an AGF")?;
        if &agf[..4] != b"XAGF" || be32(&agf, 8) as u64 != agno {
            return doubt(FS, format!("AG {agno}'s AGF has a bad magic or number"));
        }
        if v5 && (!crc_ok(&agf, AGF_CRC_OFF) || agf[64..80] != uuid) {
            return doubt(FS, format!("AG {agno}'s AGF checksum or uuid mismatch"));
        }
        let length = u64::from(be32(&agf, 12));
        let want_len = if agno + 1 == agcount {
            dblocks - agno * agblocks
        } else {
            agblocks
        };
        if length != want_len {
            return doubt(
                FS,
                format!("AG {agno}'s AGF says {length} blocks, the superblock {want_len}"),
            );
        }
        let root = u64::from(be32(&agf, 16));
        let levels = be32(&agf, 28);
        let freeblks = u64::from(be32(&agf, 52));
        let longest = u64::from(be32(&agf, 56));
        agfl_and_btree += u64::from(be32(&agf, 48)) + u64::from(be32(&agf, 60));
        if levels == 0 || levels > 16 || root >= length {
            return doubt(
                FS,
                format!("AG {agno}'s free-space tree has root {root} at {levels} levels"),
            );
        }
        let mut walk = Walk {
            g: &g,
            d,
            agno,
            length,
            next_free: 0,
            free: 0,
            longest: 0,
            visits: 0,
            used: &mut used,
            ag_byte,
        };
        walk.node(root, levels - 1)?;
        let end = walk.next_free;
        walk.used_run(end, length);
        let (free, seen_longest) = (walk.free, walk.longest);
        if free != freeblks || seen_longest != longest {
            return doubt(
                FS,
                format!("AG {agno}'s free-space tree holds {free} free blocks (longest {seen_longest}), its AGF says {freeblks} (longest {longest})"),
            );
        }
        total_free += free;
    }
    if total_free + agfl_and_btree != fdblocks {
        return doubt(
            FS,
            format!(
                "the AGs count {} free blocks, the superblock {fdblocks}",
                total_free + agfl_and_btree
            ),
        );
    }
    Ok(FsMap {
        fs: FS,
        ranges: used,
        fs_end,
        note: format!(
            "v{}, {agcount} AGs of {agblocks} blocks of {bs} bytes, {total_free} blocks free",
            if v5 { 5 } else { 4 }
        ),
    })
}

struct Walk<'a, 'b> {
    g: &'a Geo,
    d: &'a Disk<'b>,
    agno: u64,
    length: u64,
    ag_byte: u64,
    /// The AG block after the last free extent seen: records must ascend strictly past it.
    next_free: u64,
    free: u64,
    longest: u64,
    /// Tree blocks read so far: more than the AG has blocks means a cycle or shared subtrees.
    visits: u64,
    used: &'a mut Ranges,
}

impl Walk<'_, '_> {
    fn used_run(&mut self, from: u64, to: u64) {
        if to > from {
            self.used
                .add(self.ag_byte + from * self.g.bs, (to - from) * self.g.bs);
        }
    }

    fn node(&mut self, agbno: u64, level: u32) -> Result<(), Doubt> {
        let (g, agno) = (self.g, self.agno);
        if agbno == 0 || agbno >= self.length {
            return doubt(
                FS,
                format!("AG {agno}'s free-space tree points at block {agbno}"),
            );
        }
        self.visits += 1;
        if self.visits > self.length {
            return doubt(
                FS,
                format!("AG {agno}'s free-space tree has more blocks than the AG"),
            );
        }
        let b = self.d.read(
            FS,
            self.ag_byte + agbno * g.bs,
            g.bs,
            "a free-space tree block",
        )?;
        let (magic, hdr): (&[u8], usize) = if g.v5 { (b"AB3B", 56) } else { (b"ABTB", 16) };
        if &b[..4] != magic || u32::from(be16(&b, 4)) != level {
            return doubt(
                FS,
                format!("AG {agno}'s free-space tree block {agbno} has a bad magic or level"),
            );
        }
        if g.v5
            && (!crc_ok(&b, BT_CRC_OFF)
                || b[32..48] != g.uuid
                || be64(&b, 16) != (self.ag_byte + agbno * g.bs) / 512
                || u64::from(be32(&b, 48)) != agno)
        {
            return doubt(
                FS,
                format!(
                    "AG {agno}'s free-space tree block {agbno} fails its checksum or owner check"
                ),
            );
        }
        let n = usize::from(be16(&b, 6));
        let max = (b.len() - hdr) / if level == 0 { 8 } else { 12 };
        if n > max {
            return doubt(
                FS,
                format!("AG {agno}'s free-space tree block {agbno} claims {n} records"),
            );
        }
        if level == 0 {
            for i in 0..n {
                let start = u64::from(be32(&b, hdr + i * 8));
                let count = u64::from(be32(&b, hdr + i * 8 + 4));
                if count == 0 || start < self.next_free || start + count > self.length {
                    return doubt(FS, format!("AG {agno}'s free extent {start}+{count} overlaps, is out of order or past the AG"));
                }
                let from = self.next_free;
                self.used_run(from, start);
                self.next_free = start + count;
                self.free += count;
                self.longest = self.longest.max(count);
            }
            return Ok(());
        }
        let ptrs = hdr + max * 8;
        for i in 0..n {
            let child = u64::from(be32(&b, ptrs + i * 4));
            self.node(child, level - 1)?;
        }
        Ok(())
    }
}

const BB: u64 = 512;
const LOG_MAGIC: u32 = 0xFEED_BABE;
const XLOG_UNMOUNT_TRANS: u8 = 0x20;

/// The log is clean when its head record is a lone unmount record that ends exactly at the head
/// (xlog_find_head, xlog_check_unmount_rec); anything else, or anything odd, needs replay.
fn check_log_clean(d: &Disk, start: u64, len: u64) -> Result<(), Doubt> {
    let n = len / BB;
    if n < 8 {
        return doubt(FS, "the internal log is implausibly small");
    }
    let block = |i: u64| d.read(FS, start + (i % n) * BB, BB, "the log");
    let cycle = |b: &[u8]| {
        if be32(b, 0) == LOG_MAGIC {
            be32(b, 4)
        } else {
            be32(b, 0)
        }
    };
    let first = cycle(&block(0)?);
    let last = cycle(&block(n - 1)?);
    let not_clean = || {
        doubt(
            FS,
            "the log is not clean (it needs replay: mounted, or not cleanly unmounted)",
        )
    };
    let head = if first == last {
        if first == 0 {
            // A zeroed log (xfs_repair -L, or never written) has nothing to replay.
            return Ok(());
        }
        n
    } else {
        if first != last.wrapping_add(1) {
            return not_clean();
        }
        // The first block written in the last cycle: blocks before it carry `first`.
        let (mut lo, mut hi) = (0u64, n - 1);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if cycle(&block(mid)?) == first {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        hi
    };
    // The head record: the nearest record header before the head (a record is at most 256 KiB).
    let mut back = 1u64;
    let max_back = n.min(2 * (256 * 1024 / BB) + 64);
    let (rec, hdr) = loop {
        if back > max_back {
            return not_clean();
        }
        let i = (head + n - back) % n;
        let b = block(i)?;
        if be32(&b, 0) == LOG_MAGIC {
            break (i, b);
        }
        back += 1;
    };
    let version = be32(&hdr, 8);
    let rec_len = u64::from(be32(&hdr, 12));
    let num_logops = be32(&hdr, 40);
    let h_size = u64::from(be32(&hdr, 320));
    let hblks = if version & 2 != 0 && h_size > 32 * 1024 {
        h_size.div_ceil(32 * 1024)
    } else {
        1
    };
    if num_logops != 1 || (rec + hblks + rec_len.div_ceil(BB)) % n != head % n {
        return not_clean();
    }
    let op = block(rec + hblks)?;
    if op[9] & XLOG_UNMOUNT_TRANS == 0 {
        return not_clean();
    }
    Ok(())
}
