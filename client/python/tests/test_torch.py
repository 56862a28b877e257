"""storaged.torch with real DataLoaders (2 workers, fork) against a live
storaged."""

import json
import gc
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import torch  # noqa: E402  (the test command installs it; never skipped)
from torch.utils.data import DataLoader  # noqa: E402

import storaged  # noqa: E402
import storaged.torch as st  # noqa: E402


def ident(s):
    return (s.index, s.path, bytes(s.data))


def test_import_storaged_does_not_need_torch():
    code = "import sys; sys.modules['torch'] = None; import storaged; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_map_dataset_with_two_workers_reads_every_sample(daemon, files):
    ds = st.MapDataset(daemon.url, "ds", transform=ident)
    assert len(ds) == len(files)
    loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=list,
                        multiprocessing_context="fork")
    seen = {p: d for batch in loader for _, p, d in batch}
    assert seen == files
    # A transform gets a zero-copy buffer it can view as a tensor.
    t = st.MapDataset(daemon.url, "ds", transform=lambda s: torch.frombuffer(s.data, dtype=torch.uint8))
    i = sorted(files).index("edge/4097")
    assert bytes(t[i].numpy()) == files["edge/4097"]


def epoch_order(url, seed, epoch, rank, world):
    ds = st.IterableDataset(url, "samples", seed=seed, rank=rank, world_size=world, transform=ident)
    ds.set_epoch(epoch)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=list,
                        multiprocessing_context="fork")
    return [p for batch in loader for _, p, _ in batch]


