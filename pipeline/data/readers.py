"""Reading a :class:`~kdpipe.pipeline.data.sources.Source` record by record.

:func:`iter_records` yields ``(where, record)`` pairs, ``record`` being a dict (or, for a ``.txt``
file, a :class:`~kdpipe.pipeline.data.documents.TextStream` of its text, read a chunk at a time) and ``where`` a ``file:line`` label for error messages. It never holds more than one
record batch in memory, and hashes each file while reading it (:class:`ReadState`).
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import zlib
from pathlib import Path
from typing import Iterator

from kdpipe.pipeline.data.documents import TextStream
from kdpipe.pipeline.data.sources import Source, suffix_of
from kdpipe.pipeline.errors import DataError
from kdpipe.pipeline.fileio import sha256_file

_BATCH_ROWS = 1024
_TEXT_CHUNK_BYTES = 1 << 20  # a .txt file is read this much at a time


class ReadState:
    """What a stream has read of its source so far: file hashes and bytes.

    ``sha256`` gets each file's hash as the file is read to its end (no second pass over it); a file
    the stream stopped inside (``--limit-rows``) or read through a library that seeks (Parquet, Arrow)
    is hashed separately by :meth:`complete_hashes`. ``bytes_done`` counts the bytes of the source's
    files read so far (compressed bytes for compressed files), for extrapolating from a sample.
    """

    def __init__(self, source: Source):
        self.source = source
        self.sha256: dict[str, str] = {}
        self.bytes_before = 0  # files finished
        self.bytes_in_file = 0  # the file being read

    @property
    def bytes_done(self) -> int:
        return self.bytes_before + self.bytes_in_file

    def file_done(self, path: Path) -> None:
        self.bytes_before += path.stat().st_size
        self.bytes_in_file = 0

    def complete_hashes(self) -> dict[str, str]:
        """Hashes of every file of the source, hashing those not read to the end."""
        for f in self.source.files:
            self.sha256.setdefault(self.source.relative(f), sha256_file(f))
        return {self.source.relative(f): self.sha256[self.source.relative(f)] for f in self.source.files}


class _HashingReader(io.RawIOBase):
    """A raw binary file whose bytes feed a sha256 as they are read."""

    def __init__(self, path: Path):
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
        self.digest = hashlib.sha256()
        self.raw_bytes = 0  # read so far (a buffered or decompressing reader is a little ahead)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._file.readinto(buffer)
        if n:
            self.digest.update(memoryview(buffer)[:n])
            self.raw_bytes += n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def iter_records(source: Source, state: ReadState | None = None) -> Iterator[tuple[str, object]]:
    """``(where, record)`` for every record of ``source``, in order (see module doc)."""
    state = state or ReadState(source)
    if source.kind == "hub":
        yield from _hub_records(source)
        return
    if source.kind == "saved-dataset":
        yield from _saved_dataset_records(source, state)
        return
    for path in source.files:
        suffix = suffix_of(path)
        if suffix in (".parquet", ".arrow"):
            yield from (_parquet_records if suffix == ".parquet" else _arrow_records)(path, state)
            state.file_done(path)
            continue
        reader = _HashingReader(path)
        try:
            if suffix == ".txt":
                yield str(path), TextStream(_text_chunks(path, reader, state))
            else:
                yield from _jsonl_records(path, _decompressed(path, suffix, reader), state, reader)
            _drain(path, reader)
            state.sha256[source.relative(path)] = reader.digest.hexdigest()
            state.file_done(path)
        finally:
            reader.close()


def _drain(path: Path, reader: _HashingReader) -> None:
    """Read what a decompressor left unread (trailing bytes) so that the hash covers the file."""
    while not reader.closed and reader.read(1 << 20):  # a plain file's reader is at its end already
        pass


def _decompressed(path: Path, suffix: str, raw: io.RawIOBase):
    if suffix == ".jsonl.gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if suffix == ".jsonl.zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)
    return io.BufferedReader(raw)


def _text_chunks(path: Path, reader: _HashingReader, state: ReadState) -> Iterator[str]:
    """A ``.txt`` file's text, :data:`_TEXT_CHUNK_BYTES` at a time (decoded as UTF-8 across chunk edges)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    while True:
        raw = reader.read(_TEXT_CHUNK_BYTES) or b""
        decoded_from = reader.raw_bytes - len(raw) - len(decoder.getstate()[0])  # file offset of the decoder's input
        try:
            text = decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as exc:
            at = decoded_from + exc.start
            raise DataError(f"{path} is not valid UTF-8 (byte {at}); re-encode it, e.g. iconv -t UTF-8") from None
        state.bytes_in_file = reader.raw_bytes
        if text:
            yield text
        if not raw:
            return


