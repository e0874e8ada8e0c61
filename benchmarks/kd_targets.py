"""What each kind of cached teacher target buys at equal bytes per token (issue 11, "What it buys").

    python benchmarks/kd_targets.py --out benchmarks/results/kd_targets_cpu.json
    python benchmarks/kd_targets.py --seeds 0 1 --out ...          # two training seeds: mean and spread
    python benchmarks/kd_targets.py --steps 20 --out /tmp/smoke.json  # a quick check that it all runs

On the shipped demo task (Llama teacher ``data/teacher``, V = 2,048; Shakespeare training plays;
student ``data/students/lm-student.json``; 128-token rows, batch 16, lr 3e-3, warmup 20, alpha 0.9,
T = 1, forward KL) the same student is trained for the same steps, from the same initialisation, on
the same rows in the same order, with each of these targets:

- ``topk-fp16``: exact top-k, values stored as float16 (``--values float16``);
- ``topk-quantized``: exact top-k, values on the 1/16-nat grid (``--values quantized``, the default
  format), with a larger k at the same bytes;
- ``sampled``: N draws per position from the teacher (``--sample N``, no top-k), trained with the
  unbiased estimator;
- ``mixed``: exact top-k plus M draws from the tail (``--top-k k --sample M``);
- ``online``: the reference: the teacher in memory, dense forward KL over all 2,048 tokens
  (``kdpipe.pipeline.train.online_kd.OnlineKDTrainer``, the library's ``Trainer`` on the ``topk-fp16`` cache,
  so its rows, order, schedule, clipping and initialisation are those of the cached runs, with the loss
  replaced by ``alpha * dense_kd_loss(student, teacher(batch["input_ids"])) + (1 - alpha) * CE``);
- ``hard-labels``: alpha = 0 (no teacher at all), same rows and order.

The four caches are captured at T = 1 only (training uses T = 1) with k / N / M chosen so that their
measured bytes/token (the manifest's ``totals.bytes_per_token`` of the full capture, zarr) lie within
10% of each other; the defaults below were found with ``kdpipe cache-teacher --dry-run
--probe-rows 32`` and the script checks the real captures against the 10% band (a miss is reported,
not hidden). The draws are seeded (capture seed 0) and do not change with ``--seeds``; a training
seed sets the student's initialisation and the row order of every variant alike.

Every student is then scored on all rows of the held-out play (``data/shakespeare/heldout``, packed
as ``cache-teacher`` packs it: 128-token rows, in a top-32 held-out cache) by ``kdpipe evaluate --cache
HELDOUT --teacher TEACHER`` (the library's ``evaluate_model``), the teacher run on the same rows, at T = 1:

- ``ce``: hard-label cross-entropy (nats per predicted token);
- ``kl_full``: KL(teacher || student) over the full vocabulary, per position, mean over positions;
- ``top1_agreement``: student argmax == teacher argmax;
- ``kl_sparse_lower_bound`` (JSON only): evaluate's ``kl_topk_bins``, the KL on the top-32 held-out
  cache's (k+1)-bin view, a lower bound of ``kl_full``.

Writes the JSON report (command, machine, versions, git commit, settings, caches with their measured
bytes/token, per-seed and aggregated results) to ``--out`` and a Markdown table next to it (same
name, ``.md``). Timings in it are wall-clock and noisy on a shared machine; the quality numbers are
what it is for. The interpretation paragraph of the committed ``.md`` is written by hand afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from kdpipe.pipeline.capture import CaptureSettings, finished_capture, plan_capture, run_capture, with_teacher_weights
from kdpipe.pipeline.train.dataset import CacheDataset
from kdpipe.pipeline.evaluate.run import evaluate_model
from kdpipe.pipeline.evaluate.model import load_model
from kdpipe.pipeline.train.online_kd import OnlineKDTrainer
from kdpipe.pipeline.train.trainer import Trainer
from kdpipe.pipeline.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
BYTES_TOLERANCE = 0.10  # bytes/token of every cache within 10% of the top-k fp16 one


@dataclasses.dataclass(frozen=True)
class Targets:
    """One kind of cached target: its capture settings (top_k = 0: sampled only)."""
    name: str
    label: str
    top_k: int
    values: str
    sample: int = 0

    def settings_text(self) -> str:
        head = f"top-{self.top_k} {self.values}" if self.top_k else ""
        draws = f"{self.sample} draws" + (" from the tail" if self.top_k else "") if self.sample else ""
        return " + ".join(part for part in (head, draws) if part)


def add_task_args(p: argparse.ArgumentParser) -> None:
    """The demo task's settings (teacher, data, student, rows, training schedule), shared with k_sweep.py."""
    p.add_argument("--teacher", default=str(DATA / "teacher"))
    p.add_argument("--train-data", default=str(DATA / "shakespeare" / "train"))
    p.add_argument("--heldout-data", default=str(DATA / "shakespeare" / "heldout"))
    p.add_argument("--student", default=str(DATA / "students" / "lm-student.json"))
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=800, help="optimizer steps of every student (the demo's 800)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=1.0)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_args(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (student init and row order)")
    p.add_argument("--fp16-k", type=int, default=16, help="top-k of the float16 cache: sets the byte budget")
    p.add_argument("--quantized-k", type=int, default=30, help="top-k of the quantized cache")
    p.add_argument("--sample", type=int, default=40, help="draws per position of the sampled cache")
    p.add_argument("--mixed", default="12:14", help="K:M, exact top-K plus M draws from the tail")
    p.add_argument("--variants", nargs="+", default=None,
                   help="run only these (topk-fp16 topk-quantized sampled mixed online hard-labels)")
    p.add_argument("--heldout-rows", type=int, default=None, help="score only the first N held-out rows [default: all]")
    p.add_argument("--work", default=None, help="folder for caches and runs, kept (finished captures are reused); "
                   "default: a temporary folder, removed at the end")
    p.add_argument("--reuse-runs", action="store_true",
                   help="with --work: take a finished run-NAME-sSEED from an earlier invocation instead of training it "
                        "again (its wall time from its run.json; its row order recomputed as the Trainer makes it)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON report; the Markdown table goes next to it (.md)")
    return p.parse_args()


