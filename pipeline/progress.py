"""Per-rank completion records of a capture, and the final manifest.

Each rank keeps ``_progress/r<rank>.json``: the identity of the capture (settings and fingerprints)
and an entry per finished shard (name, rows, tokens, bytes, sha256). It is rewritten atomically after
every shard, so a killed capture restarted with the same command knows exactly which shards are
finished; a shard file is trusted only when its sha256 matches its entry. When every rank is complete
the manifest is assembled from these records and written last.
"""

from __future__ import annotations

import json
from pathlib import Path

from kdpipe.pipeline.errors import ConfigError
from kdpipe.pipeline.fileio import atomic_write_json, sha256_file
from kdpipe.pipeline.manifest import MANIFEST_NAME, manifest_checksum, resolve_shard_path, utc_now

PROGRESS_DIR = "_progress"


def capture_identity(plan) -> dict:
    """What must match for a rerun to continue (or to be a no-op on) an existing capture."""
    return {"capture": plan.settings.content_settings(), **plan.fingerprints}


def first_difference(old, new, path: str = "") -> str | None:
    """Dotted path of the first differing entry of two JSON-like values, or None when equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            found = first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None
    return None if old == new else f"{path} (was {_short(old)}, now {_short(new)})"


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_same_identity(old: dict, new: dict, out: Path) -> None:
    diff = first_difference(old, new)
    if diff:
        raise ConfigError(
            f"{out} already holds a capture with different settings: {diff}; "
            "use a new --out, or pass --overwrite to replace it"
        )


class RankProgress:
    def __init__(self, out: Path, *, rank: int, world_size: int):
        self.out, self.rank, self.world_size = Path(out), rank, world_size
        self.path = self.out / PROGRESS_DIR / f"r{rank:05d}.json"
        self.record: dict = {}

    def start(self, plan) -> None:
        identity = capture_identity(plan)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            record = json.loads(self.path.read_text())
            check_same_identity(record["identity"], identity, self.out)
            self.record = {**record, "complete": False}
        else:
            self.record = {"identity": identity, "started_at": utc_now(), "shards": {}, "complete": False}
        self._save()

    def is_done(self, shard: int) -> bool:
        entry = self.record["shards"].get(str(shard))
        if entry is None:
            return False
        path = resolve_shard_path(self.out, entry["name"])
        if path.is_file() and sha256_file(path) == entry["sha256"]:
            return True
        del self.record["shards"][str(shard)]  # damaged or missing: redo it
        return False

    def shard_done(self, entry: dict) -> None:
        self.record["shards"][str(entry["index"])] = entry
        self._save()

    def finish(self) -> None:
        self.record["complete"] = True
        self.record["finished_at"] = utc_now()
        self._save()

    def _save(self) -> None:
        atomic_write_json(self.path, self.record)


def finalize(out: Path, *, plan, header: dict) -> dict | None:
    """Write the manifest once every rank is complete; return it (None while ranks are missing)."""
    records = []
    for rank in range(plan.settings.world_size):
        path = Path(out) / PROGRESS_DIR / f"r{rank:05d}.json"
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        if not record.get("complete"):
            return None
        records.append(record)
    shards = sorted((e for r in records for e in r["shards"].values()), key=lambda e: e["index"])
    assert [e["index"] for e in shards] == list(range(plan.num_shards)), "a shard is missing"
    rows = sum(e["rows"] for e in shards)
    tokens = sum(e["tokens"] for e in shards)
    nbytes = sum(e["bytes"] for e in shards)
    manifest = {
        **header,
        "shards": shards,
        "totals": {"rows": rows, "tokens": tokens, "bytes": nbytes, "shards": len(shards),
                   "bytes_per_token": nbytes / max(tokens, 1)},
        "started_at": min(r["started_at"] for r in records),
        "finished_at": utc_now(),
    }
    manifest["checksum"] = manifest_checksum(manifest)
    atomic_write_json(Path(out) / MANIFEST_NAME, manifest)
    return manifest
