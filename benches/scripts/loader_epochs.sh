#!/usr/bin/env bash
# The loader by hand: an ImageNet-like dataset (8192 objects, log-normal
# sizes around 90 KiB, 4 KiB-1 MiB, 847 MiB), one storaged, then
# `storagectl epoch` (4 workers, batches of 256) over TCP (gRPC) with
# read-ahead hints on, then off, and over the Unix socket (shared memory),
# with the server's CPU per GiB from /proc and, from /proc/diskstats, the
# backing disk's reads, mean request size and utilisation.
#
#   bash benches/scripts/loader_epochs.sh [EPOCHS] [OUT_DIR]   (default 5, bench-out/loader-epochs)
#   STORAGED_CONFIG=file.toml bash benches/scripts/loader_epochs.sh   (storaged serve --config)
#
# Builds nothing: run `cargo build --release --bins` first.
set -euo pipefail
cd "$(dirname "$0")/../.."
EPOCHS=${1:-5}
OUT=$(realpath -m "${2:-bench-out/loader-epochs}")
BIN=target/release
[ -x "$BIN/storaged" ] && [ -x "$BIN/storagectl" ] || { echo "run cargo build --release --bins first" >&2; exit 1; }
rm -rf "$OUT" && mkdir -p "$OUT/src"
python3 - "$OUT/src" <<'PY'
import math, os, random, sys
random.seed(3)
root = sys.argv[1]
for i in range(8192):
    size = int(min(max(math.exp(random.gauss(math.log(90000), 0.6)), 4096), 1 << 20))
    d = os.path.join(root, f"c{i % 100:03d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"{i:05d}.jpg"), "wb") as f:
        f.write(os.urandom(size))
PY
PORT=50798
"$BIN/storaged" serve ${STORAGED_CONFIG:+--config "$STORAGED_CONFIG"} --listen 127.0.0.1:$PORT --data-dir "$OUT/data" --device-size 512MiB > "$OUT/storaged.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "listening" "$OUT/storaged.log" && break; sleep 0.1; done
"$BIN/storagectl" --server http://127.0.0.1:$PORT ingest img "$OUT/src" >/dev/null
rm -rf "$OUT/src"
TCK=$(getconf CLK_TCK)
# The block device under the data dir (a partition's stats are its own line).
DISK=$(lsblk -no KNAME "$(df --output=source "$OUT/data" | tail -1)" 2>/dev/null | head -1 || true)
disk() { awk -v d="$DISK" '$3 == d {print $4, $6, $13}' /proc/diskstats; }
run() { # label url hints
  local label=$1 url=$2 hints=$3
  a=$(awk '{print $14+$15}' /proc/$PID/stat); read -r r0 s0 t0 <<<"$(disk)"; w0=$(date +%s.%N)
  "$BIN/storagectl" --server "$url" --transport as-given epoch img --epochs "$EPOCHS" --hints "$hints" | tee "$OUT/epochs.txt"
  b=$(awk '{print $14+$15}' /proc/$PID/stat); read -r r1 s1 t1 <<<"$(disk)"; w1=$(date +%s.%N)
  # Each epoch line says "N samples, X MiB in ..."; sum the MiB.
  mib=$(grep -o 'samples, [0-9.]* MiB' "$OUT/epochs.txt" | awk '{s += $2} END {print s}')
  awk -v a="$a" -v b="$b" -v t="$TCK" -v m="$mib" -v u="$label" \
    -v r="$((r1 - r0))" -v s="$((s1 - s0))" -v ms="$((t1 - t0))" -v w0="$w0" -v w1="$w1" -v d="$DISK" \
    'BEGIN { printf "%s: server %.2f s/GiB over all epochs; disk %s: %d reads, %.0f KiB each, %.0f%% busy\n",
             u, (b-a)/t/(m/1024), d, r, (r ? s*512/1024/r : 0), ms/10/(w1-w0) }'
}
run "grpc, hints on" "http://127.0.0.1:$PORT" on
run "grpc, hints off" "http://127.0.0.1:$PORT" off
run "shm" "unix://$OUT/data/storaged.sock" off
"$BIN/storagectl" --server "http://127.0.0.1:$PORT" status | grep -E "scheduling|read-ahead"