def test_iterable_dataset_covers_each_sample_once_per_epoch(daemon, files):
    samples = sorted(k for k in files if k.startswith("train/"))
    ranks = [epoch_order(daemon.url, 7, 0, r, 2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(samples) // 2
    assert sorted(ranks[0] + ranks[1]) == samples
    # Deterministic for a seed and epoch; different for another of either.
    assert ranks[0] == epoch_order(daemon.url, 7, 0, 0, 2)
    assert ranks[0] != epoch_order(daemon.url, 8, 0, 0, 2)
    assert ranks[0] != epoch_order(daemon.url, 7, 1, 0, 2)
    # An uneven split is padded so every rank gets the same count.
    uneven = [epoch_order(daemon.url, 7, 0, r, 3) for r in range(3)]
    assert len({len(u) for u in uneven}) == 1 and set(sum(uneven, [])) == set(samples)


RESUME = textwrap.dedent("""
    import json, sys
    from torchdata.stateful_dataloader import StatefulDataLoader
    import storaged.torch as st
    mode, url, stop, state_in = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    if mode == "packed":
        ds = st.IterableDataset(url, "samples", seed=3, batch_size=4)
        dl = StatefulDataLoader(ds, batch_size=None, num_workers=2,
                                multiprocessing_context="fork")
    else:
        ds = st.IterableDataset(url, "samples", seed=3, transform=lambda s: s.path)
        dl = StatefulDataLoader(ds, batch_size=4, num_workers=2, collate_fn=list,
                                multiprocessing_context="fork")
    ds.set_epoch(2)
    if state_in != "-":
        dl.load_state_dict(json.load(open(state_in)))
    out = []
    for i, batch in enumerate(dl):
        out.extend(batch.paths if mode == "packed" else batch)
        if stop and i + 1 == stop:
            json.dump(dl.state_dict(), open(sys.argv[5], "w"))
            break
    print(json.dumps(out))
""")


@pytest.mark.parametrize("mode", ["per-sample", "packed"])
def test_resume_mid_epoch_in_a_new_process(daemon, tmp_path, mode):
    # Guards exact resume: stop mid-epoch, save the state, and a new
    # process continues with exactly the samples not yet seen (transformed
    # samples, and packed batches).
    import torchdata.stateful_dataloader  # noqa: F401  (installed by the test command)
    script = tmp_path / "resume.py"
    script.write_text(RESUME)
    state = tmp_path / "state.json"

    def run(*args):
        out = subprocess.run([sys.executable, str(script), mode, daemon.url, *args],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    whole = run("0", "-")
    first = run("5", "-", str(state))
    rest = run("0", str(state))
    assert len(first) == 20
    assert first + rest == whole


def test_no_leaks_over_ten_epochs(daemon):
    # Guards against memory growth: buffers are released once dropped.
    def rss_kib():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))

    # Single samples with a transform, and packed batches (shared-memory
    # segments, reused once each batch is dropped).
    for ds in [st.IterableDataset(daemon.url, "samples", seed=1, transform=lambda s: len(s.data)),
               st.IterableDataset(daemon.url, "samples", seed=1, batch_size=8)]:
        sizes = []
        for epoch in range(10):
            ds.set_epoch(epoch)
            total = sum(x if isinstance(x, int) else int(x.offsets[-1]) for x in ds)
            sizes.append(total)
            if epoch == 1:
                base = rss_kib()
        grown = rss_kib() - base
        assert len(set(sizes)) == 1
        assert grown < 20 * 1024, f"RSS grew by {grown} KiB over 8 epochs"
    assert _handoff_segments(os.getpid()) <= 5


def test_errors_reach_the_training_loop(daemon):
    with pytest.raises(storaged.NotFound):
        st.MapDataset(daemon.url, "no-such-dataset")
    with pytest.raises(ValueError):
        st.IterableDataset(daemon.url, "samples", rank=2, world_size=2)


def _epoch_across(daemon, files, restart, retry_budget_s=30.0):
    """One epoch of a 2-worker DataLoader over the Unix socket, stopping
    (and maybe restarting) storaged after the first batch arrives."""
    from conftest import write_tree

    samples = {k: v for k, v in files.items() if k.startswith("train/")}
    src = daemon.data.parent / "restart-src"
    write_tree(src, samples)
    daemon.ctl("ingest", "samples", str(src))
    ds = st.IterableDataset(daemon.unix_url, "samples", seed=3, batch_size=2, transform=ident,
                            prefetch_bytes=1, retry_budget_s=retry_budget_s)
    loader = DataLoader(ds, batch_size=None, num_workers=2, collate_fn=list,
                        multiprocessing_context="fork", prefetch_factor=1)
    seen = []
    for batch in loader:
        if not seen:
            daemon.stop()
            if restart:
                daemon.start()
        seen += batch
    return samples, seen


def test_an_epoch_survives_a_server_restart(fresh_daemon, files):
    # Guards against an epoch that dies when storaged restarts: each worker's
    # loader reads its failed batches again, and every sample arrives once.
    samples, seen = _epoch_across(fresh_daemon, files, restart=True)
    assert sorted(p for _, p, _ in seen) == sorted(samples)
    assert all(d == samples[p] for _, p, d in seen)


def test_an_epoch_gives_up_when_the_server_stays_down(fresh_daemon, files):
    # Guards against a hang when storaged does not come back: the training
    # loop gets storaged.Unavailable once the retry budget is spent.
    with pytest.raises(storaged.Unavailable, match="gave up"):
        _epoch_across(fresh_daemon, files, restart=False, retry_budget_s=0.5)


def _handoff_segments(pid):
    """The batch handoff segments (memfds) process `pid` has open."""
    def target(fd):
        try:
            return os.readlink(fd)
        except FileNotFoundError:  # closed meanwhile (the listing's own fd)
            return ""

    return sum(1 for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir() if "storaged-handoff" in target(fd))


def _handoff_mappings():
    """Handoff segments (distinct memfds) this process has mapped."""
    with open("/proc/self/maps") as f:
        return len({line.split()[4] for line in f if "storaged-handoff" in line})


def _check_batch(batch, files, listing):
    assert isinstance(batch, st.Batch)
    assert batch.data.dtype == torch.uint8 and len(batch.offsets) == len(batch) + 1
    for s, view in zip(batch, batch.tensors()):
        assert listing[s.index] == s.path
        assert bytes(s.data.numpy()) == files[s.path] == bytes(view.numpy())


def test_packed_batches_cross_from_workers_in_shared_memory(daemon, files):
    # Guards the batch handoff: packed batches arrive intact from forked
    # workers, stay intact while the main process holds them (the worker
    # must not reuse their segments), outlive their workers, and segments
    # are reused, not leaked, across epochs.
    listing = [o["path"] for o in storaged.Client(daemon.url).dataset("samples").objects()]
    ds = st.IterableDataset(daemon.url, "samples", seed=1, batch_size=4)
    loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork",
                        persistent_workers=True, prefetch_factor=2)
    kept = list(loader)
    assert sorted(p for b in kept for p in b.paths) == sorted(listing)
    for b in kept:
        _check_batch(b, files, listing)
    workers = [w.pid for w in loader._iterator._workers]
    for _ in range(6):
        for b in loader:
            _check_batch(b, files, listing)
    # What the main process kept through six more epochs is untouched.
    for b in kept:
        _check_batch(b, files, listing)
    # Each worker lent its kept batches (8) plus at most a few in flight
    # and free ones; dropping the batches lets the segments be reused.
    assert all(_handoff_segments(pid) <= 8 + 2 + 4 for pid in workers)
    view, want = kept[0].tensors()[0], files[kept[0].paths[0]]
    del kept, b
    gc.collect()
    for _ in range(3):
        for b in loader:
            pass
    assert all(_handoff_segments(pid) <= 2 + 4 + 1 for pid in workers), [
        _handoff_segments(pid) for pid in workers]
    # A view outlives its batch, and its worker.
    del loader
    gc.collect()
    assert bytes(view.numpy()) == want
    # The training process keeps a few mappings per live worker, and lets
    # those of exited workers go (once no batch of theirs is referenced).
    del view
    gc.collect()
    for _ in range(2):
        for b in DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork"):
            _check_batch(b, files, listing)
        del b
    assert _handoff_mappings() <= 2 * 6, _handoff_mappings()


