//! The parsers of everything read from a repository take arbitrary bytes without panicking
//! (the cargo-fuzz targets in fuzz/ do the same, coverage-guided, on nightly), and every numeric
//! manifest field outside its documented range (docs/format.md) is refused with an error naming it.

use cairn::format::frame::{decode_payload, image_tag, Codec};
use cairn::format::index::Geometry;
use cairn::format::{Entry, EntryKind, FrameHeader, Index, Manifest, SegmentHeader};
use proptest::prelude::*;
use serde_json::{json, Value};

fn geometry() -> Geometry {
    Geometry {
        source_size: 64 << 20,
        block_size: 1 << 20,
        granule: 64 << 10,
        segments: 2,
    }
}

fn valid_index() -> Vec<u8> {
    let entries = (0..4)
        .map(|i| Entry {
            offset: i << 20,
            length: 1 << 20,
            kind: EntryKind::Zstd,
            segment: 1,
            stored_length: 100,
            segment_offset: 32 + i * 132,
            crc: 7,
            hash: [i as u8; 32],
        })
        .collect();
    Index { entries }.encode()
}

fn valid_manifest() -> Vec<u8> {
    let text = r#"{"format_version":1,"id":"20261126T000000Z","name":"n","kind":"full","parent":null,
"base_full":null,"created_unix":1,"created":"x","tool_version":"cairn","method":"full",
"source":{"path":"/dev/x","kind":"disk","size":1048576,"logical_sector_size":512,"physical_sector_size":512},
"block_size":1048576,"granule":65536,"codec":"zstd","level":1,
"index":{"entries":0,"size":64,"blake3":"0000000000000000000000000000000000000000000000000000000000000000"},
"segments":[],"stats":{"bytes_read":0,"data_bytes":0,"stored_bytes":64,"blocks_total":0,"blocks_zero":0,"blocks_stored":0,"duration_ms":0}}"#;
    let hash = blake3::hash(text.as_bytes()).to_hex();
    let mut out = format!("cairn-manifest 1 blake3={hash}\n").into_bytes();
    out.extend_from_slice(text.as_bytes());
    out
}

#[test]
fn the_hand_built_samples_are_valid() {
    assert!(Index::decode(&valid_index(), &geometry()).is_ok());
    Manifest::decode(&valid_manifest()).expect("sample manifest parses");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = Manifest::decode(&data);
        let _ = Index::decode(&data, &geometry());
        let _ = SegmentHeader::decode(&data);
        let _ = FrameHeader::decode(&data);
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        let mut out = vec![0u8; 65536];
        let _ = decode_payload(Codec::Zstd, &data, &mut out, &mut d);
    }

    #[test]
    fn mutated_index_is_rejected_not_panicking(at in 0usize..1000, bit in 0u8..8) {
        let mut b = valid_index();
        let i = at % b.len();
        b[i] ^= 1 << bit;
        // Every byte is covered by the trailer hash, so any flip must be an error.
        prop_assert!(Index::decode(&b, &geometry()).is_err());
    }

    #[test]
    fn mutated_manifest_is_rejected_not_panicking(at in 0usize..4000, bit in 0u8..8) {
        let mut b = valid_manifest();
        let i = at % b.len();
        b[i] ^= 1 << bit;
        prop_assert!(Manifest::decode(&b).is_err());
    }

    #[test]
    fn truncated_files_are_rejected(cut in 0usize..2000) {
        let m = valid_manifest();
        prop_assert!(Manifest::decode(&m[..cut % m.len()]).is_err());
        let ix = valid_index();
        prop_assert!(Index::decode(&ix[..cut % ix.len()], &geometry()).is_err());
        let seg = SegmentHeader { number: 0, image_tag: image_tag("x") }.encode();
        prop_assert!(SegmentHeader::decode(&seg[..cut % seg.len()]).is_err());
    }
}

// ---------------------------------------------------------------------------------------------
// Numeric manifest fields
// ---------------------------------------------------------------------------------------------

