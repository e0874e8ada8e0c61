"""Reading capture data and turning it into fixed-size model inputs.

Text (``.txt`` file or folder of them, ``.jsonl`` with ``text`` [+ ``label``], ``.parquet`` with a
``text`` column [+ ``label``]) is tokenised with the teacher's tokenizer. For a causal LM every
document is followed by the tokenizer's EOS token as a separator, all documents are concatenated in
file order and cut into rows of ``seq_len`` tokens; the last, partial row is kept, padded with the pad
id (EOS when there is none) and its padding positions get ``mask = False``. For classification every
document is one row, truncated or padded to ``seq_len``. Arrays (``.npz`` with ``x`` and ``y``) are
one row per sample; ``uint8`` images are scaled to ``[0, 1]`` float32.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np

from kdpipe.pipeline.errors import DataError
from kdpipe.pipeline.fileio import sha256_file

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclasses.dataclass
class Document:
    text: str
    label: int | None = None


@dataclasses.dataclass
class Rows:
    inputs: np.ndarray  # [N, L] int64 token ids, or [N, ...] float32 arrays
    mask: np.ndarray  # [N, P] bool: positions holding a real prediction
    labels: np.ndarray | None  # [N] int64 (classification)
    attention_mask: np.ndarray | None  # [N, L] int64 for text, None for arrays
    packing: dict


def data_files(path: str | Path) -> list[Path]:
    """The files a data path stands for, in a fixed order."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist; check --data")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix == ".txt")
        if not files:
            raise DataError(f"data folder {path} holds no .txt files; put text files in it or pass a file")
        return files
    if path.suffix not in TEXT_SUFFIXES + (".npz",):
        raise DataError(f"data file {path} has an unsupported type; use .txt, .jsonl, .parquet or .npz")
    return [path]


def data_fingerprint(path: str | Path) -> dict:
    """Per file: path (relative to the data path), bytes, sha256; plus one hash over all of them."""
    root = Path(path)
    base = root if root.is_dir() else root.parent
    files = [
        {"path": f.relative_to(base).as_posix(), "bytes": f.stat().st_size, "sha256": sha256_file(f)}
        for f in data_files(root)
    ]
    overall = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"path": str(path), "files": files, "sha256": overall}


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not valid UTF-8 (byte {exc.start}); re-encode it, e.g. iconv -t UTF-8"
        ) from None


def read_documents(path: str | Path) -> list[Document]:
    """Every document of a text data path, in order."""
    docs: list[Document] = []
    for f in data_files(path):
        if f.suffix == ".txt":
            docs.append(Document(_decode(f, f.read_bytes())))
        elif f.suffix == ".jsonl":
            docs.extend(_read_jsonl(f))
        elif f.suffix == ".parquet":
            docs.extend(_read_parquet(f))
        else:
            raise DataError(f"{f} holds arrays, not text; a text teacher needs .txt, .jsonl or .parquet")
    if not any(d.text for d in docs):
        raise DataError(f"data {path} holds no text; give it non-empty documents")
    return docs


