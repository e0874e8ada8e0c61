"""Full integrity check of a cache: every shard's bytes, hash, row count and schema.

A cache on an object store is checked the same way: its shards are listed once (existence and size),
then each is downloaded to a temporary file -- a few at a time, hashed as it streams -- checked like a
local shard and deleted.
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kdpipe.pipeline.cache.manifest import MANIFEST_NAME, SHARD_DIR, resolve_shard_path
from kdpipe.pipeline.cache.reader import read_manifest
from kdpipe.pipeline.cache.schema import CacheSchema
from kdpipe.pipeline.cache.storage.base import get_format
from kdpipe.pipeline.cache.storage.location import CacheLocation
from kdpipe.pipeline.fileio import sha256_file

PARALLEL_DOWNLOADS = 4


def verify_cache(root: str | os.PathLike, *, storage_options: dict | None = None) -> list[str]:
    """Problems found (empty when the cache is intact); each names the shard and the fix.

    ``root``: a cache folder or an object-store URL (read with ``storage_options``). Raises
    :class:`CacheFormatError` when the manifest itself is unreadable.
    """
    location = CacheLocation(root, storage_options)
    manifest = read_manifest(location)[0]
    schema = CacheSchema.from_dict(manifest["schema"])
    fmt = get_format(manifest["capture"]["format"])
    expected = schema.fields()
    if location.is_remote:
        found = _verify_remote_shards(location, manifest["shards"], fmt, schema, expected)
    else:
        found = [_verify_shard(location.path, entry, fmt, schema, expected) for entry in manifest["shards"]]
    problems = [f"shard {entry['name']}: {problem}" for entry, problem in zip(manifest["shards"], found) if problem]
    totals = manifest["totals"]
    if totals["rows"] != sum(e["rows"] for e in manifest["shards"]):
        problems.append("manifest totals.rows disagrees with its shards; the manifest was edited -- re-create the cache")
    return problems


# A finished cache's manifest makes cache-teacher a no-op: it goes too, and the re-run redoes what is missing.
SHARD_FIX = f"restore it, or delete it and {MANIFEST_NAME} and re-run the same cache-teacher command to redo it"


def _verify_shard(root, entry, fmt, schema, expected) -> str | None:
    path = resolve_shard_path(root, entry["name"])
    if not path.is_file():
        return f"missing; {SHARD_FIX}"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"has {size} bytes, manifest says {entry['bytes']} (truncated?); {SHARD_FIX}"
    if sha256_file(path) != entry["sha256"]:
        return f"Checksum failure: sha256 differs from the manifest; {SHARD_FIX}"
    return _verify_contents(path, entry, fmt, schema, expected)


def _verify_contents(path: Path, entry, fmt, schema, expected) -> str | None:
    try:
        with fmt.open(path, schema=schema) as reader:
            if reader.num_rows != entry["rows"]:
                return f"has {reader.num_rows} rows, manifest says {entry['rows']}"
            layout = reader.field_layout()
    except Exception as exc:  # noqa: BLE001 - any failure to parse is a damaged shard
        return f"cannot be read ({type(exc).__name__}: {exc})"
    if layout != expected:
        return f"schema {sorted(layout)} does not match the manifest's {sorted(expected)}"
    return None


def _verify_remote_shards(location: CacheLocation, entries: list[dict], fmt, schema, expected) -> list[str | None]:
    listed = location.listing(SHARD_DIR)
    with tempfile.TemporaryDirectory(prefix="kdpipe-verify-") as folder:
        def check(numbered: tuple[int, dict]) -> str | None:
            index, entry = numbered
            info = listed.get(entry["name"])
            if info is None:
                return f"missing; {SHARD_FIX}"
            if info.size != entry["bytes"]:
                return f"has {info.size} bytes, manifest says {entry['bytes']} (truncated?); {SHARD_FIX}"
            path = Path(folder) / f"{index}{fmt.suffix}"
            try:
                if location.download(entry["name"], path) != entry["sha256"]:
                    return f"Checksum failure: sha256 differs from the manifest; {SHARD_FIX}"
                return _verify_contents(path, entry, fmt, schema, expected)
            finally:
                path.unlink(missing_ok=True)

        with ThreadPoolExecutor(PARALLEL_DOWNLOADS, thread_name_prefix="kdpipe-verify") as pool:
            return list(pool.map(check, enumerate(entries)))
