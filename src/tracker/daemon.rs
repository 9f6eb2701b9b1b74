//! `cairn tracker run`: watches the block layer for writes to the given whole disks and keeps, per
//! consumer (a repository's series of images of one disk or partition), the granules changed since
//! its last image and since its last full image.
//!
//! Continuity is the point: the daemon must be able to prove it saw every write since a consumer's
//! last cut. Anything that breaks that proof — lost events, a reboot, an unclean stop, the device
//! changing size or identity, the tracefs instance being altered — marks the consumer broken, and
//! its next backup compare-scans. Supersets are always safe; a missing mark never is.

use super::changemap::ChangeMap;
use super::protocol::{self, ConsumerStatus, CutKind, DeviceStatus, Reply, Request, Token};
use super::statefile::{self, SavedConsumer, SavedDevice, SavedState};
use super::tracefs::{self, BlockEvent, Instance};
use crate::device::DeviceInfo;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::io::{BufReader, Write};
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
    let s = statefile::load(state_dir)
        .map_err(|e| format!("its saved state is unreadable ({e:#})"))?
        .ok_or_else(|| "no saved state".to_string())?;
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

pub struct DaemonOptions {
    pub devices: Vec<PathBuf>,
    pub state_dir: PathBuf,
    /// Per-CPU ring buffer size.
    pub buffer_kb: u64,
    /// How often the buffers are drained.
    pub interval: Duration,
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
            since_image: sc.since_image,
            since_full: sc.since_full,
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
    /// The clean stop's state is taken: no later save may replace it.
    saved_final: bool,
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

    /// The state as it stands, for saving. Under the lock this only copies chunk pointers (the
    /// maps are copy-on-write); merging in-flight cuts and encoding happen in `Snapshot::save`,
    /// after the lock is released.
    fn snapshot(&self, clean: bool) -> Snapshot {
        let mut in_flight = Vec::new();
        let devices = self
            .devices
            .iter()
            .enumerate()
            .map(|(di, d)| SavedDevice {
                path: d.path.display().to_string(),
                disk: d.disk,
                size: d.size,
                identity: d.identity.clone(),
                since: d.since.clone(),
                consumers: d
                    .consumers
                    .iter()
                    .enumerate()
                    .map(|(ci, (k, c))| {
                        if let Some(p) = &c.pending {
                            in_flight.push((di, ci, p.image.clone(), p.full.clone()));
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
                            legacy_since_image: Vec::new(),
                            legacy_since_full: Vec::new(),
                            since_image: c.since_image.clone(),
                            since_full: c.since_full.clone(),
                        }
                    })
                    .collect(),
            })
            .collect();
        Snapshot {
            dir: self.dir.clone(),
            state: SavedState {
                version: statefile::VERSION,
                boot_id: self.boot_id.clone(),
                clean_shutdown: clean,
                pid: std::process::id(),
                instance_filter: self.instance.filter.clone(),
                buffer_kb: self.instance.buffer_kb,
                buffer_readback: self.instance.buffer_readback.clone(),
                losses_baseline: self.losses_baseline,
                devices,
            },
            in_flight,
        }
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
    ) -> Result<(Reply, Option<ChangeMap>)> {
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
                    // A copy of chunk pointers: the runs are listed after the lock is released.
                    (Some(set.clone()), None)
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
        Ok((
            Reply::Cut {
                token: Token {
                    lineage: c.lineage.clone(),
                    seq: c.seq,
                },
                tracked: changed.is_some(),
                reason,
                // Counted by `handle` from the snapshot once the lock is released.
                runs: 0,
                granules: 0,
            },
            changed,
        ))
    }

