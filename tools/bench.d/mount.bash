#!/usr/bin/env bash
# tools/bench --only mount: what exploring a restore point with `cairn mount` costs, on the bench
# image (the cached ext4 test disk of tools/bench, imaged once with `cairn backup --full`).
#
#   1. cairn restore of the image onto a direct-I/O loop device (compared with the image's
#      sha256): the reference throughput;
#   2. time from `cairn mount --background` to the first byte readable: of DIR/disk (--raw), and
#      of a file in the mounted filesystem (DIR/fs: the bench image has no partition table, so its
#      ext4 is DIR/fs, loop-mounted from DIR/disk);
#   3. reading the image's largest file through DIR/fs, and the whole DIR/disk (--raw), with cat
#      to /dev/null: MB/s against the restore's;
#   4. reading 1,000 small files (the first 1,000 of text/ in sorted order) through DIR/fs.
#
# Every measurement runs on a fresh mount (so cairn's own block cache starts empty) with the page
# cache dropped after mounting, is timed with GNU time, and records the serving process's peak RSS
# (VmHWM from /proc/PID/status, read just before `cairn umount`). Prints a Markdown table.
#
# Usage: tools/bench.d/mount.bash CAIRN IMAGE WORKDIR   (tools/bench --only mount)
set -euo pipefail
CAIRN=$1 IMG=$2 WORKDIR=$3
DIR=$WORKDIR/mount
REPO=$DIR/repo
VIEW=$DIR/view
SIZE=$(stat -c %s -- "$IMG")
CAIRN_VERSION=$("$CAIRN" --version)
CAIRN_VERSION=${CAIRN_VERSION%%$'\n'*}
LOOP=""
rm -rf -- "$DIR"
mkdir -p -- "$DIR" "$VIEW"
cleanup() {
    set +e
    if grep -q " $VIEW " /proc/self/mountinfo; then "$CAIRN" umount "$VIEW" >/dev/null; fi
    [[ -z $LOOP ]] || losetup -d "$LOOP"
    rm -rf -- "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log() { printf '[bench mount %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { printf 'tools/bench: error: %s\n' "$*" >&2; exit 1; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
mb() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1e6 }'; }
mbps() { awk -v b="$1" -v w="$2" 'BEGIN { if (w > 0) printf "%.1f", b / 1e6 / w; else print "inf" }'; }

