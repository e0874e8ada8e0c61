"""Shard formats: round trips, deterministic bytes, one logical schema."""

import numpy as np
import pytest

from kdpipe.pipeline.fileio import sha256_file
from kdpipe.pipeline.cache.encoding import decode_float_values, encode_float_values
from kdpipe.pipeline.cache.schema import CacheSchema, narrowest_id_dtype
from kdpipe.pipeline.cache.storage.base import get_format


def random_columns(schema: CacheSchema, rows: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for name, (shape, dtype) in schema.fields().items():
        if dtype == np.bool_:
            out[name] = rng.random((rows,) + shape) < 0.8
        elif dtype.kind in "ui":
            out[name] = rng.integers(0, 200, (rows,) + shape).astype(dtype)
        else:
            out[name] = (-rng.random((rows,) + shape) * 10).astype(dtype)
    return out


SCHEMAS = {
    **{f"v1-{v}": dict(value_dtype=v) for v in ("float16", "bfloat16", "float32")},
    **{f"v2-{v}": dict(value_dtype=v, id_bits=11, input_id_bits=11) for v in ("quantized", "float16")},
    "v2-mixed": dict(value_dtype="quantized", id_bits=11, input_id_bits=11, sample_draws=5, sample_temperature=1.0),
}


@pytest.mark.parametrize("fmt", ["zarr", "parquet"])
@pytest.mark.parametrize("layout", SCHEMAS)
def test_round_trip_any_row_range(tmp_path, fmt, layout):
    schema = CacheSchema(task="causal-lm", positions=6, top_k=4, temperatures=(1.0, 2.0),
                         id_dtype="uint16", input_len=6, **SCHEMAS[layout])
    columns = random_columns(schema, 23)
    storage = get_format(fmt)
    path = tmp_path / f"s{storage.suffix}"
    storage.write(path, columns, schema=schema, chunk_rows=5)
    with storage.open(path, schema=schema) as reader:
        assert reader.num_rows == 23 and reader.chunk_rows == 5
        assert reader.field_layout() == schema.fields()
        for start, stop in [(0, 23), (3, 4), (4, 17), (20, 23)]:
            got = reader.read(start, stop)
            for name, array in columns.items():
                np.testing.assert_array_equal(got[name], array[start:stop], err_msg=name)


@pytest.mark.parametrize("fmt", ["zarr", "parquet"])
def test_same_rows_give_the_same_bytes(tmp_path, fmt):
    schema = CacheSchema(task="classification", positions=1, top_k=3, temperatures=(1.0,),
                         id_dtype="uint8", has_label=True)
    columns = random_columns(schema, 10)
    storage = get_format(fmt)
    a, b = tmp_path / f"a{storage.suffix}", tmp_path / f"b{storage.suffix}"
    storage.write(a, columns, schema=schema, chunk_rows=4)
    storage.write(b, columns, schema=schema, chunk_rows=4)
    assert sha256_file(a) == sha256_file(b)
    assert not list(tmp_path.glob("*.tmp"))


def test_narrowest_id_dtype_and_bf16_values():
    assert [narrowest_id_dtype(v) for v in (10, 256, 257, 65536, 151936)] == ["uint8", "uint8", "uint16", "uint16", "uint32"]
    import torch

    values = torch.tensor([-0.0, -1.5, -17.25, -300.0, -1.00390625, -1.01171875, -3.1e-5, -7e20])  # incl. ties
    bits = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(encode_float_values(values.numpy(), "bfloat16"), bits)  # torch's rounding
    np.testing.assert_array_equal(decode_float_values(bits, "bfloat16"), values.to(torch.bfloat16).float().numpy())


def test_unknown_format_names_the_choices():
    from kdpipe.pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="zarr, parquet"):
        get_format("hdf5")
