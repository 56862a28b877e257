"""What a new user of storaged.torch meets first (issue 13): epochs that
advance, checkpoints that cannot be silently wrong, PyTorch's default
collate, len(), Clients in place of URLs, large objects over TCP, and the
training process letting go of exited workers' memory."""

import gc
import time

import pytest
import torch
from torch.utils.data import DataLoader

import storaged
import storaged.torch as st

from conftest import pattern, write_tree


def _orders(loader, epochs, between=None):
    """The sample order of `epochs` iterations of `loader`."""
    out = []
    for e in range(epochs):
        if between:
            between(e)
        out.append([p for b in loader for p in b.paths])
    return out


def _fresh_order(url, epoch, context):
    ds = st.IterableDataset(url, "samples", seed=5, batch_size=4)
    ds.set_epoch(epoch)
    return [p for b in DataLoader(ds, batch_size=None, num_workers=2,
                                  multiprocessing_context=context) for p in b.paths]


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_epochs_advance_in_persistent_workers(daemon, context):
    # Guards against persistent workers replaying one order: set_epoch in
    # the training process did not reach them, and without set_epoch every
    # epoch was epoch 0. Each iteration now reads the next epoch, and
    # set_epoch takes precedence.
    ds = st.IterableDataset(daemon.url, "samples", seed=5, batch_size=4)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True,
                        multiprocessing_context=context)
    auto = _orders(loader, 3)
    assert auto[0] != auto[1] != auto[2] != auto[0]
    assert auto[1] == _fresh_order(daemon.url, 1, context)
    explicit = _orders(loader, 2, between=lambda e: ds.set_epoch(7) if e == 0 else None)
    assert explicit[0] == _fresh_order(daemon.url, 7, context)
    assert explicit[1] == _fresh_order(daemon.url, 8, context)


def test_epochs_advance_without_workers_and_per_sample(daemon):
    # Guards the same without workers (the training process iterates) and
    # for single samples.
    ds = st.IterableDataset(daemon.url, "samples", seed=5, transform=lambda s: s.path)
    first, second = list(ds), list(ds)
    assert sorted(first) == sorted(second) and first != second
    ds.set_epoch(0)
    assert list(ds) == first


