"""One writer per rank of a capture's ``--out``: a lock file per rank that a killed owner cannot leave held.

Two captures writing the same ``--out`` at once would remove each other's temporary files and
interleave their records. :func:`out_lock` takes ``_progress/r<rank>.lock`` with ``fcntl.flock``
before a rank writes anything: the kernel releases a flock when its owner's file is closed, which
happens when the process exits however it ends (SIGKILL included), so a lock is never left stuck.
The ranks of one capture take different files and never refuse each other; a second process for a
rank whose lock is held is refused, naming the holder's pid (written into the file).

The lock is reentrant within a process (the CLI takes it before clearing an ``--overwrite``'d cache,
:func:`~kdpipe.pipeline.capture.run.run_capture` takes it again). On an object store (``s3://``)
there is no lock: a store offers no lock that a killed owner releases, so captures into one remote
``--out`` must not run at the same time (documented in docs/capture.md).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from kdpipe.pipeline.cache.storage.location import CacheLocation
from kdpipe.pipeline.capture.progress import PROGRESS_DIR
from kdpipe.pipeline.errors import ConfigError
from kdpipe.pipeline.fileio import write_errors

LOCK_SUFFIX = ".lock"
_held: dict[str, list] = {}  # lock path -> [open file, depth] of the locks this process holds


def lock_name(rank: int) -> str:
    return f"{PROGRESS_DIR}/r{rank:05d}{LOCK_SUFFIX}"


@contextlib.contextmanager
def out_lock(out: str | Path | CacheLocation, *, rank: int):
    """Hold rank ``rank``'s lock on a local ``--out`` (creating the folder); a no-op on an object store.

    Raises :class:`ConfigError` naming the other process when it holds the lock.
    """
    location = CacheLocation(out)
    if location.is_remote:
        yield
        return
    path = location.local(lock_name(rank))
    key = os.path.realpath(path)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    handle = _acquire(path, location.root, rank)
    _held[key] = [handle, 1]
    try:
        yield
    finally:
        del _held[key]
        handle.close()  # releases the flock (the file stays: removing it would race a new owner)


def _acquire(path: Path, out, rank: int):
    import fcntl

    with write_errors("the cache folder", out):
        path.parent.mkdir(parents=True, exist_ok=True)
    with write_errors(f"the lock file {path.parent.name}/{path.name}", out):
        handle = open(path, "a+")  # noqa: SIM115 - held open for as long as the lock is
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        where = f" as rank {rank}" if rank else ""
        raise ConfigError(
            f"another process (pid {holder}) is writing to --out {out}{where} (it holds {path.parent.name}/{path.name}); "
            "wait for it to finish or stop it, or choose another --out"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
