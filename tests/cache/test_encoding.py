"""Format 2's encoding: packed ids, quantized values, and whole rows, round trip (fuzzed)."""

import zlib

import numpy as np
import pytest

from kdpipe.pipeline.cache import encoding
from kdpipe.pipeline.errors import CacheFormatError
from kdpipe.pipeline.cache.schema import CacheSchema, decode_rows, encode_rows
from kdpipe.pipeline.cache.storage.base import get_format


@pytest.mark.parametrize("bits", range(1, 49))
def test_ids_round_trip_at_every_width(bits):
    rng = np.random.default_rng(bits)
    for shape in [(3, 1), (2, 7, 5), (4, 13)]:
        ids = rng.integers(0, 2**bits, size=shape, dtype=np.int64)
        ids.reshape(-1)[:2] = [0, 2**bits - 1]  # both ends of the range
        packed = encoding.pack_ids(ids, bits)
        assert packed.dtype == np.uint8 and packed.shape == (shape[0], encoding.packed_nbytes(int(np.prod(shape[1:])), bits))
        np.testing.assert_array_equal(encoding.unpack_ids(packed, bits, shape[1:]), ids)


def test_id_bits_is_the_fewest_the_vocabulary_needs():
    assert [encoding.id_bits(v) for v in (2, 10, 2048, 2049, 131072, 131073, 151936, 262144)] == [1, 4, 11, 12, 17, 18, 18, 18]
    with pytest.raises(ValueError, match="does not fit in 11 bits"):
        encoding.pack_ids(np.array([[2048]]), 11)


def sorted_values(rng, shape, scale=3.0):
    """Max-shifted logits sorted best first (the first is 0), with some ties and big gaps."""
    if not shape[-1]:
        return np.zeros(shape, np.float32)
    gaps = rng.exponential(scale / shape[-1], size=shape)
    gaps[..., 0] = 0.0
    gaps[rng.random(shape) < 0.05] = 0.0  # ties
    gaps[rng.random(shape) < 0.01] *= 1000.0  # gaps wider than 255 grid steps (need the high bytes)
    return -np.cumsum(gaps, axis=-1).astype(np.float32)


def test_quantized_values_error_is_at_most_half_a_step():
    rng = np.random.default_rng(0)
    values = sorted_values(rng, (7, 9, 64))
    planes = encoding.quantize_values(values)
    assert planes.shape == (7, 2, 64, 9) and planes.dtype == np.uint8
    decoded = encoding.dequantize_values(planes)
    assert decoded.shape == values.shape
    inside = values >= -encoding.GRID_MAX_STEPS * encoding.GRID_STEP
    err = np.abs(decoded - values)[inside]
    assert err.max() <= encoding.GRID_STEP / 2 + 1e-6 * np.abs(values[inside]).max()
    assert (planes[:, 1] > 0).any()  # the fuzz reached the high byte plane
    assert np.all(np.diff(decoded, axis=-1) <= 0)  # still best first


def test_quantized_values_clamp_far_below_the_top():
    values = np.array([[[0.0, -1.0, -5000.0, -np.inf]]], dtype=np.float32)
    decoded = encoding.dequantize_values(encoding.quantize_values(values))
    np.testing.assert_array_equal(decoded, [[[0.0, -1.0, -4095.9375, -4095.9375]]])


def test_quantizing_unsorted_values_is_refused():
    with pytest.raises(ValueError, match="non-increasing"):
        encoding.quantize_values(np.array([[[0.0, -2.0, -1.0]]], dtype=np.float32))


def random_rows(schema: CacheSchema, n: int, rng) -> dict:
    """Logical rows as a capture makes them (see kdpipe.pipeline.cache.schema)."""
    vocab = 2**schema.id_bits if schema.packed else 200
    P, k, m, nT = schema.positions, schema.top_k, schema.sample_draws, len(schema.temperatures)
    rows = {"sample_index": np.arange(n, dtype=np.int64), "input_hash": rng.integers(0, 2**63, n).astype(np.uint64)}
    if schema.input_len:
        rows["input_ids"] = rng.integers(0, vocab, (n, schema.input_len))
    rows["mask"] = rng.random((n, P)) < 0.8
    rows["topk_ids"] = np.stack([rng.permutation(vocab)[:k] for _ in range(n * P)]).reshape(n, P, k)
    rows["topk_logits"] = sorted_values(rng, (n, P, k))
    rows["logsumexp"] = rng.random((n, P, nT)).astype(np.float32)
    rows["tail_logprob"] = -rng.random((n, P, nT)).astype(np.float32)
    if m:
        rows["sample_ids"] = rng.integers(0, vocab, (n, P, m))
        rows["sample_counts"] = rng.integers(0, m + 1, (n, P, m))
        rows["sample_logits"] = sorted_values(rng, (n, P, m)) - 2.0
    if schema.has_label:
        rows["label"] = rng.integers(0, vocab, n)
    return rows


