"""Reads every file of a directory tree the way a sample loader does, on a
cold page cache, for hand measurements of the mount against a local folder
(BENCHMARKS.md, "The mount, second pass").

    python3 benches/python/read_tree.py DIR --threads 16     # files/s, GiB/s
    python3 benches/python/read_tree.py DIR --latency        # per-call medians
    python3 benches/python/read_tree.py DIR --cpu-of PID ...  # and CPU per file
    python3 benches/python/read_tree.py DIR --drop 3 --exact  # as the harness reads

Files are shuffled (fixed seed) and stat'ed first (a training job has
listed its dataset), then the page cache is dropped (needs root): each
file is opened, read with 1 MiB reads to its end, and closed, by
--threads threads. --latency reads 1000 files with one thread and prints
the median of each call (open, first read, the read at end of file,
close). --cpu-of adds, per file read, the CPU time of each PID given
(storaged, the mount), of the whole machine, and its context switches,
all counted over the reading alone.
"""

import argparse
import os
import random
import statistics
import threading
import time


def files_of(root):
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    files.sort()
    random.Random(7).shuffle(files)
    for f in files:
        os.stat(f)
    return files


def drop_page_cache(what=1):
    """1: the page cache; 3: dentries and inodes too (the benchmark
    harness's cold start)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write(f"{what}\n")


def cpu_ticks(pid):
    """utime + stime of `pid`, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def machine():
    """(busy ticks of all CPUs, context switches) so far."""
    busy, switches = 0, 0
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu "):
                t = list(map(int, line.split()[1:]))
                busy = sum(t) - t[3] - t[4]
            elif line.startswith("ctxt "):
                switches = int(line.split()[1])
    return busy, switches


def throughput(files, threads, cpu_of=(), exact=False):
    next_file = iter(files)
    lock = threading.Lock()
    total = [0]

    def work():
        read = 0
        while True:
            with lock:
                path = next(next_file, None)
            if path is None:
                break
            fd = os.open(path, os.O_RDONLY)
            if exact:
                read += len(os.pread(fd, os.fstat(fd).st_size, 0))
            else:
                while chunk := os.read(fd, 1 << 20):
                    read += len(chunk)
            os.close(fd)
        with lock:
            total[0] += read

    before = [cpu_ticks(p) for p in cpu_of], machine()
    start = time.perf_counter()
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - start
    after = [cpu_ticks(p) for p in cpu_of], machine()
    print(f"{len(files) / seconds:.0f} files/s {total[0] / seconds / 2**30:.2f} GiB/s")
    if cpu_of:
        us = 1e6 / os.sysconf("SC_CLK_TCK") / len(files)
        per_pid = " ".join(
            f"pid {p} {(b - a) * us:.0f} us" for p, a, b in zip(cpu_of, before[0], after[0])
        )
        busy = (after[1][0] - before[1][0]) * us
        switches = (after[1][1] - before[1][1]) / len(files)
        print(f"CPU per file: {per_pid}, machine {busy:.0f} us; {switches:.1f} context switches")


def latency(files):
    calls = {"open": [], "read": [], "read at end": [], "close": []}
    for path in files[:1000]:
        t0 = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        t1 = time.perf_counter()
        os.read(fd, 1 << 20)
        t2 = time.perf_counter()
        os.read(fd, 1 << 20)
        t3 = time.perf_counter()
        os.close(fd)
        t4 = time.perf_counter()
        for name, us in zip(calls, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            calls[name].append(us * 1e6)
    print(" ".join(f"{name} {statistics.median(v):.0f} us" for name, v in calls.items()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--latency", action="store_true")
    parser.add_argument("--cpu-of", type=int, nargs="*", default=[], metavar="PID")
    parser.add_argument("--drop", type=int, choices=[1, 3], default=1,
                        help="drop_caches value: 3 drops dentries and inodes too")
    parser.add_argument("--exact", action="store_true",
                        help="one pread of each file's size (the harness's way)")
    args = parser.parse_args()
    files = files_of(args.root)
    drop_page_cache(args.drop)
    if args.latency:
        latency(files)
    else:
        throughput(files, args.threads, args.cpu_of, args.exact)


if __name__ == "__main__":
    main()
