//! Segment headers and frame headers (docs/format.md, "segment files").

use super::{corrupt, known_version, le_u32, le_u64, FormatError, FORMAT_VERSION};

pub const SEGMENT_HEADER_LEN: usize = 32;
pub const FRAME_HEADER_LEN: usize = 32;
const SEGMENT_MAGIC: &[u8; 8] = b"CAIRNSEG";
const FRAME_MAGIC: &[u8; 4] = b"CBLK";

/// Ties a segment file to the image it belongs to.
pub fn image_tag(image_id: &str) -> [u8; 12] {
    blake3::hash(image_id.as_bytes()).as_bytes()[..12]
        .try_into()
        .expect("12 bytes")
}

/// A segment header: the segment's number and the tag of the image that wrote it (its origin;
/// in format 2 other images may reference it too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    pub number: u32,
    pub image_tag: [u8; 12],
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        b[0..8].copy_from_slice(SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.number.to_le_bytes());
        b[16..28].copy_from_slice(&self.image_tag);
        let crc = crc32fast::hash(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        if b.len() < SEGMENT_HEADER_LEN {
            return Err(corrupt("segment shorter than its header"));
        }
        if &b[0..8] != SEGMENT_MAGIC {
            return Err(corrupt("not a cairn segment (bad magic)"));
        }
        let version = le_u32(b, 8);
        if !known_version(version.into()) {
            return Err(FormatError::UnknownVersion {
                found: version.into(),
            });
        }
        if crc32fast::hash(&b[0..28]) != le_u32(b, 28) {
            return Err(corrupt("segment header checksum mismatch"));
        }
        Ok(SegmentHeader {
            number: le_u32(b, 12),
            image_tag: b[16..28].try_into().expect("12 bytes"),
        })
    }
}

/// How a frame's payload is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Raw = 1,
    Zstd = 2,
}

impl Codec {
    pub fn from_u8(v: u8) -> Option<Codec> {
        match v {
            1 => Some(Codec::Raw),
            2 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameHeader {
    pub codec: Codec,
    pub offset: u64,
    pub length: u32,
    pub stored_length: u32,
    pub crc: u32,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[0..4].copy_from_slice(FRAME_MAGIC);
        b[4] = self.codec as u8;
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..20].copy_from_slice(&self.length.to_le_bytes());
        b[20..24].copy_from_slice(&self.stored_length.to_le_bytes());
        b[24..28].copy_from_slice(&self.crc.to_le_bytes());
        let crc = crc32fast::hash(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        if b.len() < FRAME_HEADER_LEN {
            return Err(corrupt("frame header truncated"));
        }
        if &b[0..4] != FRAME_MAGIC {
            return Err(corrupt("no frame at this offset (bad magic)"));
        }
        if crc32fast::hash(&b[0..28]) != le_u32(b, 28) {
            return Err(corrupt("frame header checksum mismatch"));
        }
        let codec =
            Codec::from_u8(b[4]).ok_or_else(|| corrupt(format!("unknown frame codec {}", b[4])))?;
        Ok(FrameHeader {
            codec,
            offset: le_u64(b, 8),
            length: le_u32(b, 16),
            stored_length: le_u32(b, 20),
            crc: le_u32(b, 24),
        })
    }
}

/// Turns a checked payload back into plaintext in `out`, whose length is the extent's length;
/// anything that does not decode to exactly that many bytes is refused.
pub fn decode_payload(
    codec: Codec,
    payload: &[u8],
    out: &mut [u8],
    decompressor: &mut zstd::bulk::Decompressor<'_>,
) -> Result<(), FormatError> {
    let length = out.len();
    match codec {
        Codec::Raw => {
            if payload.len() != length {
                return Err(corrupt(format!(
                    "raw payload is {} bytes, expected {length}",
                    payload.len()
                )));
            }
            out.copy_from_slice(payload);
        }
        Codec::Zstd => {
            let n = decompressor
                .decompress_to_buffer(payload, out)
                .map_err(|e| {
                    corrupt(format!(
                        "zstd payload does not decode to {length} bytes: {e}"
                    ))
                })?;
            if n != length {
                return Err(corrupt(format!(
                    "zstd payload decodes to {n} bytes, expected {length}"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_header_round_trip_and_damage() {
        let h = FrameHeader {
            codec: Codec::Zstd,
            offset: 1 << 40,
            length: 1 << 20,
            stored_length: 12345,
            crc: 0xdead_beef,
        };
        let mut b = h.encode();
        assert_eq!(FrameHeader::decode(&b).unwrap(), h);
        b[9] ^= 1;
        assert!(FrameHeader::decode(&b).is_err());
    }

    #[test]
    fn segment_header_rejects_other_versions() {
        let mut b = SegmentHeader {
            number: 3,
            image_tag: image_tag("x"),
        }
        .encode();
        b[8] = 7;
        let crc = crc32fast::hash(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            SegmentHeader::decode(&b),
            Err(FormatError::UnknownVersion { found: 7 })
        ));
    }

    #[test]
    fn zstd_payload_must_decode_to_exact_length() {
        let data = vec![7u8; 4096];
        let payload = zstd::bulk::compress(&data, 1).unwrap();
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        let mut out = vec![0u8; 4096];
        decode_payload(Codec::Zstd, &payload, &mut out, &mut d).unwrap();
        assert_eq!(out, data);
        assert!(decode_payload(Codec::Zstd, &payload, &mut [0u8; 4095], &mut d).is_err());
        assert!(decode_payload(Codec::Zstd, &payload, &mut [0u8; 8192], &mut d).is_err());
        assert!(decode_payload(Codec::Zstd, b"garbage", &mut out, &mut d).is_err());
    }
}
