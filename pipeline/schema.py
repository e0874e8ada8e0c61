"""The logical row schema shared by every storage format.

One cache row is one packed text row (causal LM), or one example (classification). With
``P`` positions per row (``P = seq_len`` for a causal LM, ``P = 1`` for a classifier), ``k``
cached ids per position and ``nT`` captured temperatures, a row holds:

==================  =============  ==========  ================================================
field               shape          dtype       meaning
==================  =============  ==========  ================================================
``sample_index``    ``[]``         int64       row key: ``block << 32 | row in block`` (alignment key)
``input_hash``      ``[]``         uint64      blake2b-64 of the row's model input (alignment key)
``input_ids``       ``[L]``        id dtype    the tokens fed to the teacher (text teachers only)
``mask``            ``[P]``        bool        True where the position's prediction is a target
``topk_ids``        ``[P, k]``     id dtype    top-k vocabulary ids by raw logit, best first
``topk_logits``     ``[P, k]``     value dt.   raw logits minus the position's max logit (<= 0)
``logsumexp``       ``[P, nT]``    float32     ``log sum_v exp((z_v - max z) / T)`` per temperature
``tail_logprob``    ``[P, nT]``    float32     ``log(1 - sum_{i in top-k} p_T(i))`` per temperature
``label``           ``[]``         int64       gold label (classification only)
==================  =============  ==========  ================================================

Exactly, for a cached id ``i``: ``log p_T(i) = topk_logits[i] / T - logsumexp[T]``.

``mask_meaning`` says what ``mask`` marks: ``"real-token"`` (text and classification: every real
token; the hard label at ``t`` also needs ``mask[t + 1]``) or ``"next-token-target"`` (chat data:
position ``t`` counts when token ``t + 1`` is a target, e.g. an assistant token; its hard label is
``input_ids[t + 1]``). It is written to the manifest only when it is not the default, so text caches
keep the layout earlier versions wrote.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from kdpipe.pipeline.errors import CacheFormatError

TASKS = ("causal-lm", "classification")
VALUE_DTYPES = ("float16", "bfloat16", "float32")
MASK_MEANINGS = ("real-token", "next-token-target")


def narrowest_id_dtype(vocab_size: int) -> str:
    """The smallest unsigned integer dtype that holds ids ``0 .. vocab_size - 1``."""
    for name in ("uint8", "uint16", "uint32"):
        if vocab_size - 1 <= np.iinfo(name).max:
            return name
    return "int64"


def numpy_value_dtype(value_dtype: str):
    """numpy has no bfloat16: bf16 values are stored as their raw 16 bits (uint16)."""
    return np.dtype("uint16") if value_dtype == "bfloat16" else np.dtype(value_dtype)


@dataclasses.dataclass(frozen=True)
class CacheSchema:
    task: str
    positions: int
    top_k: int
    temperatures: tuple[float, ...]
    id_dtype: str
    value_dtype: str = "float16"
    input_len: int | None = None  # length of ``input_ids``; None when the teacher is not text
    has_label: bool = False
    mask_meaning: str = "real-token"

    def __post_init__(self):
        if self.task not in TASKS:
            raise CacheFormatError(f"unknown task {self.task!r}; expected one of {TASKS}")
        if self.value_dtype not in VALUE_DTYPES:
            raise CacheFormatError(
                f"unknown value dtype {self.value_dtype!r}; expected one of {VALUE_DTYPES}"
            )
        if self.mask_meaning not in MASK_MEANINGS:
            raise CacheFormatError(f"unknown mask meaning {self.mask_meaning!r}; expected one of {MASK_MEANINGS} (a newer kdpipe wrote this cache?)")

    def fields(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Field name -> (per-row shape, numpy dtype), in storage order."""
        P, k, nT = self.positions, self.top_k, len(self.temperatures)
        out = {"sample_index": ((), np.dtype("int64")), "input_hash": ((), np.dtype("uint64"))}
        if self.input_len is not None:
            out["input_ids"] = ((self.input_len,), np.dtype(self.id_dtype))
        out["mask"] = ((P,), np.dtype("bool"))
        out["topk_ids"] = ((P, k), np.dtype(self.id_dtype))
        out["topk_logits"] = ((P, k), numpy_value_dtype(self.value_dtype))
        out["logsumexp"] = ((P, nT), np.dtype("float32"))
        out["tail_logprob"] = ((P, nT), np.dtype("float32"))
        if self.has_label:
            out["label"] = ((), np.dtype("int64"))
        return out

    def row_nbytes(self) -> int:
        """Uncompressed bytes of one row."""
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.fields().values())

    def temperature_index(self, temperature: float) -> int:
        """Index of a captured temperature; raises naming the captured ones otherwise."""
        for j, captured in enumerate(self.temperatures):
            if math.isclose(captured, float(temperature), rel_tol=1e-6, abs_tol=1e-9):
                return j
        raise CacheFormatError(
            f"temperature {temperature:g} was not captured in this cache; captured: "
            f"{', '.join(f'{t:g}' for t in self.temperatures)} "
            "(re-run cache-teacher with --temperature to add it)"
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["temperatures"] = list(self.temperatures)
        if self.mask_meaning == "real-token":
            del d["mask_meaning"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CacheSchema":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise CacheFormatError(f"unknown schema keys {sorted(unknown)} in manifest")
        return cls(**{**d, "temperatures": tuple(float(t) for t in d["temperatures"])})

    def check_columns(self, columns: dict[str, np.ndarray]) -> int:
        """Validate a batch of rows against the schema; returns its row count."""
        expected = self.fields()
        if set(columns) != set(expected):
            raise CacheFormatError(
                f"columns {sorted(columns)} do not match the schema {sorted(expected)}"
            )
        rows = {len(v) for v in columns.values()}
        assert len(rows) == 1, f"columns have different row counts: {rows}"
        for name, (shape, dtype) in expected.items():
            array = columns[name]
            assert array.shape[1:] == shape and array.dtype == dtype, (
                f"{name}: got {array.shape[1:]} {array.dtype}, expected {shape} {dtype}"
            )
        return rows.pop()


def values_to_float32(values: np.ndarray, value_dtype: str) -> np.ndarray:
    """Stored ``topk_logits`` -> float32 (bf16 is kept as raw bits in uint16)."""
    if value_dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)
