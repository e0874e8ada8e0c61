"""Where a cache lives: a local folder, or a prefix in an object store (``s3://bucket/prefix``).

:class:`CacheLocation` offers the few operations kdpipe needs, on names relative to the cache root
(``manifest.json``, ``shards/...``). A local folder works as it always has: every write lands as
``name.<pid>.tmp``, is fsynced and renamed. An object store has no rename, but it makes an object
visible only once the request that writes it completes: small objects (JSON records) are written
with one whole-object PUT, shards are uploaded from a finished local file (a multipart upload is
invisible until completed). Either way a reader sees an old object, a new one or none -- never half.

URLs are shown and recorded with their user info redacted; storage options (which may hold keys)
are only ever handed to fsspec.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from kdpipe.pipeline.cache.storage.object_store import endpoint_of, open_filesystem, retrying
from kdpipe.pipeline.errors import ConfigError
from kdpipe.pipeline.fileio import atomic_path, atomic_write_bytes
from kdpipe.pipeline.provenance import redact_url

DOWNLOAD_BLOCK = 8 << 20  # bytes per ranged GET while downloading a shard
WRITE_BYTES_PER_TIMEOUT = 8 << 20  # a write may take one read timeout more per this many bytes (see _write_deadline)
WHOLE_GET_MAX = 16 << 20  # objects up to this size are downloaded with one GET, in memory
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(path) -> bool:
    """True for an object-store URL (``s3://...``); ``file://`` and plain paths are local."""
    return isinstance(path, str) and bool(_SCHEME.match(path)) and not path.lower().startswith("file://")


def parse_storage_options(text: str | None) -> dict | None:
    """``--storage-options`` JSON as a dict (None when not given); the text itself is never echoed."""
    if text is None or not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--storage-options is not valid JSON ({exc.msg} at character {exc.pos}); give a JSON "
                          "object, e.g. '{\"endpoint_url\": \"http://localhost:9000\"}'") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--storage-options must be a JSON object ({{\"key\": value, ...}}), got a {type(value).__name__}")
    return value


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str | None  # the store's version tag of the object (None on a local folder)


class CacheLocation:
    """The root of a cache: a local folder or an object-store URL (with its fsspec storage options)."""

    def __init__(self, root: str | os.PathLike | CacheLocation, storage_options: dict | None = None):
        if isinstance(root, CacheLocation):
            storage_options = root._options if storage_options is None else storage_options
            root = root._url if root.is_remote else root.path
        text = os.fspath(root)
        self.is_remote = is_url(text)
        self._options = dict(storage_options or {}) if self.is_remote else {}
        if self.is_remote:
            self._url = text.rstrip("/")
            self.path = None
            self.display = redact_url(self._url)
        else:
            self._url = None
            self.path = Path(text[len("file://"):] if text.lower().startswith("file://") else text)
            self.display = str(self.path)
        self._fs = self._fs_pid = self._base = self._policy = None

    # ------------------------------------------------------------------ identity
    @property
    def root(self) -> Path | str:
        """The local folder, or the (redacted) URL."""
        return self.display if self.is_remote else self.path

    def record(self) -> str:
        """What a run manifest records: the resolved local path, or the redacted URL."""
        return self.display if self.is_remote else str(self.path.resolve())

    def __str__(self) -> str:
        return self.display

    def __repr__(self) -> str:
        return f"CacheLocation({self.display!r})"

    def __getstate__(self):  # a filesystem client belongs to the process that made it
        return {**self.__dict__, "_fs": None, "_fs_pid": None}

    @property
    def fs(self):
        if self._fs is None or self._fs_pid != os.getpid():
            self._fs, self._base, self._policy = open_filesystem(self._url, self._options)
            self._fs_pid = os.getpid()
        return self._fs

    def _key(self, name: str = "") -> str:
        self.fs  # noqa: B018 - sets _base
        return f"{self._base}/{name}" if name else self._base

    def _call(self, action: str, name: str, fn, *, deadline_s: float | None = None):
        """``fn()`` (one storage operation on ``name``, restartable), attempted again after a stall or a
        transient failure; its errors while ``action`` (read, write, list, delete) as a StorageError."""
        fs = self.fs  # opened (with its retry policy) in this process
        url = f"{self.display}/{name}" if name else self.display
        policy = self._policy if deadline_s is None else dataclasses.replace(self._policy, read_timeout_s=deadline_s)
        return retrying(fn, url=url, endpoint=endpoint_of(fs), action=action, policy=policy)

    def _deadline(self, size: int = 0) -> float | None:
        """Seconds an operation moving ``size`` bytes may take before it counts as stalled: the read
        timeout, plus one more per :data:`WRITE_BYTES_PER_TIMEOUT` bytes. (The store library's read
        timeout starts only once a request's body is sent, so a store that stops reading a body would
        hang a write forever, and a metadata call may make several requests, each with its timeout.)"""
        from fsspec.asyn import AsyncFileSystem

        if not isinstance(self.fs, AsyncFileSystem) or self._policy.read_timeout_s is None:
            return None
        return self._policy.read_timeout_s * (1 + size // WRITE_BYTES_PER_TIMEOUT)

    def local(self, name: str = "") -> Path:
        return self.path / name if name else self.path

    # ------------------------------------------------------------------ reading
    def info(self, name: str) -> ObjectInfo | None:
        """Size and version tag of ``name``; None when it does not exist."""
        if not self.is_remote:
            path = self.local(name)
            return ObjectInfo(path.stat().st_size, None) if path.is_file() else None
        try:
            deadline = self._deadline()
            return _object_info(self._call("read", name, lambda: self.fs.info(self._key(name), **_timeout(deadline)),
                                           deadline_s=deadline))
        except FileNotFoundError:
            return None

    def exists(self, name: str = "") -> bool:
        if not self.is_remote:
            return self.local(name).exists()
        if not name:
            return not self.is_empty()
        return self.info(name) is not None

    def read_bytes(self, name: str) -> bytes:
        """The bytes of ``name``; raises FileNotFoundError when it does not exist."""
        if not self.is_remote:
            return self.local(name).read_bytes()
        return self._call("read", name, lambda: self.fs.cat_file(self._key(name)))

    def download(self, name: str, dest: Path, *, size: int | None = None) -> str:
        """Copy ``name`` to the local file ``dest``; return the sha256 of the bytes, hashed as they stream.

        ``size``: the expected size, when known; an object of at most :data:`WHOLE_GET_MAX` bytes is
        then fetched with a single GET (streaming costs S3 a HEAD request first).
        """
        if not self.is_remote:
            with open(self.local(name), "rb") as src:
                return _copy(src, dest)
        if size is not None and size <= WHOLE_GET_MAX:
            deadline = self._deadline(size)  # "Range: bytes=0-": the whole object in one GET
            data = self._call("read", name, lambda: self.fs.cat_file(self._key(name), start=0, **_timeout(deadline)),
                              deadline_s=deadline)
            dest.write_bytes(data)
            return hashlib.sha256(data).hexdigest()

        def stream() -> str:  # restarted from the first byte by another attempt
            with self.fs.open(self._key(name), "rb", block_size=DOWNLOAD_BLOCK, cache_type="none") as src:
                return _copy(src, dest)

        return self._call("read", name, stream)

    def listing(self, folder: str) -> dict[str, ObjectInfo]:
        """Every object (file) directly in ``folder``, by name relative to the root ({} when none)."""
        if not self.is_remote:
            path = self.local(folder)
            if not path.is_dir():
                return {}
            return {f"{folder}/{p.name}": ObjectInfo(p.stat().st_size, None) for p in path.iterdir() if p.is_file()}
        try:
            deadline = self._deadline()
            entries = self._call("list", folder, lambda: self.fs.ls(self._key(folder), detail=True, **_timeout(deadline)),
                                 deadline_s=deadline)
        except FileNotFoundError:
            return {}
        prefix = self._key() + "/"
        return {e["name"][len(prefix):]: _object_info(e) for e in entries
                if e.get("type") != "directory" and e["name"].startswith(prefix)}

    def is_empty(self) -> bool:
        """True when nothing exists under the root (a missing local folder is empty)."""
        if not self.is_remote:
            return not self.path.is_dir() or not any(self.path.iterdir())
        try:
            deadline = self._deadline()
            return not self._call("list", "", lambda: self.fs.ls(self._key(), detail=False, **_timeout(deadline)),
                                  deadline_s=deadline)
        except FileNotFoundError:
            return True

    # ------------------------------------------------------------------ writing
    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` whole: atomic rename locally, one PUT on a store."""
        if not self.is_remote:
            atomic_write_bytes(self.local(name), data)
            return
        deadline = self._deadline(len(data))
        self._call("write", name, lambda: self.fs.pipe_file(self._key(name), data, **_timeout(deadline)),
                   deadline_s=deadline)

    def write_json(self, name: str, obj) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())

    def upload(self, source: Path, name: str) -> ObjectInfo:
        """Store the finished local file ``source`` as ``name``; return the object's size and version tag."""
        if not self.is_remote:
            with atomic_path(self.local(name)) as tmp:
                shutil.copyfile(source, tmp)
            return ObjectInfo(self.local(name).stat().st_size, None)
        deadline = self._deadline(source.stat().st_size)
        self._call("write", name, lambda: self.fs.put_file(str(source), self._key(name), **_timeout(deadline)),
                   deadline_s=deadline)
        return self.info(name) or ObjectInfo(0, None)  # (a store that lost it: the size check says so)

    def remove(self, name: str) -> None:
        """Delete ``name`` if it exists."""
        if not self.is_remote:
            self.local(name).unlink(missing_ok=True)
            return
        try:
            deadline = self._deadline()
            self._call("delete", name, lambda: self.fs.rm_file(self._key(name), **_timeout(deadline)), deadline_s=deadline)
        except FileNotFoundError:
            pass

    def remove_folder(self, folder: str) -> None:
        """Delete ``folder`` and everything in it, if it exists."""
        if not self.is_remote:
            shutil.rmtree(self.local(folder), ignore_errors=True)
            return
        for name in self.listing(folder):
            self.remove(name)


def _timeout(seconds: float | None) -> dict:
    """fsspec's ``timeout=`` for an async filesystem's call: the whole call is cancelled past it."""
    return {} if seconds is None else {"timeout": seconds}


def _copy(src, dest: Path) -> str:
    """Copy the open binary file ``src`` to ``dest`` (from the start); the sha256 of the bytes."""
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        while block := src.read(DOWNLOAD_BLOCK):
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def _object_info(entry: dict) -> ObjectInfo:
    etag = entry.get("ETag") or entry.get("etag") or entry.get("md5Hash") or entry.get("generation")
    return ObjectInfo(int(entry.get("size", entry.get("Size", 0))), str(etag).strip('"') if etag else None)