def target_kinds(args) -> list[Targets]:
    mixed_k, mixed_m = (int(x) for x in args.mixed.split(":"))
    return [
        Targets("topk-fp16", "top-k, fp16 values", args.fp16_k, "float16"),
        Targets("topk-quantized", "top-k, quantized values", args.quantized_k, "quantized"),
        Targets("sampled", "sampled", 0, "quantized", args.sample),
        Targets("mixed", "mixed (top-k + tail draws)", mixed_k, "quantized", mixed_m),
    ]


# ----------------------------------------------------------------------------- captures
def capture(args, *, data: str, out: Path, top_k: int, values: str, sample: int = 0) -> tuple[dict, float]:
    """Capture (or reuse a finished capture in ``out``); returns its manifest and the seconds it took."""
    settings = CaptureSettings(teacher=args.teacher, data=data, out=str(out), top_k=top_k, temperatures=(1.0,),
                               seq_len=args.seq_len, batch_size=32, device=args.device, value_dtype=values,
                               sample=sample, seed=0)
    started = time.perf_counter()
    plan = plan_capture(settings, load_weights=False)
    manifest = finished_capture(plan) or run_capture(with_teacher_weights(plan))
    return manifest, time.perf_counter() - started


def cache_record(kind: Targets, manifest: dict, seconds: float) -> dict:
    t = manifest["totals"]
    return {"targets": kind.name, "top_k": kind.top_k, "values": kind.values, "draws": kind.sample,
            "temperatures": [1.0], "bytes_per_token": t["bytes_per_token"], "bytes": t["bytes"], "rows": t["rows"],
            "tokens": t["tokens"], "shards": t["shards"], "capture_s": round(seconds, 1)}


# ----------------------------------------------------------------------------- training
def reused_run(args, *, cache: Path, run_dir: Path, seed: int, alpha: float) -> dict | None:
    """The training record of a finished run left in ``run_dir`` by an earlier invocation (``--reuse-runs``)."""
    record = run_dir / "run.json"
    if not args.reuse_runs or not record.is_file():
        return None
    run = json.loads(record.read_text())
    if run.get("status") != "finished" or run.get("total_steps") != args.steps:
        return None
    settings = run.get("resolved_settings") or {}
    expected = {"cache": str(cache), "seed": seed, "alpha": alpha, "lr": args.lr, "batch_size": args.batch_size, "warmup": args.warmup,
                "temperature": args.temperature, "student": args.student}
    differing = [k for k, v in expected.items() if k in settings and settings[k] != v]
    if differing or not settings:
        raise SystemExit(f"--reuse-runs: {run_dir} was trained with other settings ({', '.join(differing) or 'none recorded'}); "
                         "remove it or use another --work")
    ds = CacheDataset(str(cache), batch_size=args.batch_size, seed=seed, shuffle_window=TrainConfig.shuffle_buffer,
                      rank=0, world_size=1)  # the Trainer's training set (eval_fraction 0: every row)
    order = ds.order()
    rows = np.concatenate([ds.batch_rows(order, b) for b in range(ds.batches_per_epoch)]).astype(np.int64)
    import hashlib
    from datetime import datetime

    seconds = (datetime.fromisoformat(run["finished_at"]) - datetime.fromisoformat(run["started_at"])).total_seconds()
    final = run["final_train_metrics"]
    return {"train_s": round(seconds, 1), "final_train_loss": final["loss"], "final_train_kd": final["kd"],
            "final_train_ce": final["ce"], "loss_implementation": run["loss_implementation"],
            "order": f"{len(rows)} rows, sha256 {hashlib.sha256(rows.tobytes()).hexdigest()[:16]}, first {rows[:4].tolist()}",
            "reused": True}


