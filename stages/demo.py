"""``kdpipe demo``: the whole job on the shipped data, in one command."""

from __future__ import annotations

import click

from kdpipe.pipeline.demo import TASKS, run_demo
from kdpipe.stages.cli import user_errors

COLUMNS = {
    "causal-lm": [("ce", "held-out CE"), ("perplexity", "perplexity"), ("kl_to_teacher", "KL to teacher"),
                  ("top1_agreement", "top-1 agree"), ("tokens_per_s", "tokens/s")],
    "classification": [("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("ece", "ECE"),
                       ("kl_to_teacher", "KL to teacher"), ("top1_agreement", "top-1 agree"), ("rows_per_s", "rows/s")],
}


@click.command("demo")
@click.option("--out", default="runs/demo", show_default=True, help="Where caches, runs, table and plot go.")
@click.option("--task", type=click.Choice(sorted(TASKS)), default="causal-lm", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--steps", default=None, type=int, help="Training steps per student (default: the task's).")
@user_errors
def demo(out, task, device, steps):
    """Cache the shipped teacher, train a KD and a hard-label student, compare all three."""
    results = run_demo(out, task=task, device=device, steps=steps, on_phase=lambda p: click.echo(f"== {p}", err=True))
    columns = COLUMNS[task]
    click.echo(f"\nheld-out results after {results['steps']} steps per student ({task}):\n")
    click.echo(f"{'model':<20}" + "".join(f"{title:>15}" for _, title in columns))
    for label, metrics in results["table"].items():
        click.echo(f"{label:<20}" + "".join(_cell(metrics.get(key)) for key, _ in columns))
    kd, hard = results["table"]["kd student"], results["table"]["hard-label student"]
    key = "ce" if task == "causal-lm" else "accuracy"
    better = kd[key] < hard[key] if key == "ce" else kd[key] > hard[key]
    click.echo(f"\nKD student {'beats' if better else 'does NOT beat'} the hard-label student on held-out {key} "
               f"({kd[key]:.4f} vs {hard[key]:.4f}).")
    click.echo(f"curves: {results['plot']}   table: {out}/results.json   wall time: {results['wall_s']:.0f} s")


def _cell(value) -> str:
    if value is None:
        return f"{'-':>15}"
    return f"{value:>15,.0f}" if value >= 1000 else f"{value:>15.4f}"
