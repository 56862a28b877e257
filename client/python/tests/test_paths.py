"""Which path serves Python's reads (issue 18): shared memory on the same
host, storaged's TCP bulk channel for a TCP connection, gRPC when told;
each can be forced by name, the loader and storaged.torch say which one
served, and a forced path that is not there is an error naming why."""

import pytest

import storaged
import storaged.torch as st

PATHS = {"auto": "shm", "shm": "shm", "as-given": "bulk", "bulk": "bulk", "grpc": "grpc"}


def _epoch(client, batch_size=8):
    ds = client.dataset("samples")
    loader = ds.loader(seed=3, epoch=0, rank=0, world_size=1, worker=0, num_workers=1,
                       shuffle=True, drop_last=False, batch_size=batch_size,
                       prefetch_bytes=1 << 20)
    got = {}
    # Each batch is let go before the next is asked for: a consumer that
    # holds every region makes the loader read a batch over gRPC instead.
    while (batch := next(loader, None)) is not None:
        got.update((p, bytes(d)) for _, p, d in batch)
        del batch
    return got, loader.stats()


@pytest.mark.parametrize("transport", list(PATHS))
def test_each_transport_serves_every_batch_over_its_path(daemon, files, transport):
    # Guards against a forced or automatic path quietly taking another (a
    # TCP client read everything over gRPC although the bulk channel was
    # offered), and against the stats not saying which path served.
    client = storaged.Client(daemon.url, transport=transport)
    assert client.transport == transport
    got, stats = _epoch(client)
    want = {k: v for k, v in files.items() if k.startswith("train/")}
    assert got == want
    path = PATHS[transport]
    batches = -(-len(want) // 8)
    assert stats[f"{path}_batches"] == batches, stats
    assert stats[f"{path}_bytes"] == sum(len(v) for v in want.values()), stats
    for other in {"shm", "bulk", "grpc"} - {path}:
        assert stats[f"{other}_batches"] == 0, stats


def test_a_forced_path_that_is_not_there_is_named(daemon):
    # Guards against `bulk` on the Unix socket or an unknown name being
    # taken as something else.
    with pytest.raises(storaged.FailedPrecondition, match="transport bulk: .*TCP url"):
        storaged.Client(daemon.unix_url, transport="bulk")
    with pytest.raises(storaged.InvalidArgument, match='"rdma" is none of auto, shm, bulk'):
        storaged.Client(daemon.url, transport="rdma")


def test_a_bulk_channel_that_is_off_fails_bulk_and_falls_back_under_auto(tmp_path, files):
    # Guards against `bulk` falling back to gRPC when storaged offers no
    # channel (a forced path must fail), while as-given reads over gRPC.
    from conftest import Daemon, write_tree
    d = Daemon(tmp_path / "data", extra=["--bulk-listen", "off"])
    try:
        write_tree(tmp_path / "src", {"a/b": files["edge/4097"]})
        d.ctl("ingest", "one", str(tmp_path / "src"))
        with pytest.raises(storaged.FailedPrecondition, match="offers no TCP bulk channel"):
            storaged.Client(d.url, transport="bulk")
        c = storaged.Client(d.url, transport="as-given")
        ds = c.dataset("one")
        loader = ds.loader(seed=0, epoch=0, rank=0, world_size=1, worker=0, num_workers=1,
                           shuffle=False, drop_last=False, batch_size=4, prefetch_bytes=1 << 20)
        assert [bytes(x) for b in loader for _, _, x in b] == [files["edge/4097"]]
        assert loader.stats()["grpc_batches"] == 1
    finally:
        d.stop()


@pytest.mark.parametrize("transport", ["bulk", "grpc", "auto"])
def test_torch_datasets_say_which_path_served_the_epoch(daemon, files, transport):
    # Guards against storaged.torch hiding the path: read_paths() counts
    # the epoch while it runs and after it ends.
    ds = st.IterableDataset(daemon.url, "samples", seed=1, batch_size=16, transport=transport)
    assert ds.read_paths() == {}
    it = iter(ds)
    first = next(it)
    live = ds.read_paths()
    rest = list(it)
    done = ds.read_paths()
    path = PATHS[transport]
    assert live[f"{path}_batches"] >= 1
    assert done[f"{path}_batches"] == 1 + len(rest)
    total = sum(len(v) for k, v in files.items() if k.startswith("train/"))
    assert done[f"{path}_bytes"] == total
    assert sum(len(b.paths) for b in [first, *rest]) == 64
