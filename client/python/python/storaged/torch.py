"""PyTorch datasets over storaged (needs torch; ``import storaged`` does not).

Wherever a URL is taken, a ``storaged.Client`` may be given instead (its URL
and transport are used, and it is reused in the process that made it).

- ``MapDataset(url, dataset, transform=None, retry_budget_s=30.0)``:
  ``len`` and ``[i]`` (the object at index ``i`` in path order), for any
  sampler, including ``DistributedSampler``. A DataLoader with a
  ``batch_size`` fetches each batch with one call (``__getitems__``), and
  on the same host the bytes land in shared memory without a copy.
- ``IterableDataset(url, dataset, shuffle=True, seed=0, batch_size=None,
  transform=None, rank=None, world_size=None, drop_last=False,
  prefetch_bytes=64 MiB, transport="auto", retry_budget_s=30.0,
  shuffle_block_size=1)``: each (rank, DataLoader worker) reads its share of
  the epoch in the deterministic shuffled order of the Rust plan, through
  the Rust prefetching loader (the zero-copy shared-memory path when the
  server is on this host). The default order is a uniform shuffle;
  ``shuffle_block_size=K`` shuffles blocks of ``K`` path-adjacent objects
  instead (clustered reads, but batches then hold few classes of
  class-sorted data). Every rank gets the same number of samples (padded by
  repeating, or cut with ``drop_last``); ``len()`` is that number, or the
  number of batches per rank with ``batch_size`` (batches are dealt to
  DataLoader workers whole, so the count does not depend on
  ``num_workers``).

**Epochs.** Each new iteration reads the next epoch (0, 1, 2, ...), in
every DataLoader worker, persistent or not, forked or spawned: the epoch is
kept in memory shared by the dataset and all its worker copies.
``set_epoch(e)`` in the training process takes precedence: the next
iteration reads epoch ``e``, the one after ``e + 1``.

**Resume.** ``state_dict()``/``load_state_dict()`` continue exactly
mid-epoch with torchdata's ``StatefulDataLoader``, which checkpoints each
worker's state (resume with the same ``num_workers``). A plain
``DataLoader`` with workers cannot be checkpointed this way: the training
process's copy of the dataset does not know where its workers are, so its
``state_dict()`` raises instead of returning a wrong position.

A batch that fails because storaged is unreachable (a restart) is read
again for up to ``retry_budget_s`` seconds, then ``storaged.Unavailable`` is
raised; the same holds for connecting and listing when an epoch starts, and
for ``MapDataset`` reads.

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
  ``DataLoader(ds, batch_size=None)``: a ``Batch`` is already a batch, and
  collating batches again fails with an error that says so.
- with ``batch_size`` and a ``transform``: a list of what the transform
  returns, per sample;
- without ``batch_size``: each sample (transformed, if there is one).

A ``transform`` receives a ``Sample`` (``path``, ``index``, ``data``: a
zero-copy read-only buffer; ``torch.frombuffer(s.data, dtype=torch.uint8)``
views it without copying) and returns what the dataset yields. Untransformed
samples work with PyTorch's default collate: a batch of them is one
``Sample`` whose ``path`` is a list, ``index`` a tensor and ``data`` a list
of buffers.
"""

from __future__ import annotations

import math
import mmap
import os
import time
from typing import Any, Callable, NamedTuple, Optional, Union

import torch
import torch.utils.data as tud

from . import Buffer, Client, StoragedError
from ._native import RETRY_BACKOFF_INITIAL_S, RETRY_BACKOFF_MAX_S

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

    def __init__(self, url: Union[str, Client], dataset: str, transport: Optional[str] = None,
                 token: Optional[str] = None, tls=None):
        client = None
        if isinstance(url, Client):
            client, url = url, url.url
            transport = transport or client.transport
            token = token or client.token
            tls = tls or client.tls
        elif not isinstance(url, str):
            raise TypeError(f"url must be a URL string or a storaged.Client, not {type(url).__name__}")
        self.url = url
        self.dataset_name = dataset
        self.transport = transport or "auto"
        # Workers connect again with it (a spawned worker's environment
        # need not hold STORAGED_TOKEN).
        self.token = token
        # (ca, cert, key) for https://, as paths; None: the environment's.
        self.tls = tuple(str(p) if p is not None else None for p in tls) if tls else (None, None, None)
        self._client = client
        self._ds = None

    def dataset(self):
        if self._ds is None:
            ca, cert, key = self.tls
            client = self._client or Client(self.url, transport=self.transport, token=self.token,
                                            ca=ca, cert=cert, key=key)
            self._ds = client.dataset(self.dataset_name)
        return self._ds

    def __getstate__(self):
        return {"url": self.url, "dataset_name": self.dataset_name, "transport": self.transport,
                "token": self.token, "tls": self.tls}

    def __setstate__(self, state):
        self.__init__(state["url"], state["dataset_name"], state.get("transport", "auto"),
                      state.get("token"), state.get("tls"))


