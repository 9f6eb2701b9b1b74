//! The io_uring backend: O_DIRECT file, registered file and buffers, several transfers in flight.
//! No SQPOLL: on a 2-core machine a polling kernel thread costs a core for no gain (shared/notes).
//!
//! Who owns a buffer: a request's buffer moves into its slot on `submit` and leaves only with the
//! completion the kernel posts for that request. Until then the kernel may write it (a read) or
//! read it (a write) at any moment, by DMA into the pinned pages. So `wait` hands a buffer back
//! only with its completion, and dropping the queue cancels what is still in flight and reaps every
//! completion before a slot's buffer is freed; when it cannot learn that the kernel is done, it
//! leaks the buffers instead of freeing memory the kernel may still write.

use super::buf::AlignedBuf;
use super::queue::{check_done, validate, Completion, IoQueue, Op, Request};
use io_uring::{opcode, squeue, types, IoUring};
use std::cell::Cell;
use std::io;
use std::os::fd::RawFd;

struct InFlight {
    req: Request,
    done: usize,
}

/// user_data of the cancel request submitted on drop; requests use their slot number (< 256).
const CANCEL_TAG: u64 = u64::MAX;

/// Consecutive EAGAIN/EBUSY answers while waiting on drop, with no completion reaped in between,
/// after which the wait is given up (and the buffers leaked) rather than spinning for ever.
const DROP_WAIT_RETRIES: u32 = 1000;

pub struct UringQueue {
    ring: IoUring,
    depth: usize,
    /// `Some` exactly while the kernel owns a request for the slot: its SQE was pushed and its
    /// completion has not been reaped yet.
    slots: Vec<Option<InFlight>>,
    in_flight: usize,
    /// Identity (`AlignedBuf::id`) of each registered buffer by slot; empty when registration was
    /// refused.
    registered: Vec<u64>,
}

/// What dropping a queue found and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Teardown {
    /// Requests the kernel owned when the queue was dropped.
    pub in_flight: usize,
    /// Completions of those requests reaped before their buffers were freed (finished or
    /// cancelled).
    pub reaped: usize,
    /// Buffers deliberately leaked because waiting for their completions failed.
    pub leaked: usize,
}

thread_local! {
    static LAST_TEARDOWN: Cell<Option<Teardown>> = const { Cell::new(None) };
}

/// Takes the report of the last `UringQueue` dropped on this thread, so a test can check that a
/// drop waited for every request it had in flight.
pub fn last_teardown() -> Option<Teardown> {
    LAST_TEARDOWN.with(Cell::take)
}

impl UringQueue {
    /// Sets up a ring for `fd` and registers `buffers` when the kernel allows it. The ring holds
    /// its own reference to the file once registered, so in-flight requests never see a closed
    /// descriptor. Fails when io_uring itself is unavailable (ENOSYS, or EPERM under seccomp).
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
            // SAFETY: every iovec describes a live AlignedBuf allocation of `capacity()` bytes.
            // Registration pins those pages and nothing more: the kernel touches a registered
            // buffer only for a request that names it, and such a request owns its buffer (in its
            // slot) until its completion is reaped, by `wait` or by `Drop`. A caller may free a
            // registered buffer while the ring lives (the pinned pages then sit unused); a new
            // buffer at the same address is never taken for the registered one, because
            // `is_registered` compares buffer identities, not addresses.
            match unsafe { ring.submitter().register_buffers(&iovecs) } {
                Ok(()) => registered = buffers.iter().map(AlignedBuf::id).collect(),
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
        self.registered.get(usize::from(buf.slot())) == Some(&buf.id())
    }

    /// Pushes the SQE for the (rest of the) transfer in `slot`; the kernel sees it at the next
    /// enter. On error nothing was pushed.
    fn push(&mut self, slot: usize) -> io::Result<()> {
        let registered =
            self.is_registered(&self.slots[slot].as_ref().expect("slot in use").req.buf);
        let f = self.slots[slot].as_mut().expect("slot in use");
        let done = f.done;
        let len = (f.req.len - done) as u32;
        let offset = f.req.offset + done as u64;
        let fixed_file = types::Fixed(0);
        let index = f.req.buf.slot();
        // SAFETY: start + done < start + len <= capacity (checked by `validate`), so the pointer
        // stays inside the buffer's allocation.
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
        // SAFETY: the memory [ptr, ptr + len) belongs to the buffer in `slots[slot]`, whose heap
        // allocation does not move when the AlignedBuf value does, and the slot keeps it until this
        // request's completion is reaped (by `wait`, or by `Drop`, which waits for every
        // completion before any slot is freed, or leaks the buffer). A registered index is used
        // only for the very buffer registered under it (`is_registered`). The file is the ring's
        // registered file 0, which the ring keeps open.
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        Ok(())
    }

