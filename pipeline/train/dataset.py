"""Streaming a cache for training: an ``IterableDataset`` of whole batches, one process's share.

Each epoch has one **global row order**, the same in every process whatever the number of ranks:

1. storage chunks (``chunk_rows`` consecutive rows of one shard) are listed shard by shard; the
   shards are permuted with ``(seed, epoch)`` and so are the chunks inside each shard, so a shard's
   rows stay together in the order (one download per shard from object storage);
2. the rows of consecutive windows of ``shuffle_window`` rows are permuted (a shuffle buffer that
   every process computes alike);
3. global batch ``i`` is rows ``[i*B, (i+1)*B)`` of that order, ``B = world_size * batch_size``. Its
   rows are sorted by their place in step 1 and cut into ``world_size`` equal slices; rank ``r``
   takes slice ``r``. Sorting keeps each rank on a narrow run of chunks (it reads about 1/W of the
   data), and a batch's rows are the same set whatever W is: 2 ranks x batch b see exactly the rows
   of 1 rank x batch 2b.

The last global batch of an epoch may be short: it is filled up to a multiple of ``world_size`` with
the epoch's first rows, so every rank gets the same number of rows and runs the same number of steps.
DataLoader worker ``w`` of ``n`` makes batches ``w, w + n, ...``; the DataLoader hands them out in
order. Memory holds the decoded chunks of about one window. Every row's alignment key is checked
before it is used.

``all_ranks=True`` makes one stream for every process instead of one process's share: each global
batch as its ``world_size`` rank shares, rank 0's first. A loader that deals consecutive batches out to
its processes (``accelerate``'s prepared DataLoader, with or without ``dispatch_batches``; the Hugging
Face ``Trainer``) then gives process ``r`` exactly what rank ``r`` reads here.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import numbers
import os

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from kdpipe.pipeline.cache.reader import TeacherCache, release_shard
from kdpipe.pipeline.data import input_hash
from kdpipe.pipeline.errors import ConfigError, IntegrityError


def heldout_rows(num_rows: int, fraction: float) -> np.ndarray:
    """A fixed pseudo-random ``fraction`` of row numbers (the same for every run on this cache)."""
    if fraction <= 0:
        return np.zeros(0, dtype=np.int64)
    scrambled = (np.arange(num_rows, dtype=np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)
    return np.nonzero(scrambled < np.uint64(fraction * 2**32))[0]


def split_rows(num_rows: int, heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows) of a cache."""
    heldout = heldout_rows(num_rows, heldout_fraction)
    train = np.setdiff1d(np.arange(num_rows), heldout)
    return train, heldout


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of this process in ``torch.distributed``; (0, 1) when it is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@dataclasses.dataclass(frozen=True)
class EpochOrder:
    """One epoch's global order. ``rows[p]`` is the global row number at place ``p`` of step 1 (chunk
    order); ``places[j]`` is the place of the ``j``-th row of the shuffled order (steps 2 and 3)."""

    rows: np.ndarray  # [N] int64, grouped by chunk
    places: np.ndarray  # [N] int64, a permutation of range(N)

    def batch_rows(self, index: int, *, batch_size: int, rank: int, world_size: int) -> np.ndarray:
        """Global row numbers of rank ``rank``'s share of global batch ``index``, in chunk order."""
        n, step = len(self.places), batch_size * world_size
        if not 0 <= index * step < n:
            raise IndexError(f"batch {index} is past the epoch's {math.ceil(n / step)} batches")
        places = self.places[index * step : (index + 1) * step]
        if len(places) % world_size:  # the epoch's short last batch: fill it with the first rows
            fill = world_size - len(places) % world_size
            places = np.concatenate([places, np.resize(self.places, fill)])
        places = np.sort(places)
        share = len(places) // world_size
        return self.rows[places[rank * share : (rank + 1) * share]]


def epoch_order(chunks: list[tuple[int, np.ndarray]], *, seed: int, epoch: int, shuffle: bool,
                shuffle_window: int) -> EpochOrder:
    """The order of an epoch over ``chunks``: (shard index, global rows of the chunk) in cache order."""
    if not shuffle or not chunks:
        rows = np.concatenate([r for _, r in chunks]) if chunks else np.zeros(0, dtype=np.int64)
        return EpochOrder(rows, np.arange(len(rows)))
    rng = np.random.default_rng([seed, epoch])
    by_shard: dict[int, list[np.ndarray]] = collections.defaultdict(list)
    for shard, rows in chunks:
        by_shard[shard].append(rows)
    ordered = []
    for shard in rng.permutation(sorted(by_shard)):
        parts = by_shard[int(shard)]
        ordered += [parts[i] for i in rng.permutation(len(parts))]
    rows = np.concatenate(ordered)
    places = np.arange(len(rows))
    window = max(1, shuffle_window)
    for start in range(0, len(rows), window):
        places[start : start + window] = rng.permutation(places[start : start + window])
    return EpochOrder(rows, places)


