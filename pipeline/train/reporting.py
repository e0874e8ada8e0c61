"""Training metrics sent to experiment trackers (``--report-to``): TensorBoard, Weights & Biases, MLflow.

A :class:`Reporter` receives exactly the records train-student appends to ``metrics.jsonl`` --
``{"step": int, "split": "train" | "eval", <name>: number, ...}`` -- and logs every finite number of a
record as the scalar ``<split>/<name>`` at ``step`` (``train/loss``, ``eval/kl_to_teacher``, ...).
Trackers are imported where used, so a run without them does not need them installed.

A resumed run logs again the steps after its checkpoint: TensorBoard hides the earlier events of those
steps (``purge_step``), Weights & Biases continues the same run (its id is the kdpipe run id) and keeps
the first value it got for a step, MLflow continues the run tagged with the kdpipe run id.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Iterable

from kdpipe.pipeline.errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
RUN_ID_TAG = "kdpipe.run_id"


def parse_report_to(values: str | Iterable[str]) -> list[str]:
    """Tracker names from ``--report-to`` values: repeated and/or comma-separated; ``none`` means none.

    ``["tensorboard,wandb"]`` and ``["tensorboard", "wandb"]`` both give ``["tensorboard", "wandb"]``.
    """
    values = [values] if isinstance(values, str) else list(values)
    names = [n.strip().lower() for v in values for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in (*TRACKERS, "none")]
    if unknown:
        raise ConfigError(f"unknown --report-to {unknown[0]!r}; use none or any of {', '.join(TRACKERS)}")
    if "none" in names and len(set(names)) > 1:
        raise ConfigError("--report-to none cannot be combined with a tracker; give only the trackers to use")
    return list(dict.fromkeys(n for n in names if n != "none"))


def check_installed(names: Iterable[str]) -> None:
    """Refuse a tracker whose package is not installed (before anything is trained)."""
    for name in names:
        package = _PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"--report-to {name} needs the {package} package: pip install {package}")


def scalars(record: dict) -> dict[str, float]:
    """``{"<split>/<name>": value}`` for the finite numbers of a metrics record (not its step)."""
    split = record.get("split", "train")
    return {f"{split}/{key}": float(value) for key, value in record.items()
            if key != "step" and _is_number(value)}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Reporter:
    """Where metrics records go besides ``metrics.jsonl``."""

    def log(self, record: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoardReporter(Reporter):
    """Event files in ``log_dir`` (``tensorboard --logdir RUN_DIR``). Events of steps after
    ``resumed_at`` left by an earlier, interrupted process are purged."""

    def __init__(self, log_dir: str | Path, *, resumed_at: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resumed_at + 1)

    def log(self, record: dict) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record["step"])
        self.writer.flush()  # a record per call: flushing each keeps the files current for a live tensorboard

    def close(self) -> None:
        self.writer.close()


class WandbReporter(Reporter):
    """A Weights & Biases run whose id is the kdpipe run id (a resumed run continues it); project
    from ``WANDB_PROJECT`` (default ``kdpipe``), files under the run directory."""

    def __init__(self, out: Path, *, run_id: str, settings: dict):
        import os

        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "kdpipe"), name=out.name, id=run_id,
                              resume="allow", dir=str(out), config=settings)

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


class MlflowReporter(Reporter):
    """An MLflow run (tracking URI and experiment from ``MLFLOW_TRACKING_URI``/``MLFLOW_EXPERIMENT_NAME``)
    tagged with the kdpipe run id; a resumed run continues the run carrying its tag. The settings are
    logged as parameters when the run starts (MLflow does not let a parameter change)."""

    def __init__(self, out: Path, *, run_id: str, settings: dict):
        import mlflow

        self.mlflow = mlflow
        found = mlflow.search_runs(filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'", output_format="list")
        if found:
            mlflow.start_run(run_id=found[0].info.run_id)
        else:
            mlflow.start_run(run_name=out.name, tags={RUN_ID_TAG: run_id})
            mlflow.log_params({k: "" if v is None else str(v) for k, v in settings.items()})

    def log(self, record: dict) -> None:
        self.mlflow.log_metrics(scalars(record), step=record["step"])

    def close(self) -> None:
        self.mlflow.end_run()


class Reporters(Reporter):
    """Several reporters fed the same records (none: nothing is done)."""

    def __init__(self, reporters: list[Reporter]):
        self.reporters = reporters

    def log(self, record: dict) -> None:
        for reporter in self.reporters:
            reporter.log(record)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()

    def __enter__(self) -> Reporters:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_reporters(names: Iterable[str], *, out: str | Path, run_id: str, settings: dict,
                   resumed_at: int = 0) -> Reporters:
    """The reporters of ``names`` (from :func:`parse_report_to`) for the run in ``out``.

    ``run_id``: the run's stable id (run.json ``run_id``); ``settings``: what the trackers record as the
    run's configuration; ``resumed_at``: the step a resumed run continues from (0 for a new run).
    """
    names = list(names)
    check_installed(names)
    out = Path(out)
    opened = Reporters([])
    try:
        for name in names:
            if name == "tensorboard":
                opened.reporters.append(TensorBoardReporter(out / "tensorboard", resumed_at=resumed_at))
            elif name == "wandb":
                opened.reporters.append(WandbReporter(out, run_id=run_id, settings=settings))
            else:
                opened.reporters.append(MlflowReporter(out, run_id=run_id, settings=settings))
    except BaseException:
        opened.close()  # the ones already opened
        raise
    return opened
