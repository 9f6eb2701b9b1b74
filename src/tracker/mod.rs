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
    /// A tracked cut's runs not yet read to their end: no other request may be made before.
    runs_unread: bool,
    /// Where the repair set of a differential compare-scan stands.
    repair: RepairState,
}

/// A commit's repair set is all or nothing: one begun and not finished, or one whose sending
/// failed, refuses the commit rather than give the tracker part of it (a since-full set short of
/// runs would make a later differential miss changes).
enum RepairState {
    None,
    Open(u64),
    Finished(u64),
    Failed(String),
}

/// The tracker's answer to a cut.
pub struct Cut {
    pub token: Token,
    /// What changed, when continuity is proven: its runs follow on the session
    /// (`Session::changed_runs`). None when not proven (then `reason` says why).
    pub changed: Option<Changed>,
    pub reason: Option<String>,
}

/// The size of a tracked cut's changed set, announced before its runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Changed {
    pub runs: u64,
    pub granules: u64,
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
            runs_unread: false,
            repair: RepairState::None,
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
        if self.runs_unread {
            bail!("a request to the tracker before the cut's changed runs were read");
        }
        self.send(req)?;
        self.receive()
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
                runs,
                granules,
            } => {
                self.runs_unread = tracked;
                Ok(Cut {
                    token,
                    changed: tracked.then_some(Changed { runs, granules }),
                    reason,
                })
            }
            _ => bail!("unexpected tracker reply to a cut"),
        }
    }

    /// The changed runs of the tracked cut `changed` announced, read from the tracker batch by
    /// batch as the caller takes them: a backup never holds the whole list.
    pub fn changed_runs(&mut self, changed: Changed) -> ChangedRuns<'_> {
        ChangedRuns {
            session: self,
            announced: changed,
            batch: Vec::new().into_iter(),
            runs: 0,
            granules: 0,
            end: 0,
            done: false,
        }
    }

    /// Starts the repair set a differential compare-scan sends while it runs (see `Repair`).
    pub fn repair(&mut self) -> Repair<'_> {
        self.repair = RepairState::Open(0);
        Repair {
            session: self,
            batch: Vec::with_capacity(protocol::RUN_BATCH),
        }
    }

    /// Call only after the image is safely in the repository. `keep_dirty`: byte ranges of the
    /// source the image could not read; the tracker keeps them changed for the next backup.
    pub fn commit(mut self, keep_dirty: &[(u64, u64)]) -> Result<()> {
        let found_runs = match &self.repair {
            RepairState::None => None,
            RepairState::Finished(n) => Some(*n),
            RepairState::Open(_) => bail!("the repair set was not finished"),
            RepairState::Failed(why) => bail!("sending the repair set failed: {why}"),
        };
        for batch in keep_dirty.chunks(protocol::RUN_BATCH) {
            self.send(&Request::KeepDirty {
                ranges: batch.to_vec(),
            })?;
        }
        let req = Request::Commit {
            found_runs,
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

/// A tracked cut's changed runs, ascending, as the tracker sends them. Each is checked: ascending
/// and disjoint, at most `RUN_BATCH` a batch, and in all exactly the runs and granules the cut
/// announced. The iterator ends (None) only after the tracker's `RunsEnd` agreed.
pub struct ChangedRuns<'a> {
    session: &'a mut Session,
    announced: Changed,
    batch: std::vec::IntoIter<(u64, u64)>,
    runs: u64,
    granules: u64,
    /// The granule after the last run taken.
    end: u64,
    done: bool,
}

impl ChangedRuns<'_> {
    fn take(&mut self, (first, count): (u64, u64)) -> Result<(u64, u64)> {
        if count == 0 || first < self.end || first.checked_add(count).is_none() {
            bail!(
                "the tracker sent changed run {first}+{count} out of order (after granule {})",
                self.end
            );
        }
        self.end = first + count;
        self.runs += 1;
        self.granules += count;
        if self.runs > self.announced.runs || self.granules > self.announced.granules {
            bail!(
                "the tracker sent more than the {} changed runs ({} granules) it announced",
                self.announced.runs,
                self.announced.granules
            );
        }
        Ok((first, count))
    }

    /// The next batch, or Ok(false) once the runs ended as announced.
    fn refill(&mut self) -> Result<bool> {
        match self.session.receive()? {
            Reply::Runs { runs } if runs.len() > protocol::RUN_BATCH => {
                bail!("the tracker sent {} runs in one batch", runs.len())
            }
            Reply::Runs { runs } => {
                self.batch = runs.into_iter();
                Ok(true)
            }
            Reply::RunsEnd { count }
                if count == self.runs
                    && (self.runs, self.granules)
                        == (self.announced.runs, self.announced.granules) =>
            {
                self.session.runs_unread = false;
                Ok(false)
            }
            Reply::RunsEnd { count } => bail!(
                "the tracker announced {} changed runs ({} granules) and ended them at {count}, but sent {} ({} granules)",
                self.announced.runs,
                self.announced.granules,
                self.runs,
                self.granules
            ),
            _ => bail!("unexpected tracker reply among a cut's runs"),
        }
    }
}

