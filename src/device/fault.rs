//! Reading failing disks: narrowing a failed read down to the unreadable sectors, and a way for
//! tests to make chosen ranges fail.
//!
//! Error injection: `CAIRN_FAULT_READ="start:len[,start:len...]"` (bytes) makes every read that
//! overlaps one of those ranges fail with EIO, as a failing disk's would. It exists for the
//! failing-disk tests on machines without device-mapper; unset, it costs nothing.

use super::queue::{Completion, IoQueue, Op, Request};
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

#[derive(Debug, Clone, Default)]
pub struct Faults(Vec<(u64, u64)>);

impl Faults {
    pub fn from_env() -> Option<Faults> {
        let v = std::env::var("CAIRN_FAULT_READ").ok()?;
        let ranges: Vec<(u64, u64)> = v
            .split(',')
            .filter_map(|r| {
                let (a, b) = r.trim().split_once(':')?;
                Some((a.parse().ok()?, b.parse().ok()?))
            })
            .collect();
        (!ranges.is_empty()).then_some(Faults(ranges))
    }

    pub fn hits(&self, offset: u64, len: u64) -> bool {
        self.0
            .iter()
            .any(|&(s, l)| offset < s + l && s < offset + len)
    }
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
        if req.op == Op::Read && self.faults.hits(req.offset, req.len as u64) {
            let result = Err(io::Error::from_raw_os_error(libc::EIO));
            self.failed.push_back(Completion {
                tag: req.tag,
                offset: req.offset,
                buf: req.buf,
                result,
            });
            return Ok(());
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
pub fn read_around_errors(
    file: &File,
    offset: u64,
    buf: &mut [u8],
    sector: usize,
    faults: Option<&Faults>,
) -> Vec<(u64, u64)> {
    let mut bad: Vec<(u64, u64)> = Vec::new();
    narrow(file, offset, buf, sector.max(512), faults, 2, &mut bad);
    bad
}

fn try_read(file: &File, offset: u64, buf: &mut [u8], faults: Option<&Faults>) -> bool {
    if faults.is_some_and(|f| f.hits(offset, buf.len() as u64)) {
        return false;
    }
    file.read_exact_at(buf, offset).is_ok()
}

fn narrow(
    file: &File,
    offset: u64,
    buf: &mut [u8],
    sector: usize,
    faults: Option<&Faults>,
    attempts: u32,
    bad: &mut Vec<(u64, u64)>,
) {
    for _ in 0..attempts {
        if try_read(file, offset, buf, faults) {
            return;
        }
    }
    if buf.len() <= sector {
        buf.fill(0);
        match bad.last_mut() {
            Some((s, l)) if *s + *l == offset => *l += buf.len() as u64,
            _ => bad.push((offset, buf.len() as u64)),
        }
        return;
    }
    let half = (buf.len() / 2).div_ceil(sector) * sector;
    let (a, b) = buf.split_at_mut(half.min(buf.len()));
    narrow(file, offset, a, sector, faults, 1, bad);
    narrow(file, offset + a.len() as u64, b, sector, faults, 1, bad);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn narrows_to_the_bad_sectors() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![7u8; 1 << 20]).unwrap();
        let faults = Faults(vec![(4096 + 512, 1024), (700_000, 1)]);
        let mut buf = vec![1u8; 1 << 20];
        let bad = read_around_errors(&f, 0, &mut buf, 512, Some(&faults));
        assert_eq!(bad, vec![(4608, 1024), (699_904, 512)]);
        assert!(buf[4608..5632].iter().all(|&b| b == 0));
        assert!(buf[..4608].iter().all(|&b| b == 7));
        assert!(buf[5632..699_904].iter().all(|&b| b == 7));
        assert!(buf[700_416..].iter().all(|&b| b == 7));
    }
}