def train(args, *, cache: Path, run_dir: Path, seed: int, alpha: float, teacher=None, trainer_class=None) -> dict:
    """Train one student (or take the finished run, ``--reuse-runs``): the library's ``Trainer``
    (fused head + loss), ``OnlineKDTrainer`` given ``teacher``, or ``trainer_class`` (unfused) given one."""
    reused = reused_run(args, cache=cache, run_dir=run_dir, seed=seed, alpha=alpha)
    if reused is not None:
        return reused
    shutil.rmtree(run_dir, ignore_errors=True)
    config = TrainConfig(cache=str(cache), student=args.student, out=str(run_dir), device=args.device,
                         steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                         alpha=alpha, temperature=args.temperature, seed=seed, eval_fraction=0.0, eval_every=0,
                         checkpoint_every=0, fused_loss=teacher is None and trainer_class is None)
    config.validate()
    if teacher is not None:
        trainer = OnlineKDTrainer(config, teacher)
    else:
        trainer = (trainer_class or Trainer)(config)
    started = time.perf_counter()
    trainer.setup()
    try:
        order = first_epoch_order(trainer)
        final = trainer.fit()
        trainer.finish(final)
    finally:
        trainer.close()
    return {"train_s": round(time.perf_counter() - started, 1), "final_train_loss": final["loss"],
            "final_train_kd": final["kd"], "final_train_ce": final["ce"], "loss_implementation": trainer.loss_implementation,
            "order": order}


def first_epoch_order(trainer: Trainer) -> str:
    """A digest of the first epoch's row numbers in the order training reads them (the caches number
    the same packed rows alike: same data, same seq_len, one shard each)."""
    import hashlib

    ds, order = trainer.train_set, trainer.train_set.order()
    rows = np.concatenate([ds.batch_rows(order, b) for b in range(ds.batches_per_epoch)]).astype(np.int64)
    return f"{len(rows)} rows, sha256 {hashlib.sha256(rows.tobytes()).hexdigest()[:16]}, first {rows[:4].tolist()}"


# ----------------------------------------------------------------------------- evaluation
def evaluate_full(model_dir, teacher_dir: str, heldout_cache: Path, max_rows: int | None, device: str) -> dict:
    """CE, full-vocabulary KL(teacher || student), top-1 agreement and the cache's (k+1)-bin KL of one
    model on the held-out cache's rows: ``kdpipe evaluate --cache C --teacher T``."""
    lib = evaluate_model(model_dir, cache=str(heldout_cache), teacher=teacher_dir, device=device, max_rows=max_rows)
    return {"ce": lib["ce"], "kl_full": lib["kl_full"], "top1_agreement": lib["top1_agreement"],
            "kl_sparse_lower_bound": lib["kl_topk_bins"], "ce_positions": lib["tokens"],
            "kd_positions": lib["positions"], "heldout_rows": lib["rows"]}


# ----------------------------------------------------------------------------- report
def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), platform.processor())
    return {"cpu_count": os.cpu_count(), "cpu_model": model, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform()}


