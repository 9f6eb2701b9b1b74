//! Scenario 3: incremental chains taken inside the guest, on the guest's kernel (Debian 12's 6.1,
//! not the host's): every restore point restored in the guest and compared with a hash of the
//! source taken when that point was captured.
//!
//! - `scenario3_incremental_chain`: no tracker: full, change, incremental, change, incremental
//!   (compare-scan), each point restored.
//! - `scenario3_tracker_torture_on_guest_kernel`: `cairn tracker run` in the guest under the
//!   tracker tests' kinds of writes (O_DIRECT through the whole disk, buffered unaligned, files
//!   created/overwritten/deleted, discard, write-zeroes, fallocate -z, writes racing the backup),
//!   rounds of incremental and differential images that must all be `tracked`: the tracker reads
//!   the 6.1 kernel's tracepoint formats, which differ from the host's.

use std::fmt::Write as _;

use crate::disks::*;
use crate::harness::*;
use crate::{cairnrun_disk, Scratch, RUN_TIMEOUT};

/// Shell helpers for the chain scenarios: the image id a backup step printed.
const CHAIN_PRELUDE: &str = r#"
SRC=$(disk src) || exit 1
REPO=$(disk repo) || exit 1
DST=$(disk dst) || exit 1
export SRC REPO DST
image_id() { sed -n 's/^ *"id": *"\([^"]*\)".*/\1/p' "steps/$1.out" | head -n 1; }
# Hashes read with O_DIRECT: a disk's page cache is not kept coherent with writes through its
# partitions (or with BLKZEROOUT/discard), so a buffered read could show stale bytes.
devhash() { dd if="$1" bs=1M iflag=direct status=none | sha256sum; }
# One hash per MiB, to say where a restore point differs.
mibhashes() {
    i=0
    n=$(($(blockdev --getsize64 "$1") / 1048576))
    while [ $i -lt $n ]; do
        echo "$i $(dd if="$1" bs=1M skip=$i count=1 iflag=direct status=none | sha256sum)"
        i=$((i + 1))
    done
}
step mount-repo mount -t ext4 "$REPO" /mnt/usb
"#;

/// Hash of a step that ran `sha256sum < dev`.
fn hash_of(ar: &Autorun, step: &str) -> String {
    let h = ar.step(step).out.split_whitespace().next().unwrap_or("");
    assert_eq!(
        h.len(),
        64,
        "step {step} printed no sha256: {:?}",
        ar.step(step).out
    );
    h.to_string()
}

struct Setup {
    _scratch: Scratch,
    src: SourceDisk,
    repo: std::path::PathBuf,
    dst: std::path::PathBuf,
    dir: std::path::PathBuf,
}

fn setup(test: &str) -> Setup {
    let scratch = Scratch::new(test);
    let dir = scratch.path().to_path_buf();
    let src = source_disk(&dir);
    let repo = dir.join("repo.img");
    ext4_image(&repo, 320 * MIB, "cairn-repo", None);
    // Same size as the source: every restore point is then exactly the source's bytes (a larger
    // disk gets a relocated GPT; scenario 1 covers that).
    let dst = dir.join("target.img");
    blank(&dst, src.size);
    Setup {
        _scratch: scratch,
        src,
        repo,
        dst,
        dir,
    }
}

fn boot(s: &Setup, body: &str, test: &str) -> Autorun {
    let run = cairnrun_disk(&s.dir, body);
    let vm = Vm::new(Boot::KernelInitrd, &s.dir.join("vm"))
        .disk(&s.src.path, "src")
        .disk(&s.repo, "repo")
        .disk(&s.dst, "dst")
        .disk(&run, "cairnrun");
    let finished = vm.run(RUN_TIMEOUT);
    eprintln!("{test}: guest ran {:.1?}", finished.elapsed);
    Autorun::read(&run, &s.dir.join("cairnrun"), &finished)
}

