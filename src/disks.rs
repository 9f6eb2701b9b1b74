//! `cairn disks`: the block devices of this machine, with what a sysadmin checks before overwriting
//! one — size, model, serial/WWN, transport, sector sizes, partitions with their filesystems,
//! mount points, and whether anything uses them.
//!
//! Facts come from sysfs (no device needs opening for them), the udev database where udev runs,
//! and, as root, the device itself: its partition table, and the filesystem superblocks that the
//! udev database would otherwise name.

use crate::device::{self, DeviceInfo, Kind};
use anyhow::Result;
use serde::Serialize;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Serialize)]
pub struct Disk {
    pub path: String,
    pub name: String,
    pub size: u64,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub wwn: Option<String>,
    /// "nvme", "sata", "usb", "virtio", "scsi", "loop", ... when known.
    pub transport: Option<String>,
    pub rotational: Option<bool>,
    pub removable: Option<bool>,
    pub read_only: bool,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// "gpt" or "mbr", with the disk's GUID or signature.
    pub partition_table: Option<String>,
    pub disk_id: Option<String>,
    /// A filesystem on the whole disk (no partition table).
    pub filesystem: Option<Filesystem>,
    pub mountpoints: Vec<String>,
    /// Why the disk must not be overwritten now (a mounted partition, swap, LVM/RAID), if so.
    pub in_use: Option<String>,
    pub partitions: Vec<DiskPartition>,
}

#[derive(Debug, Serialize)]
pub struct DiskPartition {
    pub path: String,
    pub name: String,
    pub number: Option<u32>,
    /// Byte offset on the disk.
    pub start: u64,
    pub size: u64,
    pub partuuid: Option<String>,
    pub part_type: Option<String>,
    pub part_name: Option<String>,
    pub filesystem: Option<Filesystem>,
    pub mountpoints: Vec<String>,
    pub in_use: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Filesystem {
    #[serde(rename = "type")]
    pub fstype: String,
    pub label: Option<String>,
    pub uuid: Option<String>,
}

pub fn run() -> Result<Vec<Disk>> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/block")?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort_by_key(|n| natural_key(n));
    let mut out = Vec::new();
    for name in names {
        let sys = Path::new("/sys/block").join(&name);
        let sectors: u64 = read(&sys.join("size"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        // Unattached loop devices and empty drives have nothing to show.
        if sectors == 0 || name.starts_with("ram") {
            continue;
        }
        out.push(disk(&name, &sys, sectors * 512));
    }
    Ok(out)
}

fn disk(name: &str, sys: &Path, size: u64) -> Disk {
    let path = PathBuf::from("/dev").join(name);
    let devno = read_devno(&sys.join("dev"));
    let info = probe_or_sysfs(&path, sys, devno, size, Kind::Disk);
    let udev = devno.map(device::udev_properties).unwrap_or_default();
    let table = File::open(&path)
        .ok()
        .and_then(|mut f| crate::ptable::read(&mut f, size, info.logical_sector_size).ok())
        .flatten();
    let mut partitions = Vec::new();
    let mut parts: Vec<PathBuf> = std::fs::read_dir(sys)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.join("partition").exists())
                .collect()
        })
        .unwrap_or_default();
    parts.sort_by_key(|p| read(&p.join("partition")).and_then(|s| s.parse::<u32>().ok()));
    for p in parts {
        partitions.push(partition(&p, table.as_ref()));
    }
    let filesystem = if table.is_none() {
        filesystem(&path, &udev)
    } else {
        None
    };
    Disk {
        path: path.display().to_string(),
        name: name.to_string(),
        size,
        model: info.model.clone(),
        serial: info.serial.clone(),
        wwn: info.wwn.clone(),
        transport: transport(name, sys, &udev),
        rotational: info.rotational,
        removable: read(&sys.join("removable")).map(|v| v == "1"),
        read_only: read(&sys.join("ro")).is_some_and(|v| v == "1"),
        logical_sector_size: info.logical_sector_size,
        physical_sector_size: info.physical_sector_size,
        partition_table: table.as_ref().map(|t| t.kind.as_str().to_string()),
        disk_id: table.as_ref().map(|t| t.disk_id.clone()),
        filesystem,
        mountpoints: devno.map(device::mount_points).unwrap_or_default(),
        in_use: info.in_use_reason(),
        partitions,
    }
}