def _retrying(budget_s: float, what: str, call: Callable):
    """``call()``, again while it raises an error the client calls transient
    (``e.transient``: storaged away or restarting; the Rust client's one
    classifier) and ``budget_s`` seconds allow, with the client's backoff;
    then the last error, saying so."""
    started = time.monotonic()
    delay_s = RETRY_BACKOFF_INITIAL_S
    attempts = 1
    while True:
        try:
            return call()
        except StoragedError as e:
            if not getattr(e, "transient", False):
                raise
            elapsed_s = time.monotonic() - started
            if elapsed_s + delay_s > budget_s:
                raise type(e)(
                    f"{e} ({what}: gave up after {attempts} attempts in {elapsed_s:.1f} s)"
                ) from e
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, RETRY_BACKOFF_MAX_S)
            attempts += 1


class MapDataset(tud.Dataset):
    """Random access by index; see the module docs."""

    def __init__(self, url: Union[str, Client], dataset: str, transform: Optional[Callable] = None,
                 retry_budget_s: float = 30.0):
        self._conn = _Connection(url, dataset)
        self.transform = transform
        self.retry_budget_s = retry_budget_s
        self._paths = [o["path"] for o in self._conn.dataset().objects()]

    def __len__(self) -> int:
        return len(self._paths)

    def _index(self, index: int) -> int:
        n = len(self._paths)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} is out of range for {n} samples")
        return index

    def _sample(self, index: int, data):
        sample = Sample(self._paths[index], index, data)
        return self.transform(sample) if self.transform else sample

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices) -> list:
        """A DataLoader's whole batch in one call: read straight into shared
        memory when storaged is on this host (the buffers are views of it),
        else one ReadBatch."""
        indices = [self._index(int(i)) for i in indices]
        what = f"reading {self._paths[indices[0]]!r}" if len(indices) == 1 else f"reading a batch of {len(indices)}"
        datas = _retrying(self.retry_budget_s, what, lambda: self._conn.dataset().read_objects(indices))
        return [self._sample(i, d) for i, d in zip(indices, datas)]