#[test]
fn scenario3_incremental_chain() {
    let test = "scenario3_incremental_chain";
    if skip_vm(test) {
        return;
    }
    let s = setup(test);
    let body = format!(
        r#"{CHAIN_PRELUDE}
step full cairn backup "$SRC" /mnt/usb/repo --name chain --full --json
step hash0 devhash "$SRC"
step change1 sh -c "mount -t ext4 ${{SRC}}1 /mnt/target && dd if=/dev/urandom of=/mnt/target/new1.bin bs=64k count=40 && rm /mnt/target/data/text.txt && echo more >> /mnt/target/hello.txt && umount /mnt/target"
step incr1 cairn backup "$SRC" /mnt/usb/repo --name chain --incremental --json
step hash1 devhash "$SRC"
step change2 sh -c "mount -t vfat ${{SRC}}2 /mnt/target && dd if=/dev/urandom of=/mnt/target/new2.bin bs=64k count=24 && rm /mnt/target/random.bin && umount /mnt/target && dd if=/dev/urandom of=${{SRC}}1 bs=4096 seek=2000 count=3 conv=notrunc"
step incr2 cairn backup "$SRC" /mnt/usb/repo --name chain --incremental --json
step hash2 devhash "$SRC"
step verify cairn verify /mnt/usb/repo --json
step list cairn list /mnt/usb/repo --json
step restore0 sh -c "cairn restore /mnt/usb/repo $DST --image $(image_id full) --yes --json"
step restored-hash0 devhash "$DST"
step restore1 sh -c "cairn restore /mnt/usb/repo $DST --image $(image_id incr1) --yes --json"
step restored-hash1 devhash "$DST"
step restore2 sh -c "cairn restore /mnt/usb/repo $DST --image $(image_id incr2) --yes --json"
step restored-hash2 devhash "$DST"
step umount-repo umount /mnt/usb
"#
    );
    let ar = boot(&s, &body, test);
    let mut steps = vec!["mount-repo", "full", "hash0", "change1", "incr1", "hash1"];
    steps.extend(["change2", "incr2", "hash2", "verify", "list"]);
    steps.extend(["restore0", "restored-hash0", "restore1", "restored-hash1"]);
    steps.extend(["restore2", "restored-hash2", "umount-repo"]);
    ar.assert_ok(&steps);
    let full = ar.json("full");
    let mut parent = full["id"].as_str().unwrap().to_string();
    for n in 1..=2 {
        let b = ar.json(&format!("incr{n}"));
        assert_eq!(b["kind"], "incremental", "incr{n} JSON: {b}");
        // No tracker runs in this guest: changes are found by comparing with the chain.
        assert_eq!(b["method"], "compare-scan", "incr{n} JSON: {b}");
        let l = ar.json("list");
        let me = l
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == b["id"])
            .unwrap_or_else(|| panic!("incr{n} not in list: {l}"));
        assert_eq!(
            me["parent"], parent,
            "incr{n}'s parent is not the previous image: {me}"
        );
        parent = b["id"].as_str().unwrap().to_string();
    }
    for n in 0..=2 {
        assert_eq!(
            hash_of(&ar, &format!("restored-hash{n}")),
            hash_of(&ar, &format!("hash{n}")),
            "restore point {n} does not restore the state it captured"
        );
    }
    assert_ne!(hash_of(&ar, "hash0"), hash_of(&ar, "hash1"));
    assert_ne!(hash_of(&ar, "hash1"), hash_of(&ar, "hash2"));
    assert_eq!(ar.json("verify")["ok"], true);
    // The newest point is on dst: the source disk as the guest left it.
    assert_eq!(
        first_difference(&s.src.path, &s.dst, s.src.size),
        None,
        "the newest restore point differs from the final source disk"
    );
}

// ---------------------------------------------------------------------------------------------------
// The tracker torture, in the guest
// ---------------------------------------------------------------------------------------------------

/// Seed and rounds of the guest torture; the seed is one whose plan uses every kind of write
/// (checked by `scenario3_torture_plan_covers_every_kind_of_write`).
const TORTURE_SEED: u64 = 1;
const TORTURE_ROUNDS: u64 = 6;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One round's plan: shell commands (each one guest step), the backup kind, and whether writes race
/// the backup (the point is then not compared: its content is whatever the backup caught).
struct Round {
    ops: Vec<String>,
    kind: &'static str,
    racing: Option<String>,
}

