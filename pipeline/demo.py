"""The demo: the whole job on the shipped data, teacher cached once, students compared.

Causal LM (default): the shipped Llama teacher (``data/teacher``) is cached over the Shakespeare
training split and the held-out play with ``cache-teacher``'s default targets (exact top-k plus tail
draws, :data:`~kdpipe.pipeline.capture.plan.DEFAULT_TOP_K` and ``DEFAULT_SAMPLE``: the smallest capture
whose student ``benchmarks/k_sweep.py`` measured within the seed spread of online dense KD, see
docs/choosing-k.md); a student is trained from the cache with KD, the same
student on hard labels only, and the same student with **online dense KD** (the teacher in memory,
the KL over the whole vocabulary: :class:`~kdpipe.pipeline.train.online_kd.OnlineKDTrainer`), all with the
same initialisation, rows, order and schedule. Teacher and students are evaluated on the held-out
play with the teacher run on its rows, so every row has the full-vocabulary KL (``kl_full``) next to
the cache's (k+1)-bin KL (``kl_topk_bins``, a lower bound), and each student its CE gap to the online
reference. Classification: the ResNet teacher and the small CNN student on real MNIST digits
(``data/mnist``); its cache holds all 10 classes (k = V), so cached KD is already dense KD and no
online student is trained. Its setting (500 training digits, T = 4, alpha = 0.9, 300 steps) is the one
``benchmarks/classification_demo.py`` measured to give the largest KD gain relative to its spread over
seeds; the demo trains both students for each of several seeds (the seed sets the initialisation and
the data order) and reports each metric's mean and sd over the seeds and the per-seed accuracy gain
(:func:`paired_gain`). It runs with one torch intra-op thread, so its quality numbers are the same
whatever ``OMP_NUM_THREADS`` or the machine's core count (on one CPU type and torch build); only the
timings and rows/s depend on the machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from kdpipe.pipeline.capture import (
    CapturePlan,
    CaptureSettings,
    finished_capture,
    plan_capture,
    run_capture,
    with_teacher_weights,
)
from kdpipe.pipeline.capture.plan import DEFAULT_SAMPLE, DEFAULT_TOP_K
from kdpipe.pipeline.errors import ConfigError
from kdpipe.pipeline.evaluate.model import load_model
from kdpipe.pipeline.evaluate.plots import plot_training_curves
from kdpipe.pipeline.evaluate.run import evaluate_model
from kdpipe.pipeline.fileio import atomic_write_json
from kdpipe.pipeline.models.devices import resolve_device
from kdpipe.pipeline.train.config import TrainConfig
from kdpipe.pipeline.train.online_kd import OnlineKDTrainer
from kdpipe.pipeline.train.trainer import Trainer

DATA = Path(__file__).resolve().parents[1] / "data"


@dataclasses.dataclass
class DemoTask:
    teacher: str
    weights: str | None
    train_data: str
    heldout_data: str
    student: str
    top_k: int
    temperatures: tuple[float, ...]
    seq_len: int
    train: dict  # TrainConfig overrides shared by all students
    kd: dict  # overrides of the KD students (cached and online)
    online: bool = False  # also train the online dense-KD reference (causal LM teachers)
    sample: int = 0  # draws per position outside the top-k (mixed targets); 0: exact top-k only
    seeds: int | None = None  # train every student for seeds 0..N-1 and report mean and sd; None: seed 0 only
    train_rows: int | None = None  # cache (and train on) only the first rows of train_data
    threads: int | None = None  # torch intra-op threads for the whole demo; None: leave torch's setting


TASKS = {
    "causal-lm": DemoTask(
        teacher=str(DATA / "teacher"), weights=None,
        train_data=str(DATA / "shakespeare" / "train"), heldout_data=str(DATA / "shakespeare" / "heldout"),
        student=str(DATA / "students" / "lm-student.json"), top_k=DEFAULT_TOP_K, sample=DEFAULT_SAMPLE,
        temperatures=(1.0, 2.0), seq_len=128,
        train=dict(steps=800, batch_size=16, lr=3e-3, warmup=20, eval_every=100, eval_rows=48),
        kd=dict(alpha=0.9, temperature=1.0), online=True,
    ),
    "classification": DemoTask(
        teacher=f"{DATA / 'mnist_models.py'}:resnet_teacher", weights=str(DATA / "mnist" / "teacher.safetensors"),
        train_data=str(DATA / "mnist" / "train.npz"), heldout_data=str(DATA / "mnist" / "heldout.npz"),
        student=f"{DATA / 'mnist_models.py'}:cnn_student", top_k=10, temperatures=(1.0, 4.0), seq_len=1,
        train=dict(steps=300, batch_size=64, lr=1e-2, clip=0.0, warmup=10, eval_every=100, eval_rows=1000),
        kd=dict(alpha=0.9, temperature=4.0), seeds=5, train_rows=500, threads=1,
    ),
}


# Where each task's demo goes by default: one folder per task, so both demos can sit side by side.
DEFAULT_OUT = {"causal-lm": "runs/demo", "classification": "runs/demo-classification"}


class DemoReport:
    """What :func:`run_demo` tells as it goes; these do nothing (the CLI's subclass shows them)."""

    def phase(self, name: str, *, total: int | None = None, unit: str = "step") -> None:
        """A phase starts (and the one before it has ended); ``total`` units of ``unit`` when known."""

    def capturing(self, name: str, plan: CapturePlan) -> None:
        """A capture phase starts: :meth:`captured` and :meth:`data_read` report its progress."""

    def note(self, message: str) -> None:
        """Something worth a line that is not a phase (a cache reused)."""

    def captured(self, rows: int, tokens: int) -> None:
        """A capture wrote ``rows`` more rows holding ``tokens`` more tokens."""

    def data_read(self, bytes_read: int) -> None:
        """A capture has read ``bytes_read`` bytes of its data so far."""

    def trained(self, metrics: dict) -> None:
        """A training step ended with these metrics (train-student's)."""

    def evaluated(self, rows: int) -> None:
        """An evaluation scored ``rows`` more rows."""

    def done(self) -> None:
        """The last phase has ended."""


def run_demo(out: str | Path | None = None, *, task: str = "causal-lm", device: str = "auto", steps: int | None = None,
             seeds: int | None = None, overwrite: bool = False, report: DemoReport | None = None) -> dict:
    """Run the demo into ``out`` (default: the task's :data:`DEFAULT_OUT`); returns the results table
    and timings (also in ``out/results.json``). ``seeds``: train every student for seeds 0..N-1 (default:
    the task's). Finished caches in ``out`` with the demo's settings are reused (``overwrite``: captured
    again); the students are always trained again."""
    if not DATA.is_dir():
        raise ConfigError(f"the demo needs the data/ folder of a kdpipe checkout, not found at {DATA} (an installed "
                          "wheel ships no data); run kdpipe demo (or make demo) from a checkout of the repository")
    spec, out, report = TASKS[task], Path(out or DEFAULT_OUT[task]), report or DemoReport()
    if seeds is not None and (spec.seeds is None or seeds < 1):
        raise ConfigError(f"--seeds {seeds}: " + ("give at least 1" if spec.seeds else
                                                  f"the {task} demo trains one seed; leave --seeds out"))
    _check_same_task(out, task, overwrite=overwrite)
    started, timed = time.perf_counter(), _Timer()
    with _intra_op_threads(spec.threads):
        caches = {split: _cache(spec, out, split, device=device, overwrite=overwrite, report=report, timed=timed)
                  for split in ("train", "heldout")}
        students = ("kd", "hard-label", "online") if spec.online else ("kd", "hard-label")
        seed_list = list(range(seeds or spec.seeds or 1))
        folders = {seed: out / f"seed-{seed}" if spec.seeds else out for seed in seed_list}
        runs = {(seed, name): _train(spec, folders[seed], name, seed=seed, task=task, device=device, steps=steps,
                                     report=report, timed=timed) for seed in seed_list for name in students}
        teacher = _evaluate(spec, out, {"teacher": _teacher_model(spec, out, task)}, task=task, device=device,
                            rows=caches["heldout"]["totals"]["rows"], report=report, timed=timed)
        per_seed = {seed: _evaluate(spec, out, {TABLE_LABELS[n]: folders[seed] / n / "model" for n in students},
                                    task=task, device=device, rows=caches["heldout"]["totals"]["rows"], report=report,
                                    timed=timed, seed=seed if spec.seeds else None) for seed in seed_list}
    report.done()
    curves = {RUN_LABELS[name]: folders[0] / name / "metrics.jsonl" for name in students}
    plot = plot_training_curves(curves, out / "curves.png", references=teacher["teacher"])
    results = {"task": task, "out": str(out), "table": {**teacher, **_over_seeds(per_seed)},
               "timings_s": timed.seconds, "wall_s": round(time.perf_counter() - started, 1), "plot": str(plot),
               "top_k": spec.top_k, "sample": spec.sample, "vocab_size": caches["train"]["capture"]["teacher_vocab_size"],
               "cache_bytes_per_token": caches["train"]["totals"]["bytes_per_token"],
               "steps": runs[0, "kd"]["total_steps"]}
    if spec.seeds:
        results.update(seeds=seed_list, train_rows=caches["train"]["totals"]["rows"], kd=spec.kd,
                       per_seed={str(seed): table for seed, table in per_seed.items()},
                       accuracy_gain=paired_gain([per_seed[s]["kd student"]["accuracy"] for s in seed_list],
                                                 [per_seed[s]["hard-label student"]["accuracy"] for s in seed_list]),
                       threads=spec.threads, device=resolve_device(device).type, thread_dependent=THREAD_DEPENDENT)
    atomic_write_json(out / "results.json", results)
    return results


# The numbers in a multi-seed demo's results.json that depend on the machine's speed (so on the thread count
# too); the others depend only on the code, data, seeds, torch build and CPU type.
THREAD_DEPENDENT = ["rows_per_s", "timings_s", "wall_s"]


def mean_sd(values: list[float]) -> dict:
    """``{"mean", "sd", "per_seed"}`` of per-seed values (sd with n - 1; 0 for one value)."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": list(values)}


def paired_gain(kd: list[float], hard: list[float]) -> dict:
    """The KD student's gain over the hard-label student of the same seed: mean and sd over seeds,
    and whether it ``exceeds_spread``: at least 2 seeds, a mean gain over twice the gains' sd and
    over each student's own sd over seeds."""
    gain = mean_sd([k - h for k, h in zip(kd, hard, strict=True)])
    spread = max(mean_sd(kd)["sd"], mean_sd(hard)["sd"], 2 * gain["sd"])
    return {**gain, "kd": mean_sd(kd), "hard": mean_sd(hard),
            "exceeds_spread": len(kd) > 1 and gain["mean"] > spread}


@contextlib.contextmanager
def _intra_op_threads(count: int | None):
    """torch's intra-op threads set to ``count`` (None: unchanged) inside, restored after."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _over_seeds(per_seed: dict[int, dict]) -> dict:
    """One row per student: the mean of each metric over seeds, and its sd as ``KEY_sd`` (several seeds)."""
    if len(per_seed) == 1:
        return next(iter(per_seed.values()))
    rows = {}
    for label in next(iter(per_seed.values())):
        first = next(iter(per_seed.values()))[label]
        keys = [k for k, v in first.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        stats = {key: mean_sd([table[label][key] for table in per_seed.values()]) for key in keys}
        rows[label] = {**{key: s["mean"] for key, s in stats.items()},
                       **{f"{key}_sd": s["sd"] for key, s in stats.items()}}
    return rows


class _Timer:
    """Seconds of each phase: ``with timed(name): ...``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 1)


