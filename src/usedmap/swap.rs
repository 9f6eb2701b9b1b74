//! Linux swap: only the header page is used.
//!
//! Layout from the kernel's include/linux/swap.h (union swap_header: bootbits[1024], then version,
//! last_page, nr_badpages, uuid, volume name; the 10-byte magic ends the first page) and
//! util-linux's libblkid swap prober (the suspend signatures that replace the magic while a
//! hibernation image is stored in the area).
//!
//! A swap area's pages hold nothing that survives a reboot, unless the machine hibernated into it:
//! then the magic is replaced by a suspend signature and the whole area is imaged.

use super::{doubt, le32, Disk, Doubt, FsMap, Ranges};

const FS: &str = "swap";
/// Page sizes Linux uses on the architectures it runs on; the magic sits at the end of the first.
const PAGE_SIZES: [u64; 4] = [4096, 8192, 16384, 65536];
const SUSPEND: [&[u8]; 4] = [b"S1SUSPEND", b"S2SUSPEND", b"ULSUSPEND", b"LINHIB0001"];

fn signature(d: &Disk) -> Option<(u64, Vec<u8>)> {
    PAGE_SIZES.iter().find_map(|&p| {
        let tail = d.peek(p - 10, 10)?;
        let is_swap = &tail == b"SWAPSPACE2" || &tail == b"SWAP-SPACE";
        let is_suspend = SUSPEND.iter().any(|s| tail.starts_with(s));
        (is_swap || is_suspend).then_some((p, tail))
    })
}

pub(super) fn detect(d: &Disk) -> bool {
    signature(d).is_some()
}

pub(super) fn read(d: &Disk) -> Result<FsMap, Doubt> {
    let Some((page, magic)) = signature(d) else {
        return doubt(FS, "the swap signature changed while it was read");
    };
    if &magic == b"SWAP-SPACE" {
        return doubt(FS, "an old (version 0) swap area");
    }
    if &magic != b"SWAPSPACE2" {
        return doubt(
            FS,
            "the swap area holds a hibernation image (a suspend signature replaces the swap magic)",
        );
    }
    let h = d.read(FS, 0, page, "the swap header")?;
    let version = le32(&h, 1024);
    let last_page = u64::from(le32(&h, 1028));
    if version != 1 {
        return doubt(
            FS,
            format!("swap header version {version} (only 1 is known)"),
        );
    }
    if last_page == 0 {
        return doubt(FS, "the swap header's last page is 0");
    }
    // Pages past last_page are not part of the area: imaged as the space after a filesystem is.
    let fs_end = (last_page + 1).saturating_mul(page).min(d.size);
    let mut used = Ranges::new();
    used.add(0, page);
    Ok(FsMap {
        fs: FS,
        ranges: used,
        fs_end,
        note: format!(
            "{} pages of {page} bytes, only the header is used",
            last_page + 1
        ),
    })
}
