//! The io_uring backend: O_DIRECT file, registered file and buffers, several transfers in flight.
//! No SQPOLL: on a 2-core machine a polling kernel thread costs a core for no gain (shared/notes).

use super::buf::AlignedBuf;
use super::queue::{check_done, validate, Completion, IoQueue, Op, Request};
use io_uring::{opcode, squeue, types, IoUring};
use std::io;
use std::os::fd::RawFd;

struct InFlight {
    req: Request,
    done: usize,
}

pub struct UringQueue {
    ring: IoUring,
    depth: usize,
    slots: Vec<Option<InFlight>>,
    in_flight: usize,
    /// Address of each registered buffer by slot; empty when registration was refused.
    registered: Vec<usize>,
}

impl UringQueue {
    /// Sets up a ring for `fd` (which must outlive the queue) and registers `buffers` when the
    /// kernel allows it. Fails when io_uring itself is unavailable (ENOSYS, or EPERM under seccomp).
    pub fn new(fd: RawFd, depth: usize, buffers: &[AlignedBuf]) -> io::Result<Self> {
        let depth = depth.clamp(1, 256);
        let entries = (depth as u32).next_power_of_two();
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .build(entries)
            .or_else(|_| IoUring::new(entries))?;
        ring.submitter().register_files(&[fd])?;
        let iovecs: Vec<libc::iovec> = buffers
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut _,
                iov_len: b.capacity(),
            })
            .collect();
        let mut registered = Vec::new();
        if !iovecs.is_empty() {
            // SAFETY: every iovec points at a live AlignedBuf allocation. The buffers are owned by
            // the pipeline for at least as long as this ring (they come back through completions
            // and are dropped after the queue); the kernel pins the pages, so a buffer freed
            // early cannot be written by the kernel into reused memory.
            match unsafe { ring.submitter().register_buffers(&iovecs) } {
                Ok(()) => registered = buffers.iter().map(|b| b.as_ptr() as usize).collect(),
                Err(e) => tracing::debug!(
                    "io_uring buffer registration refused ({e}); using unregistered buffers"
                ),
            }
        }
        let slots = (0..depth).map(|_| None).collect();
        Ok(UringQueue {
            ring,
            depth,
            slots,
            in_flight: 0,
            registered,
        })
    }

    fn is_registered(&self, buf: &AlignedBuf) -> bool {
        self.registered.get(usize::from(buf.slot())) == Some(&(buf.as_ptr() as usize))
    }

    fn push(&mut self, slot: usize) -> io::Result<()> {
        let registered =
            self.is_registered(&self.slots[slot].as_ref().expect("slot in use").req.buf);
        let f = self.slots[slot].as_mut().expect("slot in use");
        let done = f.done;
        let len = (f.req.len - done) as u32;
        let offset = f.req.offset + done as u64;
        let fixed_file = types::Fixed(0);
        let index = f.req.buf.slot();
        // SAFETY: the pointer stays inside the buffer (start + done < start + len <= capacity,
        // checked by validate), and the buffer is owned by the in-flight slot until its completion
        // is reaped.
        let ptr = unsafe { f.req.buf.as_mut_ptr().add(f.req.start + done) };
        let entry: squeue::Entry = match (f.req.op, registered) {
            (Op::Read, true) => opcode::ReadFixed::new(fixed_file, ptr, len, index)
                .offset(offset)
                .build(),
            (Op::Read, false) => opcode::Read::new(fixed_file, ptr, len)
                .offset(offset)
                .build(),
            (Op::Write, true) => opcode::WriteFixed::new(fixed_file, ptr, len, index)
                .offset(offset)
                .build(),
            (Op::Write, false) => opcode::Write::new(fixed_file, ptr, len)
                .offset(offset)
                .build(),
        };
        let entry = entry.user_data(slot as u64);
        // SAFETY: the entry's buffer and file remain valid until the completion (see above).
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        Ok(())
    }
}

impl IoQueue for UringQueue {
    fn depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn submit(&mut self, req: Request) -> io::Result<()> {
        validate(&req)?;
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or_else(|| io::Error::other("I/O queue full"))?;
        self.slots[slot] = Some(InFlight { req, done: 0 });
        if let Err(e) = self.push(slot) {
            self.slots[slot] = None;
            return Err(e);
        }
        self.in_flight += 1;
        self.ring.submit()?;
        Ok(())
    }

    fn wait(&mut self) -> io::Result<Completion> {
        loop {
            if self.in_flight == 0 {
                return Err(io::Error::other("wait on an empty I/O queue"));
            }
            let cqe = loop {
                if let Some(c) = self.ring.completion().next() {
                    break c;
                }
                match self.ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            };
            let slot = cqe.user_data() as usize;
            let res = cqe.result();
            let f = self
                .slots
                .get_mut(slot)
                .and_then(Option::as_mut)
                .ok_or_else(|| io::Error::other("io_uring completion for an unknown request"))?;
            if res == -libc::EINTR || res == -libc::EAGAIN {
                self.push(slot)?;
                self.ring.submit()?;
                continue;
            }
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                f.done += res as usize;
                let short =
                    f.done < f.req.len && res > 0 && (f.req.op == Op::Write || f.done < f.req.want);
                if short {
                    self.push(slot)?;
                    self.ring.submit()?;
                    continue;
                }
                check_done(f.req.op, f.done, f.req.len, f.req.want)
            };
            let f = self.slots[slot].take().expect("slot in use");
            self.in_flight -= 1;
            return Ok(Completion {
                tag: f.req.tag,
                offset: f.req.offset,
                buf: f.req.buf,
                result,
            });
        }
    }

    fn describe(&self) -> String {
        let regs = if self.registered.is_empty() {
            "unregistered buffers"
        } else {
            "registered buffers"
        };
        format!("io_uring, O_DIRECT, {regs}, depth {}", self.depth)
    }
}
