"""Array data for module teachers: an ``.npz`` with ``x`` (inputs) and ``y`` (integer labels).

One row per sample; ``uint8`` images are scaled to ``[0, 1]`` float32. The arrays are loaded whole
(``.npz`` data is small next to a text corpus) and never unpickled.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np

from kdpipe.pipeline.data.packing import Rows
from kdpipe.pipeline.errors import DataError


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
    return Rows(x, np.ones((len(x), 1), dtype=bool), y.astype(np.int64), None)


ARRAY_PACKING = {"scheme": "one-sample-per-row", "uint8_scaled": True}


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
