#![no_main]
//! Segment headers, frame headers and payload decoding must never panic, whatever the bytes.
use cairn::format::frame::{decode_payload, Codec};
use cairn::format::{FrameHeader, SegmentHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = SegmentHeader::decode(data);
    if let Ok(h) = FrameHeader::decode(data) {
        let payload = &data[32.min(data.len())..];
        let mut out = vec![0u8; (h.length as usize).min(1 << 20)];
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        let _ = decode_payload(h.codec, payload, &mut out, &mut d);
    }
    let mut d = zstd::bulk::Decompressor::new().unwrap();
    let mut out = vec![0u8; 4096];
    let _ = decode_payload(Codec::Zstd, data, &mut out, &mut d);
});
