"""Checks of a progress record read back at a resume: is each entry what kdpipe wrote, and does its
shard file still hold what the entry says (:meth:`~kdpipe.pipeline.capture.progress.RankProgress.start`
keeps a shard or a block only when they pass; everything else is redone)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from kdpipe.pipeline.cache.manifest import shard_name
from kdpipe.pipeline.cache.storage.location import CacheLocation


def record_checksum(record: dict) -> str:
    """sha256 of a progress record without its checksum: tells a record kdpipe wrote from one edited by hand."""
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def valid_entry(name: str, entry, *, rank: int, suffix: str) -> bool:
    """A shard entry of this rank whose fields have their types and agree with its name."""
    try:
        return (isinstance(entry, dict) and entry["name"] == name and entry["rank"] == rank
                and all(type(entry[key]) is int and entry[key] >= 0 for key in ("block", "part", "rows", "tokens", "bytes"))
                and isinstance(entry["sha256"], str)
                and shard_name(block=entry["block"], part=entry["part"], suffix=suffix) == name)
    except (KeyError, TypeError):
        return False


def whole_block(block: str, info, kept: dict) -> bool:
    """All shards of ``block`` are kept and add up to its entry (parts 0..n-1, their rows)."""
    if not isinstance(info, dict) or type(info.get("parts")) is not int or type(info.get("rows")) is not int:
        return False
    parts = sorted(e["part"] for e in kept.values() if str(e["block"]) == block)
    return parts == list(range(info["parts"])) and sum(e["rows"] for e in kept.values() if str(e["block"]) == block) == info["rows"]


def shard_rows(path: Path, fmt, schema) -> int | None:
    """The number of rows a shard file holds (None when it cannot be read)."""
    try:
        with fmt.open(path, schema=schema) as reader:
            return int(reader.num_rows)
    except Exception:  # noqa: BLE001 - any failure to parse is a damaged shard: it is redone
        return None


def stored_matches(location: CacheLocation, entry: dict, fmt, schema) -> bool:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kdpipe-check-") as folder:
        path = Path(folder) / f"shard{fmt.suffix}"
        return location.download(entry["name"], path) == entry["sha256"] and shard_rows(path, fmt, schema) == entry["rows"]
