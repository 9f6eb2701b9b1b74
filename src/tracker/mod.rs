//! Kernel-assisted change tracking. The daemon (daemon.rs) follows the block layer's tracepoints
//! (tracefs.rs) and keeps changed-granule sets (changemap.rs); backups talk to it over a Unix socket
//! (protocol.rs, and the client here). Without a running tracker, backups compare-scan.

pub mod changemap;
pub mod daemon;
pub mod instances;
pub mod protocol;
pub mod tracefs;
pub mod trackable;

use anyhow::{anyhow, bail, Context, Result};
use protocol::{CutKind, DeviceStatus, Reply, Request, Token};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/cairn";

/// `--state-dir`, else $CAIRN_STATE_DIR, else /var/lib/cairn.
pub fn state_dir(flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| {
            std::env::var_os("CAIRN_STATE_DIR")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
}

/// A backup's open conversation with the tracker. Dropping it without `commit` tells the tracker
/// the backup failed, and the changes it handed out stay pending for the next backup.
pub struct Session {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// The tracker's answer to a cut.
pub struct Cut {
    pub token: Token,
    /// Changed granule runs, or None when continuity is not proven (then `reason` says why).
    pub changed: Option<Vec<(u64, u64)>>,
    pub reason: Option<String>,
}

impl Session {
    /// Connects to the tracker of `state_dir`; Err says why it is not reachable.
    pub fn connect(state_dir: &Path) -> Result<Session> {
        let path = state_dir.join(daemon::SOCKET);
        let s = UnixStream::connect(&path).map_err(|e| {
            anyhow!(
                "no tracker is running (cannot connect to {}: {e})",
                path.display()
            )
        })?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        s.set_write_timeout(Some(Duration::from_secs(60)))?;
        Ok(Session {
            writer: s.try_clone()?,
            reader: BufReader::new(s),
        })
    }

    fn call(&mut self, req: &Request) -> Result<Reply> {
        let mut line = serde_json::to_string(req)?;
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .context("talking to the tracker")?;
        let mut answer = String::new();
        if self
            .reader
            .read_line(&mut answer)
            .context("waiting for the tracker")?
            == 0
        {
            bail!("the tracker closed the connection");
        }
        let reply: Reply = serde_json::from_str(&answer).context("tracker reply")?;
        if let Reply::Error { message } = reply {
            bail!("tracker: {message}");
        }
        Ok(reply)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn cut(
        &mut self,
        disk: (u32, u32),
        start: u64,
        len: u64,
        granule: u64,
        consumer: &str,
        kind: CutKind,
        parent: Option<Token>,
    ) -> Result<Cut> {
        let req = Request::Cut {
            disk,
            start,
            len,
            granule,
            consumer: consumer.to_string(),
            kind,
            parent,
        };
        match self.call(&req)? {
            Reply::Cut {
                token,
                changed,
                reason,
            } => Ok(Cut {
                token,
                changed,
                reason,
            }),
            _ => bail!("unexpected tracker reply to a cut"),
        }
    }

    /// Call only after the image is safely in the repository. `keep_dirty`: byte ranges of the
    /// source the image could not read; the tracker keeps them changed for the next backup.
    pub fn commit(
        mut self,
        found: Option<Vec<(u64, u64)>>,
        keep_dirty: &[(u64, u64)],
    ) -> Result<()> {
        let req = Request::Commit {
            found,
            keep_dirty: keep_dirty.to_vec(),
        };
        match self.call(&req)? {
            Reply::Committed => Ok(()),
            _ => bail!("unexpected tracker reply to a commit"),
        }
    }

    pub fn status(&mut self) -> Result<Vec<DeviceStatus>> {
        match self.call(&Request::Status)? {
            Reply::Status { devices } => Ok(devices),
            _ => bail!("unexpected tracker reply to status"),
        }
    }
}

/// What `tracker status` knows without a running tracker.
pub enum Saved {
    Running,
    /// Not running; its saved state is shown.
    Stopped,
    /// Not running, and this note says why there is nothing to show.
    Nothing(String),
}

/// Status from the running daemon, or from its saved state when it is not running.
pub fn status(state_dir: &Path) -> Result<(Saved, Vec<DeviceStatus>)> {
    match Session::connect(state_dir) {
        Ok(mut s) => Ok((Saved::Running, s.status()?)),
        Err(e) => {
            let p = state_dir.join(daemon::STATE_FILE);
            if !p.exists() {
                let note = format!(
                    "{e:#}, and there is no saved tracker state in {}",
                    state_dir.display()
                );
                return Ok((Saved::Nothing(note), Vec::new()));
            }
            Ok((Saved::Stopped, daemon::saved_status(&p)?))
        }
    }
}

/// `cairn tracker stop`: the running tracker removes its instance and exits (this waits for
/// the exit); with none running, the instance a clean stop kept is removed. Returns what was
/// removed.
pub fn stop(state_dir: &Path) -> Result<Option<String>> {
    let mut s = match Session::connect(state_dir) {
        Ok(s) => s,
        Err(_) => {
            return Ok(daemon::stop_stopped(state_dir)?.map(|p| p.display().to_string()));
        }
    };
    let instance = match s.call(&Request::Stop)? {
        Reply::Stopped { instance } => instance,
        _ => bail!("unexpected tracker reply to stop"),
    };
    // The daemon exits without answering again: end of file is its exit.
    let mut rest = String::new();
    s.reader
        .read_line(&mut rest)
        .context("waiting for the tracker to exit")?;
    Ok(Some(instance))
}
