"""PyTorch datasets over storaged (needs torch; ``import storaged`` does not).

- ``MapDataset(url, dataset, transform=None, retry_budget_s=30.0)``:
  ``len`` and ``[i]`` (the object at index ``i`` in path order), for any
  sampler, including ``DistributedSampler``.
- ``IterableDataset(url, dataset, shuffle=True, seed=0, batch_size=None,
  transform=None, rank=None, world_size=None, drop_last=False,
  prefetch_bytes=64 MiB, transport="auto", retry_budget_s=30.0)``: each
  (rank, DataLoader worker) reads its share of the epoch in the
  deterministic block-shuffled order of the Rust plan, through the Rust
  prefetching loader (the zero-copy shared-memory path when the server is
  on this host). Every rank gets the same number of samples (padded by
  repeating, or cut with ``drop_last``). ``set_epoch(e)`` changes the
  order; ``state_dict()``/``load_state_dict()`` resume exactly mid-epoch and
  work with torchdata's ``StatefulDataLoader`` (which checkpoints each
  worker's state; resume with the same ``num_workers``). A batch that
  fails because storaged is unreachable (a restart) is read again for up
  to ``retry_budget_s`` seconds, then ``storaged.Unavailable`` is raised;
  the same holds for connecting and listing when an epoch starts, and for
  ``MapDataset`` reads.

What ``IterableDataset`` yields:

- with ``batch_size`` and no ``transform``: one ``Batch`` per batch, the
  fast path. Its samples' bytes are packed back to back in one
  ``torch.uint8`` tensor (``batch.data``; sample ``i`` is
  ``data[offsets[i]:offsets[i + 1]]``), in shared memory: a DataLoader
  worker copies each batch once into a segment of its own, and the main
  process maps the same pages when the batch arrives, instead of
  unpickling its bytes (``storaged.Lent``). The worker reuses a segment
  once the main process has dropped every view of the batch in it. A
  ``Batch`` is also a sequence of ``Sample``s whose ``data`` are views of
  ``batch.data``; ``batch.tensors()`` lists them, and ``pin_memory()``
  (what ``DataLoader(pin_memory=True)`` calls) pins the packed tensor. Use
  ``DataLoader(ds, batch_size=None)``; the default collate keeps it as is.
- with ``batch_size`` and a ``transform``: a list of what the transform
  returns, per sample;
- without ``batch_size``: each sample (transformed, if there is one).

A ``transform`` receives a ``Sample`` (``path``, ``index``, ``data``: a
zero-copy read-only buffer; ``torch.frombuffer(s.data, dtype=torch.uint8)``
views it without copying) and returns what the dataset yields. Without one,
single samples are yielded as they are; a DataLoader then needs a
``collate_fn`` that accepts them (for example ``collate_fn=list``).
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.utils.data as tud

from . import Client, Unavailable

_PREFETCH_BYTES = 64 << 20
_LOADER_BATCH = 64


class Sample(NamedTuple):
    """One object: its path, its index in the dataset's path order, and
    its bytes (a read-only buffer)."""

    path: str
    index: int
    data: Any


class Batch:
    """Samples packed in one ``torch.uint8`` tensor; see the module docs.

    ``data`` (the tensor), ``offsets`` (``len + 1`` byte offsets into it),
    ``indices`` (each sample's index in the dataset's path order) and
    ``paths``. Indexing and iterating give ``Sample``s whose ``data`` are
    views of ``data``."""

    __slots__ = ("data", "offsets", "indices", "paths", "_lent")

    def __init__(self, data, offsets, indices, paths, lent=None):
        if len(offsets) != len(paths) + 1 or len(indices) != len(paths):
            raise ValueError(
                f"a batch of {len(paths)} paths needs {len(paths)} indices and "
                f"{len(paths) + 1} offsets, not {len(indices)} and {len(offsets)}"
            )
        self.data = data
        self.offsets = offsets
        self.indices = indices
        self.paths = paths
        self._lent = lent

    @classmethod
    def _from_lent(cls, lent, indices, paths, offsets):
        # frombuffer keeps `lent` alive as long as any view of the tensor.
        data = torch.frombuffer(lent, dtype=torch.uint8) if len(lent) else torch.empty(0, dtype=torch.uint8)
        return cls(data, offsets, indices, paths, lent)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Sample:
        n = len(self.paths)
        if not -n <= i < n:
            raise IndexError(f"sample {i} is out of range for a batch of {n}")
        i %= n
        return Sample(self.paths[i], self.indices[i], self.data[self.offsets[i]:self.offsets[i + 1]])

    def __iter__(self):
        return (self[i] for i in range(len(self.paths)))

    def tensors(self) -> list:
        """Each sample's bytes, as views of ``data``."""
        return [self.data[a:b] for a, b in zip(self.offsets, self.offsets[1:])]

    def pin_memory(self, device=None) -> "Batch":
        """The same batch with ``data`` in pinned memory (a copy)."""
        data = self.data.pin_memory(device) if device is not None else self.data.pin_memory()
        return Batch(data, self.offsets, self.indices, self.paths)

    def __reduce__(self):
        if self._lent is not None:
            # The shared-memory segment's address, not the bytes.
            return (Batch._from_lent, (self._lent, self.indices, self.paths, self.offsets))
        return (Batch, (self.data, self.offsets, self.indices, self.paths))

    def __repr__(self) -> str:
        return f"<storaged.torch.Batch of {len(self.paths)} samples, {self.offsets[-1]} bytes>"


