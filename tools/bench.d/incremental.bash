# shellcheck shell=bash
# shellcheck disable=SC2034,SC2153  # shares variables with tools/bench, which sources this file
# tools/bench.d/incremental.bash — the incremental section of tools/bench (sourced by it).
#
# Uses from tools/bench: CAIRN IMG SIZE RUNDIR RUNS DEV2 HELPER_DIR SEED FIO_RUNTIME CMD_TIMEOUT TMPFILES,
# log die attach detach_loop q drop_caches zero_target median fmt ratio json_str json_num json_list.
#
# One run (incr_run RUN), on a writable, fully allocated copy of the cached test image attached
# with direct I/O as DEVW (the cached image itself is never written):
#   A. start a tracker on DEVW (fresh state dir SA); full into repo A (state SA), full into repo B
#      (state SB, where no tracker runs): "the full's wall time" is the median of the two;
#      1%: overwrite 1% of DEVW's 4 KiB blocks (seeded random choice, random data, O_DIRECT),
#          incremental into A (expected: tracked), raw `dd iflag=direct` read of DEVW, incremental
#          into B (expected: compare-scan);
#      10%: the same with 10% of the blocks, continuing both chains (parent: the 1% images).
#   R. (same tracker, a second series) full into repo C, restored alone onto DEV2 (timed twice,
#      then compared with DEVW); 10 rounds of 0.1% changes each followed by a tracked incremental into C; the last
#      one restored onto DEV2 (timed, compared); a full of that final state into repo D (no
#      tracker) restored onto DEV2 (timed, compared: the like-for-like baseline).
#   F. fio randwrite with the tracker (SA, following both series), then SIGTERM + reset, fio
#      without any tracker; again with a fresh tracker (state SF) that follows a series (a full
#      into repo F registers it), SIGTERM + reset, without. fio comes last: its writes (how many
#      depends on the IOPS) would make the device content of the other steps vary.
# The page cache is dropped before every timed command; DEV2 is discarded before every restore.

INCR_NAME=bench
INCR_BS=4096
INCR_CHAIN_LEN=10
INCR_CHAIN_FRACTION=0.001
INCR_RESTORE_REPS=2   # each restore is timed this often (median), then checked

declare -A IR=()      # key -> space-separated values, one per run (or per repetition)
INCR_TRK_PID=""       # the running tracker, if any
INCR_TRK_DIR=""
INCR_TRK_DIRS=()      # every state dir a tracker ran with (reset on exit)
INCR_FAILED=0         # a restore that did not reproduce the device
INCR_LOAD_START=""
INCR_LOAD_END=""

ir_add() { IR[$1]+="$2 "; }           # ir_add KEY VALUE (VALUE without spaces)
ir_med() { # ir_med KEY: median of the key's values
    # shellcheck disable=SC2086  # word splitting of the value list is intended
    median ${IR[$1]:-}
}
ir_all() { # ir_all KEY: the distinct values of a key (for strings like methods), space-separated
    # shellcheck disable=SC2086
    printf '%s\n' ${IR[$1]:-} | awk 'NF && !seen[$0]++' | paste -sd' ' -
}

jget() { # jget FILE PYTHON-EXPRESSION-ON-d: a field of a JSON file ("" for null)
    python3 - "$1" "$2" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
v = eval(sys.argv[2], {"d": d})
print("" if v is None else (str(v).lower() if isinstance(v, bool) else v))
EOF
}

dir_bytes() { # dir_bytes DIR: sum of the sizes of the files in DIR
    find "$1" -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%d\n", s }'
}

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# ---------------------------------------------------------------- tracker
incr_tracker_start() { # incr_tracker_start STATE_DIR
    local dir=$1 i
    mkdir -p -- "$dir"
    "$CAIRN" tracker run "$DEVW" --state-dir "$dir" >>"$dir.log" 2>&1 &
    INCR_TRK_PID=$!
    INCR_TRK_DIR=$dir
    INCR_TRK_DIRS+=("$dir")
    for (( i = 0; i < 300; i++ )); do
        if "$CAIRN" tracker status --json --state-dir "$dir" 2>/dev/null | grep -q '"running": true'; then
            log "  tracker $INCR_TRK_PID following $DEVW (state $dir)"
            return 0
        fi
        if ! kill -0 "$INCR_TRK_PID" 2>/dev/null; then
            cat -- "$dir.log" >&2 || true
            INCR_TRK_PID=""
            die "cairn tracker run $DEVW exited at start (log above)"
        fi
        sleep 0.05
    done
    die "cairn tracker run $DEVW did not answer 'tracker status' within 15 s (log: $dir.log)"
}

