#!/usr/bin/env python3
"""samples/s of PyTorch DataLoaders over storaged, plain grpcio and a local
folder, against the Rust loader, in one run (issue 6; BENCHMARKS.md).

    cargo build --release --bins
    .venv/bin/python benches/python/loader_bench.py [--quick] [--out bench-out/python]

Creates an ImageNet-like tree (samples of 60-160 KiB), starts
target/release/storaged on 4 device files, ingests it, then for each
system, alternating, on a cold page cache (root drops the caches before each
epoch): one epoch with DataLoader(batch 256, 4 workers, identity transform).

- storaged.torch.IterableDataset (the Rust plan and prefetching loader,
  zero-copy shared memory when local; packed batches cross the worker
  queue as shared-memory segments, storaged.torch.Batch), and the same over
  gRPC (`transport="as-given"`); and once more with a consumer that reads
  a byte of every 4 KiB page of each batch (so mapping the segments in the
  main process is counted, not left to a later consumer); and the second
  epoch of a DataLoader with persistent workers (steady state: regions and
  segments reused);
- the pure-grpcio example's reader in an IterableDataset (ReadBatch of each
  worker's batches);
- a torchvision-style folder MapDataset reading the same files from a local
  directory (open().read()), and storaged.torch.MapDataset with the same
  DataLoader (shuffle, batch 256: one read per batch, into shared memory
  on this host);
- the folder MapDataset again over `storagectl mount` of the same dataset
  (`mount_folder`; needs root and /dev/fuse);
- the Rust loader itself: `storagectl epoch --workers 4 --batch 256`, on
  the same two transports (`--transport auto`: shm; `as-given`: gRPC with
  read-ahead hints), and the second of two epochs in one storagectl
  process (steady state).

Medians of the repetitions; results.json in --out.
"""

import argparse
import hashlib
import json
import os
import pathlib
import random
import re
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

import storaged.torch as st

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "examples"))
import grpc_client  # noqa: E402

BATCH, WORKERS = 256, 4


def drop_caches():
    os.sync()
    try:
        pathlib.Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        print("warning: cannot drop caches (not root): warm-cache figures", file=sys.stderr)


