"""Per-rank completion records of a capture, and the final manifest.

Each rank keeps ``_progress/r<rank>.json``: the identity of the capture (settings and fingerprints),
an entry per finished shard (name, block, part, rows, tokens, bytes, sha256) and per finished data
block (its number of shards, rows, tokens). It is rewritten atomically after every shard, so a
capture killed at any moment and restarted with the same command knows exactly which shards are
finished. At restart :meth:`RankProgress.start` removes the rank's stray ``*.tmp`` files (a shard's
``<name>.<pid>.tmp`` is the rank's when its block ``b`` has ``b % world_size == rank``) and keeps a
recorded shard only when its file has the recorded size and sha256; everything else (a shard renamed
but not yet recorded, a damaged or missing one) is redone, and a block is skipped without reading its
rows only when all its shards are kept. When the rank reaches the end of the data it records the
number of blocks and the sha256 of every data file. When every rank is complete the manifest is
assembled from these records and written last (:func:`finalize`): by rank 0 after a barrier under
torchrun, else by the last rank to finish.

On an object store (``--out s3://...``) records and the manifest are whole-object PUTs (an object is
visible only complete) and shards are uploaded once finished, so there are no temporary objects. A
remote shard's entry also holds the ETag the store gave it; at restart it is kept when the object
has the recorded size and ETag (one listing, no download), and the manifest leaves the ETags out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from pathlib import Path

from kdpipe.pipeline.cache.manifest import (
    MANIFEST_NAME,
    SHARD_DIR,
    manifest_checksum,
    resolve_shard_path,
    shard_block,
    utc_now,
)
from kdpipe.pipeline.cache.storage.base import get_format
from kdpipe.pipeline.cache.storage.location import CacheLocation
from kdpipe.pipeline.capture.data_read import DataRead
from kdpipe.pipeline.capture.record_checks import record_checksum, shard_rows, stored_matches, valid_entry, whole_block
from kdpipe.pipeline.errors import CacheFormatError, ConfigError, DataError
from kdpipe.pipeline.fileio import remove_stale_tmp, sha256_file, write_errors
from kdpipe.pipeline.provenance import PACKAGES_FILE, first_difference, packages_text

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
    identity = {
        "capture": {key: capture.get(key) for key in plan.settings.content_settings()},
        **{section: manifest.get(section) for section in _IDENTITY_SECTIONS},
    }
    data = manifest.get("data") or {}
    identity["data"] = {key: data.get(key) for key in plan.fingerprints["data"]}
    return identity


def check_same_data(old: dict, new: dict, out: Path) -> None:
    """Refuse data files whose content changed since shards were made from them."""
    changed = sorted(name for name in old.keys() & new.keys() if old[name] != new[name])
    if changed:
        raise ConfigError(
            f"{out} was captured from other content of data file {changed[0]} (its sha256 differs); "
            "use a new --out, or pass --overwrite to capture the data as it is now"
        )


def check_same_identity(old: dict, new: dict, out: Path) -> None:
    diff = first_difference(old, new)
    if diff:
        raise ConfigError(
            f"{out} already holds a capture with different settings: {diff}; "
            "use a new --out, or pass --overwrite to replace it"
        )


class RankProgress:
    """The completion record of one rank. ``shard_done`` may be called from the writer thread.

    ``writes_manifest``: this rank is the only one that can write the manifest (true for a single
    process and for rank 0 under torchrun), so it may remove the manifest's stray temporary files.
    """

    def __init__(self, out: str | Path | CacheLocation, *, rank: int, world_size: int,
                 writes_manifest: bool | None = None):
        self.location = CacheLocation(out)
        self.out, self.rank, self.world_size = self.location.root, rank, world_size  # a Path, or the URL
        self.writes_manifest = world_size == 1 if writes_manifest is None else writes_manifest
        self.name = record_name(rank)
        self.path = None if self.location.is_remote else self.location.local(self.name)
        self.record: dict = {}
        self.redo: list[str] = []  # recorded shards found damaged or missing at start
        self.stale_tmp: list[Path] = []  # temporary files of a killed run, removed at start
        self.data_read: DataRead | None = None  # what of the data the recorded shards were made from
        self._lock = threading.Lock()

    def start(self, plan) -> None:
        """Create --out, remove this rank's stray temporary files, load and check the record.

        A recorded shard is kept only when its file matches its entry (size, sha256 and rows); a block
        only when all its kept shards add up to its entry. Refuses data edited since kept shards were
        made from it (:class:`~kdpipe.pipeline.capture.data_read.DataRead`)."""
        identity = capture_identity(plan)
        self.data_read = DataRead(plan.source)
        if not self.location.is_remote:  # a store has no folders to make and no temporary objects
            with write_errors("the cache folder", self.out):
                self.out.mkdir(parents=True, exist_ok=True)
                self.stale_tmp = self._remove_stale_tmp()
        record = self._load()
        if record is None or (not record["shards"] and record["identity"] != identity):  # nothing to lose
            self.record = {"identity": identity, "started_at": utc_now(), "shards": {}, "blocks": {}, "complete": False}
        else:
            check_same_identity(record["identity"], identity, self.out)
            kept = self._kept_shards(record, plan)
            self.redo = sorted(name for name in record["shards"] if name not in kept)
            blocks = record.get("blocks") if isinstance(record.get("blocks"), dict) else {}
            whole = {b: info for b, info in blocks.items() if whole_block(b, info, kept)}
            if kept and isinstance(record.get("data_read"), dict):
                self.data_read.check(record["data_read"], self.out)
            self.record = {**record, "shards": kept, "blocks": whole, "complete": False}
        self._save()

    def _kept_shards(self, record: dict, plan) -> dict:
        fmt = get_format(plan.settings.format)
        stored = self.location.listing(SHARD_DIR) if self.location.is_remote else None
        trusted = record.get("checksum") == record_checksum(record)  # else the record was edited by hand
        return {name: e for name, e in record["shards"].items()
                if valid_entry(name, e, rank=self.rank, suffix=fmt.suffix) and self._intact(e, stored, fmt, plan, trusted)}

    def _remove_stale_tmp(self) -> list[Path]:
        # Temporary names are "<final name>.<pid>.tmp"; a rank owns its record and the shards of its
        # blocks (b % world_size == rank): the other ranks may be writing theirs right now.
        removed = []
        for path in sorted((self.out / SHARD_DIR).glob("*.tmp")):
            block = shard_block(path.name)
            if block is not None and block % self.world_size == self.rank:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
        removed += remove_stale_tmp(self.out / PROGRESS_DIR, f"{self.path.name}.*.tmp")
        if self.writes_manifest:  # else another rank may be writing the manifest
            removed += remove_stale_tmp(self.out, f"{MANIFEST_NAME}.*.tmp")
        return removed

    def _load(self) -> dict | None:
        try:
            data = self.location.read_bytes(self.name)
        except FileNotFoundError:
            return None
        try:
            record = json.loads(data.decode())
            if not isinstance(record.get("identity"), dict) or not isinstance(record.get("shards"), dict):
                raise ValueError("identity or shards section missing")
        except (ValueError, AttributeError) as exc:
            raise CacheFormatError(
                f"progress record {self.location}/{self.name} is damaged ({exc}); delete it to redo this rank's "
                "shards, or pass --overwrite to start the capture over"
            ) from None
        return record

    def _intact(self, entry: dict, stored: dict | None, fmt, plan, trusted: bool) -> bool:
        """A recorded shard is kept only when its file has the recorded size, sha256 and rows -- or, on a
        store (``stored``: its listing), when its object has the recorded size and ETag (a record whose
        checksum does not match, edited by hand, has each object downloaded and checked like a file)."""
        if stored is None:
            path = resolve_shard_path(self.out, entry["name"])
            return (path.is_file() and path.stat().st_size == entry["bytes"] and sha256_file(path) == entry["sha256"]
                    and shard_rows(path, fmt, plan.schema) == entry["rows"])
        found = stored.get(entry["name"])
        if found is None or found.size != entry["bytes"]:
            return False
        if trusted and found.etag is not None and entry.get("etag") is not None:
            return found.etag == entry["etag"]
        return stored_matches(self.location, entry, fmt, plan.schema)  # a store without ETags, or an edited record

    def is_done(self, shard_name: str) -> bool:
        return shard_name in self.record["shards"]

    def block_done(self, block: int) -> bool:
        """All shards of data block ``block`` are finished (its rows need not be made again)."""
        return str(block) in self.record["blocks"]

    def shard_done(self, entry: dict, *, data_bytes: int = 0) -> None:
        """Record a finished shard (``data_bytes``: see :meth:`block_done_with`)."""
        if self.data_read is not None:
            self.data_read.advance(data_bytes)
        with self._lock:
            if self.data_read is not None:
                self.record["data_read"] = self.data_read.record()
            self.record["shards"][entry["name"]] = entry
            self._save()

    def block_done_with(self, block: int, info: dict, *, data_bytes: int = 0) -> None:
        """Record ``block`` as finished, with what of the data it was made from (``data_bytes``: the
        stream's position after it, ``Block.bytes_read``; hashed here, on the writer's thread)."""
        if self.data_read is not None:
            self.data_read.advance(data_bytes)
        with self._lock:
            self.record["blocks"][str(block)] = info
            if self.data_read is not None:
                self.record["data_read"] = self.data_read.record()
            self._save()

    def finish(self, *, num_blocks: int, data_sha256: dict) -> None:
        """Record the end of the data (block count, data file hashes) and mark the rank complete."""
        with self._lock:
            check_same_data(self.record.get("data_sha256") or {}, data_sha256, self.out)
            self.record |= {"complete": True, "finished_at": utc_now(), "num_blocks": num_blocks,
                            "data_sha256": data_sha256}
            self._save()

    def _save(self) -> None:
        self.record["checksum"] = record_checksum(self.record)
        with write_errors(f"progress record {self.name}", self.out):
            self.location.write_json(self.name, self.record)  # atomic rename, or one whole-object PUT


def record_name(rank: int) -> str:
    return f"{PROGRESS_DIR}/r{rank:05d}.json"


def recorded_counts(out: str | Path | CacheLocation, *, ranks: list[int]) -> tuple[int, int]:
    """Rows and tokens of the shards the progress records of ``ranks`` hold so far (for a display of a
    capture's progress over all its ranks); a record not written yet, or unreadable, counts 0."""
    location, rows, tokens = CacheLocation(out), 0, 0
    for rank in ranks:
        try:
            shards = json.loads(location.read_bytes(record_name(rank)).decode())["shards"].values()
            counts = [(int(e["rows"]), int(e["tokens"])) for e in shards]
        except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
            continue
        rows, tokens = rows + sum(r for r, _ in counts), tokens + sum(t for _, t in counts)
    return rows, tokens


def finalize(out: str | Path | CacheLocation, *, plan, header: dict) -> dict | None:
    """Write the manifest once every rank is complete; return it (None while ranks are missing)."""
    location = CacheLocation(out)
    records = []
    for rank in range(plan.settings.world_size):
        try:
            record = json.loads(location.read_bytes(record_name(rank)).decode())
        except FileNotFoundError:
            return None
        if not record.get("complete"):
            return None
        records.append(record)
    num_blocks = _agreed(records, "num_blocks", "number of data blocks")
    data_sha256 = _agreed(records, "data_sha256", "data file hashes")
    blocks = {int(b): info for r in records for b, info in r["blocks"].items()}
    shards = sorted(({k: v for k, v in e.items() if k != "etag"} for r in records for e in r["shards"].values()),
                    key=lambda e: (e["block"], e["part"]))  # ETags are resume bookkeeping, not content
    assert sorted(blocks) == list(range(num_blocks)), "a data block is missing"
    assert len(shards) == sum(info["parts"] for info in blocks.values()), "a shard is missing"
    rows = sum(e["rows"] for e in shards)
    if rows == 0:
        raise DataError(f"the data {plan.settings.data} makes no rows (it tokenises to zero tokens); give it non-empty documents")
    tokens = sum(e["tokens"] for e in shards)
    nbytes = sum(e["bytes"] for e in shards)
    truncated = sum(info["truncated_rows"] for info in blocks.values())
    data = {**header["data"], "blocks": num_blocks, "rows": rows, "truncated_rows": truncated,
            "stream_tokens": sum(info["tokens"] for info in blocks.values())}
    if data_sha256:
        data |= {"sha256_by_file": data_sha256,
                 "sha256": hashlib.sha256(json.dumps(data_sha256, sort_keys=True).encode()).hexdigest()}
    manifest = {
        **header,
        "data": data,
        "shards": [{**e, "index": i} for i, e in enumerate(shards)],
        "totals": {"rows": rows, "tokens": tokens, "bytes": nbytes, "shards": len(shards),
                   "bytes_per_token": nbytes / max(tokens, 1), "truncated_rows": truncated},
        "started_at": min(r["started_at"] for r in records),
        "finished_at": utc_now(),
    }
    manifest["checksum"] = manifest_checksum(manifest)
    with write_errors(PACKAGES_FILE, location.root):
        location.write_bytes(PACKAGES_FILE, packages_text().encode())  # software.packages_sha256 hashes it
    with write_errors(MANIFEST_NAME, location.root):
        location.write_json(MANIFEST_NAME, manifest)  # last: the cache is finished from here on
    return manifest


def _agreed(records: list[dict], key: str, what: str):
    values = [r.get(key) for r in records]
    if any(v != values[0] for v in values):
        raise CacheFormatError(
            f"the ranks of this capture disagree on the {what} (the data changed while they ran?); "
            "pass --overwrite to capture it again"
        )
    return values[0]
