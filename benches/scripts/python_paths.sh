#!/usr/bin/env bash
# Python's read paths by hand: an ImageNet-like dataset (8192 objects,
# log-normal sizes around 90 KiB, 4 KiB-1 MiB), one storaged, and epochs
# through the `storaged` wheel over each transport (`Client(url,
# transport=...)`: grpc, bulk, shm), alternating for ROUNDS rounds:
#   - native: one process iterating `Dataset.loader` (batches of 256),
#   - torch:  `storaged.torch.IterableDataset` (packed batches of 256)
#             through a DataLoader with 4 workers.
# Reports samples/s and storaged's CPU seconds per GiB (from /proc), as
# medians, and the path each epoch's loader said served it.
#
#   bash benches/scripts/python_paths.sh [--rounds N] [--tmpfs] [--out DIR]
#   --tmpfs   device files on /dev/shm (O_DIRECT works there): CPU ceilings
#
# Needs release binaries (cargo build --release --bins) and the wheel in
# .venv (tests/run.sh installs a debug build; for figures install a
# release one: cd client/python && maturin build --release -o /tmp/w &&
# .venv/bin/pip install --force-reinstall --no-deps /tmp/w/storaged-*.whl).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=3
OUT_DIR=bench-out
TMPFS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift ;;
    --out) OUT_DIR=$2; shift ;;
    --tmpfs) TMPFS=1 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
BIN=$(pwd)/target/release
PY=$(pwd)/.venv/bin/python
[ -x "$BIN/storaged" ] && [ -x "$BIN/storagectl" ] || { echo "build first: cargo build --release --bins" >&2; exit 1; }
"$PY" -c "import storaged, storaged.torch" || { echo "the storaged wheel (with torch) is not in .venv: run tests/run.sh once" >&2; exit 1; }
WORK=$(realpath -m "$OUT_DIR/python_paths")
rm -rf "$WORK" && mkdir -p "$WORK/src"
if [ "$TMPFS" = 1 ]; then DEV_DIR=/dev/shm/python_paths.$$; else DEV_DIR=$WORK/devices; fi
mkdir -p "$DEV_DIR"
cleanup() {
  [ -n "${SERVER_PID:-}" ] && kill "$SERVER_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$DEV_DIR" "$WORK/data" "$WORK/src"
}
trap cleanup EXIT
python3 - "$WORK/src" <<'EOF'
import math, os, random, sys
random.seed(3)
root = sys.argv[1]
for i in range(8192):
    size = int(min(max(math.exp(random.gauss(math.log(90000), 0.6)), 4096), 1 << 20))
    d = os.path.join(root, f"c{i % 100:03d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"{i:05d}.jpg"), "wb") as f:
        f.write(os.urandom(size))
EOF
DEVICES=()
for i in 0 1 2 3; do DEVICES+=(--device "$DEV_DIR/dev$i.img"); done
"$BIN/storaged" serve --listen 127.0.0.1:7472 --data-dir "$WORK/data" --device-size 512MiB \
  "${DEVICES[@]}" > "$WORK/serve.out" 2> "$WORK/serve.err" &
SERVER_PID=$!
for _ in $(seq 100); do "$BIN/storagectl" --server http://127.0.0.1:7472 status >/dev/null 2>&1 && break; sleep 0.1; done
"$BIN/storagectl" --server http://127.0.0.1:7472 ingest img "$WORK/src" >/dev/null
rm -rf "$WORK/src"

"$PY" - "$WORK" "$ROUNDS" "$SERVER_PID" "$TMPFS" <<'EOF'
import json, os, statistics, sys, time
import storaged, storaged.torch as st
import torch.utils.data as tud
work, rounds, pid, tmpfs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
url = "http://127.0.0.1:7472"
tick = os.sysconf("SC_CLK_TCK")

def server_cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick

def drop_caches():
    try:
        open("/proc/sys/vm/drop_caches", "w").write("3")
    except OSError:
        pass

def native(transport):
    ds = storaged.Client(url, transport=transport).dataset("img")
    loader = ds.loader(seed=1, epoch=0, rank=0, world_size=1, worker=0, num_workers=1,
                       shuffle=True, drop_last=False, batch_size=256, prefetch_bytes=64 << 20)
    samples = nbytes = 0
    while (batch := next(loader, None)) is not None:
        samples += len(batch)
        nbytes += sum(len(d) for _, _, d in batch)
        del batch
    return samples, nbytes, loader.stats()

def torch_epoch(transport):
    ds = st.IterableDataset(url, "img", seed=1, batch_size=256, transport=transport)
    samples = nbytes = 0
    for b in tud.DataLoader(ds, batch_size=None, num_workers=4):
        samples += len(b.paths)
        nbytes += int(b.offsets[-1])
    return samples, nbytes, None

runs = {}
for r in range(rounds):
    for kind, fn in (("native", native), ("torch", torch_epoch)):
        for transport in ("grpc", "bulk", "shm"):
            drop_caches()
            c0, t0 = server_cpu(), time.time()
            samples, nbytes, stats = fn(transport)
            seconds = time.time() - t0
            row = {"samples_per_s": samples / seconds,
                   "server_cpu_s_per_gib": (server_cpu() - c0) / (nbytes / 2**30),
                   "samples": samples, "stats": stats}
            runs.setdefault(f"{kind}_{transport}", []).append(row)
    print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]['samples_per_s']:.0f}" for k, v in runs.items()))

summary = {}
for kind in ("native", "torch"):
    base = statistics.median(x["samples_per_s"] for x in runs[f"{kind}_grpc"])
    for transport in ("grpc", "bulk", "shm"):
        rows = runs[f"{kind}_{transport}"]
        sps = statistics.median(x["samples_per_s"] for x in rows)
        cpu = statistics.median(x["server_cpu_s_per_gib"] for x in rows)
        summary[f"{kind}_{transport}"] = {"samples_per_s": sps, "x_grpc": sps / base,
                                          "server_cpu_s_per_gib": cpu}
        print(f"{kind:6} {transport:4} {sps:8.0f} samples/s  {sps / base:4.2f}x grpc  "
              f"storaged {cpu:.3f} s/GiB")
for transport in ("grpc", "bulk", "shm"):
    stats = runs[f"native_{transport}"][-1]["stats"]
    print(f"native {transport}: served by " + ", ".join(
        f"{p} {stats[p + '_batches']}" for p in ("shm", "bulk", "grpc") if stats[p + "_batches"]))
json.dump({"rounds": rounds, "tmpfs": tmpfs == "1", "runs": runs, "medians": summary},
          open(f"{work}/results.json", "w"), indent=2)
print(f"wrote {work}/results.json")
EOF
