//! A set of changed granules over a device range, stored as a two-level bitmap: 32768-granule chunks
//! (128 MiB of disk at 4 KiB granules, 4 KiB of memory each) allocated only once a write lands in
//! them, so memory follows what changed, not the device size.
//!
//! Chunks are shared copy-on-write (`Arc`): cloning a map is a copy of its chunk pointers, so the
//! daemon snapshots its maps under the lock in microseconds and encodes them after releasing it;
//! the first write to a shared chunk afterwards copies just that chunk.

use anyhow::{bail, Result};
use bitvec::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;

pub const CHUNK_BITS: u64 = 32768;
/// A chunk's bitmap as 64-bit words (least significant bit first).
pub const CHUNK_WORDS: usize = (CHUNK_BITS / 64) as usize;

type Chunk = BitVec<u64, Lsb0>;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeMap {
    chunks: BTreeMap<u64, Arc<Chunk>>,
}

impl ChangeMap {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Marks granules `first .. first + count`.
    pub fn mark(&mut self, first: u64, count: u64) {
        let mut g = first;
        let end = first.saturating_add(count);
        while g < end {
            let chunk = g / CHUNK_BITS;
            let lo = (g % CHUNK_BITS) as usize;
            let hi = ((end - chunk * CHUNK_BITS).min(CHUNK_BITS)) as usize;
            let bits = self
                .chunks
                .entry(chunk)
                .or_insert_with(|| Arc::new(bitvec![u64, Lsb0; 0; CHUNK_BITS as usize]));
            Arc::make_mut(bits)[lo..hi].fill(true);
            g = chunk * CHUNK_BITS + hi as u64;
        }
    }

    pub fn contains(&self, g: u64) -> bool {
        self.chunks
            .get(&(g / CHUNK_BITS))
            .is_some_and(|b| b[(g % CHUNK_BITS) as usize])
    }

    pub fn count(&self) -> u64 {
        self.chunks.values().map(|b| b.count_ones() as u64).sum()
    }

    /// Adds every granule of `other`.
    pub fn union_with(&mut self, other: &ChangeMap) {
        for (k, v) in &other.chunks {
            match self.chunks.get_mut(k) {
                Some(mine) if Arc::ptr_eq(mine, v) => {}
                Some(mine) => *Arc::make_mut(mine) |= v.as_bitslice(),
                None => {
                    self.chunks.insert(*k, Arc::clone(v));
                }
            }
        }
    }

    /// Calls `f` with each maximal run of marked granules, ascending, as (first, count), without
    /// building the list: a map of millions of scattered granules is streamed, not copied.
    pub fn try_for_each_run<E>(
        &self,
        mut f: impl FnMut(u64, u64) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        // A run may continue into the next chunk, so each is held back until it cannot grow.
        let mut open: Option<(u64, u64)> = None;
        for (k, bits) in &self.chunks {
            let base = k * CHUNK_BITS;
            let mut i = 0usize;
            while let Some(start) = bits[i..].first_one().map(|o| o + i) {
                let len = bits[start..].first_zero().unwrap_or(bits.len() - start);
                let first = base + start as u64;
                match &mut open {
                    Some((f0, c)) if *f0 + *c == first => *c += len as u64,
                    _ => {
                        if let Some((f0, c)) = open.replace((first, len as u64)) {
                            f(f0, c)?;
                        }
                    }
                }
                i = start + len;
                if i >= bits.len() {
                    break;
                }
            }
        }
        match open {
            Some((f0, c)) => f(f0, c),
            None => Ok(()),
        }
    }

    /// Maximal runs of marked granules, ascending, as (first, count).
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let _ = self.try_for_each_run(|f, c| {
            out.push((f, c));
            Ok::<(), ()>(())
        });
        out
    }

    pub fn from_runs(runs: &[(u64, u64)]) -> Self {
        let mut m = ChangeMap::new();
        for &(f, c) in runs {
            m.mark(f, c);
        }
        m
    }

    /// The allocated chunks with any bit set, ascending by index, as raw words.
    pub fn chunks(&self) -> impl Iterator<Item = (u64, &[u64])> {
        self.chunks
            .iter()
            .filter(|(_, b)| b.any())
            .map(|(k, b)| (*k, b.as_raw_slice()))
    }

    /// Sets chunk `index` to `words` (CHUNK_WORDS of them), for the state decoder.
    pub fn insert_chunk(&mut self, index: u64, words: Vec<u64>) -> Result<()> {
        if words.len() != CHUNK_WORDS {
            bail!("a chunk holds {CHUNK_WORDS} words, not {}", words.len());
        }
        self.chunks.insert(index, Arc::new(BitVec::from_vec(words)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_across_chunks_and_reports_runs() {
        let mut m = ChangeMap::new();
        m.mark(5, 3);
        m.mark(CHUNK_BITS - 2, 4);
        m.mark(10, 1);
        assert_eq!(m.runs(), vec![(5, 3), (10, 1), (CHUNK_BITS - 2, 4)]);
        assert_eq!(m.count(), 8);
        assert!(m.contains(CHUNK_BITS + 1));
        assert!(!m.contains(8));
        let mut other = ChangeMap::from_runs(&[(8, 2)]);
        other.union_with(&m);
        assert_eq!(other.runs(), vec![(5, 6), (CHUNK_BITS - 2, 4)]);
    }

    #[test]
    fn runs_round_trip() {
        let runs = vec![(0, 1), (100, 70000), (CHUNK_BITS * 5, CHUNK_BITS)];
        assert_eq!(ChangeMap::from_runs(&runs).runs(), runs);
    }

    #[test]
    fn a_snapshot_keeps_its_contents_while_the_original_changes() {
        let mut m = ChangeMap::from_runs(&[(3, 2)]);
        let snapshot = m.clone();
        m.mark(10, 1);
        m.mark(CHUNK_BITS * 2, 1);
        assert_eq!(snapshot.runs(), vec![(3, 2)]);
        assert_eq!(m.runs(), vec![(3, 2), (10, 1), (CHUNK_BITS * 2, 1)]);
        let mut u = snapshot.clone();
        u.union_with(&m);
        assert_eq!(u.runs(), m.runs());
    }
}
