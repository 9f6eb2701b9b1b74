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

pub mod cache;
mod loopdev;
mod probe;
pub mod source;
mod state;
mod view;

use crate::chain;
use crate::ptable::{PartitionTable, ReadError};
use crate::repo::Repository;
use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{SigSet, Signal};
use serde::{Deserialize, Serialize};
use source::{BlockSource, RestorePoint};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use view::{NodeKind, Tree};

/// Plaintext blocks kept decoded: 64 blocks of the default 1 MiB.
pub const CACHE_BYTES: usize = 64 << 20;
/// FUSE request threads: reads of several processes (and the loop devices) decode in parallel.
const FUSE_THREADS: usize = 4;
/// How long `umount` waits for the serving process to end once its filesystems are gone.
const SERVER_EXIT_TIMEOUT_MS: i32 = 30_000;

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

/// One partition (or the whole image's filesystem) as the view shows it.
struct Part {
    number: Option<u32>,
    start: u64,
    size: u64,
    fs: probe::Fs,
    mounter: Result<probe::Mounter, String>,
    /// Name under DIR: "pN" or "fs".
    name: String,
    /// The file the loop device reads (relative to DIR).
    raw_rel: String,
}

/// The partition table in the restore point's data (as restore reads it), or why there is none.
fn read_table(
    source: &std::sync::Arc<BlockSource>,
    point: &RestorePoint,
    warnings: &mut Vec<String>,
) -> Option<PartitionTable> {
    let m = &point.chain.last().expect("non-empty chain").manifest;
    if m.source.kind == "partition" {
        return None;
    }
    let mut stream = source.stream(0, point.size);
    match crate::ptable::read(&mut stream, point.size, m.source.logical_sector_size) {
        Ok(t) => t,
        Err(ReadError::Io(e)) => {
            warnings.push(format!(
                "the blocks holding the partition table could not be read ({e:#}); only DIR/disk is shown"
            ));
            None
        }
        Err(ReadError::Table(e)) => {
            warnings.push(format!(
                "the partition table is not one cairn can read ({e:#}); only DIR/disk is shown"
            ));
            None
        }
    }
}

fn plan_parts(
    source: &std::sync::Arc<BlockSource>,
    table: Option<&PartitionTable>,
    raw: bool,
) -> Vec<Part> {
    let size = source.size();
    let kernel = probe::kernel_filesystems();
    let mut ranges: Vec<(Option<u32>, u64, u64, bool)> = Vec::new();
    match table {
        Some(t) => {
            for p in &t.partitions {
                let start = p.start.min(size);
                let len = p.size.min(size - start);
                ranges.push((Some(p.number), start, len, p.extended));
            }
        }
        None if raw => {}
        None => ranges.push((None, 0, size, false)),
    }
    ranges
        .into_iter()
        .map(|(number, start, len, extended)| {
            let (fs, mounter) = if raw {
                (probe::Fs::Unknown, Err("--raw".to_string()))
            } else if extended {
                (
                    probe::Fs::Unknown,
                    Err("an extended partition (a container of logical partitions)".into()),
                )
            } else {
                match probe::probe(&mut source.stream(start, len), len) {
                    Ok(fs) => (fs, probe::mounter(fs, &kernel)),
                    Err(e) => (
                        probe::Fs::Unknown,
                        Err(format!("its superblock could not be read ({e})")),
                    ),
                }
            };
            let name = match number {
                Some(n) => format!("p{n}"),
                None => "fs".to_string(),
            };
            let raw_rel = match number {
                Some(_) if raw => name.clone(),
                Some(_) => format!(".raw/{name}"),
                None => "disk".to_string(),
            };
            Part {
                number,
                start,
                size: len,
                fs,
                mounter,
                name,
                raw_rel,
            }
        })
        .collect()
}