LAYOUTS = {
    "v1-float16": dict(value_dtype="float16"),
    "v1-bfloat16": dict(value_dtype="bfloat16"),
    **{f"v2-{v}": dict(value_dtype=v, id_bits=bits, input_id_bits=bits)
       for v, bits in [("quantized", 11), ("float16", 17), ("bfloat16", 18), ("float32", 1)]},
    "v2-sampled": dict(value_dtype="quantized", id_bits=18, input_id_bits=18, sample_draws=12, sample_temperature=1.0,
                       top_k=0),
    "v2-mixed": dict(value_dtype="float16", id_bits=11, input_id_bits=12, sample_draws=3, sample_temperature=2.0),
}
FLOAT16_SUBNORMAL_ROUNDING = 2**-25  # half float16's subnormal step (2**-24): below 6.1e-5 float16 keeps no relative precision
TOLERANCE = {"quantized": dict(atol=encoding.GRID_STEP / 2 + 1e-4, rtol=0),  # half a step
             "float16": dict(atol=FLOAT16_SUBNORMAL_ROUNDING, rtol=2**-11), "bfloat16": dict(atol=0, rtol=2**-8),  # a rounding
             "float32": dict(atol=0, rtol=0)}


@pytest.mark.parametrize("fmt", ["zarr", "parquet"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("task", ["causal-lm", "classification"])
def test_rows_round_trip_through_a_shard(tmp_path, fmt, layout, task):
    options = {"top_k": 6, **LAYOUTS[layout]}
    options["top_k"] = min(options["top_k"], 2 ** options.get("id_bits", 8))  # 1-bit ids: 2 classes
    schema = CacheSchema(task=task, positions=5 if task == "causal-lm" else 1, temperatures=(1.0, 2.0),
                         id_dtype="uint16" if not options.get("id_bits") else "uint32", input_len=8,
                         has_label=task == "classification", **options)
    rng = np.random.default_rng(zlib.crc32(f"{fmt}/{layout}/{task}".encode()))  # the same rows every run
    rows = random_rows(schema, 21, rng)
    stored = encode_rows(schema, rows)
    assert {k: (v.shape[1:], v.dtype) for k, v in stored.items()} == schema.fields()
    shard = get_format(fmt)
    path = tmp_path / f"s{shard.suffix}"
    shard.write(path, stored, schema=schema, chunk_rows=4)
    with shard.open(path, schema=schema) as reader:
        got = decode_rows(schema, reader.read(3, 19))
    expected = {k: v[3:19] for k, v in rows.items()}
    assert {k: (v.shape[1:], v.dtype) for k, v in got.items()} == schema.logical_fields()
    for name, want in expected.items():
        if name in ("topk_logits", "sample_logits"):
            np.testing.assert_allclose(got[name], want, **TOLERANCE[schema.value_dtype], err_msg=name)
        elif name in ("logsumexp", "tail_logprob"):  # float16 next to quantized values
            rtol = 2**-11 if schema.value_dtype == "quantized" else 0
            np.testing.assert_allclose(got[name], want, rtol=rtol, atol=FLOAT16_SUBNORMAL_ROUNDING if rtol else 0, err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], want, err_msg=name)


def test_format_2_fields_need_packed_ids():
    with pytest.raises(CacheFormatError, match="format 2"):
        CacheSchema(task="causal-lm", positions=4, top_k=2, temperatures=(1.0,), id_dtype="uint16", value_dtype="quantized")


def test_format_1_schema_dict_is_unchanged():
    """A format-1 schema writes (and so fingerprints) exactly the keys format 1 wrote."""
    schema = CacheSchema(task="causal-lm", positions=4, top_k=2, temperatures=(1.0,), id_dtype="uint16", input_len=4)
    assert set(schema.to_dict()) == {"task", "positions", "top_k", "temperatures", "id_dtype", "value_dtype",
                                     "input_len", "has_label"}
    assert CacheSchema.from_dict(schema.to_dict()) == schema
