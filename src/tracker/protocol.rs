//! The backup ⇄ tracker handshake over a Unix socket in the state directory: one JSON message per
//! line, each at most `MAX_MESSAGE` bytes. A backup "cuts" (takes the changed set and a token),
//! keeps the connection open while it reads, and "commits" once its image is in the repository. A
//! connection that closes without a commit — a failed or killed backup — gives the changes back,
//! so the next backup still has them.
//!
//! Run lists are never one message: a set of millions of scattered granules would be a line of
//! tens of megabytes. The cut's reply says whether runs follow and how many, with how many
//! granules; they come as `Runs` lines of at most `RUN_BATCH` runs and end with `RunsEnd`, which
//! counts them. The backup reads them as it goes (socket back-pressure paces the tracker's
//! sender), so neither side holds the list. Likewise a commit's repair set goes as `Found` lines
//! while the backup runs and its unreadable ranges as `KeepDirty` lines before the commit (no
//! reply each), and the `Commit` that follows counts them, so a lost or extra batch is an error,
//! not a silent change.

use serde::{Deserialize, Serialize};
use std::io::BufRead;

/// Runs per `Runs`, `Found` or `KeepDirty` line: about 200 KiB of JSON at most.
pub const RUN_BATCH: usize = 4096;
/// The longest line either side accepts.
pub const MAX_MESSAGE: usize = 1 << 20;

/// Reads one line into `line` (cleared first), refusing one longer than `MAX_MESSAGE`: a peer
/// cannot make the other side buffer without bound. Ok(false) at end of stream.
pub fn read_message(reader: &mut impl BufRead, line: &mut String) -> std::io::Result<bool> {
    line.clear();
    let mut bytes = Vec::new();
    loop {
        // A socket with a timeout can fail a read with EINTR after a stop and continue, even
        // without signal handlers (signal(7)): that is not an error of the conversation.
        let buf = match reader.fill_buf() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => other?,
        };
        if buf.is_empty() {
            if bytes.is_empty() {
                return Ok(false);
            }
            break;
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if bytes.len() + take > MAX_MESSAGE + 1 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a message longer than {MAX_MESSAGE} bytes"),
            ));
        }
        bytes.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if done {
            break;
        }
    }
    *line = String::from_utf8(bytes).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "a message that is not UTF-8",
        )
    })?;
    Ok(true)
}

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
    /// Granule runs a compare-scan differential found changed since the full, which repair the
    /// since-full set at the commit; sent in batches before it, after the cut.
    Found {
        runs: Vec<(u64, u64)>,
    },
    /// Byte ranges of the source (offset from its start, length) that stay changed after the
    /// commit in both sets: what the image could not read, so the next one reads it. In batches
    /// before the commit.
    KeepDirty {
        ranges: Vec<(u64, u64)>,
    },
    /// The image of the last cut is safely in the repository. `found_runs`: how many `Found`
    /// runs were sent (None: no repair set); `keep_dirty_ranges`: how many `KeepDirty` ranges.
    Commit {
        found_runs: Option<u64>,
        keep_dirty_ranges: u64,
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
        /// True when the tracker can prove continuity: the changed granule runs follow, as `Runs`
        /// lines and a `RunsEnd`. False means compare-scan.
        tracked: bool,
        /// Why a compare-scan is needed.
        reason: Option<String>,
        /// For a tracked cut: how many runs follow, and how many granules they cover.
        #[serde(default)]
        runs: u64,
        #[serde(default)]
        granules: u64,
    },
    /// Up to `RUN_BATCH` changed granule runs, ascending.
    Runs {
        runs: Vec<(u64, u64)>,
    },
    /// The last of the cut's runs was sent; `count` of them in all.
    RunsEnd {
        count: u64,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_read_one_by_one_and_an_overlong_one_is_refused() {
        let mut input = b"{\"op\":\"status\"}\nsecond".to_vec();
        let mut r = std::io::BufReader::with_capacity(7, &input[..]);
        let mut line = String::new();
        assert!(read_message(&mut r, &mut line).unwrap());
        assert_eq!(line, "{\"op\":\"status\"}\n");
        assert!(read_message(&mut r, &mut line).unwrap());
        assert_eq!(line, "second");
        assert!(!read_message(&mut r, &mut line).unwrap());

        input = vec![b'x'; MAX_MESSAGE + 1];
        input.push(b'\n');
        let exact = read_message(&mut &input[..], &mut line).unwrap_err();
        assert_eq!(exact.kind(), std::io::ErrorKind::InvalidData);
        let mut fits = vec![b'x'; MAX_MESSAGE - 1];
        fits.push(b'\n');
        assert!(read_message(&mut &fits[..], &mut line).unwrap());
        assert_eq!(line.len(), MAX_MESSAGE);
    }
}
