"""Training curves from train-student's ``metrics.jsonl`` files (one JSON object per line with
``step``, ``split`` ("train" or "eval") and numbers such as ``loss``, ``kd``, ``ce``, ``kl_to_teacher``)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from kdpipe.pipeline.data import jsonl_records
from kdpipe.pipeline.errors import DataError
from kdpipe.pipeline.fileio import atomic_path

DEFAULT_KEYS = ("loss", "kl_to_teacher", "ce")


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


def plot_training_curves(metrics_files: dict[str, str | os.PathLike], out_png: str | os.PathLike, *,
                         keys=DEFAULT_KEYS) -> Path:
    """One subplot per key present in any run: train (solid) and eval (dashed, dots) vs step.

    metrics_files: run label -> metrics.jsonl path. Each run keeps one colour; the PNG is written
    atomically. Returns ``out_png`` as a Path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {label: read_metrics(path) for label, path in metrics_files.items()}
    present = [k for k in keys if any(curve(r, k, s)[0] for r in runs.values() for s in ("train", "eval"))]
    if not present:
        raise DataError(f"none of {', '.join(keys)} appear in {', '.join(map(str, metrics_files.values()))}; pick other keys")
    fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 3.8), squeeze=False)
    for ax, key in zip(axes[0], present):
        for color, (label, records) in zip(_colors(plt, len(runs)), runs.items()):
            for split, style in (("train", {"lw": 1.2}), ("eval", {"ls": "--", "marker": "o", "ms": 3})):
                steps, values = curve(records, key, split)
                if steps:
                    ax.plot(steps, values, color=color, label=f"{label} {split}", **style)
        ax.set(title=key, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return out_png


def _colors(plt, n: int) -> list:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[i % len(cycle)] for i in range(n)]
