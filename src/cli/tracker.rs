//! `tracker run|stop|reset|status`: the change tracker's daemon and its controls.

use super::args::TrackerCommand;
use super::output::{outln, print_json, short_bytes};
use super::Ctx;
use crate::tracker::daemon::{self, DaemonOptions};
use crate::tracker::instances::{self, InstanceStatus, Verdict};
use crate::tracker::protocol::DeviceStatus;
use crate::tracker::Saved;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub(super) fn cmd_tracker(t: TrackerCommand, ctx: &Ctx) -> Result<()> {
    let dir = ctx.tracker_state_dir();
    match t {
        TrackerCommand::Run {
            devices,
            buffer_kb,
            interval_ms,
        } => daemon::run(&DaemonOptions {
            devices,
            state_dir: dir,
            buffer_kb,
            interval: Duration::from_millis(interval_ms.max(1)),
        }),
        TrackerCommand::Reset { orphans: true } => reset_orphans(&dir, ctx.json),
        TrackerCommand::Reset { orphans: false } => reset(&dir),
        TrackerCommand::Stop => stop(&dir),
        TrackerCommand::Status { device } => status(&dir, device, ctx.json),
    }
}

fn reset_orphans(dir: &Path, json: bool) -> Result<()> {
    let removed = instances::remove_orphans(dir)?;
    if json {
        print_json(&serde_json::json!({ "removed": removed }));
    } else if removed.is_empty() {
        eprintln!("no orphaned instances");
    }
    for i in &removed {
        eprintln!("removed {} ({})", i.name, i.why);
    }
    Ok(())
}

fn reset(dir: &Path) -> Result<()> {
    let removed = daemon::reset(dir)?;
    eprintln!(
        "{}",
        if removed {
            "tracking state removed"
        } else {
            "nothing to remove"
        }
    );
    Ok(())
}

fn stop(dir: &Path) -> Result<()> {
    match crate::tracker::stop(dir)? {
        Some(instance) => eprintln!("tracker stopped for good; removed {instance}"),
        None => eprintln!("no tracker is running and no kernel instance was kept"),
    }
    Ok(())
}

fn status(dir: &Path, device: Option<PathBuf>, json: bool) -> Result<()> {
    let (saved, mut devices) = crate::tracker::status(dir)?;
    let instances = instances::list(dir)?;
    if let Some(d) = device {
        devices = only_device(devices, &d)?;
    }
    if json {
        print_status_json(&saved, &devices, &instances);
        return Ok(());
    }
    match &saved {
        Saved::Running => outln!("tracker: running"),
        Saved::Stopped => outln!("tracker: NOT running (saved state shown)"),
        Saved::Nothing(n) => outln!("tracker: NOT running: {n}"),
    }
    print_instances(&instances);
    for d in devices {
        print_device_status(d);
    }
    Ok(())
}

/// `tracker status DEVICE`: the entries naming the same device node, however it was spelled.
fn only_device(mut devices: Vec<DeviceStatus>, d: &Path) -> Result<Vec<DeviceStatus>> {
    let want = std::fs::canonicalize(d).unwrap_or(d.to_path_buf());
    devices.retain(|s| {
        std::fs::canonicalize(&s.device).unwrap_or_else(|_| s.device.clone().into()) == want
    });
    if devices.is_empty() {
        bail!("{} is not tracked", d.display());
    }
    Ok(devices)
}

fn print_status_json(saved: &Saved, devices: &[DeviceStatus], instances: &[InstanceStatus]) {
    let note = match saved {
        Saved::Nothing(n) => Some(n.clone()),
        _ => None,
    };
    print_json(&serde_json::json!({
        "running": matches!(saved, Saved::Running),
        "note": note,
        "devices": devices,
        "instances": instances,
    }));
}

fn print_instances(instances: &[InstanceStatus]) {
    for i in instances {
        let what = match i.verdict {
            Verdict::InUse => "in use",
            Verdict::Kept => "kept for a restart",
            Verdict::Orphaned => "ORPHANED",
        };
        outln!("kernel instance {}: {what}: {}", i.name, i.why);
    }
    if instances.iter().any(|i| i.verdict == Verdict::Orphaned) {
        outln!(
            "  orphaned instances trace every write of their disks until reboot: \
             remove them with `cairn tracker reset --orphans`"
        );
    }
}

fn print_device_status(d: DeviceStatus) {
    outln!(
        "{} ({}:{}, {}), tracking since {}",
        d.device,
        d.disk.0,
        d.disk.1,
        short_bytes(d.size),
        d.tracking_since
    );
    if d.continuity != "intact" {
        outln!("  {}", d.continuity);
    }
    if d.consumers.is_empty() {
        outln!("  no backups taken with the tracker yet");
    }
    for c in d.consumers {
        outln!("  {} (bytes {}..{})", c.consumer, c.start, c.start + c.len);
        outln!(
            "    since last image: {} changed, continuity {}",
            short_bytes(c.changed_bytes_since_image),
            c.continuity_since_image
        );
        outln!(
            "    since last full:  {} changed, continuity {}",
            short_bytes(c.changed_bytes_since_full),
            c.continuity_since_full
        );
    }
}
