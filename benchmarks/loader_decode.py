"""Training-loader rows/s for each cache encoding, side by side in one process (issue 11).

    python benchmarks/loader_decode.py --out benchmarks/results/loader_decode_cpu.json

Captures the demo teacher (V = 2,048) over --rows rows of the Shakespeare training split with each
encoding (format 2 quantized / float16 values, sampled, mixed; the shipped format-1 fixture is too
small to time), then times one shuffled epoch of ``CacheDataset`` (batches of 16, rows decoded and
collated as ``train-student`` gets them, one process, no workers) per encoding, interleaved,
--repeats times, and reports median rows/s. Also times ``decode_rows`` alone on synthetic rows of
the size a V = 151,936, seq-len 1,024, k = 64 cache holds (random ids and sorted values), the
per-row decode cost a loader worker pays at LLM scale.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdpipe.pipeline.cache.reader import TeacherCache
from kdpipe.pipeline.capture import CaptureSettings, plan_capture, run_capture
from kdpipe.pipeline.train.dataset import CacheDataset
from kdpipe.pipeline.cache.encoding import id_bits
from kdpipe.pipeline.cache.schema import CacheSchema, decode_rows, encode_rows

ENCODINGS = {
    "top-64 quantized (format 2 default)": {"top_k": 64},
    "top-64 float16 values": {"top_k": 64, "value_dtype": "float16"},
    "sampled, 16 draws": {"top_k": 0, "sample": 16},
    "top-16 + 16 draws": {"top_k": 16, "sample": 16},
}


def epoch_rows_per_s(cache: TeacherCache, batch_size: int, seed: int) -> float:
    data = CacheDataset(cache, batch_size=batch_size, seed=seed, rank=0, world_size=1)
    start, rows = time.perf_counter(), 0
    for batch in torch.utils.data.DataLoader(data, batch_size=None):
        rows += len(batch["mask"])
    return rows / (time.perf_counter() - start)


def llm_scale_decode(rows: int, repeats: int) -> dict:
    """decode_rows on rows shaped like a V = 151,936, seq-len 1,024, k = 64, 3-temperature cache."""
    P, k, V = 1024, 64, 151_936
    rng = np.random.default_rng(0)
    out = {}
    for values in ("quantized", "float16"):
        schema = CacheSchema(task="causal-lm", positions=P, top_k=k, temperatures=(1.0, 2.0, 4.0), id_dtype="uint32",
                             value_dtype=values, input_len=P, id_bits=id_bits(V), input_id_bits=id_bits(V))
        logical = {"sample_index": np.arange(rows), "input_hash": np.zeros(rows, np.uint64),
                   "input_ids": rng.integers(0, V, (rows, P)), "mask": np.ones((rows, P), bool),
                   "topk_ids": rng.integers(0, V, (rows, P, k)),
                   "topk_logits": -np.sort(rng.exponential(2.0, (rows, P, k)), axis=-1).astype(np.float32),
                   "logsumexp": rng.random((rows, P, 3)).astype(np.float32),
                   "tail_logprob": -rng.random((rows, P, 3)).astype(np.float32)}
        stored = encode_rows(schema, logical)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            decode_rows(schema, stored)
            times.append(time.perf_counter() - start)
        out[values] = {"rows_per_s": rows / statistics.median(times), "ms_per_row": 1e3 * statistics.median(times) / rows}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="data/teacher")
    p.add_argument("--data", default="data/shakespeare/train")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        caches = {}
        for label, options in ENCODINGS.items():
            settings = CaptureSettings(teacher=args.teacher, data=args.data, out=str(Path(tmp) / str(len(caches))),
                                       seq_len=args.seq_len, limit_rows=args.rows, device="cpu", batch_size=16, **options)
            manifest = run_capture(plan_capture(settings))
            caches[label] = (TeacherCache(settings.out), manifest["totals"]["bytes_per_token"])
        samples = {label: [] for label in caches}
        for repeat in range(args.repeats):  # interleaved: each repeat times every encoding once
            for label, (cache, _) in caches.items():
                samples[label].append(epoch_rows_per_s(cache, args.batch_size, seed=repeat))
    results = {label: {"rows_per_s_median": statistics.median(v), "rows_per_s": v, "bytes_per_token": caches[label][1]}
               for label, v in samples.items()}
    reference = results["top-64 float16 values"]["rows_per_s_median"]
    for r in results.values():
        r["vs_float16_values"] = r["rows_per_s_median"] / reference
    llm = llm_scale_decode(8, args.repeats)
    report = {"command": f"python benchmarks/loader_decode.py --rows {args.rows} --repeats {args.repeats}",
              "machine": {"cpu_count": __import__("os").cpu_count(), "python": platform.python_version(),
                          "torch_threads": torch.get_num_threads()},
              "versions": {"torch": torch.__version__, "numpy": np.__version__},
              "settings": vars(args), "demo_loader": results, "llm_scale_decode_one_process": llm}
    for label, r in results.items():
        print(f"{label:38s} {r['rows_per_s_median']:8.0f} rows/s ({r['vs_float16_values']:.2f}x float16), "
              f"{r['bytes_per_token']:.1f} B/token")
    for values, r in llm.items():
        print(f"V=151,936 seq 1,024 k=64 decode, {values:9s}: {r['ms_per_row']:.2f} ms/row ({r['rows_per_s']:.0f} rows/s)")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
