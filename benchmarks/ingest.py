"""Stage one's data path: tokenizer throughput next to the teacher's, and capture memory vs corpus size.

    python benchmarks/ingest.py                                   # ~20 MB and ~200 MB corpora
    python benchmarks/ingest.py --small-mb 2 --large-mb 10 --repeats 1 --out /tmp/ingest.json

In one run, in a work folder (a temporary one unless ``--work``):

1. writes two seeded ``.jsonl`` corpora of ``{"text": ...}`` records (``--small-mb``, ``--large-mb``;
   1 MB = 10^6 bytes), each document 1-8 KB of consecutive lines of the shipped Shakespeare plays;
2. saves a tiny random Llama teacher (hidden 64, 2 layers, 4 heads) with the shipped tokenizer;
3. times ``BlockStream`` over the small corpus alone (no teacher) for each of ``--workers``, and the
   teacher's bare forward on the same rows, in tokens/s: can the tokenizer keep up with the teacher?
4. runs ``kdpipe cache-teacher`` on both corpora as a subprocess, sampling the summed RSS of its
   process tree (the capture and its tokenizer workers) from /proc every ``--interval`` seconds.
   Streaming keeps memory bounded, so the large capture's peak must be within 15% of the small one's.

Prints a table and writes everything (raw runs, medians, machine, versions) to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAYS = ROOT / "data" / "shakespeare" / "train"
TOKENIZER = ROOT / "data" / "teacher"  # its tokenizer files (vocab 2,048; id 0 is bos = eos = pad)
TINY_TEACHER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 4, "vocab_size": 2048, "max_position_embeddings": 512,
                "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "tie_word_embeddings": False}
RSS_LIMIT_RATIO = 1.15  # large / small peak RSS that bounded memory must stay under
MiB = 2**20


# ----------------------------------------------------------------------------- inputs
def make_corpus(path: Path, *, megabytes: float, seed: int) -> dict:
    """A ``.jsonl`` of documents of 1-8 KB of consecutive play lines (chosen by ``seed``)."""
    lines = [line for play in sorted(PLAYS.glob("*.txt")) for line in play.read_text().splitlines()]
    rng, target, written, docs = random.Random(seed), int(megabytes * 1e6), 0, 0
    with open(path, "w") as f:
        while written < target:
            want, i, text, size = rng.randint(1024, 8192), rng.randrange(len(lines)), [], 0
            while size < want:
                text.append(lines[i % len(lines)])
                size, i = size + len(text[-1]) + 1, i + 1
            record = json.dumps({"text": "\n".join(text)}) + "\n"
            f.write(record)
            written, docs = written + len(record.encode()), docs + 1
    return {"path": str(path), "bytes": written, "documents": docs, "seed": seed}


def make_teacher(folder: Path) -> str:
    """A random-init tiny ``LlamaForCausalLM`` (fp32) with the shipped tokenizer, saved to ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY_TEACHER)).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, folder / name)
    return str(folder)