fn build_tree(size: u64, parts: &[Part], raw: bool) -> Tree {
    let mut tree = Tree::new();
    tree.add(Tree::ROOT, "disk", NodeKind::Raw { start: 0, size });
    let partitioned = parts.iter().any(|p| p.number.is_some());
    let raw_dir = (partitioned && !raw).then(|| tree.add(Tree::ROOT, ".raw", NodeKind::Dir));
    for p in parts {
        let bytes = NodeKind::Raw {
            start: p.start,
            size: p.size,
        };
        if let Some(d) = raw_dir {
            tree.add(d, &p.name, bytes.clone());
        }
        match (&p.mounter, p.number) {
            (Ok(_), _) => {
                tree.add(Tree::ROOT, &p.name, NodeKind::Dir);
            }
            (Err(_), Some(_)) => {
                tree.add(Tree::ROOT, &p.name, bytes);
            }
            // An unpartitioned image whose filesystem stays raw: DIR/disk is its bytes.
            (Err(_), None) => {}
        }
    }
    tree
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
        chain::resolve(&repo, &id).with_context(|| format!("image {id} cannot be mounted"))?;
    let mut warnings = Vec::new();
    for img in &chain {
        if let Err(e) = img.check_segments_present() {
            warnings.push(format!("{e:#}; reads of its blocks fail with EIO"));
        }
    }
    // Signals are taken by sigwait below, never by a handler: blocked before the first thread
    // (read-ahead) starts, so every thread inherits the mask and none can die of one or swallow
    // it. One arriving from here on waits until everything is set up.
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
    let point: &'static RestorePoint = Box::leak(Box::new(RestorePoint::new(id.clone(), chain)));
    let source = BlockSource::with_read_ahead(point, CACHE_BYTES);
    let table = read_table(&source, point, &mut warnings);
    let parts = plan_parts(&source, table.as_ref(), opts.raw);
    let tree = build_tree(point.size, &parts, opts.raw);
    let m = &point.chain.last().expect("non-empty chain").manifest;
    let lss = m.source.logical_sector_size;

    let pid = std::process::id();
    state::write(&state::State {
        dir: dir.clone(),
        pid,
        start_time: state::start_time(pid).unwrap_or(0),
        image: id.clone(),
        log: log.clone(),
    })?;

    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::FSName(format!("cairn:{id}")),
        fuser::MountOption::Subtype("cairn".into()),
    ];
    config.n_threads = Some(FUSE_THREADS);
    let view = view::View::new(tree, source.clone(), m.created_unix);
    let session = match fuser::Session::new(view, &dir, &config) {
        Ok(s) => s,
        Err(e) => {
            state::remove(&dir);
            return Err(e).with_context(|| format!("cannot mount the view at {}", dir.display()));
        }
    };
    let mut session = session;
    let mut unmounter = session.unmount_callable();
    let serving = std::thread::Builder::new()
        .name("cairn-view".into())
        .spawn(move || {
            let r = session.run();
            // Tell the main thread the view ended (unmounted from outside, or by us).
            let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), Signal::SIGUSR1);
            r
        })
        .context("cannot start the view's thread")?;

    let mut reports = Vec::new();
    for p in &parts {
        let mounted = match &p.mounter {
            Ok(how) => {
                let target = dir.join(&p.name);
                match mount_part(&dir.join(&p.raw_rel), &target, how, lss) {
                    Ok(()) => Ok(target),
                    Err(e) => Err(format!(
                        "mounting it failed ({e:#}); its bytes are {}",
                        dir.join(&p.raw_rel).display()
                    )),
                }
            }
            Err(why) => Err(why.clone()),
        };
        // Where its raw bytes are shown: DIR/pN itself when it is not mounted there.
        let raw_file = match (&mounted, p.number) {
            (Err(_), Some(_)) => dir.join(&p.name),
            _ => dir.join(&p.raw_rel),
        };
        let (mounted, note) = match mounted {
            Ok(t) => (Some(t), None),
            Err(n) if opts.raw => (None, (n != "--raw").then_some(n)),
            Err(n) => (
                None,
                Some(n.replace("FILE", &raw_file.display().to_string())),
            ),
        };
        reports.push(PartReport {
            number: p.number,
            start: p.start,
            size: p.size,
            raw_file,
            filesystem: p.fs.name().to_string(),
            mounted,
            note,
        });
    }
    let report = MountReport {
        dir: dir.clone(),
        image: id.clone(),
        name: m.name.clone(),
        chain: point.chain.iter().map(|i| i.id().to_string()).collect(),
        created: m.created.clone(),
        size: point.size,
        disk: dir.join("disk"),
        partition_table: table.as_ref().map(|t| t.kind.as_str().to_string()),
        parts: reports,
        raw: opts.raw,
        pid,
        log,
        warnings,
    };
    ready(&report);

    loop {
        let sig = signals.wait().context("waiting for a signal")?;
        if sig == Signal::SIGUSR1 {
            // The view is gone (`umount DIR` from outside): what was mounted from it is dead.
            if let Err(e) = release_filesystems(&dir) {
                tracing::error!("{e:#}");
            }
            break;
        }
        match release_filesystems(&dir) {
            Ok(()) => {
                if let Err(e) = unmounter.unmount() {
                    tracing::error!("cannot unmount the view at {}: {e}", dir.display());
                    continue;
                }
                break;
            }
            // Something below DIR is in use: keep serving it rather than pull it away.
            Err(e) => tracing::error!("{e:#}; still serving {}", dir.display()),
        }
    }
    match serving.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("the view ended with an error: {e}"),
        Err(_) => tracing::error!("the view's thread panicked"),
    }
    state::remove(&dir);
    Ok(())
}

