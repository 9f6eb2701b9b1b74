//! Partition tables: reading MBR and GPT (with the `gptman` and `mbrman` crates) into the record a
//! whole-disk image keeps in its manifest, and fitting a restored table to a drive of another size:
//! the GPT backup header and backup partition array moved to the new last LBA with CRCs recomputed,
//! the protective MBR's size fixed, optionally the last partition grown to the end of the drive.
//!
//! Everything read here is untrusted (a disk or an image of one): header fields are checked before
//! they size an allocation or a read, and a table cairn does not understand is reported as such,
//! never guessed at.

use crate::device::{DeviceInfo, Kind};
use crate::progress::human_bytes;
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};

pub use crate::format::TableKind;
use crate::format::{PartitionRecord, PartitionTableRecord};

/// A disk's partition table as read from a disk or an image of one. A manifest keeps it as a
/// [`PartitionTableRecord`] (docs/format.md, `partition_table`); the two convert losslessly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionTable {
    pub kind: TableKind,
    /// Logical sector size the table's LBAs are counted in.
    pub sector_size: u32,
    /// GPT: the disk GUID. MBR: the 32-bit disk signature as 8 hex digits.
    pub disk_id: String,
    /// GPT only: the usable LBA range and the number of entries in the partition array.
    pub first_usable_lba: Option<u64>,
    pub last_usable_lba: Option<u64>,
    pub entries: Option<u32>,
    pub partitions: Vec<Partition>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// The kernel's partition number (GPT: entry number; MBR: 1-4 primary, 5+ logical).
    pub number: u32,
    /// Byte offset of the first byte.
    pub start: u64,
    /// Bytes.
    pub size: u64,
    /// GPT: partition type GUID. MBR: type byte as `0x83`.
    pub type_id: String,
    pub type_name: Option<String>,
    /// GPT partition name.
    pub name: Option<String>,
    /// GPT unique partition GUID (the PARTUUID).
    pub uuid: Option<String>,
    /// MBR: the active flag.
    pub bootable: bool,
    /// MBR: an extended partition (a container of logical partitions).
    pub extended: bool,
}

impl From<PartitionTableRecord> for PartitionTable {
    fn from(r: PartitionTableRecord) -> Self {
        PartitionTable {
            kind: r.kind,
            sector_size: r.sector_size,
            disk_id: r.disk_id,
            first_usable_lba: r.first_usable_lba,
            last_usable_lba: r.last_usable_lba,
            entries: r.entries,
            partitions: r.partitions.into_iter().map(Partition::from).collect(),
        }
    }
}

impl From<PartitionTable> for PartitionTableRecord {
    fn from(t: PartitionTable) -> Self {
        PartitionTableRecord {
            kind: t.kind,
            sector_size: t.sector_size,
            disk_id: t.disk_id,
            first_usable_lba: t.first_usable_lba,
            last_usable_lba: t.last_usable_lba,
            entries: t.entries,
            partitions: t
                .partitions
                .into_iter()
                .map(PartitionRecord::from)
                .collect(),
        }
    }
}

impl From<PartitionRecord> for Partition {
    fn from(r: PartitionRecord) -> Self {
        Partition {
            number: r.number,
            start: r.start,
            size: r.size,
            type_id: r.type_id,
            type_name: r.type_name,
            name: r.name,
            uuid: r.uuid,
            bootable: r.bootable,
            extended: r.extended,
        }
    }
}

impl From<Partition> for PartitionRecord {
    fn from(p: Partition) -> Self {
        PartitionRecord {
            number: p.number,
            start: p.start,
            size: p.size,
            type_id: p.type_id,
            type_name: p.type_name,
            name: p.name,
            uuid: p.uuid,
            bootable: p.bootable,
            extended: p.extended,
        }
    }
}

impl Partition {
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.size)
    }
}

impl PartitionTable {
    pub fn partition(&self, number: u32) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.number == number)
    }

    /// GPT: sectors taken by one copy of the partition entry array.
    pub fn array_sectors(&self) -> u64 {
        let entries = u64::from(self.entries.unwrap_or(128));
        (entries * GPT_ENTRY_SIZE).div_ceil(u64::from(self.sector_size))
    }

    /// Byte offset where the partitions end: the end of the last one (0 without partitions).
    pub fn partitions_end(&self) -> u64 {
        self.partitions
            .iter()
            .map(Partition::end)
            .max()
            .unwrap_or(0)
    }

    /// True when `[start, end)` lies inside one partition.
    pub fn inside_partition(&self, start: u64, end: u64) -> bool {
        self.partitions
            .iter()
            .any(|p| p.start <= start && end <= p.end())
    }

    /// One line per partition, for `list` and `show`.
    pub fn describe(&self) -> Vec<String> {
        let mut out = vec![format!(
            "{} partition table, {}-byte sectors, disk id {}, {} partition(s)",
            self.kind.as_str().to_uppercase(),
            self.sector_size,
            self.disk_id,
            self.partitions.len()
        )];
        let ss = u64::from(self.sector_size.max(1));
        for p in &self.partitions {
            let mut l = format!(
                "  {:>3}  start {:>12} (LBA {:>10})  size {:>12}  {}",
                p.number,
                p.start,
                p.start / ss,
                human_bytes(p.size),
                p.type_name.as_deref().unwrap_or(&p.type_id)
            );
            if let Some(n) = &p.name {
                l.push_str(&format!("  name {n:?}"));
            }
            if let Some(u) = &p.uuid {
                l.push_str(&format!("  partuuid {u}"));
            }
            if p.bootable {
                l.push_str("  bootable");
            }
            out.push(l);
        }
        out
    }
}

