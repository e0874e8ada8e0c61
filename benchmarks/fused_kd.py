"""The student's loss step with and without the fused lm-head + sparse KD loss: time and peak memory.

    python benchmarks/fused_kd.py                       # N = 8 x 128, H = 256, V = 151,936, k = 64, T = 2
    python benchmarks/fused_kd.py --rounds 1 --repeats 2 --out /tmp/fused.json

One step is the forward and backward of the loss from the student's last hidden states ``[N, H]`` and
its lm-head weight ``[V, H]`` (no transformer layers: the head and the loss are what differ), with
fresh ``.grad`` tensors every step (as after ``zero_grad(set_to_none=True)``). Variants:

- ``hard_ce``: ``logits = hidden @ W.T`` ([N, V]) and ``distillation_loss(..., alpha=0)`` (hard labels only);
- ``unfused_kd``: the same logits and ``distillation_loss(..., alpha=0.5)`` on cached top-k targets;
- ``fused_kd``: ``fused_linear_distillation_loss(..., alpha=0.5)`` (no [N, V] logits);
- ``fused_ce``: ``fused_linear_distillation_loss(..., alpha=0)``.

Each variant runs in a fresh subprocess (so peak RSS values do not mix): one warm-up step, then
``--repeats`` timed steps; ``--rounds`` rounds run the variants in turn, so drift (other jobs on the
machine) hits all alike. Reported: median step time, the process's peak RSS (``ru_maxrss``) and its
growth over the RSS just before the first step (inputs built), and both as ratios to ``hard_ce``.
Prints a table and writes everything, with the machine, versions and git commit, to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("hard_ce", "unfused_kd", "fused_kd", "fused_ce")


# ----------------------------------------------------------------------------- child: one variant
def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def run_child(args) -> dict:
    import torch
    import torch.nn.functional as F

    from kdpipe.pipeline.train.fused_kd import fused_linear_distillation_loss
    from kdpipe.pipeline.train.losses import distillation_loss

    torch.set_num_threads(args.threads)
    n, h, v, k, T = args.rows * args.seq_len, args.hidden, args.vocab, args.top_k, args.temperature
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=g)
    # distinct ids per row without any [N, V] tensor: a random start plus k distinct offsets, mod V
    ids = (torch.randint(0, v, (n, 1), generator=g) + torch.randperm(v, generator=g)[:k]) % v
    bins = torch.log_softmax(2.0 * torch.randn(n, k + 1, generator=g), dim=-1)  # teacher p~ at T
    top, tail = bins[:, :k].contiguous(), bins[:, k].contiguous()
    alpha = 0.0 if args.child in ("hard_ce", "fused_ce") else 0.5

    def step():
        hidden.grad = weight.grad = None
        if args.child.startswith("fused"):
            out = fused_linear_distillation_loss(hidden, weight, labels, ids, top, tail, alpha=alpha, temperature=T,
                                                 kind=args.kind, chunk_rows=args.chunk_rows)  # None: the library's default
        else:
            logits = F.linear(hidden, weight)  # [N, V]
            out = distillation_loss(logits, labels, ids, top, tail, alpha=alpha, temperature=T, kind=args.kind)
        out["loss"].backward()
        return out["loss"].item()

    rss_before = _rss_now()
    loss = step()  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": args.child, "alpha": alpha, "loss": loss, "times_s": times, "rss_before_step_bytes": rss_before,
            "peak_rss_bytes": peak, "peak_growth_bytes": peak - rss_before,
            "chunk_rows": (args.chunk_rows or "library default") if args.child.startswith("fused") else None}


# ----------------------------------------------------------------------------- parent
def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
    return {"cpu_count": os.cpu_count(), "cpu_model": model, "ram_gib": round(mem_kb / 2**20, 1),
            "python": platform.python_version(), "platform": platform.platform()}


def git_state() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def child_command(args, variant: str) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant]
    for name in ("rows", "seq_len", "hidden", "vocab", "top_k", "temperature", "kind", "repeats", "threads"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.chunk_rows:
        cmd += ["--chunk-rows", str(args.chunk_rows)]
    return cmd


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--kind", default="forward-kl")
    parser.add_argument("--chunk-rows", type=int, default=None, help="fused chunk (default: the library's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per subprocess")
    parser.add_argument("--rounds", type=int, default=2, help="subprocesses per variant, run in turn")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fused_kd_cpu.json"))
    parser.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
        return

    import torch

    variants = [v for v in args.variants.split(",") if v]
    runs = {v: [] for v in variants}
    load_before = os.getloadavg()
    for r in range(args.rounds):
        for variant in variants:
            proc = subprocess.run(child_command(args, variant), cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} {variant}: {statistics.median(runs[variant][-1]['times_s']):.3f} s/step",
                  file=sys.stderr)
    summary = {}
    for variant, rs in runs.items():
        times = [t for run in rs for t in run["times_s"]]
        summary[variant] = {"step_s": statistics.median(times), "step_s_min": min(times),
                            "peak_rss_gb": max(run["peak_rss_bytes"] for run in rs) / 1e9,
                            "peak_growth_gb": max(run["peak_growth_bytes"] for run in rs) / 1e9,
                            "loss": rs[0]["loss"], "chunk_rows": rs[0]["chunk_rows"]}
    base = summary.get("hard_ce")
    if base:
        for s in summary.values():
            s["time_vs_hard_ce"] = s["step_s"] / base["step_s"]
            s["peak_rss_vs_hard_ce"] = s["peak_rss_gb"] / base["peak_rss_gb"]
            s["peak_growth_vs_hard_ce"] = s["peak_growth_gb"] / base["peak_growth_gb"]
    report = {
        "benchmark": "fused_kd",
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "versions": {"torch": torch.__version__}, "git": git_state(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "shape": {"N": args.rows * args.seq_len, "batch": f"{args.rows}x{args.seq_len}", "H": args.hidden,
                  "V": args.vocab, "k": args.top_k, "T": args.temperature, "kind": args.kind},
        "threads": args.threads, "repeats": args.repeats, "rounds": args.rounds,
        "summary": summary, "runs": runs,
    }
    print(f"\nN={args.rows}x{args.seq_len} H={args.hidden} V={args.vocab:,} k={args.top_k} T={args.temperature} "
          f"{args.kind}, {args.threads} threads, median of {args.rounds}x{args.repeats} steps "
          f"(load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after)")
    print(f"{'variant':>11} {'alpha':>5} {'step s':>8} {'vs hard_ce':>10} {'peak RSS GB':>12} {'growth GB':>10} {'vs hard_ce':>10}")
    for variant, s in summary.items():
        print(f"{variant:>11} {runs[variant][0]['alpha']:>5} {s['step_s']:>8.3f} {s.get('time_vs_hard_ce', float('nan')):>9.2f}x "
              f"{s['peak_rss_gb']:>12.2f} {s['peak_growth_gb']:>10.2f} {s.get('peak_growth_vs_hard_ce', float('nan')):>9.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
