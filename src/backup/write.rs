//! The in-order end of a backup: frames and index entries appended to the new image.

use super::stage::{Processed, Stage};
use crate::device::buf::AlignedBuf;
use crate::format::{self, frame::Codec};
use anyhow::Result;
use crossbeam_channel::Sender;

/// One stored (or zero) extent coming out of the block stage.
pub struct Out<'a> {
    pub offset: u64,
    pub len: u64,
    pub hash: format::Hash,
    /// None for an all-zero extent.
    pub stored: Option<(Codec, &'a [u8])>,
}

/// One read unit after the block stage, handed to the sink in order.
pub struct Unit<'a> {
    pub read_len: u64,
    pub outs: Vec<Out<'a>>,
}

/// The in-order end of a backup: hands each unit's staged extents to the segment-writing sink
/// and the unit's buffer back to the reader.
pub(super) struct SegmentSink<F> {
    pub(super) sink: F,
    pub(super) free_tx: Sender<AlignedBuf>,
    pub(super) units: u64,
}

impl<F: FnMut(Unit<'_>) -> Result<()>> crate::pipeline::Consumer<Processed> for SegmentSink<F> {
    fn take(&mut self, p: Processed) -> Result<()> {
        let outs = p
            .outs
            .iter()
            .map(|o| Out {
                offset: o.offset,
                len: o.len,
                hash: o.hash,
                stored: match &o.stage {
                    Stage::Zero => None,
                    Stage::Raw(at) => {
                        Some((Codec::Raw, &p.buf.as_slice()[*at..*at + o.len as usize]))
                    }
                    Stage::Zstd(v) => Some((Codec::Zstd, v.as_slice())),
                },
            })
            .collect();
        (self.sink)(Unit {
            read_len: p.len as u64,
            outs,
        })?;
        let _ = self.free_tx.send(p.buf);
        self.units += 1;
        Ok(())
    }
}