    /// `keep_dirty`: byte ranges of the source (relative to its start) whose content the image
    /// could not capture — unreadable sectors. They stay changed in both sets, so the next
    /// backup reads them again instead of trusting the zeros recorded for them.
    fn commit(
        &mut self,
        conn: u64,
        found: Option<ChangeMap>,
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
                if let Some(found) = found {
                    c.since_full.union_with(&found);
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
        // The caller saves the state before it answers: a commit is durable once acknowledged.
        Ok(Reply::Committed)
    }

    /// `tracker stop`: no restart is expected, so the instance goes now rather than tracing
    /// every write until reboot. The saved state says why the next start must compare-scan.
    /// Returns the reply and the state to save; the caller saves it before answering.
    fn stop_for_good(&mut self) -> Result<(Reply, Snapshot)> {
        let why = format!(
            "the tracker was stopped for good (cairn tracker stop) at {}",
            now_rfc3339()
        );
        self.break_everything(&why);
        // The main loop exits once the reply is out (serve sets STOP); until then it idles.
        self.stopped_for_good = true;
        let snapshot = self.snapshot(true);
        self.instance.close_and_remove()?;
        tracing::info!("{why}");
        Ok((
            Reply::Stopped {
                instance: self.instance.path.display().to_string(),
            },
            snapshot,
        ))
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

/// The state taken under the lock, saved without it.
struct Snapshot {
    dir: PathBuf,
    state: SavedState,
    /// (device, consumer, image, full) of each in-flight cut, by position in `state`.
    in_flight: Vec<(usize, usize, ChangeMap, Option<ChangeMap>)>,
}

impl Snapshot {
    fn save(mut self) -> Result<()> {
        // An in-flight cut's marks are saved as still changed: a superset is safe.
        for (di, ci, image, full) in self.in_flight.drain(..) {
            let c = &mut self.state.devices[di].consumers[ci];
            c.since_image.union_with(&image);
            if let Some(f) = &full {
                c.since_full.union_with(f);
            }
        }
        statefile::save(&self.dir, &self.state)
    }
}

/// The daemon's state and the turn taken to save it. Saving takes `saving` first and holds
/// `state` only while it snapshots, so draining events never waits for a file to be written; the
/// order of turns is the order of snapshots, so an older state never replaces a newer one.
/// Never take `saving` while holding `state`.
struct Shared {
    state: Mutex<State>,
    saving: Mutex<()>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("not poisoned")
    }

    /// Saves the state as it is now, unless the tracker was stopped for good or has saved its
    /// clean stop (after which nothing may replace that).
    fn save(&self, clean: bool) -> Result<()> {
        let _turn = self.saving.lock().expect("not poisoned");
        let snapshot = {
            let mut st = self.lock();
            if st.stopped_for_good || st.saved_final {
                return Ok(());
            }
            st.saved_final = clean;
            st.snapshot(clean)
        };
        snapshot.save()
    }
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
    state.snapshot(false).save()?;
    let (listener, sock_path) = listen(&opts.state_dir)?;
    install_stop_handlers()?;
    announce(&state, opts);
    let shared = Arc::new(Shared {
        state: Mutex::new(state),
        saving: Mutex::new(()),
    });
    event_loop(&listener, &shared, opts.interval);
    shut_down(&shared, &sock_path)
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
/// An unreadable state (damaged, or of an unknown version) is no state: every consumer starts
/// broken and its next backup compare-scans, which is safe.
fn load_saved(state_dir: &Path) -> Option<SavedState> {
    statefile::load(state_dir)
        .inspect_err(|e| {
            tracing::warn!("{e:#}: starting without it; every tracked source will compare-scan")
        })
        .ok()
        .flatten()
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
            saved_final: false,
        })
    }

