#![no_main]
//! The allocation-map readers on arbitrary bytes: never a panic, never an unbounded allocation,
//! never a range outside the source. The first byte picks a filesystem magic to stamp, so that
//! the readers behind the detectors are reached (seed the corpus with small mkfs images too).
use cairn::usedmap::{probe, Verdict};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u8, Vec<u8>)| {
    let (which, mut b) = input;
    let mut put = |at: usize, m: &[u8]| {
        if b.len() >= at + m.len() {
            b[at..at + m.len()].copy_from_slice(m);
        }
    };
    match which % 8 {
        0 => put(1080, &[0x53, 0xef]),
        1 => put(0, b"XFSB"),
        2 => put(65536 + 64, b"_BHRfS_M"),
        3 => put(3, b"EXFAT   "),
        4 => {
            put(0, &[0xeb, 0x3c, 0x90]);
            put(510, &[0x55, 0xaa]);
        }
        5 => put(4096 - 10, b"SWAPSPACE2"),
        _ => {}
    }
    let size = b.len() as u64;
    if let Verdict::Used(m) = probe(&b, size) {
        let mut end = 0u64;
        for (i, &(o, l)) in m.ranges.iter().enumerate() {
            assert!(l > 0 && o.checked_add(l).is_some_and(|e| e <= size));
            assert!(i == 0 || o > end);
            end = o + l;
        }
    }
});
