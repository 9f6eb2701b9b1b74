//! The command line: parse, set up logging, call one module, print the result. Nothing else.
//!
//! `args` is the grammar (every option and `--help` text); `imaging`, `inspect`, `mount` and `tracker`
//! hold one function per subcommand, which calls the library and prints its report, human or
//! `--json`; `output` holds the printing several commands share.

mod args;
mod imaging;
mod inspect;
mod mount;
mod output;
mod prune;
mod tracker;

pub use args::{parse_size, Cli};

use crate::progress::Progress;
use anyhow::Result;
use args::Command;
use clap::Parser;
use std::path::PathBuf;

pub fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    let ctx = Ctx {
        json: cli.json,
        quiet: cli.quiet,
        state_dir: cli.state_dir,
        progress: progress_bar(cli.quiet),
    };
    dispatch(cli.command, &ctx)
}

/// What the global options tell every command.
struct Ctx {
    /// One JSON document on stdout instead of the human summary.
    json: bool,
    /// Only errors: commands whose human output is a summary skip it (a listing still prints).
    quiet: bool,
    /// `--state-dir` as given; `tracker_state_dir` resolves it.
    state_dir: Option<PathBuf>,
    progress: Progress,
}

impl Ctx {
    /// The change tracker's state directory: the flag, else CAIRN_STATE_DIR, else the default.
    fn tracker_state_dir(&self) -> PathBuf {
        crate::tracker::state_dir(self.state_dir.as_deref())
    }
}

fn dispatch(command: Command, ctx: &Ctx) -> Result<()> {
    match command {
        Command::Backup(a) => imaging::cmd_backup(a, ctx),
        Command::Restore(a) => imaging::cmd_restore(a, ctx),
        Command::Verify(a) => inspect::cmd_verify(a, ctx),
        Command::Badmap(a) => inspect::cmd_badmap(a, ctx),
        Command::Show(a) => inspect::cmd_show(a, ctx),
        Command::List(a) if a.totals || !ctx.json => prune::cmd_list_totals(a, ctx),
        Command::List(a) => inspect::cmd_list_json(a),
        Command::Disks => inspect::cmd_disks(ctx),
        Command::Tracker(t) => tracker::cmd_tracker(t, ctx),
        Command::Mount(a) => mount::cmd_mount(a, ctx),
        Command::Umount(a) => mount::cmd_umount(a, ctx),
        Command::Prune(a) => prune::cmd_prune(a, ctx),
        Command::Delete(a) => prune::cmd_delete(a, ctx),
        Command::Protect(a) => prune::cmd_protect(a, ctx),
        Command::Upgrade(a) => prune::cmd_upgrade(a, ctx),
    }
}

fn progress_bar(quiet: bool) -> Progress {
    if quiet {
        Progress::hidden()
    } else {
        Progress::new(true)
    }
}

/// A backup that finished, but with unreadable sectors: exit status 3, so scripts can tell.
#[derive(Debug)]
pub struct PartialImage(pub String);

impl std::fmt::Display for PartialImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PartialImage {}

fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => tracing::Level::ERROR,
        (false, 0) => tracing::Level::WARN,
        (false, 1) => tracing::Level::INFO,
        (false, _) => tracing::Level::DEBUG,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .init();
}