incr_tracker_stop() { # SIGTERM, wait, then remove its kernel instance and state
    local pid=$INCR_TRK_PID dir=$INCR_TRK_DIR rc=0 i
    [[ -n $pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for (( i = 0; i < 200; i++ )); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "warning: tracker $pid did not stop within 10 s of SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || rc=$?
    INCR_TRK_PID=""
    (( rc == 0 )) || log "warning: tracker $pid exited with status $rc (log: $dir.log)"
    "$CAIRN" tracker reset --state-dir "$dir" >>"$dir.log" 2>&1 \
        || log "warning: cairn tracker reset --state-dir $dir failed (log: $dir.log)"
}

# Called first by tools/bench's exit trap: stop the tracker, reset every state dir we used.
# shellcheck disable=SC2317  # invoked from the trap
incr_cleanup() {
    local d
    incr_tracker_stop
    for d in "${INCR_TRK_DIRS[@]}"; do
        [[ ! -d $d ]] || "$CAIRN" tracker reset --state-dir "$d" >/dev/null 2>&1 \
            || log "warning: cairn tracker reset --state-dir $d failed"
    done
    INCR_TRK_DIRS=()
}

incr_tracker_continuity() { # "intact" or the tracker's reason, from `tracker status`
    "$CAIRN" tracker status --json --state-dir "$INCR_TRK_DIR" 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)
cs = [c.get("continuity_since_image") for dev in d.get("devices", []) for c in dev.get("consumers", [])]
print(" ".join(str(c).replace(" ", "_") for c in cs) or "no-consumer")' 2>/dev/null || echo unknown
}

# ---------------------------------------------------------------- steps
# itimed NAME CMDLINE: drop caches, run CMDLINE (then sync) under GNU time; stdout goes to
# $INCR_LOGS/NN-NAME.out. Sets TW (wall seconds), TCPU (user + system CPU seconds) and TOUT (the
# stdout file).
INCR_STEP_N=0
itimed() {
    local name cmd=$2 tf u sy
    INCR_STEP_N=$(( INCR_STEP_N + 1 ))
    name=$(printf '%02d-%s' "$INCR_STEP_N" "$1")
    tf=$INCR_LOGS/$name.time
    TOUT=$INCR_LOGS/$name.out
    drop_caches
    if ! /usr/bin/time -f '%e %M %U %S' -o "$tf" timeout -k 10 "$CMD_TIMEOUT" \
            bash -c "set -euo pipefail; $cmd; sync" >"$TOUT" 2>"$INCR_LOGS/$name.err"; then
        log "command failed (or hung: the limit is ${CMD_TIMEOUT}s): $cmd"
        tail -n 20 -- "$INCR_LOGS/$name.err" >&2 || true
        cat -- "$tf" >&2 || true
        exit 1
    fi
    read -r TW _ u sy < <(tail -n1 -- "$tf")
    TCPU=$(awk -v u="$u" -v s="$sy" 'BEGIN { printf "%.2f", u + s }')
}

# backup_step KEY REPO STATE_DIR KIND [EXPECTED_METHOD]: timed cairn backup; records wall, read,
# stored (sum of the new image directory's file sizes), method. Sets BK_ID.
backup_step() {
    local key=$1 repo=$2 state=$3 kind=$4 want=${5:-} method reason stored read
    itimed "$key" "$(q "$CAIRN") backup $(q "$DEVW") $(q "$repo") --name $INCR_NAME --$kind --json --state-dir $(q "$state")"
    BK_ID=$(jget "$TOUT" 'd["id"]')
    method=$(jget "$TOUT" 'd["method"]')
    read=$(jget "$TOUT" 'd["bytes_read"]')
    stored=$(dir_bytes "$repo/images/$BK_ID")
    ir_add "$key.wall" "$TW"
    ir_add "$key.cpu" "$TCPU"
    ir_add "$key.read" "$read"
    ir_add "$key.stored" "$stored"
    ir_add "$key.method" "$method"
    if [[ -n $want && $method != "$want" ]]; then
        reason=$(jget "$TOUT" 'd["method_reason"]')
        log "  warning: expected method $want, got $method${reason:+ ($reason)}"
        ir_add "$key.unexpected" 1
    fi
    log "  $key: ${TW}s (CPU ${TCPU}s), $method, read $(( read >> 20 )) MiB, stored $(( stored >> 20 )) MiB"
}

# scribble KEY FRACTION SEED: change FRACTION of DEVW's 4 KiB blocks. Sets CHANGED (bytes).
scribble() {
    local out=$INCR_LOGS/$1.scribble.json
    python3 "$HELPER_DIR/scribble.py" "$DEVW" --fraction "$2" --seed "$3" --block-size "$INCR_BS" >"$out" \
        || die "scribble.py failed on $DEVW"
    CHANGED=$(jget "$out" 'd["bytes"]')
}

# restore_step KEY REPO IMAGE_ID: INCR_RESTORE_REPS times: discard DEV2, timed restore; then
# compare DEV2 with DEVW.
restore_step() {
    local key=$1 repo=$2 id=$3 where rep
    for (( rep = 1; rep <= INCR_RESTORE_REPS; rep++ )); do
        zero_target
        itimed "$key" "$(q "$CAIRN") restore $(q "$repo") $(q "$DEV2") --yes --image $(q "$id") --json"
        ir_add "$key.wall" "$TW"
        ir_add "$key.cpu" "$TCPU"
        log "  $key ($rep/$INCR_RESTORE_REPS): ${TW}s (CPU ${TCPU}s)"
    done
    ir_add "$key.written" "$(jget "$TOUT" 'd["bytes_written"]')"
    ir_add "$key.zeroed" "$(jget "$TOUT" 'd["bytes_zeroed"]')"
    ir_add "$key.chain" "$(jget "$TOUT" 'len(d["chain"])')"
    if cmp -s -- "$DEVW" "$DEV2"; then
        ir_add "$key.check" ok
        log "  $key: restore OK (DEV2 = DEVW)"
    else
        where=$(cmp -- "$DEVW" "$DEV2" 2>&1 | head -n1 || true)
        ir_add "$key.check" mismatch
        INCR_FAILED=1
        log "  $key: MISMATCH: $where"
    fi
}

fio_step() { # fio_step with|without
    local out=$INCR_LOGS/fio-$1-$INCR_FIO_N.json iops
    INCR_FIO_N=$(( INCR_FIO_N + 1 ))
    drop_caches
    fio --name=trackcost --filename="$DEVW" --rw=randwrite --bs=4k --direct=1 --ioengine=libaio \
        --iodepth=32 --runtime="$FIO_RUNTIME" --time_based --randseed="$SEED" \
        --output-format=json --output="$out" >/dev/null 2>"$out.err" \
        || { cat -- "$out.err" >&2; die "fio failed on $DEVW"; }
    iops=$(jget "$out" 'round(d["jobs"][0]["write"]["iops"], 1)')
    ir_add "fio_$1.iops" "$iops"
    log "  fio randwrite 4k QD32 ${FIO_RUNTIME}s, $1 tracker: $iops IOPS"
}

# ---------------------------------------------------------------- one run
incr_run() { # incr_run RUN
    local run=$1 iw repo_a repo_b repo_c repo_d repo_f sa sb sd sf full_c last i pct frac seed
    iw=$RUNDIR/incr
    INCR_LOGS=$RUNDIR/logs/incr.$run
    rm -rf -- "$iw"
    mkdir -p -- "$iw" "$INCR_LOGS"
    repo_a=$iw/repo-a; repo_b=$iw/repo-b; repo_c=$iw/repo-c; repo_d=$iw/repo-d; repo_f=$iw/repo-f
    sa=$iw/state-a; sb=$iw/state-b; sd=$iw/state-d; sf=$iw/state-f
    mkdir -p -- "$sb" "$sd"
    INCR_FIO_N=1
    [[ -n $INCR_LOAD_START ]] || INCR_LOAD_START=$(loadavg)

    log "run $run/$RUNS: incremental section (load average $(loadavg))"
    WORK_IMG=$iw/work.img
    TMPFILES+=("$WORK_IMG")
    # Fully allocated (not sparse), so fio's writes and the restores never pay for filling holes
    # of the backing file, and raw reads really read.
    log "  copying the test image to $WORK_IMG"
    cp --sparse=never -- "$IMG" "$WORK_IMG"
    DEVW=""
    attach DEVW "$WORK_IMG" --direct-io=on

    # ---- A: tracked vs compare-scan incrementals at 1% and 10%
    incr_tracker_start "$sa"
    backup_step full_a "$repo_a" "$sa" full full
    backup_step full_b "$repo_b" "$sb" full full
    for pct in 1 10; do
        frac=$(awk -v p="$pct" 'BEGIN { printf "%.2f", p / 100 }')
        seed=$(( SEED + pct ))
        log "  changing ${pct}% of the 4 KiB blocks of $DEVW (seed $seed)"
        scribble "change_$pct" "$frac" "$seed"
        ir_add "p$pct.changed" "$CHANGED"
        backup_step "p$pct.tracked" "$repo_a" "$sa" incremental tracked
        itimed "p$pct.raw" "dd if=$(q "$DEVW") of=/dev/null bs=4M iflag=direct status=none"
        ir_add "p$pct.raw.wall" "$TW"
        ir_add "p$pct.raw.cpu" "$TCPU"
        log "  p$pct.raw (dd iflag=direct): ${TW}s"
        backup_step "p$pct.cscan" "$repo_b" "$sb" incremental compare-scan
    done

    # ---- R: restore a full alone, a full + 10 tracked incrementals, a full of the final state
    backup_step chain_full "$repo_c" "$sa" full full
    full_c=$BK_ID
    restore_step restore_full "$repo_c" "$full_c"
    for (( i = 1; i <= INCR_CHAIN_LEN; i++ )); do
        scribble "chain_$i" "$INCR_CHAIN_FRACTION" "$(( SEED + 100 + i ))"
        ir_add "chain_incr.changed" "$CHANGED"
        backup_step "chain_incr" "$repo_c" "$sa" incremental tracked
    done
    last=$BK_ID
    restore_step restore_chain "$repo_c" "$last"
    backup_step final_full "$repo_d" "$sd" full full
    restore_step restore_final_full "$repo_d" "$BK_ID"

    # ---- F: fio with the tracker (following series A and C), then without any; twice
    fio_step with
    ir_add "fio.continuity" "$(incr_tracker_continuity)"
    incr_tracker_stop
    fio_step without
    incr_tracker_start "$sf"
    log "  full into a third series, so that the new tracker follows one (untimed)"
    "$CAIRN" backup "$DEVW" "$repo_f" --name "$INCR_NAME" --full --json --state-dir "$sf" \
        >"$INCR_LOGS/fio_full.out" 2>"$INCR_LOGS/fio_full.err" \
        || { tail -n 20 -- "$INCR_LOGS/fio_full.err" >&2; die "cairn backup --full into $repo_f failed"; }
    fio_step with
    ir_add "fio.continuity" "$(incr_tracker_continuity)"
    incr_tracker_stop
    fio_step without

    detach_loop "$DEVW"
    rm -f -- "$WORK_IMG"
    INCR_LOAD_END=$(loadavg)
    log "run $run/$RUNS: incremental section done (load average $INCR_LOAD_END)"
}

# ---------------------------------------------------------------- results
# Computes the medians, ratios and target verdicts into INC (an associative array).
declare -A INC=()
incr_compute() {
    local k pct m
    for k in full_a.wall full_b.wall full_a.stored full_b.stored full_a.cpu full_b.cpu final_full.wall \
             restore_full.cpu restore_chain.cpu restore_final_full.cpu \
             restore_full.wall restore_chain.wall restore_final_full.wall \
             restore_full.written restore_chain.written restore_final_full.written \
             restore_full.zeroed restore_chain.zeroed restore_final_full.zeroed \
             fio_with.iops fio_without.iops chain_incr.wall chain_incr.cpu chain_incr.stored chain_incr.changed; do
        INC[$k]=$(ir_med "$k")
    done
    for pct in 1 10; do
        for k in changed tracked.wall tracked.cpu tracked.read tracked.stored cscan.wall cscan.cpu cscan.read cscan.stored raw.wall raw.cpu; do
            INC[p$pct.$k]=$(ir_med "p$pct.$k")
        done
        for m in tracked cscan; do
            INC[p$pct.$m.method]=$(ir_all "p$pct.$m.method")
            INC[p$pct.$m.tput]=$(awk -v s="$SIZE" -v w="${INC[p$pct.$m.wall]}" 'BEGIN { if (w > 0) printf "%.1f", s/1e6/w }')
        done
        INC[p$pct.raw.tput]=$(awk -v s="$SIZE" -v w="${INC[p$pct.raw.wall]}" 'BEGIN { if (w > 0) printf "%.1f", s/1e6/w }')
        INC[p$pct.stored_over_changed]=$(ratio "${INC[p$pct.tracked.stored]}" "${INC[p$pct.changed]}")
        INC[p$pct.cscan_stored_over_changed]=$(ratio "${INC[p$pct.cscan.stored]}" "${INC[p$pct.changed]}")
        INC[p$pct.cscan_over_raw]=$(ratio "${INC[p$pct.cscan.tput]}" "${INC[p$pct.raw.tput]}")
    done
    # "The full": both fulls of the same device state (repo A with the tracker, repo B without).
    # shellcheck disable=SC2086
    INC[full.wall]=$(median ${IR[full_a.wall]:-} ${IR[full_b.wall]:-})
    for pct in 1 10; do
        INC[p$pct.tracked_over_full]=$(ratio "${INC[p$pct.tracked.wall]}" "${INC[full.wall]}")
    done
    INC[chain.methods]=$(ir_all chain_incr.method)
    INC[fio.ratio]=$(ratio "${INC[fio_with.iops]}" "${INC[fio_without.iops]}")
    INC[fio.continuity]=$(ir_all fio.continuity)
    INC[restore.ratio]=$(ratio "${INC[restore_chain.wall]}" "${INC[restore_full.wall]}")
    INC[restore.ratio_final]=$(ratio "${INC[restore_chain.wall]}" "${INC[restore_final_full.wall]}")
    for k in restore_full restore_chain restore_final_full; do
        if [[ ${IR[$k.check]:-} == *mismatch* ]]; then INC[$k.check]=MISMATCH; else INC[$k.check]="restore OK"; fi
    done

    # Verdicts. A measurement whose method was not the expected one is a MISS whatever its number.
    verdict() { # verdict VALUE OP LIMIT [BAD-METHOD]
        if [[ -n ${4:-} ]]; then echo MISS; return; fi
        awk -v v="$1" -v l="$3" -v op="$2" 'BEGIN {
            if (v == "") { print "n/a"; exit }
            ok = (op == "<=") ? (v + 0 <= l + 0) : (v + 0 >= l + 0); print ok ? "PASS" : "MISS" }'
    }
    INC[t.tracked_wall]=$(verdict "${INC[p1.tracked_over_full]}" '<=' 0.05 "${IR[p1.tracked.unexpected]:-}")
    INC[t.tracked_stored]=$(verdict "${INC[p1.stored_over_changed]}" '<=' 1.2 "${IR[p1.tracked.unexpected]:-}")
    INC[t.cscan1]=$(verdict "${INC[p1.cscan_over_raw]}" '>=' 0.8 "${IR[p1.cscan.unexpected]:-}")
    INC[t.cscan10]=$(verdict "${INC[p10.cscan_over_raw]}" '>=' 0.8 "${IR[p10.cscan.unexpected]:-}")
    INC[t.fio]=$(verdict "${INC[fio.ratio]}" '>=' 0.95)
    local bad=""
    [[ -z ${IR[chain_incr.unexpected]:-} && ${INC[restore_chain.check]} == "restore OK" && ${INC[restore_full.check]} == "restore OK" ]] || bad=1
    INC[t.restore]=$(verdict "${INC[restore.ratio]}" '<=' 1.2 "$bad")
}