# ----------------------------------------------------------------------------- data path vs teacher
def time_stream(corpus: str, spec, workers: int) -> dict:
    """One pass of ``BlockStream`` over ``corpus``: tokens, seconds (to the first block too), CPU seconds."""
    from kdpipe.pipeline.data import BlockStream, resolve_source

    load, cpu, start = os.getloadavg()[0], _cpu_seconds(), time.perf_counter()
    tokens = rows = blocks = 0
    first_block_s = None
    for block in BlockStream(resolve_source(corpus), spec, num_workers=workers):
        first_block_s = first_block_s or time.perf_counter() - start
        tokens, rows, blocks = tokens + block.tokens, rows + len(block.rows), blocks + 1
    seconds = time.perf_counter() - start  # the pool is shut down (children joined) by now
    return {"tokens": tokens, "rows": rows, "blocks": blocks, "seconds": seconds, "first_block_s": first_block_s,
            "cpu_s": _cpu_seconds() - cpu, "tokens_per_s": tokens / seconds, "load_1min": load}


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def time_forward(teacher, rows, *, batch_size: int, batches: int, warmup: int = 3) -> dict:
    """Median seconds of the bare forward over ``batches`` batches of ``batch_size`` rows (after ``warmup``).

    ``cores_busy`` is this process's CPU seconds per wall second while timing: about the number of
    torch threads on an idle machine, less when other jobs take the cores (the forward then slows
    far more than the single-threaded tokenizer does)."""
    import torch

    inputs = torch.from_numpy(rows.inputs)  # [N, L]
    attention = torch.from_numpy(rows.attention_mask)  # [N, L]
    batch = lambda b: (inputs[b * batch_size : (b + 1) * batch_size], attention[b * batch_size : (b + 1) * batch_size])
    n_batches = min(len(inputs) // batch_size, warmup + batches)
    for b in range(warmup):
        teacher.logits(*batch(b))
    seconds, load, cpu, wall = [], os.getloadavg()[0], _own_cpu_seconds(), time.perf_counter()
    for b in range(warmup, n_batches):
        start = time.perf_counter()
        teacher.logits(*batch(b))
        seconds.append(time.perf_counter() - start)
    cores_busy = (_own_cpu_seconds() - cpu) / (time.perf_counter() - wall)
    median = statistics.median(seconds)
    batch_tokens = batch_size * inputs.shape[1]
    return {"batch": f"{batch_size}x{inputs.shape[1]}", "batches": len(seconds), "warmup": warmup,
            "seconds_per_batch": seconds, "median_s": median, "tokens_per_s": batch_tokens / median,
            "torch_threads": torch.get_num_threads(), "cores_busy": cores_busy, "load_1min": load}


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


# ----------------------------------------------------------------------------- captures and RSS
def tree_rss_kb(pid: int) -> dict[int, int]:
    """VmRSS (KiB) of ``pid`` and all its descendants, read from /proc (vanished processes are skipped)."""
    rss, stack = {}, [pid]
    while stack:
        p = stack.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            rss[p] = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
            for task in Path(f"/proc/{p}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return rss


class RssSampler(threading.Thread):
    """Samples the summed RSS of a process tree every ``interval`` seconds until the root exits."""

    def __init__(self, proc: subprocess.Popen, interval: float):
        super().__init__(daemon=True)
        self.proc, self.interval = proc, interval
        self.samples: list[tuple[float, int, int, int]] = []  # (seconds, total KiB, root KiB, processes)

    def run(self):
        start = time.perf_counter()
        while self.proc.poll() is None:
            rss = tree_rss_kb(self.proc.pid)
            if rss:
                self.samples.append((time.perf_counter() - start, sum(rss.values()), rss.get(self.proc.pid, 0), len(rss)))
            time.sleep(self.interval)

    def summary(self, points: int = 300) -> dict:
        total = max(self.samples, key=lambda s: s[1])
        series, next_t, step = [], 0.0, max(1.0, self.samples[-1][0] / points)
        for t, kb, root_kb, n in self.samples:  # at most about ``points`` points for the JSON
            if t >= next_t:
                series.append([round(t, 1), round(kb / 1024, 1), round(root_kb / 1024, 1), n])
                next_t = t + step
        return {"peak_rss_mb": total[1] / 1024, "peak_at_s": total[0],
                "peak_main_rss_mb": max(s[2] for s in self.samples) / 1024,
                "max_processes": max(s[3] for s in self.samples), "samples": len(self.samples),
                "series_s_total_main_processes": series}


def kdpipe_command() -> list[str]:
    script = Path(sys.executable).parent / "kdpipe"  # the console script (pyproject: kdpipe.stages.cli:main)
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from kdpipe.stages.cli import main; main()"]


def run_capture(args, teacher: str, corpus: str, out: Path, log: Path) -> dict:
    """One complete ``kdpipe cache-teacher`` run: peak RSS of its tree, wall time, tokens from the manifest."""
    command = kdpipe_command() + [
        "cache-teacher", "--teacher", teacher, "--data", corpus, "--out", str(out),
        "--top-k", str(args.top_k), "--temperature", "1", "--seq-len", str(args.seq_len),
        "--batch-size", str(args.batch_size), "--num-workers", str(args.capture_workers),
    ]
    shutil.rmtree(out, ignore_errors=True)
    with open(log, "w") as log_file:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        sampler = RssSampler(proc, args.interval)
        sampler.start()
        proc.wait()
        wall = time.perf_counter() - start
        sampler.join()
    with open(log.with_suffix(".rss.tsv"), "w") as f:  # every sample, for looking at the trend
        f.write("seconds\ttotal_kib\tmain_kib\tprocesses\n")
        f.writelines("\t".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in s) + "\n" for s in sampler.samples)
    if proc.returncode != 0:
        raise SystemExit(f"capture failed (exit {proc.returncode}): {shlex.join(command)}\n{log.read_text()[-3000:]}")
    totals = json.loads((out / "manifest.json").read_text())["totals"]
    if not args.keep:
        shutil.rmtree(out)
    return {"command": shlex.join(command), "wall_s": wall, "tokens": totals["tokens"], "rows": totals["rows"],
            "shards": totals["shards"], "cache_bytes": totals["bytes"], "tokens_per_s": totals["tokens"] / wall,
            **sampler.summary()}


# ----------------------------------------------------------------------------- report
def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor())
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    return {"cpu_count": os.cpu_count(), "cpu_model": model, "ram_gib": round(mem_kb / 2**20, 1),
            "python": platform.python_version(), "platform": platform.platform()}


