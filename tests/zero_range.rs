//! Zeroing ranges on block devices (issue 8): the kernel zeroes whole logical sectors only, so on a
//! 4Kn target (and on a 512n one, for ranges not aligned to 512) `device::zero_range` must zero
//! exactly the bytes asked for: the aligned middle by BLKZEROOUT, the unaligned edges written as
//! zero bytes, nothing around them touched, and never an EINVAL.

mod common;

use cairn::device::{self, buf::AlignedBuf, DeviceInfo};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

const SIZE: u64 = 1 << 20;
const FILL: u8 = 0xff;

fn attach(dir: &Path, sector: u32) -> common::LoopDev {
    let backing = dir.join(format!("disk-{sector}.img"));
    std::fs::write(&backing, vec![FILL; SIZE as usize]).unwrap();
    let lo = common::LoopDev::attach_with(&backing, &["--sector-size", &sector.to_string()]);
    let info = DeviceInfo::probe(lo.path()).unwrap();
    assert_eq!(
        info.logical_sector_size, sector,
        "precondition missing: losetup --sector-size {sector} did not give {} that sector size",
        lo.dev
    );
    lo
}

fn refill(dev: &Path) {
    let f = OpenOptions::new().write(true).open(dev).unwrap();
    f.write_all_at(&vec![FILL; SIZE as usize], 0).unwrap();
    f.sync_all().unwrap();
}

/// The device's bytes as the disk holds them (O_DIRECT: no page cache in the way).
fn read_device(dev: &Path) -> Vec<u8> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap();
    let mut buf = AlignedBuf::new(SIZE as usize, 0);
    f.read_exact_at(buf.as_mut_slice(), 0).unwrap();
    buf.as_slice().to_vec()
}

fn assert_exactly_zeroed(content: &[u8], range: (u64, u64), what: &str) {
    let (start, end) = (range.0 as usize, range.1 as usize);
    if let Some(i) = content[start..end].iter().position(|&b| b != 0) {
        panic!("{what}: byte {} inside the range is not zero", start + i);
    }
    let outside = content[..start]
        .iter()
        .enumerate()
        .chain(content[end..].iter().enumerate().map(|(i, b)| (end + i, b)));
    for (i, &b) in outside {
        assert_eq!(b, FILL, "{what}: byte {i} outside the range changed");
    }
}

/// Zeroes `range` through a buffered descriptor, as restore does, and checks the device.
fn zero_and_check(dev: &Path, range: (u64, u64), what: &str) {
    refill(dev);
    let f = OpenOptions::new().read(true).write(true).open(dev).unwrap();
    device::zero_range(&f, true, range.0, range.1 - range.0)
        .unwrap_or_else(|e| panic!("{what}: zeroing [{}, {}) failed: {e:#}", range.0, range.1));
    f.sync_all().unwrap();
    drop(f);
    assert_exactly_zeroed(&read_device(dev), range, what);
}

const RANGES: [(u64, u64); 6] = [
    (1000, 9000),
    (100, 200),
    (4096, 8192),
    (0, 5000),
    (SIZE - 1000, SIZE),
    (4095, 4097),
];

#[test]
fn unaligned_ranges_on_a_4kn_device_are_zeroed_exactly() {
    let dir = common::tempdir();
    let lo = attach(dir.path(), 4096);
    for range in RANGES {
        zero_and_check(
            lo.path(),
            range,
            &format!("4Kn, [{}, {})", range.0, range.1),
        );
    }
}

#[test]
fn unaligned_ranges_on_a_512n_device_are_zeroed_exactly() {
    let dir = common::tempdir();
    let lo = attach(dir.path(), 512);
    for range in RANGES {
        zero_and_check(
            lo.path(),
            range,
            &format!("512n, [{}, {})", range.0, range.1),
        );
    }
}

/// Restore holds the target exclusively (its O_DIRECT queue) and writes unaligned pieces and
/// zeroes through a second, buffered descriptor. A buffered write just before a zeroed range
/// leaves a dirty page that BLKZEROOUT must drop: the kernel refuses that with EBUSY while another
/// descriptor holds the device exclusively, unless the page was written back first.
#[test]
fn zeroing_next_to_a_fresh_buffered_write_on_an_exclusively_held_device() {
    let dir = common::tempdir();
    let lo = attach(dir.path(), 512);
    refill(lo.path());
    let exclusive = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_EXCL | libc::O_DIRECT)
        .open(lo.path())
        .unwrap();
    let buffered = OpenOptions::new()
        .read(true)
        .write(true)
        .open(lo.path())
        .unwrap();
    buffered.write_all_at(&[0xAA; 1024], 0).unwrap();
    device::zero_range(&buffered, true, 1024, 16384 - 1024)
        .unwrap_or_else(|e| panic!("zeroing beside a dirty page failed: {e:#}"));
    buffered.sync_all().unwrap();
    drop((buffered, exclusive));
    let content = read_device(lo.path());
    assert!(content[..1024].iter().all(|&b| b == 0xAA));
    assert!(content[1024..16384].iter().all(|&b| b == 0));
    assert!(content[16384..].iter().all(|&b| b == FILL));
}

#[test]
fn an_o_direct_descriptor_gets_an_error_for_unaligned_edges_not_a_wrong_result() {
    let dir = common::tempdir();
    let lo = attach(dir.path(), 4096);
    refill(lo.path());
    let direct: File = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(lo.path())
        .unwrap();
    let err = device::zero_range(&direct, true, 1000, 8000).unwrap_err();
    assert!(
        format!("{err:#}").contains("O_DIRECT"),
        "the error should say why: {err:#}"
    );
    assert!(
        read_device(lo.path()).iter().all(|&b| b == FILL),
        "a refused zeroing must change nothing"
    );
    device::zero_range(&direct, true, 4096, 8192).unwrap();
    drop(direct);
    assert_exactly_zeroed(&read_device(lo.path()), (4096, 12288), "aligned, O_DIRECT");
}
