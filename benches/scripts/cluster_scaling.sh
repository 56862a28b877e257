#!/usr/bin/env bash
# Aggregate read throughput of a storaged cluster as nodes are added, on
# one machine: each node runs in its own network namespace behind a veth
# pair whose node-side egress (the read direction) is shaped with tc tbf
# to RATE Mbit/s, so the nodes' links, not this VM's two cores, are the
# limit, as on real hosts. etcd and the reader (storagectl epoch) run in
# the root namespace; nodes reach each other through it (ip_forward).
#
# Rows, each the median of ROUNDS epochs:
#   1 node:  a plain storaged (no cluster) read over its one link: the
#            one-node figure every cluster row is compared with.
#   N nodes (2..4): a cluster dataset of class ec:(N-1)+1 ingested through
#            n1, read by one client straight from the nodes
#            (ClusterDataset); target >= 0.9 x N x the one-node figure.
#   N nodes, one killed (N = NODES_MAX): kill -9 of n2, then the same
#            reads (parity rebuilt by the client); target >= (N-1)/N of
#            healthy.
# Two workloads: shards (large objects, 4 workers x 1 in flight) and
# ImageNet-like samples (~110 KiB, 4 workers x 16 in flight).
# Writes OUT_DIR/cluster_scaling/results.json and a table on stdout.
#
# Usage: benches/scripts/cluster_scaling.sh [--quick] [--rounds N]
#            [--rate MBIT] [--nodes N] [--out DIR]
#   --quick  smaller datasets (64 MiB of shards, 600 samples)
#   --rate   per-node link in Mbit/s (default 400)
#   --nodes  largest cluster (2..4, default 4)
# Needs: root (ip netns, tc), etcd (apt-get install etcd-server), release
# binaries (cargo build --release --bins), python3. Device files on
# /dev/shm.
set -euo pipefail
cd "$(dirname "$0")/../.."

ROUNDS=3
RATE=400
NODES_MAX=4
OUT_DIR=bench-out
SHARD_MIB=32
SHARDS=8
SAMPLES=2000
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) SHARD_MIB=8; SAMPLES=600 ;;
    --rounds) ROUNDS=$2; shift ;;
    --rate) RATE=$2; shift ;;
    --nodes) NODES_MAX=$2; shift ;;
    --out) OUT_DIR=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
[ "$NODES_MAX" -ge 2 ] && [ "$NODES_MAX" -le 4 ] || { echo "--nodes must be 2 to 4" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "needs root (ip netns, tc)" >&2; exit 1; }
command -v etcd >/dev/null || { echo "etcd is missing: apt-get install -y etcd-server etcd-client" >&2; exit 1; }
BIN=$(pwd)/target/release
[ -x "$BIN/storaged" ] && [ -x "$BIN/storagectl" ] || { echo "build first: cargo build --release --bins" >&2; exit 1; }

WORK=$(realpath -m "$OUT_DIR/cluster_scaling")
DEV=/dev/shm/cluster_scaling.$$
rm -rf "$WORK"; mkdir -p "$WORK/src/shards" "$WORK/src/samples" "$DEV"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for i in 1 2 3 4; do ip netns del "csn$i" 2>/dev/null || true; ip link del "csh$i" 2>/dev/null || true; done
  rm -rf "$DEV"
}
trap cleanup EXIT

