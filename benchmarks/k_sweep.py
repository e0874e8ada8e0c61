"""How much of online KD a top-k cache keeps, by k (issue 15): the table behind the demo's default k.

    python benchmarks/k_sweep.py --work /tmp/k-sweep --seeds 0 1 2 --out benchmarks/results/k_sweep_cpu.json
    python benchmarks/k_sweep.py --work W --seeds 1 --skip-eval            # train one seed (e.g. one per core)
    python benchmarks/k_sweep.py --work W --seeds 0 1 2 --reuse-runs --out ...  # then score the finished runs
    python benchmarks/k_sweep.py --work W --steps 20 --k 8 16 --seeds 0 --out /tmp/smoke.json  # a quick check

On the shipped demo task (the settings of ``benchmarks/kd_targets.py``, which this script reuses: Llama
teacher ``data/teacher``, V = 2,048; Shakespeare training plays; student
``data/students/lm-student.json``; 800 steps of 16 x 128 tokens, lr 3e-3, warmup 20, alpha 0.9, T = 1,
forward KL) the same student is trained, per training seed (its initialisation and row order), with:

- ``top-K`` for each ``--k``: exact top-K targets, values quantized (the cache format's default);
- ``sampled`` and ``mixed``: ``--sample`` draws, and exact top-K + M tail draws (``--mixed K:M``),
  chosen to cost the bytes/token of the ``--budget-k`` top-k cache (found with ``kdpipe cache-teacher
  --dry-run --probe-rows 32``; the real captures are checked against a 10% band, and a miss is reported);
- ``online``: dense KD with the teacher in memory (:class:`kdpipe.pipeline.train.online_kd.OnlineKDTrainer`,
  reading the rows of the first top-k cache, so its rows and order are the cached students');
- ``hard-labels``: alpha = 0.

Every cache is captured at T = 1 only. Every student (and the teacher) is scored on the held-out play
by the library's ``evaluate_model(..., teacher=...)``, which is what ``kdpipe evaluate --cache C
--teacher T --json`` prints: ``ce``, ``kl_full`` (KL(teacher || student) over the full vocabulary at
T = 1, the teacher run on the rows), ``kl_topk_bins`` (the KL on the (k+1)-bin view of a top-32 held-out
cache: a lower bound of ``kl_full``) and ``top1_agreement``. Per variant the report gives mean, sd,
median and per-seed values, the CE gap to the online-KD student of the same seed (absolute and in % of
its CE) and the share of online KD's CE gain over hard labels that the variant loses.

The JSON report (command, machine, versions, git commit, settings, caches with their bytes/token, per
seed results, aggregates) goes to ``--out``, a Markdown table next to it (``.md``).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kd_targets  # noqa: E402  (the shared capture, training and report helpers)

from kdpipe.pipeline.evaluate.model import load_model  # noqa: E402
from kdpipe.pipeline.evaluate.run import evaluate_model  # noqa: E402

HELDOUT_K = 32  # the held-out cache whose (k+1)-bin KL is reported next to the full KL
METRICS = ("ce", "kl_full", "kl_topk_bins", "top1_agreement")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kd_targets.add_task_args(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--k", type=int, nargs="+", default=[32, 64, 128, 512], help="top-k of the cached students")
    p.add_argument("--values", default="quantized", help="--values of the top-k caches")
    p.add_argument("--budget-k", type=int, default=64, help="the top-k cache whose bytes/token sampled and mixed match")
    p.add_argument("--sample", type=int, default=120, help="draws per position of the sampled cache (0: none)")
    p.add_argument("--mixed", default="24:34", help="K:M, exact top-K plus M tail draws ('' : none)")
    p.add_argument("--heldout-rows", type=int, default=None, help="score only the first N held-out rows [default: all]")
    p.add_argument("--work", required=True, help="folder for caches and runs, kept (finished captures are reused)")
    p.add_argument("--reuse-runs", action="store_true", help="take finished runs in --work instead of training again")
    p.add_argument("--skip-eval", action="store_true", help="capture and train only (score later with --reuse-runs)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON report; the Markdown table goes next to it (.md)")
    return p.parse_args()


def cached_targets(args) -> list[kd_targets.Targets]:
    kinds = [kd_targets.Targets(f"top-{k}", f"cached top-{k}", k, args.values) for k in args.k]
    if args.sample:
        kinds.append(kd_targets.Targets("sampled", "sampled", 0, args.values, args.sample))
    if args.mixed:
        k, m = (int(x) for x in args.mixed.split(":"))
        kinds.append(kd_targets.Targets("mixed", "mixed (top-k + tail draws)", k, args.values, m))
    return kinds


def stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "median": statistics.median(values), "values": values}


def aggregate(per_seed: list[dict], online: list[dict] | None, hard: list[dict] | None) -> dict:
    """Mean, sd and median over seeds of each metric, and the paired (same-seed) CE gaps to online KD."""
    out = {key: stats([r[key] for r in per_seed]) for key in METRICS if all(key in r for r in per_seed)}
    if online is not None:
        out["ce_gap_to_online"] = stats([r["ce"] - o["ce"] for r, o in zip(per_seed, online)])
        out["ce_gap_to_online_pct"] = stats([100 * (r["ce"] / o["ce"] - 1) for r, o in zip(per_seed, online)])
        if hard is not None:
            gain = [h["ce"] - o["ce"] for h, o in zip(hard, online)]  # online KD's CE gain over hard labels
            out["share_of_kd_gain_lost"] = stats([(r["ce"] - o["ce"]) / g for r, o, g in zip(per_seed, online, gain)])
    return out


def fmt(stat: dict | None, digits: int = 3, signed: bool = False, unit: str = "") -> str:
    return kd_targets.fmt(stat, digits, signed, spread="sd", unit=unit)


def markdown(report: dict) -> str:
    s, n = report["settings"], len(report["settings"]["seeds"])
    lines = [
        f"Same student, {s['steps']} steps of {s['batch_size']} × {s['seq_len']} tokens, lr {s['lr']:g}, "
        f"α = {s['alpha']:g}, T = {s['temperature']:g}; held-out: {report['heldout_rows']} rows of the held-out play "
        f"({report['heldout_positions']:,} positions). Mean ± sd over {n} training seed{'s' if n > 1 else ''} "
        f"({', '.join(map(str, s['seeds']))}); the CE gap is paired by seed. `kl_topk_bins`: KL on the (k+1)-bin "
        f"view of a top-{HELDOUT_K} held-out cache (what `kdpipe evaluate` reports without `--teacher`: a lower bound); "
        "`kl_full`: over the full vocabulary (`kdpipe evaluate --teacher`).",
        "",
        "| student | bytes/token | held-out CE | CE gap to online KD | KL, (k+1)-bin view | full-vocabulary KL | top-1 agreement |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in report["variants"].values():
        a = v["aggregate"]
        bpt = f"{v['cache']['bytes_per_token']:.1f}" if v.get("cache") else v["bytes_note"]
        lines.append(f"| {v['label']} | {bpt} | {fmt(a['ce'])} | {fmt(a.get('ce_gap_to_online_pct'), 1, True, '%')} | "
                     f"{fmt(a['kl_topk_bins'])} | {fmt(a['kl_full'])} | {fmt(a['top1_agreement'])} |")
    t = report["teacher"]
    lines += [f"| teacher | — | {t['ce']:.3f} | — | {t['kl_topk_bins']:.3f} | {t['kl_full']:.3f} | {t['top1_agreement']:.3f} |",
              "", "```", report["command"], "```", ""]
    return "\n".join(lines)


def train_all(args, work: Path, kinds, caches: dict) -> dict:
    """Train every variant for every seed (or reuse finished runs); (variant, seed) -> training record."""
    first = f"top-{args.k[0]}"
    plans = [(k.name, caches[k.name]["path"], args.alpha, None) for k in kinds]
    teacher = load_model(args.teacher, device=torch.device(args.device)).module  # fp32, eval mode
    plans += [("online", caches[first]["path"], args.alpha, teacher), ("hard-labels", caches[first]["path"], 0.0, None)]
    runs = {}
    for seed in args.seeds:
        for name, cache, alpha, online_teacher in plans:
            print(f"training {name}, seed {seed} ...", flush=True)
            runs[name, seed] = kd_targets.train(args, cache=Path(cache), run_dir=work / f"run-{name}-s{seed}", seed=seed,
                                                alpha=alpha, teacher=online_teacher)
            print(f"  {runs[name, seed]['train_s']:.0f} s", flush=True)
    return runs


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started, work = time.perf_counter(), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    kinds, caches = cached_targets(args), {}
    for kind in kinds:
        print(f"capturing {kind.name} ({kind.settings_text()}) ...", flush=True)
        path = work / f"cache-{kind.name}"
        manifest, seconds = kd_targets.capture(args, data=args.train_data, out=path, top_k=kind.top_k,
                                               values=kind.values, sample=kind.sample)
        caches[kind.name] = {**kd_targets.cache_record(kind, manifest, seconds), "path": str(path)}
    heldout = work / f"cache-heldout-top{HELDOUT_K}"
    kd_targets.capture(args, data=args.heldout_data, out=heldout, top_k=HELDOUT_K, values="float16")
    runs = train_all(args, work, kinds, caches)
    if args.skip_eval:
        return
    print("evaluating on the held-out play ...", flush=True)
    score = dict(cache=str(heldout), teacher=args.teacher, device=args.device, max_rows=args.heldout_rows)
    teacher_row = evaluate_model(args.teacher, **score)
    for (name, seed), record in runs.items():
        record["heldout"] = evaluate_model(work / f"run-{name}-s{seed}" / "model", **score)
        h = record["heldout"]
        print(f"  {name} s{seed}: ce {h['ce']:.4f}, kl_full {h['kl_full']:.4f}, kl_topk_bins {h['kl_topk_bins']:.4f}",
              flush=True)
    names = [k.name for k in kinds] + ["online", "hard-labels"]
    results = {name: [runs[name, s]["heldout"] for s in args.seeds] for name in names}
    labels = {k.name: (k.label, k.settings_text()) for k in kinds}
    labels.update({"online": ("online dense KD", "teacher in memory, dense KL over the vocabulary"),
                   "hard-labels": ("hard labels", "α = 0")})
    budget = caches[f"top-{args.budget_k}"]["bytes_per_token"] if f"top-{args.budget_k}" in caches else None
    report = {
        "command": shlex.join(["python", *sys.argv]), "machine": kd_targets.machine(),
        "versions": kd_targets.versions(), "git": kd_targets.git_state(),
        "settings": {k: getattr(args, k) for k in ("teacher", "train_data", "heldout_data", "student", "seq_len",
                                                   "steps", "batch_size", "lr", "warmup", "alpha", "temperature",
                                                   "seeds", "k", "values", "budget_k", "sample", "mixed")},
        "budget": None if budget is None else {
            "bytes_per_token": budget, "tolerance": kd_targets.BYTES_TOLERANCE,
            "deviation": {n: caches[n]["bytes_per_token"] / budget - 1 for n in ("sampled", "mixed") if n in caches}},
        "heldout_rows": teacher_row["rows"], "heldout_positions": teacher_row["positions"], "teacher": teacher_row,
        "caches": caches,
        "variants": {name: {"label": labels[name][0], "settings": labels[name][1], "cache": caches.get(name),
                            "bytes_note": {"online": "— (teacher in memory)", "hard-labels": "0"}.get(name),
                            "runs": {str(s): runs[name, s] for s in args.seeds},
                            "aggregate": aggregate(results[name], results["online"], results["hard-labels"])}
                     for name in names},
        "wall_s": round(time.perf_counter() - started, 1),
        "timings_note": "train_s per run are wall-clock on a 2-core machine shared with other jobs: noisy",
    }
    print(markdown(report))
    if args.out:
        import json

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(report))
        print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