const MIB: u64 = 1 << 20;

/// A valid manifest that uses every optional part: a differential with tracking, bad ranges, two
/// segments, an index of 4 entries and a GPT. Built as JSON so that fields added later with
/// defaults do not change what these tests mean.
fn rich_manifest() -> Value {
    let hash = |c: char| c.to_string().repeat(64);
    json!({
        "format_version": 1,
        "id": "20261126T000000Z-2",
        "name": "disk-test",
        "kind": "differential",
        "parent": {"id": "20261126T000000Z", "manifest_blake3": hash('a')},
        "base_full": "20261126T000000Z",
        "created_unix": 1_795_000_000u64,
        "created": "2026-11-26T00:00:00Z",
        "tool_version": "cairn 0.1.0",
        "method": "tracked",
        "source": {
            "path": "/dev/x", "kind": "disk", "size": 64 * MIB,
            "logical_sector_size": 512, "physical_sector_size": 4096
        },
        "block_size": MIB,
        "granule": 4096,
        "codec": "zstd",
        "level": 3,
        "index": {"entries": 4, "size": 64 + 4 * 72, "blake3": hash('0')},
        "segments": [
            {"number": 0, "size": 2 * MIB, "blake3": hash('1')},
            {"number": 1, "size": 32, "blake3": hash('2')}
        ],
        "stats": {
            "bytes_read": 8 * MIB, "data_bytes": 3 * MIB, "stored_bytes": 2 * MIB + 32 + 352,
            "blocks_total": 8, "blocks_zero": 1, "blocks_stored": 3, "duration_ms": 1234
        },
        "bad_ranges": [[4096, 512], [MIB, 4096]],
        "tracking": {"lineage": "0123456789abcdef0123456789abcdef", "seq": 7},
        "partition_table": {
            "kind": "gpt", "sector_size": 512, "disk_id": "07070707-0707-0707-0707-070707070707",
            "first_usable_lba": 34, "last_usable_lba": 131038, "entries": 128,
            "partitions": [
                {"number": 1, "start": MIB, "size": 32 * MIB, "type_id": "0fc63daf-8483-4772-8e79-3d69d8477de4"},
                {"number": 3, "start": 40 * MIB, "size": 8 * MIB, "type_id": "0fc63daf-8483-4772-8e79-3d69d8477de4"}
            ]
        }
    })
}

/// The manifest file for a JSON body, with a correct header line.
fn manifest_file(body: &Value) -> Vec<u8> {
    let text = serde_json::to_vec_pretty(body).unwrap();
    let mut out =
        format!("cairn-manifest 1 blake3={}\n", blake3::hash(&text).to_hex()).into_bytes();
    out.extend_from_slice(&text);
    out
}

/// `rich_manifest` with the field at a JSON pointer set to `v`.
fn with(pointer: &str, v: Value) -> Value {
    let mut m = rich_manifest();
    *m.pointer_mut(pointer)
        .unwrap_or_else(|| panic!("no field {pointer}")) = v;
    m
}

fn decode(m: &Value) -> Result<Manifest, String> {
    Manifest::decode(&manifest_file(m))
        .map(|(m, _)| m)
        .map_err(|e| e.to_string())
}

/// The manifest with `pointer` set to `v` is refused, with one line that names `names`.
fn refused(pointer: &str, v: Value, names: &str) {
    let e = decode(&with(pointer, v.clone()))
        .err()
        .unwrap_or_else(|| panic!("{pointer} = {v} was accepted"));
    assert!(
        e.contains(names),
        "{pointer} = {v}: {e:?} does not name {names:?}"
    );
    assert!(!e.contains('\n'), "{e:?} is not one line");
}

fn accepted(pointer: &str, v: Value) {
    if let Err(e) = decode(&with(pointer, v.clone())) {
        panic!("{pointer} = {v} refused: {e}");
    }
}

#[test]
fn the_rich_sample_is_valid() {
    let m = decode(&rich_manifest()).expect("rich sample parses");
    assert_eq!(m.partition_table.unwrap().partitions.len(), 2);
}

