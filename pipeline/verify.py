"""Full integrity check of a cache: every shard's bytes, hash, row count and schema."""

from __future__ import annotations

import os
from pathlib import Path

from kdpipe.pipeline.fileio import sha256_file
from kdpipe.pipeline.manifest import load_manifest, resolve_shard_path
from kdpipe.pipeline.schema import CacheSchema
from kdpipe.pipeline.storage.base import get_format


def verify_cache(root: str | os.PathLike) -> list[str]:
    """Problems found (empty when the cache is intact); each names the shard and the fix.

    Raises :class:`CacheFormatError` when the manifest itself is unreadable.
    """
    root = Path(root)
    manifest = load_manifest(root)
    schema = CacheSchema.from_dict(manifest["schema"])
    fmt = get_format(manifest["capture"]["format"])
    expected = schema.fields()
    problems = []
    for entry in manifest["shards"]:
        problem = _verify_shard(root, entry, fmt, schema, expected)
        if problem:
            problems.append(f"shard {entry['name']}: {problem}")
    totals = manifest["totals"]
    if totals["rows"] != sum(e["rows"] for e in manifest["shards"]):
        problems.append("manifest totals.rows disagrees with its shards; the manifest was edited -- re-create the cache")
    return problems


def _verify_shard(root, entry, fmt, schema, expected) -> str | None:
    path = resolve_shard_path(root, entry["name"])
    if not path.is_file():
        return "missing; re-run cache-teacher with the same settings to redo it"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"has {size} bytes, manifest says {entry['bytes']} (truncated?); delete it and re-run cache-teacher"
    if sha256_file(path) != entry["sha256"]:
        return "Checksum failure: sha256 differs from the manifest; delete it and re-run cache-teacher"
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
