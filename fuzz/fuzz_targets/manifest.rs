#![no_main]
//! Manifest parsing must reject anything malformed without panicking: the bytes as a whole file,
//! and the bytes as a body behind a correct header line, so the checksum does not stop the fuzzer
//! short of the JSON parser and the field validation.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cairn::format::Manifest::decode(data);
    let mut file = format!("cairn-manifest 1 blake3={}\n", blake3::hash(data).to_hex()).into_bytes();
    file.extend_from_slice(data);
    let _ = cairn::format::Manifest::decode(&file);
});
