#!/usr/bin/env bash
# The loader by hand: an ImageNet-like dataset (8192 objects, log-normal
# sizes around 90 KiB, 4 KiB-1 MiB, 847 MiB), one storaged, then
# `storagectl epoch` (4 workers, batches of 256) over TCP (gRPC) and over the
# Unix socket (shared memory), with the server's CPU per GiB from /proc.
#
#   bash benches/scripts/loader_epochs.sh [EPOCHS] [OUT_DIR]   (default 5, bench-out/loader-epochs)
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
"$BIN/storaged" serve --listen 127.0.0.1:$PORT --data-dir "$OUT/data" --device-size 512MiB > "$OUT/storaged.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "listening" "$OUT/storaged.log" && break; sleep 0.1; done
"$BIN/storagectl" --server http://127.0.0.1:$PORT ingest img "$OUT/src" >/dev/null
rm -rf "$OUT/src"
TCK=$(getconf CLK_TCK)
for url in http://127.0.0.1:$PORT "unix://$OUT/data/storaged.sock"; do
  a=$(awk '{print $14+$15}' /proc/$PID/stat)
  "$BIN/storagectl" --server "$url" epoch img --epochs "$EPOCHS" | tee "$OUT/epochs.txt"
  b=$(awk '{print $14+$15}' /proc/$PID/stat)
  # Each epoch line says "N samples, X MiB in ..."; sum the MiB.
  mib=$(grep -o 'samples, [0-9.]* MiB' "$OUT/epochs.txt" | awk '{s += $2} END {print s}')
  awk -v a="$a" -v b="$b" -v t="$TCK" -v m="$mib" -v u="$url" \
    'BEGIN { printf "%s: server %.2f s/GiB over all epochs\n", u, (b-a)/t/(m/1024) }'
done
