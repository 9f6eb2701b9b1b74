//! Reading failing disks: which read errors are a bad sector (narrowed down and tolerated) and which
//! mean the device itself is gone (abort); narrowing a failed read down to the unreadable sectors;
//! and a way for tests to make chosen ranges fail.
//!
//! # Which errors are bad sectors
//! With O_DIRECT (cairn's reads of block devices) a failed bio reaches user space as
//! `blk_status_to_errno()` of its status (block/blk-core.c, `blk_errors[]`):
//! - `EIO` (`BLK_STS_IOERR`, everything a driver does not classify further, e.g. dm-error, most ATA
//!   and USB bridge read failures), `ENODATA` (`BLK_STS_MEDIUM`, "critical medium": SCSI MEDIUM ERROR,
//!   NVMe unrecovered read error) and `EILSEQ` (`BLK_STS_PROTECTION`: the sector's integrity data
//!   does not match) are media errors: bisected down to the sectors and recorded.
//! - `ETIMEDOUT` (`BLK_STS_TIMEOUT`) is tolerated too: a drive without error recovery control
//!   retries a weak sector internally until the command times out, so on a dying disk a timeout
//!   is usually a bad sector. The size check below tells it apart from a vanished drive.
//! - Everything else aborts the backup, because it says nothing about the sectors and bisecting
//!   would record good data as lost: `ENODEV` (`BLK_STS_OFFLINE`, a device taken offline), `ENXIO`,
//!   `ENOMEDIUM`, `ESHUTDOWN` (device gone, medium removed, transport shut down), `ENOLINK`
//!   (`BLK_STS_TRANSPORT`: the path failed, not the medium), `EREMOTEIO` (`BLK_STS_TARGET`: the
//!   target refused the command), `EBADE` (a reservation held by another host), `ENOMEM`, `EBUSY`,
//!   `EAGAIN` (kernel or device resources), `ETIME`, `EOPNOTSUPP`, `EINVAL`, and a short read (the
//!   source ended early: it shrank).
//!
//! A pulled disk often does not say so: once the kernel marks a disk dead, new bios fail with
//! plain `EIO` in `bio_queue_enter()` and buffered reads report every failure as `EIO`. But marking
//! a disk dead sets its capacity to 0 (`__blk_mark_disk_dead()` in block/genhd.c), so after every
//! read error, and again at the end of the read, the source's size is checked on the open
//! descriptor (BLKGETSIZE64; fstat for a file): a source that changed size or vanished aborts.
//!
//! # Error injection
//! `CAIRN_FAULT_READ` is a comma-separated list of rules, for the failing-disk tests on machines
//! without device-mapper; unset, it costs nothing. All numbers are bytes.
//! - `START:LEN` — reads overlapping the range fail with EIO, as a failing disk's would;
//! - `ERRNO@START:LEN` — the same with another error, by name (`ENODEV`, `ENODATA`, ...) or number;
//! - `START:LEN/STRIDE*COUNT` (with or without `ERRNO@`) — COUNT such ranges, STRIDE apart: scattered
//!   bad sectors at no cost per range;
//! - `size=NEWSIZE@OFFSET` — once the reader reaches OFFSET the source reports NEWSIZE bytes (and reads
//!   past NEWSIZE come back short), as a device that shrank or grew under the backup.

use super::queue::{Completion, IoQueue, Op, Request};
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};

/// One injected failing range, possibly repeated.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    errno: i32,
    start: u64,
    len: u64,
    stride: u64,
    count: u64,
}