mb() { awk -v b="$1" 'BEGIN { if (b == "") print "—"; else printf "%.1f", b/1e6 }'; }
pc() { awk -v r="$1" 'BEGIN { if (r == "") print "—"; else printf "%.1f%%", r*100 }'; }
xx() { awk -v r="$1" 'BEGIN { if (r == "") print "—"; else printf "%.2f×", r }'; }
sec() { if [[ -n $1 ]]; then fmt "$1" '%.2f'; else echo '—'; fi; }
iops_list() { # iops_list KEY: "29068, 23486"
    # shellcheck disable=SC2086
    printf '%s\n' ${IR[$1]:-} | awk '{ printf "%s%.0f", (NR > 1 ? ", " : ""), $1 }'
}

incr_report() {
    local pct n_chain k label
    n_chain=$(( INCR_CHAIN_LEN ))
    echo "### cairn incremental benchmark"
    echo
    # shellcheck disable=SC2016  # literal backquotes (Markdown code span)
    printf 'Same %s test disk (page cache dropped before every command), as a writable fully allocated copy on a direct-I/O loop device. Changes: %s KiB blocks chosen at random (seed %s+N) and overwritten with random data by O_DIRECT writes; the 10%% change continues the 1%% chains (its parent is the 1%% image). Tracked images into a series followed by `cairn tracker run`; compare-scan images into a second series with no tracker. Restores onto a discarded loop device, each compared byte for byte with the source. fio: `--rw=randwrite --bs=4k --direct=1 --ioengine=libaio --iodepth=32`, %s s per run, twice with the tracker and twice without, alternating (medians). %s run(s)%s. Load average (1/5/15 min) at start %s, at end %s (%s cores; other work on the host counts in these).\n' \
        "$SIZE_H" "$(( INCR_BS >> 10 ))" "$SEED" "$FIO_RUNTIME" "$RUNS" "${MEDIANS_NOTE:-}" "$INCR_LOAD_START" "$INCR_LOAD_END" "$(nproc)"
    printf 'Host: %s. cairn: %s. fio %s.\n' "$HOST" "$CAIRN_VERSION" "$(fio --version 2>/dev/null || echo '?')"
    echo
    tp() { awk -v s="$SIZE" -v w="$1" 'BEGIN { if (w > 0) printf "%.1f", s/1e6/w; else print "—" }'; }
    echo "| step | method | wall time (s) | CPU (s) | read (MB) | stored (MB) | changed (MB) | read throughput (MB/s) |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|"
    for k in full_a full_b; do
        case $k in full_a) label="full (series with tracker)" ;; *) label="full (series without)" ;; esac
        printf '| %s | full | %s | %s | %s | %s | — | %s |\n' "$label" "$(sec "${INC[$k.wall]}")" \
            "$(sec "${INC[$k.cpu]}")" "$(mb "$SIZE")" "$(mb "${INC[$k.stored]}")" "$(tp "${INC[$k.wall]}")"
    done
    for pct in 1 10; do
        for k in tracked cscan; do
            printf '| %s%% changed: incremental | %s | %s | %s | %s | %s | %s | %s |\n' "$pct" "${INC[p$pct.$k.method]}" \
                "$(sec "${INC[p$pct.$k.wall]}")" "$(sec "${INC[p$pct.$k.cpu]}")" "$(mb "${INC[p$pct.$k.read]}")" \
                "$(mb "${INC[p$pct.$k.stored]}")" "$(mb "${INC[p$pct.changed]}")" \
                "$(awk -v b="${INC[p$pct.$k.read]}" -v w="${INC[p$pct.$k.wall]}" 'BEGIN { if (w > 0) printf "%.1f", b/1e6/w }')"
        done
        # shellcheck disable=SC2016  # literal backquotes (Markdown code span)
        printf '| %s%% changed: `dd bs=4M iflag=direct` (raw read) | — | %s | %s | %s | — | — | %s |\n' "$pct" \
            "$(sec "${INC[p$pct.raw.wall]}")" "$(sec "${INC[p$pct.raw.cpu]}")" "$(mb "$SIZE")" "${INC[p$pct.raw.tput]}"
    done
    printf '| chain: each of %s incrementals after 0.1%% changed (median) | %s | %s | %s | — | %s | %s | — |\n' "$n_chain" \
        "${INC[chain.methods]}" "$(sec "${INC[chain_incr.wall]}")" "$(sec "${INC[chain_incr.cpu]}")" \
        "$(mb "${INC[chain_incr.stored]}")" "$(mb "${INC[chain_incr.changed]}")"
    echo
    echo "| restore onto a discarded device | wall time (s) | CPU (s) | written (MB) | zeroed (MB) | throughput (MB/s) | check |"
    echo "|---|---:|---:|---:|---:|---:|---|"
    for k in restore_full restore_chain restore_final_full; do
        case $k in
            restore_full) label="the chain's full alone" ;;
            restore_chain) label="full + $n_chain incrementals" ;;
            restore_final_full) label="a full of the same final state" ;;
        esac
        printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$label" "$(sec "${INC[$k.wall]}")" "$(sec "${INC[$k.cpu]}")" \
            "$(mb "${INC[$k.written]}")" "$(mb "${INC[$k.zeroed]}")" "$(tp "${INC[$k.wall]}")" "${INC[$k.check]}"
    done
    echo
    echo "| target | measured | goal | result |"
    echo "|---|---|---|---|"
    printf '| tracked incremental at 1%%: wall time / full'"'"'s (median of both fulls) | %s (%s s / %s s) | ≤ 5%% | %s |\n' \
        "$(pc "${INC[p1.tracked_over_full]}")" "$(sec "${INC[p1.tracked.wall]}")" "$(sec "${INC[full.wall]}")" "${INC[t.tracked_wall]}"
    printf '| tracked incremental at 1%%: stored / changed data | %s (%s MB / %s MB) | ≤ 1.2× | %s |\n' \
        "$(xx "${INC[p1.stored_over_changed]}")" "$(mb "${INC[p1.tracked.stored]}")" "$(mb "${INC[p1.changed]}")" "${INC[t.tracked_stored]}"
    for pct in 1 10; do
        printf '| compare-scan at %s%%: throughput / raw O_DIRECT read | %s (%s / %s MB/s) | ≥ 80%% | %s |\n' "$pct" \
            "$(pc "${INC[p$pct.cscan_over_raw]}")" "${INC[p$pct.cscan.tput]}" "${INC[p$pct.raw.tput]}" "${INC[t.cscan$pct]}"
    done
    # shellcheck disable=SC2016
    printf '| `fio randwrite 4k direct QD32` IOPS, tracker running / not | %s (median %s / %s; each run: with %s, without %s) | ≥ 95%% | %s |\n' \
        "$(pc "${INC[fio.ratio]}")" "$(fmt "${INC[fio_with.iops]}" '%.0f')" "$(fmt "${INC[fio_without.iops]}" '%.0f')" \
        "$(iops_list fio_with.iops)" "$(iops_list fio_without.iops)" "${INC[t.fio]}"
    printf '| restore full + %s incrementals / the full alone | %s (%s s / %s s) | ≤ 1.2× | %s |\n' "$n_chain" \
        "$(xx "${INC[restore.ratio]}")" "$(sec "${INC[restore_chain.wall]}")" "$(sec "${INC[restore_full.wall]}")" "${INC[t.restore]}"
    printf '| (for reference) restore full + %s incrementals / a full of the same final state | %s (%s s / %s s) | — | — |\n' "$n_chain" \
        "$(xx "${INC[restore.ratio_final]}")" "$(sec "${INC[restore_chain.wall]}")" "$(sec "${INC[restore_final_full.wall]}")"
    printf '| (for reference) tracked incremental at 10%%: wall / full, stored / changed | %s, %s | — | — |\n' \
        "$(pc "${INC[p10.tracked_over_full]}")" "$(xx "${INC[p10.stored_over_changed]}")"
    printf '| (for reference) compare-scan stored / changed data at 1%%, 10%% | %s, %s | — | — |\n' \
        "$(xx "${INC[p1.cscan_stored_over_changed]}")" "$(xx "${INC[p10.cscan_stored_over_changed]}")"
    printf '| (for reference) tracker continuity after each fio run | %s | intact | — |\n' "${INC[fio.continuity]}"
}

