"""Reading a finished cache: :func:`open_cache` and :class:`TeacherCache`."""

from __future__ import annotations

import bisect
import functools
import os
from pathlib import Path

import numpy as np

from kdpipe.pipeline.errors import CacheFormatError, IntegrityError
from kdpipe.pipeline.fileio import sha256_file
from kdpipe.pipeline.manifest import MANIFEST_NAME, load_manifest, resolve_shard_path
from kdpipe.pipeline.schema import CacheSchema, values_to_float32
from kdpipe.pipeline.storage.base import ShardReader, get_format


def topk_logprobs_at(topk_logits: np.ndarray, logsumexp: np.ndarray, temperature: float) -> np.ndarray:
    """``log p_T`` of the cached ids: ``topk_logits / T - logsumexp_T`` (both max-shifted), fp32.

    topk_logits: [..., k] float32 (see :func:`values_to_float32`); logsumexp: [...] at ``T``.
    """
    return topk_logits / np.float32(temperature) - logsumexp[..., None]


class TeacherCache:
    """A finished teacher cache: ``len(cache)`` rows, ``cache.read(i, temperature=T)``.

    Shards are opened lazily; ``verify_hashes=True`` checks each shard's sha256 against the
    manifest the first time it is opened (once per shard per process).
    """

    def __init__(self, root: str | os.PathLike, *, verify_hashes: bool = False):
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        self.schema = CacheSchema.from_dict(self.manifest["schema"])
        self.format = get_format(self.manifest["capture"]["format"])
        self.shards = self.manifest["shards"]
        self._starts = np.cumsum([0] + [s["rows"] for s in self.shards]).tolist()
        self._verify_hashes = verify_hashes
        self._readers: dict[int, ShardReader] = {}

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def temperatures(self) -> tuple[float, ...]:
        return self.schema.temperatures

    @functools.cached_property
    def manifest_sha256(self) -> str:
        return sha256_file(self.root / MANIFEST_NAME)

    def shard_path(self, index: int) -> Path:
        return resolve_shard_path(self.root, self.shards[index]["name"])

    def shard_reader(self, index: int) -> ShardReader:
        if index not in self._readers:
            entry, path = self.shards[index], self.shard_path(index)
            if not path.is_file():
                raise IntegrityError(
                    f"shard {entry['name']} is missing from {self.root}; "
                    "re-run cache-teacher to redo it"
                )
            if self._verify_hashes and sha256_file(path) != entry["sha256"]:
                raise IntegrityError(
                    f"Checksum failure: shard {entry['name']} does not match its manifest sha256; "
                    "the file is damaged -- delete it and re-run cache-teacher to redo it"
                )
            reader = self.format.open(path, schema=self.schema)
            if reader.num_rows != entry["rows"]:
                raise IntegrityError(
                    f"shard {entry['name']} has {reader.num_rows} rows, manifest says "
                    f"{entry['rows']}; delete it and re-run cache-teacher"
                )
            self._readers[index] = reader
        return self._readers[index]

    def check_files(self) -> None:
        """Cheap check that every shard exists at its recorded size (no hashing)."""
        for index, entry in enumerate(self.shards):
            path = self.shard_path(index)
            if not path.is_file():
                raise IntegrityError(f"shard {entry['name']} is missing from {self.root}; re-run cache-teacher to redo it")
            if path.stat().st_size != entry["bytes"]:
                raise IntegrityError(
                    f"shard {entry['name']} has {path.stat().st_size} bytes, manifest says {entry['bytes']}; "
                    "delete it and re-run cache-teacher to redo it"
                )

    def locate(self, i: int) -> tuple[int, int]:
        """(shard index, row within shard) of global row ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for a cache of {len(self)} rows")
        shard = bisect.bisect_right(self._starts, i) - 1
        return shard, i - self._starts[shard]

    def read_raw(self, i: int) -> dict[str, np.ndarray]:
        """Row ``i`` exactly as stored (see :mod:`kdpipe.pipeline.schema`)."""
        shard, row = self.locate(int(i))
        return {k: v[0] for k, v in self.shard_reader(shard).read(row, row + 1).items()}

    def read(self, i: int, *, temperature: float = 1.0) -> dict[str, np.ndarray]:
        """Row ``i`` at a captured temperature.

        Returns ``input_ids [L]`` (text teachers), ``topk_ids [P, k]`` (int64),
        ``topk_logprobs [P, k]`` (``log p_T`` of those ids, fp32), ``tail_mass [P]``
        (``1 - sum p_T`` over the top-k), ``mask [P]``, ``sample_index``, ``input_hash`` and, for
        classifiers, ``label``. Position ``t`` of a causal LM row is the teacher's distribution of
        the token after ``input_ids[: t + 1]`` (Hugging Face ``logits[:, t]``).
        """
        j = self.schema.temperature_index(temperature)
        raw = self.read_raw(i)
        out = {
            "topk_ids": raw["topk_ids"].astype(np.int64),
            "topk_logprobs": topk_logprobs_at(
                values_to_float32(raw["topk_logits"], self.schema.value_dtype),
                raw["logsumexp"][:, j],
                temperature,
            ),
            "tail_mass": np.exp(raw["tail_logprob"][:, j]),
            "mask": raw["mask"],
            "sample_index": raw["sample_index"],
            "input_hash": raw["input_hash"],
        }
        if "input_ids" in raw:
            out["input_ids"] = raw["input_ids"].astype(np.int64)
        if "label" in raw:
            out["label"] = raw["label"]
        return out

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_cache(path: str | os.PathLike, *, verify_hashes: bool = False) -> TeacherCache:
    """Open the cache at ``path`` (a directory holding ``manifest.json``)."""
    if not Path(path).exists():
        raise CacheFormatError(f"cache {path} does not exist; check the path")
    return TeacherCache(path, verify_hashes=verify_hashes)


def release_shard(cache: TeacherCache, index: int) -> None:
    """Close one shard's reader (streaming readers keep at most a few shards open)."""
    reader = cache._readers.pop(index, None)
    if reader is not None:
        reader.close()