const GPT_ENTRY_SIZE: u64 = 128;
use crate::format::table::MAX_GPT_ENTRIES;

/// The table of a whole disk or disk-image file, for a backup's manifest: None for a partition, a
/// disk without a table, or one cairn cannot read (said in a warning; the backup goes on, since the
/// table is inside the image anyway).
pub fn for_backup(info: &DeviceInfo) -> Option<PartitionTableRecord> {
    if info.kind == Kind::Partition {
        return None;
    }
    let result = File::open(&info.path)
        .with_context(|| format!("cannot open {}", info.path.display()))
        .and_then(|mut f| Ok(read(&mut f, info.size, info.logical_sector_size)?));
    // A table the manifest loader would refuse is not recorded: the image must stay readable.
    let result = result.and_then(|t| {
        let record = t.map(PartitionTableRecord::from);
        if let Some(r) = &record {
            r.validate(info.size)?;
        }
        Ok(record)
    });
    match result {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(
                "{}: partition table not recorded: {e:#}",
                info.path.display()
            );
            None
        }
    }
}

/// Why a partition table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The bytes themselves could not be read (a failing disk, a damaged image): nothing is known
    /// about the table.
    #[error("{0:#}")]
    Io(anyhow::Error),
    /// The bytes were read, but they hold a table cairn does not accept (damaged or odd).
    #[error("{0:#}")]
    Table(anyhow::Error),
}

/// Reads the partition table of a disk of `size` bytes: GPT (at `sector_size`, else the other of
/// 512/4096, as image files do not say), else MBR. Ok(None) when there is none. Any read error is
/// [`ReadError::Io`], even one a parser would have taken for "no table here".
pub fn read<R: Read + Seek>(
    r: &mut R,
    size: u64,
    sector_size: u32,
) -> Result<Option<PartitionTable>, ReadError> {
    let mut watched = ErrorWatch {
        inner: r,
        first_error: None,
    };
    let result = read_table(&mut watched, size, sector_size);
    match watched.first_error {
        Some(e) => Err(ReadError::Io(
            anyhow!(e).context("reading the partition table failed"),
        )),
        None => result.map_err(ReadError::Table),
    }
}

/// Remembers the first error of the reader it wraps: the parsers turn some read errors into
/// "no table" or into format errors, which must not hide an unreadable disk or image.
struct ErrorWatch<'a, R> {
    inner: &'a mut R,
    first_error: Option<std::io::Error>,
}

impl<R> ErrorWatch<'_, R> {
    fn watch<T>(&mut self, r: std::io::Result<T>) -> std::io::Result<T> {
        r.map_err(|e| {
            let copy = std::io::Error::new(e.kind(), e.to_string());
            self.first_error.get_or_insert(e);
            copy
        })
    }
}

impl<R: Read> Read for ErrorWatch<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let r = self.inner.read(buf);
        self.watch(r)
    }
}

impl<R: Seek> Seek for ErrorWatch<'_, R> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        let r = self.inner.seek(pos);
        self.watch(r)
    }
}

fn read_table<R: Read + Seek>(
    r: &mut R,
    size: u64,
    sector_size: u32,
) -> Result<Option<PartitionTable>> {
    use crate::format::{MAX_SECTOR_SIZE, MIN_SECTOR_SIZE};
    if !sector_size.is_power_of_two() || !(MIN_SECTOR_SIZE..=MAX_SECTOR_SIZE).contains(&sector_size)
    {
        bail!("cannot read a partition table in {sector_size}-byte sectors: not a power of two from {MIN_SECTOR_SIZE} to {MAX_SECTOR_SIZE}");
    }
    let mut lba0 = [0u8; 512];
    if size < 512 {
        return Ok(None);
    }
    r.seek(SeekFrom::Start(0))?;
    r.read_exact(&mut lba0).context("reading sector 0")?;
    let signed = lba0[510] == 0x55 && lba0[511] == 0xaa;
    let protective = signed && (0..4).any(|i| lba0[446 + 16 * i + 4] == 0xee);
    let mut sizes = vec![u64::from(sector_size)];
    for s in [512u64, 4096] {
        if !sizes.contains(&s) {
            sizes.push(s);
        }
    }
    let mut gpt_err = None;
    for ss in sizes {
        match read_gpt(r, size, ss) {
            Ok(Some(t)) => return Ok(Some(t)),
            Ok(None) => {}
            Err(e) => gpt_err = Some(e),
        }
    }
    if let Some(e) = gpt_err {
        return Err(e);
    }
    if protective {
        bail!("sector 0 holds a protective MBR but no valid GPT header was found");
    }
    if !signed {
        return Ok(None);
    }
    read_mbr(r, &lba0, size, sector_size)
}

