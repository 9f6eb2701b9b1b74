//! Dropping an io_uring queue while O_DIRECT transfers are in flight (issue 8): the buffers of
//! those transfers must not be freed before the kernel has finished with them, or a read lands in
//! memory that is already something else, and a write sends to the disk whatever that memory
//! has become.
//!
//! Each round submits a full queue of O_DIRECT transfers on a file on ext4 and drops the queue at
//! once. Right after the drop the test allocates buffers of the same size (glibc hands the freed
//! memory straight back) and fills them with a pattern, then waits until no direct I/O is left on
//! the file: ext4 waits for every direct transfer in flight before it changes a file's size. From
//! that point nothing can write those buffers any more, so the pattern must be intact, and the
//! file must hold nothing but its old bytes or the bytes the writes carried. The drop's own
//! report (`uring::last_teardown`) must say it reaped every request it had in flight.

mod common;

use cairn::device::buf::{self, AlignedBuf};
use cairn::device::queue::{IoQueue, Op, Request};
use cairn::device::uring::{self, Teardown, UringQueue};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Below glibc's mmap threshold, so a freed buffer goes back to the heap and the next allocation
/// of the same size reuses it: what a use-after-free needs to become visible.
const BUF: usize = 64 << 10;
const DEPTH: usize = 32;
const FILE_LEN: u64 = 64 << 20;
const ROUNDS: usize = 100;
/// The file's bytes before any write.
const OLD: u8 = 0xC3;
/// The bytes the writes carry.
const NEW: u8 = 0x11;
/// Memory allocated after the drop.
const FILL: u8 = 0x5A;

fn pattern_file(path: &Path) -> File {
    let mut f = File::create(path).unwrap();
    let chunk = vec![OLD; 1 << 20];
    for _ in 0..FILE_LEN / (1 << 20) {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("precondition missing: O_DIRECT on {}: {e}", path.display()))
}

fn new_queue(file: &File, buffers: &[AlignedBuf], register: bool) -> UringQueue {
    let registered: &[AlignedBuf] = if register { buffers } else { &[] };
    UringQueue::new(file.as_raw_fd(), DEPTH, registered)
        .unwrap_or_else(|e| panic!("precondition missing: io_uring is unavailable: {e}"))
}

fn request(op: Op, i: usize, offset: u64, buf: AlignedBuf) -> Request {
    Request {
        op,
        tag: i as u64,
        offset,
        start: 0,
        len: BUF,
        want: BUF,
        buf,
    }
}

fn offset_of(round: usize, i: usize) -> u64 {
    ((round * DEPTH + i) as u64 % (FILE_LEN / BUF as u64)) * BUF as u64
}

fn ranges_of(buffers: &[AlignedBuf]) -> Vec<Range<usize>> {
    buffers
        .iter()
        .map(|b| b.as_ptr() as usize..b.as_ptr() as usize + b.capacity())
        .collect()
}

/// Returns once no direct transfer is running on `file` any more: ext4 (and xfs) wait for all
/// direct I/O in flight before changing a file's size.
fn wait_for_direct_io(file: &File) {
    file.set_len(FILE_LEN + BUF as u64).unwrap();
    file.set_len(FILE_LEN).unwrap();
}

/// Allocates what the dropped queue's buffers were likely to become, fills it, waits until the
/// kernel cannot be writing into it any more, and checks the fill. Returns how many of the new
/// buffers overlap memory the dropped queue freed (the cases where a use-after-free would show).
fn check_memory_after_drop(file: &File, freed: &[Range<usize>], what: &str) -> usize {
    let mut fresh = buf::pool(DEPTH, BUF);
    for b in &mut fresh {
        b.as_mut_slice().fill(FILL);
    }
    wait_for_direct_io(file);
    let mut reused = 0;
    for (i, b) in fresh.iter().enumerate() {
        let at = b.as_ptr() as usize..b.as_ptr() as usize + b.capacity();
        if freed.iter().any(|f| f.start < at.end && at.start < f.end) {
            reused += 1;
        }
        if let Some(pos) = b.as_slice().iter().position(|&x| x != FILL) {
            panic!(
                "{what}: memory allocated after the queue was dropped was overwritten \
                 (buffer {i}, byte {pos} is {:#x}, not {FILL:#x}): the kernel still wrote a buffer \
                 the queue had freed",
                b.as_slice()[pos]
            );
        }
    }
    reused
}

fn assert_file_holds_only(path: &Path, allowed: &[u8], what: &str) {
    let f = File::open(path).unwrap();
    let mut chunk = vec![0u8; 1 << 20];
    for n in 0..FILE_LEN / (1 << 20) {
        f.read_exact_at(&mut chunk, n << 20).unwrap();
        if let Some(pos) = chunk.iter().position(|x| !allowed.contains(x)) {
            panic!(
                "{what}: byte {} of the file is {:#x}; only {allowed:x?} were ever written there",
                (n << 20) + pos as u64,
                chunk[pos]
            );
        }
    }
}

