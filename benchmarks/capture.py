"""Capture throughput next to the same teacher's bare forward, in one process.

    python benchmarks/capture.py --teacher data/teacher --data data/shakespeare/train
    python benchmarks/capture.py --synthetic qwen-1.5b --device cuda   # a 1.78 B, V=151,936 shape

Reports medians over --repeats runs of: the bare forward (teacher logits only), the sparse view
(forward + top-k + per-temperature logsumexp + tail), and the full capture (``run_capture``: the
above plus the background shard writer, into a temporary cache), in tokens/s, with the ratios to the
bare forward and the cache's bytes/token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdpipe.pipeline.capture import CaptureSettings, plan_capture, run_capture
from kdpipe.pipeline.data.stream import collect
from kdpipe.pipeline.topk import sparse_view_of_logits

SYNTHETIC = {  # Qwen2-1.5B-shaped Llama: 1.78 B parameters with the 151,936-row lm-head
    "qwen-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                      num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=2048, max_position_embeddings=512),
}


def synthetic_teacher(name: str, folder: Path, device: str) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SYNTHETIC[name], tie_word_embeddings=False)
    with torch.device(device if device != "auto" and torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(Path(__file__).parents[1] / "data" / "tokenizer").save_pretrained(folder)
    del model
    return str(folder)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loop(plan, rows: int, work) -> float:
    """Seconds to run ``work(batch_index)`` over every batch of the plan's ``rows`` rows."""
    bs = plan.settings.batch_size
    sync(plan.teacher.device)
    start = time.perf_counter()
    for s in range(0, rows, bs):
        work(np.arange(s, min(s + bs, rows)))
    sync(plan.teacher.device)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="data/teacher")
    parser.add_argument("--synthetic", choices=sorted(SYNTHETIC), default=None)
    parser.add_argument("--data", default="data/shakespeare/train")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--temperature", type=float, action="append", default=None)
    parser.add_argument("--limit-rows", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--format", default="zarr")
    args = parser.parse_args()
    temperatures = tuple(args.temperature or (1.0, 2.0))

    with tempfile.TemporaryDirectory() as tmp:
        teacher = synthetic_teacher(args.synthetic, Path(tmp) / "teacher", args.device) if args.synthetic else args.teacher
        settings = CaptureSettings(
            teacher=teacher, data=args.data, out=str(Path(tmp) / "cache"), top_k=args.top_k,
            temperatures=temperatures, seq_len=args.seq_len, batch_size=args.batch_size,
            device=args.device, dtype=args.dtype, limit_rows=args.limit_rows, format=args.format,
        )
        plan = plan_capture(settings)
        t = plan.teacher
        rows, _ = collect(plan.stream(num_workers=0))  # the rows the capture makes, in memory
        inputs = torch.from_numpy(rows.inputs).to(t.device)

        def forward(index):
            return t.logits(inputs[index])

        def sparse(index):
            logits = forward(index)
            return sparse_view_of_logits(logits.reshape(-1, logits.shape[-1]), top_k=args.top_k, temperatures=temperatures)

        def capture():
            import shutil

            shutil.rmtree(settings.out, ignore_errors=True)
            sync(t.device)
            start = time.perf_counter()
            manifest = run_capture(plan)
            return time.perf_counter() - start, manifest

        time_loop(plan, len(rows), forward)  # warm-up
        results = {"forward": [], "sparse_view": [], "capture": []}
        for _ in range(args.repeats):  # interleaved, so drift hits all three alike
            results["forward"].append(time_loop(plan, len(rows), forward))
            results["sparse_view"].append(time_loop(plan, len(rows), sparse))
            seconds, manifest = capture()
            results["capture"].append(seconds)
    tokens = int(rows.mask.sum())
    medians = {k: statistics.median(v) for k, v in results.items()}
    report = {
        "device": torch.cuda.get_device_name(t.device) if t.device.type == "cuda" else "cpu",
        "teacher": args.synthetic or args.teacher, "vocab": t.vocab_size, "tokens": tokens,
        "batch_tokens": args.batch_size * args.seq_len, "top_k": args.top_k, "temperatures": list(temperatures),
        "tokens_per_s": {k: tokens / v for k, v in medians.items()},
        "ratio_to_forward": {k: medians["forward"] / v for k, v in medians.items()},
        "bytes_per_token": manifest["totals"]["bytes_per_token"], "repeats": args.repeats,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
