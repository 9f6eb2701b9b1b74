//! A set of changed granules over a device range, stored as a two-level bitmap: 32768-granule chunks
//! (128 MiB of disk at 4 KiB granules, 4 KiB of memory each) allocated only once a write lands in
//! them, so memory follows what changed, not the device size.

use bitvec::prelude::*;
use std::collections::BTreeMap;

const CHUNK_BITS: u64 = 32768;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeMap {
    chunks: BTreeMap<u64, BitVec<u64, Lsb0>>,
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
                .or_insert_with(|| bitvec![u64, Lsb0; 0; CHUNK_BITS as usize]);
            bits[lo..hi].fill(true);
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
                Some(mine) => *mine |= v.as_bitslice(),
                None => {
                    self.chunks.insert(*k, v.clone());
                }
            }
        }
    }

    /// Maximal runs of marked granules, ascending, as (first, count).
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (k, bits) in &self.chunks {
            let base = k * CHUNK_BITS;
            let mut i = 0usize;
            while let Some(start) = bits[i..].first_one().map(|o| o + i) {
                let len = bits[start..].first_zero().unwrap_or(bits.len() - start);
                let first = base + start as u64;
                match out.last_mut() {
                    Some((f, c)) if *f + *c == first => *c += len as u64,
                    _ => out.push((first, len as u64)),
                }
                i = start + len;
                if i >= bits.len() {
                    break;
                }
            }
        }
        out
    }

    pub fn from_runs(runs: &[(u64, u64)]) -> Self {
        let mut m = ChangeMap::new();
        for &(f, c) in runs {
            m.mark(f, c);
        }
        m
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
}
