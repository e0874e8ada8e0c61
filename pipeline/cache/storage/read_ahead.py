"""Downloading a remote cache's shards ahead of the reader.

The reader says in which order it will read shards (:meth:`ShardReadAhead.schedule`, e.g. once per
epoch); background threads keep the next ``read_ahead`` shards of that order downloaded and checked
(:data:`PARALLEL_DOWNLOADS` at a time) into
:class:`~kdpipe.pipeline.cache.storage.local_copies.LocalCopies`, so the reader does not wait on the
store's per-request latency. :meth:`ShardReadAhead.get` blocks until a shard is there (an
unscheduled shard is downloaded then); :meth:`ShardReadAhead.release` lets it be evicted once it is
neither in use nor among the next ones.

Threads start lazily and belong to the process that started them: the object may be pickled into
(or forked with) DataLoader workers, which start their own.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from kdpipe.pipeline.cache.storage.local_copies import LocalCopies

# Downloads in flight at once, in the order of the schedule: the next shard the reader needs arrives
# first instead of sharing the bandwidth (and, on a busy machine, the CPU) with those after it.
PARALLEL_DOWNLOADS = 2


class ShardReadAhead:
    """Local copies of the shards of one remote cache, fetched ``read_ahead`` ahead of their use."""

    def __init__(self, location, shards: list[dict], copies: LocalCopies, *, suffix: str, read_ahead: int):
        self.location, self.shards, self.copies, self.suffix = location, shards, copies, suffix
        self.read_ahead = max(0, int(read_ahead))
        self._start_process()

    def _start_process(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._fetches: dict[int, Future] = {}  # shard -> its pinned copy (being) fetched
        self._in_use: set[int] = set()
        self._order: list[int] = []
        self._next = 0  # position in _order of the next shard the reader will want

    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._start_process()

    def _this_process(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's threads are not here, its pins are not ours
            for future in self._fetches.values():
                if future.done():
                    _release_pin(future)
            self._start_process()

    # ------------------------------------------------------------------ API
    def schedule(self, order: list[int]) -> None:
        """The shards this process will read next, in order (replaces any earlier order)."""
        self._this_process()
        with self._lock:
            self._order, self._next = [int(i) for i in order], 0
            self._top_up()

    def get(self, index: int) -> Path:
        """The local path of shard ``index``, pinned until :meth:`release`; raises what its fetch raised."""
        self._this_process()
        with self._lock:
            self._advance(index)
            future = self._fetches.get(index) or self._fetch(index)
            self._in_use.add(index)
            self._top_up()
        try:
            return future.result().path
        except BaseException:
            with self._lock:
                self._in_use.discard(index)
                if self._fetches.get(index) is future:
                    del self._fetches[index]  # asked again, it is fetched again
            raise

    def release(self, index: int) -> None:
        """Shard ``index`` is no longer read; its copy may go unless it is among the next ones."""
        self._this_process()
        with self._lock:
            self._in_use.discard(index)
            self._top_up()
        self.copies.evict()

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            for future in self._fetches.values():
                future.add_done_callback(_release_pin)
            self._fetches.clear()
            self._in_use.clear()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ internals (under _lock)
    def _advance(self, index: int) -> None:
        try:
            self._next = self._order.index(index, self._next) + 1
        except ValueError:
            pass  # not in the order (or already passed): the order stays where it was

    def _window(self) -> list[int]:
        window: list[int] = []
        for index in self._order[self._next:]:
            if len(window) >= self.read_ahead:
                break
            if index not in window:
                window.append(index)
        return window

    def _top_up(self) -> None:
        """Fetch the next ``read_ahead`` shards; unpin finished fetches no longer wanted."""
        window = self._window()
        for index in window:
            if index not in self._fetches:
                self._fetch(index)
        for index, future in list(self._fetches.items()):
            if index not in window and index not in self._in_use and future.done():
                del self._fetches[index]
                _release_pin(future)

    def _fetch(self, index: int) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=max(1, min(self.read_ahead, PARALLEL_DOWNLOADS)),
                                            thread_name_prefix="kdpipe-read-ahead")
        entry = self.shards[index]
        future = self._pool.submit(self.copies.fetch, self.location, entry["name"], sha256=entry["sha256"],
                                   size=entry["bytes"], suffix=self.suffix)
        self._fetches[index] = future
        return future


def _release_pin(future: Future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().release()
