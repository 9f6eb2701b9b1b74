//! `cairn mount` and `cairn umount`: a restore point as read-only files and filesystems
//! (docs/mount.md).
//!
//! The view is a FUSE filesystem at DIR whose files are byte ranges of the restore point, read
//! through [`source::BlockSource`] (the chain's planner and checked reader, with a block cache).
//! Filesystems this machine can mount read-only are loop-attached from those files and mounted
//! on directories of the view:
//!
//! ```text
//! DIR/disk        the whole restore point (raw), exactly the source's size
//! DIR/pN          partition N: its filesystem, mounted read-only; or its raw bytes (a file)
//!                 when it cannot be mounted here, or with --raw
//! DIR/fs          an image without partitions: its filesystem, mounted read-only
//! DIR/.raw/pN     every partition's raw bytes (the loop devices read these), not with --raw
//! ```

mod background;
pub mod cache;
mod filesystems;
mod layout;
mod loopdev;
mod probe;
pub mod source;
mod state;
mod umount;
mod view;

pub use background::serve_in_background;
pub use umount::{umount, UmountReport};

use crate::chain;
use crate::repo::Repository;
use anyhow::{bail, Context, Result};
use nix::sys::signal::{SigSet, Signal};
use serde::{Deserialize, Serialize};
use source::{BlockSource, RestorePoint};
use std::path::{Path, PathBuf};

/// Plaintext blocks kept decoded: 64 blocks of the default 1 MiB.
pub const CACHE_BYTES: usize = 64 << 20;
/// FUSE request threads: reads of several processes (and the loop devices) decode in parallel.
const FUSE_THREADS: usize = 4;

pub struct MountOptions {
    pub repo: PathBuf,
    pub dir: PathBuf,
    pub name: Option<String>,
    pub image: Option<String>,
    /// Only raw files: no loop devices, no filesystems mounted.
    pub raw: bool,
}

/// What a mount shows, once everything is ready.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountReport {
    pub dir: PathBuf,
    pub image: String,
    pub name: String,
    /// The restore point's chain, oldest (the full) first.
    pub chain: Vec<String>,
    pub created: String,
    pub size: u64,
    /// DIR/disk.
    pub disk: PathBuf,
    /// "gpt", "mbr", or none.
    pub partition_table: Option<String>,
    pub parts: Vec<PartReport>,
    pub raw: bool,
    /// The serving process (what `cairn umount` ends).
    pub pid: u32,
    /// Where a background mount logs (damaged blocks read, among others).
    pub log: Option<PathBuf>,
    /// Warnings met on the way (a partition table cairn cannot read, missing segment files).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartReport {
    /// The partition number; none for the filesystem of an image without partitions.
    pub number: Option<u32>,
    /// Byte range in the restore point.
    pub start: u64,
    pub size: u64,
    /// The file with its exact bytes.
    pub raw_file: PathBuf,
    /// What its superblock says ("ext2/3/4", "xfs", "vfat", "unknown", ...).
    pub filesystem: String,
    /// Where its filesystem is mounted read-only, if it is.
    pub mounted: Option<PathBuf>,
    /// Why it is not mounted (one line).
    pub note: Option<String>,
}

