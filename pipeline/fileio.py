"""Atomic file writes and hashing.

Every file kdpipe writes lands as ``name.<pid>.tmp`` first, is fsynced, then renamed over the final
name, so a crash leaves either the old file, the new file, or a stray ``*.tmp`` -- never half a file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path

from kdpipe.pipeline.errors import WriteError

_HASH_BLOCK = 1 << 20


def describe_os_error(exc: OSError) -> str:
    """``[Errno 28] No space left on device``: the error without the file name (callers name it)."""
    if exc.errno is not None and exc.strerror:
        return f"[Errno {exc.errno}] {exc.strerror}"
    return str(exc) or type(exc).__name__


def fix_for_os_error(exc: OSError) -> str:
    """What the user can do about a failed write, by errno."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make it writable (or choose another --out)"
    return "fix that"


@contextlib.contextmanager
def write_errors(what: str, out: str | os.PathLike):
    """Turn an ``OSError`` raised while writing ``what`` into --out into a one-line :class:`WriteError`.

    Files land atomically (:func:`atomic_path`), so a failed write leaves what was already written
    intact and the same command resumes once the cause is fixed.
    """
    try:
        yield
    except OSError as exc:
        raise WriteError(
            f"cannot write {what} to --out {out}: {describe_os_error(exc)}; "
            f"{fix_for_os_error(exc)} and re-run the same command to resume"
        ) from exc


def remove_stale_tmp(folder: Path, pattern: str) -> list[Path]:
    """Delete ``folder/pattern`` temporary files left by a killed writer; return what was removed."""
    removed = []
    for path in sorted(Path(folder).glob(pattern)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: list[Path], *, root: Path) -> str:
    """One sha256 over several files: each file's path relative to ``root`` and its content hash."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success fsync it and rename it over ``path``."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` durable (best effort: some file systems refuse)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