class _Connection:
    """A client and dataset handle, made on first use. A forked DataLoader
    worker inherits them, listing included (the Rust client reconnects by
    itself in a new process), so workers do not each list the dataset
    again; a spawned worker (unpickled) makes its own."""

    def __init__(self, url: str, dataset: str, transport: str = "auto"):
        self.url = url
        self.dataset_name = dataset
        self.transport = transport
        self._ds = None

    def dataset(self):
        if self._ds is None:
            self._ds = Client(self.url, transport=self.transport).dataset(self.dataset_name)
        return self._ds

    def __getstate__(self):
        return {"url": self.url, "dataset_name": self.dataset_name, "transport": self.transport}

    def __setstate__(self, state):
        self.__init__(state["url"], state["dataset_name"], state.get("transport", "auto"))


def _retrying(budget_s: float, what: str, call: Callable):
    """``call()``, again while it raises ``Unavailable`` (storaged away or
    restarting) and ``budget_s`` seconds allow; then the last error, saying
    so."""
    started = time.monotonic()
    delay_s = 0.05
    attempts = 1
    while True:
        try:
            return call()
        except Unavailable as e:
            elapsed_s = time.monotonic() - started
            if elapsed_s + delay_s > budget_s:
                raise Unavailable(
                    f"{e} ({what}: gave up after {attempts} attempts in {elapsed_s:.1f} s)"
                ) from e
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 2.0)
            attempts += 1


class MapDataset(tud.Dataset):
    """Random access by index; see the module docs."""

    def __init__(self, url: str, dataset: str, transform: Optional[Callable] = None,
                 retry_budget_s: float = 30.0):
        self._conn = _Connection(url, dataset)
        self.transform = transform
        self.retry_budget_s = retry_budget_s
        self._paths = [o["path"] for o in self._conn.dataset().objects()]

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int):
        n = len(self._paths)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} is out of range for {n} samples")
        path = self._paths[index]
        data = _retrying(self.retry_budget_s, f"reading {path!r}", lambda: self._conn.dataset().read(path))
        sample = Sample(path, index, data)
        return self.transform(sample) if self.transform else sample


def _distributed(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return (
            torch.distributed.get_rank() if rank is None else rank,
            torch.distributed.get_world_size() if world_size is None else world_size,
        )
    return (rank or 0), (world_size or 1)


class IterableDataset(tud.IterableDataset):
    """Sharded, shuffled, prefetched epochs; see the module docs."""

    def __init__(
        self,
        url: str,
        dataset: str,
        shuffle: bool = True,
        seed: int = 0,
        batch_size: Optional[int] = None,
        transform: Optional[Callable] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        drop_last: bool = False,
        prefetch_bytes: int = _PREFETCH_BYTES,
        transport: str = "auto",
        retry_budget_s: float = 30.0,
    ):
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self._conn = _Connection(url, dataset, transport)
        self.shuffle = shuffle
        self.seed = seed
        self.batch_size = batch_size
        self.transform = transform
        self.rank, self.world_size = _distributed(rank, world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is out of range for world_size {self.world_size}")
        self.drop_last = drop_last
        self.prefetch_bytes = prefetch_bytes
        self.retry_budget_s = retry_budget_s
        # Checks the dataset now, in the caller's process, and lists it
        # once for every worker forked from here.
        len(self._conn.dataset())
        self.epoch = 0
        # Samples this copy (one worker, or the main process) has yielded
        # in the current epoch, and where its next iteration starts.
        self._consumed = 0
        self._start = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch to read next (it changes the shuffle)."""
        self.epoch = epoch
        self._consumed = 0
        self._start = 0

    def state_dict(self) -> dict:
        """Where this copy is: enough to continue exactly after the last
        sample it yielded."""
        return {
            "epoch": self.epoch,
            "seed": self.seed,
            "consumed": self._consumed,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"state is for seed {state['seed']}, this dataset has seed {self.seed}"
            )
        self.epoch = int(state["epoch"])
        self._consumed = int(state["consumed"])
        self._start = self._consumed

    def _record(self, index: int, path: str, data):
        s = Sample(path, index, data)
        return self.transform(s) if self.transform else s

    def __iter__(self):
        info = tud.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        start = self._start
        self._consumed = start
        loader = _retrying(self.retry_budget_s, "starting the epoch", lambda: self._conn.dataset().loader(
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=num_workers,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            batch_size=self.batch_size or _LOADER_BATCH,
            prefetch_bytes=self.prefetch_bytes,
            start=start,
            retry_budget_s=self.retry_budget_s,
        ))
        if self.batch_size and self.transform is None:
            while (packed := loader.next_packed()) is not None:
                lent, indices, paths, offsets = packed
                self._consumed += len(paths)
                yield Batch._from_lent(lent, indices, paths, offsets)
            self._start = 0
            return
        for batch in loader:
            if self.batch_size:
                self._consumed += len(batch)
                yield [self._record(i, p, d) for i, p, d in batch]
            else:
                for i, p, d in batch:
                    self._consumed += 1
                    yield self._record(i, p, d)
        # The next iteration is the next epoch's unless set_epoch says so.
        self._start = 0
