//! A bounded cache of checked plaintext blocks, least recently used out first.
//!
//! Only blocks that passed every check (frame header, crc, BLAKE3) are ever inserted: a damaged
//! block is never cached, so each read of it fails again instead of serving remembered bytes.
//! Memory is bounded by bytes, not entries, since the last block of a restore point is shorter.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

pub struct BlockCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// block number → (plaintext, tick of its last use)
    blocks: HashMap<u64, (Arc<[u8]>, u64)>,
    /// tick of last use → block number: the first key is the least recently used.
    by_use: BTreeMap<u64, u64>,
    bytes: usize,
    tick: u64,
}

impl Inner {
    fn touch(&mut self, block: u64) -> Option<Arc<[u8]>> {
        self.tick += 1;
        let tick = self.tick;
        let (data, used) = self.blocks.get_mut(&block)?;
        self.by_use.remove(used);
        *used = tick;
        self.by_use.insert(tick, block);
        Some(data.clone())
    }
}

impl BlockCache {
    /// A cache holding at most `capacity` bytes of plaintext (and always at least one block).
    pub fn new(capacity: usize) -> BlockCache {
        BlockCache {
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The data is plain bytes: a panic elsewhere cannot leave it half-updated in a way
        // that serves wrong bytes (entries are inserted whole).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, block: u64) -> Option<Arc<[u8]>> {
        self.lock().touch(block)
    }

    pub fn contains(&self, block: u64) -> bool {
        self.lock().blocks.contains_key(&block)
    }

    /// Inserts a checked block, evicting the least recently used ones beyond the capacity.
    pub fn insert(&self, block: u64, data: Arc<[u8]>) {
        let mut c = self.lock();
        if c.touch(block).is_some() {
            return;
        }
        c.tick += 1;
        let tick = c.tick;
        c.bytes += data.len();
        c.blocks.insert(block, (data, tick));
        c.by_use.insert(tick, block);
        while c.bytes > self.capacity && c.blocks.len() > 1 {
            let Some((_, old)) = c.by_use.pop_first() else {
                break;
            };
            if let Some((d, _)) = c.blocks.remove(&old) {
                c.bytes -= d.len();
            }
        }
    }

    /// Plaintext bytes held now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(n: u8, len: usize) -> Arc<[u8]> {
        vec![n; len].into()
    }

    #[test]
    fn evicts_least_recently_used_within_the_byte_bound() {
        let c = BlockCache::new(300);
        c.insert(1, block(1, 100));
        c.insert(2, block(2, 100));
        c.insert(3, block(3, 100));
        assert_eq!(c.get(1).unwrap()[0], 1); // 2 is now the oldest
        c.insert(4, block(4, 100));
        assert!(!c.contains(2));
        assert!(c.contains(1) && c.contains(3) && c.contains(4));
        assert_eq!(c.bytes(), 300);
        c.insert(5, block(5, 250));
        assert_eq!(c.bytes(), 250);
        assert!(c.contains(5));
        assert_eq!(c.get(5).unwrap().len(), 250);
    }

    #[test]
    fn keeps_one_block_larger_than_the_bound() {
        let c = BlockCache::new(10);
        c.insert(7, block(7, 64));
        assert!(c.contains(7));
        c.insert(7, block(9, 64));
        assert_eq!(
            c.get(7).unwrap()[0],
            7,
            "a block is inserted once, never replaced"
        );
        assert_eq!(c.bytes(), 64);
    }
}
