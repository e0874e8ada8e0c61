"""Zarr v3 shards: one zarr group per shard, packed into a single uncompressed zip file.

Each field is a zarr array chunked along rows (``chunk_rows`` rows a chunk, zstd-compressed). The
group is built in memory and written to ``<name>.zarr.zip`` with entries in sorted order and a fixed
timestamp, so the same rows always give the same bytes (and the same sha256). Open one with
``zarr.open_group(zarr.storage.ZipStore(path, mode="r"))``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import MemoryStore, ZipStore

from kdpipe.pipeline.cache.schema import CacheSchema
from kdpipe.pipeline.cache.storage.base import ShardFormat, ShardReader
from kdpipe.pipeline.fileio import atomic_path

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class ZarrZipFormat(ShardFormat):
    name = "zarr"
    suffix = ".zarr.zip"

    def write(self, path, columns, *, schema: CacheSchema, chunk_rows: int) -> None:
        num_rows = schema.check_columns(columns)
        entries: dict = {}
        group = zarr.create_group(
            MemoryStore(store_dict=entries),
            attributes={"kdpipe_rows": num_rows},
            zarr_format=3,
        )
        for field, array in columns.items():
            group.create_array(
                field,
                data=array,
                chunks=(max(1, min(chunk_rows, num_rows)),) + array.shape[1:],
                compressors=zarr.codecs.ZstdCodec(level=3),
            )
        with atomic_path(path) as tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
                for key in sorted(entries):
                    zf.writestr(zipfile.ZipInfo(key, date_time=_ZIP_EPOCH), entries[key].to_bytes())

    def open(self, path, *, schema: CacheSchema) -> ShardReader:
        return ZarrZipReader(Path(path))


class ZarrZipReader(ShardReader):
    def __init__(self, path: Path):
        self._store = ZipStore(path, mode="r")
        self._group = zarr.open_group(self._store, mode="r")
        self._arrays = {name: self._group[name] for name in self._group.array_keys()}
        first = next(iter(self._arrays.values()))
        self.num_rows = int(first.shape[0])
        self.chunk_rows = int(first.chunks[0])

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {name: array[start:stop] for name, array in self._arrays.items()}

    def field_layout(self):
        return {name: (tuple(a.shape[1:]), np.dtype(a.dtype)) for name, a in self._arrays.items()}

    def close(self) -> None:
        self._store.close()
