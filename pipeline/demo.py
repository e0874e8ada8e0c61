"""The demo: the whole job on the shipped data, teacher cached once, two students compared.

Causal LM (default): the shipped Llama teacher (``data/teacher``) is cached over the Shakespeare
training split and the held-out play; a student is trained from the cache with KD, the same student
is trained on hard labels only for the same steps, and teacher and both students are evaluated on
the held-out play. Classification: the same with the ResNet teacher and the small CNN student on
real MNIST digits (``data/mnist``).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Callable

from kdpipe.pipeline.capture import CaptureSettings, finished_capture, plan_capture, run_capture, with_teacher_weights
from kdpipe.pipeline.errors import ConfigError
from kdpipe.pipeline.evaluate import evaluate_model
from kdpipe.pipeline.fileio import atomic_write_json
from kdpipe.pipeline.plots import plot_training_curves
from kdpipe.pipeline.train import Trainer
from kdpipe.pipeline.train_config import TrainConfig

DATA = Path(__file__).resolve().parents[1] / "data"
# The demo's caches keep float16 values (the README's figures were measured with them; format 2's
# quantized default changes the students' numbers in the fourth decimal).
DEMO_VALUES = "float16"


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
    train: dict  # TrainConfig overrides shared by both students
    kd: dict  # overrides of the KD student only


TASKS = {
    "causal-lm": DemoTask(
        teacher=str(DATA / "teacher"), weights=None,
        train_data=str(DATA / "shakespeare" / "train"), heldout_data=str(DATA / "shakespeare" / "heldout"),
        student=str(DATA / "students" / "lm-student.json"), top_k=32, temperatures=(1.0, 2.0), seq_len=128,
        train=dict(steps=800, batch_size=16, lr=3e-3, warmup=20, eval_every=100, eval_rows=48),
        kd=dict(alpha=0.9, temperature=1.0),
    ),
    "classification": DemoTask(
        teacher=f"{DATA / 'mnist_models.py'}:resnet_teacher", weights=str(DATA / "mnist" / "teacher.safetensors"),
        train_data=str(DATA / "mnist" / "train.npz"), heldout_data=str(DATA / "mnist" / "heldout.npz"),
        student=f"{DATA / 'mnist_models.py'}:cnn_student", top_k=10, temperatures=(1.0, 4.0), seq_len=1,
        train=dict(steps=600, batch_size=64, lr=1e-2, clip=0.0, warmup=10, eval_every=100, eval_rows=1000),
        kd=dict(alpha=0.7, temperature=4.0),
    ),
}


def capture_or_reuse(settings: CaptureSettings) -> dict:
    """Run a capture, or reuse the finished one in ``settings.out`` when its settings match."""
    plan = plan_capture(settings, load_weights=False)
    return finished_capture(plan) or run_capture(with_teacher_weights(plan))


def run_demo(out: str | Path, *, task: str = "causal-lm", device: str = "auto", steps: int | None = None,
             on_phase: Callable[[str], None] = lambda phase: None) -> dict:
    """Run the demo into ``out``; returns the results table and timings (also in ``out/results.json``)."""
    if not DATA.is_dir():
        raise ConfigError(f"the demo needs the data/ folder of a kdpipe checkout, not found at {DATA} (an installed "
                          "wheel ships no data); run kdpipe demo (or make demo) from a checkout of the repository")
    spec, out = TASKS[task], Path(out)
    timings, started = {}, time.perf_counter()

    def phase(name, fn):
        on_phase(name)
        t = time.perf_counter()
        result = fn()
        timings[name] = round(time.perf_counter() - t, 1)
        return result

    caches = {}
    for split, data in (("train", spec.train_data), ("heldout", spec.heldout_data)):
        settings = CaptureSettings(teacher=spec.teacher, weights=spec.weights, data=data, out=str(out / f"cache-{split}"),
                                   top_k=spec.top_k, temperatures=spec.temperatures, seq_len=spec.seq_len,
                                   batch_size=32, device=device, value_dtype=DEMO_VALUES)
        caches[split] = phase(f"cache teacher ({split})", lambda s=settings: capture_or_reuse(s))
    runs = {}
    for name, extra in (("kd", spec.kd), ("hard-label", dict(alpha=0.0))):
        run_dir = out / name
        shutil.rmtree(run_dir, ignore_errors=True)
        config = TrainConfig(
            cache=str(out / "cache-train"), student=spec.student, out=str(run_dir), device=device,
            eval_cache=str(out / "cache-heldout"), checkpoint_every=0,
            data=spec.train_data if task == "classification" else None,
            eval_data=spec.heldout_data if task == "classification" else None,
            **{**spec.train, **extra, **({"steps": steps} if steps else {})},
        )
        config.validate()
        runs[name] = phase(f"train {name} student", lambda c=config: _train(c))
    models = {"teacher": spec.teacher if task == "causal-lm" else None, "kd student": out / "kd" / "model",
              "hard-label student": out / "hard-label" / "model"}
    if task == "classification":
        models["teacher"] = _module_dir(out / "teacher", spec)
    table = {
        label: phase(f"evaluate {label}", lambda m=model: evaluate_model(
            m, data=spec.heldout_data, cache=str(out / "cache-heldout"), device=device))
        for label, model in models.items()
    }
    plot = plot_training_curves({"KD": out / "kd" / "metrics.jsonl", "hard-label": out / "hard-label" / "metrics.jsonl"},
                                out / "curves.png", keys=("ce", "kl_to_teacher", "top1_agreement", "loss"))
    results = {"task": task, "table": table, "timings_s": timings, "wall_s": round(time.perf_counter() - started, 1),
               "plot": str(plot), "cache_bytes_per_token": caches["train"]["totals"]["bytes_per_token"],
               "steps": runs["kd"]["total_steps"]}
    atomic_write_json(out / "results.json", results)
    return results


def _train(config: TrainConfig) -> dict:
    trainer = Trainer(config)
    trainer.setup()
    return trainer.finish(trainer.fit())


def _module_dir(folder: Path, spec: DemoTask) -> Path:
    """The module teacher as a model dir evaluate can load (factory + weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec.weights, folder / "model.safetensors")
    atomic_write_json(folder / "kdpipe_module.json", {"factory": spec.teacher})
    return folder
