"""``kdpipe cache-teacher``: run a teacher over data once and store its sparse distribution."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import click
from tqdm import tqdm

from kdpipe.pipeline.capture import CaptureSettings, finished_capture, plan_capture, run_capture, with_teacher_weights
from kdpipe.pipeline.errors import ConfigError
from kdpipe.pipeline.manifest import MANIFEST_NAME, SHARD_DIR
from kdpipe.pipeline.progress import PROGRESS_DIR
from kdpipe.stages.cli import user_errors


@click.command("cache-teacher")
@click.option("--teacher", required=True, help="HF model directory or hub id, or package.module:factory / file.py:factory.")
@click.option("--weights", default=None, help="safetensors weights for a module:factory teacher.")
@click.option("--data", required=True, help=".txt file or folder, .jsonl, .parquet (text), or .npz (x, y) for module teachers.")
@click.option("--out", required=True, help="Cache directory to create (or resume).")
@click.option("--top-k", default=64, show_default=True, type=int, help="Ids kept per position.")
@click.option("--temperature", "temperatures", multiple=True, type=float, default=(1.0, 2.0), show_default=True, help="Temperature to capture exactly; repeat for several.")
@click.option("--seq-len", default=256, show_default=True, type=int, help="Tokens per packed row.")
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--format", "storage", type=click.Choice(["zarr", "parquet"]), default="zarr", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="auto", show_default=True, help="Teacher weights dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16.")
@click.option("--value-dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16", show_default=True, help="Storage dtype of the top-k logits.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--limit-rows", default=None, type=int, help="Capture only the first N rows.")
@click.option("--shard-size-mb", default=256.0, show_default=True, type=float, help="Uncompressed size cap of one shard.")
@click.option("--task", type=click.Choice(["causal-lm", "classification"]), default=None, help="Override the task read from the model config.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a hub model's own Python code to run.")
@click.option("--rank", default=0, show_default=True, type=int, help="This writer's rank (multi-process capture).")
@click.option("--world-size", default=1, show_default=True, type=int, help="Number of writer processes.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache in --out that has other settings.")
@click.option("--dry-run", is_flag=True, help="Print rows, tokens and the estimated size; load no weights.")
@user_errors
def cache_teacher(storage, temperatures, overwrite, dry_run, **options):
    """Run TEACHER over DATA once; store top-k logits, exact at each temperature, plus the tail mass.

    Killed or failed (disk full), the same command resumes: finished shards are checked and kept.
    """
    settings = CaptureSettings(format=storage, temperatures=tuple(temperatures), **options)
    plan = plan_capture(settings, load_weights=False)
    if dry_run:
        _print_plan(plan)
        return
    out = Path(settings.out)
    if not overwrite and finished_capture(plan) is not None:
        click.echo(f"{out} already holds this finished capture; nothing to do (kdpipe verify {out} checks it)")
        return
    if not overwrite and out.is_dir() and any(out.iterdir()) and not (out / PROGRESS_DIR).is_dir():
        raise ConfigError(f"--out {out} exists and is not a kdpipe cache; choose an empty or new directory")
    plan = with_teacher_weights(plan)  # a teacher that fails to load leaves --out untouched
    if overwrite:
        _clear_cache(out)
    my_rows = sum(len(plan.shard_rows(s)) for s in plan.my_shards())
    started = time.perf_counter()
    with tqdm(total=my_rows, unit="row", desc="cache-teacher", dynamic_ncols=True) as bar:
        tokens = 0

        def on_rows(rows, new_tokens):
            nonlocal tokens
            tokens += new_tokens
            bar.update(rows)
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - started, 1e-9):,.0f}")

        manifest = run_capture(plan, on_rows=on_rows, on_start=lambda log: _report_resume(log, plan, bar))
    if manifest is None:
        click.echo(f"rank {settings.rank} finished; the manifest is written when every rank is done")
        return
    t = manifest["totals"]
    click.echo(
        f"wrote {out}: {t['rows']} rows, {t['tokens']} tokens, {t['shards']} shards, "
        f"{t['bytes'] / 2**20:.1f} MiB ({t['bytes_per_token']:.1f} B/token)"
    )


def _report_resume(log, plan, bar) -> None:
    kept = len(log.record["shards"])
    if kept or log.redo or log.stale_tmp:
        bar.write(
            f"resuming {log.out}: {kept} of {len(plan.my_shards())} shards already finished"
            + (f"; redoing {len(log.redo)} damaged or missing ({', '.join(log.redo[:3])}"
               f"{', ...' if len(log.redo) > 3 else ''})" if log.redo else "")
            + (f"; removed {len(log.stale_tmp)} stray temporary files" if log.stale_tmp else ""),
            file=sys.stderr,
        )


def _print_plan(plan) -> None:
    s = plan.settings
    click.echo(f"teacher:   {s.teacher} ({plan.teacher.task}, {plan.teacher.vocab_size} outputs)")
    click.echo(f"data:      {s.data}")
    click.echo(f"rows:      {plan.num_rows} (seq-len {s.seq_len})")
    click.echo(f"tokens:    {plan.num_tokens}")
    click.echo(f"shards:    {plan.num_shards} ({plan.rows_per_shard} rows each)")
    click.echo(f"estimated: {plan.estimated_bytes() / 2**20:.1f} MiB "
               f"({plan.estimated_bytes() / max(plan.num_tokens, 1):.1f} B/token) in {s.format}")


def _clear_cache(out: Path) -> None:
    """Remove what kdpipe wrote (manifest, shards, progress), nothing else."""
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # first: the cache is unfinished from here on
    for name in (PROGRESS_DIR, SHARD_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
