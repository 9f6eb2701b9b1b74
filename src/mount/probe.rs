//! Which filesystem a partition holds (from its superblock's magic), and whether and how this
//! machine can mount it read-only.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fs {
    Ext,
    Xfs,
    Btrfs,
    Ntfs,
    Vfat,
    Exfat,
    Luks,
    Swap,
    Unknown,
}

impl Fs {
    pub fn name(self) -> &'static str {
        match self {
            Fs::Ext => "ext2/3/4",
            Fs::Xfs => "xfs",
            Fs::Btrfs => "btrfs",
            Fs::Ntfs => "ntfs",
            Fs::Vfat => "vfat",
            Fs::Exfat => "exfat",
            Fs::Luks => "luks",
            Fs::Swap => "swap",
            Fs::Unknown => "unknown",
        }
    }
}

/// Reads `len` bytes at `at`, or None when the stream is shorter.
fn bytes_at<R: Read + Seek>(r: &mut R, at: u64, len: usize) -> std::io::Result<Option<Vec<u8>>> {
    r.seek(SeekFrom::Start(at))?;
    let mut b = vec![0u8; len];
    match r.read_exact(&mut b) {
        Ok(()) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// The filesystem whose signature `r` (a partition's bytes, `size` long) carries. An error means
/// the blocks holding the signatures could not be read (damaged).
pub fn probe<R: Read + Seek>(r: &mut R, size: u64) -> std::io::Result<Fs> {
    // Every signature below lies in the first 68 KiB.
    let head = bytes_at(r, 0, (68 * 1024).min(size as usize))?.unwrap_or_default();
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    Ok(if at(0, b"LUKS\xba\xbe") {
        Fs::Luks
    } else if at(1080, &[0x53, 0xef]) {
        Fs::Ext
    } else if at(0, b"XFSB") {
        Fs::Xfs
    } else if at(65536 + 64, b"_BHRfS_M") {
        Fs::Btrfs
    } else if at(3, b"NTFS    ") {
        Fs::Ntfs
    } else if at(3, b"EXFAT   ") {
        Fs::Exfat
    } else if at(510, &[0x55, 0xaa]) && (at(54, b"FAT") || at(82, b"FAT32")) {
        Fs::Vfat
    } else if at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE") {
        Fs::Swap
    } else {
        Fs::Unknown
    })
}

/// How a filesystem is mounted read-only here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mounter {
    /// mount(2) with this type and these options (MS_RDONLY is always added).
    Kernel {
        fstype: &'static str,
        data: &'static str,
    },
    /// The ntfs-3g program, read-only.
    Ntfs3g(PathBuf),
}

/// The filesystem types this kernel has (/proc/filesystems).
pub fn kernel_filesystems() -> Vec<String> {
    std::fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .collect()
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// How to mount `fs` read-only without replaying a journal, or why it stays raw (one line).
pub fn mounter(fs: Fs, kernel: &[String]) -> Result<Mounter, String> {
    let has = |t: &str| kernel.iter().any(|k| k == t);
    let kernel_fs = |fstype: &'static str, data: &'static str| {
        if has(fstype) {
            Ok(Mounter::Kernel { fstype, data })
        } else {
            Err(format!("this kernel has no {fstype} driver"))
        }
    };
    match fs {
        // The ext4 driver mounts ext2 and ext3 too; noload skips the journal replay, which
        // would otherwise need to write.
        Fs::Ext => kernel_fs("ext4", "noload"),
        // nouuid: a backup of a mounted xfs carries the same UUID, which xfs refuses otherwise.
        Fs::Xfs => kernel_fs("xfs", "norecovery,nouuid"),
        Fs::Btrfs => kernel_fs("btrfs", ""),
        Fs::Ntfs => match find_program("ntfs-3g") {
            Some(p) => Ok(Mounter::Ntfs3g(p)),
            None => Err("ntfs-3g is not installed".into()),
        },
        Fs::Vfat => kernel_fs("vfat", "")
            .map_err(|e| format!("{e}; mtools reads it: mdir -i FILE ::, mcopy -i FILE ::/PATH .")),
        Fs::Exfat => kernel_fs("exfat", ""),
        Fs::Luks => Err("encrypted (LUKS): open the raw file with cryptsetup".into()),
        Fs::Swap => Err("swap space, no files".into()),
        Fs::Unknown => Err("no filesystem cairn can mount recognised".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn with(at: usize, magic: &[u8], size: usize) -> Cursor<Vec<u8>> {
        let mut v = vec![0u8; size];
        v[at..at + magic.len()].copy_from_slice(magic);
        Cursor::new(v)
    }

    #[test]
    fn signatures() {
        let size = 1 << 20;
        let p = |mut c: Cursor<Vec<u8>>| probe(&mut c, size as u64).unwrap();
        assert_eq!(p(with(1080, &[0x53, 0xef], size)), Fs::Ext);
        assert_eq!(p(with(0, b"XFSB", size)), Fs::Xfs);
        assert_eq!(p(with(65600, b"_BHRfS_M", size)), Fs::Btrfs);
        assert_eq!(p(with(3, b"NTFS    ", size)), Fs::Ntfs);
        let mut fat = with(82, b"FAT32   ", size).into_inner();
        fat[510..512].copy_from_slice(&[0x55, 0xaa]);
        assert_eq!(p(Cursor::new(fat)), Fs::Vfat);
        assert_eq!(p(with(0, b"LUKS\xba\xbe", size)), Fs::Luks);
        assert_eq!(p(Cursor::new(vec![0u8; size])), Fs::Unknown);
        // A partition smaller than the probed head.
        assert_eq!(p(Cursor::new(vec![0u8; 100])), Fs::Unknown);
    }

    #[test]
    fn mounters() {
        let k: Vec<String> = ["ext4", "xfs"].map(String::from).to_vec();
        assert_eq!(
            mounter(Fs::Ext, &k),
            Ok(Mounter::Kernel {
                fstype: "ext4",
                data: "noload"
            })
        );
        let fat = mounter(Fs::Vfat, &k).unwrap_err();
        assert!(
            fat.contains("no vfat driver") && fat.contains("mtools"),
            "{fat}"
        );
        assert!(mounter(Fs::Btrfs, &k).is_err());
    }
}
