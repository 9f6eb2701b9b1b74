//! One I/O queue trait with two backends side by side: io_uring (O_DIRECT, registered buffers) and
//! plain pread/pwrite. Callers submit reads or writes of whole buffers and collect completions; they
//! never know which backend runs.

use super::buf::AlignedBuf;
use std::io;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
}

/// One submitted transfer. `len` bytes of the buffer, from `start`, are transferred at `offset`;
/// `start` and `len` must be aligned when the file is open with O_DIRECT. For reads, `want` is the number of bytes that must
/// arrive (less than `len` only at the end of a source whose size is not aligned).
pub struct Request {
    pub op: Op,
    pub tag: u64,
    pub offset: u64,
    pub start: usize,
    pub len: usize,
    pub want: usize,
    pub buf: AlignedBuf,
}

pub struct Completion {
    pub tag: u64,
    pub offset: u64,
    pub buf: AlignedBuf,
    /// Bytes transferred, or the error. The buffer always comes back.
    pub result: io::Result<usize>,
}

pub trait IoQueue: Send {
    /// Most transfers that may be in flight at once.
    fn depth(&self) -> usize;
    fn in_flight(&self) -> usize;
    /// Queues a transfer; from then on the queue owns its buffer until `wait` returns it. Fails
    /// (dropping the request) only when the request is invalid or the queue is full.
    fn submit(&mut self, req: Request) -> io::Result<()>;
    /// Blocks until one transfer finishes. Must only be called with transfers in flight.
    fn wait(&mut self) -> io::Result<Completion>;
    /// Short description for logs ("io_uring, O_DIRECT, registered buffers").
    fn describe(&self) -> String;
}

/// Finishes a transfer with plain syscalls, retrying short transfers and EINTR. Shared by the sync
/// backend and the io_uring backend's fallback for unaligned tails.
pub(crate) fn transfer_blocking(
    fd: std::os::fd::RawFd,
    op: Op,
    offset: u64,
    buf: &mut AlignedBuf,
    start: usize,
    len: usize,
    want: usize,
) -> io::Result<usize> {
    let mut done = 0usize;
    while done < len {
        let off = i64::try_from(offset + done as u64)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: the range [start + done, start + len) lies inside the buffer (checked by
        // `validate` for every Request), and the buffer is exclusively borrowed.
        let n = unsafe {
            match op {
                Op::Read => libc::pread(
                    fd,
                    buf.as_mut_ptr().add(start + done).cast(),
                    len - done,
                    off,
                ),
                Op::Write => {
                    libc::pwrite(fd, buf.as_ptr().add(start + done).cast(), len - done, off)
                }
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    check_done(op, done, len, want)
}

pub(crate) fn check_done(op: Op, done: usize, len: usize, want: usize) -> io::Result<usize> {
    match op {
        Op::Read if done < want => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("short read: {done} of {want} bytes (did the source shrink?)"),
        )),
        Op::Write if done < len => Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short write: {done} of {len} bytes"),
        )),
        _ => Ok(done),
    }
}

pub(crate) fn validate(req: &Request) -> io::Result<()> {
    if req
        .start
        .checked_add(req.len)
        .is_none_or(|end| end > req.buf.capacity())
        || req.want > req.len
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "transfer larger than its buffer",
        ));
    }
    Ok(())
}
