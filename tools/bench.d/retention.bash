#!/usr/bin/env bash
# tools/bench --only retention: what `cairn prune` costs on a long chain, and that the points it
# keeps still restore exactly.
#
#   1. a 1 GiB file of random data (openssl AES-128-CTR keystream, fixed key: reproducible; not the
#      ext4 bench disk, to keep the section to a few minutes) is the source; a full backup of it,
#      then 30 rounds of: overwrite 1% of its 4 KiB blocks (bench.d/scribble.py: distinct blocks
#      chosen with a seeded RNG, random data, O_DIRECT, fsync), an incremental backup (a file
#      source has no tracker: compare-scan). The source's sha256 is remembered at every point;
#   2. cairn prune --keep-last 7 --json, timed with GNU time (wall, peak RSS) under
#      a small Python wrapper (IO_OF below), which reads the process's write_bytes from
#      /proc/PID/io after it exited and before it is reaped (write_bytes is charged when a page is
#      dirtied, so writeback done later by the kernel still counts). The repository's size (du --apparent-size) before and after,
#      the JSON's freed_bytes and bytes_written, and "the merged data": the segments of the 23
#      removed incrementals plus the indexes and manifests of the 24 removed images and of the
#      rewritten one (the issue's goal: prune writes <= 2x that);
#   3. cairn restore of the oldest and the newest kept point onto a file, each compared (sha256)
#      with the source state remembered for it, then cairn verify of the repository.
# The page cache is dropped before every timed command. Prints a Markdown table.
#
# Usage: tools/bench.d/retention.bash CAIRN WORKDIR   (tools/bench --only retention)
set -euo pipefail
CAIRN=$1 WORKDIR=$2
SELF_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
DIR=$WORKDIR/retention
SIZE=$(( ${RETENTION_SIZE_MIB:-1024} << 20 ))   # RETENTION_SIZE_MIB: a smaller try-out
ROUNDS=30
KEEP=7
PCT=1
FRACTION=$(awk -v p="$PCT" 'BEGIN { printf "%.2f", p / 100 }')
SEED=20241126
RAND_KEY=636169726e2d62656e63682d72616e64
SRC=$DIR/source.img
REPO=$DIR/repo
OUT=$DIR/restored.img
LOGS=$DIR/logs
CAIRN_VERSION=$("$CAIRN" --version)
CAIRN_VERSION=${CAIRN_VERSION%%$'\n'*}
rm -rf -- "$DIR"
mkdir -p -- "$DIR" "$LOGS"
cleanup() { rm -rf -- "$DIR"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log() { printf '[bench retention %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { printf 'tools/bench: error: %s\n' "$*" >&2; exit 1; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
mb() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1e6 }'; }
jget() { # jget FILE PYTHON-EXPRESSION-ON-d
    python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print(eval(sys.argv[2], {"d": d}))' "$1" "$2"
}
repo_bytes() { du --apparent-size -sb -- "$REPO" | cut -f1; }
sha() { sha256sum -- "$1" | cut -d' ' -f1; }

# io_of.py IOFILE CMD...: runs CMD, copies its /proc/PID/io to IOFILE once it has exited but before
# it is reaped (waitid WNOWAIT: a reaped process's /proc entry is gone), exits with its status.
IO_OF=$DIR/io_of.py
cat > "$IO_OF" <<'PY'
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
with open(f"/proc/{child.pid}/io") as f, open(sys.argv[1], "w") as out:
    out.write(f.read())
sys.exit(child.wait())
PY

# timed NAME CMD...: GNU time (wall seconds, peak RSS KiB) around io_of.py around CMD; stdout in
# $LOGS/NAME.out. Sets TW, TRSS (MiB), TWRITE (write_bytes), TOUT.
timed() {
    local name=$1; shift
    TOUT=$LOGS/$name.out
    drop_caches
    if ! /usr/bin/time -f '%e %M' -o "$LOGS/$name.time" \
            python3 "$IO_OF" "$LOGS/$name.io" "$@" > "$TOUT" 2> "$LOGS/$name.err"; then
        tail -n 20 -- "$LOGS/$name.err" >&2
        die "'$name' failed: $*"
    fi
    read -r TW TRSS < "$LOGS/$name.time"
    TRSS=$(awk -v k="$TRSS" 'BEGIN { printf "%.1f", k / 1024 }')
    TWRITE=$(sed -n 's/^write_bytes: //p' "$LOGS/$name.io")
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "source: $(( SIZE >> 20 )) MiB of random data"
# openssl ends on SIGPIPE when head has enough: that is the normal end, checked by the size.
{ openssl enc -aes-128-ctr -K "$RAND_KEY" -iv 0 -nosalt < /dev/zero 2>/dev/null || true; } | head -c "$SIZE" > "$SRC"
[[ $(stat -c %s -- "$SRC") -eq $SIZE ]] || die "could not write $SIZE bytes of random data to $SRC"

IDS=() SUMS=() CHANGED=0
backup() { # backup KIND: one point, remembered with the source's sha256
    timed "backup-${#IDS[@]}" "$CAIRN" backup "$SRC" "$REPO" --name retention "--$1" --json \
        --state-dir "$DIR/state"
    IDS+=("$(jget "$TOUT" 'd["id"]')")
    SUMS+=("$(sha "$SRC")")
    BK_METHOD=$(jget "$TOUT" 'd["method"]')
}
backup full
FULL_WALL=$TW FULL_STORED=$(repo_bytes)
log "full: ${FULL_WALL}s, repository $(mb "$FULL_STORED") MB"
INCR_WALLS=() METHODS=()
for (( i = 1; i <= ROUNDS; i++ )); do
    python3 "$SELF_DIR/scribble.py" "$SRC" --fraction "$FRACTION" --seed $(( SEED + i )) \
        > "$LOGS/scribble-$i.json" || die "scribble.py failed on $SRC"
    CHANGED=$(( CHANGED + $(jget "$LOGS/scribble-$i.json" 'd["bytes"]') ))
    backup incremental
    INCR_WALLS+=("$TW")
    [[ " ${METHODS[*]} " == *" $BK_METHOD "* ]] || METHODS+=("$BK_METHOD")
    log "incremental $i/$ROUNDS: ${TW}s ($BK_METHOD)"
done
INCR_MEDIAN=$(printf '%s\n' "${INCR_WALLS[@]}" | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
CHAIN_STORED=$(repo_bytes)

# The merged data. The oldest kept point (index ROUNDS+1-KEEP) is rewritten as a synthetic full:
# everything the removed incrementals stored is merged into it; the removed full's frames are
# reused in place, so of the full only its index and manifest count.
OLDEST=$(( ROUNDS + 1 - KEEP ))
MERGED=0 DROPPED=0
for (( i = 0; i <= OLDEST; i++ )); do
    d=$REPO/images/${IDS[i]}
    meta=$(( $(stat -c %s -- "$d/index") + $(stat -c %s -- "$d/manifest") ))
    all=$(find "$d" -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%d\n", s }')
    if (( i == 0 || i == OLDEST )); then MERGED=$(( MERGED + meta )); else MERGED=$(( MERGED + all )); fi
    (( i == OLDEST )) || DROPPED=$(( DROPPED + all ))
done

"$CAIRN" prune "$REPO" --keep-last "$KEEP" --dry-run --json > "$LOGS/dry-run.out" \
    || die "cairn prune --dry-run failed"
DRY_FREED=$(jget "$LOGS/dry-run.out" 'd["freed_bytes"]')
log "prune --keep-last $KEEP"
BEFORE=$(repo_bytes)
timed prune "$CAIRN" prune "$REPO" --keep-last "$KEEP" --json
PRUNE_WALL=$TW PRUNE_RSS=$TRSS PRUNE_WRITE=$TWRITE
AFTER=$(repo_bytes)
J_FREED=$(jget "$TOUT" 'd["freed_bytes"]')
J_WRITTEN=$(jget "$TOUT" 'd["bytes_written"]')
J_BEFORE=$(jget "$TOUT" 'd["bytes_before"]')
J_AFTER=$(jget "$TOUT" 'd["bytes_after"]')
N_REMOVED=$(jget "$TOUT" 'len(d["removed"])')
N_REWRITTEN=$(jget "$TOUT" 'len(d["rewritten"])')
"$CAIRN" list "$REPO" --json --totals > "$LOGS/list-after.out" || die "cairn list --totals failed"
LIST_TOTAL=$(jget "$LOGS/list-after.out" 'd["total_bytes"]')
LIST_RECLAIMABLE=$(jget "$LOGS/list-after.out" 'd["reclaimable_bytes"]')
KEPT=$("$CAIRN" list "$REPO" --json | python3 -c 'import json, sys; print(" ".join(i["id"] for i in json.load(sys.stdin)))')
WANT_KEPT="${IDS[*]:OLDEST}"
[[ $KEPT == "$WANT_KEPT" ]] || die "after prune the repository lists [$KEPT], expected [$WANT_KEPT]"
RATIO=$(awk -v w="$PRUNE_WRITE" -v m="$MERGED" 'BEGIN { printf "%.2f", w / m }')
VERDICT=$(awk -v w="$PRUNE_WRITE" -v m="$MERGED" 'BEGIN { print (w <= 2 * m) ? "PASS" : "MISS" }')
log "prune: ${PRUNE_WALL}s, wrote $(mb "$PRUNE_WRITE") MB (${RATIO}x the merged data), freed $(mb $(( BEFORE - AFTER ))) MB"

ROWS=() FAILED=0
restore() { # restore LABEL POINT-INDEX
    local label=$1 i=$2 got check
    rm -f -- "$OUT"
    timed "restore-$i" "$CAIRN" restore "$REPO" "$OUT" --image "${IDS[i]}" --yes -q
    got=$(sha "$OUT")
    if [[ $got == "${SUMS[i]}" ]]; then check="sha256 = source at point $i"; else check="MISMATCH"; FAILED=1; fi
    ROWS+=("| restore the $label kept point (point $i of 0..$ROUNDS) | $TW | $TRSS | $check |")
    log "restore point $i: ${TW}s, $check"
    rm -f -- "$OUT"
}
restore oldest "$OLDEST"
restore newest "$ROUNDS"
timed verify "$CAIRN" verify "$REPO" -q
ROWS+=("| \`cairn verify\` of the pruned repository | $TW | $TRSS | ok |")
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

echo
echo "#### Retention (\`tools/bench --only retention\`, measured $(date -u +%F))"
echo
# shellcheck disable=SC2016  # literal backquotes (Markdown code spans)
printf 'Source: a %s MiB file of random data (not the ext4 bench disk). A full, then %s incrementals, each after overwriting %s%% of the 4 KiB blocks (distinct, seeded random choice, random data, O_DIRECT; %s MB changed in all); a file source has no tracker, so the incrementals are %s. Then `cairn prune --keep-last %s` removes the full and the %s oldest incrementals and rewrites the oldest kept point as a synthetic full. Page cache dropped before every timed command. Bytes written: the prune process'"'"'s `write_bytes` (/proc/PID/io, read after exit, before reaping). Host: %s cores, %s GiB RAM, Linux %s, shared with other work: load average %s at start, %s at end. cairn: %s.\n' \
    "$(( SIZE >> 20 ))" "$ROUNDS" "$PCT" "$(mb "$CHANGED")" "${METHODS[*]}" "$KEEP" "$(( OLDEST - 1 ))" \
    "$(nproc)" "$(free -g | awk '/^Mem:/ { print $2 }')" "$(uname -r)" "$LOAD_START" "$LOAD_END" "$CAIRN_VERSION"
echo
echo "| step | wall time (s) | peak RSS (MiB) | result |"
echo "|---|---:|---:|---|"
echo "| full backup | $FULL_WALL | — | repository $(mb "$FULL_STORED") MB |"
echo "| each of $ROUNDS incrementals (median) | $INCR_MEDIAN | — | repository $(mb "$CHAIN_STORED") MB after all |"
echo "| \`cairn prune --keep-last $KEEP\` | $PRUNE_WALL | $PRUNE_RSS | removed $N_REMOVED, rewrote $N_REWRITTEN |"
printf '%s\n' "${ROWS[@]}"
echo
both() { printf '%s | %s' "$1" "$(mb "$1")"; }   # bytes | MB
J_DRY=$DRY_FREED
echo "| prune | bytes | MB |"
echo "|---|---:|---:|"
echo "| written (\`write_bytes\` of the prune process) | $(both "$PRUNE_WRITE") |"
echo "| written (cairn's own count, JSON \`bytes_written\`) | $(both "$J_WRITTEN") |"
echo "| merged data: the $(( OLDEST - 1 )) removed incrementals' files + the removed full's and the rewritten point's index and manifest | $(both "$MERGED") |"
echo "| **written / merged data** (goal ≤ 2×) | | **${RATIO}× $VERDICT** |"
echo "| repository before (\`du --apparent-size\`) | $(both "$BEFORE") |"
echo "| repository after | $(both "$AFTER") |"
echo "| freed (du: before − after) | $(both $(( BEFORE - AFTER ))) |"
echo "| freed (JSON \`freed_bytes\`; its bytes_before → bytes_after: $J_BEFORE → $J_AFTER; the dry run before it said $J_DRY) | $(both "$J_FREED") |"
echo "| after: \`cairn list --totals\` total / reclaimable | $LIST_TOTAL / $LIST_RECLAIMABLE | $(mb "$LIST_TOTAL") / $(mb "$LIST_RECLAIMABLE") |"
echo "| the removed images' files before the prune (what their frames the kept points still need stays) | $(both "$DROPPED") |"
(( FAILED == 0 )) || exit 2
