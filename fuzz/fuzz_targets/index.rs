#![no_main]
//! Index parsing against a fuzzed geometry (sizes that no manifest would pass included) must never
//! panic or over-allocate.
use cairn::format::index::Geometry;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u64, u8, u8, u8, &[u8])| {
    let (source_size, bs_shift, granule_shift, segments, data) = input;
    let geo = Geometry {
        source_size,
        block_size: 1u32 << (bs_shift % 32),
        granule: 1u32 << (granule_shift % 32),
        segments: u32::from(segments),
    };
    let _ = cairn::format::Index::decode(data, &geo);
});