def start_mount(ctl, where, extra=()):
    """`storagectl mount` of every dataset at `where` with the options
    `extra`, once it says ready; None without root or /dev/fuse."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        return None
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([*ctl, "mount", *extra, str(where)], stdout=subprocess.PIPE,
                            stderr=open(str(where) + ".log", "w"), text=True)
    for line in proc.stdout:
        if line.rstrip().endswith("ready"):
            return proc
    raise RuntimeError(f"storagectl mount exited with {proc.wait()}; see {where}.log")


def identity_collate(batch):
    return batch


class FolderDataset(Dataset):
    """torchvision.datasets.DatasetFolder without decoding: bytes of each file."""

    def __init__(self, root):
        self.files = sorted(str(p) for p in pathlib.Path(root).rglob("*") if p.is_file())

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with open(self.files[i], "rb") as f:
            return f.read()


class GrpcDataset(IterableDataset):
    """Each worker reads its share of a shuffled order with ReadBatch."""

    def __init__(self, target, dataset, paths, seed):
        self.target, self.dataset, self.paths, self.seed = target, dataset, paths, seed

    def __iter__(self):
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        order = list(self.paths)
        random.Random(self.seed).shuffle(order)
        mine = order[w::n]
        reader = grpc_client.StoragedReader(self.target)
        for at in range(0, len(mine), BATCH):
            chunk = mine[at:at + BATCH]
            got = reader.read_batch(self.dataset, chunk, max_in_flight=64, any_order=True)
            yield [got[i] for i in range(len(chunk))]


def epoch(loader, touch=False):
    t0 = time.perf_counter()
    n = 0
    for batch in loader:
        n += len(batch)
        if touch:
            # One byte of every page: the main process maps all of it.
            int(batch.data[::4096].sum())
    return n / (time.perf_counter() - t0), n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench-out" / "python"))
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--mount-arg", action="append", default=[],
                    help="an option for `storagectl mount` (repeatable), e.g. --mount-arg=--no-direct-reads")
    ap.add_argument("--systems", default=None,
                    help="only these systems (comma-separated), e.g. storaged_map,local_folder")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    work = out / "work"
    subprocess.run(["rm", "-rf", str(work)], check=True)
    (work / "src").mkdir(parents=True)
    count = 3000 if args.quick else 12000
    reps = args.reps or (1 if args.quick else 3)
    rnd = random.Random(1)
    for i in range(count):
        p = work / "src" / f"train/{i // 1000:03d}/img_{i:06d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(hashlib.sha256(str(i).encode()).digest() * (rnd.randint(60, 160) * 32))
    bin_dir = ROOT / "target" / "release"
    data = work / "data"
    data.mkdir()
    daemon = subprocess.Popen(
        [str(bin_dir / "storaged"), "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data),
         "--device-size", "4GiB"], stdout=subprocess.PIPE, stderr=open(work / "storaged.log", "w"))
    addr = daemon.stdout.readline().decode().split()[-1]
    url = f"http://{addr}"
    ctl = [str(bin_dir / "storagectl"), "--server", url]
    try:
        subprocess.run([*ctl, "ingest", "imagenet", str(work / "src")], check=True, capture_output=True)
        paths = [o.path for o in grpc_client.StoragedReader(addr).objects("imagenet")]
        mount = start_mount(ctl, work / "mnt", args.mount_arg)
        kw = dict(num_workers=WORKERS, multiprocessing_context="fork", collate_fn=identity_collate)
        systems = {
            "storaged_torch": lambda e: DataLoader(_iterable(url, e, "auto"), batch_size=None, **kw),
            "storaged_torch_grpc": lambda e: DataLoader(_iterable(url, e, "as-given"), batch_size=None, **kw),
            "storaged_torch_touched": lambda e: DataLoader(_iterable(url, e, "auto"), batch_size=None, **kw),
            "storaged_torch_persistent": lambda e: DataLoader(_iterable(url, e, "auto"), batch_size=None,
                                                              persistent_workers=True, **kw),
            "grpcio_example": lambda e: DataLoader(GrpcDataset(addr, "imagenet", paths, e), batch_size=None, **kw),
            "local_folder": lambda e: DataLoader(FolderDataset(work / "src"), batch_size=BATCH, shuffle=True, **kw),
            "storaged_map": lambda e: DataLoader(st.MapDataset(url, "imagenet"), batch_size=BATCH, shuffle=True, **kw),
            # The same folder dataset as local_folder, through `storagectl mount`.
            "mount_folder": lambda e: DataLoader(FolderDataset(work / "mnt" / "imagenet"), batch_size=BATCH,
                                                 shuffle=True, **kw),
        }
        if mount is None:
            print("mount_folder left out: `storagectl mount` needs root and /dev/fuse", flush=True)
            systems.pop("mount_folder")
        rust = ["rust_loader", "rust_loader_grpc", "rust_loader_2nd_epoch"]
        if args.systems:
            wanted = set(args.systems.split(","))
            systems = {k: v for k, v in systems.items() if k in wanted}
            rust = [k for k in rust if k in wanted]
        results = {k: [] for k in [*systems, *rust]}
        for rep in range(reps):
            for name, make in systems.items():
                loader = make(rep)
                if name.endswith("_persistent"):
                    # Steady state: the workers, their regions and their
                    # segments from a first epoch serve the measured one.
                    epoch(loader)
                drop_caches()
                rate, n = epoch(loader, touch=name.endswith("_touched"))
                del loader
                assert n == count, f"{name} read {n} of {count}"
                results[name].append(rate)
                print(f"rep {rep} {name}: {rate:.0f} samples/s", flush=True)
            for name, transport, epochs in [(k, t, e) for k, t, e in
                                            [("rust_loader", "auto", 1), ("rust_loader_grpc", "as-given", 1),
                                             ("rust_loader_2nd_epoch", "auto", 2)] if k in rust]:
                drop_caches()
                text = subprocess.run([*ctl, "--transport", transport, "epoch", "imagenet",
                                      "--workers", str(WORKERS), "--batch", str(BATCH),
                                      "--epochs", str(epochs), "--seed", str(rep)],
                                     check=True, capture_output=True, text=True).stdout
                # The last epoch's line (the second one is the steady state).
                rate = float(re.findall(r"([0-9.]+) samples/s", text)[-1])
                results[name].append(rate)
                print(f"rep {rep} {name}: {rate:.0f} samples/s", flush=True)
    finally:
        if mount is not None:
            mount.terminate()
            mount.wait()
        daemon.terminate()
        daemon.wait()
    med = {k: statistics.median(v) for k, v in results.items()}

    def ratio(a, b):
        return med[a] / med[b] if a in med and b in med else None

    summary = {
        "samples": count, "reps": reps, "batch": BATCH, "workers": WORKERS,
        "samples_per_s": results, "median": med,
        "storaged_map_vs_local_folder": ratio("storaged_map", "local_folder"),
        "mount_folder_vs_local_folder": ratio("mount_folder", "local_folder"),
    }
    if not args.systems:
        summary.update(_full_ratios(med))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    subprocess.run(["rm", "-rf", str(work)], check=True)


def _full_ratios(med):
    return {
        "storaged_torch_vs_rust_loader": med["storaged_torch"] / med["rust_loader"],
        "storaged_torch_vs_local_folder": med["storaged_torch"] / med["local_folder"],
        "storaged_torch_vs_grpcio": med["storaged_torch"] / med["grpcio_example"],
        "storaged_torch_touched_vs_rust_loader": med["storaged_torch_touched"] / med["rust_loader"],
        "storaged_torch_touched_vs_local_folder": med["storaged_torch_touched"] / med["local_folder"],
        "storaged_torch_grpc_vs_rust_loader_grpc": med["storaged_torch_grpc"] / med["rust_loader_grpc"],
        "storaged_torch_persistent_vs_rust_loader_2nd_epoch":
            med["storaged_torch_persistent"] / med["rust_loader_2nd_epoch"],
    }


def _iterable(url, e, transport):
    ds = st.IterableDataset(url, "imagenet", seed=e, batch_size=BATCH, transport=transport)
    ds.set_epoch(e)
    return ds


if __name__ == "__main__":
    main()
