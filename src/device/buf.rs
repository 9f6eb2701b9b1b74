//! Page-aligned I/O buffers, as O_DIRECT and io_uring registered buffers need them.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

/// Buffer alignment. 4 KiB satisfies every logical block size Linux supports and the DIO memory
/// alignment of every device we have met (statx DIOALIGN reports 512 or 4096).
pub const ALIGN: usize = 4096;

/// An owned, page-aligned, fixed-capacity buffer. `slot` is its position in the pool, which is also
/// its io_uring registered-buffer index.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
    slot: u16,
    /// Unique for the life of the process. A ring registers the pages a buffer had when it was
    /// registered; a later buffer at the same address may sit on other pages (a freed mapping
    /// reused), so "is this the registered buffer" is decided by identity, never by address.
    id: u64,
}

static NEXT_BUF_ID: AtomicU64 = AtomicU64::new(0);

// SAFETY: AlignedBuf uniquely owns its allocation (like Box<[u8]>); moving it between threads moves
// that ownership.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn new(cap: usize, slot: u16) -> Self {
        assert!(
            cap > 0 && cap % ALIGN == 0,
            "buffer capacity must be a multiple of {ALIGN}"
        );
        let layout = Layout::from_size_align(cap, ALIGN).expect("valid layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        let id = NEXT_BUF_ID.fetch_add(1, Ordering::Relaxed);
        AlignedBuf { ptr, cap, slot, id }
    }

    /// This buffer's identity (distinct from every other buffer this process has made).
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn slot(&self) -> u16 {
        self.slot
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap initialised (zeroed at allocation) bytes, owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.cap) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.cap, ALIGN).expect("valid layout");
        // SAFETY: allocated in `new` with this exact layout and not freed before.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

/// Allocates `count` buffers of `size` bytes with slots 0..count.
pub fn pool(count: usize, size: usize) -> Vec<AlignedBuf> {
    assert!(count <= usize::from(u16::MAX));
    (0..count)
        .map(|i| AlignedBuf::new(size, i as u16))
        .collect()
}

/// Puts a pool into circulation: a bounded channel preloaded with every buffer. Stages hand
/// buffers back through the sender; whoever needs one takes it from the receiver, so the pool
/// size bounds the memory of a whole pipeline.
pub fn circulate(
    buffers: Vec<AlignedBuf>,
) -> (
    crossbeam_channel::Sender<AlignedBuf>,
    crossbeam_channel::Receiver<AlignedBuf>,
) {
    let (tx, rx) = crossbeam_channel::bounded(buffers.len());
    for b in buffers {
        tx.send(b).expect("the channel holds the whole pool");
    }
    (tx, rx)
}

/// Threads for a CPU-bound pipeline stage (compression, decompression): one per core.
pub fn stage_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 8)
}

/// Rounds `n` up to the buffer alignment (O_DIRECT transfer lengths must be aligned).
pub fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_zeroed() {
        for b in pool(3, 8192) {
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert!(b.as_slice().iter().all(|&x| x == 0));
        }
        assert_eq!(align_up(1), 4096);
        assert_eq!(align_up(4096), 4096);
    }
}