def _cache(spec: DemoTask, out: Path, split: str, *, device, overwrite, report: DemoReport, timed: _Timer) -> dict:
    """The teacher cache of ``split`` in ``out/cache-SPLIT``: captured, or reused when finished with these settings."""
    settings = CaptureSettings(teacher=spec.teacher, weights=spec.weights, out=str(out / f"cache-{split}"),
                               data=spec.train_data if split == "train" else spec.heldout_data, top_k=spec.top_k, sample=spec.sample,
                               temperatures=spec.temperatures, seq_len=spec.seq_len, batch_size=32, device=device,
                               limit_rows=spec.train_rows if split == "train" else None)
    if overwrite:
        shutil.rmtree(settings.out, ignore_errors=True)
    plan = plan_capture(settings, load_weights=False)
    finished = finished_capture(plan)  # raises naming the setting when out holds another capture
    if finished is not None:
        report.note(f"reusing the teacher cache {settings.out} (same settings; --overwrite captures it again)")
        return finished
    report.capturing(f"cache teacher ({split})", plan)
    with timed(f"cache teacher ({split})"):
        return run_capture(with_teacher_weights(plan), on_rows=report.captured, on_data=report.data_read)


RUN_LABELS = {"kd": "KD (cached)", "hard-label": "hard-label", "online": "online KD"}  # curves.png legend
TABLE_LABELS = {"kd": "kd student", "hard-label": "hard-label student", "online": "online KD student"}


