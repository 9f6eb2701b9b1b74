//! The fallback backend: pread/pwrite, one transfer at a time, in submission order — with O_DIRECT
//! when io_uring alone is unavailable, buffered when O_DIRECT is refused or CAIRN_IO=sync.

use super::queue::{transfer_blocking, validate, Completion, IoQueue, Request};
use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

pub struct SyncQueue {
    fd: RawFd,
    depth: usize,
    pending: VecDeque<Request>,
    why: String,
}

impl SyncQueue {
    /// `fd` must stay open for the queue's lifetime (the caller owns the File).
    pub fn new(fd: RawFd, depth: usize, why: String) -> Self {
        SyncQueue {
            fd,
            depth: depth.max(1),
            pending: VecDeque::new(),
            why,
        }
    }
}

impl IoQueue for SyncQueue {
    fn depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.pending.len()
    }

    fn submit(&mut self, req: Request) -> io::Result<()> {
        validate(&req)?;
        if self.pending.len() >= self.depth {
            return Err(io::Error::other("I/O queue full"));
        }
        self.pending.push_back(req);
        Ok(())
    }

    fn wait(&mut self) -> io::Result<Completion> {
        let mut req = self
            .pending
            .pop_front()
            .ok_or_else(|| io::Error::other("wait on an empty I/O queue"))?;
        let result = transfer_blocking(
            self.fd,
            req.op,
            req.offset,
            &mut req.buf,
            req.start,
            req.len,
            req.want,
        );
        Ok(Completion {
            tag: req.tag,
            offset: req.offset,
            buf: req.buf,
            result,
        })
    }

    fn describe(&self) -> String {
        format!("pread/pwrite ({})", self.why)
    }
}
