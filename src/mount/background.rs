//! `cairn mount --background`: the view served by a detached child process, which reports back
//! through a pipe once everything is mounted (or why it failed).

use super::{check_dir, serve, state, MountOptions, MountReport};
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

/// Runs [`serve`] in a background process and returns its report once it is ready (or its
/// error). Call before any thread is started: it forks.
pub fn serve_in_background(opts: &MountOptions) -> Result<MountReport> {
    // Checked here too so a plain mistake is reported before anything forks.
    let dir = check_dir(&opts.dir)?;
    // The server leaves the working directory (it would keep that filesystem busy), so the
    // paths it is given must not depend on it.
    let opts = &MountOptions {
        repo: std::path::absolute(&opts.repo)
            .with_context(|| format!("cannot resolve {}", opts.repo.display()))?,
        dir: dir.clone(),
        name: opts.name.clone(),
        image: opts.image.clone(),
        raw: opts.raw,
    };
    std::fs::create_dir_all(state::RUN_DIR)
        .with_context(|| format!("cannot create {}", state::RUN_DIR))?;
    let log = state::log_path_for(&dir);
    let (rx, tx) = nix::unistd::pipe().context("pipe")?;
    // SAFETY: cairn has started no thread at this point (the command line is parsed and logging
    // set up, neither spawns one), so the child is a complete copy of a single-threaded process.
    match unsafe { nix::unistd::fork() }.context("fork")? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(tx);
            await_child(rx, &log)
        }
        nix::unistd::ForkResult::Child => {
            drop(rx);
            let code = background_child(opts, &log, tx);
            std::process::exit(code);
        }
    }
}

/// The child's report, read from the pipe until it closes.
fn await_child(rx: OwnedFd, log: &Path) -> Result<MountReport> {
    let mut msg = Vec::new();
    std::fs::File::from(rx)
        .read_to_end(&mut msg)
        .context("reading from the mount process")?;
    let text = String::from_utf8_lossy(&msg);
    if let Some(json) = text.strip_prefix("ready\n") {
        return serde_json::from_str(json).context("the mount process's report");
    }
    if let Some(err) = text.strip_prefix("error\n") {
        bail!("{err}");
    }
    bail!(
        "the mount process ended before it was ready; its log: {}",
        log.display()
    )
}

/// A session of its own, out of the caller's directory, stdin and stdout on /dev/null and
/// stderr into the log.
fn detach(log: &Path) -> Result<()> {
    nix::unistd::setsid()?;
    std::env::set_current_dir("/")?;
    let null = std::fs::File::open("/dev/null")?;
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    nix::unistd::dup2(null.as_raw_fd(), 0)?;
    nix::unistd::dup2(null.as_raw_fd(), 1)?;
    nix::unistd::dup2(logf.as_raw_fd(), 2)?;
    Ok(())
}

fn background_child(opts: &MountOptions, log: &Path, tx: OwnedFd) -> i32 {
    let mut tx = Some(std::fs::File::from(tx));
    let result = detach(log)
        .context("cannot detach the mount process")
        .and_then(|()| {
            serve(opts, Some(log.to_path_buf()), &mut |r| {
                if let Some(mut t) = tx.take() {
                    let json = serde_json::to_string(r).expect("serialisable");
                    let _ = t.write_all(format!("ready\n{json}").as_bytes());
                }
            })
        });
    match result {
        Ok(()) => 0,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            match tx.take() {
                // Not ready yet: the error goes to the command, and there is no mount whose log
                // anybody would read.
                Some(mut t) => {
                    let _ = std::fs::remove_file(log);
                    let _ = t.write_all(format!("error\n{msg}").as_bytes());
                }
                None => tracing::error!("{msg}"),
            }
            1
        }
    }
}
