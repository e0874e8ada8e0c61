"""Capture throughput next to the same teacher's bare forward, in one process.

    python benchmarks/capture.py --teacher data/teacher --data data/shakespeare/heldout --seq-len 128 \\
        --batch-size 16 --limit-rows 128 --top-k 32 --repeats 3
    python benchmarks/capture.py --synthetic v152k-cpu --data data/shakespeare/heldout --seq-len 128 \\
        --batch-size 4 --limit-rows 16 --top-k 64 --repeats 3          # V = 151,936 head on a tiny body
    python benchmarks/capture.py --synthetic qwen-1.5b --device cuda   # a 1.78 B, V=151,936 shape
    python benchmarks/capture.py --tensor-parallel 2 --synthetic v152k-cpu --data data/shakespeare/heldout \
        --seq-len 128 --batch-size 4 --limit-rows 16 --top-k 64 --repeats 2   # 1 process next to TP = 2

Reports medians over --repeats runs (the variants interleaved batch by batch, so drift hits all
alike; ``capture`` once per repeat), over the target positions of the rows the capture makes, of:

- ``forward``: the bare forward (teacher logits only);
- ``decoder``: the decoder alone (last hidden states, no head: what the head-fused path runs first);
- ``view_reference``: forward + the previous sparse view (a logsumexp of everything, then of the tail,
  per temperature; ``sparse_view_of_logits_reference``);
- ``view``: forward + the current ``sparse_view_of_logits`` (one pass per temperature over the tail);
- ``fused_head``: ``Teacher.sparse_view`` on the head-fused path (decoder + the head in vocabulary
  blocks with a running top-k and tail: the logits are never materialised), when the teacher allows it;
- ``capture``: ``run_capture`` (as ``pipeline/capture/run.py`` does it, with the shard writer, into
  a temporary cache; the report's ``capture_sparse_view`` is the path its manifest records),

in tokens/s, with the ratios to the bare forward and the cache's bytes/token. ``--out FILE`` also
writes the report (with the command, machine, versions, git commit and the raw timings) as JSON.

``--tensor-parallel N`` instead runs the whole command twice per repeat, as a user does: ``kdpipe
cache-teacher`` in one process (``--threads`` torch threads, default all cores) and ``torchrun
--nproc-per-node N kdpipe cache-teacher --tensor-parallel N`` (the threads split over the ranks), and
reports each one's wall time, capture-loop time (the manifest's started/finished, whole seconds), the
peak RSS of its largest process and how far the TP cache is from the single-process one
(:func:`tensor_parallel_comparison`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdpipe.pipeline.capture import CaptureSettings, plan_capture, run_capture
from kdpipe.pipeline.data.stream import collect
from kdpipe.pipeline.capture.topk import sparse_view_of_logits, sparse_view_of_logits_reference

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = {  # Qwen2-1.5B-shaped Llama: 1.78 B parameters with the 151,936-row lm-head
    "qwen-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                      num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=2048, max_position_embeddings=512),
    # the Qwen vocabulary on a CPU-sized body: the sparse view, not the forward, dominates
    "v152k-cpu": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=151936, max_position_embeddings=512),
}
VARIANTS = ("forward", "decoder", "view_reference", "view", "fused_head", "capture")


def synthetic_teacher(name: str, folder: Path, device: str) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SYNTHETIC[name], tie_word_embeddings=False)
    with torch.device(device if device != "auto" and torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(ROOT / "data" / "tokenizer").save_pretrained(folder)
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


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor())
    return {"cpu_count": os.cpu_count(), "cpu_model": model, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "platform": platform.platform()}


def versions() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__}


def git_state() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


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
    parser.add_argument("--skip", action="append", default=[], choices=VARIANTS, help="leave a variant out")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice)")
    parser.add_argument("--out", default=None, help="also write the report here as JSON")
    parser.add_argument("--tensor-parallel", type=int, default=None,
                        help="compare the command in 1 process with torchrun --tensor-parallel N (see the doc)")
    args = parser.parse_args()
    temperatures = tuple(args.temperature or (1.0, 2.0))
    if args.tensor_parallel:
        report = tensor_parallel_comparison(args, temperatures)
        print(json.dumps(report, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

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
        attention = None if rows.attention_mask is None else torch.from_numpy(rows.attention_mask).to(t.device)
        target = torch.from_numpy(rows.mask)
        fused_problem = t.fused_head_problem()

        def batch(index):
            return inputs[index], None if attention is None else attention[index], target[index]

        def forward(index):
            x, a, _ = batch(index)
            return t.logits(x, a)

        @torch.inference_mode()
        def decoder(index):
            x, a, _ = batch(index)
            return t.model.get_decoder()(input_ids=x, attention_mask=a, use_cache=False).last_hidden_state

        def view_with(function):
            def work(index):
                x, a, m = batch(index)
                logits = t.logits(x, a)
                return function(logits.reshape(-1, logits.shape[-1])[m.reshape(-1).to(logits.device)],
                                top_k=args.top_k, temperatures=temperatures)
            return work

        def fused_head(index):
            x, a, m = batch(index)
            return t.sparse_view(x, a, m, top_k=args.top_k, temperatures=temperatures, fused=True)

        def capture(_index=None):
            shutil.rmtree(settings.out, ignore_errors=True)
            sync(t.device)
            start = time.perf_counter()
            manifest = run_capture(plan)
            return time.perf_counter() - start, manifest

        work = {"forward": forward, "decoder": decoder, "view_reference": view_with(sparse_view_of_logits_reference),
                "view": view_with(sparse_view_of_logits), "fused_head": fused_head}
        variants = [v for v in VARIANTS if v not in args.skip and not (v in ("decoder", "fused_head") and fused_problem)]
        for name in variants:  # warm-up (and one check that the variant runs)
            if name != "capture":
                work[name](np.arange(min(args.batch_size, len(rows))))
        time_loop(plan, len(rows), forward)
        results = {name: [] for name in variants}
        manifest = None
        batches = [np.arange(s, min(s + args.batch_size, len(rows))) for s in range(0, len(rows), args.batch_size)]
        timed = [v for v in variants if v != "capture"]
        for repeat in range(args.repeats):
            # batch by batch, every variant on the same batch in a rotating order: a load that
            # changes within a run hits all of them alike
            seconds = dict.fromkeys(timed, 0.0)
            for b, index in enumerate(batches):
                for i in range(len(timed)):
                    name = timed[(i + b + repeat) % len(timed)]
                    sync(t.device)
                    start = time.perf_counter()
                    work[name](index)
                    sync(t.device)
                    seconds[name] += time.perf_counter() - start
            for name in timed:
                results[name].append(seconds[name])
            if "capture" in variants:
                elapsed, manifest = capture()
                results["capture"].append(elapsed)
    tokens = int(rows.mask.sum())
    medians = {k: statistics.median(v) for k, v in results.items()}
    report = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(t.device) if t.device.type == "cuda" else "cpu",
        "teacher": args.synthetic or args.teacher, "synthetic_config": SYNTHETIC.get(args.synthetic),
        "dtype": str(next(t.model.parameters()).dtype).removeprefix("torch."),
        "vocab": t.vocab_size, "tokens": tokens, "rows": len(rows), "batch_size": args.batch_size,
        "seq_len": args.seq_len, "batch_tokens": args.batch_size * args.seq_len, "top_k": args.top_k,
        "temperatures": list(temperatures), "repeats": args.repeats,
        "fused_head_problem": fused_problem,
        "tokens_per_s": {k: tokens / v for k, v in medians.items()},
        "ratio_to_forward": {k: medians["forward"] / v for k, v in medians.items()} if "forward" in medians else None,
        # the fastest repeat of each: on a shared machine, the closest to the cost without interference
        "tokens_per_s_best": {k: tokens / min(v) for k, v in results.items()},
        "ratio_to_forward_best": {k: min(results["forward"]) / min(v) for k, v in results.items()} if "forward" in results else None,
        "view_cost_ms_per_batch": {
            k: 1e3 * (medians[k] - medians["forward"]) / -(-len(rows) // args.batch_size)
            for k in ("view_reference", "view") if k in medians and "forward" in medians
        },
        "bytes_per_token": manifest["totals"]["bytes_per_token"] if manifest else None,
        "capture_sparse_view": manifest["capture"].get("sparse_view") if manifest else None,
        "seconds": results,
        "load_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "machine": machine(), "versions": versions(), "git": git_state(),
        "note": "medians of interleaved runs in one process; capture = run_capture as run.py does it "
                "(Teacher.sparse_view, shard writer on a thread)",
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


# ----------------------------------------------------------------------------- --tensor-parallel N
PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")


def run_command(command: list[str], threads: int) -> dict:
    """Wall seconds and the peak RSS (MiB) of the largest process of ``command``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, *command], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}")
    return {"wall_s": wall, "peak_rss_mib": int(done.stderr.strip().splitlines()[-1]) / 1024}