fn partition(sys: &Path, table: Option<&crate::ptable::PartitionTable>) -> DiskPartition {
    let name = sys
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let path = PathBuf::from("/dev").join(&name);
    let devno = read_devno(&sys.join("dev"));
    let num = |f: &str| read(&sys.join(f)).and_then(|s| s.parse::<u64>().ok());
    let number = num("partition").map(|n| n as u32);
    let start = num("start").unwrap_or(0) * 512;
    let size = num("size").unwrap_or(0) * 512;
    let info = probe_or_sysfs(&path, sys, devno, size, Kind::Partition);
    let udev = devno.map(device::udev_properties).unwrap_or_default();
    let entry = table.and_then(|t| number.and_then(|n| t.partition(n)));
    DiskPartition {
        path: path.display().to_string(),
        name,
        number,
        start,
        size,
        partuuid: prop(&udev, "ID_PART_ENTRY_UUID").or_else(|| entry.and_then(|e| e.uuid.clone())),
        part_type: entry.map(|e| e.type_name.clone().unwrap_or_else(|| e.type_id.clone())),
        part_name: entry.and_then(|e| e.name.clone()),
        filesystem: filesystem(&path, &udev),
        mountpoints: devno.map(device::mount_points).unwrap_or_default(),
        in_use: info.in_use_reason(),
    }
}

/// DeviceInfo from the device itself (root), else from sysfs alone.
fn probe_or_sysfs(
    path: &Path,
    sys: &Path,
    devno: Option<(u32, u32)>,
    size: u64,
    kind: Kind,
) -> DeviceInfo {
    if let Ok(info) = DeviceInfo::probe(path) {
        return info;
    }
    let disk_sys = if kind == Kind::Partition {
        sys.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        sys.to_path_buf()
    };
    let num = |rel: &str| read(&disk_sys.join(rel)).and_then(|s| s.parse::<u32>().ok());
    DeviceInfo {
        path: path.to_path_buf(),
        kind,
        size,
        logical_sector_size: num("queue/logical_block_size").unwrap_or(512),
        physical_sector_size: num("queue/physical_block_size").unwrap_or(512),
        devno,
        kernel_name: sys.file_name().map(|n| n.to_string_lossy().into_owned()),
        parent_devno: None,
        model: read(&disk_sys.join("device/model")),
        serial: read(&disk_sys.join("device/serial")).or_else(|| read(&disk_sys.join("serial"))),
        wwn: read(&disk_sys.join("wwid")).or_else(|| read(&disk_sys.join("device/wwid"))),
        partuuid: None,
        ptable_id: None,
        rotational: read(&disk_sys.join("queue/rotational")).map(|v| v == "1"),
    }
}

fn transport(name: &str, sys: &Path, udev: &[(String, String)]) -> Option<String> {
    if let Some(bus) = prop(udev, "ID_BUS") {
        return Some(if bus == "ata" { "sata".into() } else { bus });
    }
    let real = std::fs::canonicalize(sys).ok()?.display().to_string();
    let t = if name.starts_with("loop") {
        "loop"
    } else if name.starts_with("nvme") {
        "nvme"
    } else if name.starts_with("mmcblk") {
        "mmc"
    } else if name.starts_with("zram") {
        "zram"
    } else if real.contains("/usb") {
        "usb"
    } else if real.contains("/ata") {
        "sata"
    } else if real.contains("/virtio") {
        "virtio"
    } else if real.contains("/host") {
        "scsi"
    } else {
        return None;
    };
    Some(t.to_string())
}

/// The filesystem on a device: from udev, else (as root) from its superblock.
fn filesystem(path: &Path, udev: &[(String, String)]) -> Option<Filesystem> {
    if let Some(fstype) = prop(udev, "ID_FS_TYPE") {
        return Some(Filesystem {
            fstype,
            label: prop(udev, "ID_FS_LABEL"),
            uuid: prop(udev, "ID_FS_UUID"),
        });
    }
    let f = File::open(path).ok()?;
    probe_fs(&f)
}

