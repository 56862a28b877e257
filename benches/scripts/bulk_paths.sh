#!/usr/bin/env bash
# One large stripe-class object read whole by `storagectl cat` to
# /dev/null over each read path, against fio on the same device files
# (io_uring, O_DIRECT, 1 MiB, best of qd 16 and 64), alternating for
# ROUNDS rounds: gRPC (--transport grpc), the TCP bulk channel
# (--transport bulk) and, on the same host, shared memory (--transport
# shm). Reports GiB/s, storaged's CPU seconds per GiB (utime + stime of
# the daemon over the run) and the ratios, as medians; writes
# OUT_DIR/bulk_paths/results.json.
#
# Usage: benches/scripts/bulk_paths.sh [--quick] [--rounds N] [--out DIR]
#                                     [--tmpfs] [--netns] [--zerocopy]
#   --quick   512 MiB object instead of 2 GiB
#   --tmpfs   device files on /dev/shm (O_DIRECT works there): CPU ceilings
#   --netns   storaged in one network namespace and storagectl in another,
#             a veth pair between them (10.77.0.1 / 10.77.0.2), so the
#             bytes go through a real network stack, not the loopback
#             shortcut; storaged then serves with --insecure on 10.77.0.1
#             (no shm row: another host as far as the client can tell).
#             Needs root (ip netns).
#   --zerocopy storaged sends bulk windows with MSG_ZEROCOPY
#             (bulk_send_zerocopy = true): compare its bulk row, against
#             the same run's gRPC and fio, with a run without it.
# Needs: fio, python3, release binaries (cargo build --release --bins).
set -euo pipefail
cd "$(dirname "$0")/../.."

OBJECT_MIB=2048
ROUNDS=3
OUT_DIR=bench-out
TMPFS=0
NETNS=0
ZEROCOPY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) OBJECT_MIB=512 ;;
    --rounds) ROUNDS=$2; shift ;;
    --out) OUT_DIR=$2; shift ;;
    --tmpfs) TMPFS=1 ;;
    --netns) NETNS=1 ;;
    --zerocopy) ZEROCOPY=1 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
command -v fio >/dev/null || { echo "fio is missing: apt-get install -y fio" >&2; exit 1; }
BIN=$(pwd)/target/release
[ -x "$BIN/storaged" ] && [ -x "$BIN/storagectl" ] || { echo "build first: cargo build --release --bins" >&2; exit 1; }

WORK=$(realpath -m "$OUT_DIR/bulk_paths")
rm -rf "$WORK"; mkdir -p "$WORK/src"
if [ "$TMPFS" = 1 ]; then DEV_DIR=/dev/shm/bulk_paths.$$; else DEV_DIR=$WORK/devices; fi
mkdir -p "$DEV_DIR"
DEV_MIB=$(( OBJECT_MIB / 4 + 256 ))
SERVER_NS=()
CLIENT_NS=()
LISTEN=127.0.0.1
cleanup() {
  [ -n "${SERVER_PID:-}" ] && kill "$SERVER_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  if [ "$NETNS" = 1 ]; then ip netns del bp_srv 2>/dev/null || true; ip netns del bp_cli 2>/dev/null || true; fi
  rm -rf "$DEV_DIR" "$WORK/data" "$WORK/src"
}
trap cleanup EXIT
if [ "$NETNS" = 1 ]; then
  ip netns add bp_srv; ip netns add bp_cli
  ip link add bp0 type veth peer name bp1
  ip link set bp0 netns bp_srv; ip link set bp1 netns bp_cli
  ip -n bp_srv addr add 10.77.0.1/24 dev bp0; ip -n bp_cli addr add 10.77.0.2/24 dev bp1
  for ns in bp_srv bp_cli; do ip -n $ns link set lo up; done
  ip -n bp_srv link set bp0 up; ip -n bp_cli link set bp1 up
  SERVER_NS=(ip netns exec bp_srv); CLIENT_NS=(ip netns exec bp_cli)
  LISTEN=10.77.0.1
fi

echo "generating a ${OBJECT_MIB} MiB object..."
head -c $(( OBJECT_MIB << 20 )) /dev/urandom > "$WORK/src/shard.bin"
DEVICES=()
for i in 0 1 2 3; do DEVICES+=(--device "$DEV_DIR/dev$i.img"); done
INSECURE=()
[ "$NETNS" = 1 ] && INSECURE=(--insecure)
CONFIG=()
if [ "$ZEROCOPY" = 1 ]; then
  echo "bulk_send_zerocopy = true" > "$WORK/storaged.toml"
  CONFIG=(--config "$WORK/storaged.toml")
