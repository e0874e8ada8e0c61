"""A summary of a cache for people: what was captured, how big it is, how much the top-k covers."""

from __future__ import annotations

import numpy as np

from kdpipe.pipeline.cache import TeacherCache


def summarize_cache(cache: TeacherCache, *, sample_rows: int = 64, seed: int = 0) -> dict:
    """Settings, sizes and fidelity (mean tail mass per temperature over a sample of rows)."""
    m = cache.manifest
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
        "id_dtype": m["capture"]["id_dtype"],
        "rows": m["totals"]["rows"],
        "tokens": m["totals"]["tokens"],
        "bytes": m["totals"]["bytes"],
        "bytes_per_token": m["totals"]["bytes_per_token"],
        "shards": m["totals"]["shards"],
        "device": m.get("device"),
        "finished_at": m.get("finished_at"),
        "sampled_rows": len(sample),
        "mean_tail_mass": fidelity,
    }
