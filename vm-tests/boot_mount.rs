//! Booting a restore point without restoring it (docs/mount.md, "Booting a restore point"): a
//! bootable disk is imaged on the host, its restore point mounted with `cairn mount --raw
//! --background`, and qemu boots `DIR/disk` with `snapshot=on` (writes go to a temporary overlay)
//! until the guest's shell prompt; then `cairn umount` leaves no mount and no loop device behind.
//!
//! The bootable disk is the rescue ISO written to a disk image, as `dd` writes it to a USB stick:
//! a hybrid image whose MBR boots GRUB under SeaBIOS, and GRUB then reads the kernel and initrd
//! from the disk's ISO 9660 filesystem, so every byte the guest boots from comes through the view.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::disks::*;
use crate::harness::*;
use crate::Scratch;

fn cairn(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cairn {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Mounts below `dir` and loop devices reading files below it, from the kernel's own tables.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    for line in mountinfo.lines() {
        if Path::new(line.split(' ').nth(4).unwrap_or("")).starts_with(dir) {
            out.push(format!("mount: {line}"));
        }
    }
    for e in fs::read_dir("/sys/block").unwrap().flatten() {
        let backing = e.path().join("loop/backing_file");
        if let Ok(b) = fs::read_to_string(&backing) {
            if Path::new(b.trim_end()).starts_with(dir) {
                out.push(format!(
                    "loop device {}: {}",
                    e.path().display(),
                    b.trim_end()
                ));
            }
        }
    }
    out
}

/// A background `cairn mount`; ended when dropped (a failed test) if `cairn umount` did not.
struct MountedPoint {
    dir: PathBuf,
}

impl MountedPoint {
    fn raw(repo: &Path, dir: PathBuf) -> (MountedPoint, serde_json::Value) {
        fs::create_dir_all(&dir).unwrap();
        let dir = dir.canonicalize().unwrap();
        let out = cairn(&["mount", s(repo), s(&dir), "--raw", "--background", "--json"]);
        let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "cairn mount --json printed no JSON ({e}):\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        (MountedPoint { dir }, report)
    }
}

impl Drop for MountedPoint {
    fn drop(&mut self) {
        if !leftovers(&self.dir).is_empty() {
            let _ = Command::new(env!("CARGO_BIN_EXE_cairn"))
                .args(["umount", s(&self.dir)])
                .stdin(Stdio::null())
                .output();
        }
    }
}

/// qemu booting `disk` as the first IDE hard disk of a BIOS machine, its writes in an overlay.
fn boot_from(disk: &Path) -> Command {
    let mut c = Command::new(qemu());
    c.args(["-accel", "tcg", "-smp", "1", "-m", "512", "-machine", "pc"]);
    c.args([
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-vga",
        "none",
    ]);
    c.args(["-serial", "stdio", "-monitor", "none"]);
    c.arg("-drive")
        .arg(format!("file={},format=raw,snapshot=on", disk.display()));
    c
}

#[test]
fn boot_a_restore_point_from_its_raw_mount() {
    let test = "boot_a_restore_point_from_its_raw_mount";
    if skip_vm(test) {
        return;
    }
    let scratch = Scratch::new(test);
    let dir = scratch.path();
    let stick = dir.join("stick.img");
    fs::copy(&rescue().iso, &stick).unwrap();
    let stick_hash = blake3_file(&stick);
    let size = fs::metadata(&stick).unwrap().len();

    let repo = dir.join("repo");
    cairn(&["backup", s(&stick), s(&repo), "--name", "stick", "-q"]);
    let (mounted, report) = MountedPoint::raw(&repo, dir.join("view"));
    let disk = mounted.dir.join("disk");
    assert_eq!(report["disk"], s(&disk), "mount report: {report}");
    assert_eq!(report["size"], size, "mount report: {report}");
    assert_eq!(
        blake3_file(&disk),
        stick_hash,
        "DIR/disk differs from the imaged disk"
    );

    let t0 = Instant::now();
    let mut g = spawn_qemu(boot_from(&disk), &dir.join("vm"));
    // The disk's own boot loader, read by the BIOS from DIR/disk.
    let at = g.wait_for("GNU GRUB", 0, Duration::from_secs(120));
    let at = g.wait_for("cairn-rescue:~# ", at, Duration::from_secs(300));
    eprintln!(
        "{test}: DIR/disk booted to the shell prompt in {:.1?} (TCG)",
        t0.elapsed()
    );
    // The guest writes over the start of its disk and reads its write back: snapshot=on gives it
    // a writable disk although DIR/disk is read-only. Markers are printed with $((...)) so the echo
    // of the typed command never matches.
    g.send(
        "D=/dev/$(ls /sys/block | grep -m1 '^sd'); \
         dd if=/dev/zero of=$D bs=64K count=1 oflag=direct conv=fsync status=none \
         && [ \"$(dd if=$D bs=64K count=1 iflag=direct status=none | tr -d '\\000' | wc -c)\" = 0 ] \
         && R=written || R=failed; echo OVERLAY-$((6*7)) $R $D; poweroff\n",
    );
    let at = g.wait_for("OVERLAY-42 ", at, Duration::from_secs(120));
    let fin = g.wait_exit(Duration::from_secs(120));
    assert!(
        fin.serial[at..].starts_with("written /dev/sd"),
        "the guest could not write to its disk through the overlay:\n{}",
        fin.tail(20)
    );
    assert_eq!(
        blake3_file(&disk),
        stick_hash,
        "the guest's writes reached DIR/disk"
    );

    cairn(&["umount", s(&mounted.dir)]);
    let left = leftovers(&mounted.dir);
    assert!(
        left.is_empty(),
        "`cairn umount` left behind:\n{}",
        left.join("\n")
    );
    assert!(
        fs::read_dir(&mounted.dir).unwrap().next().is_none(),
        "{} is not empty after `cairn umount`",
        mounted.dir.display()
    );
}