/// Recognises the common filesystems and containers by their superblocks (the signatures blkid
/// uses), with label and UUID.
pub fn probe_fs(f: &File) -> Option<Filesystem> {
    let mut b = vec![0u8; 68 * 1024];
    let n = read_up_to(f, &mut b);
    let b = &b[..n];
    let at = |o: usize, len: usize| b.get(o..o + len);
    let text = |o: usize, len: usize| {
        at(o, len).and_then(|s| {
            let s = String::from_utf8_lossy(s)
                .trim_end_matches(['\0', ' '])
                .to_string();
            (!s.is_empty()).then_some(s)
        })
    };
    let fs = |t: &str, label: Option<String>, uuid: Option<String>| {
        Some(Filesystem {
            fstype: t.to_string(),
            label,
            uuid,
        })
    };
    if at(1024 + 56, 2) == Some(&[0x53, 0xef]) {
        let le32 = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4"));
        let (compat, incompat) = (le32(1024 + 92), le32(1024 + 96));
        let t = if incompat & 0x2c0 != 0 {
            "ext4"
        } else if compat & 0x4 != 0 {
            "ext3"
        } else {
            "ext2"
        };
        return fs(t, text(1024 + 120, 16), at(1024 + 104, 16).map(uuid_be));
    }
    if at(0, 4) == Some(b"XFSB") {
        return fs("xfs", text(108, 12), at(32, 16).map(uuid_be));
    }
    if at(65536 + 64, 8) == Some(b"_BHRfS_M") {
        return fs(
            "btrfs",
            text(65536 + 299, 256),
            at(65536 + 32, 16).map(uuid_be),
        );
    }
    if at(0, 6) == Some(b"LUKS\xba\xbe") {
        return fs("crypto_LUKS", None, text(168, 40));
    }
    if at(4096 - 10, 10) == Some(b"SWAPSPACE2") {
        return fs("swap", text(1024 + 28, 16), at(1024 + 12, 16).map(uuid_be));
    }
    if at(3, 8) == Some(b"NTFS    ") {
        let serial =
            at(0x48, 8).map(|s| format!("{:016X}", u64::from_le_bytes(s.try_into().expect("8"))));
        return fs("ntfs", None, serial);
    }
    if at(3, 8) == Some(b"EXFAT   ") {
        let serial = at(0x64, 4).map(vol_id);
        return fs("exfat", None, serial);
    }
    if at(510, 2) == Some(&[0x55, 0xaa]) {
        if at(0x52, 5) == Some(b"FAT32") {
            return fs("vfat", fat_label(text(0x47, 11)), at(0x43, 4).map(vol_id));
        }
        if at(0x36, 3) == Some(b"FAT") {
            return fs("vfat", fat_label(text(0x2b, 11)), at(0x27, 4).map(vol_id));
        }
    }
    if at(32769, 5) == Some(b"CD001") {
        return fs("iso9660", text(32768 + 40, 32), None);
    }
    None
}

fn fat_label(l: Option<String>) -> Option<String> {
    l.filter(|l| l != "NO NAME")
}

fn vol_id(s: &[u8]) -> String {
    let v = u32::from_le_bytes(s.try_into().expect("4"));
    format!("{:04X}-{:04X}", v >> 16, v & 0xffff)
}