/// Runs a parser on untrusted bytes, turning a panic inside it (the crates assert on some
/// malformed tables, e.g. a used partition at LBA 0) into an error, without the panic message.
fn no_panic<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    r.unwrap_or_else(|_| Err(anyhow!("malformed partition table (the parser gave up)")))
}

/// Checks the raw header at `lba` enough that gptman can be trusted with it.
fn gpt_header_plausible<R: Read + Seek>(r: &mut R, lba: u64, ss: u64) -> Result<Option<()>> {
    let mut h = [0u8; 92];
    r.seek(SeekFrom::Start(lba * ss))?;
    if r.read_exact(&mut h).is_err() {
        return Ok(None);
    }
    if &h[0..8] != b"EFI PART" {
        return Ok(None);
    }
    let entries = u32::from_le_bytes(h[80..84].try_into().expect("4 bytes"));
    let entry_size = u32::from_le_bytes(h[84..88].try_into().expect("4 bytes"));
    if u64::from(entry_size) != GPT_ENTRY_SIZE {
        bail!("GPT at LBA {lba} has {entry_size}-byte partition entries; cairn handles 128-byte entries only");
    }
    if entries == 0 || entries > MAX_GPT_ENTRIES {
        bail!("GPT at LBA {lba} claims {entries} partition entries (damaged header)");
    }
    Ok(Some(()))
}