impl Iterator for ChangedRuns<'_> {
    type Item = Result<(u64, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            if let Some(run) = self.batch.next() {
                let taken = self.take(run);
                self.done = taken.is_err();
                return Some(taken);
            }
            match self.refill() {
                Ok(true) => {}
                Ok(false) => self.done = true,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        None
    }
}

/// The granule runs a differential compare-scan read, sent to the tracker as `Found` batches
/// while the backup runs (the tracker holds them until the commit), so the backup never holds
/// them. Runs must come ascending; touching runs are joined. A failed send, or a repair set
/// never finished, refuses the commit (see `RepairState`): the tracker's sets stay as they were.
pub struct Repair<'a> {
    session: &'a mut Session,
    batch: Vec<(u64, u64)>,
}

impl Repair<'_> {
    pub fn push(&mut self, first: u64, count: u64) {
        match self.batch.last_mut() {
            Some((f, c)) if *f + *c == first => *c += count,
            _ => {
                if self.batch.len() == protocol::RUN_BATCH {
                    self.send_batch();
                }
                self.batch.push((first, count));
            }
        }
    }

    fn send_batch(&mut self) {
        let runs = std::mem::take(&mut self.batch);
        let RepairState::Open(sent) = self.session.repair else {
            return;
        };
        if runs.is_empty() {
            return;
        }
        let n = runs.len() as u64;
        self.session.repair = match self.session.send(&Request::Found { runs }) {
            Ok(()) => RepairState::Open(sent + n),
            Err(e) => RepairState::Failed(format!("{e:#}")),
        };
    }

    /// Sends what is left: only a finished repair set can be committed.
    pub fn finish(mut self) {
        self.send_batch();
        if let RepairState::Open(n) = self.session.repair {
            self.session.repair = RepairState::Finished(n);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A session whose tracker side is `replies`, already written (and the writer end kept).
    fn session_with(replies: &[Reply]) -> (Session, UnixStream) {
        let (mine, mut theirs) = UnixStream::pair().unwrap();
        for r in replies {
            let mut line = serde_json::to_string(r).unwrap();
            line.push('\n');
            theirs.write_all(line.as_bytes()).unwrap();
        }
        let s = Session {
            writer: mine.try_clone().unwrap(),
            reader: BufReader::new(mine),
            runs_unread: true,
            repair: RepairState::None,
        };
        (s, theirs)
    }

    fn runs(v: &[(u64, u64)]) -> Reply {
        Reply::Runs { runs: v.to_vec() }
    }

    /// The runs `replies` give, with the tracker gone after them.
    fn read_all(replies: &[Reply], runs: u64, granules: u64) -> Result<Vec<(u64, u64)>> {
        let (mut s, theirs) = session_with(replies);
        drop(theirs);
        let got = s.changed_runs(Changed { runs, granules }).collect();
        got
    }

    #[test]
    fn changed_runs_stream_batch_by_batch_and_end_as_announced() {
        let replies = [
            runs(&[(0, 2), (5, 1)]),
            runs(&[(9, 3)]),
            Reply::RunsEnd { count: 3 },
        ];
        let (mut s, _theirs) = session_with(&replies);
        let got: Vec<(u64, u64)> = s
            .changed_runs(Changed {
                runs: 3,
                granules: 6,
            })
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(got, vec![(0, 2), (5, 1), (9, 3)]);
        assert!(!s.runs_unread, "the session is free for the commit");
    }

    #[test]
    fn changed_runs_that_disagree_with_the_announcement_are_refused() {
        let end = |count| Reply::RunsEnd { count };
        let cases: [(&[Reply], u64, u64, &str); 5] = [
            (&[runs(&[(4, 1), (2, 1)]), end(2)], 2, 2, "out of order"),
            (&[runs(&[(4, 2), (5, 1)]), end(2)], 2, 3, "out of order"),
            (&[runs(&[(1, 1), (3, 1)]), end(2)], 1, 2, "more than"),
            (&[runs(&[(1, 1)]), end(2)], 2, 2, "ended them at 2"),
            (&[runs(&[(1, 1)])], 1, 1, "closed the connection"),
        ];
        for (replies, n, g, why) in cases {
            let err = read_all(replies, n, g).unwrap_err();
            assert!(format!("{err:#}").contains(why), "{why}: {err:#}");
        }
    }

    #[test]
    fn no_commit_before_the_runs_are_read_or_with_an_unfinished_repair() {
        let (s, _theirs) = session_with(&[]);
        let err = s.commit(&[]).unwrap_err();
        assert!(format!("{err:#}").contains("before the cut's changed runs were read"));

        let (mut s, _theirs) = session_with(&[]);
        s.runs_unread = false;
        let mut repair = s.repair();
        repair.push(0, 1);
        drop(repair);
        let err = s.commit(&[]).unwrap_err();
        assert!(format!("{err:#}").contains("not finished"), "{err:#}");
    }
}
