#!/usr/bin/env bash
# Where the server's CPU goes while streaming: perf profile of storaged
# serving one 1 GiB object to `storagectl cat`, and its CPU seconds per GiB.
#
#   bash benches/scripts/profile_stream.sh [OUT_DIR]     (default bench-out/profile)
#
# Needs perf (linux-perf) and root for drop_caches; builds nothing, so run
# `cargo build --release --bins` first. Prints the top symbols and, per run,
# GiB/s and server CPU s/GiB from /proc.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-bench-out/profile}
BIN=target/release
command -v perf >/dev/null || { echo "perf is missing: apt-get install linux-perf" >&2; exit 1; }
[ -x "$BIN/storaged" ] && [ -x "$BIN/storagectl" ] || { echo "run cargo build --release --bins first" >&2; exit 1; }
rm -rf "$OUT" && mkdir -p "$OUT/src"
head -c 1G /dev/urandom > "$OUT/src/shard.bin"
PORT=50779
"$BIN/storaged" serve --listen 127.0.0.1:$PORT --data-dir "$OUT/data" --device-size 1GiB > "$OUT/storaged.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
export STORAGED_URL=http://127.0.0.1:$PORT
for _ in $(seq 100); do grep -q "listening" "$OUT/storaged.log" && break; sleep 0.1; done
"$BIN/storagectl" ingest shards "$OUT/src" >/dev/null
rm -f "$OUT/src/shard.bin"
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || echo "not root: caches not dropped (reads are O_DIRECT anyway)"
TCK=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' /proc/$PID/stat; }
perf record -F 999 -g -p $PID -o "$OUT/perf.data" -- sleep 3 2>/dev/null &
PERF=$!
sleep 0.3
for i in 1 2 3 4; do
  a=$(cpu); s=$(date +%s.%N)
  "$BIN/storagectl" cat shards shard.bin > /dev/null
  e=$(date +%s.%N); b=$(cpu)
  awk -v s="$s" -v e="$e" -v a="$a" -v b="$b" -v t="$TCK" -v i="$i" \
    'BEGIN { printf "run %d: %.2f GiB/s, server %.2f s/GiB\n", i, 1/(e-s), (b-a)/t }'
done
wait $PERF || true
perf report -i "$OUT/perf.data" --no-children --sort symbol --stdio -g none 2>/dev/null | grep '%' | head -15
