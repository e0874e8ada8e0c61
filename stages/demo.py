"""``kdpipe demo``: the whole job on the shipped data, in one command."""

from __future__ import annotations

import click

from kdpipe.pipeline.demo import TASKS, DemoReport, run_demo
from kdpipe.stages import display
from kdpipe.stages.display import Progress
from kdpipe.stages.options import threads_flag, user_errors

# (key in the results table, column title); a column shows when any row has the key.
COLUMNS = {
    "causal-lm": [("ce", "held-out CE"), ("ce_gap_to_online_pct", "CE vs online"), ("kl_topk_bins", "KL (k+1)-bin"),
                  ("kl_full", "KL full vocab"), ("top1_agreement", "top-1 agree"), ("tokens_per_s", "tokens/s")],
    "classification": [("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("ece", "ECE"),
                       ("kl_full", "KL full vocab"), ("top1_agreement", "top-1 agree"), ("rows_per_s", "rows/s")],
}
WIDTH = 15


@click.command("demo")
@click.option("--out", default=None, help="Where caches, runs, table and plot go.  [default: runs/demo for causal-lm, "
                                          "runs/demo-classification for classification]")
@click.option("--task", type=click.Choice(sorted(TASKS)), default="causal-lm", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--steps", default=None, type=int, help="Training steps per student.  [default: the task's: "
              + ", ".join(f"{task} {spec.train['steps']}" for task, spec in sorted(TASKS.items())) + "]")
@click.option("--seeds", default=None, type=int, help="Classification: train both students for seeds 0..N-1 "
              "and report mean and sd over them.  [default: " + ", ".join(
                  f"{task} {spec.seeds}" for task, spec in sorted(TASKS.items()) if spec.seeds) + "]")
@click.option("--overwrite", is_flag=True, help="Capture the teacher caches again, replacing those in --out "
                                                "(of any settings, or of the other task's demo).")
@threads_flag
@user_errors(on_interrupt="finished teacher-cache shards in --out are kept; re-run the same command to resume the capture (the students are trained again)")
def demo(out, task, device, steps, seeds, overwrite):
    """Cache the shipped teacher, train a cached-KD, a hard-label and (causal LM) an online dense-KD student;
    compare them with the teacher on held-out data, with the full-vocabulary KL.

    A second run into the same --out reuses its teacher caches and trains the students again. The
    classification demo trains both students for each of --seeds seeds and reports mean ± sd; it runs on one
    torch thread whatever --threads or OMP_NUM_THREADS say, so its quality numbers repeat.
    """
    with DemoDisplay() as report:
        results = run_demo(out, task=task, device=device, steps=steps, seeds=seeds, overwrite=overwrite, report=report)
    if "per_seed" in results:
        _print_seeds_table(results)
    else:
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
    task, table = results["task"], results["table"]
    columns = [(key, title) for key, title in COLUMNS[task] if any(key in row for row in table.values())]
    click.echo(f"\nheld-out results after {results['steps']} steps per student ({task}):\n")
    click.echo(f"{'model':<20}" + "".join(f"{title:>{WIDTH}}" for _, title in columns))
    for label, metrics in table.items():
        click.echo(f"{label:<20}" + "".join(_cell(metrics.get(key), percent=key.endswith("_pct")) for key, _ in columns))
    click.echo("")
    k, vocab = results["top_k"], results["vocab_size"]
    targets = f"top-{k}" + (f" + {results['sample']} draws" if results.get("sample") else "")
    if task == "causal-lm":
        click.echo(f"kd student: trained from the {targets} cache ({results['cache_bytes_per_token']:.0f} bytes/token); "
                   "online KD student: the teacher in memory, dense KL over all "
                   f"{vocab:,} tokens (same student, rows, order and schedule).")
        click.echo(f"KL (k+1)-bin: on the top-{k} held-out cache's (k+1)-bin view, a lower bound of the full KL; "
                   "KL full vocab: the teacher run on the held-out rows. CE vs online: CE over the online KD "
                   "student's, in %.")
    else:
        click.echo(f"The cache holds all {vocab} classes (k = V): its KL is the full KL, and cached KD is dense KD.")
    kd, hard = table["kd student"], table["hard-label student"]
    key = "ce" if task == "causal-lm" else "accuracy"
    better = kd[key] < hard[key] if key == "ce" else kd[key] > hard[key]
    click.echo(f"KD student {'beats' if better else 'does NOT beat'} the hard-label student on held-out {key} "
               f"({kd[key]:.4f} vs {hard[key]:.4f}).")
    online = table.get("online KD student")
    if online is not None:
        click.echo(f"Full-vocabulary KL to the teacher: cached {targets} student {kd['kl_full']:.4f}, online KD student "
                   f"{online['kl_full']:.4f} ({100 * (kd['kl_full'] / online['kl_full'] - 1):+.1f}%); on the (k+1)-bin "
                   f"view {kd['kl_topk_bins']:.4f} vs {online['kl_topk_bins']:.4f}.")
    click.echo(f"curves: {results['plot']}   table: {results['out']}/results.json   wall time: {results['wall_s']:.0f} s")


def _cell(value, *, percent: bool = False) -> str:
    """A table cell: 4 decimals (a KL that rounds to zero is 0.0000, not -0.0000), a whole number from 1000,
    or a signed percentage."""
    if value is None:
        return f"{'-':>{WIDTH}}"
    if percent:
        return f"{0.0 if round(value, 1) == 0 else value:>+{WIDTH - 1}.1f}%"
    if value >= 1000:
        return f"{value:>{WIDTH},.0f}"
    return f"{0.0 if round(value, 4) == 0 else value:>{WIDTH}.4f}"


def _print_seeds_table(results: dict) -> None:
    """The classification demo's table: each metric's mean ± sd over the seeds, the per-seed accuracies
    and gains, and whether the KD gain exceeds the spread."""
    table, seeds, gain = results["table"], results["seeds"], results["accuracy_gain"]
    columns = [(key, title) for key, title in COLUMNS[results["task"]] if key in table["kd student"]]
    click.echo(f"\nheld-out results ({results['task']}): {len(seeds)} seeds x {results['steps']} steps per student, "
               f"{results['train_rows']:,} training digits, KD at T = {results['kd']['temperature']:g}, "
               f"alpha = {results['kd']['alpha']:g}; mean ± sd over the seeds:\n")
    click.echo(f"{'model':<20}" + "".join(f"{title:>{WIDE}}" for _, title in columns))
    for label, row in table.items():
        cells = (_mean_sd_cell(row.get(key), row.get(f"{key}_sd"), timing=key == "rows_per_s") for key, _ in columns)
        click.echo(f"{label:<20}" + "".join(cells))
    click.echo(f"\n{'accuracy %':<20}" + "".join(f"{'seed ' + str(seed):>10}" for seed in seeds)
               + f"{'mean ± sd':>16}")
    for name, values in (("kd student", gain["kd"]), ("hard-label student", gain["hard"]), ("KD gain", gain)):
        sign = "+" if name == "KD gain" else ""
        click.echo(f"{name:<20}" + "".join(f"{100 * v:>{sign}10.2f}" for v in values["per_seed"])
                   + f"{100 * values['mean']:>{sign}9.2f} ± {100 * values['sd']:.2f}")
    verdict = ("exceeds the spread" if gain["exceeds_spread"] else "does NOT exceed the spread")
    click.echo(f"\nKD gain {100 * gain['mean']:+.2f} ± {100 * gain['sd']:.2f} accuracy points over {len(seeds)} "
               f"seeds: {verdict} (the rule: mean gain above twice the gains' sd and above each student's sd).")
    click.echo(f"The cache holds all {results['vocab_size']} classes (k = V): its KL is the full KL, and cached KD is "
               "dense KD.")
    if results["device"] == "cpu":
        click.echo(f"Captured, trained and evaluated on {results['threads']} torch thread(s): every number but "
                   "rows/s and the timings is the same for any OMP_NUM_THREADS or --threads (on this CPU type "
                   "and torch build).")
    else:
        click.echo(f"Trained on {results['device']}: the quality numbers are this device's (the one-thread guarantee "
                   "holds on the CPU).")
    click.echo(f"curves (seed 0): {results['plot']}   table: {results['out']}/results.json   "
               f"wall time: {results['wall_s']:.0f} s")


WIDE = 17  # a mean ± sd cell


def _mean_sd_cell(mean, sd, *, timing: bool = False) -> str:
    """``0.9350 ± 0.0030`` (a whole number from 1000, e.g. rows/s, without its sd); ``-`` when missing."""
    if mean is None:
        return f"{'-':>{WIDE}}"
    if timing or mean >= 1000:
        return f"{mean:>{WIDE},.0f}"
    text = f"{0.0 if round(mean, 4) == 0 else mean:.4f}" + ("" if sd is None else f" ± {sd:.4f}")
    return f"{text:>{WIDE}}"