def jsonl_records(path: Path, text: str):
    """``(line number, object)`` for each non-blank line of a JSON Lines text; bad lines are errors."""
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{n} is not valid JSON; each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{n} is not a JSON object; each line must be one {{...}} object")
        yield n, record


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    for n, record in jsonl_records(path, _decode(path, path.read_bytes())):
        if not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{n} has no string 'text' field; each line needs {{\"text\": ...}}")
        docs.append(Document(record["text"], _label(record.get("label"), f"{path}:{n}")))
    return docs


def _read_parquet(path: Path) -> list[Document]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise DataError(f"{path} has no 'text' column (columns: {table.column_names}); rename the text column to 'text'")
    texts = table["text"].to_pylist()
    labels = table["label"].to_pylist() if "label" in table.column_names else [None] * len(texts)
    return [Document(t or "", _label(y, f"{path} row {i}")) for i, (t, y) in enumerate(zip(texts, labels))]


def _label(value, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"{where}: label {value!r} must be a non-negative integer class id")
    return value


def pack_causal_lm(docs: list[Document], tokenizer, *, seq_len: int) -> Rows:
    """Tokenise, separate documents with EOS, concatenate, cut into ``seq_len`` rows (see module doc)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    stream: list[int] = []
    for doc in docs:
        stream.extend(tokenizer(doc.text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    if not stream:
        raise DataError("the data tokenises to zero tokens; give it non-empty documents")
    n_rows = -(-len(stream) // seq_len)
    ids = np.full(n_rows * seq_len, pad if pad is not None else 0, dtype=np.int64)
    ids[: len(stream)] = stream
    mask = np.zeros(n_rows * seq_len, dtype=bool)
    mask[: len(stream)] = True
    ids, mask = ids.reshape(n_rows, seq_len), mask.reshape(n_rows, seq_len)
    packing = {
        "scheme": "concat-eos", "separator_id": eos, "pad_id": pad, "seq_len": seq_len,
        "last_row": "padded", "stream_tokens": len(stream),
    }
    return Rows(ids, mask, None, mask.astype(np.int64), packing)


def rows_for_classification(docs: list[Document], tokenizer, *, seq_len: int) -> Rows:
    if any(d.label is None for d in docs):
        raise DataError("classification data needs a 'label' on every record; add an integer label field")
    enc = tokenizer([d.text for d in docs], truncation=True, max_length=seq_len, padding="max_length")
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    attention = np.asarray(enc["attention_mask"], dtype=np.int64)
    labels = np.asarray([d.label for d in docs], dtype=np.int64)
    packing = {"scheme": "one-document-per-row", "seq_len": seq_len, "truncation": True}
    return Rows(ids, np.ones((len(docs), 1), dtype=bool), labels, attention, packing)


def rows_from_arrays(path: str | Path) -> Rows:
    """``.npz`` with ``x`` (inputs) and ``y`` (integer labels), one row per sample."""
    path = Path(path)
    if path.suffix != ".npz":
        raise DataError(f"a module teacher reads .npz arrays with 'x' and 'y'; got {path}")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check --data")
    x, y = _load_npz(path)
    if x.dtype.kind not in "biuf" or y.dtype.kind not in "iu" or x.ndim == 0 or y.ndim != 1:
        raise DataError(
            f"{path}: x must be a numeric array [N, ...] and y integer labels [N] "
            f"(got x {x.dtype} {list(x.shape)}, y {y.dtype} {list(y.shape)})"
        )
    if len(x) == 0:
        raise DataError(f"{path} holds no samples")
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} samples but y has {len(y)}; they must match")
    if y.min() < 0:
        raise DataError(f"{path}: y holds the negative label {int(y.min())}; labels must be class ids 0..C-1")
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    packing = {"scheme": "one-sample-per-row", "uint8_scaled": True}
    return Rows(x, np.ones((len(x), 1), dtype=bool), y.astype(np.int64), None, packing)


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``y`` of an ``.npz``, never unpickling anything (object arrays are refused)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = {"x", "y"} - set(npz.files)
            if missing:
                raise DataError(f"{path} lacks arrays {sorted(missing)}; save it with np.savez(path, x=..., y=...)")
            return npz["x"], npz["y"]
    except ValueError as exc:
        if "pickle" in str(exc):
            raise DataError(
                f"{path} holds a Python object array (or pickled data), which kdpipe refuses to load "
                "(loading it would run pickle); save x and y as numeric arrays with np.savez"
            ) from None
        raise DataError(f"cannot read {path} ({exc}); save it with np.savez(path, x=..., y=...)") from None
    except (OSError, EOFError, zipfile.BadZipFile, AttributeError) as exc:
        raise DataError(f"cannot read {path} ({type(exc).__name__}: {exc}); save it with np.savez(path, x=..., y=...)") from None


def input_hash(row: np.ndarray) -> int:
    """blake2b-64 of one row's model input (alignment key for rows without token ids)."""
    digest = hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little")
