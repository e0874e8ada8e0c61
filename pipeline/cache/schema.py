"""The logical row schema shared by every storage format.

One cache row is one packed text row (causal LM), or one example (classification). With
``P`` positions per row (``P = seq_len`` for a causal LM, ``P = 1`` for a classifier), ``k``
cached ids per position and ``nT`` captured temperatures, a row holds:

==================  =============  ==========  ================================================
field               shape          dtype       meaning
==================  =============  ==========  ================================================
``sample_index``    ``[]``         int64       row key: ``block << 32 | row in block`` (alignment key)
``input_hash``      ``[]``         uint64      blake2b-64 of the row's model input (alignment key)
``input_ids``       ``[L]``        int64       the tokens fed to the teacher (text teachers only)
``mask``            ``[P]``        bool        True where the position's prediction is a target
``topk_ids``        ``[P, k]``     int64       top-k vocabulary ids by raw logit, best first
``topk_logits``     ``[P, k]``     float32     raw logits minus the position's max logit (<= 0)
``logsumexp``       ``[P, nT]``    float32     ``log sum_v exp((z_v - max z) / T)`` per temperature
``tail_logprob``    ``[P, nT]``    float32     ``log(1 - sum_{i in top-k} p_T(i))`` per temperature
``sample_ids``      ``[P, m]``     int64       sampled caches: unique ids drawn, most probable first
``sample_counts``   ``[P, m]``     int64       how often each was drawn (0: an empty slot, id 0)
``sample_logits``   ``[P, m]``     float32     their raw logits minus the position's max logit
``label``           ``[]``         int64       gold label (classification only)
``text_*``          ``[L]``, ...   uint8       the row's text and each token's bytes in it (:mod:`.text_spans`)
==================  =============  ==========  ================================================

Exactly, for a cached id ``i``: ``log p_T(i) = topk_logits[i] / T - logsumexp[T]`` (and the same for a
sampled id). Sampled caches (``sample_draws = m > 0``) drew ``m`` ids with replacement per position
from the teacher at ``sample_temperature``, outside the top-k (``top_k`` may be 0: sampled only), or,
with ``sample_scheme = "temperature-mixture"``, split over every captured temperature (the weights:
:mod:`kdpipe.pipeline.cache.sampling`); an older kdpipe refuses such a manifest (unknown schema key).

That is the *logical* row, what :meth:`~kdpipe.pipeline.cache.reader.TeacherCache.read_rows` returns.
How it is stored depends on the format version (:meth:`CacheSchema.fields` lists the stored fields):
format 1 keeps the ids as the narrowest unsigned dtype and the values as ``value_dtype``; format 2
(``id_bits`` set) bit-packs every id and may quantize the values (:mod:`kdpipe.pipeline.cache.encoding`).

``mask_meaning`` says what ``mask`` marks: ``"real-token"`` (text and classification: every real
token; the hard label at ``t`` also needs ``mask[t + 1]``) or ``"next-token-target"`` (chat data:
position ``t`` counts when token ``t + 1`` is a target, e.g. an assistant token; its hard label is
``input_ids[t + 1]``). It is written to the manifest only when it is not the default, so text caches
keep the layout earlier versions wrote.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

from kdpipe.pipeline.cache import encoding, text_spans
from kdpipe.pipeline.errors import CacheFormatError

TASKS = ("causal-lm", "classification")
VALUE_DTYPES = encoding.VALUE_ENCODINGS  # how top-k (and sampled) values are stored
MASK_MEANINGS = ("real-token", "next-token-target")


def check_temperature(temperature) -> float:
    """``temperature`` as a float, or ValueError unless it is a finite number > 0 (a capture's, a loss's)."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature={temperature!r} is invalid: pass a finite number > 0 (e.g. 1.0 or 2.0)")
    return float(temperature)


def narrowest_id_dtype(vocab_size: int) -> str:
    """The smallest unsigned integer dtype that holds ids ``0 .. vocab_size - 1``."""
    for name in ("uint8", "uint16", "uint32"):
        if vocab_size - 1 <= np.iinfo(name).max:
            return name
    return "int64"


