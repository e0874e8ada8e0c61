"""Which setting makes the MNIST classification demo show a KD gain beyond seed noise (issue 28, item 1).

    W="--work /tmp/classification-demo-sweep --seeds 0 1 2"; R=benchmarks/results
    python benchmarks/classification_demo.py $W --rows 500 1000 2000 --out $R/classification_demo_rows_cpu.json
    python benchmarks/classification_demo.py $W --rows 500 --T 2 4 8 --alpha 0.5 0.9 \
        --out $R/classification_demo_grid_cpu.json
    python benchmarks/classification_demo.py $W --rows 250 500 --students cnn_student_small cnn_student \
        --out $R/classification_demo_size_cpu.json
    python benchmarks/classification_demo.py $W --rows 500 --steps 150 300 600 \
        --out $R/classification_demo_steps_cpu.json
    python benchmarks/classification_demo.py --work /tmp/demo-threads --demo-threads 2 1 \
        --out $R/classification_demo_threads_cpu.json      # the demo itself, with OMP_NUM_THREADS=2 then 1

(defaults: T = 4, alpha = 0.9, 300 steps, the 6,274-parameter ``cnn_student``). A finished run (its
``scores.json``) is reused, so a later invocation over runs already made only collects them.

The task is the demo's: ResNet teacher ``data/mnist_models.py:resnet_teacher`` with the shipped weights,
cached over the first ``--rows`` digits of ``data/mnist/train.npz`` (``cache-teacher --limit-rows``; the
file is shuffled across classes) with all 10 classes (k = V: cached KD is dense KD), at T = 1 and every
``--T``; the held-out cache is all 1,000 digits of ``data/mnist/heldout.npz``. Every student is trained by
the library's :class:`~kdpipe.pipeline.train.trainer.Trainer` (what ``kdpipe train-student`` and the
demo run) for ``--steps`` steps of batch ``--batch-size`` (AdamW lr 1e-2, 10 warmup steps, cosine to
0.1x, no clipping), with seed s setting both the student's initialisation and the data order; the KD
student with ``--T`` and ``--alpha`` (loss ``alpha * T^2 * KL + (1 - alpha) * CE``), the hard-label
student with alpha = 0 and the same seed, so each seed gives a paired gain. Each student is scored on the
held-out cache by ``evaluate_model`` (what ``kdpipe evaluate`` prints: accuracy, macro-F1, ECE, KL to the
teacher) and by the trainer's last evaluation (held-out CE).

Per KD setting the report gives per-seed numbers, mean and sd (n - 1) over seeds of both students, the
per-seed gain (KD minus hard-label accuracy on the same seed) with its mean and sd, and the ranking
score mean gain / sd of the gains. ``--threads`` is the number of torch intra-op threads (default 1):
the sweep is run with one, so its numbers do not depend on how many cores the machine had.
``--demo-threads`` instead runs ``kdpipe demo --task classification`` once per thread count (a
subprocess each, ``OMP_NUM_THREADS`` set) and records its results and whether the quality numbers agree.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kd_targets import git_state, machine, versions  # noqa: E402  (the shared report helpers)

from kdpipe.pipeline.capture import (  # noqa: E402
    CaptureSettings,
    finished_capture,
    plan_capture,
    run_capture,
    with_teacher_weights,
)
from kdpipe.pipeline.demo import mean_sd, paired_gain  # noqa: E402
from kdpipe.pipeline.evaluate.run import evaluate_model  # noqa: E402
from kdpipe.pipeline.train.config import TrainConfig  # noqa: E402
from kdpipe.pipeline.train.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
TEACHER, WEIGHTS = f"{DATA / 'mnist_models.py'}:resnet_teacher", str(DATA / "mnist" / "teacher.safetensors")
TRAIN_NPZ, HELDOUT_NPZ = str(DATA / "mnist" / "train.npz"), str(DATA / "mnist" / "heldout.npz")
QUALITY = ("accuracy", "ce", "ece", "kl_full", "macro_f1")  # what a run is scored on


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/classification-demo-sweep"), help="caches and runs")
    p.add_argument("--rows", type=int, nargs="+", default=[1000], help="training digits (first N of train.npz)")
    p.add_argument("--students", nargs="+", default=["cnn_student"], help="factories in data/mnist_models.py")
    p.add_argument("--T", type=float, nargs="+", default=[4.0], help="KD temperatures")
    p.add_argument("--alpha", type=float, nargs="+", default=[0.9], help="KD weights")
    p.add_argument("--steps", type=int, nargs="+", default=[300])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the sweep")
    p.add_argument("--demo-threads", type=int, nargs="+", help="run the demo once per thread count instead")
    p.add_argument("--out", type=Path, required=True, help="the JSON report")
    return p.parse_args()


def capture(work: Path, *, rows: int | None, temperatures: tuple[float, ...]) -> Path:
    """The teacher cache of the first ``rows`` training digits (None: the held-out digits), reused when finished."""
    split = "cache-heldout" if rows is None else f"cache-train-{rows}"
    name = split + "-T" + "-".join(map("{:g}".format, temperatures))  # one cache per set of temperatures
    settings = CaptureSettings(teacher=TEACHER, weights=WEIGHTS, out=str(work / name), limit_rows=rows,
                               data=HELDOUT_NPZ if rows is None else TRAIN_NPZ, top_k=10, temperatures=temperatures,
                               seq_len=1, batch_size=256, device="cpu")
    plan = plan_capture(settings, load_weights=False)
    if finished_capture(plan) is None:
        run_capture(with_teacher_weights(plan))
    return Path(settings.out)


def train_and_score(run_dir: Path, *, cache: Path, heldout: Path, student: str, steps: int,
                    batch_size: int, seed: int, temperature: float, alpha: float) -> dict:
    """One student trained from ``cache`` and scored on ``heldout`` (reused when ``run_dir`` holds its scores)."""
    scores_file = run_dir / "scores.json"
    if scores_file.is_file():
        return json.loads(scores_file.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    config = TrainConfig(cache=str(cache), data=TRAIN_NPZ, eval_cache=str(heldout), eval_data=HELDOUT_NPZ,
                         student=f"{DATA / 'mnist_models.py'}:{student}", out=str(run_dir), device="cpu",
                         steps=steps, batch_size=batch_size, lr=1e-2, clip=0.0, warmup=10, eval_every=steps,
                         eval_rows=1000, checkpoint_every=0, seed=seed, alpha=alpha, temperature=temperature)
    config.validate()
    started = time.perf_counter()
    trainer = Trainer(config)
    trainer.setup()
    try:
        run = trainer.finish(trainer.fit())
    finally:
        trainer.close()
    train_s = time.perf_counter() - started
    scored = evaluate_model(run_dir / "model", data=HELDOUT_NPZ, cache=str(heldout), device="cpu", batch_size=500)
    scores = {key: scored[key] for key in ("accuracy", "ece", "kl_full", "macro_f1")}
    scores.update(ce=run["final_eval_metrics"]["ce"], train_s=round(train_s, 1), threads=torch.get_num_threads())
    scores_file.write_text(json.dumps(scores))
    return scores


def summarize(kd: list[dict], hard: list[dict]) -> dict:
    """Both students' metrics over seeds and the paired accuracy gain (KD minus hard labels, same seed),
    judged by the demo's own rule (:func:`kdpipe.pipeline.demo.paired_gain`)."""
    out = {f"{name}_{key}": mean_sd([run[key] for run in runs]) for name, runs in (("kd", kd), ("hard", hard))
           for key in QUALITY}
    gain = paired_gain([run["accuracy"] for run in kd], [run["accuracy"] for run in hard])
    out["accuracy_gain"] = {key: gain[key] for key in ("mean", "sd", "per_seed")}
    out["gain_exceeds_spread"] = gain["exceeds_spread"]
    out["score"] = gain["mean"] / gain["sd"] if gain["sd"] > 0 else float("inf") * (1 if gain["mean"] > 0 else -1)
    return out


