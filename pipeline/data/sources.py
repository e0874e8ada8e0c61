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

Reading them is :mod:`.readers`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
from pathlib import Path

from kdpipe.pipeline.errors import DataError

RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow")
TEXT_SUFFIXES = (".txt",) + RECORD_SUFFIXES
ARRAY_SUFFIX = ".npz"
_DATASETS_FILES = ("state.json", "dataset_info.json", "dataset_dict.json")  # save_to_disk metadata


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

    from kdpipe.pipeline.models.hub import MISSING, ask_hub

    if constants.HF_HUB_OFFLINE:
        return
    problem = ask_hub(lambda: huggingface_hub.dataset_info(name, timeout=timeout))
    if problem == MISSING:
        raise DataError(
            f"dataset {name!r} does not exist locally and the Hugging Face Hub has no dataset of that name "
            "(or it is private: log in with `hf auth login`); check --data hf:ORG/NAME"
        )
    if problem:
        raise DataError(
            f"dataset {name!r} is not a local folder and the Hugging Face Hub cannot be reached ({problem}); "
            "download it and pass its folder, or set HF_HUB_OFFLINE=1 to use the datasets cache"
        )


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