def cache_difference(cache: Path, reference: Path) -> dict:
    """Largest differences of the stored values, and the top-k ids that differ, at target positions."""
    from kdpipe.pipeline.cache.reader import TeacherCache

    a, b = TeacherCache(str(cache)), TeacherCache(str(reference))
    worst = {"topk_logits": 0.0, "logsumexp": 0.0, "tail_logprob": 0.0}
    ids_differ = positions = 0
    for i in range(len(b)):
        got, want = a.read_raw(i), b.read_raw(i)
        mask = want["mask"].astype(bool)
        assert len(a) == len(b) and (got["mask"] == want["mask"]).all(), "the caches hold other rows"
        for name in worst:
            worst[name] = max(worst[name], float(np.abs(got[name][mask] - want[name][mask]).max(initial=0)))
        ids_differ += int((got["topk_ids"][mask] != want["topk_ids"][mask]).sum())
        positions += int(mask.sum())
    return {"max_abs_difference": worst, "topk_ids_differing": ids_differ, "positions": positions}


def tensor_parallel_comparison(args, temperatures) -> dict:
    """The capture command in one process next to ``torchrun --tensor-parallel N`` (see the module doc)."""
    import datetime

    n = args.tensor_parallel
    threads = args.threads or os.cpu_count() or 1
    kdpipe = str(Path(sys.executable).parent / "kdpipe")
    with tempfile.TemporaryDirectory() as tmp:
        teacher = synthetic_teacher(args.synthetic, Path(tmp) / "teacher", "cpu") if args.synthetic else args.teacher
        common = ["--teacher", teacher, "--data", args.data, "--seq-len", str(args.seq_len), "--batch-size",
                  str(args.batch_size), "--top-k", str(args.top_k), "--limit-rows", str(args.limit_rows),
                  "--device", args.device, "--dtype", args.dtype, "--format", args.format, "--values", "float32",
                  "--num-workers", "0", *[a for t in temperatures for a in ("--temperature", str(t))]]
        ways = {
            "one_process": (lambda out: [kdpipe, "cache-teacher", *common, "--out", out], threads),
            f"tensor_parallel_{n}": (lambda out: [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc-per-node", str(n), kdpipe, "cache-teacher", *common,
                                                  "--tensor-parallel", str(n), "--out", out], max(1, threads // n)),
        }
        runs: dict = {name: [] for name in ways}
        manifests = {}
        for repeat in range(args.repeats):
            for name, (command, name_threads) in ways.items():
                out = str(Path(tmp) / f"{name}-{repeat}")
                result = run_command(command(out), name_threads)
                manifest = json.loads((Path(out) / "manifest.json").read_text())
                seconds = (datetime.datetime.fromisoformat(manifest["finished_at"])
                           - datetime.datetime.fromisoformat(manifest["started_at"])).total_seconds()
                runs[name].append({**result, "capture_loop_s": seconds, "threads_per_process": name_threads})
                manifests[name] = (out, manifest)
        tp_name = f"tensor_parallel_{n}"
        difference = cache_difference(Path(manifests[tp_name][0]), Path(manifests["one_process"][0]))
        tokens = manifests["one_process"][1]["totals"]["tokens"]
        summary = {name: {"wall_s": statistics.median(r["wall_s"] for r in rs),
                          "capture_loop_s": statistics.median(r["capture_loop_s"] for r in rs),
                          "tokens_per_s_wall": tokens / statistics.median(r["wall_s"] for r in rs),
                          "peak_rss_mib_largest_process": max(r["peak_rss_mib"] for r in rs)}
                   for name, rs in runs.items()}
        return {
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "teacher": args.synthetic or args.teacher, "synthetic_config": SYNTHETIC.get(args.synthetic),
            "tensor_parallel": n, "tokens": tokens, "rows": manifests["one_process"][1]["totals"]["rows"],
            "top_k": args.top_k, "temperatures": list(temperatures), "repeats": args.repeats,
            "summary": summary, "runs": runs,
            "sparse_view": {name: m["capture"]["sparse_view"] for name, (_, m) in manifests.items()},
            "tp_cache_vs_one_process": difference,
            "load_1min_after": os.getloadavg()[0], "machine": machine(), "versions": versions(), "git": git_state(),
            "note": "whole commands (process start, teacher load, capture, manifest) as a user runs them; "
                    "capture_loop_s from the manifest's whole-second timestamps; values stored as float32 so the "
                    "difference is the split teacher's rounding",
        }


if __name__ == "__main__":
    main()
