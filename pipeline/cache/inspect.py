"""A summary of a cache for people: what was captured, how big it is, how much the top-k covers."""

from __future__ import annotations

import numpy as np

from kdpipe.pipeline.cache.encoding import GRID_STEP
from kdpipe.pipeline.cache.reader import TeacherCache
from kdpipe.pipeline.cache.sampling import describe_draws


def summarize_cache(cache: TeacherCache, *, sample_rows: int = 64, seed: int = 0) -> dict:
    """Settings, encoding, sizes and fidelity (mean tail mass per temperature over a sample of rows).

    The encoding: ``format_version`` (1 or 2), ``id_bits`` (bits per packed id; None for format 1, whose
    ids are ``id_dtype`` arrays), ``values`` (``quantized`` or a float dtype), ``sample_draws`` and
    ``sample_temperature`` (0 and None without sampling).
    """
    m, schema = cache.manifest, cache.schema
    rng = np.random.default_rng(seed)
    n = len(cache)
    sample = np.sort(rng.choice(n, size=min(sample_rows, n), replace=False)) if n else []
    cache.schedule(list(dict.fromkeys(cache.locate(int(i))[0] for i in sample)))  # remote: read ahead
    tail_by_t = {t: [] for t in cache.temperatures}
    for k, i in enumerate(sample):
        raw = cache.read_raw(int(i))
        shard = cache.locate(int(i))[0]
        if k + 1 == len(sample) or cache.locate(int(sample[k + 1]))[0] != shard:
            cache.release(shard)  # done with it (a remote shard's copy may go)
        valid = raw["mask"]
        for j, t in enumerate(cache.temperatures):
            tail_by_t[t].append(np.exp(raw["tail_logprob"][valid, j]))
    fidelity = {
        f"{t:g}": float(np.concatenate(v).mean()) if v and sum(map(len, v)) else None
        for t, v in tail_by_t.items()
    }
    return {
        "path": str(cache.root),
        "task": m["task"],
        "teacher": m["teacher"].get("path") or m["teacher"].get("factory"),
        "teacher_class": m["teacher"].get("class"),
        "data": m["data"]["path"],
        "top_k": m["capture"]["top_k"],
        "temperatures": list(cache.temperatures),
        "seq_len": m["capture"]["seq_len"],
        "format": m["capture"]["format"],
        "value_dtype": m["capture"]["value_dtype"],
        "id_dtype": None if schema.packed else schema.id_dtype,  # format 1's stored ids (format 2 packs them)
        "format_version": m["format_version"],
        "id_bits": schema.id_bits,  # None: format 1 (ids as id_dtype arrays)
        "values": schema.value_dtype,
        "sample_draws": schema.sample_draws,
        "sample_temperature": schema.sample_temperature,
        "sample_scheme": schema.sample_scheme,  # None: at sample_temperature; "temperature-mixture": split over T
        "rows": m["totals"]["rows"],
        "tokens": m["totals"]["tokens"],
        "bytes": m["totals"]["bytes"],
        "bytes_per_token": m["totals"]["bytes_per_token"],
        "shards": m["totals"]["shards"],
        "device": m.get("device"),
        "finished_at": m.get("finished_at"),
        "command": _command_line(m.get("command")),
        "software": _software_line(m.get("software") or {}),
        "sampled_rows": len(sample),
        "mean_tail_mass": fidelity,
    }


def _command_line(command: dict | None) -> str | None:
    """``kdpipe cache-teacher ...`` as recorded (what ``kdpipe reproduce`` re-runs), or None."""
    import shlex

    return f"kdpipe {shlex.join(command['args'])}" if command else None


def _software_line(software: dict) -> str:
    """``kdpipe 0.1.0, torch 2.13.0+cpu, python 3.11.7; packages.txt sha256 5e6a5627ad1f``."""
    versions = ", ".join(f"{k} {software[k]}" for k in ("kdpipe", "torch", "python") if software.get(k))
    packages = f"; packages.txt sha256 {software['packages_sha256'][:12]}" if software.get("packages_sha256") else ""
    return versions + packages


def describe_encoding(summary: dict) -> str:
    """One line for people, e.g. ``format 2: ids packed in 11 bits, values quantized (1/16 nat), top-16, 16 draws at T=1``."""
    ids = f"ids packed in {summary['id_bits']} bits" if summary["id_bits"] else f"ids {summary['id_dtype']}"
    values = f"quantized (1/{round(1 / GRID_STEP)} nat grid)" if summary["values"] == "quantized" else summary["values"]
    draws = (", " + describe_draws(summary["sample_draws"], sample_temperature=summary["sample_temperature"],
                                   temperatures=summary["temperatures"]) if summary["sample_draws"] else ", no draws")
    return f"format {summary['format_version']}: {ids}, values {values}, top-{summary['top_k']}{draws}"
