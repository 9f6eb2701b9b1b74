//! A failing disk, in the guest: device-mapper's `error` (or an always-down `flakey`) target over
//! the source disk makes two small ranges unreadable. `cairn backup` must narrow the read errors
//! down to those sectors, store them as zeros, finish and exit 3; `cairn badmap` lists exactly
//! those ranges, `cairn verify` calls the image intact-with-bad-sectors, and a restore gives back
//! the source with the two ranges zeroed (checked on the host, byte for byte).

use crate::disks::*;
use crate::harness::*;
use crate::{cairnrun_disk, Scratch, RUN_TIMEOUT};

const SRC_SIZE: u64 = 64 * MIB;
/// The unreadable ranges, in 512-byte sectors: (start, count).
const ERROR_SECTORS: [(u64, u64); 2] = [(20480, 8), (65536, 8)];

/// A dm table mapping the source linearly except `ERROR_SECTORS`, which map to the segment
/// `bad(start, count)` returns (target and arguments, without the leading `<start> <len>`).
fn dm_table(bad: impl Fn(u64, u64) -> String) -> String {
    let total = SRC_SIZE / 512;
    let mut table = String::new();
    let mut at = 0;
    for (start, count) in ERROR_SECTORS {
        if start > at {
            table.push_str(&format!("{at} {} linear $SRC {at}\\n", start - at));
        }
        table.push_str(&format!("{start} {count} {}\\n", bad(start, count)));
        at = start + count;
    }
    if at < total {
        table.push_str(&format!("{at} {} linear $SRC {at}\\n", total - at));
    }
    table
}

#[test]
fn failing_disk_dm_error_backup_restore() {
    failing_disk_backup_restore("failing_disk_dm_error_backup_restore", |_, _| {
        "error".to_string()
    });
}

/// The same with device-mapper's `flakey` target, permanently in its down interval (up 0 s, down
/// 1 s). Without features a down flakey device fails every read and write (Linux 6.1; the
/// `error_reads` feature only exists from 6.5 on and older kernels reject it).
#[test]
fn failing_disk_dm_flakey_backup_restore() {
    failing_disk_backup_restore("failing_disk_dm_flakey_backup_restore", |start, _| {
        format!("flakey $SRC {start} 0 1")
    });
}

