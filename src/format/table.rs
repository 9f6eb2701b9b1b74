//! The partition-table record a manifest keeps (docs/format.md, `partition_table`): plain data, so
//! the on-disk format does not depend on the code that reads tables from disks (`crate::ptable`
//! converts from and to it).

use super::{check_sector_size, corrupt, invalid, FormatError};
use serde::{Deserialize, Serialize};

/// More GPT entries than any partitioning tool writes (the spec minimum is 128): a header claiming
/// more is damage.
pub const MAX_GPT_ENTRIES: u32 = 4096;
/// MBR start and size fields count 32-bit sectors.
const MBR_MAX_SECTORS: u64 = u32::MAX as u64;

/// "gpt" or "mbr".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    Gpt,
    Mbr,
}

impl TableKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TableKind::Gpt => "gpt",
            TableKind::Mbr => "mbr",
        }
    }
}

/// A disk's partition table as recorded in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionTableRecord {
    pub kind: TableKind,
    /// Logical sector size the table's LBAs are counted in.
    pub sector_size: u32,
    /// GPT: the disk GUID. MBR: the 32-bit disk signature as 8 hex digits.
    pub disk_id: String,
    /// GPT only: the usable LBA range and the number of entries in the partition array.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_usable_lba: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_usable_lba: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<u32>,
    pub partitions: Vec<PartitionRecord>,
}

/// One used entry of a partition table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionRecord {
    /// The kernel's partition number (GPT: entry number; MBR: 1-4 primary, 5+ logical).
    pub number: u32,
    /// Byte offset of the first byte.
    pub start: u64,
    /// Bytes.
    pub size: u64,
    /// GPT: partition type GUID. MBR: type byte as `0x83`.
    pub type_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub type_name: Option<String>,
    /// GPT partition name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// GPT unique partition GUID (the PARTUUID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// MBR: the active flag.
    #[serde(default, skip_serializing_if = "is_false")]
    pub bootable: bool,
    /// MBR: an extended partition (a container of logical partitions).
    #[serde(default, skip_serializing_if = "is_false")]
    pub extended: bool,
}

impl PartitionTableRecord {
    /// Checks the record against the disk of `disk_size` bytes it was read from: a recorded table
    /// lies inside its disk, in whole sectors. Errors name the field and its value.
    pub fn validate(&self, disk_size: u64) -> Result<(), FormatError> {
        check_sector_size("partition_table.sector_size", self.sector_size)?;
        let ss = u64::from(self.sector_size);
        let sectors = disk_size / ss;
        let gpt = [
            ("first_usable_lba", self.first_usable_lba),
            ("last_usable_lba", self.last_usable_lba),
            ("entries", self.entries.map(u64::from)),
        ];
        // The usable range, in LBAs, that partitions must lie in.
        let (first, last) = match self.kind {
            TableKind::Mbr => {
                if let Some((field, v)) = gpt.iter().find_map(|(f, v)| v.map(|v| (f, v))) {
                    return Err(invalid(
                        &format!("partition_table.{field}"),
                        v,
                        "a GPT field in an MBR table",
                    ));
                }
                (1, sectors.saturating_sub(1))
            }
            TableKind::Gpt => {
                let [Some(first), Some(last), Some(entries)] = gpt.map(|(_, v)| v) else {
                    return Err(corrupt(
                        "partition_table: a GPT without first_usable_lba, last_usable_lba and entries",
                    ));
                };
                if entries == 0 || entries > u64::from(MAX_GPT_ENTRIES) {
                    return Err(invalid(
                        "partition_table.entries",
                        entries,
                        &format!("not 1 to {MAX_GPT_ENTRIES}"),
                    ));
                }
                if first == 0 || first > last || last >= sectors {
                    return Err(invalid(
                        "partition_table.first_usable_lba..last_usable_lba",
                        format!("{first}..{last}"),
                        &format!("not a range inside the disk's {sectors} sectors of {ss} bytes"),
                    ));
                }
                (first, last)
            }
        };
        let mut prev_number = 0;
        for (i, p) in self.partitions.iter().enumerate() {
            let field = |name: &str| format!("partition_table.partitions[{i}].{name}");
            let max_number = self.entries.unwrap_or(u32::MAX);
            if p.number <= prev_number || p.number > max_number {
                return Err(invalid(
                    &field("number"),
                    p.number,
                    "partition numbers must be unique, ascending and inside the table",
                ));
            }
            prev_number = p.number;
            if p.start % ss != 0 || p.size % ss != 0 || p.size == 0 {
                return Err(invalid(
                    &field("start, size"),
                    format!("{}, {}", p.start, p.size),
                    &format!("not a non-empty run of whole {ss}-byte sectors"),
                ));
            }
            let (lba, count) = (p.start / ss, p.size / ss);
            let inside = lba >= first && lba.checked_add(count).is_some_and(|e| e - 1 <= last);
            if !inside {
                return Err(invalid(
                    &field("start, size"),
                    format!("{}, {}", p.start, p.size),
                    &format!("not inside LBAs {first}..={last} of a disk of {disk_size} bytes"),
                ));
            }
            if self.kind == TableKind::Mbr && (lba > MBR_MAX_SECTORS || count > MBR_MAX_SECTORS) {
                return Err(invalid(
                    &field("start, size"),
                    format!("{}, {}", p.start, p.size),
                    "beyond the 32-bit sector counts of an MBR",
                ));
            }
        }
        Ok(())
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON cairn has always written for a table (docs/format.md): the record must read it and
    /// write it back byte for byte.
    #[test]
    fn json_is_the_documented_one() {
        let gpt = r#"{"kind":"gpt","sector_size":512,"disk_id":"07070707-0707-0707-0707-070707070707","first_usable_lba":34,"last_usable_lba":8158,"entries":128,"partitions":[{"number":1,"start":1048576,"size":2097152,"type_id":"0fc63daf-8483-4772-8e79-3d69d8477de4","type_name":"Linux filesystem","name":"root","uuid":"02020202-0202-0202-0202-020202020202"}]}"#;
        let mbr = r#"{"kind":"mbr","sector_size":512,"disk_id":"1234abcd","partitions":[{"number":1,"start":1048576,"size":2097152,"type_id":"0x83","type_name":"Linux","bootable":true},{"number":2,"start":4194304,"size":1048576,"type_id":"0x05","extended":true}]}"#;
        for text in [gpt, mbr] {
            let r: PartitionTableRecord = serde_json::from_str(text).unwrap();
            assert_eq!(serde_json::to_string(&r).unwrap(), text);
        }
    }
}