def test_state_dict_of_a_multi_worker_loader_is_refused(daemon):
    # Guards against a silently wrong checkpoint: with DataLoader workers,
    # the training process's copy said consumed 0.
    ds = st.IterableDataset(daemon.url, "samples", seed=1, batch_size=4)
    it = iter(DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork"))
    next(it)
    with pytest.raises(RuntimeError, match="StatefulDataLoader"):
        ds.state_dict()
    del it
    # Without workers it is the real position.
    ds2 = st.IterableDataset(daemon.url, "samples", seed=1, batch_size=4)
    it = iter(ds2)
    next(it)
    assert ds2.state_dict()["consumed"] == 4


def test_default_collate_takes_samples_and_explains_batches(daemon, files):
    # Guards against PyTorch's default collate failing on storaged.Buffer,
    # and the packed-path mistake (batch_size on both) giving a bare
    # TypeError.
    ds = st.IterableDataset(daemon.url, "samples", seed=1)
    batch = next(iter(DataLoader(ds, batch_size=8, num_workers=2, multiprocessing_context="fork")))
    assert isinstance(batch, st.Sample) and len(batch.path) == 8
    assert isinstance(batch.index, torch.Tensor) and batch.index.shape == (8,)
    assert [bytes(d) for d in batch.data] == [files[p] for p in batch.path]
    packed = st.IterableDataset(daemon.url, "samples", seed=1, batch_size=4)
    with pytest.raises(TypeError, match="batch_size=None"):
        next(iter(DataLoader(packed, batch_size=4)))
    m = st.MapDataset(daemon.url, "samples")
    batch = next(iter(DataLoader(m, batch_size=5)))
    assert [bytes(d) for d in batch.data] == [files[p] for p in batch.path]


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_len_is_what_a_loader_yields(daemon, files, workers):
    # Guards against len(DataLoader(ds)) failing (no __len__) or disagreeing
    # with what is yielded, whatever the worker count.
    n = sum(1 for k in files if k.startswith("train/"))
    kw = {"multiprocessing_context": "fork"} if workers else {}
    for world, batch in [(1, 5), (3, 4)]:
        packed = st.IterableDataset(daemon.url, "samples", seed=1, batch_size=batch,
                                    rank=0, world_size=world)
        loader = DataLoader(packed, batch_size=None, num_workers=workers, **kw)
        got = list(loader)
        assert len(loader) == len(packed) == len(got), (world, batch)
        assert sum(len(b) for b in got) == -(-n // world)
        per_sample = st.IterableDataset(daemon.url, "samples", seed=1, rank=0, world_size=world,
                                        transform=lambda s: s.path)
        assert len(per_sample) == -(-n // world) == len(list(per_sample))


def test_a_client_is_taken_wherever_a_url_is(daemon, files):
    # Guards against a storaged.Client being refused where a URL works.
    client = storaged.Client(daemon.url)
    m = st.MapDataset(client, "samples")
    assert bytes(m[0].data) == files[m[0].path]
    it = st.IterableDataset(client, "samples", seed=1, batch_size=8)
    assert sum(len(b) for b in it) == len(m)
    with pytest.raises(TypeError, match="storaged.Client"):
        st.MapDataset(42, "samples")


def _handoff_mappings():
    """Other processes' handoff segments mapped here (this process's own
    segments, from batches it lent itself, have an fd open here)."""
    import os
    import pathlib
    own = set()
    for fd in pathlib.Path("/proc/self/fd").iterdir():
        try:
            if "storaged-handoff" in os.readlink(fd):
                own.add(str(os.stat(fd).st_ino))
        except OSError:
            pass
    with open("/proc/self/maps") as f:
        return len({line.split()[4] for line in f if "storaged-handoff" in line} - own)


def test_exited_workers_segments_are_unmapped(daemon):
    # Guards against the training process keeping exited workers' handoff
    # segments mapped (about 400 MiB after a non-persistent epoch) until
    # the next epoch's first batch.
    ds = st.IterableDataset(daemon.url, "samples", seed=1, batch_size=4)
    for b in DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork"):
        pass
    del b
    gc.collect()
    deadline = time.monotonic() + 20
    while _handoff_mappings() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _handoff_mappings() == 0


def test_objects_over_the_any_order_limit_load_over_tcp(fresh_daemon, tmp_path):
    # Guards against remote loading failing with RESOURCE_EXHAUSTED on any
    # dataset holding an object over 64 MiB (the loader's any-order batch
    # item limit): every client on another host.
    files = {"shard/000.tar": pattern(7, (64 << 20) + 12345)}
    files.update({f"s/{i}": pattern(i, 1000 + i) for i in range(6)})
    write_tree(tmp_path / "src", files)
    fresh_daemon.ctl("ingest", "big", str(tmp_path / "src"))
    for batch_size in [None, 3]:
        ds = st.IterableDataset(fresh_daemon.url, "big", seed=1, transport="as-given",
                                batch_size=batch_size)
        seen = {}
        for item in ds:
            for s in (item if batch_size else [item]):
                seen[s.path] = bytes(s.data.numpy() if batch_size else s.data)
        assert seen == files


def _shm_served(daemon):
    line = next(l for l in daemon.ctl("status").splitlines() if l.startswith("served:"))
    return line.split(" shm ")[1].split(" (")[0]


def test_map_dataset_reads_through_shared_memory_on_the_same_host(daemon, files):
    # Guards against MapDataset reading every item over gRPC on the same
    # host (0.81x a plain folder): batches land in shared memory, and the
    # remote path still works.
    samples = {k: v for k, v in files.items() if k.startswith("train/")}
    before = _shm_served(daemon)
    local = st.MapDataset(daemon.url, "samples")
    got = {}
    for batch in DataLoader(local, batch_size=8, collate_fn=list):
        got.update((s.path, bytes(s.data)) for s in batch)
    assert got == samples
    assert _shm_served(daemon) != before, "no bytes were served over shared memory"
    assert bytes(local[3].data) == samples[local[3].path]
    remote = st.MapDataset(storaged.Client(daemon.url, transport="as-given"), "samples")
    assert {s.path: bytes(s.data) for s in remote.__getitems__(range(len(remote)))} == samples
