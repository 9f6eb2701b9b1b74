//! The backup ⇄ tracker handshake over a Unix socket in the state directory: one JSON message per
//! line. A backup "cuts" (takes the changed set and a token), keeps the connection open while it
//! reads, and "commits" once its image is in the repository. A connection that closes without a
//! commit — a failed or killed backup — gives the changes back, so the next backup still has them.

use serde::{Deserialize, Serialize};

/// Identifies a cut: the tracker's record of "this image saw the device as of here".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// Random id of the consumer's tracking history; changes whenever that history is reset.
    pub lineage: String,
    pub seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CutKind {
    Full,
    Incremental,
    Differential,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Cut {
        /// Whole disk, as major:minor.
        disk: (u32, u32),
        /// Byte range of the source on the disk (a partition's start and size, or the whole disk).
        start: u64,
        len: u64,
        granule: u64,
        /// Who the images are for: repository id and series name.
        consumer: String,
        kind: CutKind,
        /// For an incremental: the token of the previous image; for a differential: of the full.
        parent: Option<Token>,
    },
    /// The image of the last cut is safely in the repository. `found` (granule runs) is what a
    /// compare-scan differential found changed since the full, which repairs the since-full set.
    Commit {
        found: Option<Vec<(u64, u64)>>,
        /// Byte ranges of the source (offset from its start, length) that stay changed after
        /// this commit in both sets: what the image could not read, so the next one reads it.
        #[serde(default)]
        keep_dirty: Vec<(u64, u64)>,
    },
    /// Stop the tracker for good: remove its kernel instance (no restart is expected).
    Stop,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    Status {
        devices: Vec<DeviceStatus>,
    },
    Cut {
        token: Token,
        /// Changed granule runs when the tracker can prove continuity; None means compare-scan.
        changed: Option<Vec<(u64, u64)>>,
        /// Why a compare-scan is needed.
        reason: Option<String>,
    },
    Committed,
    /// The tracker removed its instance and is exiting.
    Stopped {
        instance: String,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub device: String,
    pub disk: (u32, u32),
    pub size: u64,
    pub tracking_since: String,
    /// "intact" or "broken: why" for the device as a whole.
    pub continuity: String,
    pub consumers: Vec<ConsumerStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsumerStatus {
    pub consumer: String,
    pub start: u64,
    pub len: u64,
    pub continuity_since_image: String,
    pub continuity_since_full: String,
    pub changed_bytes_since_image: u64,
    pub changed_bytes_since_full: u64,
    pub last_image_seq: Option<u64>,
    pub last_full_seq: Option<u64>,
}
