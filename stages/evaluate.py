"""``kdpipe evaluate --model DIR``: a student's (or teacher's) metrics on data, against a cache and
against the teacher run on the same rows (``--teacher``, the full-vocabulary KL);
``kdpipe plot RUN...``: training curves of train-student runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from kdpipe.pipeline.cache.storage.location import parse_storage_options
from kdpipe.pipeline.errors import ConfigError
from kdpipe.pipeline.evaluate.plots import DEFAULT_KEYS, plot_training_curves
from kdpipe.pipeline.evaluate.run import cache_holds_inputs, evaluate_model
from kdpipe.pipeline.train import metrics
from kdpipe.stages.display import Progress
from kdpipe.stages.options import NOTHING_WRITTEN, storage_options_flag, threads_flag, user_errors


@click.command("evaluate")
@click.option("--model", "model_dir", required=True, type=click.Path(), help="train-student output dir, or any HF model dir (e.g. the teacher).")
@click.option("--data", default=None, type=click.Path(), help="Held-out .txt file/folder, .jsonl, .parquet, or .npz (module models); with --cache, only for a classification cache: the data it was made from.")
@click.option("--cache", default=None, type=click.Path(), help="Teacher cache (a folder or an s3:// URL): its rows are scored, adding top1_agreement and the KL its targets give: kl_topk_bins (a lower bound of the full KL), kl_full at k = V, kl_full_estimate for draws.")
@click.option("--teacher", default=None, help="The teacher (model dir, hub id or file.py:factory) run on the same rows: adds kl_full, the KL over the full vocabulary. With --cache it must be the cache's teacher.")
@click.option("--weights", default=None, type=click.Path(), help="Weights of a module --teacher (.safetensors).")
@click.option("--seq-len", default=None, type=int, help="Tokens per row for text --data without --cache.  [default: the seq_len of the cache a train-student model was trained on, else 256 capped at the model's context; the output says which]")
@click.option("--batch-size", default=16, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--max-rows", default=None, type=int, help="Evaluate only the first N rows.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@storage_options_flag
@threads_flag
@user_errors(on_interrupt=NOTHING_WRITTEN)
def evaluate(model_dir, data, cache, teacher, weights, seq_len, batch_size, device, max_rows, as_json, storage_options):
    """Evaluate MODEL on held-out DATA (ce/perplexity or accuracy/macro-F1/ECE) or on a teacher CACHE's rows,
    and against the TEACHER run on them (full-vocabulary KL)."""
    storage_options = parse_storage_options(storage_options)
    if data is not None and cache is not None and cache_holds_inputs(cache, storage_options=storage_options):
        raise ConfigError(f"--data is not used with --cache {cache}: its rows hold their own tokens and are the rows "
                          "scored; drop --data (or drop --cache to score --data's rows)")
    if weights is not None and teacher is None:
        raise ConfigError("--weights is the weights of a module --teacher; pass --teacher too (or drop --weights)")
    with Progress("evaluate" if teacher is None else "evaluate (student and teacher)", unit="row") as bar:
        result = evaluate_model(model_dir, data=data, cache=cache, teacher=teacher, weights=weights,
                                seq_len=seq_len, batch_size=batch_size,
                                device=device, max_rows=max_rows, storage_options=storage_options,
                                on_rows=lambda new_rows, total: bar.update(new_rows, total=total))
    if as_json:
        click.echo(json.dumps({k: _json_number(v) for k, v in result.items()}, indent=2))
        return
    _print_metrics(result)


@click.command("plot")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@click.option("--key", "keys", multiple=True, default=DEFAULT_KEYS, show_default=True, help="Metric to plot; repeat for several.")
@user_errors(on_interrupt=NOTHING_WRITTEN)
def plot(runs, out, keys):
    """Plot train and eval curves of RUNS (train-student --out dirs or their metrics.jsonl files)."""
    files = {}
    for run in runs:
        path = Path(run)
        label = path.name if path.is_dir() else path.parent.name or path.stem
        files[label if label not in files else run] = path / "metrics.jsonl" if path.is_dir() else path
    click.echo(f"wrote {plot_training_curves(files, out, keys=keys)}")


# What a count of evaluate's output counts (inspect's "tokens" are the tokens a capture stored).
EXPLAINED = {
    "tokens": "next-token predictions scored against the true next token",
    "positions": "predictions scored against the teacher",
    "bits_per_byte": "the whole token stream's NLL / (ln 2 x its text's UTF-8 bytes): compares tokenizers",
    "bytes": "UTF-8 bytes of the text scored: all of --data's, for any tokenizer (unless --max-rows cuts it)",
    "bpb_tokens": "tokens scored for bits_per_byte: every token of the text stream, EOS included",
    metrics.KL_FULL: metrics.KL_MEANINGS[metrics.KL_FULL] + ", T = 1",
    metrics.KL_TOPK_BINS: metrics.KL_MEANINGS[metrics.KL_TOPK_BINS] + ", T = 1; --teacher gives the full KL",
    metrics.KL_FULL_ESTIMATE: metrics.KL_MEANINGS[metrics.KL_FULL_ESTIMATE] + ", T = 1",
}


def _print_metrics(result: dict) -> None:
    """One ``key: value`` line per metric; counts say what they count, seq_len where it comes from."""
    shown = {k: v for k, v in result.items() if k not in ("seq_len_from", "teacher_view", "kl_temperature")}
    width = max(map(len, shown)) + 2
    for key, value in shown.items():
        why = result.get("seq_len_from") if key == "seq_len" else EXPLAINED.get(key)
        if key == metrics.KL_TOPK_BINS and metrics.KL_FULL in result:  # --teacher was given
            why = why.removesuffix("; --teacher gives the full KL")
        click.echo(f"{key + ':':{width}} {_format(value)}" + (f"  ({why})" if why else ""))


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value + 0.0:.6g}"  # + 0.0: no -0
    return str(value)


def _json_number(value):
    """NaN (a metric with nothing to count) or inf becomes null: strict JSON has neither."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