fn read_gpt<R: Read + Seek>(r: &mut R, size: u64, ss: u64) -> Result<Option<PartitionTable>> {
    if size < 3 * ss {
        return Ok(None);
    }
    let primary = gpt_header_plausible(r, 1, ss)?;
    let backup = if primary.is_none() {
        gpt_header_plausible(r, size / ss - 1, ss)?
    } else {
        None
    };
    if primary.is_none() && backup.is_none() {
        return Ok(None);
    }
    let gpt = no_panic(|| gptman::GPT::read_from(r, ss).map_err(|e| anyhow!("invalid GPT: {e}")))?;
    if primary.is_none() {
        tracing::warn!("the primary GPT header is damaged; using the backup header");
    }
    let h = &gpt.header;
    let partitions = gpt
        .iter()
        .filter(|(_, p)| p.is_used())
        .map(|(n, p)| {
            let type_id = guid_string(&p.partition_type_guid);
            let sectors = p
                .ending_lba
                .checked_sub(p.starting_lba)
                .map(|d| d + 1)
                .ok_or_else(|| anyhow!("GPT partition {n} ends before it starts"))?;
            let name = p.partition_name.as_str().trim_end_matches('\0').to_string();
            Ok(Partition {
                number: n,
                start: p
                    .starting_lba
                    .checked_mul(ss)
                    .ok_or_else(|| anyhow!("GPT partition {n} starts beyond any disk"))?,
                size: sectors
                    .checked_mul(ss)
                    .ok_or_else(|| anyhow!("GPT partition {n} is larger than any disk"))?,
                type_name: gpt_type_name(&type_id).map(str::to_string),
                type_id,
                name: (!name.is_empty()).then_some(name),
                uuid: Some(guid_string(&p.unique_partition_guid)),
                bootable: false,
                extended: false,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(PartitionTable {
        kind: TableKind::Gpt,
        sector_size: ss as u32,
        disk_id: guid_string(&h.disk_guid),
        first_usable_lba: Some(h.first_usable_lba),
        last_usable_lba: Some(h.last_usable_lba),
        entries: Some(h.number_of_partition_entries),
        partitions,
    }))
}

fn read_mbr<R: Read + Seek>(
    r: &mut R,
    lba0: &[u8; 512],
    size: u64,
    sector_size: u32,
) -> Result<Option<PartitionTable>> {
    let ss = u64::from(sector_size);
    let sectors = size / ss;
    // A FAT or NTFS boot sector also ends in 55 AA: only entries that make sense are a table.
    let mut any = false;
    for i in 0..4 {
        let e = &lba0[446 + 16 * i..446 + 16 * (i + 1)];
        let start = u64::from(u32::from_le_bytes(e[8..12].try_into().expect("4")));
        let count = u64::from(u32::from_le_bytes(e[12..16].try_into().expect("4")));
        if e[4] == 0 {
            continue;
        }
        if (e[0] != 0 && e[0] != 0x80) || start == 0 || count == 0 || start + count > sectors {
            return Ok(None);
        }
        any = true;
    }
    if !any {
        return Ok(None);
    }
    let mbr = no_panic(|| {
        mbrman::MBR::read_from(r, sector_size).map_err(|e| anyhow!("invalid MBR: {e}"))
    })?;
    let mut partitions = Vec::new();
    let entry = |number: u32, e: &mbrman::MBRPartitionEntry| {
        let type_id = format!("0x{:02x}", e.sys);
        Partition {
            number,
            start: u64::from(e.starting_lba) * ss,
            size: u64::from(e.sectors) * ss,
            type_name: mbr_type_name(e.sys).map(str::to_string),
            type_id,
            name: None,
            uuid: None,
            bootable: e.is_active(),
            extended: e.is_extended(),
        }
    };
    for (i, e) in mbr.iter().filter(|(_, e)| e.is_used()) {
        partitions.push(entry(i as u32, e));
    }
    let disk_id = format!("{:08x}", u32::from_le_bytes(mbr.header.disk_signature));
    Ok(Some(PartitionTable {
        kind: TableKind::Mbr,
        sector_size,
        disk_id,
        first_usable_lba: None,
        last_usable_lba: None,
        entries: None,
        partitions,
    }))
}

/// A GPT GUID as text: the first three fields are stored little-endian.
pub fn guid_string(b: &[u8; 16]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_le_bytes([b[4], b[5]]),
        u16::from_le_bytes([b[6], b[7]]),
        b[8],
        b[9],
        b[10],
        b[11],
        b[12],
        b[13],
        b[14],
        b[15]
    )
}

fn gpt_type_name(guid: &str) -> Option<&'static str> {
    Some(match guid {
        "c12a7328-f81f-11d2-ba4b-00a0c93ec93b" => "EFI System",
        "21686148-6449-6e6f-744e-656564454649" => "BIOS boot",
        "0fc63daf-8483-4772-8e79-3d69d8477de4" => "Linux filesystem",
        "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f" => "Linux swap",
        "e6d6d379-f507-44c2-a23c-238f2a3df928" => "Linux LVM",
        "a19d880f-05fc-4d3b-a006-743f0f84911e" => "Linux RAID",
        "4f68bce3-e8cd-4db1-96e7-fbcaf984b709" => "Linux root (x86-64)",
        "b921b045-1df0-41c3-af44-4c6f280d3fae" => "Linux root (ARM64)",
        "933ac7e1-2eb4-4f13-b844-0e14e2aef915" => "Linux home",
        "bc13c2ff-59e6-4262-a352-b275fd6f7172" => "Linux extended boot",
        "ca7d7ccb-63ed-4c53-861c-1742536059cc" => "Linux LUKS",
        "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7" => "Microsoft basic data",
        "e3c9e316-0b5c-4db8-817d-f92df00215ae" => "Microsoft reserved",
        "de94bba4-06d1-4d40-a16a-bfd50179d6ac" => "Windows recovery",
        "7c3457ef-0000-11aa-aa11-00306543ecac" => "Apple APFS",
        "48465300-0000-11aa-aa11-00306543ecac" => "Apple HFS+",
        _ => return None,
    })
}

fn mbr_type_name(sys: u8) -> Option<&'static str> {
    Some(match sys {
        0x01 => "FAT12",
        0x04 | 0x06 | 0x0e => "FAT16",
        0x0b | 0x0c => "FAT32",
        0x07 => "NTFS/exFAT",
        0x05 | 0x0f | 0x85 => "Extended",
        0x82 => "Linux swap",
        0x83 => "Linux",
        0x8e => "Linux LVM",
        0xfd => "Linux RAID",
        0xef => "EFI System",
        0xee => "GPT protective",
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// Fitting a restored table to the target
// ---------------------------------------------------------------------------------------------

/// Whether [`fit_to_target`] can rebuild this GPT at another size: it works from the primary header
/// and array, which must be intact, with the array at LBA 2 (where every partitioning tool puts it).
pub fn check_relocatable<R: Read + Seek>(r: &mut R, ss: u64) -> Result<()> {
    if gpt_header_plausible(r, 1, ss)?.is_none() {
        bail!("its primary GPT header is missing or damaged (only the backup is readable); repair the source's table with gdisk and take a new image, or restore onto a drive of the same size");
    }
    let h = no_panic(|| {
        r.seek(SeekFrom::Start(ss))?;
        let h = gptman::GPTHeader::read_from(r)
            .map_err(|e| anyhow!("its primary GPT header is invalid: {e}"))?;
        h.read_partitions(r, ss)
            .map_err(|e| anyhow!("its primary GPT partition array is invalid: {e}"))?;
        Ok(h)
    })?;
    if h.partition_entry_lba != 2 {
        bail!(
            "its partition array is at LBA {}, not 2; cairn relocates standard layouts only",
            h.partition_entry_lba
        );
    }
    Ok(())
}

/// What [`fit_to_target`] changed.
#[derive(Debug, Clone, Serialize)]
pub struct TableChange {
    pub kind: TableKind,
    /// GPT: where the backup header was (in the image) and is now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_header_lba: Option<(u64, u64)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grown: Option<Grown>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Grown {
    pub number: u32,
    pub old_size: u64,
    pub new_size: u64,
}

/// Makes the table written onto a target of `target_size` bytes valid at that size (the data was
/// restored from an image of `image_size` bytes and flushed). GPT: backup array and header written at
/// the new end with the CRCs recomputed, the old backup copy zeroed when it is now inside the disk,
/// the protective MBR's size fixed. With `grow`, the last partition is extended to the end of the
/// usable space. Flushes what it writes.
pub fn fit_to_target(
    f: &mut File,
    table: &PartitionTable,
    image_size: u64,
    target_size: u64,
    grow: bool,
) -> Result<Option<TableChange>> {
    match table.kind {
        TableKind::Gpt if target_size != image_size || grow => {
            fit_gpt(f, table, image_size, target_size, grow).map(Some)
        }
        TableKind::Mbr if grow => grow_mbr(f, table, target_size).map(Some),
        _ => Ok(None),
    }
}

fn fit_gpt(
    f: &mut File,
    table: &PartitionTable,
    image_size: u64,
    target_size: u64,
    grow: bool,
) -> Result<TableChange> {
    let ss = u64::from(table.sector_size);
    let n = target_size / ss;
    let mut gpt = gptman::GPT::read_from(f, ss)
        .map_err(|e| anyhow!("cannot read the restored GPT back from the target: {e}"))?;
    if !gpt.header.is_primary() {
        bail!("the restored disk's primary GPT header is invalid; repair it with `sgdisk -e` or gdisk");
    }
    let old_backup = gpt.header.backup_lba;
    let old_last_usable = gpt.header.last_usable_lba;
    let arr = (u64::from(gpt.header.number_of_partition_entries) * GPT_ENTRY_SIZE).div_ceil(ss);
    let new_last_usable = n
        .checked_sub(2 + arr)
        .ok_or_else(|| anyhow!("target of {target_size} bytes cannot hold a GPT"))?;
    if let Some((num, p)) = gpt
        .iter()
        .filter(|(_, p)| p.is_used())
        .find(|(_, p)| p.ending_lba > new_last_usable)
    {
        bail!(
            "partition {num} ends at LBA {}, beyond the target's last usable LBA {new_last_usable}",
            p.ending_lba
        );
    }
    let mut grown = None;
    if grow {
        let last = gpt
            .iter()
            .filter(|(_, p)| p.is_used())
            .max_by_key(|(_, p)| p.ending_lba)
            .map(|(num, _)| num)
            .ok_or_else(|| anyhow!("--grow-last-partition: the disk has no partitions"))?;
        let p = &mut gpt[last];
        let old_size = (p.ending_lba - p.starting_lba + 1) * ss;
        // End on a 1 MiB boundary when that still grows it (partitioning tools warn otherwise).
        let align = ((1u64 << 20) / ss).max(1);
        let aligned = ((new_last_usable + 1) / align * align).saturating_sub(1);
        let new_end = if aligned > p.ending_lba {
            aligned
        } else {
            new_last_usable
        };
        if p.ending_lba < new_end {
            p.ending_lba = new_end;
        }
        grown = Some(Grown {
            number: last,
            old_size,
            new_size: (p.ending_lba - p.starting_lba + 1) * ss,
        });
    }
    gpt.header.backup_lba = n - 1;
    gpt.header.last_usable_lba = new_last_usable;
    gpt.write_into(f)
        .map_err(|e| anyhow!("writing the relocated GPT: {e}"))?;
    // The old backup copy (array and header), when it now lies inside the disk and away from the
    // new copy, is zeroed so no tool mistakes it for a table.
    let old_start = (old_last_usable + 1) * ss;
    let old_end = (old_backup + 1) * ss;
    let new_start = (new_last_usable + 1) * ss;
    if old_backup != n - 1 && old_end <= new_start && old_end <= image_size.max(target_size) {
        let zeros = vec![0u8; (old_end - old_start) as usize];
        f.seek(SeekFrom::Start(old_start))?;
        f.write_all(&zeros).context("zeroing the old backup GPT")?;
    }
    fix_protective_mbr(f, image_size / ss, n)?;
    f.sync_all().context("flushing the partition table")?;
    Ok(TableChange {
        kind: TableKind::Gpt,
        backup_header_lba: Some((old_backup, n - 1)),
        grown,
    })
}

/// The protective MBR's 0xEE entry covers the whole disk (or 0xFFFFFFFF sectors): resize it when it
/// did so for the old size. A hybrid MBR's partial 0xEE entry is left alone.
fn fix_protective_mbr(f: &mut File, old_sectors: u64, new_sectors: u64) -> Result<()> {
    let mut lba0 = [0u8; 512];
    f.seek(SeekFrom::Start(0))?;
    f.read_exact(&mut lba0)?;
    if lba0[510..512] != [0x55, 0xaa] {
        return Ok(());
    }
    let cap = |s: u64| s.saturating_sub(1).min(u64::from(u32::MAX)) as u32;
    for i in 0..4 {
        let e = 446 + 16 * i;
        if lba0[e + 4] != 0xee {
            continue;
        }
        let count = u32::from_le_bytes(lba0[e + 12..e + 16].try_into().expect("4"));
        if count == cap(old_sectors) || count == u32::MAX {
            lba0[e + 12..e + 16].copy_from_slice(&cap(new_sectors).to_le_bytes());
            f.seek(SeekFrom::Start(0))?;
            f.write_all(&lba0)?;
        }
        break;
    }
    Ok(())
}

/// An MBR counts sectors in 32 bits: no partition may end beyond sector 2^32 (2 TiB with 512-byte
/// sectors).
const MBR_SECTOR_LIMIT: u64 = 1 << 32;

/// Whether `--grow-last-partition` can grow this table's last partition to the end of a target of
/// `target_size` bytes, checked before anything is written.
pub fn check_growable(table: &PartitionTable, target_size: u64) -> Result<()> {
    match table.kind {
        TableKind::Mbr => mbr_growth(table, target_size).map(|_| ()),
        // fit_gpt checks the partitions against the relocated table; a GPT has no such limit.
        TableKind::Gpt => Ok(()),
    }
}

/// The MBR partition that ends last and the sector where growing ends it: the target's end. A
/// target beyond what the MBR can address is refused, not silently stopped short of.
fn mbr_growth(table: &PartitionTable, target_size: u64) -> Result<(&Partition, u64)> {
    let ss = u64::from(table.sector_size);
    let last = table
        .partitions
        .iter()
        .max_by_key(|p| p.end())
        .ok_or_else(|| anyhow!("--grow-last-partition: the disk has no partitions"))?;
    if last.number > 4 || last.extended {
        bail!(
            "--grow-last-partition: the last partition ({}) is a logical or extended partition, which cairn does not grow; use fdisk",
            last.number
        );
    }
    let end = target_size / ss;
    if end > MBR_SECTOR_LIMIT {
        bail!(
            "--grow-last-partition: partition {} cannot grow to the end of this {}-byte drive: an MBR with {ss}-byte sectors addresses only the first {} bytes; restore without --grow-last-partition and grow it by hand (or convert the disk to GPT first, e.g. with gdisk)",
            last.number,
            target_size,
            MBR_SECTOR_LIMIT * ss
        );
    }
    Ok((last, end))
}

/// Extends the MBR partition that ends last to the end of the disk (primary partitions only).
fn grow_mbr(f: &mut File, table: &PartitionTable, target_size: u64) -> Result<TableChange> {
    let ss = u64::from(table.sector_size);
    let (last, end) = mbr_growth(table, target_size)?;
    let start = last.start / ss;
    let mut lba0 = [0u8; 512];
    f.seek(SeekFrom::Start(0))?;
    f.read_exact(&mut lba0)?;
    let e = 446 + 16 * (last.number as usize - 1);
    let cur_start = u64::from(u32::from_le_bytes(
        lba0[e + 8..e + 12].try_into().expect("4"),
    ));
    let cur = u64::from(u32::from_le_bytes(
        lba0[e + 12..e + 16].try_into().expect("4"),
    ));
    if cur_start != start {
        bail!(
            "the restored MBR differs from the image's (partition {})",
            last.number
        );
    }
    let new = end.saturating_sub(start).max(cur);
    let new_field = u32::try_from(new).map_err(|_| {
        anyhow!(
            "partition {} would have {new} sectors, more than an MBR holds",
            last.number
        )
    })?;
    lba0[e + 12..e + 16].copy_from_slice(&new_field.to_le_bytes());
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&lba0)?;
    f.sync_all().context("flushing the partition table")?;
    Ok(TableChange {
        kind: TableKind::Mbr,
        backup_header_lba: None,
        grown: Some(Grown {
            number: last.number,
            old_size: cur * ss,
            new_size: new * ss,
        }),
    })
}

/// Zeroes a GPT backup header left in the last sector of a target (512- or 4096-byte sectors)
/// beyond the `image_size` bytes just restored. Returns whether there was one.
pub fn clear_stale_gpt_backup(f: &File, image_size: u64, target_size: u64) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let mut found = false;
    for ss in [512u64, 4096] {
        let Some(at) = target_size.checked_sub(ss).filter(|&a| a >= image_size) else {
            continue;
        };
        let mut sig = [0u8; 8];
        f.read_exact_at(&mut sig, at)?;
        if &sig == b"EFI PART" {
            f.write_all_at(&vec![0u8; ss as usize], at)?;
            tracing::info!("cleared an old GPT backup header at byte {at} of the target");
            found = true;
        }
    }
    if found {
        f.sync_all()?;
    }
    Ok(found)
}

/// Reads both GPT headers back after a restore and checks they agree with each other and the disk
/// size (the check `--verify` adds for the table cairn rewrote).
pub fn check_gpt(f: &mut File, ss: u64, size: u64) -> Result<()> {
    let n = size / ss;
    let gpt = gptman::GPT::read_from(f, ss).map_err(|e| anyhow!("GPT unreadable: {e}"))?;
    if !gpt.header.is_primary() || gpt.header.backup_lba != n - 1 {
        bail!(
            "the GPT's backup header is at LBA {}, not at the last LBA {}",
            gpt.header.backup_lba,
            n - 1
        );
    }
    f.seek(SeekFrom::Start((n - 1) * ss))?;
    let b =
        gptman::GPTHeader::read_from(f).map_err(|e| anyhow!("backup GPT header invalid: {e}"))?;
    let parts = b
        .read_partitions(f, ss)
        .map_err(|e| anyhow!("backup GPT partition array invalid: {e}"))?;
    if b.disk_guid != gpt.header.disk_guid
        || b.last_usable_lba != gpt.header.last_usable_lba
        || parts.iter().zip(gpt.iter()).any(|(a, (_, b))| a != b)
    {
        bail!("the backup GPT differs from the primary");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_print_mixed_endian() {
        let b = [
            0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
            0xc9, 0x3b,
        ];
        assert_eq!(guid_string(&b), "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
        assert_eq!(gpt_type_name(&guid_string(&b)), Some("EFI System"));
    }

    #[test]
    fn blank_and_fat_boot_sectors_are_no_table() {
        let mut disk = vec![0u8; 1 << 20];
        assert_eq!(
            read(&mut std::io::Cursor::new(&disk), disk.len() as u64, 512).unwrap(),
            None
        );
        // A FAT boot sector: 55 AA, and boot code where partition entries would be.
        disk[510] = 0x55;
        disk[511] = 0xaa;
        for (i, b) in disk[446..510].iter_mut().enumerate() {
            *b = b"This is not a bootable disk. "[i % 29];
        }
        assert_eq!(
            read(&mut std::io::Cursor::new(&disk), disk.len() as u64, 512).unwrap(),
            None
        );
    }

    #[test]
    fn mbr_partitions_are_read() {
        let size = 64u64 << 20;
        let mut disk = vec![0u8; size as usize];
        disk[440..444].copy_from_slice(&0x1234abcdu32.to_le_bytes());
        let e = &mut disk[446..462];
        e[0] = 0x80;
        e[4] = 0x83;
        e[8..12].copy_from_slice(&2048u32.to_le_bytes());
        e[12..16].copy_from_slice(&4096u32.to_le_bytes());
        disk[510] = 0x55;
        disk[511] = 0xaa;
        let t = read(&mut std::io::Cursor::new(&disk), size, 512)
            .unwrap()
            .unwrap();
        assert_eq!(t.kind, TableKind::Mbr);
        assert_eq!(t.disk_id, "1234abcd");
        assert_eq!(t.partitions.len(), 1);
        let p = &t.partitions[0];
        assert_eq!((p.number, p.start, p.size), (1, 1 << 20, 2 << 20));
        assert!(p.bootable);
        assert_eq!(p.type_name.as_deref(), Some("Linux"));
        let record = PartitionTableRecord::from(t.clone());
        assert_eq!(
            PartitionTable::from(record),
            t,
            "the manifest record is lossless"
        );
    }

    #[test]
    fn a_sector_size_of_zero_is_an_error_not_a_division_by_zero() {
        let disk = mbr_disk();
        for ss in [0, 1, 1000, 1 << 17] {
            let e = read(&mut std::io::Cursor::new(&disk), 1 << 20, ss).unwrap_err();
            assert!(
                format!("{e}").contains(&format!("{ss}-byte sectors")),
                "{e}"
            );
        }
    }

    /// A 1 MiB disk with one bootable Linux MBR partition from LBA 64, 16 sectors long.
    fn mbr_disk() -> Vec<u8> {
        let mut disk = vec![0u8; 1 << 20];
        let e = &mut disk[446..462];
        e[0] = 0x80;
        e[4] = 0x83;
        e[8..12].copy_from_slice(&64u32.to_le_bytes());
        e[12..16].copy_from_slice(&16u32.to_le_bytes());
        disk[510] = 0x55;
        disk[511] = 0xaa;
        disk
    }

    /// `mbr_disk` in a file (sector 0 is all grow_mbr touches, so the target size is only a
    /// number: no big disk needed), with its table as the image would hold it.
    fn mbr_target(sector_size: u32) -> (tempfile::NamedTempFile, PartitionTable) {
        let mut disk = mbr_disk();
        if sector_size == 4096 {
            // The same entry in 4 KiB sectors: LBA 8, 2 sectors.
            disk[446 + 8..446 + 12].copy_from_slice(&8u32.to_le_bytes());
            disk[446 + 12..446 + 16].copy_from_slice(&2u32.to_le_bytes());
        }
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&disk).unwrap();
        let t = read(&mut std::io::Cursor::new(&disk), 1 << 20, sector_size)
            .unwrap()
            .unwrap();
        (f, t)
    }

    fn mbr_entry_sectors(f: &mut File) -> u32 {
        let mut lba0 = [0u8; 512];
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_exact(&mut lba0).unwrap();
        u32::from_le_bytes(lba0[446 + 12..446 + 16].try_into().unwrap())
    }

    #[test]
    fn mbr_growth_past_2_tib_is_refused_not_stopped_short() {
        let tib = 1u64 << 40;
        let (mut f, t) = mbr_target(512);
        for target in [2 * tib + 512, 3 * tib, 16 * tib] {
            let e = check_growable(&t, target).unwrap_err();
            let msg = format!("{e}");
            assert!(
                msg.contains("addresses only the first 2199023255552 bytes"),
                "{msg}"
            );
            let e = fit_to_target(f.as_file_mut(), &t, 1 << 20, target, true).unwrap_err();
            assert!(format!("{e}").contains("MBR"), "{e}");
            assert_eq!(
                mbr_entry_sectors(f.as_file_mut()),
                16,
                "sector 0 was changed"
            );
        }
        // Exactly 2 TiB is what an MBR can address: the partition ends at its last sector.
        check_growable(&t, 2 * tib).unwrap();
        let c = fit_to_target(f.as_file_mut(), &t, 1 << 20, 2 * tib, true)
            .unwrap()
            .unwrap();
        let want = (1u64 << 32) - 64;
        assert_eq!(u64::from(mbr_entry_sectors(f.as_file_mut())), want);
        assert_eq!(c.grown.unwrap().new_size, want * 512);
    }

    #[test]
    fn mbr_with_4k_sectors_grows_past_2_tib() {
        let tib = 1u64 << 40;
        let (mut f, t) = mbr_target(4096);
        let c = fit_to_target(f.as_file_mut(), &t, 1 << 20, 3 * tib, true)
            .unwrap()
            .unwrap();
        assert_eq!(c.grown.unwrap().new_size, 3 * tib - 8 * 4096);
        assert!(check_growable(&t, 16 * tib + 4096).is_err());
    }

    /// A reader whose bytes at `bad` cannot be read, like a damaged image or a failing disk.
    struct Unreadable {
        data: std::io::Cursor<Vec<u8>>,
        bad: std::ops::Range<u64>,
    }

    impl Read for Unreadable {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let at = self.data.position();
            if self.bad.contains(&at)
                || (at < self.bad.start && at + buf.len() as u64 > self.bad.start)
            {
                return Err(std::io::Error::other("image block 0: checksum mismatch"));
            }
            self.data.read(buf)
        }
    }

    impl Seek for Unreadable {
        fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
            self.data.seek(pos)
        }
    }

    #[test]
    fn unreadable_bytes_are_a_read_error_never_no_table() {
        // The GPT header sector cannot be read: the parsers used to take that for "no GPT" and
        // report the MBR in sector 0.
        let mut r = Unreadable {
            data: std::io::Cursor::new(mbr_disk()),
            bad: 512..1024,
        };
        match read(&mut r, 1 << 20, 512) {
            Err(ReadError::Io(e)) => {
                assert!(format!("{e:#}").contains("checksum mismatch"), "{e:#}")
            }
            other => panic!("{other:?}"),
        }
        let mut r = Unreadable {
            data: std::io::Cursor::new(mbr_disk()),
            bad: 0..512,
        };
        assert!(matches!(read(&mut r, 1 << 20, 512), Err(ReadError::Io(_))));
        // Readable bytes holding a table cairn refuses are a table error.
        let mut disk = mbr_disk();
        disk[446 + 4] = 0xee;
        match read(&mut std::io::Cursor::new(&disk), 1 << 20, 512) {
            Err(ReadError::Table(e)) => assert!(format!("{e}").contains("protective MBR"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    /// A GPT with valid CRCs whose partition 1 starts at LBA 0 (gptman asserts on it).
    #[test]
    fn crafted_gpt_is_an_error_not_a_panic() {
        let size = 4u64 << 20;
        let mut cur = std::io::Cursor::new(vec![0u8; size as usize]);
        let mut gpt = gptman::GPT::new_from(&mut cur, 512, [7; 16]).unwrap();
        gpt[1] = gptman::GPTPartitionEntry {
            partition_type_guid: [1; 16],
            unique_partition_guid: [2; 16],
            starting_lba: 2048,
            ending_lba: 4095,
            attribute_bits: 0,
            partition_name: "p".into(),
        };
        gpt.write_into(&mut cur).unwrap();
        let mut disk = cur.into_inner();
        let n = size as usize / 512;
        for (hdr, arr) in [(512usize, 1024usize), ((n - 1) * 512, (n - 33) * 512)] {
            disk[arr + 32..arr + 40].copy_from_slice(&0u64.to_le_bytes());
            let acrc = crc32fast::hash(&disk[arr..arr + 128 * 128]);
            disk[hdr + 88..hdr + 92].copy_from_slice(&acrc.to_le_bytes());
            disk[hdr + 16..hdr + 20].copy_from_slice(&[0; 4]);
            let hcrc = crc32fast::hash(&disk[hdr..hdr + 92]);
            disk[hdr + 16..hdr + 20].copy_from_slice(&hcrc.to_le_bytes());
        }
        let r = read(&mut std::io::Cursor::new(&disk), size, 512);
        assert!(r.is_err(), "{r:?}");
    }

    #[test]
    fn relocation_needs_an_intact_primary() {
        let size = 4u64 << 20;
        let mut cur = std::io::Cursor::new(vec![0u8; size as usize]);
        let mut gpt = gptman::GPT::new_from(&mut cur, 512, [7; 16]).unwrap();
        gpt.write_into(&mut cur).unwrap();
        let mut disk = cur.into_inner();
        check_relocatable(&mut std::io::Cursor::new(&disk), 512).unwrap();
        disk[512 + 40] ^= 1; // primary header CRC no longer matches
        let t = read(&mut std::io::Cursor::new(&disk), size, 512)
            .unwrap()
            .unwrap();
        assert_eq!(t.kind, TableKind::Gpt, "still readable from the backup");
        let e = check_relocatable(&mut std::io::Cursor::new(&disk), 512).unwrap_err();
        assert!(
            format!("{e}").contains("primary GPT header is invalid"),
            "{e}"
        );
    }

    #[test]
    fn odd_gpt_headers_are_refused_not_trusted() {
        let size = 1u64 << 20;
        let mut disk = vec![0u8; size as usize];
        disk[512..520].copy_from_slice(b"EFI PART");
        disk[512 + 80..512 + 84].copy_from_slice(&u32::MAX.to_le_bytes());
        disk[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        assert!(read(&mut std::io::Cursor::new(&disk), size, 512).is_err());
        disk[512 + 80..512 + 84].copy_from_slice(&128u32.to_le_bytes());
        disk[512 + 84..512 + 88].copy_from_slice(&256u32.to_le_bytes());
        let e = read(&mut std::io::Cursor::new(&disk), size, 512).unwrap_err();
        assert!(format!("{e}").contains("128-byte"), "{e}");
    }
}
