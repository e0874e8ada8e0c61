"""Reading a finished cache: :func:`open_cache` and :class:`TeacherCache`.

A cache is a local folder or an object-store URL (``s3://bucket/prefix``; see
:mod:`kdpipe.pipeline.cache.storage.location`). A remote shard is downloaded whole into a local folder,
its sha256 checked against the manifest while it streams, and opened there; downloads run
``read_ahead`` shards ahead of the reader along the order given to :meth:`TeacherCache.schedule`.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from kdpipe.pipeline.cache.manifest import MANIFEST_NAME, SHARD_DIR, load_manifest, parse_manifest, resolve_shard_path
from kdpipe.pipeline.cache.sampling import draw_weights
from kdpipe.pipeline.cache.schema import CacheSchema, decode_rows
from kdpipe.pipeline.cache.storage.base import ShardReader, get_format
from kdpipe.pipeline.cache.storage.local_copies import LocalCopies
from kdpipe.pipeline.cache.storage.location import CacheLocation
from kdpipe.pipeline.cache.storage.read_ahead import ShardReadAhead
from kdpipe.pipeline.errors import CacheFormatError, ConfigError, IntegrityError
from kdpipe.pipeline.fileio import sha256_file

DEFAULT_READ_AHEAD = 4  # remote shards downloaded ahead of the reader (benchmarks/remote_read.py)


def topk_logprobs_at(topk_logits: np.ndarray, logsumexp: np.ndarray, temperature: float) -> np.ndarray:
    """``log p_T`` of the cached ids: ``topk_logits / T - logsumexp_T`` (both max-shifted), fp32.

    topk_logits: [..., k] float32 (decoded, see :func:`~kdpipe.pipeline.cache.schema.decode_rows`);
    logsumexp: [...] at ``T``.
    """
    return topk_logits / np.float32(temperature) - logsumexp[..., None]


def renormalized_topk_logprobs(topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor) -> torch.Tensor:
    """The top-k log-probs rescaled so that they sum to ``1 - r_T``, the exact tail bucket's complement.

    topk_logprobs: [..., k] ``log p_T`` as stored (``topk_logits / T - logsumexp_T``); tail_logprob: [...]
    ``log r_T``. Returns ``topk_logprobs + log(1 - r_T) - logsumexp(topk_logprobs)``, so that the k + 1
    bins sum to 1: quantized values (and their float16 ``logsumexp``) leave the stored sum a little off
    ``1 - r_T``; this is what training (``train-student``, ``TargetCollator``) and :meth:`TeacherCache.read`
    use for a quantized cache. A row with an empty top-k (k = 0) or a tail of mass 1 is left as it is.
    """
    if topk_logprobs.shape[-1] == 0:
        return topk_logprobs
    shift = _log1mexp(tail_logprob) - torch.logsumexp(topk_logprobs, dim=-1)
    return topk_logprobs + torch.where(torch.isfinite(shift), shift, 0.0)[..., None]


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends (``-inf`` at ``x = 0``)."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class TeacherCache:
    """A finished teacher cache: ``len(cache)`` rows, ``cache.read(i, temperature=T)``.

    root: a local cache folder, or an object-store URL (``s3://bucket/prefix``, ``gs://``, ``az://``)
    read with ``storage_options`` (passed to fsspec; credentials otherwise come from the standard
    places). Shards are opened lazily, and no row of a shard is used before its bytes are checked: a
    local shard's size against the manifest each time it is opened, its sha256 the first time and again
    whenever the file changed (inode, size or mtime) since it matched (``verify_hashes=False``
    skips the hash, not the size: for a reader that has just run ``kdpipe verify``), a remote shard's
    as it downloads (always). A shard whose bytes do not decode raises :class:`IntegrityError` too.
    A remote shard lands in ``local_cache`` (a folder shared by the
    processes of a machine, least recently used shards evicted beyond ``local_cache_gb``) or, without
    one, in a private temporary folder that holds only the shards in use and read ahead.
    """

    def __init__(
        self, root: str | os.PathLike | CacheLocation, *, verify_hashes: bool = True,
        storage_options: dict | None = None, local_cache: str | os.PathLike | None = None,
        local_cache_gb: float | None = None, read_ahead: int | None = None,
    ):
        self.location = CacheLocation(root, storage_options)
        self.root = self.location.root
        self.manifest, self._manifest_bytes = read_manifest(self.location)
        self.schema = CacheSchema.from_dict(self.manifest["schema"])
        self.format = get_format(self.manifest["capture"]["format"])
        self.shards = self.manifest["shards"]
        self._starts = np.cumsum([0] + [s["rows"] for s in self.shards]).tolist()
        self._verify_hashes = verify_hashes
        self._hashed: dict[str, tuple[int, int, int]] = {}  # shard name -> (inode, size, mtime_ns) when it matched
        self._readers: dict[int, ShardReader] = {}
        self._read_ahead = None
        if self.location.is_remote:
            read_ahead = DEFAULT_READ_AHEAD if read_ahead is None else read_ahead
            if read_ahead < 0:
                raise ConfigError(f"--read-ahead {read_ahead} must be 0 (no read-ahead) or more")
            limit = None if local_cache_gb is None else int(local_cache_gb * 1e9)
            copies = LocalCopies(local_cache, limit_bytes=limit)
            self._read_ahead = ShardReadAhead(self.location, self.shards, copies, suffix=self.format.suffix,
                                              read_ahead=read_ahead)

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def temperatures(self) -> tuple[float, ...]:
        return self.schema.temperatures

    @functools.cached_property
    def manifest_sha256(self) -> str:
        if self._manifest_bytes is not None:
            return hashlib.sha256(self._manifest_bytes).hexdigest()
        return sha256_file(self.root / MANIFEST_NAME)

    @property
    def local_copies(self) -> LocalCopies | None:
        """Where remote shards are copied to (None for a local cache)."""
        return self._read_ahead.copies if self._read_ahead else None

    def schedule(self, shard_indices: list[int]) -> None:
        """The order in which this process will read shards next (e.g. each epoch's); a remote cache
        downloads ``read_ahead`` of them ahead of the reader. Cheap, may be called again at any time
        (the new order replaces the old); a no-op for a local cache."""
        if self._read_ahead is not None:
            self._read_ahead.schedule(shard_indices)

    def shard_path(self, index: int) -> Path:
        """The shard's file (of a local cache)."""
        return resolve_shard_path(self.location.local(), self.shards[index]["name"])

    def shard_reader(self, index: int) -> ShardReader:
        if index not in self._readers:
            if self._read_ahead is not None:
                self._open_remote(index)
                return self._readers[index]
            entry, path = self.shards[index], self.shard_path(index)
            self._check_local_bytes(entry, path)
            self._readers[index] = self._open_reader(entry, path)
        return self._readers[index]

    def _check_local_bytes(self, entry: dict, path: Path) -> None:
        """Refuse a local shard that is missing, of another size or (``verify_hashes``) another sha256."""
        if not path.is_file():
            raise IntegrityError(f"shard {entry['name']} is missing from {self.root}; {self._fix_hint()}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise IntegrityError(
                f"shard {entry['name']} of {self.root} has {size} bytes, manifest says {entry['bytes']} (truncated or "
                f"replaced); its rows were not used -- {self._fix_hint()}"
            )
        stat = path.stat()
        identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns)  # unchanged since it matched: no second hash
        if self._verify_hashes and self._hashed.get(entry["name"]) != identity:
            if sha256_file(path) != entry["sha256"]:
                raise IntegrityError(
                    f"Checksum failure: shard {entry['name']} of {self.root} does not match its manifest sha256 "
                    f"(damaged or replaced); its rows were not used -- {self._fix_hint()}"
                )
            self._hashed[entry["name"]] = identity

    def _fix_hint(self) -> str:
        """What to do about a bad shard: find every one, then let cache-teacher redo them."""
        return (f"run `kdpipe verify {self.root}` to list every bad shard, then restore them, or delete them and "
                f"{self.root}/{MANIFEST_NAME} and re-run the same cache-teacher command to redo them")

    def _open_reader(self, entry: dict, path: Path) -> ShardReader:
        try:
            reader = self.format.open(path, schema=self.schema)
        except Exception as exc:  # noqa: BLE001 - bytes that do not decode are a damaged shard
            raise self._undecodable(entry, exc) from exc
        if reader.num_rows != entry["rows"]:
            reader.close()
            raise IntegrityError(
                f"shard {entry['name']} of {self.root} has {reader.num_rows} rows, manifest says {entry['rows']}; "
                f"its rows were not used -- {self._fix_hint()}"
            )
        return reader

    def _undecodable(self, entry: dict, exc: Exception) -> IntegrityError:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        return IntegrityError(f"shard {entry['name']} of {self.root} cannot be decoded ({reason}); the file is "
                              f"damaged -- {self._fix_hint()}")

    def _open_remote(self, index: int) -> None:
        """Wait for the shard's checked local copy (pinned while open) and open it."""
        path = self._read_ahead.get(index)
        try:
            self._readers[index] = self._open_reader(self.shards[index], path)
        except BaseException:
            self._read_ahead.release(index)
            raise

    def release(self, index: int) -> None:
        """Close shard ``index``'s reader; a remote shard's copy may then be evicted."""
        reader = self._readers.pop(index, None)
        if reader is not None:
            reader.close()
            if self._read_ahead is not None:
                self._read_ahead.release(index)

    def check_files(self) -> None:
        """Cheap check that every shard exists at its recorded size (no hashing; one listing remotely)."""
        if self.location.is_remote:
            self._check_remote_files()
            return
        for index, entry in enumerate(self.shards):
            path = self.shard_path(index)
            if not path.is_file():
                raise IntegrityError(f"shard {entry['name']} is missing from {self.root}; {self._fix_hint()}")
            if path.stat().st_size != entry["bytes"]:
                raise IntegrityError(
                    f"shard {entry['name']} of {self.root} has {path.stat().st_size} bytes, manifest says "
                    f"{entry['bytes']} (truncated or replaced); {self._fix_hint()}"
                )

    def _check_remote_files(self) -> None:
        found = self.location.listing(SHARD_DIR)
        for entry in self.shards:
            info = found.get(entry["name"])
            if info is None:
                raise IntegrityError(f"shard {entry['name']} is missing from {self.root}; re-create the cache "
                                     "(or restore the object)")
            if info.size != entry["bytes"]:
                raise IntegrityError(f"shard {entry['name']} of {self.root} has {info.size} bytes, manifest says "
                                     f"{entry['bytes']}; restore the object or re-create the cache")

    def locate(self, i: int) -> tuple[int, int]:
        """(shard index, row within shard) of global row ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for a cache of {len(self)} rows")
        shard = bisect.bisect_right(self._starts, i) - 1
        return shard, i - self._starts[shard]

    def read_rows(self, shard: int, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows ``[start, stop)`` of shard ``shard``, decoded into the logical fields of
        :mod:`kdpipe.pipeline.cache.schema` (ids int64, values float32), with a leading row axis."""
        reader = self.shard_reader(shard)
        try:
            stored = reader.read(start, stop)
        except Exception as exc:  # noqa: BLE001 - bytes that do not decode are a damaged shard
            raise self._undecodable(self.shards[shard], exc) from exc
        return decode_rows(self.schema, stored)

    def read_raw(self, i: int) -> dict[str, np.ndarray]:
        """Row ``i`` exactly as stored, decoded into the logical fields of :mod:`kdpipe.pipeline.cache.schema`
        (``topk_logits``, ``logsumexp`` and ``tail_logprob`` of every captured temperature, ...), at no
        temperature and without any renormalisation."""
        shard, row = self.locate(int(i))
        return {k: v[0] for k, v in self.read_rows(shard, row, row + 1).items()}

    def read(self, i: int, *, temperature: float = 1.0) -> dict[str, np.ndarray]:
        """Row ``i`` at a captured temperature, with the teacher targets training uses.

        Returns ``input_ids [L]`` (text teachers), ``topk_ids [P, k]`` (int64),
        ``topk_logprobs [P, k]`` (``log p_T`` of those ids, fp32), ``tail_mass [P]`` (the mass ``r_T``
        outside the top-k, as captured), ``mask [P]``, ``sample_index``, ``input_hash``, for
        classifiers ``label`` and, for sampled caches, ``sample_ids [P, m]``, ``sample_counts [P, m]``,
        ``sample_logprobs [P, m]`` (exact ``log p_T`` of the drawn ids; ``-inf`` at empty slots) and
        ``sample_weights [P, m]`` (their unbiased importance weights at ``T``; 0 at empty slots). Position
        ``t`` of a causal LM row is the teacher's distribution of the token after ``input_ids[: t + 1]``
        (Hugging Face ``logits[:, t]``).

        A quantized cache's ``topk_logprobs`` are renormalised as training renormalises them
        (:func:`renormalized_topk_logprobs`: they sum to ``1 - tail_mass``); a float cache's are the stored
        values. :meth:`read_stored` gives the stored values at ``T`` without the renormalisation.
        """
        j = self.schema.temperature_index(temperature)
        raw = self.read_raw(i)
        out = self._at_temperature(raw, j, temperature)
        if self.schema.value_dtype == "quantized":
            tail_logprob = torch.from_numpy(np.ascontiguousarray(raw["tail_logprob"][:, j]))
            stored = torch.from_numpy(out["topk_logprobs"])
            out["topk_logprobs"] = renormalized_topk_logprobs(stored, tail_logprob).numpy()
        return out

    def read_stored(self, i: int, *, temperature: float = 1.0) -> dict[str, np.ndarray]:
        """Row ``i`` at a captured temperature as :meth:`read` returns it, but with ``topk_logprobs`` as
        stored: ``topk_logits / T - logsumexp_T``, not renormalised (for a quantized cache they sum to
        ``1 - tail_mass`` only up to the values' rounding; a float cache's are what :meth:`read` gives)."""
        j = self.schema.temperature_index(temperature)
        return self._at_temperature(self.read_raw(i), j, temperature)

    def _at_temperature(self, raw: dict, j: int, temperature: float) -> dict[str, np.ndarray]:
        """A raw row's fields at captured temperature ``temperature`` (index ``j``), values as stored."""
        out = {
            "topk_ids": raw["topk_ids"],
            "topk_logprobs": topk_logprobs_at(raw["topk_logits"], raw["logsumexp"][:, j], temperature),
            "tail_mass": np.exp(raw["tail_logprob"][:, j]),
            "mask": raw["mask"],
            "sample_index": raw["sample_index"],
            "input_hash": raw["input_hash"],
        }
        if "input_ids" in raw:
            out["input_ids"] = raw["input_ids"]
        if "sample_ids" in raw:
            out.update({k: raw[k] for k in ("sample_ids", "sample_counts")})
            out["sample_logprobs"], out["sample_weights"] = self._sample_weights(raw, j, temperature)
        if "label" in raw:
            out["label"] = raw["label"]
        return out

    def _sample_weights(self, raw: dict, j: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
        """Exact ``log p_T`` at a row's drawn ids and their importance weights at ``T`` (see
        :func:`kdpipe.pipeline.cache.sampling.draw_weights`), ``[P, m]`` each."""
        schema = self.schema
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        log_p, weights = draw_weights(
            t(raw["sample_logits"]), t(raw["sample_counts"]), logsumexp=t(raw["logsumexp"]),
            tail_logprob=t(raw["tail_logprob"]), temperatures=schema.temperatures, temperature_index=j,
            draws=schema.sample_draws, scheme=schema.sample_scheme, sample_temperature=schema.sample_temperature)
        return log_p.numpy(), weights.numpy()

    def close(self) -> None:
        for index in list(self._readers):
            self.release(index)
        if self._read_ahead is not None:
            self._read_ahead.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_cache(path: str | os.PathLike, *, verify_hashes: bool = True, **storage) -> TeacherCache:
    """Open the cache at ``path``: a directory holding ``manifest.json``, or an object-store URL.

    ``storage``: ``storage_options``, ``local_cache``, ``local_cache_gb``, ``read_ahead`` (see
    :class:`TeacherCache`).
    """
    location = CacheLocation(path, storage.get("storage_options"))
    if not location.is_remote and not location.path.exists():
        raise CacheFormatError(f"cache {path} does not exist; check the path")
    return TeacherCache(location, verify_hashes=verify_hashes, **storage)


def release_shard(cache: TeacherCache, index: int) -> None:
    """Close one shard's reader (streaming readers keep at most a few shards open)."""
    cache.release(index)


def read_manifest(location: CacheLocation) -> tuple[dict, bytes | None]:
    """The validated manifest, and its bytes when it was read from a store (None locally)."""
    if not location.is_remote:
        return load_manifest(location.path), None
    try:
        data = location.read_bytes(MANIFEST_NAME)
    except FileNotFoundError:
        if location.is_empty():
            raise CacheFormatError(f"cache {location} does not exist (nothing is stored under it); check the URL") from None
        raise CacheFormatError(
            f"{location} has no {MANIFEST_NAME}: it is not a kdpipe cache or its capture has not "
            "finished (re-run the same cache-teacher command to finish it)"
        ) from None
    return parse_manifest(data, f"{location}/{MANIFEST_NAME}"), data