incr_json() { # the "incremental" object of the --json output (indented by 2)
    local k first=1 keys
    json_val() { # a number, or a string when it is not one
        if [[ -z $1 ]]; then printf 'null'
        elif [[ $1 =~ ^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$ ]]; then printf '%s' "$1"
        else json_str "$1"; fi
    }
    printf '{\n'
    printf '    "load_average_start": %s,\n' "$(json_str "$INCR_LOAD_START")"
    printf '    "load_average_end": %s,\n' "$(json_str "$INCR_LOAD_END")"
    printf '    "block_size": %s,\n' "$INCR_BS"
    printf '    "chain_length": %s,\n' "$INCR_CHAIN_LEN"
    printf '    "fio_runtime_s": %s,\n' "$FIO_RUNTIME"
    printf '    "targets": {\n'
    printf '      "tracked_1pct_wall_over_full": {"value": %s, "max": 0.05, "result": %s},\n' \
        "$(json_num "${INC[p1.tracked_over_full]}")" "$(json_str "${INC[t.tracked_wall]}")"
    printf '      "tracked_1pct_stored_over_changed": {"value": %s, "max": 1.2, "result": %s},\n' \
        "$(json_num "${INC[p1.stored_over_changed]}")" "$(json_str "${INC[t.tracked_stored]}")"
    printf '      "compare_scan_1pct_over_raw_read": {"value": %s, "min": 0.8, "result": %s},\n' \
        "$(json_num "${INC[p1.cscan_over_raw]}")" "$(json_str "${INC[t.cscan1]}")"
    printf '      "compare_scan_10pct_over_raw_read": {"value": %s, "min": 0.8, "result": %s},\n' \
        "$(json_num "${INC[p10.cscan_over_raw]}")" "$(json_str "${INC[t.cscan10]}")"
    printf '      "fio_iops_with_over_without_tracker": {"value": %s, "min": 0.95, "result": %s},\n' \
        "$(json_num "${INC[fio.ratio]}")" "$(json_str "${INC[t.fio]}")"
    printf '      "restore_chain_over_full": {"value": %s, "max": 1.2, "result": %s}\n' \
        "$(json_num "${INC[restore.ratio]}")" "$(json_str "${INC[t.restore]}")"
    printf '    },\n'
    printf '    "medians": {\n'
    mapfile -t keys < <(printf '%s\n' "${!INC[@]}" | grep -v '^t\.' | sort)
    for k in "${keys[@]}"; do
        [[ $first -eq 1 ]] || printf ',\n'
        first=0
        printf '      %s: %s' "$(json_str "$k")" "$(json_val "${INC[$k]}")"
    done
    printf '\n    },\n'
    printf '    "runs": {\n'
    first=1
    mapfile -t keys < <(printf '%s\n' "${!IR[@]}" | sort)
    for k in "${keys[@]}"; do
        [[ $first -eq 1 ]] || printf ',\n'
        first=0
        printf '      %s: %s' "$(json_str "$k")" \
            "$(json_list "$(for v in ${IR[$k]}; do json_val "$v"; printf ' '; done)")"
    done
    printf '\n    }\n'
    printf '  }'
}
