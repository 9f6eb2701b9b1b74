#![no_main]
//! Manifest parsing must reject anything malformed without panicking.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cairn::format::Manifest::decode(data);
});
