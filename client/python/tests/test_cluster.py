"""The Python package against a cluster: the same `Client`, `Dataset` and
`storaged.torch` calls as against one node, given any node's URL; bytes
come straight from the nodes that hold them, with parity in place of a
node that is down."""

import json
import os
import signal
import time

import pytest
from torch.utils.data import DataLoader

import storaged
import storaged.torch as st


def ident(s):
    return (s.index, s.path, bytes(s.data))


def test_a_cluster_dataset_reads_as_a_local_one_does(cluster, files):
    """Guards against a cluster URL needing other calls, or giving other
    bytes or another order, than one node's."""
    _, nodes = cluster
    c = storaged.Client(nodes["n2"].url)
    assert "ds" in [d["name"] for d in c.datasets()]
    ds = c.dataset("ds")
    assert ds.is_cluster
    assert len(ds) == len(files)
    assert [(o["path"], o["size"]) for o in ds.objects()] == [(p, len(files[p])) for p in sorted(files)]
    assert [o["path"] for o in ds.objects(prefix="edge/")] == sorted(p for p in files if p.startswith("edge/"))
    for p, data in files.items():
        assert bytes(ds.read(p)) == data, p
    assert bytes(ds.read(-1)) == files[sorted(files)[-1]]
    st_ = ds.stat("edge/4097")
    assert (st_["size"], st_["extents"]) == (4097, [])

    # Ranges across chunk (1 MiB) and stripe (2 MiB) boundaries of a
    # 3 MiB object, and at its ends.
    big = files["big/shard.bin"]
    for off, n in [(0, 1), ((1 << 20) - 7, 14), ((2 << 20) - 100, 300), (5, (3 << 20) - 10),
                   ((3 << 20) - 1, 1), (3 << 20, 0), (123, 0)]:
        assert bytes(ds.read_range("big/shard.bin", off, n)) == big[off:off + n], (off, n)
    with pytest.raises(storaged.OutOfRange, match="past its end"):
        ds.read_range("big/shard.bin", (3 << 20) - 1, 2)
    with pytest.raises(storaged.NotFound, match="no object"):
        ds.read("train/nope.jpg")

    idx = [0, 5, -1, 3]
    listing = sorted(files)
    assert [bytes(b) for b in ds.read_objects(idx)] == [files[listing[i]] for i in idx]
    got = ds.read_batch(["edge/one", ("big/shard.bin", (1 << 20) - 3, 6), "edge/empty"])
    assert [bytes(b) for b in got] == [b"x", big[(1 << 20) - 3:(1 << 20) + 3], b""]
    with pytest.raises(storaged.NotFound):
        c.dataset("nope")


def one_epoch(ds):
    loader = ds.loader(seed=1, epoch=0, rank=0, world_size=1, worker=0, num_workers=1,
                       shuffle=True, drop_last=False, batch_size=8, prefetch_bytes=4 << 20)
    got = {p: bytes(d) for batch in loader for _, p, d in batch}
    return got, loader.stats()


@pytest.mark.parametrize("transport,path", [("auto", "shm"), ("grpc", "grpc")])
def test_nodes_are_read_over_the_transport_asked_for(cluster, files, transport, path):
    """Guards against cluster reads ignoring the transport: nodes on this
    host are read through shared memory by default (as one node is), and
    every node over gRPC when `transport="grpc"` says so."""
    _, nodes = cluster
    got, stats = one_epoch(storaged.Client(nodes["n2"].url, transport=transport).dataset("ds"))
    assert got == files
    total = sum(len(v) for v in files.values())
    assert stats[f"{path}_bytes"] == total, stats
    assert stats[f"{path}_batches"] == (len(files) + 7) // 8, stats


def epoch(url, seed):
    ds = st.IterableDataset(url, "ds", seed=seed, rank=0, world_size=1, transform=ident)
    ds.set_epoch(3)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=list,
                        multiprocessing_context="fork")
    return [(p, d) for batch in loader for _, p, d in batch]


def test_an_epoch_over_a_cluster_is_the_single_node_epoch(cluster, daemon, files):
    """Guards against a cluster changing a seed's sample order (a job
    moved onto a cluster must see the same epochs) or losing samples
    across DataLoader workers (forked after the dataset was opened)."""
    _, nodes = cluster
    on_cluster = epoch(nodes["n3"].url, 11)
    assert on_cluster == epoch(daemon.url, 11)
    assert sorted(p for p, _ in on_cluster) == sorted(files)
    assert all(d == files[p] for p, d in on_cluster)

    m = st.MapDataset(nodes["n1"].url, "ds", transform=ident)
    loader = DataLoader(m, batch_size=8, num_workers=2, collate_fn=list,
                        multiprocessing_context="fork")
    assert {p: d for batch in loader for _, p, d in batch} == files


def wait_for(what, timeout_s, done):
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def node_states(daemon):
    s = json.loads(daemon.ctl("cluster", "status", "--json"))
    return {n["node_id"]: n["state"] for n in s["nodes"]}


def test_a_node_killed_mid_epoch_costs_no_sample(cluster, files):
    """Guards against a dead node ending a Python epoch or dropping,
    repeating or corrupting samples: its chunks come from parity."""
    _, nodes = cluster
    ds = storaged.Client(nodes["n1"].url).dataset("ds")
    loader = ds.loader(seed=5, epoch=0, rank=0, world_size=1, worker=0, num_workers=1,
                       shuffle=True, drop_last=False, batch_size=4, prefetch_bytes=1 << 20)
    seen = []
    for i, batch in enumerate(loader):
        seen += [(p, bytes(d)) for _, p, d in batch]
        if i == 1:
            os.kill(nodes["n3"].proc.pid, signal.SIGKILL)
            nodes["n3"].proc.wait()
    assert sorted(p for p, _ in seen) == sorted(files)
    assert all(d == files[p] for p, d in seen)
    stats = loader.stats()
    assert stats["shm_bytes"] + stats["bulk_bytes"] + stats["grpc_bytes"] == sum(len(v) for v in files.values())

    # A fresh dataset handle opens with the node down, and reads on.
    again = storaged.Client(nodes["n2"].url).dataset("ds")
    assert bytes(again.read("big/shard.bin")) == files["big/shard.bin"]

    nodes["n3"].start()
    wait_for("n3 back up", 30, lambda: node_states(nodes["n1"]).get("n3") == "up")
    assert bytes(storaged.Client(nodes["n3"].url).dataset("ds").read("edge/4096")) == files["edge/4096"]
