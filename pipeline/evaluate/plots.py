"""Training curves from train-student's ``metrics.jsonl`` files (one JSON object per line with
``step``, ``split`` ("train" or "eval") and numbers such as ``loss``, ``kd``, ``ce``, ``kl_topk_bins``).

Each panel holds one quantity in one unit, so its curves compare: the held-out CE (with the teacher's
as a reference when known), the KL to the teacher under the name of what it is (``kl_topk_bins``, a
lower bound of the full KL; ``kl_full``; ``kl_full_estimate``; runs of earlier versions wrote
``kl_to_teacher``, which is read too), the top-1 agreement (accuracy for classification), and the
training objective on its own (its KD term is T^2-scaled).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from kdpipe.pipeline.data import jsonl_records
from kdpipe.pipeline.errors import DataError
from kdpipe.pipeline.fileio import atomic_path
from kdpipe.pipeline.train import metrics

KL_KEYS = (metrics.KL_FULL, metrics.KL_TOPK_BINS, metrics.KL_FULL_ESTIMATE, metrics.LEGACY_KL)
DEFAULT_KEYS = ("ce", *KL_KEYS, "top1_agreement", "loss")  # a panel per key that a run has


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of one ``metrics.jsonl``, in file order; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"metrics file {path} does not exist; pass a train-student --out dir or its metrics.jsonl")
    records = []
    for n, record in jsonl_records(path, path.read_text()):
        if "step" not in record:
            raise DataError(f"{path}:{n} has no 'step'; each line needs at least step, split and metric values")
        records.append(record)
    return records


def curve(records: list[dict], key: str, split: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` in the records of ``split``, skipping records without a finite number."""
    points = [(r["step"], r[key]) for r in records
              if r.get("split", "train") == split and _is_number(r.get(key))]
    return [s for s, _ in points], [v for _, v in points]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class Panel:
    """How one metric is drawn: ``train`` "main" (solid), "faint" or None; ``evaluated``: dashed points;
    ``teacher_line``: the teacher's value as a reference (not for measures of agreement with the
    teacher, which it has trivially)."""

    title: str
    ylabel: str
    train: str | None = "main"
    evaluated: bool = True
    teacher_line: bool = False


def panel_for(key: str, *, unit: str) -> Panel:
    """The panel of ``key``; ``unit``: "token" (causal LM) or "example" (classification)."""
    known = {
        "ce": Panel("held-out cross-entropy (train batches faint)", f"CE, nats per {unit}", train="faint",
                    teacher_line=True),
        metrics.KL_FULL: Panel("full-vocabulary KL(teacher ‖ student), held-out, T = 1", f"nats per {unit}", train=None),
        metrics.KL_TOPK_BINS: Panel("KL on the (k+1)-bin view (a lower bound of the full KL), held-out, T = 1",
                                    f"nats per {unit}", train=None),
        metrics.KL_FULL_ESTIMATE: Panel("estimated full KL(teacher ‖ student), held-out, T = 1", f"nats per {unit}",
                                        train=None),
        metrics.LEGACY_KL: Panel("KL(teacher ‖ student) on the cache's targets, held-out, T = 1", f"nats per {unit}",
                                 train=None),
        "top1_agreement": Panel("top-1 agreement with the teacher", f"fraction of {unit}s", train=None),
        "accuracy": Panel("held-out accuracy", "fraction of examples", train=None, teacher_line=True),
        "loss": Panel("training objective: α·T²·KL + (1 − α)·CE", "nats (KD term × T²)", evaluated=False),
    }
    return known.get(key, Panel(key, key))