/// Boots the rescue image with a dm device over the source whose `ERROR_SECTORS` map to the
/// segments `bad` gives, runs backup, badmap, verify and restore there and checks the results.
fn failing_disk_backup_restore(test: &str, bad: impl Fn(u64, u64) -> String) {
    if skip_vm(test) {
        return;
    }
    let scratch = Scratch::new(test);
    let dir = scratch.path();
    let data = pseudo_random(SRC_SIZE as usize, 0xBAD5EC7);
    let src = dir.join("source.img");
    std::fs::write(&src, &data).unwrap();
    let src_hash = blake3_file(&src);
    let repo = dir.join("repo.img");
    ext4_image(&repo, 160 * MIB, "cairn-repo", None);
    let dst = dir.join("target.img");
    blank(&dst, SRC_SIZE);

    // Without udev, dmsetup makes the /dev/mapper node itself (--noudevsync: nobody to wait for).
    let body = format!(
        r#"
SRC=$(disk src) || exit 1
REPO=$(disk repo) || exit 1
DST=$(disk dst) || exit 1
note info sh -c 'uname -r; cairn --version; grep -E "^dm_" /proc/modules; dmsetup targets'
step dm-create sh -c "printf '{table}' | dmsetup create flaky --noudevsync"
step dm-nodes dmsetup mknodes flaky
note dm-table dmsetup table flaky
step mount-repo mount -t ext4 "$REPO" /mnt/usb
note backup cairn backup /dev/mapper/flaky /mnt/usb/repo --name failing --json
step badmap cairn badmap /mnt/usb/repo
step verify cairn verify /mnt/usb/repo --json
step restore cairn restore /mnt/usb/repo "$DST" --yes
step umount-repo umount /mnt/usb
step dm-remove dmsetup remove --noudevsync flaky
"#,
        table = dm_table(bad)
    );
    let run = cairnrun_disk(dir, &body);
    let vm = Vm::new(Boot::KernelInitrd, &dir.join("vm"))
        .disk(&src, "src")
        .disk(&repo, "repo")
        .disk(&dst, "dst")
        .disk(&run, "cairnrun");
    let finished = vm.run(RUN_TIMEOUT);
    eprintln!("{test}: guest ran {:.1?}", finished.elapsed);
    let ar = Autorun::read(&run, &dir.join("cairnrun"), &finished);

    // The backup finished with status 3 (complete, with unreadable sectors).
    let b = ar.step("backup");
    assert_eq!(
        b.rc,
        Some(3),
        "cairn backup of the failing disk: exit {:?}, expected 3\n--- stdout ---\n{}\n--- stderr \
         ---\n{}\n--- autorun.log ---\n{}",
        b.rc,
        b.out,
        b.err,
        ar.log
    );
    ar.assert_ok(&[
        "dm-create",
        "dm-nodes",
        "mount-repo",
        "badmap",
        "verify",
        "restore",
        "umount-repo",
        "dm-remove",
    ]);
    let bad: Vec<(u64, u64)> = ERROR_SECTORS
        .iter()
        .map(|&(s, n)| (s * 512, n * 512))
        .collect();
    let b = ar.json("backup");
    assert_eq!(b["source_size"], SRC_SIZE, "backup JSON: {b}");
    let ranges: Vec<(u64, u64)> = b["bad_ranges"]
        .as_array()
        .unwrap_or_else(|| panic!("backup JSON has no bad_ranges: {b}"))
        .iter()
        .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
        .collect();
    assert_eq!(ranges, bad, "bad_ranges in the backup JSON: {b}");
    assert_eq!(
        b["bad_bytes"],
        bad.iter().map(|r| r.1).sum::<u64>(),
        "backup JSON: {b}"
    );

    // badmap: a ddrescue mapfile with exactly the two ranges bad.
    let map = &ar.step("badmap").out;
    // Data lines are "pos size status"; the current_pos line's third field is the pass number.
    let rows: Vec<Vec<&str>> = map
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() == 3 && (f[2] == "+" || f[2] == "-"))
        .collect();
    let minus: Vec<String> = rows
        .iter()
        .filter(|f| f[2] == "-")
        .map(|f| f.join(" "))
        .collect();
    let want: Vec<String> = bad
        .iter()
        .map(|(o, l)| format!("0x{o:08X} 0x{l:08X} -"))
        .collect();
    assert_eq!(minus, want, "cairn badmap:\n{map}");
    // The good stretches before, between and after the bad ranges.
    let plus = rows.iter().filter(|f| f[2] == "+").count();
    assert_eq!(plus, 3, "cairn badmap:\n{map}");

    let v = ar.json("verify");
    assert_eq!(v["ok"], true, "verify JSON: {v}");
    let images = v["images"].as_array().expect("verify JSON has images");
    assert_eq!(images.len(), 1, "verify JSON: {v}");
    assert_eq!(
        images[0]["status"], "intact-with-bad-sectors",
        "verify JSON: {v}"
    );
    assert_eq!(images[0]["id"], b["id"], "verify JSON: {v}");

    // The disks, on the host.
    assert_eq!(
        blake3_file(&src),
        src_hash,
        "the guest changed the source disk"
    );
    let mut expected = data;
    for &(o, l) in &bad {
        expected[o as usize..(o + l) as usize].fill(0);
    }
    let got = std::fs::read(&dst).unwrap();
    assert_eq!(
        got.len() as u64,
        SRC_SIZE,
        "the target disk file changed size"
    );
    if let Some(i) = got.iter().zip(&expected).position(|(a, b)| a != b) {
        panic!(
            "the restored disk differs from the source with the bad ranges zeroed, first at byte \
             {i} (bad ranges {bad:?})"
        );
    }
}
