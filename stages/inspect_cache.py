"""``kdpipe inspect CACHE``: what a cache holds and how much of the distribution its top-k covers."""

from __future__ import annotations

import json

import click

from kdpipe.pipeline.cache import open_cache
from kdpipe.pipeline.inspect import summarize_cache
from kdpipe.pipeline.storage.location import parse_storage_options
from kdpipe.stages.cli import storage_options_flag, user_errors


@click.command("inspect")
@click.argument("cache", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--sample-rows", default=64, show_default=True, help="Rows sampled for the fidelity estimate.")
@storage_options_flag
@user_errors
def inspect_cache(cache, as_json, sample_rows, storage_options):
    """Summarise CACHE (a folder or an s3:// URL): teacher, data, settings, size and top-k fidelity."""
    with open_cache(cache, storage_options=parse_storage_options(storage_options)) as c:
        summary = summarize_cache(c, sample_rows=sample_rows)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for key in ("path", "task", "teacher", "data", "format", "top_k", "temperatures", "seq_len",
                "value_dtype", "id_dtype", "rows", "tokens", "shards", "device", "finished_at"):
        click.echo(f"{key + ':':16} {summary[key]}")
    click.echo(f"{'size:':16} {summary['bytes'] / 2**20:.2f} MiB ({summary['bytes_per_token']:.1f} B/token)")
    click.echo(f"mean tail mass over {summary['sampled_rows']} sampled rows (probability outside the top-k):")
    for t, mass in summary["mean_tail_mass"].items():
        click.echo(f"  T={t:<6} {mass:.4g}" if mass is not None else f"  T={t:<6} n/a")
