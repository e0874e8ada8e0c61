"""Per-rank completion records of a capture, and the final manifest.

Each rank keeps ``_progress/r<rank>.json``: the identity of the capture (settings and fingerprints)
and an entry per finished shard (name, rows, tokens, bytes, sha256). It is rewritten atomically after
every shard, so a capture killed at any moment and restarted with the same command knows exactly which
shards are finished. At restart :meth:`RankProgress.start` removes the rank's stray ``*.tmp`` files
and keeps a recorded shard only when its file has the recorded size and sha256; everything else
(a shard renamed but not yet recorded, a damaged or missing one) is redone. When every rank is
complete the manifest is assembled from these records and written last.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from kdpipe.pipeline.errors import CacheFormatError, ConfigError
from kdpipe.pipeline.fileio import atomic_write_json, remove_stale_tmp, sha256_file, write_errors
from kdpipe.pipeline.manifest import MANIFEST_NAME, SHARD_DIR, manifest_checksum, resolve_shard_path, utc_now

PROGRESS_DIR = "_progress"
_IDENTITY_SECTIONS = ("teacher", "tokenizer", "data")


def capture_identity(plan) -> dict:
    """What must match for a rerun to continue (or to be a no-op on) an existing capture.

    Normalised through JSON, so it compares equal to a record read back from disk.
    """
    identity = {"capture": plan.settings.content_settings(), **plan.fingerprints}
    return json.loads(json.dumps(identity))


def manifest_identity(manifest: dict, plan) -> dict:
    """The identity of the finished capture a manifest describes (same keys as :func:`capture_identity`)."""
    capture = manifest.get("capture", {})
    return {
        "capture": {key: capture.get(key) for key in plan.settings.content_settings()},
        **{section: manifest.get(section) for section in _IDENTITY_SECTIONS},
    }


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
    """The completion record of one rank. ``shard_done`` may be called from the writer thread."""

    def __init__(self, out: Path, *, rank: int, world_size: int):
        self.out, self.rank, self.world_size = Path(out), rank, world_size
        self.path = self.out / PROGRESS_DIR / f"r{rank:05d}.json"
        self.record: dict = {}
        self.redo: list[str] = []  # recorded shards found damaged or missing at start
        self.stale_tmp: list[Path] = []  # temporary files of a killed run, removed at start
        self._lock = threading.Lock()

    def start(self, plan) -> None:
        """Create --out, remove this rank's stray temporary files, load and check the record."""
        identity = capture_identity(plan)
        with write_errors("the cache folder", self.out):
            self.out.mkdir(parents=True, exist_ok=True)
            self.stale_tmp = self._remove_stale_tmp()
        record = self._load()
        if record is None:
            self.record = {"identity": identity, "started_at": utc_now(), "shards": {}, "complete": False}
        else:
            check_same_identity(record["identity"], identity, self.out)
            mine = {str(s) for s in plan.my_shards()}
            kept = {k: e for k, e in record["shards"].items() if k in mine and self._intact(e)}
            self.redo = sorted(e["name"] for k, e in record["shards"].items() if k not in kept)
            self.record = {**record, "shards": kept, "complete": False}
        self._save()

    def _remove_stale_tmp(self) -> list[Path]:
        # Temporary names are "<final name>.<pid>.tmp"; a rank owns its shards and its record.
        removed = remove_stale_tmp(self.out / SHARD_DIR, f"r{self.rank:05d}-*.tmp")
        removed += remove_stale_tmp(self.out / PROGRESS_DIR, f"{self.path.name}.*.tmp")
        if self.world_size == 1:  # with several ranks, another one may be writing the manifest
            removed += remove_stale_tmp(self.out, f"{MANIFEST_NAME}.*.tmp")
        return removed

    def _load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            record = json.loads(self.path.read_text())
            if not isinstance(record.get("identity"), dict) or not isinstance(record.get("shards"), dict):
                raise ValueError("identity or shards section missing")
        except (ValueError, AttributeError) as exc:
            raise CacheFormatError(
                f"progress record {self.path} is damaged ({exc}); delete it to redo this rank's "
                "shards, or pass --overwrite to start the capture over"
            ) from None
        return record

    def _intact(self, entry: dict) -> bool:
        """A recorded shard is kept only when its file has the recorded size and sha256."""
        path = resolve_shard_path(self.out, entry["name"])
        return path.is_file() and path.stat().st_size == entry["bytes"] and sha256_file(path) == entry["sha256"]

    def is_done(self, shard: int) -> bool:
        return str(shard) in self.record["shards"]

    def shard_done(self, entry: dict) -> None:
        with self._lock:
            self.record["shards"][str(entry["index"])] = entry
            self._save()

    def finish(self) -> None:
        with self._lock:
            self.record["complete"] = True
            self.record["finished_at"] = utc_now()
            self._save()

    def _save(self) -> None:
        with write_errors(f"progress record {self.path.relative_to(self.out)}", self.out):
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
    with write_errors(MANIFEST_NAME, out):
        atomic_write_json(Path(out) / MANIFEST_NAME, manifest)
    return manifest