fn uuid_be(s: &[u8]) -> String {
    let h: String = s.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn read_up_to(f: &File, buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], done as u64) {
            Ok(0) | Err(_) => break,
            Ok(n) => done += n,
        }
    }
    done
}

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn read_devno(p: &Path) -> Option<(u32, u32)> {
    let s = read(p)?;
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn prop(props: &[(String, String)], key: &str) -> Option<String> {
    props
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .filter(|v| !v.is_empty())
}

/// "sda" < "sdb" < "sdaa", "loop2" < "loop10": by letter prefix, then the rest by length.
fn natural_key(s: &str) -> (String, usize, String) {
    let split = s
        .find(|c: char| !c.is_ascii_alphabetic())
        .unwrap_or(s.len())
        .min(s.len());
    let (prefix, rest) = if split == s.len() {
        // Letters only (sda, vdb, xvdaa): the letters after the "…d" prefix are the number.
        let p = s.trim_end_matches(|c: char| c != 'd' && c.is_ascii_lowercase());
        s.split_at(p.len())
    } else {
        s.split_at(split)
    };
    (prefix.to_string(), rest.len(), rest.to_string())
}

/// The human listing.
pub fn render(disks: &[Disk]) -> Vec<String> {
    use crate::progress::human_bytes;
    let mut out = Vec::new();
    if disks.is_empty() {
        out.push("no block devices found".to_string());
    }
    for d in disks {
        let mut l = format!("{}  {}", d.path, human_bytes(d.size));
        l.push_str(&format!(
            "  {}",
            d.transport.as_deref().unwrap_or("transport ?")
        ));
        l.push_str(match d.rotational {
            Some(true) => "  rotational",
            Some(false) => "  non-rotational",
            None => "",
        });
        if d.removable == Some(true) {
            l.push_str("  removable");
        }
        if d.read_only {
            l.push_str("  read-only");
        }
        l.push_str(&format!(
            "  sectors {}/{}",
            d.logical_sector_size, d.physical_sector_size
        ));
        out.push(l);
        out.push(format!(
            "    model {}  serial {}{}",
            d.model.as_deref().unwrap_or("-"),
            d.serial.as_deref().unwrap_or("-"),
            d.wwn
                .as_ref()
                .map(|w| format!("  wwn {w}"))
                .unwrap_or_default()
        ));
        match (&d.partition_table, &d.filesystem) {
            (Some(k), _) => out.push(format!(
                "    {} partition table, disk id {}",
                k.to_uppercase(),
                d.disk_id.as_deref().unwrap_or("?")
            )),
            (None, Some(fs)) => out.push(format!("    whole-disk {}", fs_text(fs))),
            (None, None) => out.push("    no partition table or filesystem recognised".into()),
        }
        if !d.mountpoints.is_empty() {
            out.push(format!("    mounted at {}", d.mountpoints.join(", ")));
        }
        out.push(match &d.in_use {
            Some(why) => format!("    IN USE: {why}"),
            None => "    not in use".to_string(),
        });
        for p in &d.partitions {
            let mut l = format!("  {}  start {}  {}", p.path, p.start, human_bytes(p.size));
            if let Some(t) = &p.part_type {
                l.push_str(&format!("  {t}"));
            }
            if let Some(n) = &p.part_name {
                l.push_str(&format!("  name {n:?}"));
            }
            l.push_str(&format!(
                "  {}",
                p.filesystem
                    .as_ref()
                    .map(fs_text)
                    .unwrap_or_else(|| "no filesystem recognised".into())
            ));
            if let Some(u) = &p.partuuid {
                l.push_str(&format!("  partuuid {u}"));
            }
            if !p.mountpoints.is_empty() {
                l.push_str(&format!("  mounted at {}", p.mountpoints.join(", ")));
            }
            if let Some(why) = &p.in_use {
                l.push_str(&format!("  IN USE: {why}"));
            }
            out.push(l);
        }
    }
    out
}

fn fs_text(fs: &Filesystem) -> String {
    let mut s = fs.fstype.clone();
    if let Some(l) = &fs.label {
        s.push_str(&format!(" label {l:?}"));
    }
    if let Some(u) = &fs.uuid {
        s.push_str(&format!(" uuid {u}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut v = vec!["sdaa", "loop10", "sdb", "loop2", "nvme0n1", "sda"];
        v.sort_by_key(|n| natural_key(n));
        assert_eq!(v, ["loop2", "loop10", "nvme0n1", "sda", "sdb", "sdaa"]);
    }

    #[test]
    fn fat_and_ext_superblocks() {
        let mut img = vec![0u8; 68 * 1024];
        img[0x52..0x57].copy_from_slice(b"FAT32");
        img[0x43..0x47].copy_from_slice(&0x1234abcdu32.to_le_bytes());
        img[0x47..0x52].copy_from_slice(b"BOOT       ");
        img[510] = 0x55;
        img[511] = 0xaa;
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&img, 0).unwrap();
        let fs = probe_fs(&f).unwrap();
        assert_eq!(fs.fstype, "vfat");
        assert_eq!(fs.label.as_deref(), Some("BOOT"));
        assert_eq!(fs.uuid.as_deref(), Some("1234-ABCD"));

        let mut img = vec![0u8; 68 * 1024];
        img[1024 + 56] = 0x53;
        img[1024 + 57] = 0xef;
        img[1024 + 96] = 0x40;
        img[1024 + 104..1024 + 120].copy_from_slice(&[0x11; 16]);
        img[1024 + 120..1024 + 124].copy_from_slice(b"root");
        f.write_all_at(&img, 0).unwrap();
        let fs = probe_fs(&f).unwrap();
        assert_eq!(fs.fstype, "ext4");
        assert_eq!(fs.label.as_deref(), Some("root"));
        assert_eq!(
            fs.uuid.as_deref(),
            Some("11111111-1111-1111-1111-111111111111")
        );
    }
}
