"""Measuring what a capture will cost before running it: the teacher on a probe of rows.

:func:`probe_capture` runs the teacher (weights loaded) over the first rows of the data exactly as
the capture would, writes them as one shard in a temporary folder and reports the bytes per row and
per token of that shard, and how each stored field compressed. A dry run multiplies them by its
row and token estimate (:meth:`~kdpipe.pipeline.capture.plan.CapturePlan.estimate`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import zstandard

from kdpipe.pipeline.cache.schema import encode_rows
from kdpipe.pipeline.cache.storage.base import get_format
from kdpipe.pipeline.capture.plan import CHUNK_ROWS, CapturePlan
from kdpipe.pipeline.capture.run import Draws, batch_rows


def probe_capture(plan: CapturePlan, rows: int) -> dict:
    """Capture the first ``rows`` rows into a throwaway shard; returns ``rows``, ``tokens``, ``bytes``
    (of that shard), ``bytes_per_row`` (what one more row adds: the slope between that shard and one of
    half its rows), ``shard_overhead`` (what a shard costs beyond its rows: container and metadata)
    and ``bits_per_entry`` of each stored field, per cached id (top-k and draws), from zstd level 3
    on chunks of rows as the zarr shards store them."""
    settings, schema = plan.settings, plan.schema
    stream = plan.stream(num_workers=0)
    stream.rank, stream.world_size = 0, 1
    block = next(iter(stream), None)
    if block is None or not len(block.rows):
        return {"rows": 0, "tokens": 0, "bytes": 0, "bytes_per_row": 0.0, "shard_overhead": 0, "bits_per_entry": {}}
    index = np.arange(min(rows, len(block.rows)))
    draws = Draws(settings.seed, block.index, 0) if schema.sample_draws else None
    parts = [batch_rows(plan, block, index[s : s + settings.batch_size], draws)
             for s in range(0, len(index), settings.batch_size)]
    columns = encode_rows(schema, {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    fmt = get_format(settings.format)
    sizes = []  # the shard of every probe row, and of the first half of them: their slope is a row's bytes
    with tempfile.TemporaryDirectory(prefix="kdpipe-probe-") as tmp:
        for n in (len(index), len(index) // 2):
            path = Path(tmp) / f"probe{n}{fmt.suffix}"
            fmt.write(path, {k: v[:n] for k, v in columns.items()}, schema=schema, chunk_rows=CHUNK_ROWS)
            sizes.append(path.stat().st_size)
    nbytes = sizes[0]
    tokens = int(columns["mask"].sum())
    entries = max(tokens * (schema.top_k + schema.sample_draws), 1)
    zstd = zstandard.ZstdCompressor(level=3)
    field_bytes = {name: sum(len(zstd.compress(np.ascontiguousarray(a[s : s + CHUNK_ROWS]).tobytes()))
                             for s in range(0, len(a), CHUNK_ROWS))
                   for name, a in columns.items()}
    half = len(index) // 2
    per_row = (sizes[0] - sizes[1]) / (len(index) - half) if half else sizes[0] / len(index)
    return {"rows": len(index), "tokens": tokens, "bytes": nbytes, "bytes_per_row": per_row,
            "shard_overhead": max(nbytes - per_row * len(index), 0),
            "bits_per_entry": {name: 8 * b / entries for name, b in field_bytes.items()}}