def plot_training_curves(metrics_files: dict[str, str | os.PathLike], out_png: str | os.PathLike, *,
                         keys=DEFAULT_KEYS, references: dict[str, float] | None = None) -> Path:
    """One panel per key present in any run (:func:`panel_for`), steps on x; the PNG is written atomically.

    metrics_files: run label -> metrics.jsonl path; each run keeps one colour. Held-out evaluations are
    dashed points; the suptitle says how many held-out rows each used (their ``rows``). ``ce``, the KL
    keys (:data:`KL_KEYS`) and ``top1_agreement`` show evaluations only (``ce`` with the training batches'
    CE faint), ``loss`` the training objective only, labelled with each run's alpha and T (the KD term is
    T^2-scaled, so it is not comparable with a CE). For classification runs (eval records with
    ``accuracy``) ``top1_agreement`` shows the accuracy. ``references``: the teacher's metrics by key,
    e.g. its row of the evaluation table; its ``ce`` and ``accuracy`` are drawn as horizontal lines.
    Returns ``out_png`` as a Path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {label: read_metrics(path) for label, path in metrics_files.items()}
    classification = any(curve(r, "accuracy", "eval")[0] for r in runs.values())
    keys = [("accuracy" if classification and k == "top1_agreement" else k) for k in keys]
    panels = {k: panel_for(k, unit="example" if classification else "token") for k in keys}
    present = [k for k in keys if any(_points(r, k, panels[k]) for r in runs.values())]
    if not present:
        raise DataError(f"none of {', '.join(keys)} appear in {', '.join(map(str, metrics_files.values()))}; pick other keys")
    fig, axes = plt.subplots(1, len(present), figsize=(4.6 * len(present), 4.0), squeeze=False, sharex=True)
    for ax, key in zip(axes[0], present):
        reference = (references or {}).get(key) if panels[key].teacher_line else None
        _draw(ax, key, panels[key], runs, _colors(plt, len(runs)), reference)
    note = _eval_rows_note(runs)
    if note:
        fig.suptitle(note, fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return out_png


def _points(records: list[dict], key: str, panel: Panel) -> bool:
    splits = (["train"] if panel.train else []) + (["eval"] if panel.evaluated else [])
    return any(curve(records, key, split)[0] for split in splits)


def _draw(ax, key: str, panel: Panel, runs: dict[str, list[dict]], colors: list, reference: float | None) -> None:
    for color, (label, records) in zip(colors, runs.items()):
        steps, values = curve(records, key, "train")
        if panel.train and steps:
            faint = panel.train == "faint"
            ax.plot(steps, values, color=color, lw=0.8 if faint else 1.2, alpha=0.35 if faint else 1.0,
                    label=_train_label(label, key, records, faint=faint))
        steps, values = curve(records, key, "eval")
        if panel.evaluated and steps:
            ax.plot(steps, values, color=color, ls="--", marker="o", ms=3, label=f"{label} held-out")
    if reference is not None:
        ax.axhline(reference, color="black", ls=":", lw=1.2, label=f"teacher ({reference:.4g})")
    ax.set(title=panel.title, xlabel="optimizer step", ylabel=panel.ylabel)
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _train_label(label: str, key: str, records: list[dict], *, faint: bool) -> str:
    if faint:
        return f"{label} train batches"
    return label + _objective(records) if key == "loss" else f"{label} train"


def _objective(records: list[dict]) -> str:
    """`` (α = 0.9, T = 2)`` from a run's training records (`` (scheduled α, T)`` when they change)."""
    settings = {(r.get("alpha"), r.get("temperature")) for r in records
                if r.get("split", "train") == "train" and "alpha" in r}
    if len(settings) != 1:
        return " (scheduled α, T)" if settings else ""
    alpha, temperature = settings.pop()
    return f" (α = {alpha:g}, T = {temperature:g})"


def _eval_rows_note(runs: dict[str, list[dict]]) -> str | None:
    """What the held-out points were computed on, from the eval records' ``rows``."""
    rows = {r["rows"] for records in runs.values() for r in records if r.get("split") == "eval" and "rows" in r}
    if not rows:
        return None
    counts = " or ".join(str(n) for n in sorted(rows))
    return (f"dashed points: evaluations during training, each on the first {counts} held-out rows (--eval-rows); "
            "an evaluation of the whole held-out set can differ")


def _colors(plt, n: int) -> list:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[i % len(cycle)] for i in range(n)]