def _decode(path: Path, raw: bytes, where: str | None = None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where or path} is not valid UTF-8 (byte {exc.start}); re-encode it, e.g. iconv -t UTF-8") from None


def _jsonl_records(path: Path, stream, state: ReadState, raw: _HashingReader) -> Iterator[tuple[str, dict]]:
    lines = io.BufferedReader(stream) if not isinstance(stream, io.BufferedIOBase) else stream
    compressed = not path.name.endswith(".jsonl")
    try:
        for n, line in enumerate(lines, start=1):
            # bytes consumed: the lines themselves, or the compressed bytes the decompressor took
            state.bytes_in_file = raw.raw_bytes if compressed else state.bytes_in_file + len(line)
            if line.strip():
                yield f"{path}:{n}", _json_object(line, f"{path}:{n}")
    except (OSError, EOFError, zlib.error) as exc:  # gzip: BadGzipFile is an OSError
        raise _unreadable(path, exc) from None
    except Exception as exc:  # noqa: BLE001 - zstandard.ZstdError is not an OSError
        if type(exc).__name__ == "ZstdError":
            raise _unreadable(path, exc) from None
        raise


def _unreadable(path: Path, exc: BaseException) -> DataError:
    kind = "gzip" if path.name.endswith(".gz") else "zstd" if path.name.endswith(".zst") else "JSON Lines"
    return DataError(f"cannot read {path} ({type(exc).__name__}: {exc}); check that it is a complete {kind} file")


def _json_object(line: bytes, where: str) -> dict:
    try:
        record = json.loads(_decode(Path(where), line, where))
    except json.JSONDecodeError:
        raise DataError(f"{where} is not valid JSON; each line must be one JSON object") from None
    if not isinstance(record, dict):
        raise DataError(f"{where} is not a JSON object; each line must be one {{...}} object")
    return record


def jsonl_records(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSON Lines text; bad lines are errors."""
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield n, _json_object(line.encode(), f"{path}:{n}")


def _parquet_records(path: Path, state: ReadState) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        total = max(parquet.metadata.num_rows, 1)
        for where, record, row in _table_records(path, parquet.iter_batches(batch_size=_BATCH_ROWS)):
            state.bytes_in_file = path.stat().st_size * row // total
            yield where, record
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read {path} ({exc}); check that it is a complete Parquet file") from None


def _arrow_records(path: Path, state: ReadState) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as mapped:
            try:
                batches = pa.ipc.open_stream(mapped)  # what datasets writes
            except pa.ArrowInvalid:
                mapped.seek(0)
                table = pa.ipc.open_file(mapped)
                batches = (table.get_batch(i) for i in range(table.num_record_batches))
            for where, record, _ in _table_records(path, batches):
                state.bytes_in_file = mapped.tell()
                yield where, record
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read {path} ({exc}); check that it is a complete Arrow file") from None


def _table_records(path: Path, batches) -> Iterator[tuple[str, dict, int]]:
    row = 0
    for batch in batches:
        for record in batch.to_pylist():
            row += 1
            yield f"{path} row {row - 1}", record, row


def _saved_dataset_records(source: Source, state: ReadState) -> Iterator[tuple[str, dict]]:
    """Rows of a ``save_to_disk`` folder, read by ``datasets`` itself (memory-mapped, batch by batch)."""
    import datasets

    try:
        dataset = datasets.load_from_disk(source.spec)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load saved dataset {source.spec} ({exc}); re-save it with save_to_disk") from None
    total_rows, total_bytes, row = max(len(dataset), 1), source.total_bytes, 0
    for batch in dataset.iter(batch_size=_BATCH_ROWS):
        for i in range(len(next(iter(batch.values()), []))):
            yield f"{source.spec} row {row}", {key: values[i] for key, values in batch.items()}
            row += 1
        state.bytes_in_file = total_bytes * row // total_rows


def _hub_records(source: Source) -> Iterator[tuple[str, dict]]:
    """Rows of a Hub dataset (or local dataset folder), streamed by ``datasets.load_dataset``."""
    import datasets

    name = source.spec[3:].partition(":")[0]
    try:
        dataset = datasets.load_dataset(name, split=source.split, streaming=True)
        for row, record in enumerate(dataset):
            yield f"{name} row {row}", record
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - no network, unknown dataset or split, bad files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(
            f"cannot load dataset {name!r} split {source.split!r} ({first}); check the name and split, "
            "and that the Hugging Face Hub is reachable (or download it and pass its folder)"
        ) from None
