#!/usr/bin/env bash
# storagectl cat of one large object to /dev/null against fio reading the
# same device files (io_uring, O_DIRECT, 1 MiB), alternating
# fio qd32 / storaged / fio qd64 for ROUNDS rounds with caches dropped before
# each phase. fio at iodepth 32 is the reference the issue names; iodepth 64
# matches storaged's default read-ahead (64 x 1 MiB reads in flight).
# Prints every run and the medians; writes OUT_DIR/cat_vs_fio.json.
#
# Usage: benches/scripts/cat_vs_fio.sh [--quick] [--rounds N] [--out DIR]
#   --quick   1 GiB object instead of 4 GiB
# Needs: fio, python3, release binaries (cargo build --release --bins).
set -euo pipefail
cd "$(dirname "$0")/../.."

OBJECT_GIB=4
ROUNDS=3
OUT_DIR=bench-out
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) OBJECT_GIB=1 ;;
    --rounds) ROUNDS=$2; shift ;;
    --out) OUT_DIR=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
command -v fio >/dev/null || { echo "fio is missing: apt-get install -y fio" >&2; exit 1; }
BIN=target/release
[ -x "$BIN/storaged" ] && [ -x "$BIN/storagectl" ] || { echo "build first: cargo build --release --bins" >&2; exit 1; }

WORK=$OUT_DIR/cat_vs_fio
rm -rf "$WORK"; mkdir -p "$WORK/src"
DEV_GIB=$(( OBJECT_GIB / 4 + 1 ))
echo "generating a ${OBJECT_GIB} GiB object..."
head -c $(( OBJECT_GIB << 30 )) /dev/urandom > "$WORK/src/shard.bin"

"$BIN/storaged" serve --listen 127.0.0.1:0 --data-dir "$WORK/data" --device-size "${DEV_GIB}GiB" \
  > "$WORK/serve.out" 2> "$WORK/serve.err" &
SERVER_PID=$!
trap 'kill $SERVER_PID 2>/dev/null || true; rm -rf "$WORK/data" "$WORK/src"' EXIT
for _ in $(seq 100); do grep -q listening "$WORK/serve.out" 2>/dev/null && break; sleep 0.1; done
URL="http://$(sed -n 's/^storaged listening on //p' "$WORK/serve.out")"
export STORAGED_URL=$URL
"$BIN/storagectl" ingest bench "$WORK/src" >/dev/null
rm -f "$WORK/src/shard.bin"
DEVICES=$(ls "$WORK"/data/dev*.img | paste -sd:)
# The object occupies the first OBJECT_GIB/4 GiB of each device's data area
# (which starts at 1 MiB): fio reads exactly those bytes.
FIO_CMD="fio --name=seq --ioengine=io_uring --direct=1 --rw=read --bs=1M --iodepth=32 --filename=$DEVICES --offset=1M --size=${OBJECT_GIB}G --output-format=json"
FIO64_CMD=${FIO_CMD/--iodepth=32/--iodepth=64}

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || echo "(cannot drop caches: not root)" >&2; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

RESULTS="$WORK/runs.txt"; : > "$RESULTS"
run_fio() { # label command round
  drop_caches
  $2 > "$WORK/$1.$3.json"
  python3 - "$1" "$WORK/$1.$3.json" >> "$RESULTS" <<'PY'
import json, sys
j = json.load(open(sys.argv[2]))["jobs"][0]["read"]
print(f"{sys.argv[1]} {j['io_bytes'] / j['runtime'] * 1000 / 2**30:.4f} {j['io_bytes']}")
PY
}
for r in $(seq "$ROUNDS"); do
  run_fio fio "$FIO_CMD" "$r"
  drop_caches
  before=$(cpu_ticks $SERVER_PID)
  TIMEFORMAT='%R %U %S'
  t=$( { time "$BIN/storagectl" cat bench shard.bin > /dev/null; } 2>&1 )
  after=$(cpu_ticks $SERVER_PID)
  read -r real user sys <<< "$t"
  python3 - "$real" "$user" "$sys" "$before" "$after" "$HZ" "$OBJECT_GIB" >> "$RESULTS" <<'PY'
import sys
real, user, sys_, before, after, hz, gib = map(float, sys.argv[1:])
server_cpu = (after - before) / hz
print(f"storaged {gib / real:.4f} {int(gib) << 30} {server_cpu / gib:.3f} {(user + sys_) / gib:.3f}")
PY
  run_fio fio64 "$FIO64_CMD" "$r"
  tail -3 "$RESULTS"
done

python3 - "$RESULTS" "$WORK/cat_vs_fio.json" "$FIO_CMD" "$OBJECT_GIB" "$FIO64_CMD" <<'PY'
import json, statistics, sys
runs = [l.split() for l in open(sys.argv[1])]
fio = [float(r[1]) for r in runs if r[0] == "fio"]
fio64 = [float(r[1]) for r in runs if r[0] == "fio64"]
sd = [float(r[1]) for r in runs if r[0] == "storaged"]
srv = [float(r[3]) for r in runs if r[0] == "storaged"]
cli = [float(r[4]) for r in runs if r[0] == "storaged"]
ratios = [s / f for s, f in zip(sd, fio)]
ratios64 = [s / f for s, f in zip(sd, fio64)]
out = {
    "object_gib": int(sys.argv[4]),
    "fio_command": sys.argv[3],
    "fio_qd64_command": sys.argv[5],
    "fio_gib_per_s": fio, "fio_qd64_gib_per_s": fio64, "storaged_gib_per_s": sd,
    "fio_qd64_gib_per_s_median": statistics.median(fio64),
    "ratio_to_fio_qd64_median": statistics.median(ratios64),
    "fio_gib_per_s_median": statistics.median(fio),
    "storaged_gib_per_s_median": statistics.median(sd),
    "ratio_per_round": ratios,
    "ratio_median": statistics.median(ratios),
    "cpu_s_per_gib_server_median": statistics.median(srv),
    "cpu_s_per_gib_client_median": statistics.median(cli),
}
json.dump(out, open(sys.argv[2], "w"), indent=2)
print(f"\nmedian fio        {out['fio_gib_per_s_median']:.2f} GiB/s")
print(f"median storaged   {out['storaged_gib_per_s_median']:.2f} GiB/s (storagectl cat > /dev/null)")
print(f"median fio qd64   {out['fio_qd64_gib_per_s_median']:.2f} GiB/s")
print(f"median ratio      {out['ratio_median']:.2f}x fio qd32 (per-round ratios {', '.join(f'{x:.2f}' for x in ratios)})")
print(f"median ratio      {out['ratio_to_fio_qd64_median']:.2f}x fio qd64 (per-round ratios {', '.join(f'{x:.2f}' for x in ratios64)})")
print(f"cpu s/GiB         server {out['cpu_s_per_gib_server_median']:.2f}, client {out['cpu_s_per_gib_client_median']:.2f}")
PY