#[test]
fn sector_sizes_are_powers_of_two_from_512_to_64k() {
    for field in ["logical_sector_size", "physical_sector_size"] {
        let p = format!("/source/{field}");
        for bad in [
            0u64,
            1,
            256,
            511,
            513,
            1000,
            4095,
            6144,
            131072,
            u32::MAX as u64,
        ] {
            refused(&p, json!(bad), &format!("source.{field} = {bad}"));
        }
        // Out of the field's type: a JSON error, not a truncation.
        refused(&p, json!(1u64 << 32), "invalid");
        refused(&p, json!(-512), "invalid");
    }
    // A sector size of 0 used to reach divisions: now it is the first thing refused.
    refused(
        "/source/logical_sector_size",
        json!(0),
        "source.logical_sector_size = 0",
    );
    accepted("/source/logical_sector_size", json!(4096));
    for ok in [4096u64, 8192, 65536] {
        accepted("/source/physical_sector_size", json!(ok));
    }
    let mut m = with("/source/logical_sector_size", json!(65536));
    m["source"]["physical_sector_size"] = json!(65536);
    decode(&m).expect("64 KiB sectors are within bounds");
    let mut m = with("/source/logical_sector_size", json!(4096));
    m["source"]["physical_sector_size"] = json!(512);
    let e = decode(&m).unwrap_err();
    assert!(
        e.contains("source.physical_sector_size = 512") && e.contains("logical"),
        "{e}"
    );
}

#[test]
fn block_size_and_granule_follow_the_documented_bounds() {
    for bad in [0u64, 1, 4096, 32 << 10, 3 * MIB, 32 * MIB, u32::MAX as u64] {
        refused("/block_size", json!(bad), &format!("block_size = {bad}"));
    }
    for ok in [64 << 10, 16 * MIB] {
        let mut m = with("/block_size", json!(ok));
        m["granule"] = json!(4096);
        decode(&m).unwrap_or_else(|e| panic!("block size {ok}: {e}"));
    }
    for bad in [0u64, 512, 2048, 6144, 2 * MIB] {
        refused("/granule", json!(bad), &format!("granule = {bad}"));
    }
    // The granule may be as large as the block (64 KiB granules were written by early builds).
    let mut m = with("/granule", json!(MIB));
    m["index"] = json!({"entries": 4, "size": 352, "blake3": "0".repeat(64)});
    m["stats"]["blocks_total"] = json!(8);
    decode(&m).expect("granule == block size");
    accepted("/granule", json!(64 << 10));
}

#[test]
fn source_size_and_kind_are_checked() {
    refused("/source/size", json!(0), "source.size = 0");
    refused("/source/size", json!(1u64 << 63), "source.size");
    refused("/source/size", json!(u64::MAX), "source.size");
    // A smaller source than the bad ranges, partitions and stats describe.
    refused("/source/size", json!(MIB), "");
    refused("/source/kind", json!("tape"), "source.kind");
}

#[test]
fn index_reference_must_match_its_entry_count() {
    refused("/index/size", json!(64), "index.size = 64");
    refused("/index/size", json!(u64::MAX), "index.size");
    // Used to overflow 64 + 72 × entries (a panic in debug builds).
    refused("/index/entries", json!(u64::MAX), "index.entries");
    // 64 MiB of 4 KiB granules hold at most 16384 extents.
    let mut m = with("/index/entries", json!(16385));
    m["index"]["size"] = json!(64 + 16385 * 72);
    let e = decode(&m).unwrap_err();
    assert!(e.contains("index.entries = 16385"), "{e}");
    m["index"]["entries"] = json!(16384);
    m["index"]["size"] = json!(64 + 16384 * 72);
    m["stats"]["stored_bytes"] = json!(2 * MIB + 32 + 64 + 16384 * 72);
    decode(&m).expect("one entry per granule");
}