def _train(spec: DemoTask, folder: Path, name: str, *, seed: int, task, device, steps, report: DemoReport,
           timed: _Timer) -> dict:
    """Train the ``kd``, ``hard-label`` or ``online`` student with ``seed`` into ``folder/NAME`` (from
    scratch; the caches are in ``folder`` or the folder above it); its run manifest."""
    run_dir, out = folder / name, folder.parent if spec.seeds else folder
    shutil.rmtree(run_dir, ignore_errors=True)
    config = TrainConfig(
        cache=str(out / "cache-train"), student=spec.student, out=str(run_dir), device=device,
        eval_cache=str(out / "cache-heldout"), checkpoint_every=0, seed=seed,
        data=spec.train_data if task == "classification" else None,
        eval_data=spec.heldout_data if task == "classification" else None,
        **{**spec.train, **(dict(alpha=0.0) if name == "hard-label" else spec.kd),
           **({"steps": steps} if steps else {}),
           **(dict(fused_loss=False) if name == "online" else {})},
    )
    config.validate()
    phase = f"train {name} student" + (f" (seed {seed})" if spec.seeds else "")
    report.phase(phase, total=config.steps, unit="step")
    with timed(phase):
        if name == "online":
            teacher = load_model(spec.teacher, device=resolve_device(device)).module  # fp32, eval mode
            trainer = OnlineKDTrainer(config, teacher)
        else:
            trainer = Trainer(config)
        trainer.setup()
        try:
            return trainer.finish(trainer.fit(on_step=report.trained))
        finally:
            trainer.close()