def versions() -> dict:
    import tokenizers
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def git_state() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def print_table(report: dict) -> None:
    data, fwd = report["data_path"], report["teacher_forward"]
    print(f"\ndata path alone: BlockStream over {report['corpora']['small']['bytes'] / 1e6:.1f} MB "
          f"({data['tokens']:,} tokens), median of {report['repeats']}")
    print(f"{'workers':>8} {'tokens/s':>12} {'first block s':>14} {'CPU s':>8} {'vs forward':>11}")
    for w, m in data["by_workers"].items():
        print(f"{w:>8} {m['tokens_per_s']:>12,.0f} {m['first_block_s']:>14.2f} {m['cpu_s']:>8.1f} {m['tokens_per_s'] / fwd['tokens_per_s']:>10.2f}x")
    print(f"teacher forward ({fwd['batch']}, {fwd['torch_threads']} threads): {fwd['tokens_per_s']:,.0f} tokens/s "
          f"({fwd['cores_busy']:.1f} cores busy; fewer than {fwd['torch_threads']} means other jobs slowed it)")
    print(f"\ncapture (--num-workers {report['capture_workers']}) {'MB':>6} {'tokens':>12} {'wall s':>8} "
          f"{'tokens/s':>10} {'peak RSS MiB':>13} {'main MiB':>9} {'procs':>6}")
    for name, c in report["captures"].items():
        print(f"{name:<29} {report['corpora'][name]['bytes'] / 1e6:>6.1f} {c['tokens']:>12,} {c['wall_s']:>8.1f} "
              f"{c['tokens_per_s']:>10,.0f} {c['peak_rss_mb']:>13.0f} {c['peak_main_rss_mb']:>9.0f} {c['max_processes']:>6}")
    ratio = report["peak_rss_ratio_large_to_small"]
    print(f"peak RSS large/small: {ratio:.3f} (must be <= {RSS_LIMIT_RATIO}: {'ok' if ratio <= RSS_LIMIT_RATIO else 'EXCEEDED'})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-mb", type=float, default=20.0)
    parser.add_argument("--large-mb", type=float, default=200.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="BlockStream --num-workers to time")
    parser.add_argument("--repeats", type=int, default=3, help="BlockStream passes per worker count (median)")
    parser.add_argument("--capture-workers", type=int, default=1, help="cache-teacher --num-workers")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--forward-batches", type=int, default=30)
    parser.add_argument("--interval", type=float, default=0.1, help="RSS sampling period, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="work folder to keep (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the caches in the work folder")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ingest_cpu.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="kdpipe-ingest-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpora = {name: make_corpus(work / f"{name}.jsonl", megabytes=mb, seed=args.seed + i)
                   for i, (name, mb) in enumerate((("small", args.small_mb), ("large", args.large_mb)))}
        teacher_dir = make_teacher(work / "teacher")

        import torch
        from kdpipe.pipeline.data import BlockStream, PackingSpec, resolve_source
        from kdpipe.pipeline.capture.teachers import load_hf_teacher

        teacher = load_hf_teacher(teacher_dir, device=torch.device("cpu"), dtype=torch.float32)
        spec = PackingSpec("causal-lm", args.seq_len, teacher.tokenizer)
        small = corpora["small"]["path"]
        rows = next(iter(BlockStream(resolve_source(small), spec))).rows  # the small corpus's first block
        runs, forwards = {w: [] for w in args.workers}, []
        for _ in range(args.repeats):  # interleaved, so drift (other jobs on the machine) hits all alike
            for w in args.workers:
                runs[w].append(time_stream(small, spec, w))
            forwards.append(time_forward(teacher, rows, batch_size=args.batch_size, batches=args.forward_batches))
        del teacher, rows

        captures = {name: run_capture(args, teacher_dir, c["path"], work / f"cache-{name}", work / f"capture-{name}.log")
                    for name, c in corpora.items()}

    median = lambda runs_, key: statistics.median(r[key] for r in runs_)
    report = {
        "benchmark": "ingest", "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "versions": versions(), "git": git_state(),
        "teacher": {"config": TINY_TEACHER, "tokenizer": str(TOKENIZER.relative_to(ROOT)), "dtype": "float32"},
        "corpora": corpora, "seq_len": args.seq_len, "batch_size": args.batch_size, "top_k": args.top_k,
        "repeats": args.repeats, "capture_workers": args.capture_workers,
        "data_path": {
            "corpus": "small", "tokens": runs[args.workers[0]][0]["tokens"],
            "by_workers": {str(w): {k: median(r, k) for k in ("tokens_per_s", "seconds", "first_block_s", "cpu_s")}
                           for w, r in runs.items()},
            "runs": {str(w): r for w, r in runs.items()},
        },
        "teacher_forward": {**{k: forwards[0][k] for k in ("batch", "batches", "warmup", "torch_threads")},
                            **{k: median(forwards, k) for k in ("tokens_per_s", "median_s", "cores_busy")},
                            "runs": forwards},
        "captures": captures,
        "peak_rss_ratio_large_to_small": captures["large"]["peak_rss_mb"] / captures["small"]["peak_rss_mb"],
        "peak_rss_limit_ratio": RSS_LIMIT_RATIO,
    }
    print_table(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