ROWS=()
SERVER_PID=""
# mount_view [--raw]: a background mount of the image at VIEW; sets SERVER_PID.
mount_view() {
    "$CAIRN" mount "$REPO" "$VIEW" --background --json "$@" > "$DIR/mount.json" \
        || die "cairn mount $* failed"
    SERVER_PID=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$DIR/mount.json")
}
# server_rss_mib: the serving process's peak RSS so far.
server_rss_mib() { awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$SERVER_PID/status"; }
umount_view() {
    "$CAIRN" umount "$VIEW" > /dev/null || die "cairn umount failed"
    if grep -q " $VIEW" /proc/self/mountinfo; then die "cairn umount left a mount below $VIEW"; fi
    if [[ $(losetup -a) == *"$VIEW"* ]]; then die "cairn umount left a loop device reading $VIEW"; fi
}
# timed LABEL BYTES CMD: one row (wall time, MB/s of BYTES, the server's peak RSS); CMD runs in
# bash against the mounted view. The wall time is left in LAST_WALL.
LAST_WALL=""
timed() {
    local label=$1 bytes=$2 cmd=$3 wall
    drop_caches
    /usr/bin/time -f '%e' -o "$DIR/time.txt" bash -c "set -euo pipefail; $cmd" > /dev/null \
        2> "$DIR/err.txt" || { cat "$DIR/err.txt" >&2; die "'$label' failed: $cmd"; }
    wall=$(tail -n 1 "$DIR/time.txt")
    ROWS+=("| $label | \`${cmd//|/\\|}\` | $wall | $(mb "$bytes") | $(mbps "$bytes" "$wall") | $(server_rss_mib) |")
    log "$label: ${wall}s, $(mbps "$bytes" "$wall") MB/s, server peak RSS $(server_rss_mib) MiB"
    LAST_WALL=$wall
}

log "imaging $IMG (cairn backup --full)"
"$CAIRN" backup "$IMG" "$REPO" --full --name bench -q

log "reference: cairn restore onto a direct-I/O loop device"
truncate -s "$SIZE" -- "$DIR/target.img"
LOOP=$(losetup --find --show --direct-io=on -- "$DIR/target.img")
drop_caches
/usr/bin/time -f '%e %M' -o "$DIR/time.txt" "$CAIRN" restore "$REPO" "$LOOP" --yes -q \
    || die "cairn restore failed"
read -r RESTORE_WALL RESTORE_RSS < "$DIR/time.txt"
[[ $(sha256sum < "$LOOP" | cut -d' ' -f1) == $(cat -- "$IMG.sha256") ]] \
    || die "the restored device differs from the image"
losetup -d "$LOOP"; LOOP=""
rm -f -- "$DIR/target.img"
RESTORE_MBPS=$(mbps "$SIZE" "$RESTORE_WALL")
log "restore: ${RESTORE_WALL}s, $RESTORE_MBPS MB/s (restore OK)"

# Time to first byte: the mount and the first read in one timed command, page cache dropped first.
ready_row() { # ready_row LABEL READ [MOUNT ARGS...]
    local label=$1 read=$2 wall rss; shift 2
    drop_caches
    # shellcheck disable=SC2016  # expanded by the inner bash, from its arguments
    /usr/bin/time -f '%e' -o "$DIR/time.txt" bash -c '
        "$1" mount "$2" "$3" --background --json "${@:5}" > "$3.json" && head -c 1 -- "$3/$4"' \
        _ "$CAIRN" "$REPO" "$VIEW" "$read" "$@" > /dev/null 2> "$DIR/err.txt" \
        || { cat "$DIR/err.txt" >&2; die "$label failed"; }
    mv -- "$VIEW.json" "$DIR/mount.json"
    SERVER_PID=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$DIR/mount.json")
    wall=$(tail -n 1 "$DIR/time.txt")
    rss=$(server_rss_mib)
    ROWS+=("| $label | \`cairn mount${*:+ $*} && head -c 1 DIR/$read\` | $wall | — | — | $rss |")
    log "$label: ${wall}s, server peak RSS $rss MiB"
    umount_view
}

ready_row "mount to first byte of DIR/disk" disk --raw
mount_view
FS=$VIEW/fs
[[ -d $FS/text ]] || die "the bench image's filesystem is not mounted at $FS: $(cat "$DIR/mount.json")"
read -r BIG_BYTES BIG < <(find "$FS" -xdev -type f -printf '%s %p\n' | sort -n | tail -n 1)
SMALL_LIST=$DIR/small-files.txt
find "$FS/text" -type f | LC_ALL=C sort | awk 'NR <= 1000' > "$SMALL_LIST"
SMALL_N=$(wc -l < "$SMALL_LIST")
[[ $SMALL_N -eq 1000 ]] || die "the bench image has only $SMALL_N files under text/"
SMALL_BYTES=$(tr '\n' '\0' < "$SMALL_LIST" | du -cb --files0-from=- | tail -n 1 | cut -f1)
umount_view
ready_row "mount to first byte of a file in DIR/fs" "fs/${BIG#"$FS"/}"

mount_view
timed "read the largest file through DIR/fs" "$BIG_BYTES" "cat -- '$BIG'"
BIG_WALL=$LAST_WALL
umount_view
mount_view --raw
timed "read the whole DIR/disk (--raw)" "$SIZE" "cat -- '$VIEW/disk'"
DISK_WALL=$LAST_WALL
umount_view
mount_view
timed "read 1,000 small files through DIR/fs" "$SMALL_BYTES" \
    "tr '\\n' '\\0' < '$SMALL_LIST' | xargs -0 cat --"
umount_view

BIG_SHARE=$(awk -v a="$(mbps "$BIG_BYTES" "$BIG_WALL")" -v b="$RESTORE_MBPS" 'BEGIN { printf "%.0f", 100 * a / b }')
DISK_SHARE=$(awk -v a="$(mbps "$SIZE" "$DISK_WALL")" -v b="$RESTORE_MBPS" 'BEGIN { printf "%.0f", 100 * a / b }')

echo
echo "#### Exploring a restore point (\`tools/bench --only mount\`, measured $(date -u +%F))"
echo
echo "The bench image ($(( SIZE >> 20 )) MiB ext4, no partition table: its filesystem is DIR/fs) imaged with \`cairn backup --full\`. Each read runs on a fresh \`cairn mount --background\` with the page cache dropped; \"server peak RSS\" is the serving process's VmHWM. Largest file: ${BIG#"$FS"/} ($(mb "$BIG_BYTES") MB); small files: the first 1,000 of text/ ($(mb "$SMALL_BYTES") MB). Host: $(nproc) cores, $(free -g | awk '/^Mem:/{print $2}') GiB RAM, Linux $(uname -r), $CAIRN_VERSION."
echo
echo "| step | command | wall time (s) | bytes (MB) | throughput (MB/s) | server peak RSS (MiB) |"
echo "|---|---|---:|---:|---:|---:|"
echo "| restore (reference) | \`cairn restore REPO DEV --yes\` | $RESTORE_WALL | $(mb "$SIZE") | $RESTORE_MBPS | $(( RESTORE_RSS / 1024 )) (cairn restore) |"
ROWS=("${ROWS[@]//$VIEW/DIR}")
printf '%s\n' "${ROWS[@]//$DIR\//}"
echo
echo "| ratio | value |"
echo "|---|---:|"
echo "| largest file through DIR/fs / cairn restore | $BIG_SHARE% |"
echo "| whole DIR/disk / cairn restore | $DISK_SHARE% |"
