"""The data as a stream of row blocks: bounded memory, parallel tokenisation, ranks without overlap.

Documents are read in order and grouped into **blocks** of about ``block_chars`` characters of
content (a block ends after the document that reaches the budget). A block is packed on its own
(:mod:`.packing`), so its rows depend only on its documents and the settings: rank ``r`` of ``W``
tokenises blocks ``b`` with ``b % W == r`` and only reads the others, a resumed capture skips finished
blocks without tokenising them, and the rows never depend on worker timing. Row ``i`` of block ``b``
has the key ``sample_index = b << 32 | i`` (so a capture of one block numbers its rows 0, 1, ...).

Tokenisation runs in ``num_workers`` spawned processes, a few blocks ahead of the consumer (the
teacher), so the teacher does not wait for the tokenizer; memory holds those blocks and nothing else,
whatever the corpus size. With ``limit_rows`` or ``max_tokens`` the stream stops early; then every
rank packs every block up to the limit (to know where the limit falls) and captures only its own.

``.npz`` arrays (module teachers) are one block of ``rows_per_block`` rows after another, and
``sample_index`` is the sample's row in the ``.npz``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import multiprocessing
import os
import threading
import time
from typing import Callable, Iterator

import numpy as np

from kdpipe.pipeline.data.arrays import rows_from_arrays
from kdpipe.pipeline.data.documents import Document, Fields, documents
from kdpipe.pipeline.data.packing import PackedBlock, PackingSpec, Rows, pack
from kdpipe.pipeline.data.readers import ReadState, iter_records
from kdpipe.pipeline.data.sources import Source

BLOCK_CHARS = 4 * 2**20  # ~1M tokens of English text per block
KEY_BITS = 32


@dataclasses.dataclass
class Block:
    index: int
    rows: Rows
    sample_index: np.ndarray  # [N] int64 row keys (see module doc)
    tokens: int  # real tokens in the rows
    truncated_rows: int = 0
    bytes_read: int = 0  # bytes of the data read up to the end of this block (for progress)


def document_blocks(docs: Iterator[Document], block_chars: int) -> Iterator[tuple[int, list[Document]]]:
    """``(block index, documents)`` in order; a block closes once its documents reach ``block_chars``."""
    block, size, index = [], 0, 0
    for doc in docs:
        block.append(doc)
        size += doc.size()
        if size >= block_chars:
            yield index, block
            block, size, index = [], 0, index + 1
    if block:
        yield index, block


@dataclasses.dataclass
class BlockStream:
    """This rank's blocks of ``source`` (iterate once). After iteration, ``num_blocks`` holds the
    number of blocks in the whole (possibly limited) stream and ``state`` what was read."""

    source: Source
    spec: PackingSpec | None  # None for arrays
    fields: Fields = Fields()
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    skip: Callable[[int], bool] = lambda index: False  # blocks finished earlier: not tokenised (unless a limit needs their row count)
    limit_rows: int | None = None
    max_tokens: int | None = None
    block_chars: int = BLOCK_CHARS
    rows_per_block: int = 1024  # arrays only
    num_blocks: int | None = dataclasses.field(default=None, init=False)
    state: ReadState | None = dataclasses.field(default=None, init=False)

    def __iter__(self) -> Iterator[Block]:
        self.state = ReadState(self.source)
        blocks = self._array_blocks() if self.source.kind == "arrays" else self._text_blocks()
        rows = tokens = 0
        last = -1
        try:
            for index, packed, mine in blocks:
                last = index
                result = self._within_limits(packed, rows, tokens)
                rows, tokens = rows + len(result.rows), tokens + result.tokens
                if mine:
                    yield dataclasses.replace(self._block(index, result), bytes_read=packed.bytes_read)
                if (self.limit_rows is not None and rows >= self.limit_rows) or (self.max_tokens is not None and tokens >= self.max_tokens):
                    break
        finally:
            blocks.close()  # stops the tokenizer workers
        self.num_blocks = last + 1

    def _mine(self, index: int) -> bool:
        return index % self.world_size == self.rank

    @property
    def _limited(self) -> bool:
        return self.limit_rows is not None or self.max_tokens is not None

    def _within_limits(self, packed: "_Packed", rows: int, tokens: int) -> PackedBlock:
        """The block cut where the limits fall (re-packed exactly when it runs past them)."""
        left_rows = None if self.limit_rows is None else self.limit_rows - rows
        left_tokens = None if self.max_tokens is None else self.max_tokens - tokens
        result = packed.result
        over_rows = left_rows is not None and len(result.rows) > left_rows
        over_tokens = left_tokens is not None and result.tokens > left_tokens
        if not (over_rows or over_tokens):
            return result
        if packed.docs is None:  # arrays: rows only
            return PackedBlock(result.rows.take(left_rows), left_rows)
        return pack(self.spec, packed.docs, max_rows=left_rows, max_tokens=left_tokens)

    def _block(self, index: int, packed: PackedBlock) -> Block:
        n = len(packed.rows)
        if self.source.kind == "arrays":
            keys = np.arange(index * self.rows_per_block, index * self.rows_per_block + n, dtype=np.int64)
        else:
            keys = (np.int64(index) << KEY_BITS) + np.arange(n, dtype=np.int64)
        return Block(index, packed.rows, keys, packed.tokens, packed.truncated_rows)

    def _array_blocks(self) -> Iterator[tuple[int, "_Packed", bool]]:
        rows = rows_from_arrays(self.source.files[0])
        for index, start in enumerate(range(0, len(rows), self.rows_per_block)):
            part = Rows(*(None if a is None else a[start : start + self.rows_per_block]
                          for a in (rows.inputs, rows.mask, rows.labels, rows.attention_mask)))
            yield index, _Packed(PackedBlock(part, len(part)), None), self._mine(index)
        self.state.file_done(self.source.files[0])  # (bytes_read stays 0: arrays are read at once)

    def _text_blocks(self) -> Iterator[tuple[int, "_Packed", bool]]:
        """Packed blocks in order, tokenised ``2 * num_workers`` blocks ahead by the worker pool."""
        docs = documents(iter_records(self.source, self.state), self.fields)
        pending: collections.deque = collections.deque()
        cap_rows, cap_tokens = self.limit_rows, self.max_tokens
        with _Pool(self.spec, self.num_workers) as pool:
            for index, block_docs in document_blocks(docs, self.block_chars):
                mine, read = self._mine(index), self.state.bytes_done
                if not self._limited and not (mine and not self.skip(index)):
                    yield index, _Packed(_EMPTY, None, read), False
                    continue
                pending.append((index, block_docs, mine, read, pool.submit(block_docs, cap_rows, cap_tokens)))
                while len(pending) > pool.lookahead:
                    index_, docs_, mine_, read_, future = pending.popleft()
                    yield index_, _Packed(future.result(), docs_, read_), mine_
            while pending:
                index_, docs_, mine_, read_, future = pending.popleft()
                yield index_, _Packed(future.result(), docs_, read_), mine_


@dataclasses.dataclass
class _Packed:
    result: PackedBlock
    docs: list | None  # the block's documents (to re-pack at a limit); None for arrays
    bytes_read: int = 0  # data bytes read when the block's last document was


_EMPTY = PackedBlock(Rows(np.zeros((0, 0), np.int64), np.zeros((0, 0), bool), None, None), 0)

# ----------------------------------------------------------------------------- tokenizer workers
_WORKER_SPEC: PackingSpec | None = None


def _init_worker(spec: PackingSpec, parent: int) -> None:
    """``parent`` is the capture's pid, given by the capture itself: a worker that starts after its
    capture was killed finds another parent and exits at once (``os.getppid()`` here would name the
    process it was handed to, and the worker would wait for that one forever)."""
    global _WORKER_SPEC
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one process per core already
    _WORKER_SPEC = spec
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """End this worker within a second of its capture's end: a capture killed with SIGKILL has no
    time to stop its workers, which would otherwise wait for work forever."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _pack_in_worker(docs: list, max_rows: int | None, max_tokens: int | None) -> PackedBlock:
    return pack(_WORKER_SPEC, docs, max_rows=max_rows, max_tokens=max_tokens)


