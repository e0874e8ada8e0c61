"""How a cache's ids and values become bytes (format 2), and back.

Format 2 stores the same logical rows as format 1 (see :mod:`kdpipe.pipeline.cache.schema`) in fewer bytes,
chosen by measurement (``benchmarks/cache_size.py``):

- **Ids** (top-k, sampled and input ids) are bit-packed in ``ceil(log2 V)`` bits each, in rank order,
  little-endian bit order: 11 bits at V = 2,048, 17 at V <= 131,072, 18 at V <= 262,144. Ids are
  close to uniformly distributed, so zstd gains nothing on top (uint16/uint32 arrays compressed to
  11.5 / 18.3 bits per id instead).
- **Values** (``z - max z``, non-increasing along a position's ranks) either keep a float dtype
  (``float16``, ``bfloat16``, ``float32``: format 1's layout) or are ``quantized``: rounded to a grid
  of :data:`GRID_STEP` = 1/16 nat, ``g = round(-v / step)`` (clamped at 65,535 steps, -4,095.94
  nats), and stored as the differences between consecutive ranks, ``g_r - g_{r-1} >= 0``, as two
  byte planes (low bytes, then high bytes) with the ranks as the major axis (``[2, n, P]`` per row).
  Neighbouring ranks of neighbouring positions then hold similar small numbers, which zstd codes in
  about 2.5 bits per value on a trained teacher. Worst-case error of a value above the clamp:
  ``step / 2`` = 1/32 nat. Next to quantized values the per-position ``logsumexp`` and
  ``tail_logprob`` are stored as float16 (``logsumexp`` lies in ``[0, log V]``: rounding error
  < 2**-8 nat for V < e**16), so ``|error of log p_T(i)| <= 1 / (32 T) + 2**-8`` nats.

Every function works on a batch of rows (a leading row axis) with numpy; decoding is vectorised and
runs in the data-loader workers.
"""

from __future__ import annotations

import math

import numpy as np

FLOAT_VALUES = ("float16", "bfloat16", "float32")
VALUE_ENCODINGS = ("quantized",) + FLOAT_VALUES
GRID_STEP = 1.0 / 16.0  # nats per grid step of a quantized value
GRID_MAX_STEPS = 0xFFFF  # values below -GRID_MAX_STEPS * GRID_STEP are stored as that


def id_bits(vocab_size: int) -> int:
    """Bits per packed id for ids ``0 .. vocab_size - 1`` (at least 1)."""
    return max(1, math.ceil(math.log2(max(vocab_size, 2))))


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes holding ``count`` ids of ``bits`` bits."""
    return (count * bits + 7) // 8


# ----------------------------------------------------------------------------- ids
def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """``ids [rows, ...]`` (non-negative, ``< 2**bits``, ``bits <= 64``) -> ``uint8 [rows,
    packed_nbytes(n, bits)]`` with ``n`` the ids per row, packed in row-major order, little-endian
    bit order: bit ``j`` of the ``i``-th id of a row is bit ``i * bits + j`` of the row's bytes.

    Works a row's bit string as 64-bit little-endian words: an id's low part is added to the word its
    first bit falls in and, when it crosses into the next word, its high part to that one (ids share no
    bits, so adding is or-ing)."""
    rows = ids.shape[0]
    flat = np.ascontiguousarray(ids).reshape(rows, -1).astype(np.uint64)
    n = flat.shape[1]
    if flat.size and int(flat.max()) >> bits:
        raise ValueError(f"an id ({int(flat.max())}) does not fit in {bits} bits")
    offsets, words = _bit_offsets(n, bits)
    shift = (offsets % 64).astype(np.uint64)
    low = flat << shift  # [rows, n]: each id's bits that land in its first word (the rest overflow away)
    packed = np.zeros((rows, words + 1), dtype=np.uint64)
    if n:
        starting = int(offsets[-1] // 64) + 1  # words some id starts in (with bits <= 64: all but maybe the last)
        first_in_word = np.searchsorted(offsets // 64, np.arange(starting))  # the first id starting in word w
        packed[:, :starting] = np.add.reduceat(low, first_in_word, axis=1)
        crossing = np.nonzero(shift + np.uint64(bits) > 64)[0]  # ids that spill into the next word
        packed[:, offsets[crossing] // 64 + 1] += flat[:, crossing] >> (np.uint64(64) - shift[crossing])
    as_bytes = packed[:, :words].astype("<u8").view(np.uint8).reshape(rows, -1)
    return np.ascontiguousarray(as_bytes[:, : packed_nbytes(n, bits)])


def unpack_ids(packed: np.ndarray, bits: int, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`pack_ids`: ``uint8 [rows, nbytes]`` -> ``int64 [rows, *shape]``."""
    rows, n = packed.shape[0], math.prod(shape)
    offsets, words = _bit_offsets(n, bits)
    padded = np.zeros((rows, (words + 1) * 8), dtype=np.uint8)
    padded[:, : packed.shape[1]] = packed
    word = padded.view("<u8").astype(np.uint64)  # [rows, words + 1]
    first, shift = offsets // 64, (offsets % 64).astype(np.uint64)
    value = word[:, first] >> shift
    crossing = shift + np.uint64(bits) > 64
    if crossing.any():
        high = word[:, first + 1] << (np.uint64(64) - np.where(crossing, shift, np.uint64(1)))
        value |= np.where(crossing, high, np.uint64(0))
    mask = np.uint64(2**bits - 1) if bits < 64 else np.uint64(2**64 - 1)
    return (value & mask).astype(np.int64).reshape((rows,) + tuple(shape))