def _evaluate(spec: DemoTask, out: Path, models: dict, *, task, device, rows: int, report: DemoReport,
              timed: _Timer, seed: int | None = None) -> dict:
    """``models`` (label -> model dir) on the held-out cache, the teacher run on its rows (causal LM; a
    classification cache with k = V gives the full KL itself): their metrics by label, and each
    student's CE gap to the online-KD student when there is one."""
    # A causal-LM cache holds its rows' tokens; a classification cache reads its inputs from the data.
    heldout = spec.heldout_data if task == "classification" else None
    teacher = spec.teacher if task == "causal-lm" else None
    table = {}
    for label, model in models.items():
        phase = f"evaluate {label}" + ("" if seed is None else f" (seed {seed})")
        report.phase(phase, total=rows, unit="row")
        with timed(phase):
            table[label] = evaluate_model(model, data=heldout, cache=str(out / "cache-heldout"), teacher=teacher,
                                          device=device, on_rows=lambda new_rows, total: report.evaluated(new_rows))
    online = table.get(TABLE_LABELS["online"])
    if online is not None:
        for label in models:
            table[label]["ce_gap_to_online"] = table[label]["ce"] - online["ce"]
            table[label]["ce_gap_to_online_pct"] = 100 * (table[label]["ce"] / online["ce"] - 1)
    return table


def _teacher_model(spec: DemoTask, out: Path, task: str):
    """The teacher as evaluate loads it: the model dir (causal LM), or the module as a model dir."""
    return spec.teacher if task == "causal-lm" else _module_dir(out / "teacher", spec)


def _check_same_task(out: Path, task: str, *, overwrite: bool) -> None:
    """Refuse an ``out`` holding the other task's demo (unless ``overwrite``): its caches would be replaced."""
    manifest = out / "cache-train" / "manifest.json"
    other = json.loads(manifest.read_text()).get("task") if manifest.is_file() else None
    if other not in (None, task) and not overwrite:
        raise ConfigError(f"--out {out} holds the {other} demo; run the {task} demo into its own folder "
                          f"(--out {DEFAULT_OUT[task]}, its default) or pass --overwrite to replace it")


def _module_dir(folder: Path, spec: DemoTask) -> Path:
    """The module teacher as a model dir evaluate can load (factory + weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec.weights, folder / "model.safetensors")
    atomic_write_json(folder / "kdpipe_module.json", {"factory": spec.teacher})
    return folder