@dataclasses.dataclass(frozen=True)
class CacheSchema:
    task: str
    positions: int
    top_k: int
    temperatures: tuple[float, ...]
    id_dtype: str
    value_dtype: str = "float16"  # "quantized" or a float dtype (format 1: a float dtype)
    input_len: int | None = None  # length of ``input_ids``; None when the teacher is not text
    has_label: bool = False
    mask_meaning: str = "real-token"
    id_bits: int | None = None  # format 2: bits per packed output id; None: format 1's id_dtype arrays
    input_id_bits: int | None = None  # format 2: bits per packed input id
    sample_draws: int = 0  # draws per position of a sampled (or mixed) cache; 0: none
    sample_temperature: float | None = None  # the temperature the draws were made at (one-temperature draws)
    sample_scheme: str | None = None  # "temperature-mixture": draws split over every T (cache.sampling); None: at sample_temperature
    text_token_bytes: int | None = None  # the row's text is recorded (cache/text_spans.py): most bytes a token covers

    def __post_init__(self):
        if self.task not in TASKS:
            raise CacheFormatError(f"unknown task {self.task!r}; expected one of {TASKS}")
        if self.value_dtype not in VALUE_DTYPES:
            raise CacheFormatError(
                f"unknown value dtype {self.value_dtype!r}; expected one of {VALUE_DTYPES}"
            )
        if self.mask_meaning not in MASK_MEANINGS:
            raise CacheFormatError(f"unknown mask meaning {self.mask_meaning!r}; expected one of {MASK_MEANINGS} (a newer kdpipe wrote this cache?)")
        if self.id_bits is None and (self.value_dtype == "quantized" or self.sample_draws):
            raise CacheFormatError("quantized values and sampled ids need format 2 (packed ids); the manifest is inconsistent")
        if self.sample_scheme not in (None, "temperature-mixture"):
            raise CacheFormatError(f"unknown sample scheme {self.sample_scheme!r}; expected 'temperature-mixture' (a newer kdpipe wrote this cache?)")

    @property
    def normalizer_dtype(self) -> np.dtype:
        """Storage of ``logsumexp`` and ``tail_logprob``: float16 next to quantized values (its error,
        at most 2**-11 relative, stays below the values' grid; the top-k is renormalised on reading,
        which cancels ``logsumexp``'s error in the top-k bins), else float32."""
        return np.dtype("float16" if self.value_dtype == "quantized" else "float32")

    @property
    def packed(self) -> bool:
        """Format 2: ids bit-packed (see :mod:`kdpipe.pipeline.cache.encoding`)."""
        return self.id_bits is not None

    def logical_fields(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Field name -> (per-row shape, dtype) of a decoded row (the table in the module doc)."""
        P, k, m, nT = self.positions, self.top_k, self.sample_draws, len(self.temperatures)
        i64, f32 = np.dtype("int64"), np.dtype("float32")
        out = {"sample_index": ((), i64), "input_hash": ((), np.dtype("uint64"))}
        if self.input_len is not None:
            out["input_ids"] = ((self.input_len,), i64)
        out["mask"] = ((P,), np.dtype("bool"))
        out["topk_ids"] = ((P, k), i64)
        out["topk_logits"] = ((P, k), f32)
        out["logsumexp"] = ((P, nT), f32)
        out["tail_logprob"] = ((P, nT), f32)
        if m:
            out.update(sample_ids=((P, m), i64), sample_counts=((P, m), i64), sample_logits=((P, m), f32))
        if self.has_label:
            out["label"] = ((), i64)
        out.update(text_spans.text_fields(self))
        return out

    def fields(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Stored field name -> (per-row shape, numpy dtype), in storage order."""
        P, k, m, nT = self.positions, self.top_k, self.sample_draws, len(self.temperatures)
        u8 = np.dtype("uint8")
        out = {"sample_index": ((), np.dtype("int64")), "input_hash": ((), np.dtype("uint64"))}
        if not self.packed:  # format 1
            if self.input_len is not None:
                out["input_ids"] = ((self.input_len,), np.dtype(self.id_dtype))
            out["mask"] = ((P,), np.dtype("bool"))
            out["topk_ids"] = ((P, k), np.dtype(self.id_dtype))
            out["topk_logits"] = ((P, k), encoding.float_storage_dtype(self.value_dtype))
        else:
            if self.input_len is not None:
                out["input_ids_packed"] = ((encoding.packed_nbytes(self.input_len, self.input_id_bits),), u8)
            out["mask"] = ((P,), np.dtype("bool"))
            if k:
                out["topk_ids_packed"] = ((encoding.packed_nbytes(P * k, self.id_bits),), u8)
                out.update(self._value_field("topk", k))
        out["logsumexp"] = ((P, nT), self.normalizer_dtype)
        out["tail_logprob"] = ((P, nT), self.normalizer_dtype)
        if m:
            out["sample_ids_packed"] = ((encoding.packed_nbytes(P * m, self.id_bits),), u8)
            out["sample_counts"] = ((m, P), u8)  # draws <= 255; ranks major, like the values
            out.update(self._value_field("sample", m))
        if self.has_label:
            out["label"] = ((), np.dtype("int64"))
        out.update(text_spans.text_fields(self))
        return out

    def _value_field(self, prefix: str, n: int) -> dict:
        if self.value_dtype == "quantized":
            return {f"{prefix}_logit_steps": ((2, n, self.positions), np.dtype("uint8"))}
        return {f"{prefix}_logits": ((self.positions, n), encoding.float_storage_dtype(self.value_dtype))}

    def row_nbytes(self) -> int:
        """Uncompressed bytes of one row (what ``--shard-size-mb`` caps), the text fields left out: they are
        mostly zero padding (``text_bytes`` has room for the longest tokens), ~2% of a shard once stored,
        and a cache's shard layout does not depend on whether it records text."""
        text = text_spans.text_fields(self)
        return sum(math.prod(shape) * dtype.itemsize for name, (shape, dtype) in self.fields().items() if name not in text)

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
        for key in ("id_bits", "input_id_bits", "sample_temperature", "sample_scheme",
                    "text_token_bytes"):  # format 1 had none of these
            if d[key] is None:
                del d[key]
        if not d["sample_draws"]:
            del d["sample_draws"]
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


def encode_rows(schema: CacheSchema, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Logical rows (``[rows, ...]``, see the module doc) -> the stored fields of ``schema``."""
    stored = {"sample_index": rows["sample_index"], "input_hash": rows["input_hash"]}
    fields = schema.fields()
    if not schema.packed:
        if "input_ids" in rows:
            stored["input_ids"] = rows["input_ids"].astype(fields["input_ids"][1])
        stored["mask"] = rows["mask"]
        stored["topk_ids"] = rows["topk_ids"].astype(fields["topk_ids"][1])
        stored["topk_logits"] = encoding.encode_float_values(rows["topk_logits"], schema.value_dtype)
    else:
        if "input_ids" in rows:
            stored["input_ids_packed"] = encoding.pack_ids(rows["input_ids"], schema.input_id_bits)
        stored["mask"] = rows["mask"]
        if schema.top_k:
            stored["topk_ids_packed"] = encoding.pack_ids(rows["topk_ids"], schema.id_bits)
            stored.update(_encode_values(schema, "topk", rows["topk_logits"]))
    stored["logsumexp"] = rows["logsumexp"].astype(schema.normalizer_dtype)
    stored["tail_logprob"] = rows["tail_logprob"].astype(schema.normalizer_dtype)
    if schema.sample_draws:
        stored["sample_ids_packed"] = encoding.pack_ids(rows["sample_ids"], schema.id_bits)
        stored["sample_counts"] = rows["sample_counts"].astype(np.uint8).transpose(0, 2, 1)
        stored.update(_encode_values(schema, "sample", rows["sample_logits"]))
    if schema.has_label:
        stored["label"] = rows["label"]
    for name in text_spans.text_fields(schema):  # stored as they are
        stored[name] = rows[name]
    return {name: np.ascontiguousarray(stored[name]) for name in fields}


def decode_rows(schema: CacheSchema, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stored fields (``[rows, ...]``, any format version) -> logical rows (the module doc's table)."""
    P, k, m = schema.positions, schema.top_k, schema.sample_draws
    n = len(stored["sample_index"])
    rows = {"sample_index": stored["sample_index"], "input_hash": stored["input_hash"]}
    if not schema.packed:
        if "input_ids" in stored:
            rows["input_ids"] = stored["input_ids"].astype(np.int64)
        rows["topk_ids"] = stored["topk_ids"].astype(np.int64)
        rows["topk_logits"] = encoding.decode_float_values(stored["topk_logits"], schema.value_dtype)
    else:
        if "input_ids_packed" in stored:
            rows["input_ids"] = encoding.unpack_ids(stored["input_ids_packed"], schema.input_id_bits, (schema.input_len,))
        if k:
            rows["topk_ids"] = encoding.unpack_ids(stored["topk_ids_packed"], schema.id_bits, (P, k))
            rows["topk_logits"] = _decode_values(schema, "topk", stored)
        else:
            rows["topk_ids"] = np.zeros((n, P, 0), np.int64)
            rows["topk_logits"] = np.zeros((n, P, 0), np.float32)
    rows["mask"] = stored["mask"]
    rows["logsumexp"] = stored["logsumexp"].astype(np.float32)
    rows["tail_logprob"] = stored["tail_logprob"].astype(np.float32)
    if m:
        rows["sample_ids"] = encoding.unpack_ids(stored["sample_ids_packed"], schema.id_bits, (P, m))
        rows["sample_counts"] = stored["sample_counts"].transpose(0, 2, 1).astype(np.int64)
        rows["sample_logits"] = _decode_values(schema, "sample", stored)
    if "label" in stored:
        rows["label"] = stored["label"]
    for name in text_spans.TEXT_FIELDS:
        if name in stored:
            rows[name] = stored[name]
    return rows


def _encode_values(schema: CacheSchema, prefix: str, values: np.ndarray) -> dict[str, np.ndarray]:
    if schema.value_dtype == "quantized":
        return {f"{prefix}_logit_steps": encoding.quantize_values(values)}
    return {f"{prefix}_logits": encoding.encode_float_values(values, schema.value_dtype)}


def _decode_values(schema: CacheSchema, prefix: str, stored: dict) -> np.ndarray:
    if schema.value_dtype == "quantized":
        return encoding.dequantize_values(stored[f"{prefix}_logit_steps"])
    return encoding.decode_float_values(stored[f"{prefix}_logits"], schema.value_dtype)