/// DIR as an absolute path without following its last component (a dead view cannot be
/// stat'ed, and mountinfo names mounts by canonical paths).
fn absolute_dir(dir: &Path) -> Result<PathBuf> {
    let abs =
        std::path::absolute(dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    let (Some(parent), Some(name)) = (abs.parent(), abs.file_name()) else {
        bail!("{} cannot be a mount directory", dir.display());
    };
    let parent = parent
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", parent.display()))?;
    Ok(parent.join(name))
}

/// Checks DIR before anything touches it: an existing empty directory, not a mount point.
fn check_dir(dir: &Path) -> Result<PathBuf> {
    let abs = absolute_dir(dir)?;
    let meta = std::fs::metadata(&abs)
        .with_context(|| format!("mount directory {} does not exist", abs.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", abs.display());
    }
    let canonical = abs.canonicalize()?;
    if state::mounts()?.iter().any(|m| m.mount_point == canonical) {
        bail!(
            "{} is already a mount point (`cairn umount {}` ends a cairn mount)",
            canonical.display(),
            canonical.display()
        );
    }
    let mut entries = std::fs::read_dir(&canonical)
        .with_context(|| format!("cannot read {}", canonical.display()))?;
    if entries.next().is_some() {
        bail!(
            "{} is not empty; mount into an empty directory",
            canonical.display()
        );
    }
    Ok(canonical)
}

/// Mounts the view at `opts.dir` and serves it until SIGINT, SIGTERM or SIGHUP (what `cairn
/// umount` sends), or until the view is unmounted from outside. `ready` is called once
/// everything is mounted. Nothing under DIR is touched before every check has passed.
pub fn serve(
    opts: &MountOptions,
    log: Option<PathBuf>,
    ready: &mut dyn FnMut(&MountReport),
) -> Result<()> {
    let dir = check_dir(&opts.dir)?;
    let repo = Repository::open(&opts.repo)?;
    // Held until this process ends: a writer (backup, prune) is refused meanwhile.
    let _lock = repo.lock_shared()?;
    let (point, mut warnings) = open_point(&repo, opts)?;
    let signals = block_signals()?;
    let point: &'static RestorePoint = Box::leak(Box::new(point));
    let source = BlockSource::with_read_ahead(point, CACHE_BYTES);
    let table = layout::read_table(&source, point, &mut warnings);
    let parts = layout::plan_parts(&source, table.as_ref(), opts.raw);
    let tree = layout::build_tree(point.size, &parts, opts.raw);
    let pid = std::process::id();
    record(&dir, pid, &point.id, &opts.repo, &log)?;
    let view = ServedView::start(&dir, tree, &source).inspect_err(|_| state::remove(&dir))?;
    let manifest = point.manifest();
    let parts =
        filesystems::mount_parts(&dir, &parts, manifest.source.logical_sector_size, opts.raw);
    ready(&MountReport {
        dir: dir.clone(),
        image: point.id.clone(),
        name: manifest.name.clone(),
        chain: point.chain.iter().map(|i| i.id().to_string()).collect(),
        created: manifest.created.clone(),
        size: point.size,
        disk: dir.join("disk"),
        partition_table: table.as_ref().map(|t| t.kind.as_str().to_string()),
        parts,
        raw: opts.raw,
        pid,
        log,
        warnings,
    });
    serve_until_ended(&signals, &dir)?;
    view.join();
    state::remove(&dir);
    Ok(())
}

/// The restore point `opts` names, with its whole chain, and warnings about segment files that
/// are missing (their blocks read as EIO).
fn open_point(repo: &Repository, opts: &MountOptions) -> Result<(RestorePoint, Vec<String>)> {
    if let Some(id) = opts.image.as_deref() {
        if crate::format::valid_image_id(id) && !repo.images_dir().join(id).exists() {
            bail!(
                "no image {id} in {} (`cairn list {}` shows them)",
                opts.repo.display(),
                opts.repo.display()
            );
        }
    }
    let id = repo.select_image(opts.name.as_deref(), opts.image.as_deref())?;
    let chain =
        chain::resolve(repo, &id).with_context(|| format!("image {id} cannot be mounted"))?;
    let warnings = chain
        .iter()
        .filter_map(|img| img.check_segments_present().err())
        .map(|e| format!("{e:#}; reads of its blocks fail with EIO"))
        .collect();
    Ok((RestorePoint::new(id, chain), warnings))
}

/// Blocks the signals that end a mount (and SIGUSR1, the view's end) in this thread, so they are
/// taken by [`serve_until_ended`]'s sigwait, never by a handler.
///
/// Called before the first thread (read-ahead) starts, so every thread inherits the mask and
/// none can die of one or swallow it. One arriving from here on waits until everything is set
/// up.
fn block_signals() -> Result<SigSet> {
    let mut signals = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGUSR1,
    ] {
        signals.add(s);
    }
    signals.thread_block().context("cannot block signals")?;
    Ok(signals)
}

/// The record `cairn umount` finds the mount by, also after this process was killed.
fn record(dir: &Path, pid: u32, image: &str, repo: &Path, log: &Option<PathBuf>) -> Result<()> {
    state::write(&state::State {
        dir: dir.to_path_buf(),
        pid,
        start_time: state::start_time(pid).unwrap_or(0),
        image: image.to_string(),
        log: log.clone(),
        repo: repo.canonicalize().ok(),
    })
}

/// A running `cairn mount` of a repository (it holds the repository's lock shared).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    pub dir: PathBuf,
    pub pid: u32,
    pub image: String,
}