class CacheDataset(IterableDataset):
    """Batches of teacher-cache rows as dicts of tensors (see :meth:`to_tensors`), for this process.

    rows: global row numbers to use (e.g. the training split); None = all rows.
    batch_size: rows per batch of this rank (the global batch is ``world_size`` times larger).
    inputs: model inputs for caches without token ids (module teachers): ``inputs[sample_index]``
    is fed to the student and must hash to the row's ``input_hash``.
    rank, world_size: this process's share; None = from ``torch.distributed`` (0 of 1 without it).
    all_ranks: yield every rank's share of each global batch in turn (rank 0's first), for loaders that
    deal batches out to processes themselves (``accelerate``); ``rank`` must then be None.
    Iterate it with ``DataLoader(dataset, batch_size=None, num_workers=...)``; ``len(dataset)`` is the
    number of batches an iteration yields.
    """

    def __init__(
        self, cache: str | os.PathLike | TeacherCache, *, batch_size: int, rows: np.ndarray | None = None,
        shuffle: bool = True, seed: int = 0, shuffle_window: int = 1024, verify_hashes: bool = True,
        inputs: np.ndarray | None = None, rank: int | None = None, world_size: int | None = None,
        all_ranks: bool = False,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} is invalid: pass the rows per batch, a positive integer")
        if all_ranks and rank is not None:
            raise ConfigError(f"all_ranks=True yields every rank's share, so rank={rank} has no meaning: "
                              "leave rank unset")
        self.cache = cache if isinstance(cache, TeacherCache) else TeacherCache(cache, verify_hashes=verify_hashes)
        selected = np.zeros(len(self.cache), dtype=bool)
        selected[np.arange(len(self.cache)) if rows is None else rows] = True
        self.batch_size, self.shuffle, self.seed, self.shuffle_window = int(batch_size), shuffle, seed, shuffle_window
        self.inputs = inputs
        default_rank, default_world = distributed_rank()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.all_ranks = all_ranks
        self.epoch, self.start_batch = 0, 0
        self._chunks = self._selected_chunks(selected)
        self._shard_starts = np.asarray(self.cache._starts)  # [shards + 1] first global row of each shard
        self.num_rows = int(selected.sum())
        if self.cache.schema.input_len is None and inputs is None:
            raise IntegrityError(
                "this cache holds no token ids (module teacher): pass the capture's .npz data "
                "(--data) so the student sees the same inputs"
            )

    def _selected_chunks(self, selected: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(shard, selected global rows) of every storage chunk holding selected rows, in cache order."""
        chunk_rows = self.cache.manifest["capture"]["chunk_rows"]
        out = []
        for shard, entry in enumerate(self.cache.shards):
            base = self.cache._starts[shard]
            for start in range(0, entry["rows"], chunk_rows):
                rows = base + np.nonzero(selected[base + start : base + min(start + chunk_rows, entry["rows"])])[0] + start
                if len(rows):
                    out.append((shard, rows))
        return out

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank makes per epoch (the same for all ranks)."""
        return math.ceil(self.num_rows / (self.batch_size * self.world_size))

    def __len__(self) -> int:
        """Batches one iteration yields: the epoch's from ``start_batch`` on (``world_size`` times as many
        with ``all_ranks``)."""
        return max(0, self.batches_per_epoch - self.start_batch) * (self.world_size if self.all_ranks else 1)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate epoch ``epoch`` from its global batch ``start_batch`` (earlier ones are skipped unread)."""
        self.epoch, self.start_batch = epoch, start_batch

    def order(self) -> EpochOrder:
        return epoch_order(self._chunks, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle,
                           shuffle_window=self.shuffle_window)

    def batch_rows(self, order: EpochOrder, index: int, rank: int | None = None) -> np.ndarray:
        """Global row numbers of ``rank``'s share (default this dataset's) of global batch ``index``."""
        return order.batch_rows(index, batch_size=self.batch_size, rank=self.rank if rank is None else rank,
                                world_size=self.world_size)

    def shares(self) -> list[tuple[int, int]]:
        """(global batch, rank) of every batch one iteration yields, in order."""
        ranks = range(self.world_size) if self.all_ranks else [self.rank]
        return [(b, r) for b in range(self.start_batch, self.batches_per_epoch) for r in ranks]

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        order = self.order()
        plan = [self.batch_rows(order, b, r) for b, r in self.shares()[worker::workers]]
        chunk_ids = [self._chunk_ids(rows) for rows in plan]  # shard << 32 | chunk within the shard
        last_use = {int(c): n for n, ids in enumerate(chunk_ids) for c in np.unique(ids)}
        shard_last_use = {}
        for chunk, n in last_use.items():
            shard_last_use[chunk >> 32] = max(n, shard_last_use.get(chunk >> 32, n))
        shards_in_order = list(dict.fromkeys(int(c) >> 32 for ids in chunk_ids for c in ids))
        self.cache.schedule(shards_in_order)  # an object store's downloads run ahead in this order
        reader = _ChunkReader(self.cache)
        for n, rows in enumerate(plan):
            yield self.collate([self.to_tensors(reader.row(int(r)), int(r)) for r in rows])
            for chunk in np.unique(chunk_ids[n]):
                if last_use[int(chunk)] == n:
                    reader.forget(int(chunk))
            for shard in [s for s, last in shard_last_use.items() if last == n]:
                release_shard(self.cache, shard)

    def _chunk_ids(self, rows: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self._shard_starts, rows, side="right") - 1
        return (shard.astype(np.int64) << 32) | ((rows - self._shard_starts[shard]) // self.cache.manifest["capture"]["chunk_rows"])

    @staticmethod
    def collate(items: list[dict]) -> dict[str, torch.Tensor]:
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}

    def to_tensors(self, raw: dict, row: int) -> dict[str, torch.Tensor]:
        """One row: ``input_ids [L]`` or ``inputs [...]``, ``topk_ids [P,k]`` int64, ``topk_logits
        [P,k]`` fp32 (max-shifted logits), ``logsumexp``/``tail_logprob [P,nT]``, ``mask [P]``."""
        if "input_ids" in raw:
            model_input = raw["input_ids"]
            key = "input_ids"
        else:
            model_input = self.inputs[int(raw["sample_index"])]
            key = "inputs"
        if input_hash(model_input) != int(raw["input_hash"]):
            raise IntegrityError(
                f"row {row}: its alignment key does not match the input the student would see; "
                "the cache was captured on other data -- pass the capture's data or re-create the cache"
            )
        out = {
            key: torch.from_numpy(np.ascontiguousarray(model_input)),
            "topk_ids": torch.from_numpy(raw["topk_ids"]),
            "topk_logits": torch.from_numpy(raw["topk_logits"]),
            "logsumexp": torch.from_numpy(raw["logsumexp"]),
            "tail_logprob": torch.from_numpy(raw["tail_logprob"]),
            "mask": torch.from_numpy(raw["mask"]),
            "sample_index": torch.tensor(int(raw["sample_index"])),
        }
        for key in ("sample_ids", "sample_counts", "sample_logits"):  # sampled caches
            if key in raw:
                out[key] = torch.from_numpy(raw[key])
        if "label" in raw:
            out["label"] = torch.tensor(int(raw["label"]))
        return out


class _ChunkReader:
    """Rows by global number, decoding each storage chunk once and keeping it until ``forget``."""

    def __init__(self, cache: TeacherCache):
        self.cache = cache
        self.chunk_rows = cache.manifest["capture"]["chunk_rows"]
        self._decoded: dict[int, dict[str, np.ndarray]] = {}  # shard << 32 | chunk -> columns

    def row(self, i: int) -> dict[str, np.ndarray]:
        shard, row = self.cache.locate(i)
        chunk, offset = divmod(row, self.chunk_rows)
        key = shard << 32 | chunk
        if key not in self._decoded:
            start = chunk * self.chunk_rows
            stop = min(start + self.chunk_rows, self.cache.shards[shard]["rows"])
            self._decoded[key] = self.cache.read_rows(shard, start, stop)
        return {k: v[offset] for k, v in self._decoded[key].items()}

    def forget(self, key: int) -> None:
        self._decoded.pop(key, None)
