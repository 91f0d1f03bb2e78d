#!/usr/bin/env bash
# Delivery throughput with the durable store (redb, fsync per group commit) against the
# in-memory store, interleaved in one run so both see the same machine. Prints each run and
# the medians and their ratio. Usage: benches/durable-vs-memory.sh [ROUNDS] [MESSAGES] [CLIENTS]
# [TRANSPORT]. The default, quic, is what this script measured before the demo's own default
# became the mixed room: forwards pipelined, so the ratio measures what a commit costs. With
# `mixed`, c's submissions reach the hub a over HTTPS one per room at a time, each waiting for
# the hub's fsync, so the ratio there measures commit latency.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}; messages=${2:-30000}; clients=${3:-64}; transport=${4:-quic}
cargo build --release --locked -q -p mimi-relay
bin=target/release/mimi-relay
out=$(mktemp)
for ((i = 1; i <= rounds; i++)); do
  for store in durable memory; do
    $bin demo --json --messages "$messages" --clients "$clients" --store "$store" --transport "$transport" | tee -a "$out"
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
for r in rows:
    assert r["lost"] == r["duplicated"] == r["out_of_order"] == 0, r
med = {s: statistics.median(r["msgs_per_s"] for r in rows if r["store"] == s) for s in ("durable", "memory")}
p99 = {s: statistics.median(r["p99_us"] for r in rows if r["store"] == s) for s in ("durable", "memory")}
print(f"median deliveries/s: durable {med['durable']:.0f}, memory {med['memory']:.0f}, "
      f"ratio {med['durable'] / med['memory']:.2f}; median p99: durable {p99['durable']:.0f} us, memory {p99['memory']:.0f} us")
PY
rm -f "$out"
