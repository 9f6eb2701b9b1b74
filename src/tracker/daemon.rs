//! `cairn tracker run`: watches the block layer for writes to the given whole disks and keeps, per
//! consumer (a repository's series of images of one disk or partition), the granules changed since
//! its last image and since its last full image.
//!
//! Continuity is the point: the daemon must be able to prove it saw every write since a consumer's
//! last cut. Anything that breaks that proof — lost events, a reboot, an unclean stop, the device
//! changing size or identity, the tracefs instance being altered — marks the consumer broken, and
//! its next backup compare-scans. Supersets are always safe; a missing mark never is.

use super::changemap::ChangeMap;
use super::protocol::{ConsumerStatus, CutKind, DeviceStatus, Reply, Request, Token};
use super::tracefs::{self, BlockEvent, Instance};
use crate::device::DeviceInfo;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SYS_BLOCK: &str = "/sys/block";

/// A disk's major:minor from sysfs.
fn sysfs_devno(name: &str) -> Result<(u32, u32)> {
    let p = Path::new(SYS_BLOCK).join(name).join("dev");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let (a, b) = text
        .trim()
        .split_once(':')
        .ok_or_else(|| anyhow!("{} does not hold major:minor", p.display()))?;
    Ok((
        a.parse().with_context(|| format!("{}", p.display()))?,
        b.parse().with_context(|| format!("{}", p.display()))?,
    ))
}

pub const STATE_FILE: &str = "tracker-state.json";
pub const SOCKET: &str = "tracker.sock";
const LOCK_FILE: &str = "tracker.lock";
/// One kernel instance per state directory, so independent trackers (tests, several
/// configurations) never share or remove each other's instance; its name records the directory
/// (instances.rs), so a leftover instance can be traced back to it.
fn instance_name(state_dir: &Path) -> String {
    super::instances::name_for(state_dir)
}

/// The pid of the tracker running with `state_dir`, if one is (or is starting).
pub fn lock_holder(state_dir: &Path) -> Option<u32> {
    super::instances::flock_holder(&state_dir.join(LOCK_FILE))
}

/// Whether a tracker started on `state_dir` now would resume its kernel instance, and why not.
pub fn resumable(state_dir: &Path) -> std::result::Result<(), String> {
    let p = state_dir.join(STATE_FILE);
    let bytes = std::fs::read(&p).map_err(|e| format!("no saved state ({e})"))?;
    let s: SavedState = serde_json::from_slice(&bytes)
        .map_err(|e| format!("its saved state is unreadable ({e})"))?;
    if s.version != STATE_VERSION {
        return Err(format!("its saved state has version {}", s.version));
    }
    if s.boot_id != boot_id() {
        return Err("its saved state is from another boot".into());
    }
    if !s.clean_shutdown {
        return Err(format!(
            "its tracker (pid {}) did not stop cleanly (killed or crashed)",
            s.pid
        ));
    }
    Ok(())
}
const STATE_VERSION: u32 = 1;