echo "== data: $SHARDS shards of $SHARD_MIB MiB, $SAMPLES samples of ~110 KiB"
for i in $(seq 1 "$SHARDS"); do head -c $((SHARD_MIB << 20)) /dev/urandom > "$WORK/src/shards/shard-$i.tar"; done
python3 - "$WORK/src/samples" "$SAMPLES" <<'EOF'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
for i in range(n):
    d = os.path.join(root, f"class{i % 100:03d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"{i:06d}.jpg"), "wb") as f:
        f.write(os.urandom(int(rng.lognormvariate(11.6, 0.35))))
EOF

echo "== network: $NODES_MAX namespaces, node egress shaped to $RATE Mbit/s"
sysctl -qw net.ipv4.ip_forward=1
command -v iptables >/dev/null && iptables -P FORWARD ACCEPT 2>/dev/null || true
for i in $(seq 1 "$NODES_MAX"); do
  ip netns add "csn$i"
  ip link add "csh$i" type veth peer name "csv$i"
  ip link set "csv$i" netns "csn$i"
  ip addr add "10.78.$i.1/24" dev "csh$i"
  ip link set "csh$i" up
  ip netns exec "csn$i" ip addr add "10.78.$i.2/24" dev "csv$i"
  ip netns exec "csn$i" ip link set lo up
  ip netns exec "csn$i" ip link set "csv$i" up
  ip netns exec "csn$i" ip route add default via "10.78.$i.1"
  ip netns exec "csn$i" tc qdisc add dev "csv$i" root tbf rate "${RATE}mbit" burst 256kb latency 50ms
done

ETCD_PORT=23791
etcd --name bench --data-dir "$DEV/etcd" \
  --listen-client-urls "http://0.0.0.0:$ETCD_PORT" --advertise-client-urls "http://10.78.1.1:$ETCD_PORT" \
  --listen-peer-urls http://127.0.0.1:23801 --initial-advertise-peer-urls http://127.0.0.1:23801 \
  --initial-cluster bench=http://127.0.0.1:23801 > "$WORK/etcd.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$ETCD_PORT" endpoint health >/dev/null 2>&1 && break; sleep 0.1; done

NODE_PIDS=()
# start_node I NAME [cluster args...]: storaged in namespace csnI on
# 10.78.I.2:7400, devices on /dev/shm.
start_node() {
  local i=$1 name=$2; shift 2
  ip netns exec "csn$i" "$BIN/storaged" serve --listen "10.78.$i.2:7400" --insecure --bulk-listen off \
    --data-dir "$DEV/$name" --device-size 1GiB "$@" > "$WORK/$name.out" 2> "$WORK/$name.err" &
  NODE_PIDS[$i]=$!
  PIDS+=($!)
  for _ in $(seq 300); do grep -q "listening" "$WORK/$name.out" 2>/dev/null && return 0; sleep 0.1; done
  echo "node $name did not start:" >&2; cat "$WORK/$name.err" >&2; exit 1
}
stop_nodes() {
  for i in "${!NODE_PIDS[@]}"; do kill "${NODE_PIDS[$i]}" 2>/dev/null || true; wait "${NODE_PIDS[$i]}" 2>/dev/null || true; done
  NODE_PIDS=()
}
ctl() { "$BIN/storagectl" --server http://10.78.1.2:7400 --transport grpc "$@"; }
# epoch_secs DATASET WORKERS BATCH: seconds of one epoch (storagectl's own clock).
epoch_secs() {
  ctl epoch "$1" --workers "$2" --batch "$3" | sed -n 's/.* in \([0-9.]*\) s:.*/\1/p'
}
median() { python3 -c 'import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

SHARD_BYTES=$(du -sb "$WORK/src/shards" | cut -f1)
SAMPLE_BYTES=$(du -sb "$WORK/src/samples" | cut -f1)
ROWS=()
# measure LABEL NODES: ROUNDS epochs of each workload; appends a row.
measure() {
  local label=$1 nodes=$2 s=() m=()
  for _ in $(seq "$ROUNDS"); do
    s+=("$(epoch_secs shards 4 1)")
    m+=("$(epoch_secs samples 4 16)")
  done
  local ss ms
  ss=$(median "${s[@]}"); ms=$(median "${m[@]}")
  ROWS+=("$label $nodes $ss $ms")
  echo "   $label: shards ${s[*]} s, samples ${m[*]} s"
}

echo "== 1 node (no cluster)"
start_node 1 single
ctl ingest shards "$WORK/src/shards" > /dev/null
ctl ingest samples "$WORK/src/samples" > /dev/null
measure one 1
stop_nodes

for n in $(seq 2 "$NODES_MAX"); do
  echo "== $n nodes, ec:$((n - 1))+1"
  for i in $(seq 1 "$n"); do
    start_node "$i" "c$n-n$i" --cluster "etcd://10.78.$i.1:$ETCD_PORT" --cluster-name "c$n" --node-id "n$i"
  done
  ctl ingest --class "ec:$((n - 1))+1" shards "$WORK/src/shards" > /dev/null
  ctl ingest --class "ec:$((n - 1))+1" samples "$WORK/src/samples" > /dev/null
  measure cluster "$n"
  if [ "$n" = "$NODES_MAX" ]; then
    kill -9 "${NODE_PIDS[2]}"; wait "${NODE_PIDS[2]}" 2>/dev/null || true; unset 'NODE_PIDS[2]'
    measure one_killed "$n"
  fi
  stop_nodes
done

python3 - "$WORK/results.json" "$SHARD_BYTES" "$SAMPLE_BYTES" "$SAMPLES" "$RATE" "${ROWS[@]}" <<'EOF'
import json, sys
out, shard_bytes, sample_bytes, samples, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rows = [r.split() for r in sys.argv[6:]]
one = next(r for r in rows if r[0] == "one")
one_shard = shard_bytes / float(one[2]) / 2**20
one_sample = samples / float(one[3])
healthy = {}
result = {"rate_mbit_per_node": rate, "rows": []}
print(f"per-node link {rate} Mbit/s ({rate / 8 * 1e6 / 2**20:.1f} MiB/s)")
print(f"{'row':<12} {'nodes':>5} {'shards MiB/s':>13} {'x N*one':>8} {'samples/s':>10} {'x N*one':>8}")
for label, n, ss, ms in rows:
    n = int(n)
    shard = shard_bytes / float(ss) / 2**20
    sample = samples / float(ms)
    if label == "cluster":
        healthy[n] = (shard, sample)
    r = {"row": label, "nodes": n, "shards_mib_s": round(shard, 1), "samples_s": round(sample),
         "shards_vs_n_one": round(shard / (n * one_shard), 2), "samples_vs_n_one": round(sample / (n * one_sample), 2)}
    if label == "one_killed":
        r["shards_vs_healthy"] = round(shard / healthy[n][0], 2)
        r["samples_vs_healthy"] = round(sample / healthy[n][1], 2)
    result["rows"].append(r)
    extra = f"  ({r['shards_vs_healthy']}x / {r['samples_vs_healthy']}x healthy)" if label == "one_killed" else ""
    print(f"{label:<12} {n:>5} {shard:>13.1f} {r['shards_vs_n_one']:>8.2f} {sample:>10.0f} {r['samples_vs_n_one']:>8.2f}{extra}")
json.dump(result, open(out, "w"), indent=2)
print(f"wrote {out}")
EOF