/// The torture's rounds. The source disk (64 MiB): p1 ext4 at 1..37 MiB, mounted at /mnt/target;
/// p2 (20 MiB at 37..57 MiB) used raw, its vfat scribbled over; 57..62 MiB written through the
/// whole disk only.
fn plan(seed: u64, rounds: u64) -> Vec<Round> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut files: Vec<(String, u64)> = Vec::new();
    let mut out = Vec::new();
    for round in 0..rounds {
        let mut ops = Vec::new();
        let mut racing = None;
        if round > 0 {
            for op in 0..(3 + rng.below(5)) {
                match rng.below(8) {
                    0 => {
                        let off = 57 * MIB + rng.below(5 * MIB / 4096) * 4096;
                        let n = 1 + rng.below(16);
                        ops.push(format!(
                            "dd if=/dev/urandom of=$SRC bs=4096 count={n} seek={} oflag=direct \
                             conv=notrunc status=none",
                            off / 4096
                        ));
                    }
                    1 => {
                        let off = 1 + rng.below(19 * MIB);
                        let len = 1 + rng.below(20000);
                        ops.push(format!(
                            "dd if=/dev/urandom of=${{SRC}}2 bs={len} count=1 iflag=fullblock \
                             seek={off} oflag=seek_bytes conv=notrunc status=none && sync"
                        ));
                    }
                    2 => {
                        let name = format!("/mnt/target/f{round}-{op}.dat");
                        let len = 1 + rng.below(MIB);
                        ops.push(format!(
                            "dd if=/dev/urandom of={name} bs={len} count=1 iflag=fullblock status=none"
                        ));
                        files.push((name, len));
                    }
                    3 => {
                        if files.is_empty() {
                            continue;
                        }
                        let i = rng.below(files.len() as u64) as usize;
                        let (name, len) = files[i].clone();
                        if rng.below(3) == 0 {
                            ops.push(format!("rm {name}"));
                            files.remove(i);
                        } else {
                            let at = rng.below(len);
                            ops.push(format!(
                                "dd if=/dev/urandom of={name} bs=5000 count=1 seek={at} \
                                 oflag=seek_bytes conv=notrunc status=none"
                            ));
                            files[i].1 = len.max(at + 5000);
                        }
                    }
                    4 => {
                        let off = rng.below(19 * MIB / 65536) * 65536;
                        let len = 65536 * (1 + rng.below(8));
                        ops.push(format!("blkdiscard -o {off} -l {len} ${{SRC}}2"));
                    }
                    5 => {
                        let off = rng.below(19 * MIB / 4096) * 4096;
                        let len = 4096 * (1 + rng.below(64));
                        ops.push(format!("blkdiscard -z -o {off} -l {len} ${{SRC}}2"));
                    }
                    6 => {
                        if let Some((name, len)) = files.first() {
                            if *len > 8192 {
                                ops.push(format!("fallocate -z -o 4096 -l {} {name}", len / 2));
                            }
                        }
                    }
                    _ => {
                        let start = rng.below(12) * MIB;
                        racing = Some(format!(
                            "i=0; while [ $i -lt 64 ]; do dd if=/dev/urandom of=${{SRC}}2 bs=65536 \
                             count=1 seek=$(({start} / 65536 + i)) oflag=direct conv=notrunc \
                             status=none; i=$((i + 1)); done"
                        ));
                    }
                }
            }
        }
        let kind = match (round, rng.below(3)) {
            (0, _) => "--full",
            (_, 0) => "--differential",
            _ => "--incremental",
        };
        out.push(Round { ops, kind, racing });
    }
    out
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[test]
fn scenario3_tracker_torture_on_guest_kernel() {
    let test = "scenario3_tracker_torture_on_guest_kernel";
    if skip_vm(test) {
        return;
    }
    let s = setup(test);
    let rounds = plan(TORTURE_SEED, TORTURE_ROUNDS);
    let mut body = String::from(CHAIN_PRELUDE);
    body.push_str(
        r#"export CAIRN_STATE_DIR=/run/cairn-state
step tracefs-format cat /sys/kernel/tracing/events/block/block_rq_complete/format
cairn tracker run "$SRC" --interval-ms 20 >/run/tracker.log 2>&1 &
TRACKER=$!
n=0
until cairn tracker status --json 2>/dev/null | grep -q '"running": *true'; do
    n=$((n + 1))
    if [ $n -gt 600 ] || ! kill -0 $TRACKER 2>/dev/null; then
        echo "the tracker did not come up:"; cat /run/tracker.log; exit 1
    fi
    sleep 0.1
done
step tracker-up cairn tracker status --json
step mount-src mount -t ext4 "${SRC}1" /mnt/target
"#,
    );
    for (r, round) in rounds.iter().enumerate() {
        for (i, op) in round.ops.iter().enumerate() {
            let _ = writeln!(body, "step op{r}-{i} sh -c {}", sh_quote(op));
        }
        let _ = writeln!(body, "step sync{r} sync");
        let _ = writeln!(body, "step freeze{r} fsfreeze -f /mnt/target");
        if let Some(race) = &round.racing {
            let _ = writeln!(body, "sh -c {} & RACE=$!", sh_quote(race));
        }
        let _ = writeln!(
            body,
            "step backup{r} cairn backup \"$SRC\" /mnt/usb/repo --name disk --json {}",
            round.kind
        );
        if round.racing.is_some() {
            let _ = writeln!(body, "wait $RACE");
        } else {
            let _ = writeln!(body, "step hash{r} devhash \"$SRC\"");
            let _ = writeln!(body, "note map{r} mibhashes \"$SRC\"");
        }
        let _ = writeln!(body, "step unfreeze{r} fsfreeze -u /mnt/target");
    }
    body.push_str(
        r#"step umount-src umount /mnt/target
step tracker-status cairn tracker status --json
kill -TERM $TRACKER
step tracker-stop wait $TRACKER
note tracker-log cat /run/tracker.log
step verify cairn verify /mnt/usb/repo --json
step list cairn list /mnt/usb/repo --json
"#,
    );
    for (r, round) in rounds.iter().enumerate() {
        if round.racing.is_none() {
            let _ = writeln!(
                body,
                "step restore{r} sh -c \"cairn restore /mnt/usb/repo $DST --image $(image_id backup{r}) --yes --json\"\n\
                 step restored-hash{r} devhash \"$DST\"\n\
                 note restored-map{r} mibhashes \"$DST\""
            );
        }
    }
    body.push_str("step umount-repo umount /mnt/usb\n");

    let ar = boot(&s, &body, test);
    let mut names: Vec<String> = ["mount-repo", "tracefs-format", "tracker-up", "mount-src"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for (r, round) in rounds.iter().enumerate() {
        names.extend((0..round.ops.len()).map(|i| format!("op{r}-{i}")));
        names.extend([
            format!("sync{r}"),
            format!("freeze{r}"),
            format!("backup{r}"),
        ]);
        if round.racing.is_none() {
            names.push(format!("hash{r}"));
        }
        names.push(format!("unfreeze{r}"));
    }
    names.extend(
        [
            "umount-src",
            "tracker-status",
            "tracker-stop",
            "verify",
            "list",
        ]
        .map(String::from),
    );
    for (r, round) in rounds.iter().enumerate() {
        if round.racing.is_none() {
            names.extend([format!("restore{r}"), format!("restored-hash{r}")]);
        }
    }
    names.push("umount-repo".into());
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    ar.assert_ok(&refs);

    let mut checked = 0;
    for (r, round) in rounds.iter().enumerate() {
        let b = ar.json(&format!("backup{r}"));
        let kind = round.kind.trim_start_matches("--");
        assert_eq!(b["kind"], kind, "round {r}: {b}");
        if r > 0 {
            assert_eq!(
                b["method"],
                "tracked",
                "round {r}: the tracker on the guest's kernel did not track (ops: {:?}); \
                 tracefs format:\n{}\ntracker log:\n{}",
                round.ops,
                ar.step("tracefs-format").out,
                ar.steps
                    .get("tracker-log")
                    .map(|s| s.err.clone() + &s.out)
                    .unwrap_or_default()
            );
        }
        if round.racing.is_none() {
            let (truth, got) = (
                ar.step(&format!("map{r}")).out.clone(),
                ar.step(&format!("restored-map{r}")).out.clone(),
            );
            let differ: Vec<&str> = truth
                .lines()
                .zip(got.lines())
                .filter(|(a, b)| a != b)
                .map(|(a, _)| a.split_whitespace().next().unwrap_or("?"))
                .collect();
            assert_eq!(
                hash_of(&ar, &format!("restored-hash{r}")),
                hash_of(&ar, &format!("hash{r}")),
                "round {r} ({kind}, ops {:?}) does not restore the state it captured; MiB that \
                 differ: {differ:?}\nbackup JSON: {b}",
                round.ops
            );
            checked += 1;
        }
    }
    assert!(
        checked >= rounds.len() / 2,
        "too few restore points checked"
    );
    assert_eq!(ar.json("verify")["ok"], true);
}

/// The plan uses every kind of write at least once over its rounds (else the seed is a poor one).
#[test]
fn scenario3_torture_plan_covers_every_kind_of_write() {
    let rounds = plan(TORTURE_SEED, TORTURE_ROUNDS);
    let all: Vec<&String> = rounds.iter().flat_map(|r| r.ops.iter()).collect();
    for needle in [
        "oflag=direct",
        "&& sync",
        "/mnt/target/f",
        "blkdiscard -o",
        "blkdiscard -z",
        "fallocate -z",
    ] {
        assert!(
            all.iter().any(|o| o.contains(needle)),
            "the seed has no `{needle}` write: {all:#?}"
        );
    }
    assert!(
        rounds.iter().any(|r| r.racing.is_some()),
        "the seed has no writes racing a backup"
    );
    assert!(rounds.iter().any(|r| r.kind == "--differential"));
    assert!(rounds.iter().skip(1).any(|r| r.kind == "--incremental"));
}