impl Rule {
    /// The error of the first repetition overlapping `[offset, offset+len)`, in O(1).
    fn hits(&self, offset: u64, len: u64) -> bool {
        if self.len == 0 || len == 0 || self.count == 0 {
            return false;
        }
        // The first repetition k whose end lies past `offset`.
        let k = if offset < self.start + self.len {
            0
        } else {
            (offset - self.start - self.len) / self.stride.max(1) + 1
        };
        k < self.count && self.start + k * self.stride < offset + len
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    rules: Vec<Rule>,
    /// (offset, new size): the source changes size once the reader gets to offset.
    resize: Option<(u64, u64)>,
}

impl Faults {
    pub fn from_env() -> Option<Faults> {
        let v = std::env::var("CAIRN_FAULT_READ").ok()?;
        match Faults::parse(&v) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!("CAIRN_FAULT_READ ignored: {e}");
                None
            }
        }
    }

    pub fn parse(spec: &str) -> Result<Faults, String> {
        let mut f = Faults::default();
        let num = |s: &str| {
            s.trim()
                .parse::<u64>()
                .map_err(|_| format!("{s:?} is not a number"))
        };
        for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            if let Some(rest) = item.strip_prefix("size=") {
                let (size, at) = rest
                    .split_once('@')
                    .ok_or_else(|| format!("{item:?}: expected size=NEWSIZE@OFFSET"))?;
                f.resize = Some((num(at)?, num(size)?));
                continue;
            }
            let (errno, range) = match item.split_once('@') {
                Some((e, r)) => (
                    errno_by_name(e.trim()).ok_or_else(|| format!("unknown errno {e:?}"))?,
                    r,
                ),
                None => (libc::EIO, item),
            };
            let (range, repeat) = match range.split_once('/') {
                Some((r, rep)) => {
                    let (stride, count) = rep
                        .split_once('*')
                        .ok_or_else(|| format!("{item:?}: expected START:LEN/STRIDE*COUNT"))?;
                    (r, Some((num(stride)?, num(count)?)))
                }
                None => (range, None),
            };
            let (start, len) = range
                .split_once(':')
                .ok_or_else(|| format!("{item:?}: expected START:LEN"))?;
            let (start, len) = (num(start)?, num(len)?);
            let (stride, count) = repeat.unwrap_or((len, 1));
            if count > 1 && stride < len {
                return Err(format!("{item:?}: the stride is shorter than the range"));
            }
            f.rules.push(Rule {
                errno,
                start,
                len,
                stride,
                count,
            });
        }
        if f.rules.is_empty() && f.resize.is_none() {
            return Err("no rules".into());
        }
        Ok(f)
    }

    /// The error a read of `[offset, offset+len)` fails with, if any. A read reaching past an
    /// injected new size fails as a short read does.
    pub fn error_for(&self, offset: u64, len: u64) -> Option<io::Error> {
        if let Some((at, size)) = self.resize {
            if offset >= at && offset + len > size {
                return Some(short_read());
            }
        }
        self.rules
            .iter()
            .find(|r| r.hits(offset, len))
            .map(|r| io::Error::from_raw_os_error(r.errno))
    }

    /// The size the source reports once the reader has reached `reached`, if injected.
    pub fn size_at(&self, reached: u64) -> Option<u64> {
        self.resize
            .and_then(|(at, size)| (reached >= at).then_some(size))
    }
}

fn short_read() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "short read (did the source shrink?)",
    )
}

fn errno_by_name(name: &str) -> Option<i32> {
    if let Ok(n) = name.parse::<i32>() {
        return Some(n);
    }
    let known = [
        ("EIO", libc::EIO),
        ("ENODATA", libc::ENODATA),
        ("EILSEQ", libc::EILSEQ),
        ("ETIMEDOUT", libc::ETIMEDOUT),
        ("ENODEV", libc::ENODEV),
        ("ENXIO", libc::ENXIO),
        ("ENOMEDIUM", libc::ENOMEDIUM),
        ("ESHUTDOWN", libc::ESHUTDOWN),
        ("ENOLINK", libc::ENOLINK),
        ("EREMOTEIO", libc::EREMOTEIO),
        ("EBADE", libc::EBADE),
        ("ENOMEM", libc::ENOMEM),
        ("EBUSY", libc::EBUSY),
        ("EINVAL", libc::EINVAL),
    ];
    known.iter().find(|(n, _)| *n == name).map(|&(_, e)| e)
}

/// What a read error means for the backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Unreadable sectors: narrow them down and carry on.
    Media,
    /// The device or its path failed, or the source ended early: abort.
    Fatal,
}

