"""The demo: the whole job on the shipped data, teacher cached once, students compared.

Causal LM (default): the shipped Llama teacher (``data/teacher``) is cached over the Shakespeare
training split and the held-out play (top-128: the smallest k whose student ``benchmarks/k_sweep.py``
measured within noise of online dense KD, see the README's "Choosing k"); a student is trained from the cache with KD, the same
student on hard labels only, and the same student with **online dense KD** (the teacher in memory,
the KL over the whole vocabulary: :class:`~kdpipe.pipeline.train.online_kd.OnlineKDTrainer`), all with the
same initialisation, rows, order and schedule. Teacher and students are evaluated on the held-out
play with the teacher run on its rows, so every row has the full-vocabulary KL (``kl_full``) next to
the cache's (k+1)-bin KL (``kl_topk_bins``, a lower bound), and each student its CE gap to the online
reference. Classification: the ResNet teacher and the small CNN student on real MNIST digits
(``data/mnist``); its cache holds all 10 classes (k = V), so cached KD is already dense KD and no
online student is trained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from pathlib import Path

from kdpipe.pipeline.capture import (
    CapturePlan,
    CaptureSettings,
    finished_capture,
    plan_capture,
    run_capture,
    with_teacher_weights,
)
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


TASKS = {
    "causal-lm": DemoTask(
        teacher=str(DATA / "teacher"), weights=None,
        train_data=str(DATA / "shakespeare" / "train"), heldout_data=str(DATA / "shakespeare" / "heldout"),
        student=str(DATA / "students" / "lm-student.json"), top_k=128, temperatures=(1.0, 2.0), seq_len=128,
        train=dict(steps=800, batch_size=16, lr=3e-3, warmup=20, eval_every=100, eval_rows=48),
        kd=dict(alpha=0.9, temperature=1.0), online=True,
    ),
    "classification": DemoTask(
        teacher=f"{DATA / 'mnist_models.py'}:resnet_teacher", weights=str(DATA / "mnist" / "teacher.safetensors"),
        train_data=str(DATA / "mnist" / "train.npz"), heldout_data=str(DATA / "mnist" / "heldout.npz"),
        student=f"{DATA / 'mnist_models.py'}:cnn_student", top_k=10, temperatures=(1.0, 4.0), seq_len=1,
        train=dict(steps=600, batch_size=64, lr=1e-2, clip=0.0, warmup=10, eval_every=100, eval_rows=1000),
        kd=dict(alpha=0.7, temperature=4.0),
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
             overwrite: bool = False, report: DemoReport | None = None) -> dict:
    """Run the demo into ``out`` (default: the task's :data:`DEFAULT_OUT`); returns the results table
    and timings (also in ``out/results.json``). Finished caches in ``out`` with the demo's settings are
    reused (``overwrite``: captured again); the students are always trained again."""
    if not DATA.is_dir():
        raise ConfigError(f"the demo needs the data/ folder of a kdpipe checkout, not found at {DATA} (an installed "
                          "wheel ships no data); run kdpipe demo (or make demo) from a checkout of the repository")
    spec, out, report = TASKS[task], Path(out or DEFAULT_OUT[task]), report or DemoReport()
    _check_same_task(out, task, overwrite=overwrite)
    started, timed = time.perf_counter(), _Timer()
    caches = {split: _cache(spec, out, split, device=device, overwrite=overwrite, report=report, timed=timed)
              for split in ("train", "heldout")}
    students = ("kd", "hard-label", "online") if spec.online else ("kd", "hard-label")
    runs = {name: _train(spec, out, name, task=task, device=device, steps=steps, report=report, timed=timed)
            for name in students}
    table = _evaluate(spec, out, students, task=task, device=device, rows=caches["heldout"]["totals"]["rows"],
                      report=report, timed=timed)
    report.done()
    curves = {RUN_LABELS[name]: out / name / "metrics.jsonl" for name in students}
    plot = plot_training_curves(curves, out / "curves.png", references=table["teacher"])
    results = {"task": task, "out": str(out), "table": table, "timings_s": timed.seconds,
               "wall_s": round(time.perf_counter() - started, 1), "plot": str(plot), "top_k": spec.top_k,
               "vocab_size": caches["train"]["capture"]["teacher_vocab_size"],
               "cache_bytes_per_token": caches["train"]["totals"]["bytes_per_token"], "steps": runs["kd"]["total_steps"]}
    atomic_write_json(out / "results.json", results)
    return results


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
                               data=spec.train_data if split == "train" else spec.heldout_data, top_k=spec.top_k,
                               temperatures=spec.temperatures, seq_len=spec.seq_len, batch_size=32, device=device)
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


def _train(spec: DemoTask, out: Path, name: str, *, task, device, steps, report: DemoReport, timed: _Timer) -> dict:
    """Train the ``kd``, ``hard-label`` or ``online`` student into ``out/NAME`` (from scratch); its run manifest."""
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    config = TrainConfig(
        cache=str(out / "cache-train"), student=spec.student, out=str(run_dir), device=device,
        eval_cache=str(out / "cache-heldout"), checkpoint_every=0,
        data=spec.train_data if task == "classification" else None,
        eval_data=spec.heldout_data if task == "classification" else None,
        **{**spec.train, **(dict(alpha=0.0) if name == "hard-label" else spec.kd), **({"steps": steps} if steps else {}),
           **(dict(fused_loss=False) if name == "online" else {})},
    )
    config.validate()
    report.phase(f"train {name} student", total=config.steps, unit="step")
    with timed(f"train {name} student"):
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


def _evaluate(spec: DemoTask, out: Path, students, *, task, device, rows: int, report: DemoReport,
              timed: _Timer) -> dict:
    """Teacher and students on the held-out cache, the teacher run on its rows (causal LM; a
    classification cache with k = V gives the full KL itself): their metrics by label, and each
    student's CE gap to the online-KD student when there is one."""
    models = {"teacher": spec.teacher if task == "causal-lm" else _module_dir(out / "teacher", spec)}
    models.update({TABLE_LABELS[name]: out / name / "model" for name in students})
    # A causal-LM cache holds its rows' tokens; a classification cache reads its inputs from the data.
    heldout = spec.heldout_data if task == "classification" else None
    teacher = spec.teacher if task == "causal-lm" else None
    table = {}
    for label, model in models.items():
        report.phase(f"evaluate {label}", total=rows, unit="row")
        with timed(f"evaluate {label}"):
            table[label] = evaluate_model(model, data=heldout, cache=str(out / "cache-heldout"), teacher=teacher,
                                          device=device, on_rows=lambda new_rows, total: report.evaluated(new_rows))
    online = table.get(TABLE_LABELS["online"])
    if online is not None:
        for label in models:
            if label != "teacher":
                table[label]["ce_gap_to_online"] = table[label]["ce"] - online["ce"]
                table[label]["ce_gap_to_online_pct"] = 100 * (table[label]["ce"] / online["ce"] - 1)
    return table


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