#[test]
fn segments_are_numbered_sized_and_add_up_to_the_stored_bytes() {
    refused("/segments/1/number", json!(2), "segments[1].number = 2");
    refused("/segments/0/number", json!(1), "segments[0].number = 1");
    refused("/segments/1/size", json!(31), "segments[1].size = 31");
    refused("/segments/1/size", json!(u64::MAX), "segment sizes");
    refused("/segments/1/blake3", json!("zz"), "segments[1].blake3");
    refused("/stats/stored_bytes", json!(0), "stats.stored_bytes = 0");
    refused("/stats/stored_bytes", json!(u64::MAX), "stats.stored_bytes");
}

#[test]
fn stats_cannot_exceed_the_source() {
    let size = 64 * MIB;
    refused("/stats/bytes_read", json!(size + 1), "stats.bytes_read");
    refused("/stats/data_bytes", json!(size + 1), "stats.data_bytes");
    accepted("/stats/bytes_read", json!(size));
    refused(
        "/stats/blocks_total",
        json!(16385),
        "stats.blocks_total = 16385",
    );
    accepted("/stats/blocks_total", json!(16384));
    refused("/stats/blocks_zero", json!(u64::MAX), "stats.blocks_zero");
    refused(
        "/stats/blocks_stored",
        json!(16384),
        "stats.blocks_zero + stats.blocks_stored",
    );
    accepted("/stats/duration_ms", json!(u64::MAX));
}

#[test]
fn bad_ranges_are_sorted_disjoint_and_inside_the_source() {
    let size = 64 * MIB;
    for (bad, why) in [
        (json!([[MIB, 4096], [4096, 512]]), "out of order"),
        (json!([[4096, 4096], [6144, 4096]]), "overlapping"),
        (json!([[4096, 0]]), "empty"),
        (json!([[size - 512, 1024]]), "beyond the end"),
        (json!([[size, 1]]), "at the end"),
        (json!([[u64::MAX, 2]]), "overflowing"),
    ] {
        let e = decode(&with("/bad_ranges", bad.clone()))
            .err()
            .unwrap_or_else(|| panic!("{why} bad ranges {bad} accepted"));
        assert!(e.contains("bad_ranges["), "{why}: {e}");
    }
    accepted(
        "/bad_ranges",
        json!([[0, 512], [512, 512], [size - 512, 512]]),
    );
}

#[test]
fn level_kind_and_lineage_are_checked() {
    refused("/level", json!(100), "level = 100");
    refused("/level", json!(i32::MIN), "level");
    accepted("/level", json!(-7));
    accepted("/level", json!(19));
    refused("/method", json!("full"), "method");
    refused("/parent/id", json!("20261125T000000Z"), "base full");
    refused("/tracking/lineage", json!(""), "tracking.lineage");
    refused(
        "/tracking/lineage",
        json!("x".repeat(32)),
        "tracking.lineage",
    );
    accepted("/tracking/seq", json!(u64::MAX));
}

#[test]
fn partition_table_lies_inside_the_disk() {
    let t = "/partition_table";
    refused(
        &format!("{t}/sector_size"),
        json!(0),
        "partition_table.sector_size = 0",
    );
    refused(
        &format!("{t}/sector_size"),
        json!(1000),
        "partition_table.sector_size = 1000",
    );
    refused(
        &format!("{t}/entries"),
        json!(0),
        "partition_table.entries = 0",
    );
    refused(
        &format!("{t}/entries"),
        json!(5000),
        "partition_table.entries = 5000",
    );
    refused(
        &format!("{t}/entries"),
        json!(2),
        "partitions[1].number = 3",
    );
    refused(
        &format!("{t}/last_usable_lba"),
        json!(131072),
        "last_usable_lba",
    );
    refused(
        &format!("{t}/first_usable_lba"),
        json!(0),
        "first_usable_lba",
    );
    refused(
        &format!("{t}/first_usable_lba"),
        json!(131039),
        "first_usable_lba",
    );
    refused(&format!("{t}/first_usable_lba"), json!(null), "GPT without");
    let p = format!("{t}/partitions/1");
    refused(
        &format!("{p}/size"),
        json!(64 * MIB),
        "partitions[1].start, size",
    );
    refused(
        &format!("{p}/size"),
        json!(u64::MAX - 511),
        "partitions[1].start, size",
    );
    refused(
        &format!("{p}/start"),
        json!(u64::MAX),
        "partitions[1].start, size",
    );
    refused(
        &format!("{p}/start"),
        json!(40 * MIB + 1),
        "whole 512-byte sectors",
    );
    refused(&format!("{p}/size"), json!(0), "partitions[1]");
    refused(&format!("{p}/start"), json!(0), "partitions[1].start, size");
    refused(&format!("{p}/number"), json!(1), "partitions[1].number = 1");
    // A partition ending at the last usable LBA fits.
    accepted(&format!("{p}/size"), json!((131039 - 40 * 2048) * 512));
    refused(
        &format!("{p}/size"),
        json!((131040 - 40 * 2048) * 512),
        "partitions[1]",
    );
}

