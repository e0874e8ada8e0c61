"""Streaming a cache for training: an ``IterableDataset`` that reads chunk by chunk.

Work is split in units of one storage chunk (``chunk_rows`` consecutive rows of one shard). Each
epoch the chunk order is permuted with ``(seed, epoch)``; global worker ``g`` of ``G`` (``G`` =
DataLoader workers x ``torch.distributed`` ranks) takes chunks ``g, g + G, ...``, so every row is
yielded exactly once per epoch across all workers and ranks, with no coordination. Rows then pass a
bounded shuffle buffer seeded by ``(seed, epoch, g)``. Memory holds one chunk plus the buffer,
whatever the cache's size. Every row's alignment key is checked before it is yielded.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from kdpipe.pipeline.cache import TeacherCache, release_shard
from kdpipe.pipeline.data import input_hash
from kdpipe.pipeline.errors import IntegrityError


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
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class CacheDataset(IterableDataset):
    """Rows of a teacher cache as dicts of tensors (all captured temperatures; see ``_to_tensors``).

    rows: global row numbers to use (e.g. the training split); None = all rows.
    inputs: model inputs for caches without token ids (module teachers): ``inputs[sample_index]``
    is fed to the student and must hash to the row's ``input_hash``.
    """

    def __init__(
        self, cache_path: str | os.PathLike, *, rows: np.ndarray | None = None, shuffle: bool = True,
        seed: int = 0, shuffle_buffer: int = 1024, verify_hashes: bool = True,
        inputs: np.ndarray | None = None, rank: int | None = None, world_size: int | None = None,
    ):
        self.cache_path = cache_path
        self.cache = TeacherCache(cache_path, verify_hashes=verify_hashes)
        self.selected = np.zeros(len(self.cache), dtype=bool)
        self.selected[np.arange(len(self.cache)) if rows is None else rows] = True
        self.shuffle, self.seed, self.shuffle_buffer = shuffle, seed, shuffle_buffer
        self.inputs = inputs
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        if "input_ids" not in self.cache.schema.fields() and inputs is None:
            raise IntegrityError(
                "this cache holds no token ids (module teacher): pass the capture's .npz data "
                "(--data) so the student sees the same inputs"
            )

    def __len__(self) -> int:
        return int(self.selected.sum())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def chunks(self) -> list[tuple[int, int, int]]:
        """Every (shard, start, stop) storage chunk holding selected rows, in cache order."""
        chunk_rows = self.cache.manifest["capture"]["chunk_rows"]
        out = []
        for shard, entry in enumerate(self.cache.shards):
            base = self.cache._starts[shard]
            for start in range(0, entry["rows"], chunk_rows):
                stop = min(start + chunk_rows, entry["rows"])
                if self.selected[base + start : base + stop].any():
                    out.append((shard, start, stop))
        return out

    def _worker_slot(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rank, world = distributed_rank()
        rank = self.rank if self.rank is not None else rank
        world = self.world_size if self.world_size is not None else world
        return rank * workers + worker, world * workers

    def __iter__(self):
        slot, slots = self._worker_slot()
        chunks = self.chunks()
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(chunks))
            chunks = [chunks[i] for i in order]
        rows = self._rows(chunks[slot::slots])
        if not self.shuffle:
            yield from rows
            return
        yield from _buffered_shuffle(rows, self.shuffle_buffer, np.random.default_rng([self.seed, self.epoch, slot]))

    def _rows(self, chunks):
        open_shard = None
        for shard, start, stop in chunks:
            if open_shard is not None and open_shard != shard:
                release_shard(self.cache, open_shard)
            open_shard = shard
            block = self.cache.shard_reader(shard).read(start, stop)
            base = self.cache._starts[shard] + start
            for r in range(stop - start):
                if self.selected[base + r]:
                    yield self._to_tensors({k: v[r] for k, v in block.items()}, base + r)
        if open_shard is not None:
            release_shard(self.cache, open_shard)

    def _to_tensors(self, raw: dict, row: int) -> dict[str, torch.Tensor]:
        """One row: ``input_ids [L]`` or ``inputs [...]``, ``topk_ids [P,k]`` int64, ``topk_logits
        [P,k]`` fp32 (max-shifted logits), ``logsumexp``/``tail_logprob [P,nT]``, ``mask [P]``."""
        from kdpipe.pipeline.schema import values_to_float32

        if "input_ids" in raw:
            model_input = raw["input_ids"].astype(np.int64)
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
            "topk_ids": torch.from_numpy(raw["topk_ids"].astype(np.int64)),
            "topk_logits": torch.from_numpy(values_to_float32(raw["topk_logits"], self.cache.schema.value_dtype)),
            "logsumexp": torch.from_numpy(raw["logsumexp"]),
            "tail_logprob": torch.from_numpy(raw["tail_logprob"]),
            "mask": torch.from_numpy(raw["mask"]),
            "sample_index": torch.tensor(int(raw["sample_index"])),
        }
        if "label" in raw:
            out["label"] = torch.tensor(int(raw["label"]))
        return out


def _buffered_shuffle(items, size: int, rng: np.random.Generator):
    """Yield ``items`` in a shuffled order using a buffer of at most ``size`` items."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(len(buffer)))
        buffer[j], item = item, buffer[j]
        yield item
    rng.shuffle(buffer)
    yield from buffer
