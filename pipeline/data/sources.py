"""What ``--data`` names, and its records read as a stream.

A data spec is one of:

- a file or a folder (searched recursively; every file must be of a readable type, hidden files
  aside), or a glob (``'corpus/**/*.jsonl.zst'``). Readable types: ``.txt`` (the whole file is one
  document), ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.zst`` (one record per line), ``.parquet`` and
  ``.arrow`` (one record per row; ``.arrow`` is what ``datasets`` writes). Files are read in sorted
  path order, so the same data gives the same stream;
- a folder written by Hugging Face ``datasets``' ``save_to_disk`` (it holds ``state.json``);
- ``hf:NAME`` or ``hf:NAME:SPLIT`` (default split ``train``): ``datasets.load_dataset(NAME,
  split=SPLIT, streaming=True)``, a Hub dataset id (or a local dataset folder);
- an ``.npz`` file with arrays ``x`` and ``y`` (module teachers; see :mod:`.arrays`).

:func:`iter_records` yields ``(where, record)`` pairs, ``record`` being a dict (or the text of a
``.txt`` file) and ``where`` a ``file:line`` label for error messages. It never holds more than one
record batch in memory, and hashes each file while reading it (see :class:`ReadState`).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import io
import json
import zlib
from pathlib import Path
from typing import Iterator

from kdpipe.pipeline.errors import DataError
from kdpipe.pipeline.fileio import sha256_file

RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow")
TEXT_SUFFIXES = (".txt",) + RECORD_SUFFIXES
ARRAY_SUFFIX = ".npz"
_DATASETS_FILES = ("state.json", "dataset_info.json", "dataset_dict.json")  # save_to_disk metadata
_BATCH_ROWS = 1024


@dataclasses.dataclass(frozen=True)
class Source:
    kind: str  # "files", "saved-dataset", "hub" or "arrays"
    spec: str  # what --data said
    files: tuple[Path, ...] = ()  # in reading order ("files", "saved-dataset", "arrays")
    root: Path | None = None  # file names in fingerprints are relative to it
    split: str | None = None  # "hub"

    def identity(self) -> dict:
        """Cheap fingerprint (no file is read): kind, spec and every file's relative path and size."""
        files = [{"path": self.relative(f), "bytes": f.stat().st_size} for f in self.files]
        out = {"kind": self.kind, "path": self.spec, "files": files}
        if self.kind == "hub":
            out["split"] = self.split
        return out

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix() if self.root else path.name

    @property
    def total_bytes(self) -> int | None:
        return sum(f.stat().st_size for f in self.files) if self.kind != "hub" else None


def suffix_of(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in sorted(TEXT_SUFFIXES + (ARRAY_SUFFIX,), key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return None


def resolve_source(spec: str) -> Source:
    """The :class:`Source` that ``--data spec`` names; raises :class:`DataError` naming the fix."""
    spec = str(spec)
    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition(":")
        if not name:
            raise DataError(f"--data {spec} names no dataset; use hf:ORG/NAME or hf:ORG/NAME:SPLIT")
        if not Path(name).exists():
            check_hub_dataset(name)
        return Source("hub", spec, split=split or "train")
    if any(c in spec for c in "*?["):
        matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(f"--data glob {spec} matches no files; check the pattern (quote it so the shell does not expand it)")
        _check_readable(matches, where=f"glob {spec}")
        return Source("files", spec, tuple(matches), root=Path(_glob_base(spec)))
    path = Path(spec)
    if not path.exists():
        raise DataError(f"data path {path} does not exist; check --data")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise DataError(f"{path} holds a DatasetDict with splits {splits}; point --data at one split, e.g. {path / (splits or ['train'])[0]}")
        if (path / "state.json").is_file():
            return _saved_dataset(path)
        return _folder(path)
    suffix = suffix_of(path)
    if suffix is None:
        raise DataError(f"data file {path} has an unsupported type; use {', '.join(TEXT_SUFFIXES)} (text) or .npz (arrays)")
    return Source("arrays" if suffix == ARRAY_SUFFIX else "files", spec, (path,), root=path.parent)


def check_hub_dataset(name: str, *, timeout: float = 10.0) -> None:
    """Fail fast, naming the fix, when a Hub dataset can be neither found locally nor reached.

    Without this, an unreachable Hub costs half a minute of retries before an error. With
    ``HF_HUB_OFFLINE`` set, ``datasets`` itself answers from its cache (or fails at once).
    """
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return
    try:
        huggingface_hub.dataset_info(name, timeout=timeout)
    except RepositoryNotFoundError:
        raise DataError(
            f"dataset {name!r} does not exist locally and the Hugging Face Hub has no dataset of that name "
            "(or it is private: log in with `hf auth login`); check --data hf:ORG/NAME"
        ) from None
    except Exception as exc:  # noqa: BLE001 - no network, proxy, timeout, server error
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(
            f"dataset {name!r} is not a local folder and the Hugging Face Hub cannot be reached ({first}); "
            "download it and pass its folder, or set HF_HUB_OFFLINE=1 to use the datasets cache"
        ) from None


def _glob_base(spec: str) -> str:
    """The folder part of a glob before its first wildcard (file names are relative to it)."""
    parts = Path(spec).parts
    fixed = [p for p in parts[: next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))]]
    return str(Path(*fixed)) if fixed else "."


def _folder(path: Path) -> Source:
    files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
    if not files:
        raise DataError(f"data folder {path} is empty; put {', '.join(TEXT_SUFFIXES)} files in it")
    _check_readable(files, where=f"data folder {path}")
    return Source("files", str(path), tuple(files), root=path)


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _check_readable(files: list[Path], *, where: str) -> None:
    unknown = [f for f in files if suffix_of(f) not in TEXT_SUFFIXES]
    if unknown:
        names = ", ".join(f.name for f in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        raise DataError(
            f"{where} holds {len(unknown)} file(s) kdpipe cannot read as text data ({names}); "
            f"remove them or pass a glob of the files to use (readable: {', '.join(TEXT_SUFFIXES)})"
        )


def _saved_dataset(path: Path) -> Source:
    try:
        state = json.loads((path / "state.json").read_text())
        arrow = [path / entry["filename"] for entry in state["_data_files"]]
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{path / 'state.json'} is not a datasets save_to_disk state file; re-save the dataset") from None
    missing = [f.name for f in arrow if not f.is_file()]
    if missing:
        raise DataError(f"saved dataset {path} lacks {missing}; re-save it with save_to_disk")
    meta = [path / name for name in _DATASETS_FILES if (path / name).is_file()]
    return Source("saved-dataset", str(path), tuple(arrow + meta), root=path)


# ----------------------------------------------------------------------------- reading
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

    def __init__(self, path: Path, state: ReadState):
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
        self.digest = hashlib.sha256()
        self._state = state

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._file.readinto(buffer)
        if n:
            self.digest.update(memoryview(buffer)[:n])
            self._state.bytes_in_file += n
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
        reader = _HashingReader(path, state)
        try:
            if suffix == ".txt":
                yield str(path), _decode(path, reader.readall())
            else:
                yield from _jsonl_records(path, _decompressed(path, suffix, reader))
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


def _decode(path: Path, raw: bytes, where: str | None = None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where or path} is not valid UTF-8 (byte {exc.start}); re-encode it, e.g. iconv -t UTF-8") from None


def _jsonl_records(path: Path, stream) -> Iterator[tuple[str, dict]]:
    lines = io.BufferedReader(stream) if not isinstance(stream, io.BufferedIOBase) else stream
    try:
        for n, line in enumerate(lines, start=1):
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