    /// One turn of the main loop: apply the events logged since the last; check the
    /// environment every second.
    fn tick(&mut self, timers: &mut Timers) {
        if self.stopped_for_good {
            return;
        }
        self.apply_events(FaultSite::Loop);
        if timers.last_check.elapsed() >= Duration::from_secs(1) {
            self.check_environment();
            timers.last_check = Instant::now();
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

/// When the main loop last checked the environment.
struct Timers {
    last_check: Instant,
}

/// How often the state is saved while the tracker runs.
const SAVE_EVERY: Duration = Duration::from_secs(10);

/// Until STOP (a signal, or `tracker stop` answered): each client is served on its own thread;
/// between polls, the main thread drains the kernel's buffers. The periodic save runs on a
/// thread of its own, so neither the lock nor the draining thread waits for the disk.
fn event_loop(listener: &UnixListener, shared: &Arc<Shared>, interval: Duration) {
    let mut next_conn = 1;
    let mut timers = Timers {
        last_check: Instant::now(),
    };
    // Capacity 1: a save asked for while one is running is coalesced into the next.
    let (ask_save, saves) = std::sync::mpsc::sync_channel::<()>(1);
    let saver = {
        let shared = Arc::clone(shared);
        std::thread::spawn(move || {
            for () in saves {
                if let Err(e) = shared.save(false) {
                    tracing::warn!("saving tracker state: {e:#}");
                }
            }
        })
    };
    let mut last_save = Instant::now();
    while !STOP.load(Ordering::SeqCst) {
        accept_clients(listener, shared, &mut next_conn);
        shared.lock().tick(&mut timers);
        if last_save.elapsed() >= SAVE_EVERY {
            let _ = ask_save.try_send(());
            last_save = Instant::now();
        }
        std::thread::sleep(interval);
    }
    drop(ask_save);
    let _ = saver.join();
}

/// Every connection waiting now, each on a thread of its own with a new connection number.
fn accept_clients(listener: &UnixListener, shared: &Arc<Shared>, next_conn: &mut u64) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let sh = Arc::clone(shared);
                let conn = *next_conn;
                *next_conn += 1;
                std::thread::spawn(move || serve(stream, conn, sh));
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
/// clean stop, which a restart resumes; no later save replaces it.
fn shut_down(shared: &Shared, sock_path: &Path) -> Result<()> {
    let _turn = shared.saving.lock().expect("not poisoned");
    let mut st = shared.lock();
    let _ = std::fs::remove_file(sock_path);
    if st.stopped_for_good {
        eprintln!("cairn tracker: stopped for good; its kernel instance is removed");
        return Ok(());
    }
    st.apply_events(FaultSite::Stop);
    st.saved_final = true;
    let snapshot = st.snapshot(true);
    drop(st);
    snapshot.save()?;
    eprintln!(
        "cairn tracker: stopped; state saved (the kernel keeps buffering until the next start)"
    );
    Ok(())
}

/// (offset from the source's start, length) pairs.
type ByteRanges = Vec<(u64, u64)>;

/// What a connection sent ahead of its commit: the repair set and the unreadable ranges.
#[derive(Default)]
struct Incoming {
    /// Granules of the source this connection's cut covers; runs are clamped to them.
    granules: Option<u64>,
    found: ChangeMap,
    found_runs: u64,
    keep_dirty: Vec<(u64, u64)>,
    /// Why the commit must be refused (a batch before any cut, or too large).
    problem: Option<String>,
}

impl Incoming {
    fn found(&mut self, runs: &[(u64, u64)]) {
        let Some(granules) = self.granules else {
            self.problem = Some("changed runs sent before a cut".into());
            return;
        };
        if runs.len() > protocol::RUN_BATCH {
            self.problem = Some(format!("a batch of {} runs", runs.len()));
            return;
        }
        self.found_runs += runs.len() as u64;
        for &(first, count) in runs {
            if first < granules {
                self.found.mark(first, count.min(granules - first));
            }
        }
    }

    fn keep_dirty(&mut self, ranges: &[(u64, u64)]) {
        if self.granules.is_none() {
            self.problem = Some("unreadable ranges sent before a cut".into());
        } else if ranges.len() > protocol::RUN_BATCH {
            self.problem = Some(format!("a batch of {} ranges", ranges.len()));
        } else {
            self.keep_dirty.extend_from_slice(ranges);
        }
    }

    /// The repair set for a commit that announced `found_runs` and `keep_dirty_ranges`, if
    /// what arrived matches.
    fn take(
        &mut self,
        found_runs: Option<u64>,
        keep_dirty_ranges: u64,
    ) -> Result<(Option<ChangeMap>, ByteRanges)> {
        let me = std::mem::take(self);
        self.granules = me.granules;
        if let Some(p) = me.problem {
            bail!("commit refused: {p}");
        }
        if found_runs.unwrap_or(0) != me.found_runs
            || keep_dirty_ranges != me.keep_dirty.len() as u64
        {
            bail!(
                "commit announced {} changed runs and {keep_dirty_ranges} unreadable ranges, but {} and {} arrived",
                found_runs.unwrap_or(0),
                me.found_runs,
                me.keep_dirty.len()
            );
        }
        Ok((found_runs.map(|_| me.found), me.keep_dirty))
    }
}

fn send(out: &mut impl Write, reply: &Reply) -> std::io::Result<()> {
    let mut text = serde_json::to_string(reply).expect("serialisable");
    text.push('\n');
    out.write_all(text.as_bytes())
}

/// How many runs `send_runs` will send, and the granules they cover: the backup sizes its work
/// and progress from these before it reads the runs.
fn count_runs(set: &ChangeMap) -> (u64, u64) {
    let mut runs = 0u64;
    set.try_for_each_run(|_, _| {
        runs += 1;
        Ok::<(), std::convert::Infallible>(())
    })
    .unwrap_or_else(|never| match never {});
    (runs, set.count())
}

/// A tracked cut's runs, in batches of `RUN_BATCH`, then their count; listed from the cut's
/// snapshot with no lock held.
fn send_runs(out: &mut impl Write, changed: &ChangeMap) -> std::io::Result<()> {
    let mut batch = Vec::with_capacity(protocol::RUN_BATCH);
    let mut count = 0u64;
    changed.try_for_each_run(|first, len| {
        batch.push((first, len));
        count += 1;
        if batch.len() == protocol::RUN_BATCH {
            send(
                out,
                &Reply::Runs {
                    runs: std::mem::take(&mut batch),
                },
            )?;
        }
        Ok::<(), std::io::Error>(())
    })?;
    if !batch.is_empty() {
        send(out, &Reply::Runs { runs: batch })?;
    }
    send(out, &Reply::RunsEnd { count })
}

/// One request; Ok(None) for the batches that have no reply of their own.
fn handle(
    shared: &Shared,
    conn: u64,
    req: Request,
    incoming: &mut Incoming,
) -> Result<Option<(Reply, Option<ChangeMap>)>> {
    Ok(Some(match req {
        Request::Status => {
            let mut st = shared.lock();
            st.apply_events(FaultSite::Status);
            (st.status(), None)
        }
        Request::Cut {
            disk,
            start,
            len,
            granule,
            consumer,
            kind,
            parent,
        } => {
            let (mut reply, changed) = shared
                .lock()
                .cut(conn, disk, start, len, granule, &consumer, kind, parent)?;
            if let (Reply::Cut { runs, granules, .. }, Some(set)) = (&mut reply, &changed) {
                (*runs, *granules) = count_runs(set);
            }
            *incoming = Incoming {
                granules: Some(len.div_ceil(granule)),
                ..Incoming::default()
            };
            (reply, changed)
        }
        Request::Found { runs } => {
            incoming.found(&runs);
            return Ok(None);
        }
        Request::KeepDirty { ranges } => {
            incoming.keep_dirty(&ranges);
            return Ok(None);
        }
        Request::Commit {
            found_runs,
            keep_dirty_ranges,
        } => {
            let (found, keep_dirty) = incoming.take(found_runs, keep_dirty_ranges)?;
            let reply = shared.lock().commit(conn, found, &keep_dirty)?;
            shared.save(false)?;
            (reply, None)
        }
        Request::Stop => {
            let _turn = shared.saving.lock().expect("not poisoned");
            let (reply, snapshot) = shared.lock().stop_for_good()?;
            snapshot.save()?;
            (reply, None)
        }
    }))
}

fn serve(stream: UnixStream, conn: u64, shared: Arc<Shared>) {
    let _ = stream.set_nonblocking(false);
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut incoming = Incoming::default();
    // A read error (a message over the bound among them) ends the connection, as a drop does.
    while let Ok(true) = protocol::read_message(&mut reader, &mut line) {
        let handled = match serde_json::from_str::<Request>(&line) {
            Err(e) => Err(anyhow!("bad request: {e}")),
            Ok(req) => handle(&shared, conn, req, &mut incoming),
        };
        let (reply, changed) = match handled {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => (
                Reply::Error {
                    message: format!("{e:#}"),
                },
                None,
            ),
        };
        let mut written = send(&mut out, &reply);
        if let (Ok(()), Some(changed)) = (&written, &changed) {
            written = send_runs(&mut out, changed);
        }
        if matches!(reply, Reply::Stopped { .. }) {
            // Only now: the process exits soon after, and the client must have its answer.
            STOP.store(true, Ordering::SeqCst);
        }
        if written.is_err() {
            break;
        }
    }
    shared.lock().abort(conn);
}

/// What a stopped tracker's saved state says, for `cairn tracker status`.
pub fn saved_status(path: &Path) -> Result<Vec<DeviceStatus>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let s = statefile::decode(&bytes)
        .with_context(|| format!("{} is not usable tracker state", path.display()))?;
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
                    let count = |set: &ChangeMap| set.count() * c.granule;
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
    for f in [statefile::STATE_FILE, statefile::LEGACY_STATE_FILE, SOCKET] {
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
    {
        if let Ok(Some(mut s)) = statefile::load(state_dir) {
            let why = format!(
                "the tracker was stopped for good (cairn tracker stop) at {}",
                now_rfc3339()
            );
            for c in s.devices.iter_mut().flat_map(|d| d.consumers.iter_mut()) {
                c.image_broken.get_or_insert_with(|| why.clone());
                c.full_broken.get_or_insert_with(|| why.clone());
            }
            statefile::save(state_dir, &s)?;
        }
    }
    let instance = instance_path(state_dir);
    if !instance.exists() {
        return Ok(None);
    }
    tracefs::remove_instance(&instance)?;
    Ok(Some(instance))
}