#[test]
fn mbr_tables_are_checked_too() {
    let mbr = json!({
        "kind": "mbr", "sector_size": 512, "disk_id": "1234abcd",
        "partitions": [{"number": 1, "start": MIB, "size": 63 * MIB, "type_id": "0x83"}]
    });
    let m = with("/partition_table", mbr.clone());
    decode(&m).expect("valid MBR record");
    let mut bad = mbr.clone();
    bad["entries"] = json!(128);
    refused("/partition_table", bad, "partition_table.entries = 128");
    let mut bad = mbr.clone();
    bad["partitions"][0]["size"] = json!(64 * MIB);
    refused("/partition_table", bad, "partitions[0].start, size");
    // An MBR counts sectors in 32 bits: 4 TiB of 512-byte sectors cannot be described.
    let tib = 1u64 << 40;
    let mut m = with("/source/size", json!(4 * tib));
    let mut big = mbr;
    big["partitions"][0]["size"] = json!(3 * tib);
    m["partition_table"] = big;
    let e = decode(&m).unwrap_err();
    assert!(e.contains("32-bit"), "{e}");
}

/// A rule over a JSON integer (negative values included): whether the field may hold it.
type Rule = fn(i128) -> bool;

fn pow2_in(v: i128, lo: i128, hi: i128) -> bool {
    v > 0 && (v as u128).is_power_of_two() && (lo..=hi).contains(&v)
}

fn sectors_of(v: i128) -> Option<i128> {
    (v > 0 && v % 512 == 0).then_some(v / 512)
}