def _distributed(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return (
            torch.distributed.get_rank() if rank is None else rank,
            torch.distributed.get_world_size() if world_size is None else world_size,
        )
    return (rank or 0), (world_size or 1)


class _SharedEpoch:
    """The epoch, in memory shared by a dataset and every copy of it that
    DataLoader workers make (forked: inherited; spawned: mapped again from
    the creating process's memfd when unpickled).

    Slots (int64): the epoch ``set_epoch`` asked for and a generation that
    each ``set_epoch`` bumps; then per worker id the generation it last saw
    and the epoch its next iteration reads; last, whether a worker process
    has iterated. Each process writes only its own worker's slots (and the
    training process the first two), so no lock is needed."""

    WORKERS_MAX = 1024
    _SLOTS = 2 + 2 * WORKERS_MAX + 1
    _ITERATED = _SLOTS - 1

    def __init__(self, _attach=None):
        size = self._SLOTS * 8
        if _attach is None:
            self._fd = os.memfd_create("storaged-epoch", os.MFD_CLOEXEC)
            os.ftruncate(self._fd, size)
        else:
            pid, fd = _attach
            self._fd = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        self._pid = os.getpid()
        self._map = mmap.mmap(self._fd, size)
        self._slots = memoryview(self._map).cast("q")

    def __reduce__(self):
        return (_SharedEpoch, ((self._pid, self._fd),))

    def set(self, epoch: int) -> None:
        self._slots[0] = epoch
        self._slots[1] += 1

    def begin(self, worker: int, resumed_epoch: Optional[int], in_worker: bool) -> int:
        """The epoch worker ``worker``'s new iteration reads."""
        if not 0 <= worker < self.WORKERS_MAX:
            raise ValueError(f"worker id {worker} is over the {self.WORKERS_MAX} workers supported")
        generation = self._slots[1]
        seen, upcoming = 2 + 2 * worker, 3 + 2 * worker
        if resumed_epoch is not None:
            epoch = resumed_epoch
        elif self._slots[seen] != generation:
            epoch = self._slots[0]
        else:
            epoch = self._slots[upcoming]
        self._slots[upcoming] = epoch + 1
        self._slots[seen] = generation
        if in_worker:
            self._slots[self._ITERATED] = 1
        return epoch

    def iterated_in_workers(self) -> bool:
        return bool(self._slots[self._ITERATED])


class IterableDataset(tud.IterableDataset):
    """Sharded, shuffled, prefetched epochs; see the module docs."""

    def __init__(
        self,
        url: Union[str, Client],
        dataset: str,
        shuffle: bool = True,
        seed: int = 0,
        batch_size: Optional[int] = None,
        transform: Optional[Callable] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        drop_last: bool = False,
        prefetch_bytes: int = _PREFETCH_BYTES,
        transport: Optional[str] = None,
        retry_budget_s: float = 30.0,
        shuffle_block_size: int = 1,
    ):
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        if shuffle_block_size < 1:
            raise ValueError(f"shuffle_block_size must be at least 1, not {shuffle_block_size}")
        self._conn = _Connection(url, dataset, transport)
        self.shuffle = shuffle
        self.seed = seed
        self.batch_size = batch_size
        self.transform = transform
        self.shuffle_block_size = shuffle_block_size
        self.rank, self.world_size = _distributed(rank, world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is out of range for world_size {self.world_size}")
        self.drop_last = drop_last
        self.prefetch_bytes = prefetch_bytes
        self.retry_budget_s = retry_budget_s
        # Checks the dataset now, in the caller's process, and lists it
        # once for every worker forked from here.
        self._object_count = len(self._conn.dataset())
        self._epoch = _SharedEpoch()
        # The epoch this copy read last (or reads next, before any).
        self.epoch = 0
        # Samples this copy (one worker, or the main process) has yielded
        # in the current epoch; a resume's (epoch, start) for the next
        # iteration; whether this copy has iterated.
        self._consumed = 0
        self._resume: Optional[tuple[int, int]] = None
        self._iterated_here = False
        # The native loader of the epoch being iterated here, and what the
        # last finished (or abandoned) one counted.
        self._reading = None
        self._read_paths: dict = {}

    def read_paths(self) -> dict:
        """Which paths served the epoch this copy iterated last (or is
        iterating): batches and bytes over shared memory (``shm_*``, same
        host), the TCP bulk channel (``bulk_*``, remote hosts) and gRPC
        (``grpc_*``). Counted in the process that iterates: with DataLoader
        workers, ask in a worker. Empty before any iteration."""
        return self._reading.stats() if self._reading is not None else dict(self._read_paths)

    def __getstate__(self):
        # A native loader does not cross processes (nor should its memory).
        state = self.__dict__.copy()
        state["_reading"] = None
        return state

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration reads (in every DataLoader worker,
        persistent ones included); the ones after it follow on."""
        self._epoch.set(int(epoch))
        self.epoch = int(epoch)
        self._consumed = 0
        self._resume = None

    def __len__(self) -> int:
        """Samples per rank, or batches per rank with ``batch_size``."""
        n, world = self._object_count, self.world_size
        per_rank = n // world if self.drop_last else -(-n // world)
        if self.batch_size:
            return math.ceil(per_rank / self.batch_size)
        return per_rank

    def state_dict(self) -> dict:
        """Where this copy is: enough to continue exactly after the last
        sample it yielded. Call it where the samples are read: in a
        DataLoader worker (torchdata's ``StatefulDataLoader`` does), or in
        the training process with ``num_workers=0``."""
        if tud.get_worker_info() is None and not self._iterated_here and self._epoch.iterated_in_workers():
            raise RuntimeError(
                "state_dict() of the training process's copy of a storaged IterableDataset "
                "read by DataLoader workers cannot know where those workers are: checkpoint "
                "with torchdata's StatefulDataLoader (from torchdata.stateful_dataloader import "
                "StatefulDataLoader), which saves each worker's state"
            )
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
        self._resume = (self.epoch, self._consumed)

    def _record(self, index: int, path: str, data):
        s = Sample(path, index, data)
        return self.transform(s) if self.transform else s

    def __iter__(self):
        info = tud.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        resumed_epoch, start = self._resume if self._resume else (None, 0)
        self._resume = None
        self.epoch = self._epoch.begin(worker, resumed_epoch, in_worker=info is not None)
        self._iterated_here = True
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
            block_size=self.shuffle_block_size,
            # Whole batches to each worker: the rank's batch count then
            # does not depend on num_workers (what len() says).
            deal_batches=bool(self.batch_size),
        ))
        self._reading = loader
        try:
            yield from self._batches(loader)
        finally:
            self._read_paths = loader.stats()
            self._reading = None

    def _batches(self, loader):
        if self.batch_size and self.transform is None:
            while (packed := loader.next_packed()) is not None:
                lent, indices, paths, offsets = packed
                self._consumed += len(paths)
                yield Batch._from_lent(lent, indices, paths, offsets)
            return
        for batch in loader:
            if self.batch_size:
                self._consumed += len(batch)
                yield [self._record(i, p, d) for i, p, d in batch]
            else:
                for i, p, d in batch:
                    self._consumed += 1
                    yield self._record(i, p, d)


def _collate_buffers(batch, *, collate_fn_map=None):
    """Buffers of different lengths cannot be stacked: a batch keeps them
    as a list (``torch.frombuffer`` views each)."""
    return list(batch)


def _collate_batches(batch, *, collate_fn_map=None):
    raise TypeError(
        "storaged.torch.Batch is already a batch of samples (the dataset was made with "
        "batch_size); give the DataLoader batch_size=None: DataLoader(ds, batch_size=None, ...)"
    )


def _register_collate() -> None:
    """Teaches PyTorch's default collate the types these datasets yield."""
    try:
        from torch.utils.data._utils.collate import default_collate_fn_map
    except ImportError:  # torch < 2.0: collate_fn needed, as documented
        return
    default_collate_fn_map.setdefault(Buffer, _collate_buffers)
    default_collate_fn_map.setdefault(Batch, _collate_batches)


_register_collate()
