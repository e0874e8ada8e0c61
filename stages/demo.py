"""``kdpipe demo``: the whole job on the shipped data, in one command."""

from __future__ import annotations

import click

from kdpipe.pipeline.demo import TASKS, DemoReport, run_demo
from kdpipe.stages import display
from kdpipe.stages.cli import user_errors
from kdpipe.stages.display import Progress

COLUMNS = {
    "causal-lm": [("ce", "held-out CE"), ("perplexity", "perplexity"), ("kl_to_teacher", "KL to teacher"),
                  ("top1_agreement", "top-1 agree"), ("tokens_per_s", "tokens/s")],
    "classification": [("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("ece", "ECE"),
                       ("kl_to_teacher", "KL to teacher"), ("top1_agreement", "top-1 agree"), ("rows_per_s", "rows/s")],
}


@click.command("demo")
@click.option("--out", default=None, help="Where caches, runs, table and plot go.  [default: runs/demo for causal-lm, "
                                          "runs/demo-classification for classification]")
@click.option("--task", type=click.Choice(sorted(TASKS)), default="causal-lm", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--steps", default=None, type=int, help="Training steps per student.  [default: the task's: "
              + ", ".join(f"{task} {spec.train['steps']}" for task, spec in sorted(TASKS.items())) + "]")
@click.option("--overwrite", is_flag=True, help="Capture the teacher caches again, replacing those in --out "
                                                "(of any settings, or of the other task's demo).")
@user_errors
def demo(out, task, device, steps, overwrite):
    """Cache the shipped teacher, train a KD and a hard-label student, compare all three.

    A second run into the same --out reuses its teacher caches and trains the students again.
    """
    with DemoDisplay() as report:
        results = run_demo(out, task=task, device=device, steps=steps, overwrite=overwrite, report=report)
    _print_table(results)


class DemoDisplay(DemoReport):
    """The demo's phases as kdpipe's progress display shows every command's (see :mod:`display`)."""

    def __init__(self):
        self.bar: Progress | None = None
        self.rows = self.tokens = 0  # of the capture in progress

    def phase(self, name: str, *, total: int | None = None, unit: str = "step") -> None:
        self.done()
        self.bar = Progress(name, total=total, unit=unit)

    def capturing(self, name: str, plan) -> None:
        self.phase(name, **display.capture_progress(plan))

    def note(self, message: str) -> None:
        self.done()
        display.note(message)

    def captured(self, rows: int, tokens: int) -> None:
        self.rows, self.tokens = self.rows + rows, self.tokens + tokens
        self.bar.update(0 if self.bar.unit == "B" else rows,
                        **display.capture_fields(self.rows, self.tokens, self.bar.elapsed(), unit=self.bar.unit))

    def data_read(self, bytes_read: int) -> None:
        if self.bar.unit == "B":
            self.bar.set(bytes_read)

    def trained(self, metrics: dict) -> None:
        self.bar.update(1, **display.training_fields(metrics, "forward-kl"))

    def evaluated(self, rows: int) -> None:
        self.bar.update(rows)

    def done(self, *, failed: bool = False) -> None:
        if self.bar is not None:
            self.bar.close(failed=failed)
        self.bar, self.rows, self.tokens = None, 0, 0

    def __enter__(self) -> "DemoDisplay":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.done(failed=exc_type is not None)


def _print_table(results: dict) -> None:
    task, columns = results["task"], COLUMNS[results["task"]]
    click.echo(f"\nheld-out results after {results['steps']} steps per student ({task}):\n")
    click.echo(f"{'model':<20}" + "".join(f"{title:>15}" for _, title in columns))
    for label, metrics in results["table"].items():
        click.echo(f"{label:<20}" + "".join(_cell(metrics.get(key)) for key, _ in columns))
    kd, hard = results["table"]["kd student"], results["table"]["hard-label student"]
    key = "ce" if task == "causal-lm" else "accuracy"
    better = kd[key] < hard[key] if key == "ce" else kd[key] > hard[key]
    click.echo(f"\nKD student {'beats' if better else 'does NOT beat'} the hard-label student on held-out {key} "
               f"({kd[key]:.4f} vs {hard[key]:.4f}).")
    click.echo(f"curves: {results['plot']}   table: {results['out']}/results.json   wall time: {results['wall_s']:.0f} s")


def _cell(value) -> str:
    """A table cell: 4 decimals (a KL that rounds to zero is 0.0000, not -0.0000), or a whole number from 1000."""
    if value is None:
        return f"{'-':>15}"
    if value >= 1000:
        return f"{value:>15,.0f}"
    return f"{0.0 if round(value, 4) == 0 else value:>15.4f}"
