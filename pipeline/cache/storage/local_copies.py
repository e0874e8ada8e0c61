"""Local copies of remote shards, in a folder the processes of one machine share.

A copy is named by its content, ``<sha256><suffix>``, so a file there is valid by its name: it lands
(by rename) only after its bytes were hashed while they downloaded and matched the manifest. Several
processes (ranks, DataLoader workers) may use one folder at once:

* a process using a copy holds a shared ``flock`` on it -- a *pin* -- until it releases the shard;
  eviction takes an exclusive lock without waiting and skips what it cannot lock, so a copy in use
  or read ahead is never removed;
* one download of a copy at a time: a lock file per sha256 makes the others wait, then find it;
* beyond the size limit the least recently used copies go first (a copy's mtime is touched at every
  use); the limit may be exceeded by the pinned copies alone.

Without a folder (no ``--local-cache``), a private temporary folder with a limit of zero keeps only
the pinned copies and is removed when its creator exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import threading
import weakref
from pathlib import Path

from kdpipe.pipeline.errors import ConfigError, IntegrityError

_TMP, _LOCK = ".tmp", ".lock"


class Pin:
    """A shared lock on one local copy, held while the copy is in use or read ahead."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


class LocalCopies:
    """A content-addressed folder of shard copies with an LRU size limit (None = no limit)."""

    def __init__(self, folder: str | os.PathLike | None = None, *, limit_bytes: int | None = None):
        self.private = folder is None
        if self.private:
            self.folder = Path(tempfile.mkdtemp(prefix="kdpipe-shards-"))
            self.limit_bytes = 0
            self._remove_at_exit = weakref.finalize(self, _remove_private_folder, self.folder, os.getpid())
        else:
            self.folder = Path(folder)
            self.limit_bytes = limit_bytes
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"cannot create --local-cache {self.folder} ({exc.strerror}); choose a writable folder") from None
        if self.limit_bytes is not None and self.limit_bytes < 0:
            raise ConfigError("--local-cache-gb must be positive")
        self.downloads = self.hits = 0  # in this process, for tests and benchmarks

    def __getstate__(self):  # the private folder belongs to the process that made it
        return {k: v for k, v in self.__dict__.items() if k != "_remove_at_exit"}

    def fetch(self, location, name: str, *, sha256: str, size: int, suffix: str) -> Pin:
        """A pinned local copy of shard ``name`` of ``location``, downloaded and checked when not there."""
        final = self.folder / f"{sha256}{suffix}"
        pin = self._pin(final)
        if pin is not None:
            self.hits += 1
            return pin
        with self._download_lock(sha256):
            pin = self._pin(final)  # another process may have fetched it meanwhile
            if pin is not None:
                self.hits += 1
                return pin
            pin = self._download(location, name, final, sha256=sha256, size=size)
        self.downloads += 1
        self.evict()
        return pin

    def _download(self, location, name: str, final: Path, *, sha256: str, size: int) -> Pin:
        tmp = final.with_name(f"{final.name}.{os.getpid()}.{threading.get_ident()}{_TMP}")
        try:
            digest = location.download(name, tmp, size=size)
            got = tmp.stat().st_size
            if got != size:
                raise IntegrityError(
                    f"shard {name} of {location} has {got} bytes, manifest says {size} (truncated or replaced); its rows "
                    f"were not used -- restore the object, or delete it and {location}/manifest.json and re-run the same "
                    "cache-teacher command to redo it"
                )
            if digest != sha256:
                raise IntegrityError(
                    f"Checksum failure: shard {name} of {location} does not match its manifest sha256; its rows were not "
                    f"used -- the object is damaged: restore it, or delete it and {location}/manifest.json and re-run "
                    "the same cache-teacher command to redo it"
                )
            fd = os.open(tmp, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_SH)  # pinned before it is visible: no evictor can take it
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return Pin(final, fd)

    def _pin(self, path: Path) -> Pin | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits while an evictor holds it, then checks it is still there
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used
        return Pin(path, fd)

    @contextlib.contextmanager
    def _download_lock(self, sha256: str):
        fd = os.open(self.folder / f"{sha256}{_LOCK}", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def evict(self) -> None:
        """Remove unpinned copies, least recently used first, until the folder is within its limit."""
        if self.limit_bytes is None:
            return
        copies, total = [], 0
        for entry in os.scandir(self.folder):
            if entry.name.endswith(_LOCK):
                continue
            try:
                stat = entry.stat()
            except FileNotFoundError:
                continue
            if entry.name.endswith(_TMP):
                _remove_orphan_tmp(Path(entry.path))
                continue
            copies.append((stat.st_mtime, stat.st_size, Path(entry.path)))
            total += stat.st_size
        for _, size, path in sorted(copies):
            if total <= self.limit_bytes:
                break
            if _remove_unpinned(path):
                total -= size

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir() if not p.name.endswith((_LOCK, _TMP)))


def _remove_unpinned(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False  # pinned: in use or read ahead somewhere
    try:
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            path.unlink()
            path.with_name(path.name.split(".", 1)[0] + _LOCK).unlink(missing_ok=True)
            return True
        return False
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)


def _remove_orphan_tmp(path: Path) -> None:
    """A download's temporary file whose process is gone (``<name>.<pid>.<thread>.tmp``)."""
    try:
        pid = int(path.name.split(".")[-3])
        os.kill(pid, 0)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
    except (ValueError, IndexError, PermissionError):
        pass


def _remove_private_folder(folder: Path, owner: int) -> None:
    if os.getpid() == owner:
        shutil.rmtree(folder, ignore_errors=True)