    /// Pushes the rest of a transfer again (after EINTR, EAGAIN or a short transfer). When that
    /// fails, the request is finished with the error and its buffer handed back, so that no slot
    /// stays occupied without a request in the kernel.
    fn resubmit(&mut self, slot: usize) -> Option<Completion> {
        if let Err(e) = self.push(slot) {
            return Some(self.finish(slot, Err(e)));
        }
        None
    }

    fn finish(&mut self, slot: usize, result: io::Result<usize>) -> Completion {
        let f = self.slots[slot].take().expect("slot in use");
        self.in_flight -= 1;
        Completion {
            tag: f.req.tag,
            offset: f.req.offset,
            buf: f.req.buf,
            result,
        }
    }

    /// Cancels every request still in flight and reaps all their completions, freeing each
    /// buffer only once the kernel has posted the completion of its request. When the kernel
    /// cannot be waited on any more, the remaining buffers are leaked.
    fn cancel_and_reap(&mut self) -> Teardown {
        let mut report = Teardown {
            in_flight: self.in_flight,
            ..Teardown::default()
        };
        if self.in_flight == 0 {
            return report;
        }
        // Cancel whatever has not started; O_DIRECT transfers already issued to the device cannot
        // be cancelled and finish normally. Either way each request posts exactly one completion,
        // and only that completion ends the kernel's use of its buffer (axboe/liburing#733), so
        // the cancel merely shortens the wait below. SQEs still unsubmitted are submitted by the
        // same enter, ahead of the cancel. A full submission queue leaves no room for the cancel:
        // then the wait alone does it.
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(CANCEL_TAG);
        // SAFETY: a cancel request carries no buffer.
        let _ = unsafe { self.ring.submission().push(&cancel) };
        let mut retries = 0;
        loop {
            while let Some(cqe) = self.ring.completion().next() {
                // The cancel's own completion matches no slot.
                let slot = usize::try_from(cqe.user_data()).unwrap_or(usize::MAX);
                if let Some(done) = self.slots.get_mut(slot).and_then(Option::take) {
                    // The kernel is done with this buffer: freeing it is safe now.
                    drop(done);
                    self.in_flight -= 1;
                    report.reaped += 1;
                    retries = 0;
                }
            }
            if self.in_flight == 0 {
                return report;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY))
                        && retries < DROP_WAIT_RETRIES =>
                {
                    retries += 1;
                }
                Err(e) => {
                    // Without a completion nothing says the kernel is done with these buffers;
                    // freeing them could let an O_DIRECT read land in memory reused for something
                    // else. Leak them deliberately: a bounded loss (at most `depth` buffers), once.
                    tracing::error!(
                        "io_uring: cannot wait for {} transfers in flight ({e}); leaking their buffers",
                        self.in_flight
                    );
                    for slot in &mut self.slots {
                        if let Some(leaked) = slot.take() {
                            std::mem::forget(leaked);
                            report.leaked += 1;
                        }
                    }
                    self.in_flight = 0;
                    return report;
                }
            }
        }
    }
}

impl Drop for UringQueue {
    /// Runs before the fields drop: the ring (closing it) and the slots (freeing buffers). By then
    /// every slot is empty, its request reaped or its buffer leaked, so neither order matters.
    fn drop(&mut self) {
        let report = self.cancel_and_reap();
        if report.in_flight > 0 {
            tracing::debug!(
                "io_uring queue dropped with {} transfers in flight: {} reaped, {} leaked",
                report.in_flight,
                report.reaped,
                report.leaked
            );
        }
        debug_assert!(
            std::thread::panicking() || self.slots.iter().all(Option::is_none),
            "io_uring queue freed a buffer the kernel may still use"
        );
        LAST_TEARDOWN.with(|t| t.set(Some(report)));
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
            // Nothing reached the kernel: the buffer is still ours to drop.
            self.slots[slot] = None;
            return Err(e);
        }
        self.in_flight += 1;
        // The request is queued whatever this enter says: if it fails, the SQE stays in the ring
        // and the next enter (in `wait`, or the drop) submits it or reports the error.
        if let Err(e) = self.ring.submit() {
            tracing::debug!("io_uring enter failed ({e}); the request goes with the next one");
        }
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
            let result = if res == -libc::EINTR || res == -libc::EAGAIN {
                None
            } else if res < 0 {
                Some(Err(io::Error::from_raw_os_error(-res)))
            } else {
                f.done += res as usize;
                let short =
                    f.done < f.req.len && res > 0 && (f.req.op == Op::Write || f.done < f.req.want);
                (!short).then(|| check_done(f.req.op, f.done, f.req.len, f.req.want))
            };
            match result {
                Some(result) => return Ok(self.finish(slot, result)),
                // The loop's next enter submits the pushed remainder.
                None => {
                    if let Some(failed) = self.resubmit(slot) {
                        return Ok(failed);
                    }
                }
            }
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
