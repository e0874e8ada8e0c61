"""Parquet shards: one row per cache row, one column per field.

Multi-dimensional fields are stored flattened as ``fixed_size_list<dtype>[prod(shape)]`` and
reshaped on read; each field's per-row shape is in the schema metadata under ``kdpipe.shapes``.
Row groups hold ``chunk_rows`` rows, zstd-compressed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdpipe.pipeline.cache.schema import CacheSchema
from kdpipe.pipeline.cache.storage.base import ShardFormat, ShardReader
from kdpipe.pipeline.fileio import atomic_path

_SHAPES_KEY = b"kdpipe.shapes"


def _to_arrow(array: np.ndarray) -> pa.Array:
    if array.ndim == 1:
        return pa.array(array)
    width = math.prod(array.shape[1:])
    flat = pa.array(np.ascontiguousarray(array).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, width)


def _from_arrow(column: pa.ChunkedArray, shape: tuple[int, ...]) -> np.ndarray:
    column = column.combine_chunks()
    if not shape:
        return column.to_numpy(zero_copy_only=False)
    flat = column.values.to_numpy(zero_copy_only=False)
    return flat.reshape((len(column),) + shape)


class ParquetFormat(ShardFormat):
    name = "parquet"
    suffix = ".parquet"

    def write(self, path, columns, *, schema: CacheSchema, chunk_rows: int) -> None:
        schema.check_columns(columns)
        shapes = {name: list(array.shape[1:]) for name, array in columns.items()}
        table = pa.table({name: _to_arrow(array) for name, array in columns.items()})
        table = table.replace_schema_metadata({_SHAPES_KEY: json.dumps(shapes).encode()})
        with atomic_path(path) as tmp:
            pq.write_table(
                table, tmp, row_group_size=max(1, chunk_rows), compression="zstd",
                write_statistics=False,
            )

    def open(self, path, *, schema: CacheSchema) -> ShardReader:
        return ParquetReader(Path(path))


class ParquetReader(ShardReader):
    def __init__(self, path: Path):
        self._file = pq.ParquetFile(path)
        metadata = self._file.schema_arrow.metadata or {}
        self._shapes = {k: tuple(v) for k, v in json.loads(metadata[_SHAPES_KEY]).items()}
        self.num_rows = self._file.metadata.num_rows
        self.chunk_rows = self._file.metadata.row_group(0).num_rows if self.num_rows else 1
        self._group_cache: tuple[int, dict] | None = None

    def _row_group(self, index: int) -> dict[str, np.ndarray]:
        if self._group_cache is None or self._group_cache[0] != index:
            table = self._file.read_row_group(index)
            arrays = {name: _from_arrow(table[name], self._shapes[name]) for name in table.column_names}
            self._group_cache = (index, arrays)
        return self._group_cache[1]

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        parts = []
        for group in range(start // self.chunk_rows, (max(stop, start + 1) - 1) // self.chunk_rows + 1):
            base = group * self.chunk_rows
            arrays = self._row_group(group)
            lo, hi = max(start - base, 0), min(stop - base, self.chunk_rows)
            parts.append({name: a[lo:hi] for name, a in arrays.items()})
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def field_layout(self):
        arrow = self._file.schema_arrow
        layout = {}
        for name, shape in self._shapes.items():
            kind = arrow.field(name).type
            inner = kind.value_type if pa.types.is_fixed_size_list(kind) else kind
            layout[name] = (shape, np.dtype(inner.to_pandas_dtype()))
        return layout

    def close(self) -> None:
        self._file.close()
