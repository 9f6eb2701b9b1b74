//! The parsers of everything read from a repository take arbitrary bytes without panicking
//! (the cargo-fuzz targets in fuzz/ do the same, coverage-guided, on nightly).

use cairn::format::frame::{decode_payload, image_tag, Codec};
use cairn::format::index::Geometry;
use cairn::format::{Entry, EntryKind, FrameHeader, Index, Manifest, SegmentHeader};
use proptest::prelude::*;

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
"segments":[],"stats":{"bytes_read":0,"data_bytes":0,"stored_bytes":0,"blocks_total":0,"blocks_zero":0,"blocks_stored":0,"duration_ms":0}}"#;
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