def versions() -> dict:
    import transformers
    from importlib.metadata import version

    return {"kdpipe": version("kdpipe"), "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__}


def git_state() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def aggregate(per_seed: list[dict], online: list[dict] | None) -> dict:
    """Mean and spread (half the range over seeds; 0 for one seed) of each metric, and the CE gap to online KD."""
    out = {}
    keys = ["ce", "kl_full", "top1_agreement", "kl_sparse_lower_bound"]
    series = {k: [r[k] for r in per_seed] for k in keys}
    if online is not None:
        series["ce_gap_to_online"] = [r["ce"] - o["ce"] for r, o in zip(per_seed, online)]
    for key, values in series.items():
        out[key] = {"mean": statistics.fmean(values), "spread": (max(values) - min(values)) / 2, "values": values}
    return out


def fmt(stat: dict | None, digits: int = 3, signed: bool = False, *, spread: str = "spread", unit: str = "") -> str:
    """``mean ± stat[spread]`` (the spread only over several seeds), each followed by ``unit``."""
    if stat is None:
        return "—"
    sign = "+" if signed else ""
    text = f"{stat['mean']:{sign}.{digits}f}{unit}"
    return text + (f" ± {stat[spread]:.{digits}f}{unit}" if len(stat["values"]) > 1 else "")


def markdown(report: dict) -> str:
    s = report["settings"]
    seeds = s["seeds"]
    lines = [
        f"Same student (`{Path(s['student']).name}`), {s['steps']} steps of {s['batch_size']} × {s['seq_len']} tokens, "
        f"lr {s['lr']:g}, warmup {s['warmup']}, α = {s['alpha']:g}, T = {s['temperature']:g}, forward KL, the same "
        f"rows in the same order for every variant; held-out: all {report['heldout_rows']} rows of the held-out play "
        f"({report['heldout_kd_positions']:,} positions), KL to the teacher over the full {report['vocab']:,}-token "
        f"vocabulary at T = 1. "
        + (f"Mean ± half the range over training seeds {', '.join(map(str, seeds))}." if len(seeds) > 1 else
           f"One training seed ({seeds[0]})."),
        "",
        "| targets | settings | bytes/token | held-out CE | full KL to teacher | top-1 agreement | CE gap to online KD |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, v in report["variants"].items():
        agg = v["aggregate"]
        bpt = f"{v['cache']['bytes_per_token']:.1f}" if v.get("cache") else v["bytes_note"]
        lines.append(f"| {v['label']} | {v['settings']} | {bpt} | {fmt(agg['ce'])} | {fmt(agg['kl_full'])} | "
                     f"{fmt(agg['top1_agreement'])} | {fmt(agg.get('ce_gap_to_online'), signed=True)} |")
    t = report["teacher"]
    lines.append(f"| teacher (reference) | — | — | {t['ce']:.3f} | 0 | 1 | — |")
    lines += ["", f"Byte budget: {report['budget']['bytes_per_token']:.1f} B/token (the top-{s['fp16_k']} fp16 cache), "
              f"every cache within {report['budget']['max_deviation'] * 100:.1f}% of it "
              f"({'inside' if report['budget']['within_tolerance'] else 'OUTSIDE'} the ±{BYTES_TOLERANCE:.0%} band).",
              "", "```", report["command"], "```", ""]
    return "\n".join(lines)


def main():
    args = parse_args()
    wall = time.perf_counter()
    kinds = target_kinds(args)
    wanted = set(args.variants or ["topk-fp16", "topk-quantized", "sampled", "mixed", "online", "hard-labels"])
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="kd-targets-")
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        caches, cache_paths = {}, {}
        for kind in kinds:
            if kind.name not in wanted and not (kind.name == "topk-fp16" and wanted & {"online", "hard-labels"}):
                continue
            path = work / f"cache-{kind.name}"
            print(f"capturing {kind.name} ({kind.settings_text()}) ...", flush=True)
            manifest, seconds = capture(args, data=args.train_data, out=path, top_k=kind.top_k, values=kind.values,
                                        sample=kind.sample)
            caches[kind.name], cache_paths[kind.name] = cache_record(kind, manifest, seconds), path
            print(f"  {caches[kind.name]['bytes_per_token']:.1f} B/token, {seconds:.0f} s", flush=True)
        heldout = work / "cache-heldout-top32"
        print("capturing the held-out play (top-32 fp16, for kdpipe evaluate's lower bound) ...", flush=True)
        capture(args, data=args.heldout_data, out=heldout, top_k=32, values="float16")
        timings = {"captures": round(time.perf_counter() - wall, 1)}  # the four training caches and the held-out one
        budget = caches["topk-fp16"]["bytes_per_token"]
        deviation = max(abs(c["bytes_per_token"] / budget - 1) for c in caches.values())
        if deviation > BYTES_TOLERANCE:
            print(f"warning: cache bytes/token differ from the budget by up to {deviation:.1%}", flush=True)

        teacher_module = None
        if "online" in wanted:
            teacher_module = load_model(args.teacher, device=torch.device(args.device)).module  # fp32, eval mode
        runs = {}  # (variant, seed) -> training record
        plans = [(k.name, cache_paths[k.name], args.alpha, None) for k in kinds if k.name in wanted]
        if "online" in wanted:
            plans.append(("online", cache_paths["topk-fp16"], args.alpha, teacher_module))
        if "hard-labels" in wanted:
            plans.append(("hard-labels", cache_paths["topk-fp16"], 0.0, None))
        for seed in args.seeds:
            for name, cache, alpha, teacher in plans:
                print(f"training {name}, seed {seed} ...", flush=True)
                runs[name, seed] = train(args, cache=cache, run_dir=work / f"run-{name}-s{seed}", seed=seed,
                                         alpha=alpha, teacher=teacher)
                print(f"  {runs[name, seed]['train_s']:.0f} s, final train loss {runs[name, seed]['final_train_loss']:.4f}",
                      flush=True)
        orders = {seed: sorted({r["order"] for (n, s), r in runs.items() if s == seed}) for seed in args.seeds}
        same_order = all(len(seen) == 1 for seen in orders.values())

        timings["training"] = round(sum(r["train_s"] for r in runs.values()), 1)
        timings["training_per_seed"] = {str(seed): round(sum(r["train_s"] for (n, s), r in runs.items() if s == seed), 1)
                                        for seed in args.seeds}
        evaluation_started = time.perf_counter()
        print("evaluating on the held-out play ...", flush=True)
        for (name, seed), record in runs.items():
            result = evaluate_full(work / f"run-{name}-s{seed}" / "model", args.teacher, heldout, args.heldout_rows,
                                   args.device)
            record["heldout"] = result
            print(f"  {name} s{seed}: ce {result['ce']:.4f}, kl_full {result['kl_full']:.4f} "
                  f"(lower bound {result['kl_sparse_lower_bound']:.4f}), top-1 {result['top1_agreement']:.4f}", flush=True)
        teacher_row = evaluate_full(args.teacher, args.teacher, heldout, args.heldout_rows, args.device)

        timings["evaluation"] = round(time.perf_counter() - evaluation_started, 1)
        online = [runs["online", s]["heldout"] for s in args.seeds] if "online" in wanted else None
        labels = {k.name: (k.label, k.settings_text()) for k in kinds}
        labels["online"] = ("online KD (teacher in memory)", "dense KL over all 2,048 tokens")
        labels["hard-labels"] = ("hard labels only", "α = 0")
        variants = {}
        for name, _, _, _ in plans:
            per_seed = [runs[name, s]["heldout"] for s in args.seeds]
            variants[name] = {
                "label": labels[name][0], "settings": labels[name][1],
                "cache": caches.get(name) if name not in ("online", "hard-labels") else None,
                "bytes_note": {"online": "— (teacher in memory)", "hard-labels": "0"}.get(name),
                "trained_from_cache": "topk-fp16" if name in ("online", "hard-labels") else name,
                "runs": {str(s): runs[name, s] for s in args.seeds},
                "aggregate": aggregate(per_seed, online),
            }
        first = next(iter(runs.values()))["heldout"]
        report = {
            "command": shlex.join(["python", *sys.argv]), "machine": machine(), "versions": versions(),
            "git": git_state(),
            "settings": {"teacher": args.teacher, "train_data": args.train_data, "heldout_data": args.heldout_data,
                         "student": args.student, "seq_len": args.seq_len, "steps": args.steps,
                         "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup, "alpha": args.alpha,
                         "temperature": args.temperature, "loss": "forward-kl", "seeds": args.seeds,
                         "capture_temperatures": [1.0], "capture_seed": 0, "fp16_k": args.fp16_k,
                         "quantized_k": args.quantized_k, "sample": args.sample, "mixed": args.mixed},
            "budget": {"bytes_per_token": budget, "max_deviation": deviation, "tolerance": BYTES_TOLERANCE,
                       "within_tolerance": deviation <= BYTES_TOLERANCE,
                       "how": "defaults from kdpipe cache-teacher --dry-run --probe-rows 32; bytes here are the "
                              "full captures' manifests (totals.bytes_per_token)"},
            "same_row_order_in_every_variant": same_order, "row_order_per_seed": {str(s): seen for s, seen in orders.items()},
            "heldout_rows": first["heldout_rows"], "heldout_kd_positions": first["kd_positions"],
            "heldout_ce_positions": first["ce_positions"], "vocab": 2048,
            "teacher": teacher_row, "caches": caches, "variants": variants,
            "timings_s": timings, "wall_s": round(time.perf_counter() - wall, 1),
            "timings_note": "wall-clock on a 2-core machine shared with other jobs: noisy",
        }
    finally:
        if tmp is not None:
            tmp.cleanup()
    text = json.dumps(report, indent=1)
    print(markdown(report))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        out.with_suffix(".md").write_text(markdown(report))
        print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