fn assert_reaped_everything(report: Option<Teardown>, what: &str) -> Teardown {
    let report = report.unwrap_or_else(|| panic!("{what}: no queue was dropped on this thread"));
    assert!(
        report.in_flight > 0,
        "{what}: the queue had nothing in flight when dropped, so the test proves nothing"
    );
    assert_eq!(
        (report.reaped, report.leaked),
        (report.in_flight, 0),
        "{what}: the drop must reap a completion for every request in flight before freeing: {report:?}"
    );
    report
}

fn drop_with_transfers_in_flight(op: Op, register: bool) {
    let dir = common::tempdir();
    let path = dir.path().join("target.img");
    let file = pattern_file(&path);
    let what = format!(
        "{op:?} ({})",
        if register {
            "registered buffers"
        } else {
            "unregistered buffers"
        }
    );
    let mut reused = 0;
    for round in 0..ROUNDS {
        let mut buffers = buf::pool(DEPTH, BUF);
        for b in &mut buffers {
            b.as_mut_slice().fill(NEW);
        }
        let mut queue = new_queue(&file, &buffers, register);
        let freed = ranges_of(&buffers);
        for (i, b) in buffers.into_iter().enumerate() {
            queue
                .submit(request(op, i, offset_of(round, i), b))
                .unwrap();
        }
        assert_eq!(queue.in_flight(), DEPTH);
        drop(queue);
        let report = uring::last_teardown();
        reused += check_memory_after_drop(&file, &freed, &what);
        assert_reaped_everything(report, &what);
    }
    if op == Op::Write {
        assert_file_holds_only(&path, &[OLD, NEW], &what);
    }
    assert!(
        reused > 0,
        "{what}: no buffer allocated after a drop reused the dropped queue's memory, so this test \
         cannot see a use-after-free (allocator behaviour changed?)"
    );
}

#[test]
fn dropping_a_queue_with_reads_in_flight_frees_no_buffer_the_kernel_writes() {
    drop_with_transfers_in_flight(Op::Read, true);
    drop_with_transfers_in_flight(Op::Read, false);
}

#[test]
fn dropping_a_queue_with_writes_in_flight_frees_no_buffer_the_kernel_reads() {
    drop_with_transfers_in_flight(Op::Write, true);
    drop_with_transfers_in_flight(Op::Write, false);
}

/// Reads the whole queue's worth and stops at the first failed completion with `?`, the way the
/// backup reader does: the queue is dropped by the early return with the other reads in flight.
/// The first request reads past the end of the file, so it fails (a short read) at once.
fn read_until_error(file: &File, round: usize, freed: &mut Vec<Range<usize>>) -> io::Result<()> {
    let buffers = buf::pool(DEPTH, BUF);
    *freed = ranges_of(&buffers);
    let mut queue = new_queue(file, &buffers, true);
    for (i, b) in buffers.into_iter().enumerate() {
        let offset = if i == 0 {
            FILE_LEN + BUF as u64
        } else {
            offset_of(round, i)
        };
        queue.submit(request(Op::Read, i, offset, b))?;
    }
    loop {
        let c = queue.wait()?;
        c.result?;
    }
}

#[test]
fn a_read_error_returns_early_without_freeing_buffers_in_flight() {
    let dir = common::tempdir();
    let path = dir.path().join("source.img");
    let file = pattern_file(&path);
    let mut reused = 0;
    for round in 0..ROUNDS {
        let mut freed = Vec::new();
        let err = read_until_error(&file, round, &mut freed).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        let report = uring::last_teardown();
        reused += check_memory_after_drop(&file, &freed, "early return after a read error");
        assert_reaped_everything(report, "early return after a read error");
    }
    assert!(
        reused > 0,
        "no buffer allocated after a drop reused freed memory"
    );
}

/// Writes to a device until one write fails, as restore's writer does on a full disk: the first
/// write lands past the end of the device, which answers ENOSPC.
fn write_until_error(device: &File, size: u64) -> io::Result<()> {
    let mut buffers = buf::pool(DEPTH, BUF);
    for b in &mut buffers {
        b.as_mut_slice().fill(NEW);
    }
    let mut queue = new_queue(device, &buffers, true);
    for (i, b) in buffers.into_iter().enumerate() {
        let offset = if i == 0 {
            size
        } else {
            (i as u64 * BUF as u64) % size
        };
        queue.submit(request(Op::Write, i, offset, b))?;
    }
    loop {
        let c = queue.wait()?;
        c.result?;
    }
}

#[test]
fn a_full_device_returns_early_without_freeing_buffers_in_flight() {
    let dir = common::tempdir();
    let size = 8 << 20;
    let lo = common::LoopDev::new_zeroed(&dir.path().join("disk.img"), size);
    let device = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(lo.path())
        .unwrap();
    for _ in 0..ROUNDS {
        let err = write_until_error(&device, size).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        assert_reaped_everything(uring::last_teardown(), "early return on a full device");
    }
    drop(device);
    let mut content = vec![0u8; size as usize];
    File::open(lo.path())
        .unwrap()
        .read_exact_at(&mut content, 0)
        .unwrap();
    let end = DEPTH * BUF;
    assert!(
        content[BUF..end].iter().all(|&b| b == 0 || b == NEW),
        "the device holds bytes no write carried"
    );
    assert!(
        content[..BUF]
            .iter()
            .chain(&content[end..])
            .all(|&b| b == 0),
        "bytes outside every write changed"
    );
}
