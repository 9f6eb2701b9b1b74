#![no_main]
//! A valid manifest whose numeric fields take fuzzed values, with the checksum made right: the
//! loader refuses or accepts it and never panics, and what it accepts gives the index parser a
//! geometry it can work with.
use libfuzzer_sys::fuzz_target;

/// A differential with tracking, bad ranges, two segments, 4 index entries and a GPT.
const TEMPLATE: &str = r#"{"format_version":1,"id":"20261126T000000Z-2","name":"disk-test",
"kind":"differential","parent":{"id":"20261126T000000Z","manifest_blake3":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"},
"base_full":"20261126T000000Z","created_unix":1795000000,"created":"2026-11-26T00:00:00Z",
"tool_version":"cairn 0.1.0","method":"tracked",
"source":{"path":"/dev/x","kind":"disk","size":67108864,"logical_sector_size":512,"physical_sector_size":4096},
"block_size":1048576,"granule":4096,"codec":"zstd","level":3,
"index":{"entries":4,"size":352,"blake3":"0000000000000000000000000000000000000000000000000000000000000000"},
"segments":[{"number":0,"size":2097152,"blake3":"1111111111111111111111111111111111111111111111111111111111111111"},
{"number":1,"size":32,"blake3":"2222222222222222222222222222222222222222222222222222222222222222"}],
"stats":{"bytes_read":8388608,"data_bytes":3145728,"stored_bytes":2097536,"blocks_total":8,"blocks_zero":1,"blocks_stored":3,"duration_ms":1234},
"bad_ranges":[[4096,512],[1048576,4096]],
"tracking":{"lineage":"0123456789abcdef0123456789abcdef","seq":7},
"partition_table":{"kind":"gpt","sector_size":512,"disk_id":"07070707-0707-0707-0707-070707070707",
"first_usable_lba":34,"last_usable_lba":131038,"entries":128,"partitions":[
{"number":1,"start":1048576,"size":33554432,"type_id":"0fc63daf-8483-4772-8e79-3d69d8477de4"},
{"number":3,"start":41943040,"size":8388608,"type_id":"0fc63daf-8483-4772-8e79-3d69d8477de4"}]}}"#;

const FIELDS: &[&str] = &[
    "/source/size",
    "/source/logical_sector_size",
    "/source/physical_sector_size",
    "/block_size",
    "/granule",
    "/level",
    "/created_unix",
    "/index/entries",
    "/index/size",
    "/segments/0/number",
    "/segments/1/number",
    "/segments/0/size",
    "/segments/1/size",
    "/stats/bytes_read",
    "/stats/data_bytes",
    "/stats/stored_bytes",
    "/stats/blocks_total",
    "/stats/blocks_zero",
    "/stats/blocks_stored",
    "/bad_ranges/0/0",
    "/bad_ranges/0/1",
    "/bad_ranges/1/0",
    "/bad_ranges/1/1",
    "/tracking/seq",
    "/partition_table/sector_size",
    "/partition_table/first_usable_lba",
    "/partition_table/last_usable_lba",
    "/partition_table/entries",
    "/partition_table/partitions/0/number",
    "/partition_table/partitions/0/start",
    "/partition_table/partitions/0/size",
    "/partition_table/partitions/1/number",
    "/partition_table/partitions/1/start",
    "/partition_table/partitions/1/size",
];

fuzz_target!(|changes: Vec<(u8, u64, bool)>| {
    let mut m: serde_json::Value = serde_json::from_str(TEMPLATE).expect("template is JSON");
    for &(field, v, negative) in changes.iter().take(8) {
        let value = if negative {
            serde_json::Value::from(-((v >> 1) as i64))
        } else {
            serde_json::Value::from(v)
        };
        *m.pointer_mut(FIELDS[usize::from(field) % FIELDS.len()])
            .expect("field exists") = value;
    }
    let body = serde_json::to_vec(&m).expect("serialises");
    let mut file = format!("cairn-manifest 1 blake3={}\n", blake3::hash(&body).to_hex()).into_bytes();
    file.extend_from_slice(&body);
    if let Ok((manifest, _)) = cairn::format::Manifest::decode(&file) {
        let empty = cairn::format::Index::default().encode();
        cairn::format::Index::decode(&empty, &manifest.geometry())
            .expect("an accepted manifest's geometry takes an empty index");
    }
});
