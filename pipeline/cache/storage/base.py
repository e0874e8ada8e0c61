"""The contract every shard format implements, and the registry that maps a name to it.

A shard holds consecutive cache rows of one schema (see :mod:`kdpipe.pipeline.cache.schema`) in chunks of
``chunk_rows`` rows. Writers write a whole shard at once and land it atomically; readers read any
row range, one chunk at a time.
"""

from __future__ import annotations

import abc
from pathlib import Path

import numpy as np

from kdpipe.pipeline.cache.schema import CacheSchema
from kdpipe.pipeline.errors import ConfigError


class ShardReader(abc.ABC):
    num_rows: int
    chunk_rows: int

    @abc.abstractmethod
    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows ``[start, stop)`` as field name -> array with a leading row axis."""

    @abc.abstractmethod
    def field_layout(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per-row shape and dtype of each stored field (checked against the schema by verify)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ShardFormat(abc.ABC):
    name: str
    suffix: str

    @abc.abstractmethod
    def write(
        self, path: Path, columns: dict[str, np.ndarray], *, schema: CacheSchema, chunk_rows: int
    ) -> None:
        """Write ``columns`` (validated against ``schema``) as one shard at ``path``, atomically."""

    @abc.abstractmethod
    def open(self, path: Path, *, schema: CacheSchema) -> ShardReader:
        """Open a finished shard for reading."""


def get_format(name: str) -> ShardFormat:
    """The registered shard format called ``name`` (``zarr`` or ``parquet``)."""
    from kdpipe.pipeline.cache.storage.parquet_shard import ParquetFormat
    from kdpipe.pipeline.cache.storage.zarr_shard import ZarrZipFormat

    formats = {f.name: f for f in (ZarrZipFormat(), ParquetFormat())}
    if name not in formats:
        raise ConfigError(f"unknown storage format {name!r}; use one of: {', '.join(formats)}")
    return formats[name]