class _Pool:
    """``num_workers`` spawned tokenizer processes, or inline packing when ``num_workers`` is 0."""

    def __init__(self, spec: PackingSpec, num_workers: int):
        self.spec, self.num_workers = spec, num_workers
        self.lookahead = 2 * num_workers
        self._executor = None
        if num_workers > 0:
            self._executor = concurrent.futures.ProcessPoolExecutor(
                max_workers=num_workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(spec, os.getpid()),
            )

    def submit(self, docs: list, max_rows: int | None, max_tokens: int | None) -> concurrent.futures.Future:
        if self._executor is not None:
            return self._executor.submit(_pack_in_worker, docs, max_rows, max_tokens)
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result(pack(self.spec, docs, max_rows=max_rows, max_tokens=max_tokens))
        return future

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)


def collect(stream: BlockStream) -> tuple[Rows, np.ndarray]:
    """Every row of a (small) stream in memory, with its ``sample_index`` keys ``[N]``."""
    blocks = [block for block in stream if len(block.rows)]
    if not blocks:
        from kdpipe.pipeline.errors import DataError

        raise DataError(f"data {stream.source.spec} makes no rows (it tokenises to zero tokens); give it non-empty documents")
    return Rows.concat([b.rows for b in blocks]), np.concatenate([b.sample_index for b in blocks])
