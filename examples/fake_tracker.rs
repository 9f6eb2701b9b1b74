//! A stand-in for `cairn tracker` that speaks its socket protocol and reports a chosen number of
//! scattered changed runs, for tools/bench.d/tracked.bash: it measures what a tracked incremental
//! of millions of runs costs the backup (peak RSS) without writing millions of blocks and
//! tracing them. Not a tracker: it sees no writes, and every incremental cut it answers claims
//! every other granule changed.
//!
//! Usage: fake_tracker STATE_DIR RUNS. Serves until killed.

use anyhow::{bail, Context, Result};
use cairn::tracker::daemon::SOCKET;
use cairn::tracker::protocol::{read_message, CutKind, Reply, Request, Token, RUN_BATCH};
use std::io::{BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, state_dir, runs] = &args[..] else {
        bail!("usage: fake_tracker STATE_DIR RUNS");
    };
    let runs: u64 = runs.parse().context("RUNS")?;
    std::fs::create_dir_all(state_dir)?;
    let path = std::path::Path::new(state_dir).join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("{}", path.display()))?;
    let mut seq = 0u64;
    for stream in listener.incoming() {
        if let Err(e) = serve(stream?, runs, &mut seq) {
            eprintln!("fake_tracker: {e:#}");
        }
    }
    Ok(())
}

fn send(out: &mut UnixStream, reply: &Reply) -> Result<()> {
    let mut line = serde_json::to_string(reply)?;
    line.push('\n');
    out.write_all(line.as_bytes())?;
    Ok(())
}

fn serve(stream: UnixStream, runs: u64, seq: &mut u64) -> Result<()> {
    let mut out = stream.try_clone()?;
    let mut input = BufReader::new(stream);
    let mut line = String::new();
    while read_message(&mut input, &mut line)? {
        match serde_json::from_str::<Request>(&line)? {
            Request::Cut {
                len, granule, kind, ..
            } => {
                *seq += 1;
                let token = Token {
                    lineage: "fa4e".into(),
                    seq: *seq,
                };
                let count = runs.min(len.div_ceil(granule) / 2);
                let tracked = kind != CutKind::Full;
                send(
                    &mut out,
                    &Reply::Cut {
                        token,
                        tracked,
                        reason: None,
                        runs: if tracked { count } else { 0 },
                        granules: if tracked { count } else { 0 },
                    },
                )?;
                if tracked {
                    send_runs(&mut out, count)?;
                }
            }
            Request::Found { .. } | Request::KeepDirty { .. } => {}
            Request::Commit { .. } => send(&mut out, &Reply::Committed)?,
            Request::Status => send(&mut out, &Reply::Status { devices: vec![] })?,
            Request::Stop => return Ok(()),
        }
    }
    Ok(())
}

/// Granules 0, 2, 4, …: `count` runs of one granule each.
fn send_runs(out: &mut UnixStream, count: u64) -> Result<()> {
    let mut next = 0u64;
    while next < count {
        let n = (count - next).min(RUN_BATCH as u64);
        let runs = (next..next + n).map(|i| (2 * i, 1)).collect();
        send(out, &Reply::Runs { runs })?;
        next += n;
    }
    send(out, &Reply::RunsEnd { count })
}
