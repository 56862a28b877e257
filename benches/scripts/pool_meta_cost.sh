#!/usr/bin/env bash
# What recording the catalog on the devices (pool roots and manifests)
# costs: ingest of large objects and the commit of a dataset of many empty
# objects, two builds alternating on the same tmpfs devices (CPU ceiling:
# tmpfs takes O_DIRECT here), and how long a start takes to rebuild a lost
# catalog of that many objects (new build only).
#
#   bash benches/scripts/pool_meta_cost.sh OLD_RELEASE_DIR NEW_RELEASE_DIR [OBJECTS] [REPS]
#
# OLD/NEW_RELEASE_DIR hold `storaged` and `storagectl` (target/release).
# Prints one line per run and the medians.
set -euo pipefail
old=$1
new=$2
objects=${3:-1000000}
reps=${4:-3}
work=$(mktemp -d /dev/shm/poolmeta.XXXXXX)
trap 'pkill -f "storaged serve --listen 127.0.0.1:7611" || true; rm -rf "$work"' EXIT

mkdir -p "$work/big" "$work/many"
for i in 0 1 2 3; do
    head -c $((256 << 20)) /dev/urandom > "$work/big/part$i.bin"
done
# Empty files, 1000 per directory.
python3 - "$work/many" "$objects" <<'EOF'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, f"{i // 1000:04d}")
    if i % 1000 == 0:
        os.makedirs(d, exist_ok=True)
    open(os.path.join(d, f"{i % 1000:03d}"), "w").close()
EOF

now() { date +%s.%N; }

# serve BIN_DIR DATA: a fresh daemon on 4 x 2 GiB tmpfs devices.
serve() {
    "$1/storaged" serve --listen 127.0.0.1:7611 --data-dir "$2" --device-size 2GiB \
        --device "$2/d0" --device "$2/d1" --device "$2/d2" --device "$2/d3" \
        > "$2.log" 2>&1 &
    for _ in $(seq 1 600); do
        "$1/storagectl" --server http://127.0.0.1:7611 status > /dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "storaged did not start: $(tail -3 "$2.log")" >&2
    exit 1
}
stop() { pkill -f "storaged serve --listen 127.0.0.1:7611" || true; while pgrep -f "storaged serve --listen 127.0.0.1:7611" > /dev/null; do sleep 0.05; done; }

declare -A results
for rep in $(seq 1 "$reps"); do
    for build in old new; do
        dir=${!build}
        data="$work/data-$build-$rep"
        serve "$dir" "$data"
        t0=$(now)
        "$dir/storagectl" --server http://127.0.0.1:7611 ingest big "$work/big" > /dev/null
        t1=$(now)
        "$dir/storagectl" --server http://127.0.0.1:7611 ingest many "$work/many" > /dev/null
        t2=$(now)
        big=$(echo "$t1 - $t0" | bc)
        many=$(echo "$t2 - $t1" | bc)
        results[$build-big]+="$big "
        results[$build-many]+="$many "
        echo "rep $rep $build: 1 GiB in 4 objects $big s; $objects empty objects $many s"
        stop
        if [ "$build" = new ]; then
            rm "$data/catalog.redb"
            t0=$(now)
            serve "$dir" "$data"
            t1=$(now)
            rebuilt=$(echo "$t1 - $t0" | bc)
            results[new-recover]+="$rebuilt "
            echo "rep $rep new: start with the catalog deleted ($objects + 4 objects) $rebuilt s"
            "$dir/storagectl" --server http://127.0.0.1:7611 status | grep -E "catalog:|pool root"
            stop
        fi
        rm -rf "$data"
    done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for k in old-big new-big old-many new-many new-recover; do
    echo "median $k: $(echo "${results[$k]}" | median) s"
done