def _bit_offsets(n: int, bits: int) -> tuple[np.ndarray, int]:
    """First bit of each of ``n`` ids (int64), and the 64-bit words they need."""
    if not 1 <= bits <= 64:
        raise ValueError(f"ids of {bits} bits cannot be packed: use 1 to 64")
    return np.arange(n, dtype=np.int64) * bits, (n * bits + 63) // 64


# ----------------------------------------------------------------------------- values
def quantize_values(values: np.ndarray) -> np.ndarray:
    """``values [rows, P, n]`` (``z - max z``, non-increasing along ``n``) -> ``uint8 [rows, 2, n, P]``:
    the grid steps between consecutive ranks as low and high byte planes, ranks major."""
    steps = np.clip(np.rint(-values.astype(np.float64) / GRID_STEP), 0, GRID_MAX_STEPS)
    steps = np.nan_to_num(steps, nan=GRID_MAX_STEPS).astype(np.int64)  # NaN never reaches a cache
    deltas = np.diff(steps, axis=2, prepend=0)
    if deltas.size and int(deltas.min()) < 0:
        raise ValueError("quantized values must be non-increasing along the ranks of a position (sorted best first)")
    deltas = deltas.astype(np.uint16).transpose(0, 2, 1)  # [rows, n, P]
    return np.stack([(deltas & 0xFF).astype(np.uint8), (deltas >> 8).astype(np.uint8)], axis=1)


def dequantize_values(planes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize_values` up to the grid: ``uint8 [rows, 2, n, P]`` -> ``float32 [rows, P, n]``."""
    deltas = planes[:, 0].astype(np.int32) | (planes[:, 1].astype(np.int32) << 8)  # [rows, n, P]
    steps = np.cumsum(deltas, axis=1).transpose(0, 2, 1)
    return (steps.astype(np.float32) * np.float32(-GRID_STEP))


def float_storage_dtype(values: str) -> np.dtype:
    """numpy has no bfloat16: bf16 values are stored as their raw 16 bits (uint16)."""
    return np.dtype("uint16") if values == "bfloat16" else np.dtype(values)


def encode_float_values(values: np.ndarray, encoding: str) -> np.ndarray:
    """float32 values -> their stored float form (bf16: round to nearest even, kept as raw bits)."""
    if encoding == "bfloat16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        rounded = bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)
        return (rounded >> 16).astype(np.uint16)
    return values.astype(encoding)


def decode_float_values(stored: np.ndarray, encoding: str) -> np.ndarray:
    """Stored float values -> float32 (bf16 is kept as raw bits in uint16)."""
    if encoding == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)