fi
"${SERVER_NS[@]}" "$BIN/storaged" serve "${CONFIG[@]}" --listen "$LISTEN:7470" --data-dir "$WORK/data" \
  --device-size "${DEV_MIB}MiB" "${DEVICES[@]}" "${INSECURE[@]}" > "$WORK/serve.out" 2> "$WORK/serve.err" &
SERVER_PID=$!
URL=http://$LISTEN:7470
for _ in $(seq 100); do
  "${CLIENT_NS[@]}" "$BIN/storagectl" --server "$URL" --transport grpc status >/dev/null 2>&1 && break
  sleep 0.1
done
"${CLIENT_NS[@]}" "$BIN/storagectl" --server "$URL" --transport grpc ingest --class stripe shard "$WORK/src"
rm -f "$WORK/src/shard.bin"
DAEMON=$(pgrep -f "storaged serve .*--listen $LISTEN:7470" | head -1)

python3 - "$WORK" "$BIN" "$URL" "$ROUNDS" "$OBJECT_MIB" "$DAEMON" "$NETNS" "$TMPFS" "$ZEROCOPY" "${DEVICES[@]}" <<'EOF'
import json, os, statistics, subprocess, sys, time
work, bin_dir, url, rounds, object_mib, daemon, netns, tmpfs, zerocopy = sys.argv[1:10]
devices = [d for d in sys.argv[10:] if d != "--device"]
rounds, gib, daemon = int(rounds), int(object_mib) / 1024, int(daemon)
client_ns = ["ip", "netns", "exec", "bp_cli"] if netns == "1" else []
tick = os.sysconf("SC_CLK_TCK")

def daemon_cpu():
    f = open(f"/proc/{daemon}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick

def drop_caches():
    try:
        open("/proc/sys/vm/drop_caches", "w").write("3")
    except OSError:
        pass

def cat(transport):
    cmd = client_ns + [f"{bin_dir}/storagectl", "--server", url, "--transport", transport,
                       "cat", "shard", "shard.bin"]
    drop_caches()
    c0, t0 = daemon_cpu(), time.time()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.time() - t0
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {r.stderr.decode()[-500:]}")
    return {"gib_per_s": gib / seconds, "server_cpu_s_per_gib": (daemon_cpu() - c0) / gib}

def fio():
    best = None
    for depth in (16, 64):
        cmd = ["fio", "--name=r", "--ioengine=io_uring", "--direct=1", "--rw=read", "--bs=1M",
               f"--iodepth={depth}", f"--size={int(object_mib) // 4}M", "--offset=1M",
               "--group_reporting", "--output-format=json", "--filename=" + ":".join(devices)]
        drop_caches()
        out = json.loads(subprocess.check_output(cmd, stderr=subprocess.DEVNULL))
        bw = out["jobs"][0]["read"]["bw_bytes"] / 2**30
        best = bw if best is None else max(best, bw)
    return {"gib_per_s": best, "server_cpu_s_per_gib": None}

paths = ["grpc", "bulk"] + ([] if netns == "1" else ["shm"])
runs = {p: [] for p in ["fio"] + paths}
for r in range(rounds):
    runs["fio"].append(fio())
    for p in paths:
        runs[p].append(cat(p))
    print(f"round {r + 1}: " + "  ".join(f"{p} {runs[p][-1]['gib_per_s']:.2f}" for p in runs))

def median(p, key):
    values = [x[key] for x in runs[p] if x[key] is not None]
    return statistics.median(values) if values else None

fio_gib, grpc_gib = median("fio", "gib_per_s"), median("grpc", "gib_per_s")
grpc_cpu = median("grpc", "server_cpu_s_per_gib")
summary = {}
for p in runs:
    g, c = median(p, "gib_per_s"), median(p, "server_cpu_s_per_gib")
    summary[p] = {"gib_per_s": g, "x_fio": g / fio_gib, "x_grpc": g / grpc_gib,
                  "server_cpu_s_per_gib": c,
                  "cpu_x_grpc": c / grpc_cpu if c is not None else None}
    cpu = f"{c:.3f}" if c is not None else "  -  "
    print(f"{p:5} {g:6.2f} GiB/s  {g / fio_gib:4.2f}x fio  {g / grpc_gib:4.2f}x grpc  "
          f"storaged {cpu} s/GiB")
json.dump({"object_mib": int(object_mib), "rounds": rounds, "netns": netns == "1",
           "tmpfs": tmpfs == "1", "zerocopy": zerocopy == "1", "runs": runs, "medians": summary},
          open(f"{work}/results.json", "w"), indent=2)
print(f"wrote {work}/results.json")
EOF
