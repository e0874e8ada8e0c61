"""``train-student`` with a 151,936-row student head: cached top-k, sampled and mixed KD next to hard labels.

    python benchmarks/train_memory.py            # CPU: ~10 minutes on 2 cores (5 steps, 2 repeats)

Builds a synthetic teacher with a Qwen2-sized vocabulary (V = 151,936; hidden 64, one layer) and three
caches of its outputs at T = 1 and 2 on the shipped text: top-64, sampled (64 draws per position) and
mixed (exact top-32 + 32 draws). Then runs complete ``kdpipe train-student`` processes of a small
student with the same 151,936-row head, 8 rows x 128 tokens a step: on the top-64 cache with the fused
loss (the default) and without it (``--no-fused-loss``), each at ``--alpha 0.5 --temperature 2``
(cached KD) and ``--alpha 0`` (hard labels only); on the sampled and mixed caches with the fused loss
at ``--alpha 0.5 --temperature 2`` (the unbiased estimator on the draws, fused with the lm-head). Each
run is a fresh process: its peak RSS and CPU seconds (user + system, the whole process) come from
``wait4``; its time per step from ``metrics.jsonl`` (steps after the first, so start-up is not
counted). The runs alternate, ``--repeats`` times; medians and ratios to the hard-label run of the same
implementation (the fused one for sampled and mixed) are reported and written to
``benchmarks/results/train_memory_cpu.json`` with each variant's ``loss_implementation`` from its
``run.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KDPIPE = str(Path(sys.executable).parent / "kdpipe")
VOCAB = 151_936
TEACHER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
           "num_key_value_heads": 4, "vocab_size": VOCAB, "max_position_embeddings": 256, "tie_word_embeddings": False}
STUDENT = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **TEACHER, "hidden_size": 96,
           "intermediate_size": 192}


CACHES = {"topk": ["--top-k", "64"], "sampled": ["--sample", "64"], "mixed": ["--top-k", "32", "--sample", "32"]}
KD = ["--alpha", "0.5", "--temperature", "2"]
VARIANTS = {  # name: (cache, train-student flags)
    "fused_kd": ("topk", KD),
    "fused_ce": ("topk", ["--alpha", "0"]),
    "fused_sampled": ("sampled", KD),
    "fused_mixed": ("mixed", KD),
    "unfused_kd": ("topk", [*KD, "--no-fused-loss"]),
    "unfused_ce": ("topk", ["--alpha", "0", "--no-fused-loss"]),
}


def make_teacher(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TEACHER)).save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(ROOT / "data" / "tokenizer").save_pretrained(folder)
    return folder


def run(command: list[str]) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in MB, CPU seconds: user + system) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(command)}\n{proc.stderr.read().decode()[-2000:]}")
    cpu = usage.ru_utime + usage.ru_stime  # steadier than wall time on a shared machine
    return time.perf_counter() - start, usage.ru_maxrss / 1024, cpu  # ru_maxrss is in KiB on Linux


def seconds_per_step(run_dir: Path) -> float:
    """Mean seconds of the steps after the first, from the cumulative tokens/s the trainer logs."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    first, last = train[0], train[-1]
    tokens_per_step = 8 * 128
    t_first = first["step"] * tokens_per_step / first["tokens_per_s"]
    t_last = last["step"] * tokens_per_step / last["tokens_per_s"]
    return (t_last - t_first) / (last["step"] - first["step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_memory_cpu.json"))
    args = parser.parse_args()
    results: dict[str, list] = {name: [] for name in VARIANTS}
    implementations: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        teacher = make_teacher(work / "teacher")
        rows = 8 * (args.steps + 1)
        for cache, flags in CACHES.items():
            subprocess.run([KDPIPE, "cache-teacher", "--teacher", str(teacher), "--data", str(ROOT / "data" / "shakespeare" / "train"),
                            "--out", str(work / cache), *flags, "--temperature", "1", "--temperature", "2",
                            "--seq-len", "128", "--limit-rows", str(rows), "--device", "cpu"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (work / "student.json").write_text(json.dumps(STUDENT))
        (work / "log_every_step.toml").write_text("log_every = 1\n")
        for repeat in range(args.repeats):
            for name, (cache, flags) in VARIANTS.items():
                out = work / f"{name}-{repeat}"
                wall, rss, cpu = run([KDPIPE, "train-student", "--config", str(work / "log_every_step.toml"), "--cache", str(work / cache), "--student", str(work / "student.json"),
                                 "--out", str(out), "--steps", str(args.steps), "--batch-size", "8", "--eval-every", "0",
                                 "--checkpoint-every", "0", "--eval-fraction", "0", "--device", "cpu", *flags])
                results[name].append({"wall_s": wall, "peak_rss_mb": rss, "s_per_step": seconds_per_step(out), "cpu_s": cpu})
                implementations[name] = json.loads((out / "run.json").read_text())["loss_implementation"]
                print(f"{name:>13} repeat {repeat}: {results[name][-1]}", flush=True)
    median = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in results.items()}
    ratio = lambda a, b: {key: median[a][key] / median[b][key] for key in median[a]}  # noqa: E731
    ratios = {"fused_kd_vs_fused_ce": ratio("fused_kd", "fused_ce"), "unfused_kd_vs_unfused_ce": ratio("unfused_kd", "unfused_ce"),
              "fused_kd_vs_unfused_ce": ratio("fused_kd", "unfused_ce"),
              "fused_sampled_vs_fused_ce": ratio("fused_sampled", "fused_ce"),
              "fused_mixed_vs_fused_ce": ratio("fused_mixed", "fused_ce")}
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()  # noqa: E731
    import torch

    report = {
        "benchmark": "train_memory", "command": " ".join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "load_1min_end": os.getloadavg()[0],
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "git": {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))},
        "setup": {"vocab": VOCAB, "student": STUDENT, "rows_per_step": 8, "seq_len": 128, "top_k": 64,
                  "steps": args.steps, "repeats": args.repeats, "caches": CACHES,
                  "variants": {name: flags for name, (_, flags) in VARIANTS.items()},
                  "variant_caches": {name: cache for name, (cache, _) in VARIANTS.items()}},
        "loss_implementation": implementations, "runs": results, "median": median, "ratios": ratios,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'variant':>13} {'s/step':>8} {'peak RSS MB':>12} {'wall s':>8} {'CPU s':>8}")
    for name, m in median.items():
        print(f"{name:>13} {m['s_per_step']:>8.2f} {m['peak_rss_mb']:>12.0f} {m['wall_s']:>8.1f} {m['cpu_s']:>8.1f}")
    for name, r in ratios.items():
        print(f"{name}: time/step {r['s_per_step']:.2f}x, peak RSS {r['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
