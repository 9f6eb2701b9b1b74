//! Kernel-assisted change tracking. The daemon (daemon.rs) follows the block layer's tracepoints
//! (tracefs.rs) and keeps changed-granule sets (changemap.rs); backups talk to it over a Unix socket
//! (protocol.rs, and the client here); its state survives restarts in statefile.rs. Without a running tracker, backups compare-scan.

pub mod changemap;
pub mod daemon;
pub mod instances;
pub mod protocol;
pub mod statefile;
pub mod tracefs;
pub mod trackable;

use anyhow::{anyhow, bail, Context, Result};
use protocol::{CutKind, DeviceStatus, Reply, Request, Token};
use std::io::{BufReader, Write};
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

    fn send(&mut self, req: &Request) -> Result<()> {
        let mut line = serde_json::to_string(req)?;
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .context("talking to the tracker")
    }

    fn receive(&mut self) -> Result<Reply> {
        let mut answer = String::new();
        if !protocol::read_message(&mut self.reader, &mut answer)
            .context("waiting for the tracker")?
        {
            bail!("the tracker closed the connection");
        }
        let reply: Reply = serde_json::from_str(&answer).context("tracker reply")?;
        if let Reply::Error { message } = reply {
            bail!("tracker: {message}");
        }
        Ok(reply)
    }

    fn call(&mut self, req: &Request) -> Result<Reply> {
        self.send(req)?;
        self.receive()
    }

    /// The runs that follow a tracked cut's reply, batch by batch, up to the count that ends them.
    fn receive_runs(&mut self) -> Result<Vec<(u64, u64)>> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        loop {
            match self.receive()? {
                Reply::Runs { runs: batch } => {
                    if batch.len() > protocol::RUN_BATCH {
                        bail!("the tracker sent {} runs in one batch", batch.len());
                    }
                    runs.extend(batch);
                }
                Reply::RunsEnd { count } if count == runs.len() as u64 => return Ok(runs),
                Reply::RunsEnd { count } => bail!(
                    "the tracker announced {count} changed runs but sent {}",
                    runs.len()
                ),
                _ => bail!("unexpected tracker reply among a cut's runs"),
            }
        }
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
                tracked,
                reason,
            } => {
                let changed = if tracked {
                    Some(self.receive_runs()?)
                } else {
                    None
                };
                Ok(Cut {
                    token,
                    changed,
                    reason,
                })
            }
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
        for batch in found.iter().flat_map(|f| f.chunks(protocol::RUN_BATCH)) {
            self.send(&Request::Found {
                runs: batch.to_vec(),
            })?;
        }
        for batch in keep_dirty.chunks(protocol::RUN_BATCH) {
            self.send(&Request::KeepDirty {
                ranges: batch.to_vec(),
            })?;
        }
        let req = Request::Commit {
            found_runs: found.as_ref().map(|f| f.len() as u64),
            keep_dirty_ranges: keep_dirty.len() as u64,
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
            let Some(p) = statefile::path_in(state_dir) else {
                let note = format!(
                    "{e:#}, and there is no saved tracker state in {}",
                    state_dir.display()
                );
                return Ok((Saved::Nothing(note), Vec::new()));
            };
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
    protocol::read_message(&mut s.reader, &mut rest).context("waiting for the tracker to exit")?;
    Ok(Some(instance))
}