/// The running mounts of the repository at `repo`, for a command refused because the
/// repository is locked: they say who holds it and what ends it (`cairn umount DIR`).
pub fn holders(repo: &Path) -> Vec<Holder> {
    let Ok(repo) = repo.canonicalize() else {
        return Vec::new();
    };
    let mut found: Vec<Holder> = state::all()
        .into_iter()
        .filter(|s| s.repo.as_deref() == Some(repo.as_path()) && state::server_alive(s))
        .map(|s| Holder {
            dir: s.dir,
            pid: s.pid,
            image: s.image,
        })
        .collect();
    found.sort_by(|a, b| a.dir.cmp(&b.dir));
    found
}

/// " (held by `cairn mount` at DIR, pid P: `cairn umount DIR` ends it)" for each running mount
/// of `repo`, or "" when none is running: for the message of a refused lock.
pub fn holders_note(repo: &Path) -> String {
    holders(repo)
        .iter()
        .map(|h| {
            format!(
                " (held by `cairn mount` at {d}, pid {}: `cairn umount {d}` ends it)",
                h.pid,
                d = h.dir.display()
            )
        })
        .collect()
}

/// The FUSE view, mounted at DIR and served by its own threads.
///
/// It is unmounted with umount(2) on DIR, never with fuser's unmounter: that one gives its
/// mount up on the first attempt, so after a refusal (EBUSY) a later call would do nothing and
/// report success, and the serving threads would never end.
struct ServedView {
    thread: std::thread::JoinHandle<std::io::Result<()>>,
}

impl ServedView {
    fn start(dir: &Path, tree: view::Tree, source: &std::sync::Arc<BlockSource>) -> Result<Self> {
        let point = source.point();
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::RO,
            fuser::MountOption::NoDev,
            fuser::MountOption::NoSuid,
            fuser::MountOption::FSName(format!("cairn:{}", point.id)),
            fuser::MountOption::Subtype("cairn".into()),
        ];
        config.n_threads = Some(FUSE_THREADS);
        let view = view::View::new(tree, source.clone(), point.manifest().created_unix);
        let session = fuser::Session::new(view, dir, &config)
            .with_context(|| format!("cannot mount the view at {}", dir.display()))?;
        let thread = std::thread::Builder::new()
            .name("cairn-view".into())
            .spawn(move || {
                let r = session.run();
                // Tell the main thread the view ended (unmounted from outside, or by us).
                let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), Signal::SIGUSR1);
                r
            })
            .context("cannot start the view's thread")?;
        Ok(ServedView { thread })
    }

    /// Waits for the view's threads to end (after it was unmounted).
    fn join(self) {
        match self.thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("the view ended with an error: {e}"),
            Err(_) => tracing::error!("the view's thread panicked"),
        }
    }
}

/// Serves until a signal ends the mount (its filesystems released first, then the view
/// unmounted) or the view is unmounted from outside.
fn serve_until_ended(signals: &SigSet, dir: &Path) -> Result<()> {
    loop {
        let sig = signals.wait().context("waiting for a signal")?;
        if sig == Signal::SIGUSR1 {
            // The view is gone (`umount DIR` from outside): what was mounted from it is dead.
            if let Err(e) = filesystems::release(dir) {
                tracing::error!("{e:#}");
            }
            return Ok(());
        }
        match filesystems::release(dir) {
            Ok(()) => match nix::mount::umount2(dir, nix::mount::MntFlags::empty()) {
                // EINVAL: unmounted already (by `cairn umount`); the view's end is on its way.
                Ok(()) | Err(nix::errno::Errno::EINVAL) => return Ok(()),
                Err(e) => tracing::error!(
                    "cannot unmount the view at {}: {e}; still serving it",
                    dir.display()
                ),
            },
            // Something below DIR is in use: keep serving it rather than pull it away.
            Err(e) => tracing::error!("{e:#}; still serving {}", dir.display()),
        }
    }
}
