#!/usr/bin/env python3
"""Where the CPU of one DataLoader epoch goes: the main process, its
workers and storaged, for storaged.torch against the Rust loader, on both
transports (BENCHMARKS.md, "Python DataLoaders").

    cargo build --release --bins
    .venv/bin/python benches/python/loader_cpu.py [--reps 2] [--samples 12000]

Same dataset shape as loader_bench.py (ImageNet-like, 60-160 KiB), batch
256, 4 workers, fork. Prints per epoch: wall time, storaged's CPU seconds
(/proc/<pid>/stat), the main process's and its children's (getrusage;
the DataLoader's workers, or the storagectl process for the Rust loader).
"""

import argparse
import hashlib
import os
import pathlib
import random
import resource
import subprocess
import tempfile
import time

from torch.utils.data import DataLoader

import storaged.torch as st

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = ROOT / "target" / "release"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--samples", type=int, default=12000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        rnd = random.Random(1)
        for i in range(args.samples):
            p = work / "src" / f"train/{i // 1000:03d}/img_{i:06d}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(hashlib.sha256(str(i).encode()).digest() * (rnd.randint(60, 160) * 32))
        (work / "data").mkdir()
        daemon = subprocess.Popen(
            [str(BIN / "storaged"), "serve", "--listen", "127.0.0.1:0", "--data-dir",
             str(work / "data"), "--device-size", "4GiB"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            url = "http://" + daemon.stdout.readline().decode().split()[-1]
            ctl = [str(BIN / "storagectl"), "--server", url]
            subprocess.run([*ctl, "ingest", "imagenet", str(work / "src")], check=True, capture_output=True)
            ticks = os.sysconf("SC_CLK_TCK")

            def server_cpu_s():
                fields = open(f"/proc/{daemon.pid}/stat").read().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / ticks

            def cpu_s(who):
                r = resource.getrusage(who)
                return r.ru_utime + r.ru_stime

            def measure(name, run):
                before = (server_cpu_s(), cpu_s(resource.RUSAGE_SELF), cpu_s(resource.RUSAGE_CHILDREN))
                t0 = time.perf_counter()
                run()
                wall = time.perf_counter() - t0
                s, m, c = (server_cpu_s() - before[0], cpu_s(resource.RUSAGE_SELF) - before[1],
                           cpu_s(resource.RUSAGE_CHILDREN) - before[2])
                print(f"{name:24s} wall {wall:.2f} s  storaged {s:.2f}  main {m:.2f}  children {c:.2f}", flush=True)

            def python(transport, seed):
                def run():
                    ds = st.IterableDataset(url, "imagenet", seed=seed, batch_size=256, transport=transport)
                    loader = DataLoader(ds, batch_size=None, num_workers=4, multiprocessing_context="fork")
                    n = sum(len(b) for b in loader)
                    assert n == args.samples, n
                return run

            def rust(transport, seed):
                return lambda: subprocess.run(
                    [*ctl, "--transport", transport, "epoch", "imagenet", "--workers", "4",
                     "--batch", "256", "--epochs", "1", "--seed", str(seed)],
                    check=True, capture_output=True)

            for rep in range(args.reps):
                for transport in ("auto", "as-given"):
                    measure(f"storaged.torch {transport}", python(transport, rep))
                    measure(f"rust loader {transport}", rust(transport, rep))
        finally:
            daemon.terminate()
            daemon.wait()


if __name__ == "__main__":
    main()
