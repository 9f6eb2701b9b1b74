//! The `badranges` file: an image's unreadable source ranges, in binary (docs/format.md,
//! "badranges"). A dying disk can have hundreds of thousands of them; as JSON they would push the
//! manifest past the size its loader accepts.

use super::{corrupt, le_u32, le_u64, manifest::BadRangesRef, parse_hash_hex, FormatError};

pub const FILE_NAME: &str = "badranges";
const MAGIC: &[u8; 8] = b"CAIRNBAD";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 24;
const RANGE_LEN: u64 = 16;

/// The file's exact size for `ranges` ranges.
pub fn encoded_len(ranges: u64) -> u64 {
    ranges.saturating_mul(RANGE_LEN).saturating_add(HEADER_LEN)
}

/// The file's bytes and the manifest's reference to them. `ranges` must be sorted and disjoint.
pub fn encode(ranges: &[(u64, u64)]) -> (Vec<u8>, BadRangesRef) {
    let mut out = Vec::with_capacity(encoded_len(ranges.len() as u64) as usize);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(ranges.len() as u64).to_le_bytes());
    for &(o, l) in ranges {
        out.extend_from_slice(&o.to_le_bytes());
        out.extend_from_slice(&l.to_le_bytes());
    }
    let r = BadRangesRef {
        ranges: ranges.len() as u64,
        bytes: ranges.iter().map(|r| r.1).sum(),
        blake3: blake3::hash(&out).to_hex().to_string(),
    };
    (out, r)
}

/// Parses the file, checking it against the manifest's reference and the source size: the same
/// rules as the inline list (sorted, non-overlapping, non-empty, inside the source).
pub fn decode(
    b: &[u8],
    want: &BadRangesRef,
    source_size: u64,
) -> Result<Vec<(u64, u64)>, FormatError> {
    if b.len() as u64 != encoded_len(want.ranges) {
        return Err(corrupt(format!(
            "{} bytes, {} expected for {} ranges",
            b.len(),
            encoded_len(want.ranges),
            want.ranges
        )));
    }
    if parse_hash_hex(&want.blake3) != Some(*blake3::hash(b).as_bytes()) {
        return Err(corrupt("checksum does not match the manifest (damaged)"));
    }
    if &b[..8] != MAGIC {
        return Err(corrupt("not a cairn bad-range list (bad magic)"));
    }
    let version = le_u32(b, 8);
    if version != VERSION {
        return Err(corrupt(format!("unknown bad-range list version {version}")));
    }
    if le_u64(b, 16) != want.ranges {
        return Err(corrupt("range count does not match the manifest"));
    }
    let mut out = Vec::with_capacity(want.ranges as usize);
    let mut end = 0u64;
    let mut bytes = 0u64;
    for chunk in b[HEADER_LEN as usize..].chunks_exact(RANGE_LEN as usize) {
        let (o, l) = (le_u64(chunk, 0), le_u64(chunk, 8));
        if l == 0 || o < end || o.checked_add(l).is_none_or(|e| e > source_size) {
            return Err(corrupt("bad-sector list out of order or beyond the source"));
        }
        end = o + l;
        bytes += l;
        out.push((o, l));
    }
    if bytes != want.bytes {
        return Err(corrupt("unreadable byte count does not match the manifest"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let ranges = vec![(512, 512), (4096, 1024), (1 << 20, 512)];
        let (b, r) = encode(&ranges);
        assert_eq!(b.len() as u64, encoded_len(3));
        assert_eq!(r.bytes, 2048);
        assert_eq!(decode(&b, &r, 2 << 20).unwrap(), ranges);
        assert!(decode(&b, &r, 1 << 20).is_err(), "beyond the source");
        let mut c = b.clone();
        c[30] ^= 1;
        assert!(decode(&c, &r, 2 << 20).is_err());
        assert!(decode(&b[..b.len() - 16], &r, 2 << 20).is_err());
        let (unsorted, ru) = encode(&[(4096, 512), (0, 512)]);
        assert!(decode(&unsorted, &ru, 1 << 20).is_err());
    }
}
