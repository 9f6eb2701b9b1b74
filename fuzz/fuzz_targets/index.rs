#![no_main]
//! Index parsing against a fuzzed geometry must never panic or over-allocate.
use cairn::format::index::Geometry;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u64, u8, u8, &[u8])| {
    let (source_size, bs_shift, segments, data) = input;
    let block_size = 1u32 << (16 + u32::from(bs_shift % 9));
    let geo = Geometry { source_size, block_size, granule: 64 << 10, segments: u32::from(segments) };
    let _ = cairn::format::Index::decode(data, &geo);
});