def sweep(args) -> dict:
    torch.set_num_threads(args.threads)
    work = args.work / f"threads-{args.threads}"
    temperatures = tuple(sorted({1.0, *args.T}))
    heldout = capture(args.work, rows=None, temperatures=temperatures)
    settings = []
    for rows, student, steps in itertools.product(args.rows, args.students, args.steps):
        cache = capture(args.work, rows=rows, temperatures=temperatures)
        common = dict(cache=cache, heldout=heldout, student=student, steps=steps, batch_size=args.batch_size)
        base = f"rows{rows}-{student}-steps{steps}"
        hard = [train_and_score(work / base / f"hard-seed{seed}", seed=seed, temperature=1.0, alpha=0.0,
                                **common) for seed in args.seeds]
        for t, alpha in itertools.product(args.T, args.alpha):
            kd = [train_and_score(work / base / f"kd-T{t:g}-alpha{alpha:g}-seed{seed}", seed=seed,
                                  temperature=t, alpha=alpha, **common) for seed in args.seeds]
            train_s = [run["train_s"] for run in kd + hard]
            settings.append({"rows": rows, "student": student, "steps": steps, "T": t, "alpha": alpha,
                             **summarize(kd, hard), "train_s_per_run": sum(train_s) / len(train_s),
                             "runs": {"kd": kd, "hard": hard}})
            print(_line(settings[-1]), flush=True)
    settings.sort(key=lambda s: s["score"], reverse=True)
    return {"settings": settings, "best": settings[0] if settings else None}


