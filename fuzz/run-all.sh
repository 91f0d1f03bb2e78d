#!/usr/bin/env bash
# Runs every fuzz target for N seconds each (default 20) and fails if any of them crashes,
# hangs or runs out of memory. Installs cargo-fuzz if missing. Seeds come from
# corpus/<target>/ (read only); what the run finds goes to a scratch corpus that is thrown
# away; a crashing input is kept in artifacts/<target>/.
#   fuzz/run-all.sh [seconds]          FUZZ_JOBS=2 runs two targets at a time
set -euo pipefail
secs=${1:-20}
jobs=${FUZZ_JOBS:-1}
cd "$(dirname "$0")"
# cargo-fuzz needs nightly flags; only stable is installed.
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
# Debug assertions on; no sanitizer: the relay's crates deny unsafe code, and we look for
# panics, aborts, hangs and unbounded memory, at several times ASan's speed.
flags=(-a -s none)
# The workspace's tested versions, not whatever is newest today.
[ -f Cargo.lock ] || cp ../Cargo.lock Cargo.lock
cargo fuzz build "${flags[@]}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

run_one() {
    local t=$1 log="$work/$1.log"
    mkdir -p "$work/corpus/$t" "corpus/$t"
    echo "fuzz: running $t for ${secs}s"
    local rc=0
    cargo fuzz run "${flags[@]}" "$t" "$work/corpus/$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 \
        >"$log" 2>&1 || rc=$?
    local execs
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    echo "$rc" >"$work/$t.rc"
    if [ "$rc" -ne 0 ]; then
        tail -n 40 "$log"
        echo "fuzz: $t FAILED (exit $rc) after ${execs:-?} execs; input in fuzz/artifacts/$t/"
        return 1
    fi
    echo "fuzz: $t ok: ${execs:-?} execs in ${secs}s"
}

targets=$(cargo fuzz list)
for t in $targets; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do
        wait -n || true
    done
    run_one "$t" &
done
wait || true
failed=()
for t in $targets; do
    [ "$(cat "$work/$t.rc" 2>/dev/null || echo missing)" = 0 ] || failed+=("$t")
done
if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzz: FAILED: ${failed[*]}"
    exit 1
fi
echo "fuzz: all targets ok"
