"""The same ~130 M-parameter student trained by 2 processes with ``--sharding ddp`` and ``--sharding fsdp``,
side by side: what each rank holds and how long a step takes (CPU, gloo).

    python benchmarks/train_scale.py            # CPU: ~5-8 minutes on 2 cores

Caches the shipped teacher's top-64 at T = 2 (``data/teacher``, vocabulary 2,048) on the shipped text,
then, for each sharding, starts ``torchrun --nproc-per-node 2`` on this file in worker mode: every rank
runs the library's :class:`~kdpipe.pipeline.train.trainer.Trainer` (no evaluation, no checkpoint, no
final model, so nothing but training is measured) on a Llama student of hidden 1024, 10 layers,
intermediate 2816 and the teacher's vocabulary, and reports

- the bytes of its parameters, gradients and AdamW state, counted from the tensors it holds (a DTensor's
  local shard under FSDP; gradients just before each optimizer step);
- its peak RSS (``ru_maxrss``) and its RSS after the last step: the process as the OS sees it (Python,
  torch, the cache reader; under both shardings the student is first built whole on every rank, then
  sharded, so the peak includes one whole copy);
- the median seconds per step over the steps after the first.

Writes ``benchmarks/results/train_scale_cpu.json``. A GPU box runs the same with ``--device cuda``
and ``--nproc`` its GPU count (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KDPIPE = str(Path(sys.executable).parent / "kdpipe")
STUDENT = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 2048, "hidden_size": 1024,
           "intermediate_size": 2816, "num_hidden_layers": 10, "num_attention_heads": 16, "num_key_value_heads": 16,
           "max_position_embeddings": 256, "tie_word_embeddings": False}


def worker(config_path: str, report_path: str) -> None:
    """One rank (under torchrun): train, count what this rank holds, write ``report_path``.rankR.json."""
    import torch

    from kdpipe.pipeline.train.config import TrainConfig
    from kdpipe.pipeline.train.trainer import Trainer

    config = TrainConfig(**json.loads(Path(config_path).read_text()))
    trainer = Trainer(config)
    grad_bytes: list[int] = []
    step_ends: list[float] = []
    try:
        trainer.setup()
        trainer.optimizer.register_step_pre_hook(
            lambda optimizer, *_: grad_bytes.append(sum(_local_bytes(p.grad) for p in trainer.model.parameters()
                                                        if p.grad is not None)))
        start = time.perf_counter()
        trainer.fit(on_step=lambda metrics: step_ends.append(time.perf_counter()))
        params = list(trainer.model.parameters())
        report = {
            "rank": trainer.launch.rank, "sharding": trainer.distributed_record()["sharding"],
            "parameters": sum(_local_numel(p) for p in params),
            "parameter_bytes": sum(_local_bytes(p) for p in params),
            "gradient_bytes": max(grad_bytes),
            "optimizer_bytes": sum(_local_bytes(v) for state in trainer.optimizer.state.values()
                                   for v in state.values() if isinstance(v, torch.Tensor)),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_steps_mb": _rss_mb(),
            "step_seconds": [b - a for a, b in zip([start, *step_ends], step_ends)],
        }
    finally:
        trainer.close()
    report["param_grad_optimizer_mb"] = (report["parameter_bytes"] + report["gradient_bytes"]
                                         + report["optimizer_bytes"]) / 2**20
    report["median_step_s_after_first"] = statistics.median(report["step_seconds"][1:])
    Path(f"{report_path}.rank{report['rank']}.json").write_text(json.dumps(report))


def _local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor's shard on this rank


def _local_numel(tensor) -> int:
    return _local(tensor).numel()


def _local_bytes(tensor) -> int:
    local = _local(tensor)
    return local.numel() * local.element_size()


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_sharding(sharding: str, *, cache: Path, work: Path, args) -> list[dict]:
    from kdpipe.pipeline.train.config import TrainConfig

    (work / "student.json").write_text(json.dumps(STUDENT))
    config = TrainConfig(cache=str(cache), student=str(work / "student.json"), out=str(work / sharding),
                         steps=args.steps, batch_size=args.batch_size, lr=1e-4, eval_every=0, eval_fraction=0.0,
                         checkpoint_every=0, log_every=args.steps, temperature=2.0, device=args.device,
                         sharding=sharding)
    config.validate()
    config_path = work / f"{sharding}.json"
    config_path.write_text(json.dumps(dataclasses.asdict(config)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               __file__, "--worker", str(config_path), str(work / f"{sharding}-report")]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if result.returncode:
        raise SystemExit(f"{sharding} failed:\n{result.stderr[-3000:]}")
    print(f"{sharding}: {time.perf_counter() - started:.0f} s", flush=True)
    return [json.loads((work / f"{sharding}-report.rank{r}.json").read_text()) for r in range(args.nproc)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "REPORT"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1, help="rows per rank per step")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_scale_cpu.json"))
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cache = work / "cache"
        rows = args.nproc * args.batch_size * (args.steps + 1)
        subprocess.run([KDPIPE, "cache-teacher", "--teacher", str(ROOT / "data" / "teacher"),
                        "--data", str(ROOT / "data" / "shakespeare" / "train"), "--out", str(cache), "--top-k", "64",
                        "--temperature", "2", "--seq-len", str(args.seq_len), "--limit-rows", str(rows),
                        "--device", "cpu"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ranks = {sharding: run_sharding(sharding, cache=cache, work=work, args=args) for sharding in ("ddp", "fsdp")}
    summary = {name: {key: max(r[key] for r in reports) for key in
                      ("param_grad_optimizer_mb", "peak_rss_mb", "rss_after_steps_mb", "median_step_s_after_first")}
               for name, reports in ranks.items()}
    ratio = {key: summary["fsdp"][key] / summary["ddp"][key] for key in summary["ddp"]}
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    import torch

    report = {
        "benchmark": "train_scale", "command": " ".join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "load_1min_end": os.getloadavg()[0],
                    "device": args.device},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "git": {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))},
        "setup": {"student": STUDENT, "parameters": ranks["ddp"][0]["parameters"], "processes": args.nproc,
                  "rows_per_rank_per_step": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
                  "omp_threads_per_rank": args.threads, "teacher": "data/teacher (top-64 at T=2)"},
        "per_rank": ranks, "max_over_ranks": summary, "fsdp_over_ddp": ratio,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'':>6} {'param+grad+opt MB':>18} {'peak RSS MB':>12} {'RSS after MB':>13} {'s/step':>7}"
          "  (max over ranks)")
    for name, row in summary.items():
        print(f"{name:>6} {row['param_grad_optimizer_mb']:>18.0f} {row['peak_rss_mb']:>12.0f} "
              f"{row['rss_after_steps_mb']:>13.0f} {row['median_step_s_after_first']:>7.2f}")
    print("fsdp/ddp: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))


if __name__ == "__main__":
    main()
