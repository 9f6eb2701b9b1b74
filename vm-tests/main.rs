//! End-to-end tests: cairn inside its rescue environment under qemu (TCG), driven through
//! `autorun.sh` on a CAIRNRUN disk, checked on the host.
//!
//! The rescue image is built by tools/build-rescue (cached under /var/tmp/cairn-rescue-cache) unless
//! CAIRN_RESCUE_DIR points at one. A missing qemu, OVMF or host tool fails the test with a message
//! saying how to get it; CAIRN_SKIP_VM=1 (never set in CI) skips these tests.
//! Serial consoles and qemu's stderr of each run stay in the test's temporary directory, printed on
//! failure; CAIRN_VM_KEEP=1 keeps the directory (path printed).

mod boot_mount;
mod disks;
mod failing;
mod harness;
mod scenario3;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use disks::*;
use harness::*;

/// Generous: a whole scenario takes 1-2 minutes under TCG on the CI machine.
const RUN_TIMEOUT: Duration = Duration::from_secs(900);

/// A temporary directory, kept when CAIRN_VM_KEEP=1.
struct Scratch {
    _dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Scratch {
    fn new(test: &str) -> Scratch {
        let t = tempfile::Builder::new()
            .prefix(&format!("cairn-vm-{test}-"))
            .tempdir_in(std::env::var_os("CAIRN_VM_TMPDIR").unwrap_or_else(|| "/var/tmp".into()))
            .unwrap();
        let path = t.path().to_path_buf();
        if std::env::var("CAIRN_VM_KEEP").as_deref() == Ok("1") {
            eprintln!("{test}: keeping {}", path.display());
            Scratch {
                _dir: None,
                path: t.keep(),
            }
        } else {
            Scratch {
                _dir: Some(t),
                path,
            }
        }
    }
    fn path(&self) -> &Path {
        &self.path
    }
}

/// A CAIRNRUN vfat disk holding `autorun.sh` = prelude + `body`.
fn cairnrun_disk(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("cairnrun.img");
    let script = format!("{AUTORUN_PRELUDE}\n{body}");
    vfat_image(
        &path,
        32 * MIB,
        "CAIRNRUN",
        &[("autorun.sh", script.into_bytes())],
    );
    path
}

/// The guest side of scenarios 1 and 2: back up the disk with serial `src` into a repository on the
/// ext4 disk `repo`, verify and list it, restore it onto `dst`, then check the restored disk in the
/// guest too (partitions re-read, fsck, file hashes).
const BACKUP_RESTORE: &str = r#"
SRC=$(disk src) || exit 1
REPO=$(disk repo) || exit 1
DST=$(disk dst) || exit 1
note info sh -c 'uname -r; cairn --version; cat /proc/partitions'
step mount-repo mount -t ext4 "$REPO" /mnt/usb
step backup cairn backup "$SRC" /mnt/usb/repo --name vmdisk --json
step verify cairn verify /mnt/usb/repo --json
step list cairn list /mnt/usb/repo --json
step restore cairn restore /mnt/usb/repo "$DST" --yes --json
step umount-repo umount /mnt/usb
step rescan blockdev --rereadpt "$DST"
step fsck-ext4 e2fsck -fn "${DST}1"
step fsck-vfat fsck.vfat -n "${DST}2"
step mount-ext4 mount -o ro -t ext4 "${DST}1" /mnt/target
step sums-ext4 sh -c 'cd /mnt/target && find . -path ./lost+found -prune -o -type f -print | xargs sha256sum'
step umount-ext4 umount /mnt/target
step mount-vfat mount -o ro -t vfat "${DST}2" /mnt/target
step sums-vfat sh -c 'cd /mnt/target && find . -type f | xargs sha256sum'
step umount-vfat umount /mnt/target
step sgdisk-verify sgdisk -v "$DST"
"#;

const BACKUP_RESTORE_STEPS: &[&str] = &[
    "mount-repo",
    "backup",
    "verify",
    "list",
    "restore",
    "umount-repo",
    "rescan",
    "fsck-ext4",
    "fsck-vfat",
    "mount-ext4",
    "sums-ext4",
    "umount-ext4",
    "mount-vfat",
    "sums-vfat",
    "umount-vfat",
    "sgdisk-verify",
];

/// Scenarios 1 and 2: one boot path, the whole backup -> restore job, checked on the host.
fn backup_restore_via(boot: Boot, test: &str) {
    if skip_vm(test) {
        return;
    }
    let scratch = Scratch::new(test);
    let dir = scratch.path();
    let src = source_disk(dir);
    let src_hash = blake3_file(&src.path);
    let repo = dir.join("repo.img");
    ext4_image(&repo, 160 * MIB, "cairn-repo", None);
    let dst = dir.join("target.img");
    let dst_size = 96 * MIB;
    blank(&dst, dst_size);
    let mut script = String::new();
    let mut steps: Vec<&str> = Vec::new();
    if boot == Boot::IsoUefiUsb {
        script.push_str(
            "step secure-boot sh -c 'dmesg | grep \"secureboot: Secure boot enabled\"'\n\
             note lockdown cat /sys/kernel/security/lockdown\n",
        );
        steps.push("secure-boot");
    }
    script.push_str(BACKUP_RESTORE);
    steps.extend(BACKUP_RESTORE_STEPS);
    let run = cairnrun_disk(dir, &script);

    let vm = Vm::new(boot, &dir.join("vm"))
        .disk(&src.path, "src")
        .disk(&repo, "repo")
        .disk(&dst, "dst")
        .disk(&run, "cairnrun");
    let finished = vm.run(RUN_TIMEOUT);
    eprintln!(
        "{test}: guest ran {:.1?} (boot + autorun)",
        finished.elapsed
    );

    // What the guest did, step by step.
    let ar = Autorun::read(&run, &dir.join("cairnrun"), &finished);
    ar.assert_ok(&steps);
    let b = ar.json("backup");
    assert_eq!(b["kind"], "full", "backup JSON: {b}");
    assert_eq!(b["source_size"], src.size, "backup JSON: {b}");
    let id = b["id"].as_str().expect("backup JSON has an id").to_string();
    let v = ar.json("verify");
    assert_eq!(v["ok"], true, "verify JSON: {v}");
    let l = ar.json("list");
    let images = l.as_array().expect("list JSON is an array");
    assert_eq!(images.len(), 1, "list JSON: {l}");
    assert_eq!(images[0]["id"], id.as_str());
    assert_eq!(images[0]["status"], "complete", "list JSON: {l}");
    let r = ar.json("restore");
    assert_eq!(r["id"], id.as_str(), "restore JSON: {r}");
    assert!(
        ar.step("sgdisk-verify").out.contains("No problems found"),
        "sgdisk -v in the guest finds problems with the restored GPT:\n{}",
        ar.step("sgdisk-verify").out
    );
    let scr = dir.join("check");
    assert_eq!(
        sorted_lines(&ar.step("sums-ext4").out),
        src.ext4_sha256(&scr),
        "file hashes of the restored ext4 partition, in the guest"
    );
    assert_eq!(
        sorted_lines(&ar.step("sums-vfat").out),
        src.vfat_sha256(&scr),
        "file hashes of the restored vfat partition, in the guest"
    );

    // The disks, on the host.
    assert_eq!(
        blake3_file(&src.path),
        src_hash,
        "the guest changed the source disk"
    );
    assert_eq!(
        std::fs::metadata(&dst).unwrap().len(),
        dst_size,
        "the target disk file changed size"
    );
    src.assert_restored_on(&dst, &scr);
    // The repository the guest wrote is sound for the host's cairn too.
    let repo_dir = ext4_tree(&repo, "repo", &dir.join("repo-copy"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["verify", repo_dir.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "host cairn verify of the guest's repository failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let again = dir.join("host-restore.img");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args([
            "restore",
            repo_dir.to_str().unwrap(),
            again.to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "host cairn restore of the guest's repository failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        blake3_file(&again),
        src_hash,
        "the guest's image restored on the host differs from the source"
    );
}

/// Scenario 1: kernel + initrd boot (as from PXE); GPT disk with ext4 and vfat -> repository on a
/// second disk -> third, larger, empty disk.
#[test]
fn scenario1_kernel_initrd_backup_restore() {
    backup_restore_via(Boot::KernelInitrd, "scenario1_kernel_initrd_backup_restore");
}

/// Scenario 2: the same job booted from the ISO as a CD-ROM on a BIOS machine.
#[test]
fn scenario2_iso_cdrom_bios_backup_restore() {
    backup_restore_via(
        Boot::IsoBiosCdrom,
        "scenario2_iso_cdrom_bios_backup_restore",
    );
}

/// Scenario 2, the other half of "hybrid": the ISO as a USB stick on a UEFI machine with Secure Boot
/// on (q35: AHCI, xHCI, usb-storage); the guest checks that its kernel saw Secure Boot enabled.
#[test]
fn scenario2_iso_usb_uefi_secure_boot_backup_restore() {
    backup_restore_via(
        Boot::IsoUefiUsb,
        "scenario2_iso_usb_uefi_secure_boot_backup_restore",
    );
}

/// No CAIRNRUN disk: the rescue system boots to a shell on the serial console, with the banner, cairn
/// on PATH, the sysadmin's tools beside it, the storage and filesystem drivers loaded, working
/// mkfs/mount for the usual filesystems (NTFS through ntfs-3g), and `cairn disks`.
#[test]
fn shell_boots_with_tools_and_drivers() {
    let test = "shell_boots_with_tools_and_drivers";
    if skip_vm(test) {
        return;
    }
    let scratch = Scratch::new(test);
    let dir = scratch.path();
    let scratch_disk = dir.join("scratch.img");
    blank(&scratch_disk, 512 * MIB);
    let vm = Vm::new(Boot::KernelInitrd, &dir.join("vm"))
        .disk(&scratch_disk, "scratch")
        .cmdline("cairn.autorun=0");
    let mut g = vm.spawn();
    let t0 = Instant::now();
    let at = g.wait_for("cairn-rescue:~# ", 0, Duration::from_secs(300));
    let to_shell = t0.elapsed();
    eprintln!("{test}: boot to shell prompt {to_shell:.1?} (qemu start to prompt, TCG)");
    let banner = g.serial();
    for line in ["back up:  cairn backup ", "restore:  cairn restore "] {
        assert!(
            banner.contains(line),
            "banner lacks {line:?}:\n{}",
            tail_lines(&banner, 30)
        );
    }

    // Markers are printed with $((...)) so that the echo of the typed command never matches.
    let tools = "cairn mount umount sfdisk fdisk sgdisk gdisk lsblk blkid wipefs partx mkfs.ext4 \
                 e2fsck resize2fs mkfs.vfat fsck.vfat mkfs.exfat mkfs.xfs xfs_repair mkfs.btrfs btrfs \
                 mkntfs ntfs-3g dmsetup smartctl hdparm nvme modprobe less vi";
    let modules = "virtio_blk nvme ahci sd_mod usb_storage uas mmc_block xhci_pci ext4 xfs vfat \
                   btrfs exfat dm_mod dm_flakey loop";
    g.send(&format!(
        "for t in {tools}; do case $(command -v $t) in /*) ;; *) echo MISSING-$((0))-TOOL $t;; esac; done; \
         for m in {modules}; do grep -q \"^$m \" /proc/modules || echo NOT-$((0))-LOADED $m; done; \
         echo TOOLS-CHECKED-$((6*7))\n"
    ));
    let at = g.wait_for("TOOLS-CHECKED-42", at, Duration::from_secs(120));
    g.send(
        "D=$(for d in /sys/block/vd*; do [ \"$(cat $d/serial)\" = scratch ] && echo /dev/${d##*/}; done); \
         for fs in ext4 vfat exfat xfs btrfs ntfs; do \
           case $fs in vfat) mkfs.vfat $D;; exfat) mkfs.exfat $D;; ntfs) mkntfs -Q -F $D;; *) mkfs.$fs -f $D 2>/dev/null || mkfs.$fs -F $D;; esac >/tmp/mkfs.log 2>&1 \
           && if [ $fs = ntfs ]; then ntfs-3g $D /mnt/target; else mount -t $fs $D /mnt/target; fi >>/tmp/mkfs.log 2>&1 \
           && echo hi > /mnt/target/x && umount /mnt/target \
           && echo FS-$((0))-OK-$fs || { echo FS-FAILED-$fs; cat /tmp/mkfs.log; }; done; \
         echo FS-CHECKED-$((6*7))\n",
    );
    let at = g.wait_for("FS-CHECKED-42", at, Duration::from_secs(300));
    g.send("cairn --version; cairn disks; echo VERSION-$((6*7)); poweroff\n");
    g.wait_for("VERSION-42", at, Duration::from_secs(60));
    let fin = g.wait_exit(Duration::from_secs(120));
    let out = &fin.serial[at..];
    let missing: Vec<&str> = fin
        .serial
        .lines()
        .filter(|l| l.contains("MISSING-0-TOOL ") || l.contains("NOT-0-LOADED "))
        .collect();
    assert!(
        missing.is_empty(),
        "tools or drivers missing in the rescue system:\n{}",
        missing.join("\n")
    );
    for fs in ["ext4", "vfat", "exfat", "xfs", "btrfs", "ntfs"] {
        assert!(
            fin.serial.contains(&format!("FS-0-OK-{fs}")),
            "mkfs/mount of {fs} failed in the rescue system:\n{}",
            tail_lines(&fin.serial, 60)
        );
    }
    assert!(out.contains("cairn "), "no cairn --version output:\n{out}");
    // `cairn disks` works without udev and shows the scratch disk by its serial.
    assert!(
        out.contains("vda") && out.contains("scratch"),
        "cairn disks does not list vda (serial scratch):\n{out}"
    );
}