def test_a_lent_batch_is_mapped_once_and_bad_handles_are_named(daemon, files):
    # Guards against two processes writing one segment: a handed-over batch
    # is mapped by one receiver; a second unpickle after it was given back
    # fails, as does a handle to nothing.
    import pickle

    ds = st.IterableDataset(daemon.url, "samples", seed=1, batch_size=8, shuffle=False)
    batch = next(iter(ds))
    listing = [o["path"] for o in storaged.Client(daemon.url).dataset("samples").objects()]
    _check_batch(batch, files, listing)
    wire = pickle.dumps(batch)
    del batch
    gc.collect()
    received = pickle.loads(wire)
    _check_batch(received, files, listing)
    del received
    gc.collect()
    with pytest.raises(OSError, match="no longer lent"):
        pickle.loads(wire)
    with pytest.raises(OSError, match="cannot map the batch"):
        storaged._native._attach_lent(os.getpid(), 999_999, 1, 1, 10)
    with pytest.raises(IndexError):
        st.Batch(torch.empty(0, dtype=torch.uint8), [0], [], [])[0]
    with pytest.raises(ValueError, match="offsets"):
        st.Batch(torch.empty(0, dtype=torch.uint8), [], [], [])


def test_packed_batches_with_spawned_workers(daemon, files):
    # Guards the handoff when workers are spawned, not forked (nothing is
    # inherited: the dataset is pickled over and each worker connects and
    # lists on its own).
    ds = st.IterableDataset(daemon.url, "samples", seed=2, batch_size=4)
    seen = {}
    for b in DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn"):
        for s in b:
            seen[s.path] = bytes(s.data.numpy())
    assert seen == {k: v for k, v in files.items() if k.startswith("train/")}


def test_threads_lending_packed_batches_at_once(daemon, files):
    # Guards concurrent lending: threads of one process lending packed
    # batches at once (the outbox is one per process, its lock never held
    # across the GIL-free copy) each get every sample intact, and none hangs.
    import threading

    samples = {k: v for k, v in files.items() if k.startswith("train/")}
    results = {}

    def run(seed):
        ds = st.IterableDataset(daemon.url, "samples", seed=seed, batch_size=2)
        got = {}
        for _ in range(5):
            for b in ds:
                for s in b:
                    got[s.path] = bytes(s.data.numpy())
        results[seed] = got

    threads = [threading.Thread(target=run, args=(seed,), daemon=True) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "lending threads hung"
    assert all(results[seed] == samples for seed in range(4))