/// Every numeric field of `rich_manifest` with the values it may hold there, the rest of the
/// manifest unchanged (worked out from docs/format.md and the sample's other fields).
fn numeric_fields() -> Vec<(&'static str, Rule)> {
    const M: i128 = MIB as i128;
    const U64: i128 = u64::MAX as i128;
    vec![
        ("/source/logical_sector_size", |v| pow2_in(v, 512, 4096)),
        ("/source/physical_sector_size", |v| pow2_in(v, 512, 65536)),
        // Room for the GPT's last usable LBA 131038; offsets fit an off_t.
        ("/source/size", |v| {
            (131039 * 512..=i64::MAX as i128).contains(&v)
        }),
        ("/block_size", |v| pow2_in(v, 64 << 10, 16 * M)),
        ("/granule", |v| pow2_in(v, 4096, M)),
        ("/level", |v| (-(1 << 17)..=22).contains(&v)),
        ("/created_unix", |v| (0..=U64).contains(&v)),
        ("/index/entries", |v| v == 4),
        ("/index/size", |v| v == 352),
        ("/segments/0/number", |v| v == 0),
        ("/segments/1/number", |v| v == 1),
        ("/segments/0/size", |v| v == 2 * M),
        ("/segments/1/size", |v| v == 32),
        ("/stats/bytes_read", |v| (0..=64 * M).contains(&v)),
        ("/stats/data_bytes", |v| (0..=64 * M).contains(&v)),
        ("/stats/stored_bytes", |v| v == 2 * M + 32 + 352),
        ("/stats/blocks_total", |v| (0..=16384).contains(&v)),
        ("/stats/blocks_zero", |v| (0..=16384 - 3).contains(&v)),
        ("/stats/blocks_stored", |v| (0..=16384 - 1).contains(&v)),
        ("/stats/duration_ms", |v| (0..=U64).contains(&v)),
        // [[4096, 512], [MIB, 4096]] inside 64 MiB.
        ("/bad_ranges/0/0", |v| (0..=M - 512).contains(&v)),
        ("/bad_ranges/0/1", |v| (1..=M - 4096).contains(&v)),
        ("/bad_ranges/1/0", |v| (4608..=64 * M - 4096).contains(&v)),
        ("/bad_ranges/1/1", |v| (1..=63 * M).contains(&v)),
        ("/tracking/seq", |v| (0..=U64).contains(&v)),
        ("/partition_table/sector_size", |v| v == 512),
        // Partition 1 starts at LBA 2048; partition 3 ends at LBA 98303; the disk has 131072.
        ("/partition_table/first_usable_lba", |v| {
            (1..=2048).contains(&v)
        }),
        ("/partition_table/last_usable_lba", |v| {
            (98303..=131071).contains(&v)
        }),
        ("/partition_table/entries", |v| (3..=4096).contains(&v)),
        ("/partition_table/partitions/0/number", |v| {
            (1..=2).contains(&v)
        }),
        ("/partition_table/partitions/1/number", |v| {
            (2..=128).contains(&v)
        }),
        ("/partition_table/partitions/0/start", |v| {
            sectors_of(v).is_some_and(|s| (34..=131038 - 65535).contains(&s))
        }),
        ("/partition_table/partitions/0/size", |v| {
            sectors_of(v).is_some_and(|s| s <= 131038 - 2047)
        }),
        ("/partition_table/partitions/1/start", |v| {
            sectors_of(v).is_some_and(|s| (34..=131038 - 16383).contains(&s))
        }),
        ("/partition_table/partitions/1/size", |v| {
            sectors_of(v).is_some_and(|s| s <= 131038 - 81919)
        }),
    ]
}

fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u32::MAX as u64),
        Just(i64::MAX as u64),
        (0u32..64).prop_map(|s| 1u64 << s),
        (0u32..64, -2i64..=2).prop_map(|(s, d)| (1u64 << s).wrapping_add_signed(d)),
        0u64..100_000_000,
        any::<u64>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// Any value in any numeric field: never a panic, and the manifest is accepted exactly when
    /// the value follows the field's rule (out-of-type values are JSON errors).
    #[test]
    fn numeric_fields_are_validated(field in 0usize..64, v in interesting_u64(), negative in any::<bool>()) {
        let fields = numeric_fields();
        let (pointer, rule) = fields[field % fields.len()];
        let (value, n) = if negative && v > 0 && v <= i64::MAX as u64 {
            (json!(-(v as i64)), -i128::from(v))
        } else {
            (json!(v), i128::from(v))
        };
        let m = with(pointer, value.clone());
        let got = std::panic::catch_unwind(|| decode(&m));
        prop_assert!(got.is_ok(), "{pointer} = {value}: decode panicked");
        let got = got.unwrap();
        prop_assert_eq!(got.is_ok(), rule(n), "{} = {}: {:?}", pointer, value, got.err());
    }

    /// Several fields changed at once never panic the loader.
    #[test]
    fn mutated_numeric_fields_never_panic(changes in proptest::collection::vec((0usize..64, interesting_u64()), 1..6)) {
        let fields = numeric_fields();
        let mut m = rich_manifest();
        for (f, v) in changes {
            *m.pointer_mut(fields[f % fields.len()].0).unwrap() = json!(v);
        }
        let got = std::panic::catch_unwind(|| decode(&m));
        prop_assert!(got.is_ok(), "decode panicked on {m}");
    }
}
