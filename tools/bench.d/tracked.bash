#!/usr/bin/env bash
# tools/bench --only scale, tracked part: what a tracked incremental of millions of scattered
# changed runs costs the backup. examples/fake_tracker.rs answers the backup's cut on the tracker
# socket as the real tracker would, claiming every other 4 KiB granule of the source changed;
# the source is a loop device over a sparse file, so reading it costs little and the backup's own
# bookkeeping shows. Each incremental is timed with GNU time (wall seconds, peak RSS), page cache
# dropped first. Prints table rows on stdout.
#
# Usage: tools/bench.d/tracked.bash CAIRN FAKE_TRACKER WORKDIR RUNS...
set -euo pipefail
CAIRN=$1 FAKE=$2 WORKDIR=$3; shift 3
DIR=$WORKDIR/tracked
rm -rf "$DIR"
mkdir -p "$DIR"
LOOP="" FAKE_PID=""
cleanup() {
    [[ -z $FAKE_PID ]] || kill "$FAKE_PID" 2>/dev/null || true
    if [[ -n $LOOP ]]; then partx -d "$LOOP" 2>/dev/null || true; losetup -d "$LOOP" || true; fi
    rm -rf "$DIR"
}
trap cleanup EXIT
log() { printf '[bench tracked %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

for RUNS in "$@"; do
    # Every other granule: the source holds twice as many granules as there are runs.
    SIZE=$(( RUNS * 2 * 4096 ))
    rm -rf "$DIR/repo" "$DIR/state" "$DIR/disk.img"
    truncate -s "$SIZE" "$DIR/disk.img"
    LOOP=$(losetup -f --show --direct-io=on "$DIR/disk.img")
    "$FAKE" "$DIR/state" "$RUNS" & FAKE_PID=$!
    for _ in $(seq 100); do [[ -S $DIR/state/tracker.sock ]] && break; sleep 0.1; done
    [[ -S $DIR/state/tracker.sock ]] || { echo "tools/bench: error: fake tracker did not start" >&2; exit 1; }
    export CAIRN_STATE_DIR=$DIR/state
    "$CAIRN" backup "$LOOP" "$DIR/repo" --name t --full -q
    sync; echo 3 > /proc/sys/vm/drop_caches
    if ! /usr/bin/time -f '%e %M' -o "$DIR/time.txt" "$CAIRN" backup "$LOOP" "$DIR/repo" --name t --json \
            > "$DIR/out.json" 2> "$DIR/err.txt"; then
        cat "$DIR/err.txt" >&2; echo "tools/bench: error: tracked backup of $RUNS runs failed" >&2; exit 1
    fi
    METHOD=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["method"])' "$DIR/out.json")
    [[ $METHOD == tracked ]] || { echo "tools/bench: error: the backup was $METHOD, not tracked" >&2; exit 1; }
    read -r wall rss < "$DIR/time.txt"
    printf '| tracked incremental, %s scattered runs (%s GiB source) | `cairn backup` | %s | %s |\n' \
        "$RUNS" "$(( SIZE >> 30 ))" "$wall" "$(( rss / 1024 ))"
    log "$RUNS runs: ${wall}s, $(( rss / 1024 )) MiB"
    kill "$FAKE_PID"; wait "$FAKE_PID" 2>/dev/null || true; FAKE_PID=""
    losetup -d "$LOOP"; LOOP=""
    unset CAIRN_STATE_DIR
done
