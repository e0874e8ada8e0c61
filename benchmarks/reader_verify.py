"""What checking a shard's sha256 before using its rows costs the readers (issue 27, item 1).

    python benchmarks/reader_verify.py --out benchmarks/results/reader_verify_cpu.json

Writes --shards zarr shards of the capture's default size (--shard-size-mb uncompressed) holding
rows shaped like a V = 151,936, seq-len 1,024, top-64 quantized cache (random ids, sorted values: ids
do not compress, as in a real cache), with a manifest, and reads them with
:class:`~kdpipe.pipeline.cache.reader.TeacherCache` as the commands do, hash checked and not:

* ``evaluate`` / training: every row of a shard, in batches of 16, decoded (``read_rows``);
* ``inspect``: one row of a shard (its sample of 64 rows meets up to 64 shards of a big cache, and the
  hash reads each whole shard for its one row).

Shards are read from the page cache (written just before), so the times are CPU: hashing a cold shard
also reads it from disk once, which ``evaluate`` pays anyway and ``inspect`` does not. Each timing is
the median of --repeats, verified and unverified interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from kdpipe.pipeline.cache.encoding import id_bits
from kdpipe.pipeline.cache.manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, manifest_checksum, shard_name
from kdpipe.pipeline.cache.reader import TeacherCache
from kdpipe.pipeline.cache.schema import CacheSchema, encode_rows
from kdpipe.pipeline.cache.storage.base import get_format
from kdpipe.pipeline.fileio import sha256_file

VOCAB, POSITIONS, TOP_K, TEMPERATURES = 151_936, 1024, 64, (1.0, 2.0, 4.0)


def llm_schema() -> CacheSchema:
    return CacheSchema(task="causal-lm", positions=POSITIONS, top_k=TOP_K, temperatures=TEMPERATURES,
                       id_dtype="uint32", value_dtype="quantized", input_len=POSITIONS, id_bits=id_bits(VOCAB),
                       input_id_bits=id_bits(VOCAB))


def stored_rows(schema: CacheSchema, rows: int, rng: np.random.Generator, chunk: int = 32) -> dict[str, np.ndarray]:
    """``rows`` random rows in the stored fields, encoded ``chunk`` rows at a time (bounded memory)."""
    parts = []
    for start in range(0, rows, chunk):
        n, T = min(chunk, rows - start), len(TEMPERATURES)
        logical = {"sample_index": np.arange(start, start + n),
                   "input_hash": rng.integers(0, 2**63, n).astype(np.uint64),
                   "input_ids": rng.integers(0, VOCAB, (n, POSITIONS)), "mask": np.ones((n, POSITIONS), bool),
                   "topk_ids": rng.integers(0, VOCAB, (n, POSITIONS, TOP_K)),
                   "topk_logits": -np.sort(rng.exponential(2.0, (n, POSITIONS, TOP_K)), axis=-1).astype(np.float32),
                   "logsumexp": rng.random((n, POSITIONS, T)).astype(np.float32),
                   "tail_logprob": -rng.random((n, POSITIONS, T)).astype(np.float32)}
        parts.append(encode_rows(schema, logical))
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def write_cache(root: Path, *, shards: int, shard_size_mb: float) -> dict:
    """A cache of ``shards`` distinct shards and its manifest; returns the manifest."""
    schema, fmt, rng = llm_schema(), get_format("zarr"), np.random.default_rng(0)
    rows_per_shard = max(1, int(shard_size_mb * 2**20 // schema.row_nbytes()))
    entries = []
    for index in range(shards):
        name = shard_name(block=0, part=index, suffix=fmt.suffix)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt.write(path, stored_rows(schema, rows_per_shard, rng), schema=schema, chunk_rows=16)
        entries.append({"name": name, "index": index, "block": 0, "part": index, "rank": 0, "rows": rows_per_shard,
                        "tokens": rows_per_shard * POSITIONS, "bytes": path.stat().st_size,
                        "sha256": sha256_file(path)})
    total = sum(e["bytes"] for e in entries)
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "schema": schema.to_dict(), "shards": entries,
                "capture": {"format": "zarr", "top_k": TOP_K, "teacher_vocab_size": VOCAB},
                "totals": {"rows": rows_per_shard * shards, "shards": shards, "bytes": total}}
    manifest["checksum"] = manifest_checksum(manifest)
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return manifest


def read_every_row(root: Path, *, verify: bool, batch_size: int = 16) -> float:
    """Seconds to read and decode every row of every shard, as evaluate does."""
    start = time.perf_counter()
    with TeacherCache(root, verify_hashes=verify) as cache:
        for shard, entry in enumerate(cache.shards):
            for first in range(0, entry["rows"], batch_size):
                cache.read_rows(shard, first, min(first + batch_size, entry["rows"]))
            cache.release(shard)
    return time.perf_counter() - start


def read_one_row_per_shard(root: Path, *, verify: bool) -> float:
    """Seconds per shard to open it and read one row, as inspect's sample does on a big cache."""
    start = time.perf_counter()
    with TeacherCache(root, verify_hashes=verify) as cache:
        for shard in range(len(cache.shards)):
            cache.read_rows(shard, 0, 1)
            cache.release(shard)
        count = len(cache.shards)
    return (time.perf_counter() - start) / count