pub struct DaemonOptions {
    pub devices: Vec<PathBuf>,
    pub state_dir: PathBuf,
    /// Per-CPU ring buffer size.
    pub buffer_kb: u64,
    /// How often the buffers are drained.
    pub interval: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedState {
    version: u32,
    boot_id: String,
    clean_shutdown: bool,
    pid: u32,
    instance_filter: String,
    buffer_kb: u64,
    #[serde(default)]
    buffer_readback: String,
    losses_baseline: u64,
    devices: Vec<SavedDevice>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedDevice {
    path: String,
    disk: (u32, u32),
    size: u64,
    identity: String,
    since: String,
    consumers: Vec<SavedConsumer>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedConsumer {
    key: String,
    start: u64,
    len: u64,
    granule: u64,
    lineage: String,
    seq: u64,
    last_image: Option<u64>,
    last_full: Option<u64>,
    image_broken: Option<String>,
    full_broken: Option<String>,
    since_image: Vec<(u64, u64)>,
    since_full: Vec<(u64, u64)>,
}

struct Pending {
    conn: u64,
    seq: u64,
    kind: CutKind,
    image: ChangeMap,
    full: Option<ChangeMap>,
    loss_gen: u64,
}

struct Consumer {
    start: u64,
    len: u64,
    granule: u64,
    lineage: String,
    seq: u64,
    last_image: Option<u64>,
    last_full: Option<u64>,
    image_broken: Option<String>,
    full_broken: Option<String>,
    since_image: ChangeMap,
    since_full: ChangeMap,
    pending: Option<Pending>,
}

impl Consumer {
    fn new(start: u64, len: u64, granule: u64, why: &str, lineage: String) -> Consumer {
        Consumer {
            start,
            len,
            granule,
            lineage,
            seq: 0,
            last_image: None,
            last_full: None,
            image_broken: Some(why.to_string()),
            full_broken: Some(why.to_string()),
            since_image: ChangeMap::new(),
            since_full: ChangeMap::new(),
            pending: None,
        }
    }

    /// A consumer as the previous tracker saved it.
    fn from_saved(sc: SavedConsumer) -> Consumer {
        Consumer {
            start: sc.start,
            len: sc.len,
            granule: sc.granule.max(1),
            lineage: sc.lineage,
            seq: sc.seq,
            last_image: sc.last_image,
            last_full: sc.last_full,
            image_broken: sc.image_broken,
            full_broken: sc.full_broken,
            since_image: ChangeMap::from_runs(&sc.since_image),
            since_full: ChangeMap::from_runs(&sc.since_full),
            pending: None,
        }
    }

    fn mark_bytes(&mut self, from: u64, to: u64) {
        let (a, b) = (from.max(self.start), to.min(self.start + self.len));
        if a >= b {
            return;
        }
        let g0 = (a - self.start) / self.granule;
        let g1 = (b - self.start).div_ceil(self.granule);
        self.since_image.mark(g0, g1 - g0);
        self.since_full.mark(g0, g1 - g0);
    }

    fn break_all(&mut self, why: &str) {
        self.image_broken.get_or_insert_with(|| why.to_string());
        self.full_broken.get_or_insert_with(|| why.to_string());
    }
}

struct Device {
    path: PathBuf,
    disk: (u32, u32),
    /// Kernel device numbers whose events are this disk's (the disk itself first, then the
    /// paths of an NVMe multipath head).
    kdevs: Vec<u32>,
    kernel_name: String,
    /// Hidden multipath paths followed for this disk, as found at start.
    paths: Vec<String>,
    size: u64,
    identity: String,
    since: String,
    consumers: BTreeMap<String, Consumer>,
}

struct State {
    dir: PathBuf,
    boot_id: String,
    instance: Instance,
    devices: Vec<Device>,
    losses_baseline: u64,
    /// Bumped at every detected loss; a cut remembers it so a commit knows whether the interval
    /// since the cut is complete.
    loss_gen: u64,
    events: Vec<BlockEvent>,
    /// Set by `tracker stop`: the instance is gone and nothing more is drained or saved.
    stopped_for_good: bool,
}

fn random_id() -> Result<String> {
    crate::repo::random_hex(16).context("cannot make a lineage id for the tracker")
}

pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// What identifies the disk behind a device number: hardware ids, or a loop device's backing file.
fn identity_of(info: &DeviceInfo) -> String {
    let backing = info
        .kernel_name
        .as_ref()
        .and_then(|k| std::fs::read_to_string(format!("/sys/block/{k}/loop/backing_file")).ok())
        .map(|s| s.trim().to_string());
    format!(
        "model={:?} serial={:?} wwn={:?} backing={:?} lss={}",
        info.model, info.serial, info.wwn, backing, info.logical_sector_size
    )
}

impl State {
    /// Drains the kernel's buffers and applies every event to the change sets. Draining consumes
    /// pages: whatever goes wrong from here on (an unreadable buffer, a garbled page, unreadable
    /// loss counters) may have taken events that were never applied, so every failure breaks
    /// continuity for every consumer, with the error as the reason. Callers cannot forget to.
    fn apply_events(&mut self, site: FaultSite) {
        if self.stopped_for_good {
            return;
        }
        if let Err(e) = self.try_apply_events(site) {
            let why = format!("reading block events failed ({e:#}) at {}", now_rfc3339());
            tracing::error!("{why}: affected images will be compare-scanned");
            self.break_everything(&why);
        }
    }

    fn try_apply_events(&mut self, site: FaultSite) -> Result<()> {
        let drained = self.instance.drain(&mut self.events);
        let injected = injected_fault(site);
        if injected.is_some() {
            // A garbled page: consumed, never applied.
            self.events.clear();
        }
        // Whatever was parsed before a failure is applied all the same: a superset is safe.
        for ev in self.events.drain(..) {
            if let Some(d) = self.devices.iter_mut().find(|d| d.kdevs.contains(&ev.dev)) {
                let from = ev.sector * 512;
                let to = from + u64::from(ev.nr_sector) * 512;
                for c in d.consumers.values_mut() {
                    c.mark_bytes(from, to);
                }
            }
        }
        let missed = drained?;
        if let Some(e) = injected {
            return Err(e);
        }
        let losses = self.instance.losses()?;
        if missed || losses > self.losses_baseline {
            let why = format!(
                "the kernel dropped {} block events (ring buffer full) at {}",
                losses.saturating_sub(self.losses_baseline).max(1),
                now_rfc3339()
            );
            tracing::warn!("{why}: affected images will be compare-scanned");
            self.losses_baseline = losses;
            self.break_everything(&why);
        }
        Ok(())
    }

    fn break_everything(&mut self, why: &str) {
        self.loss_gen += 1;
        for d in &mut self.devices {
            for c in d.consumers.values_mut() {
                c.break_all(why);
            }
        }
    }

    /// The instance and the devices must still be what we set up; otherwise continuity is gone
    /// (every finding breaks it here, so there is nothing for a caller to handle).
    fn check_environment(&mut self) {
        if let Err(e) = self.instance.check_configured() {
            let why = format!(
                "the tracefs instance was altered ({e:#}) at {}",
                now_rfc3339()
            );
            tracing::warn!("{why}; restart the tracker");
            self.break_everything(&why);
            return;
        }
        for i in 0..self.devices.len() {
            let d = &self.devices[i];
            let current = DeviceInfo::probe(&d.path).ok();
            let paths = super::trackable::classify(Path::new(SYS_BLOCK), &d.kernel_name);
            let why = match &current {
                None => Some(format!("{} disappeared", d.path.display())),
                Some(_) if paths.as_ref() != Ok(&d.paths) => Some(format!(
                    "{} changed how its writes reach the disk ({}); restart the tracker",
                    d.path.display(),
                    match &paths {
                        Ok(p) => format!("multipath paths now {}", p.join(", ")),
                        Err(e) => e.clone(),
                    }
                )),
                Some(info) if info.devno != Some(d.disk) => {
                    Some(format!("{} is now another device", d.path.display()))
                }
                Some(info) if info.size != d.size => Some(format!(
                    "{} changed size from {} to {} bytes",
                    d.path.display(),
                    d.size,
                    info.size
                )),
                Some(info) if identity_of(info) != d.identity => {
                    Some(format!("{} now holds a different disk", d.path.display()))
                }
                _ => None,
            };
            if let Some(why) = why {
                tracing::warn!("{why}: its consumers will compare-scan");
                self.loss_gen += 1;
                let d = &mut self.devices[i];
                for c in d.consumers.values_mut() {
                    c.break_all(&why);
                }
                if let Some(info) = current {
                    d.size = info.size;
                    d.identity = identity_of(&info);
                }
            }
        }
    }

    fn to_saved(&self, clean: bool) -> SavedState {
        SavedState {
            version: STATE_VERSION,
            boot_id: self.boot_id.clone(),
            clean_shutdown: clean,
            pid: std::process::id(),
            instance_filter: self.instance.filter.clone(),
            buffer_kb: self.instance.buffer_kb,
            buffer_readback: self.instance.buffer_readback.clone(),
            losses_baseline: self.losses_baseline,
            devices: self
                .devices
                .iter()
                .map(|d| SavedDevice {
                    path: d.path.display().to_string(),
                    disk: d.disk,
                    size: d.size,
                    identity: d.identity.clone(),
                    since: d.since.clone(),
                    consumers: d
                        .consumers
                        .iter()
                        .map(|(k, c)| {
                            // An in-flight cut's marks are saved as still changed: a superset is safe.
                            let mut image = c.since_image.clone();
                            let mut full = c.since_full.clone();
                            if let Some(p) = &c.pending {
                                image.union_with(&p.image);
                                if let Some(f) = &p.full {
                                    full.union_with(f);
                                }
                            }
                            SavedConsumer {
                                key: k.clone(),
                                start: c.start,
                                len: c.len,
                                granule: c.granule,
                                lineage: c.lineage.clone(),
                                seq: c.seq,
                                last_image: c.last_image,
                                last_full: c.last_full,
                                image_broken: c.image_broken.clone(),
                                full_broken: c.full_broken.clone(),
                                since_image: image.runs(),
                                since_full: full.runs(),
                            }
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    fn persist(&self, clean: bool) -> Result<()> {
        let saved = self.to_saved(clean);
        write_atomic(
            &self.dir.join(STATE_FILE),
            &serde_json::to_vec_pretty(&saved)?,
        )
    }

    fn device_for(&mut self, disk: (u32, u32)) -> Result<&mut Device> {
        self.devices
            .iter_mut()
            .find(|d| d.disk == disk)
            .ok_or_else(|| anyhow!("the tracker does not watch disk {}:{}", disk.0, disk.1))
    }

    #[allow(clippy::too_many_arguments)]
    fn cut(
        &mut self,
        conn: u64,
        disk: (u32, u32),
        start: u64,
        len: u64,
        granule: u64,
        key: &str,
        kind: CutKind,
        parent: Option<Token>,
    ) -> Result<Reply> {
        if granule == 0 || !granule.is_power_of_two() {
            bail!("invalid granule {granule}");
        }
        // Everything the kernel logged before this moment is applied before the set is taken.
        self.apply_events(FaultSite::Cut);
        self.check_environment();
        let loss_gen = self.loss_gen;
        let dev = self.device_for(disk)?;
        if start.checked_add(len).is_none_or(|end| end > dev.size) {
            bail!("range {start}+{len} is outside {}", dev.path.display());
        }
        // Drawn up front: a consumer is made inside the map entry, where no error can be returned.
        let fresh_lineage = random_id()?;
        let c = dev.consumers.entry(key.to_string()).or_insert_with(|| {
            Consumer::new(
                start,
                len,
                granule,
                "no image of this source was taken yet while the tracker ran",
                fresh_lineage.clone(),
            )
        });
        if (c.start, c.len, c.granule) != (start, len, granule) {
            *c = Consumer::new(
                start,
                len,
                granule,
                "the source moved or changed size (partition table changed?)",
                fresh_lineage,
            );
        }
        if c.pending.is_some() {
            bail!("another backup of this source is in progress");
        }
        let (changed, reason) = match kind {
            CutKind::Full => (None, None),
            CutKind::Incremental | CutKind::Differential => {
                let (broken, last, set, what) = if kind == CutKind::Incremental {
                    (
                        &c.image_broken,
                        c.last_image,
                        &c.since_image,
                        "previous image",
                    )
                } else {
                    (&c.full_broken, c.last_full, &c.since_full, "full image")
                };
                let expected = last.map(|seq| Token {
                    lineage: c.lineage.clone(),
                    seq,
                });
                if let Some(why) = broken {
                    (None, Some(format!("tracking continuity is broken: {why}")))
                } else if parent.is_none() || parent != expected {
                    (
                        None,
                        Some(format!(
                            "the {what} was not cut by this tracker's current history"
                        )),
                    )
                } else {
                    (Some(set.runs()), None)
                }
            }
        };
        c.seq += 1;
        let image = std::mem::take(&mut c.since_image);
        let full = (kind == CutKind::Full).then(|| std::mem::take(&mut c.since_full));
        c.pending = Some(Pending {
            conn,
            seq: c.seq,
            kind,
            image,
            full,
            loss_gen,
        });
        Ok(Reply::Cut {
            token: Token {
                lineage: c.lineage.clone(),
                seq: c.seq,
            },
            changed,
            reason,
        })
    }

    /// `keep_dirty`: byte ranges of the source (relative to its start) whose content the image
    /// could not capture — unreadable sectors. They stay changed in both sets, so the next
    /// backup reads them again instead of trusting the zeros recorded for them.
    fn commit(
        &mut self,
        conn: u64,
        found: Option<Vec<(u64, u64)>>,
        keep_dirty: &[(u64, u64)],
    ) -> Result<Reply> {
        let loss_gen = self.loss_gen;
        let c = self
            .devices
            .iter_mut()
            .flat_map(|d| d.consumers.values_mut())
            .find(|c| c.pending.as_ref().is_some_and(|p| p.conn == conn))
            .ok_or_else(|| anyhow!("commit without a cut"))?;
        let p = c.pending.take().expect("found above");
        c.last_image = Some(p.seq);
        let complete = p.loss_gen == loss_gen;
        if complete {
            c.image_broken = None;
        }
        match p.kind {
            CutKind::Full => {
                c.last_full = Some(p.seq);
                if complete {
                    c.full_broken = None;
                }
            }
            CutKind::Differential => {
                // A compare-scan differential found everything that differs from the full:
                // with it the since-full set is whole again.
                if let Some(runs) = found {
                    c.since_full.union_with(&ChangeMap::from_runs(&runs));
                    if complete {
                        c.full_broken = None;
                    }
                }
            }
            CutKind::Incremental => {}
        }
        for &(off, len) in keep_dirty {
            let from = c.start.saturating_add(off.min(c.len));
            let to = c.start.saturating_add(off.saturating_add(len).min(c.len));
            c.mark_bytes(from, to);
        }
        self.persist(false)?;
        Ok(Reply::Committed)
    }

    /// `tracker stop`: no restart is expected, so the instance goes now rather than tracing
    /// every write until reboot. The saved state says why the next start must compare-scan.
    fn stop_for_good(&mut self) -> Result<Reply> {
        let why = format!(
            "the tracker was stopped for good (cairn tracker stop) at {}",
            now_rfc3339()
        );
        self.break_everything(&why);
        // The main loop exits once the reply is out (serve sets STOP); until then it idles.
        self.stopped_for_good = true;
        let persisted = self.persist(true);
        self.instance.close_and_remove()?;
        persisted?;
        tracing::info!("{why}");
        Ok(Reply::Stopped {
            instance: self.instance.path.display().to_string(),
        })
    }

    /// A backup went away without committing: its changes are still changes.
    fn abort(&mut self, conn: u64) {
        for d in &mut self.devices {
            for c in d.consumers.values_mut() {
                if c.pending.as_ref().is_some_and(|p| p.conn == conn) {
                    let p = c.pending.take().expect("checked");
                    c.since_image.union_with(&p.image);
                    if let Some(f) = p.full {
                        c.since_full.union_with(&f);
                    }
                    tracing::info!(
                        "a backup ended without committing; its changes are kept for the next one"
                    );
                }
            }
        }
    }

    fn status(&self) -> Reply {
        let devices = self
            .devices
            .iter()
            .map(|d| DeviceStatus {
                device: d.path.display().to_string(),
                disk: d.disk,
                size: d.size,
                tracking_since: d.since.clone(),
                continuity: "intact".into(),
                consumers: d
                    .consumers
                    .iter()
                    .map(|(k, c)| ConsumerStatus {
                        consumer: k.clone(),
                        start: c.start,
                        len: c.len,
                        continuity_since_image: c
                            .image_broken
                            .as_ref()
                            .map_or("intact".into(), |w| format!("broken: {w}")),
                        continuity_since_full: c
                            .full_broken
                            .as_ref()
                            .map_or("intact".into(), |w| format!("broken: {w}")),
                        changed_bytes_since_image: (c.since_image.count() * c.granule).min(c.len),
                        changed_bytes_since_full: (c.since_full.count() * c.granule).min(c.len),
                        last_image_seq: c.last_image,
                        last_full_seq: c.last_full,
                    })
                    .collect(),
            })
            .collect();
        Reply::Status { devices }
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    crate::repo::sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Where events are drained, for the test-only fault hook.
#[derive(Debug, Clone, Copy)]
enum FaultSite {
    Loop,
    Status,
    Cut,
    Stop,
}

/// Test-only fault hook: with `CAIRN_FAULT_TRACKER=DIR`, a file `DIR/SITE` (loop, status, cut,
/// stop) makes the next drain at that site lose the pages it read, as a garbled page would, and
/// fail; the file is removed, so each one fires once. Unset, it costs one getenv per drain.
fn injected_fault(site: FaultSite) -> Option<anyhow::Error> {
    let dir = std::env::var_os("CAIRN_FAULT_TRACKER")?;
    let name = format!("{site:?}").to_lowercase();
    let trigger = Path::new(&dir).join(&name);
    std::fs::remove_file(&trigger).ok()?;
    Some(anyhow!(
        "injected fault ({name}): a garbled ring-buffer page was discarded"
    ))
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Runs the daemon until SIGTERM or SIGINT. A clean stop saves the state and leaves the kernel
/// instance buffering, so a restart continues without a gap if nothing was lost meanwhile.
pub fn run(opts: &DaemonOptions) -> Result<()> {
    check_can_run(opts)?;
    // Held until the daemon returns: it is what `lock_holder` and `exclude_tracker` see.
    let _lock = lock_state_dir(&opts.state_dir)?;
    let devices = opts
        .devices
        .iter()
        .map(|p| probe_device(p))
        .collect::<Result<Vec<_>>>()?;
    let state = State::start(opts, devices)?;
    state.persist(false)?;
    let (listener, sock_path) = listen(&opts.state_dir)?;
    install_stop_handlers()?;
    announce(&state, opts);
    let state = Arc::new(Mutex::new(state));
    event_loop(&listener, &state, opts.interval);
    shut_down(&state, &sock_path)
}

/// What is refused before anything is touched.
fn check_can_run(opts: &DaemonOptions) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the tracker needs root (it reads the kernel's block tracepoints)");
    }
    if opts.devices.is_empty() {
        bail!("name at least one whole disk to track, e.g. `cairn tracker run /dev/sda`");
    }
    Ok(())
}

/// Creates the state directory and takes its lock: one tracker per state directory.
fn lock_state_dir(state_dir: &Path) -> Result<std::fs::File> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .with_context(|| format!("cannot create state directory {}", state_dir.display()))?;
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(state_dir.join(LOCK_FILE))?;
    // SAFETY: flock on an open descriptor; no memory involved.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "a tracker is already running with state directory {}",
            state_dir.display()
        );
    }
    Ok(lock)
}

/// A whole disk to track, with every kernel device number its writes can arrive under; refused
/// when its writes could reach the disk unseen.
fn probe_device(p: &Path) -> Result<Device> {
    let info = DeviceInfo::probe(p).with_context(|| format!("cannot track {}", p.display()))?;
    if info.kind != crate::device::Kind::Disk {
        bail!("{} is not a whole disk: track the disk that holds it (partitions are followed through it)", p.display());
    }
    let disk = info.devno.expect("block device");
    let kernel_name = info
        .kernel_name
        .clone()
        .ok_or_else(|| anyhow!("cannot track {}: no entry in /sys/block", p.display()))?;
    let paths = super::trackable::classify(Path::new(SYS_BLOCK), &kernel_name)
        .map_err(|why| anyhow!("cannot track {}: {why}", p.display()))?;
    let mut kdevs = vec![tracefs::kernel_dev(disk.0, disk.1)];
    for path in &paths {
        let (major, minor) = sysfs_devno(path)?;
        kdevs.push(tracefs::kernel_dev(major, minor));
    }
    Ok(Device {
        path: p.to_path_buf(),
        disk,
        kdevs,
        kernel_name,
        paths,
        size: info.size,
        identity: identity_of(&info),
        since: now_rfc3339(),
        consumers: BTreeMap::new(),
    })
}

/// The previous tracker's saved state, if it is readable and of this version.
fn load_saved(state_dir: &Path) -> Option<SavedState> {
    std::fs::read(state_dir.join(STATE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|s: &SavedState| s.version == STATE_VERSION)
}

/// Why the writes since the previous tracker's save may not all be in the kernel instance
/// opened now (`reused`: it was resumed), or None when the interval is complete.
fn continuity_gap(
    saved: Option<&SavedState>,
    boot: &str,
    resumable: Option<bool>,
    reused: bool,
    instance: &Instance,
) -> Result<Option<String>> {
    Ok(match (saved, resumable, reused) {
        (None, _, _) => None,
        (Some(s), _, _) if s.boot_id != boot => Some("the machine rebooted".into()),
        (Some(s), _, _) if !s.clean_shutdown => Some(format!(
            "the previous tracker (pid {}) stopped without saving its state (killed or crashed)",
            s.pid
        )),
        (Some(_), Some(false), _) => {
            Some("the tracker was restarted with other devices or settings".into())
        }
        (Some(_), _, false) => {
            Some("the tracefs instance was removed or altered while the tracker was stopped".into())
        }
        (Some(s), _, true) => {
            let now = instance.losses()?;
            (now != s.losses_baseline)
                .then(|| "events were lost while the tracker was stopped".to_string())
        }
    })
}

/// Gives the saved consumers back to the devices that are still the same disk; with a `gap`,
/// each one is broken, as its sets may miss writes.
fn take_over_consumers(devices: &mut [Device], saved: SavedState, gap: Option<&str>) {
    for sd in saved.devices {
        if let Some(d) = devices
            .iter_mut()
            .find(|d| d.disk == sd.disk && d.identity == sd.identity && d.size == sd.size)
        {
            d.since = sd.since;
            for sc in sd.consumers {
                let key = sc.key.clone();
                let mut c = Consumer::from_saved(sc);
                if let Some(why) = gap {
                    c.break_all(&format!("{why} (detected at {})", now_rfc3339()));
                }
                d.consumers.insert(key, c);
            }
        }
    }
}

impl State {
    /// Opens the kernel instance for `devices` and takes over what the previous tracker saved.
    fn start(opts: &DaemonOptions, mut devices: Vec<Device>) -> Result<State> {
        let root = tracefs::ensure_mounted()?;
        let kdevs: Vec<u32> = devices.iter().flat_map(|d| d.kdevs.clone()).collect();
        let filter = tracefs::filter_for(&kdevs);
        let boot = boot_id();
        let saved = load_saved(&opts.state_dir);
        // Reuse the kernel instance only when the previous daemon stopped cleanly in this boot
        // with the same configuration: then every write since is still in the buffer.
        let resumable = saved.as_ref().map(|s| {
            s.clean_shutdown
                && s.boot_id == boot
                && s.instance_filter == filter
                && s.buffer_kb == opts.buffer_kb
        });
        let (instance, reused) = Instance::open(
            &root,
            &instance_name(&opts.state_dir),
            &kdevs,
            opts.buffer_kb,
            saved
                .as_ref()
                .filter(|_| resumable == Some(true))
                .map(|s| s.buffer_readback.as_str()),
        )?;
        let gap = continuity_gap(saved.as_ref(), &boot, resumable, reused, &instance)?;
        let losses_baseline = instance.losses()?;
        if let Some(s) = saved {
            take_over_consumers(&mut devices, s, gap.as_deref());
        }
        if let Some(why) = &gap {
            tracing::warn!("{why}: the next backup of each tracked source will compare-scan");
        }
        Ok(State {
            dir: opts.state_dir.clone(),
            boot_id: boot,
            instance,
            devices,
            losses_baseline,
            loss_gen: 0,
            events: Vec::new(),
            stopped_for_good: false,
        })
    }

    /// One turn of the main loop: apply the events logged since the last; check the
    /// environment every second and save the state every ten.
    fn tick(&mut self, timers: &mut Timers) {
        if self.stopped_for_good {
            return;
        }
        self.apply_events(FaultSite::Loop);
        if timers.last_check.elapsed() >= Duration::from_secs(1) {
            self.check_environment();
            timers.last_check = Instant::now();
        }
        if timers.last_persist.elapsed() >= Duration::from_secs(10) {
            if let Err(e) = self.persist(false) {
                tracing::warn!("saving tracker state: {e:#}");
            }
            timers.last_persist = Instant::now();
        }
    }
}

/// The socket backups talk to, owner-only; non-blocking, so the main loop polls it.
fn listen(state_dir: &Path) -> Result<(UnixListener, PathBuf)> {
    let sock_path = state_dir.join(SOCKET);
    let _ = std::fs::remove_file(&sock_path);
    let listener = UnixListener::bind(&sock_path)
        .with_context(|| format!("cannot listen on {}", sock_path.display()))?;
    std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    Ok((listener, sock_path))
}

/// SIGTERM and SIGINT end the main loop (through STOP), not the process: the state is saved.
fn install_stop_handlers() -> Result<()> {
    STOP.store(false, Ordering::SeqCst);
    let handler = nix::sys::signal::SigHandler::Handler(on_signal);
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        nix::sys::signal::signal(nix::sys::signal::Signal::SIGTERM, handler)?;
        nix::sys::signal::signal(nix::sys::signal::Signal::SIGINT, handler)?;
    }
    Ok(())
}

fn announce(st: &State, opts: &DaemonOptions) {
    let names: Vec<String> = st
        .devices
        .iter()
        .map(|d| d.path.display().to_string())
        .collect();
    tracing::info!(
        "tracking {} (instance {}, {} CPUs, {} KiB per CPU); state in {}",
        names.join(", "),
        st.instance.path.display(),
        st.instance.cpus(),
        opts.buffer_kb,
        opts.state_dir.display()
    );
    eprintln!(
        "cairn tracker: running (pid {}); stop with SIGTERM",
        std::process::id()
    );
}

/// When the main loop last checked the environment and saved the state.
struct Timers {
    last_check: Instant,
    last_persist: Instant,
}

/// Until STOP (a signal, or `tracker stop` answered): each client is served on its own thread;
/// between polls, the main thread drains the kernel's buffers.
fn event_loop(listener: &UnixListener, state: &Arc<Mutex<State>>, interval: Duration) {
    let mut next_conn = 1;
    let mut timers = Timers {
        last_check: Instant::now(),
        last_persist: Instant::now(),
    };
    while !STOP.load(Ordering::SeqCst) {
        accept_clients(listener, state, &mut next_conn);
        state.lock().expect("not poisoned").tick(&mut timers);
        std::thread::sleep(interval);
    }
}

/// Every connection waiting now, each on a thread of its own with a new connection number.
fn accept_clients(listener: &UnixListener, state: &Arc<Mutex<State>>, next_conn: &mut u64) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let st = Arc::clone(state);
                let conn = *next_conn;
                *next_conn += 1;
                std::thread::spawn(move || serve(stream, conn, st));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => {
                tracing::warn!("accept: {e}");
                break;
            }
        }
    }
}

/// With the state locked, the socket goes (no new client finds it). After `tracker stop` the
/// instance is already gone; otherwise the last events are applied and the state saved as a
/// clean stop, which a restart resumes.
fn shut_down(state: &Mutex<State>, sock_path: &Path) -> Result<()> {
    let mut st = state.lock().expect("not poisoned");
    let _ = std::fs::remove_file(sock_path);
    if st.stopped_for_good {
        eprintln!("cairn tracker: stopped for good; its kernel instance is removed");
        return Ok(());
    }
    st.apply_events(FaultSite::Stop);
    st.persist(true)?;
    eprintln!(
        "cairn tracker: stopped; state saved (the kernel keeps buffering until the next start)"
    );
    Ok(())
}

fn serve(stream: UnixStream, conn: u64, state: Arc<Mutex<State>>) {
    let _ = stream.set_nonblocking(false);
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let reader = BufReader::new(stream);
    for line in reader.lines() {
        let Ok(line) = line else { break };
        let reply = match serde_json::from_str::<Request>(&line) {
            Err(e) => Reply::Error {
                message: format!("bad request: {e}"),
            },
            Ok(req) => {
                let mut st = state.lock().expect("not poisoned");
                let r = match req {
                    Request::Status => {
                        st.apply_events(FaultSite::Status);
                        Ok(st.status())
                    }
                    Request::Cut {
                        disk,
                        start,
                        len,
                        granule,
                        consumer,
                        kind,
                        parent,
                    } => st.cut(conn, disk, start, len, granule, &consumer, kind, parent),
                    Request::Commit { found, keep_dirty } => st.commit(conn, found, &keep_dirty),
                    Request::Stop => st.stop_for_good(),
                };
                r.unwrap_or_else(|e| Reply::Error {
                    message: format!("{e:#}"),
                })
            }
        };
        let mut text = serde_json::to_string(&reply).expect("serialisable");
        text.push('\n');
        let written = out.write_all(text.as_bytes());
        if matches!(reply, Reply::Stopped { .. }) {
            // Only now: the process exits soon after, and the client must have its answer.
            STOP.store(true, Ordering::SeqCst);
        }
        if written.is_err() {
            break;
        }
    }
    state.lock().expect("not poisoned").abort(conn);
}

/// What a stopped tracker's saved state says, for `cairn tracker status`.
pub fn saved_status(path: &Path) -> Result<Vec<DeviceStatus>> {
    let s: SavedState =
        serde_json::from_slice(&std::fs::read(path)?).context("reading saved tracker state")?;
    let gap = if s.boot_id != boot_id() {
        Some("the machine rebooted since the tracker last ran".to_string())
    } else if !s.clean_shutdown {
        Some("the tracker is not running and did not stop cleanly".to_string())
    } else {
        None
    };
    Ok(s.devices
        .into_iter()
        .map(|d| DeviceStatus {
            device: d.path,
            disk: d.disk,
            size: d.size,
            tracking_since: d.since,
            continuity: gap.clone().map_or(
                "stopped (resumes without a gap if nothing is lost before restart)".into(),
                |g| format!("broken: {g}"),
            ),
            consumers: d
                .consumers
                .into_iter()
                .map(|c| {
                    let count =
                        |runs: &[(u64, u64)]| runs.iter().map(|r| r.1).sum::<u64>() * c.granule;
                    let cont = |b: &Option<String>| match (b, &gap) {
                        (Some(w), _) => format!("broken: {w}"),
                        (None, Some(g)) => format!("broken: {g}"),
                        (None, None) => "intact".into(),
                    };
                    ConsumerStatus {
                        consumer: c.key,
                        start: c.start,
                        len: c.len,
                        continuity_since_image: cont(&c.image_broken),
                        continuity_since_full: cont(&c.full_broken),
                        changed_bytes_since_image: count(&c.since_image).min(c.len),
                        changed_bytes_since_full: count(&c.since_full).min(c.len),
                        last_image_seq: c.last_image,
                        last_full_seq: c.last_full,
                    }
                })
                .collect(),
        })
        .collect())
}

/// Holds the state directory's lock so no tracker starts meanwhile; refused while one runs.
fn exclude_tracker(state_dir: &Path) -> Result<Option<std::fs::File>> {
    let lock_path = state_dir.join(LOCK_FILE);
    if !lock_path.exists() {
        return Ok(None);
    }
    let lock = std::fs::OpenOptions::new().write(true).open(&lock_path)?;
    // SAFETY: flock on an open descriptor; no memory involved.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "a tracker is running with state directory {}; stop it first (cairn tracker stop)",
            state_dir.display()
        );
    }
    Ok(Some(lock))
}

fn instance_path(state_dir: &Path) -> PathBuf {
    Path::new(tracefs::TRACEFS)
        .join("instances")
        .join(instance_name(state_dir))
}

/// `cairn tracker reset`: forget everything for this state directory — the saved state and the
/// kernel instance that keeps buffering after a clean stop. Refused while a tracker runs.
pub fn reset(state_dir: &Path) -> Result<bool> {
    let _lock = exclude_tracker(state_dir)?;
    let mut removed = false;
    let instance = instance_path(state_dir);
    if instance.exists() {
        tracefs::remove_instance(&instance)?;
        removed = true;
    }
    for f in [STATE_FILE, SOCKET] {
        match std::fs::remove_file(state_dir.join(f)) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(anyhow!(e).context(format!("removing {}", state_dir.join(f).display())))
            }
        }
    }
    Ok(removed)
}

/// `cairn tracker stop` with no tracker running (a unit's stop after the daemon exited, say):
/// the instance its clean stop kept is removed, and the saved state records why the next start
/// must compare-scan. Returns the removed instance, if there was one.
pub fn stop_stopped(state_dir: &Path) -> Result<Option<PathBuf>> {
    let _lock = exclude_tracker(state_dir)?;
    let p = state_dir.join(STATE_FILE);
    if let Ok(bytes) = std::fs::read(&p) {
        if let Ok(mut s) = serde_json::from_slice::<SavedState>(&bytes) {
            let why = format!(
                "the tracker was stopped for good (cairn tracker stop) at {}",
                now_rfc3339()
            );
            for c in s.devices.iter_mut().flat_map(|d| d.consumers.iter_mut()) {
                c.image_broken.get_or_insert_with(|| why.clone());
                c.full_broken.get_or_insert_with(|| why.clone());
            }
            write_atomic(&p, &serde_json::to_vec_pretty(&s)?)?;
        }
    }
    let instance = instance_path(state_dir);
    if !instance.exists() {
        return Ok(None);
    }
    tracefs::remove_instance(&instance)?;
    Ok(Some(instance))
}