/// See the module documentation for why each errno is where it is.
pub fn classify(e: &io::Error) -> ErrorClass {
    match e.raw_os_error() {
        Some(libc::EIO | libc::ENODATA | libc::EILSEQ | libc::ETIMEDOUT) => ErrorClass::Media,
        _ => ErrorClass::Fatal,
    }
}

/// "ENODEV (No such device)" for an OS error, the error's text otherwise.
pub fn describe(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => {
            let errno = nix::errno::Errno::from_raw(n);
            format!("{errno:?}: {}", errno.desc())
        }
        None => e.to_string(),
    }
}

/// Whether an error says the device itself is gone (as opposed to refusing or failing a command).
pub fn means_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENODEV | libc::ENXIO | libc::ENOMEDIUM | libc::ESHUTDOWN)
    )
}

mod ioctl {
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
}

/// The source's size now, on the open descriptor: BLKGETSIZE64 for a block device (0 once the
/// kernel has marked a removed disk dead), the file size for a file. `faults` may override it.
pub fn current_size(file: &File, faults: Option<&Faults>, reached: u64) -> io::Result<u64> {
    if let Some(size) = faults.and_then(|f| f.size_at(reached)) {
        return Ok(size);
    }
    let meta = file.metadata()?;
    if !meta.file_type().is_block_device() {
        return Ok(meta.len());
    }
    let mut size = 0u64;
    // SAFETY: the descriptor is open for as long as `file` lives; the ioctl writes one u64 into
    // `size`, which outlives the call.
    unsafe { ioctl::blkgetsize64(file.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
    Ok(size)
}

/// An I/O queue whose reads fail where the injected faults say.
pub struct FaultyQueue {
    pub inner: Box<dyn IoQueue>,
    pub faults: Faults,
    failed: VecDeque<Completion>,
}

impl FaultyQueue {
    pub fn new(inner: Box<dyn IoQueue>, faults: Faults) -> Self {
        FaultyQueue {
            inner,
            faults,
            failed: VecDeque::new(),
        }
    }
}

impl IoQueue for FaultyQueue {
    fn depth(&self) -> usize {
        self.inner.depth()
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.failed.len()
    }

    fn submit(&mut self, req: Request) -> io::Result<()> {
        if req.op == Op::Read {
            if let Some(e) = self.faults.error_for(req.offset, req.want as u64) {
                self.failed.push_back(Completion {
                    tag: req.tag,
                    offset: req.offset,
                    buf: req.buf,
                    result: Err(e),
                });
                return Ok(());
            }
        }
        self.inner.submit(req)
    }

    fn wait(&mut self) -> io::Result<Completion> {
        match self.failed.pop_front() {
            Some(c) => Ok(c),
            None => self.inner.wait(),
        }
    }

    fn describe(&self) -> String {
        format!("{} with injected read errors", self.inner.describe())
    }
}

/// Reads `buf.len()` bytes at `offset` the slow, careful way after a failed read: retry once,
/// then split the range in halves down to single `sector`s, so only what is really unreadable
/// is lost. Unreadable sectors are zero-filled in `buf`; their (offset, length) are returned,
/// merged. `buf` must be aligned for the descriptor (O_DIRECT) at every sector boundary.
/// An error that is not a media error (see [`classify`]) stops the narrowing and is returned.
pub fn read_around_errors(
    file: &File,
    offset: u64,
    buf: &mut [u8],
    sector: usize,
    faults: Option<&Faults>,
) -> io::Result<Vec<(u64, u64)>> {
    let mut bad: Vec<(u64, u64)> = Vec::new();
    narrow(file, offset, buf, sector.max(512), faults, 2, &mut bad)?;
    Ok(bad)
}

/// Ok(true) read, Ok(false) a media error, Err anything else.
fn try_read(file: &File, offset: u64, buf: &mut [u8], faults: Option<&Faults>) -> io::Result<bool> {
    let result = match faults.and_then(|f| f.error_for(offset, buf.len() as u64)) {
        Some(e) => Err(e),
        None => file.read_exact_at(buf, offset),
    };
    match result {
        Ok(()) => Ok(true),
        Err(e) if classify(&e) == ErrorClass::Media => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(short_read()),
        Err(e) => Err(e),
    }
}

fn narrow(
    file: &File,
    offset: u64,
    buf: &mut [u8],
    sector: usize,
    faults: Option<&Faults>,
    attempts: u32,
    bad: &mut Vec<(u64, u64)>,
) -> io::Result<()> {
    for _ in 0..attempts {
        if try_read(file, offset, buf, faults)? {
            return Ok(());
        }
    }
    if buf.len() <= sector {
        buf.fill(0);
        match bad.last_mut() {
            Some((s, l)) if *s + *l == offset => *l += buf.len() as u64,
            _ => bad.push((offset, buf.len() as u64)),
        }
        return Ok(());
    }
    let half = (buf.len() / 2).div_ceil(sector) * sector;
    let (a, b) = buf.split_at_mut(half.min(buf.len()));
    narrow(file, offset, a, sector, faults, 1, bad)?;
    narrow(file, offset + a.len() as u64, b, sector, faults, 1, bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn narrows_to_the_bad_sectors() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![7u8; 1 << 20]).unwrap();
        let faults = Faults::parse(&format!("{}:1024,700000:1", 4096 + 512)).unwrap();
        let mut buf = vec![1u8; 1 << 20];
        let bad = read_around_errors(&f, 0, &mut buf, 512, Some(&faults)).unwrap();
        assert_eq!(bad, vec![(4608, 1024), (699_904, 512)]);
        assert!(buf[4608..5632].iter().all(|&b| b == 0));
        assert!(buf[..4608].iter().all(|&b| b == 7));
        assert!(buf[5632..699_904].iter().all(|&b| b == 7));
        assert!(buf[700_416..].iter().all(|&b| b == 7));
    }

    #[test]
    fn a_device_error_stops_the_narrowing() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![7u8; 1 << 16]).unwrap();
        let faults = Faults::parse("ENODATA@512:512,ENODEV@8192:1").unwrap();
        let mut buf = vec![1u8; 1 << 16];
        let e = read_around_errors(&f, 0, &mut buf, 512, Some(&faults)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENODEV));
        let mut buf = vec![1u8; 4096];
        let bad = read_around_errors(&f, 0, &mut buf, 512, Some(&faults)).unwrap();
        assert_eq!(bad, vec![(512, 512)], "ENODATA is a media error");
    }

    #[test]
    fn repeated_rules_hit_every_repetition_and_nothing_between() {
        let f = Faults::parse("EILSEQ@1024:512/2048*3").unwrap();
        let hit = |o, l| f.error_for(o, l).map(|e| e.raw_os_error().unwrap());
        assert_eq!(hit(0, 1024), None);
        assert_eq!(hit(1024, 1), Some(libc::EILSEQ));
        assert_eq!(hit(1536, 1536), None);
        assert_eq!(hit(1536, 1537), Some(libc::EILSEQ));
        assert_eq!(hit(5120, 512), Some(libc::EILSEQ));
        assert_eq!(hit(5632, 1 << 20), None, "only three repetitions");
        assert_eq!(hit(0, 1 << 20), Some(libc::EILSEQ));
    }

    #[test]
    fn specs_parse_or_say_why_not() {
        assert!(Faults::parse("EWHAT@0:1").is_err());
        assert!(Faults::parse("0:512/100*2").is_err());
        assert!(Faults::parse("").is_err());
        let f = Faults::parse("size=4096@8192").unwrap();
        assert_eq!(f.size_at(0), None);
        assert_eq!(f.size_at(8192), Some(4096));
        assert_eq!(
            f.error_for(8192, 512).map(|e| e.kind()),
            Some(io::ErrorKind::UnexpectedEof)
        );
        assert!(f.error_for(0, 8192).is_none());
        assert_eq!(
            classify(&io::Error::from_raw_os_error(libc::ENODEV)),
            ErrorClass::Fatal
        );
        assert_eq!(
            classify(&io::Error::from_raw_os_error(libc::ENODATA)),
            ErrorClass::Media
        );
        assert_eq!(classify(&short_read()), ErrorClass::Fatal);
    }
}