def median_pair(measure, root: Path, repeats: int) -> dict:
    measure(root, verify=False)  # warm-up: imports, page cache
    times = {True: [], False: []}
    for _ in range(repeats):  # interleaved
        for verify in (False, True):
            times[verify].append(measure(root, verify=verify))
    return {"verified_s": statistics.median(times[True]), "unverified_s": statistics.median(times[False]),
            "verified_runs_s": times[True], "unverified_runs_s": times[False],
            "ratio_median_of_pairs": statistics.median(v / u for v, u in zip(times[True], times[False]))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--shard-size-mb", type=float, default=256.0, help="uncompressed, as cache-teacher's default")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="kdpipe-reader-verify-") as tmp:
        root = Path(tmp)
        manifest = write_cache(root, shards=args.shards, shard_size_mb=args.shard_size_mb)
        shard_mb = statistics.mean(e["bytes"] for e in manifest["shards"]) / 1e6
        first = root / manifest["shards"][0]["name"]
        hash_s = statistics.median(_timed(sha256_file, first) for _ in range(args.repeats))
        every_row = median_pair(read_every_row, root, args.repeats)
        one_row = median_pair(read_one_row_per_shard, root, args.repeats)
    every_row["overhead"] = every_row["verified_s"] / every_row["unverified_s"] - 1
    every_row["hash_share"] = args.shards * hash_s / every_row["unverified_s"]  # the hash alone vs the read: less noisy
    one_row["overhead_s_per_shard"] = one_row["verified_s"] - one_row["unverified_s"]
    report = {
        "command": f"python benchmarks/reader_verify.py --shards {args.shards} --shard-size-mb {args.shard_size_mb:g} "
                   f"--repeats {args.repeats}",
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "processor": platform.machine(),
                    "load_average_1min_at_end": os.getloadavg()[0]},  # other work on the machine slows both sides
        "shard": {"rows": manifest["shards"][0]["rows"], "file_mb": round(shard_mb, 1),
                  "uncompressed_mb": args.shard_size_mb,
                  "shape": f"V={VOCAB}, seq-len {POSITIONS}, top-{TOP_K} quantized"},
        "sha256_mb_per_s": shard_mb / hash_s,
        "sha256_s_per_shard": hash_s,
        "evaluate_every_row": every_row,
        "inspect_one_row_per_shard": one_row,
        "inspect_64_shards_extra_s": 64 * one_row["overhead_s_per_shard"],
    }
    print(f"shard: {report['shard']['file_mb']} MB on disk ({report['shard']['rows']} rows); sha256 "
          f"{report['sha256_mb_per_s']:.0f} MB/s")
    print(f"evaluate, every row: {every_row['unverified_s']:.2f} s unverified, {every_row['verified_s']:.2f} s "
          f"verified (+{100 * every_row['overhead']:.0f}%; hashing alone is {100 * every_row['hash_share']:.0f}% of "
          "the unverified read)")
    print(f"inspect, one row a shard: {one_row['unverified_s'] * 1e3:.0f} ms unverified, "
          f"{one_row['verified_s'] * 1e3:.0f} ms verified; 64 sampled shards: "
          f"+{report['inspect_64_shards_extra_s']:.1f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")


def _timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