def _line(s: dict) -> str:
    kd, hard, gain = s["kd_accuracy"], s["hard_accuracy"], s["accuracy_gain"]
    return (f"rows {s['rows']:5d} {s['student']:<18} steps {s['steps']:4d} T {s['T']:g} alpha {s['alpha']:g}: "
            f"KD {100 * kd['mean']:.2f} ± {100 * kd['sd']:.2f}  "
            f"hard {100 * hard['mean']:.2f} ± {100 * hard['sd']:.2f}"
            f"  gain {100 * gain['mean']:+.2f} ± {100 * gain['sd']:.2f} (min {100 * min(gain['per_seed']):+.2f})"
            f"  score {s['score']:.1f}  {s['train_s_per_run']:.0f} s/run")


def demo_threads(args) -> dict:
    """``kdpipe demo --task classification`` once per thread count; its results, and whether they agree."""
    runs = {}
    for threads in args.demo_threads:
        out = args.work / f"demo-omp{threads}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        command = [sys.executable, "-m", "kdpipe", "demo", "--task", "classification", "--device", "cpu",
                   "--out", str(out), "--overwrite"]
        started = time.perf_counter()
        subprocess.run(command, env=env, check=True)
        results = json.loads((out / "results.json").read_text())
        runs[str(threads)] = {"command": f"OMP_NUM_THREADS={threads} " + shlex.join(command[1:]),
                              "wall_s": round(time.perf_counter() - started, 1), "results": results}
    first, *others = runs.values()
    agree = all(quality(r["results"]) == quality(first["results"]) for r in others)
    return {"demo_runs": runs, "quality_numbers_identical": agree}


def quality(results: dict) -> dict:
    """The demo's quality numbers (every per-seed metric but the timings)."""
    keys = (*QUALITY, "top1_agreement")
    return {seed: {label: {k: v for k, v in row.items() if k in keys} for label, row in rows.items()}
            for seed, rows in results["per_seed"].items()}


def main():
    args = parse_args()
    started = time.perf_counter()
    body = demo_threads(args) if args.demo_threads else sweep(args)
    report = {"command": shlex.join(["python", *sys.argv]), "machine": machine(), "versions": versions(),
              "git": git_state(), "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "wall_s": round(time.perf_counter() - started, 1),
              "timings_note": "wall-clock on a 2-core machine shared with other jobs: noisy", **body}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