/// Loop-attaches `raw` (a file of the view) read-only and mounts its filesystem on `target`.
fn mount_part(raw: &Path, target: &Path, how: &probe::Mounter, sector_size: u32) -> Result<()> {
    use nix::mount::MsFlags;
    let dev = loopdev::attach(raw, sector_size)?;
    match how {
        probe::Mounter::Kernel { fstype, data } => {
            nix::mount::mount(
                Some(&dev.path),
                target,
                Some(*fstype),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                (!data.is_empty()).then_some(*data),
            )
            .with_context(|| {
                format!(
                    "mount -t {fstype} -o ro{}{data} {} {}",
                    if data.is_empty() { "" } else { "," },
                    dev.path.display(),
                    target.display()
                )
            })?;
        }
        probe::Mounter::Ntfs3g(prog) => {
            let out = std::process::Command::new(prog)
                .args(["-o", "ro,nosuid,nodev"])
                .arg(&dev.path)
                .arg(target)
                .stdin(std::process::Stdio::null())
                .output()
                .with_context(|| format!("cannot run {}", prog.display()))?;
            if !out.status.success() {
                bail!(
                    "ntfs-3g failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
    }
    // The mount holds the device now; auto-clear detaches it when the mount goes.
    drop(dev);
    Ok(())
}

/// Unmounts every filesystem mounted below `dir` (deepest first) and detaches every loop device
/// reading a file below it. A busy filesystem stops it with a message saying so; nothing is
/// detached lazily.
fn release_filesystems(dir: &Path) -> Result<()> {
    let mut below: Vec<PathBuf> = state::mounts()?
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p != dir && p.starts_with(dir))
        .collect();
    below.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    below.dedup();
    for p in &below {
        if let Err(e) = nix::mount::umount2(p, nix::mount::MntFlags::empty()) {
            match e {
                // Unmounted meanwhile.
                nix::errno::Errno::EINVAL => {}
                nix::errno::Errno::EBUSY => bail!(
                    "{} is busy: a process has files open there (`fuser -vm {}` names it); close them and run `cairn umount {}` again",
                    p.display(),
                    p.display(),
                    dir.display()
                ),
                e => return Err(anyhow!(e).context(format!("cannot unmount {}", p.display()))),
            }
        }
    }
    for dev in loopdev::backed_under(dir) {
        loopdev::detach(&dev)?;
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
pub struct UmountReport {
    pub dir: PathBuf,
    /// The serving process was gone already (killed) and its leftovers were cleared.
    pub server_was_dead: bool,
}

/// Ends the cairn mount at `dir`: its filesystems, its loop devices, its view — also when the
/// serving process was killed and left them behind.
pub fn umount(dir: &Path) -> Result<UmountReport> {
    let dir = absolute_dir(dir)?;
    let st = state::read(&dir);
    let view_mounted =
        |ms: &[state::MountEntry]| ms.iter().any(|m| m.mount_point == dir && state::is_view(m));
    if !view_mounted(&state::mounts()?) && st.is_none() {
        bail!("{} is not a cairn mount", dir.display());
    }
    let alive = st.as_ref().filter(|s| state::server_alive(s));
    match release_filesystems(&dir) {
        Ok(()) => {}
        // Below a dead view the mount points cannot be looked up any more: detach the whole
        // tree at once; each filesystem goes when its last user does, then its loop device.
        Err(e) if alive.is_none() && is_unreachable(&e) => {
            nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH)
                .with_context(|| format!("cannot detach {}", dir.display()))?;
            for dev in loopdev::backed_under(&dir) {
                loopdev::detach(&dev)?;
            }
        }
        Err(e) => return Err(e),
    }
    if let Some(s) = alive {
        end_server(s)?;
    }
    if view_mounted(&state::mounts()?) {
        nix::mount::umount2(&dir, nix::mount::MntFlags::empty()).map_err(|e| {
            anyhow!(e).context(format!("cannot unmount the view at {}", dir.display()))
        })?;
    }
    if let Some(log) = st.as_ref().and_then(|s| s.log.as_ref()) {
        let _ = std::fs::remove_file(log);
    }
    state::remove(&dir);
    Ok(UmountReport {
        dir,
        server_was_dead: st.is_some() && alive.is_none(),
    })
}

fn is_unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<nix::errno::Errno>()
            .is_some_and(|e| matches!(e, nix::errno::Errno::ENOTCONN | nix::errno::Errno::ENOENT))
    })
}

/// Asks the serving process to end (SIGTERM) and waits for it, bounded.
fn end_server(s: &state::State) -> Result<()> {
    let pid = i32::try_from(s.pid).context("pid out of range")?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        // Gone between the check and now.
        return Ok(());
    }
    // SAFETY: fd was just returned by pidfd_open and is owned by nothing else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM)
        .with_context(|| format!("cannot signal the serving process {pid}"))?;
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, SERVER_EXIT_TIMEOUT_MS) };
    if n == 0 {
        bail!(
            "the serving process {pid} did not end within {} s; its log: {}",
            SERVER_EXIT_TIMEOUT_MS / 1000,
            s.log
                .as_ref()
                .map(|l| l.display().to_string())
                .unwrap_or_else(|| "its stderr".into())
        );
    }
    Ok(())
}

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
        nix::unistd::ForkResult::Child => {
            drop(rx);
            let code = background_child(opts, &log, tx);
            std::process::exit(code);
        }
    }
}

fn background_child(opts: &MountOptions, log: &Path, tx: OwnedFd) -> i32 {
    let mut tx = Some(std::fs::File::from(tx));
    let detached = (|| -> Result<()> {
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
    })();
    let result = detached
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
