#!/usr/bin/env bash
# tools/bench --only scale: what cairn costs on a 16 TiB disk and in a repository of 10,000 images,
# without reading 16 TiB or running 10,000 backups. Synthetic images are written by
# examples/synth_image.rs through cairn's own repository writer; every cairn command below is the
# real binary, timed with GNU time (wall seconds, peak RSS), page cache dropped before each.
#
#   1. synth_image huge 16T: one full image whose 16,777,216 blocks each have an index entry (kind
#      zero, so nothing is stored): the 1.2 GB index is written and then read back by
#   2. cairn verify, cairn list, cairn show and cairn restore onto a sparse file on tmpfs (the
#      restore walks the whole plan and writes nothing: every block is zero);
#   3. synth_image many 10000: 10,000 full images of a 64 KiB source, then cairn list, a real
#      cairn backup of a 64 KiB file into that repository, cairn restore of it (compared), and
#      cairn verify --image of it;
#   4. synth_image chain 1000: one chain of 1,000 images of a 64 KiB source (a full, then 999
#      incrementals, each the child of the one before), then cairn verify of the whole repository
#      (1,000 restore points, each depending on every image before it) and cairn verify --image of
#      the newest point;
#   5. tracked.bash: tracked incrementals of 100,000, 1,000,000 and 4,000,000 scattered changed
#      runs, answered by examples/fake_tracker.rs on the tracker socket (peak RSS must not follow
#      the number of runs).
#
# Usage: tools/bench.d/scale.bash CAIRN SYNTH FAKE_TRACKER WORKDIR   (tools/bench --only scale)
set -euo pipefail
CAIRN=$1 SYNTH=$2 FAKE_TRACKER=$3 WORKDIR=$4
DIR=$WORKDIR/scale
TMPFS_TARGET=/dev/shm/cairn-bench-scale.img
rm -rf "$DIR"
mkdir -p "$DIR"
cleanup() { rm -rf "$DIR" "$TMPFS_TARGET"; }
trap cleanup EXIT

log() { printf '[bench scale %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
ROWS=()
# timed LABEL CMD...: one table row with wall time and peak RSS; fails the bench if CMD fails.
timed() {
    local label=$1; shift
    sync; echo 3 > /proc/sys/vm/drop_caches
    local t=$DIR/time.txt
    if ! /usr/bin/time -f '%e %M' -o "$t" "$@" > "$DIR/out.txt" 2> "$DIR/err.txt"; then
        cat "$DIR/err.txt" >&2
        echo "tools/bench: error: '$label' failed" >&2
        exit 1
    fi
    local wall rss
    read -r wall rss < "$t"
    ROWS+=("| $label | \`${*##*/}\` | $wall | $(( rss / 1024 )) |")
    log "$label: ${wall}s, $(( rss / 1024 )) MiB"
}

log "16 TiB: synthetic index of 16,777,216 entries"
timed "write the index (synth_image)" "$SYNTH" "$DIR/huge" huge 16T
INDEX_BYTES=$(stat -c %s "$DIR"/huge/images/*/index)
timed "verify (reads and checks the whole index)" "$CAIRN" verify "$DIR/huge" -q
timed "list" "$CAIRN" list "$DIR/huge"
timed "show" "$CAIRN" show "$DIR/huge"
rm -f "$TMPFS_TARGET"
timed "restore (plans all 16.8 M blocks)" "$CAIRN" restore "$DIR/huge" "$TMPFS_TARGET" --yes -q
rm -f "$TMPFS_TARGET"
rm -rf "$DIR/huge"

log "10,000 images"
timed "write 10,000 images (synth_image)" "$SYNTH" "$DIR/many" many 10000
head -c 65536 /dev/urandom > "$DIR/small.img"
timed "list (10,000 images)" "$CAIRN" list "$DIR/many"
timed "backup a 64 KiB file (the 10,001st image)" "$CAIRN" backup "$DIR/small.img" "$DIR/many" --name many -q
timed "restore it" "$CAIRN" restore "$DIR/many" "$DIR/out.img" --name many --yes -q
cmp "$DIR/small.img" "$DIR/out.img" || { echo "tools/bench: error: restore MISMATCH" >&2; exit 1; }
ID=$("$CAIRN" list "$DIR/many" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])')
timed "verify --image it" "$CAIRN" verify "$DIR/many" --image "$ID" -q
rm -rf "$DIR/many"

log "a chain of 1,000 images"
timed "write a chain of 1,000 images (synth_image)" "$SYNTH" "$DIR/chain" chain 1000
timed "verify the chain (1,000 points)" "$CAIRN" verify "$DIR/chain" -q
NEWEST=$("$CAIRN" list "$DIR/chain" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])')
timed "verify --image its newest point" "$CAIRN" verify "$DIR/chain" --image "$NEWEST" -q

log "tracked incrementals of many scattered runs"
while IFS= read -r row; do ROWS+=("$row"); done < <(
    "$(dirname -- "${BASH_SOURCE[0]}")/tracked.bash" "$CAIRN" "$FAKE_TRACKER" "$DIR" 100000 1000000 4000000)

echo
echo "#### Scale (\`tools/bench --only scale\`, measured $(date -u +%F))"
echo
echo "Synthetic 16 TiB image: 16,777,216 index entries, index file $INDEX_BYTES bytes; a repository of 10,000 images; a chain of 1,000 images of a 64 KiB source; tracked incrementals whose runs come from a stand-in tracker (examples/fake_tracker.rs) over a sparse loop device. Page cache dropped before each command. Host: $(nproc) cores, $(free -g | awk '/^Mem:/{print $2}') GiB RAM, Linux $(uname -r)."
echo
echo "| step | command | wall time (s) | peak RSS (MiB) |"
echo "|---|---|---:|---:|"
printf '%s\n' "${ROWS[@]}"
