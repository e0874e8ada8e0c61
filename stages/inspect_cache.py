"""``kdpipe inspect CACHE``: what a cache holds and how much of the distribution its top-k covers;
with ``--fidelity``, how much its sparse view loses against the dense teacher run again."""

from __future__ import annotations

import json
from pathlib import Path

import click

from kdpipe.pipeline.cache.inspect import describe_encoding, summarize_cache
from kdpipe.pipeline.cache.reader import open_cache
from kdpipe.pipeline.cache.storage.location import parse_storage_options
from kdpipe.pipeline.errors import ConfigError
from kdpipe.stages.options import NOTHING_WRITTEN, storage_options_flag, threads_flag, user_errors


@click.command("inspect")
@click.argument("cache", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the summary (and the fidelity report) as JSON.")
@click.option("--sample-rows", default=64, show_default=True, help="Rows sampled for the mean tail mass.")
@click.option("--fidelity", is_flag=True,
              help="Run the teacher again on the cache's first --rows rows and report, per temperature, the KL on "
                   "the top-k + tail bins, the teacher mass the cache holds and the KD gradient's cosine.")
@click.option("--teacher", default=None, help="With --fidelity: the cache's teacher (default: the one the manifest "
                                              "records, when it is here).")
@click.option("--weights", default=None, type=click.Path(), help="With --fidelity: a module teacher's weights.")
@click.option("--data", default=None, type=click.Path(),
              help="With --fidelity on an array cache (module teacher): the capture's .npz (default: the recorded one, "
                   "when it is here).")
@click.option("--rows", default=64, show_default=True, help="With --fidelity: the cache's first rows to probe.")
@click.option("--device", default="auto", show_default=True, help="With --fidelity: where the teacher and losses run.")
@click.option("--seed", default=0, show_default=True, help="With --fidelity: seed of the random student.")
@click.option("--trust-remote-code", is_flag=True, help="With --fidelity: allow a teacher with custom code.")
@click.option("--skip-hash-check", is_flag=True,
              help="Do not hash the local shards it reads (their sizes and row counts are still checked): for a big "
                   "cache just checked with kdpipe verify, where hashing a whole shard for each sampled row is most "
                   "of the time. By default no row is used before its shard's sha256 matches the manifest; remote "
                   "shards are always hashed as they download.")
@storage_options_flag
@threads_flag
@user_errors(on_interrupt=NOTHING_WRITTEN)
def inspect_cache(cache, as_json, sample_rows, fidelity, teacher, weights, data, rows, device, seed,
                  trust_remote_code, skip_hash_check, storage_options):
    """Summarise CACHE (a folder or an s3:// URL): teacher, data, settings, encoding, size and top-k fidelity."""
    if not fidelity and (teacher or weights or data):
        raise ConfigError("--teacher, --weights and --data are for --fidelity; add --fidelity (or drop them)")
    checked = not skip_hash_check  # the default: every shard read is hashed first
    with open_cache(cache, verify_hashes=checked, storage_options=parse_storage_options(storage_options)) as c:
        summary = summarize_cache(c, sample_rows=sample_rows)
        if fidelity:
            summary["fidelity"] = _fidelity(c, teacher=teacher, weights=weights, data=data, rows=rows,
                                            device=device, seed=seed, trust_remote_code=trust_remote_code)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    _print_summary(summary)
    if fidelity:
        _print_fidelity(summary["fidelity"])


def _fidelity(cache, *, teacher, weights, data, rows, device, seed, trust_remote_code) -> dict:
    from kdpipe.pipeline.data import rows_from_arrays
    from kdpipe.pipeline.evaluate.fidelity import fidelity_report, load_cache_teacher

    loaded = load_cache_teacher(cache, teacher=teacher, weights=weights, device=device,
                                trust_remote_code=trust_remote_code)
    inputs = None
    if cache.schema.input_len is None:  # array cache: its inputs are the capture's data
        recorded = cache.manifest["capture"]["data"]
        if data is None and not Path(recorded).is_file():
            raise ConfigError(f"the cache's data {recorded} is not found here; pass --data (the .npz it was made from)")
        inputs = rows_from_arrays(data or recorded).inputs
    report = fidelity_report(cache, loaded, rows=rows, seed=seed, device=loaded.device, inputs=inputs)
    report["device"] = str(loaded.device)
    return report


# What inspect's counts count (evaluate's "tokens" and "positions" are the predictions it scores).
EXPLAINED = {"tokens": "captured: positions holding the teacher's distribution"}


def _print_summary(summary: dict) -> None:
    for key in ("path", "task", "teacher", "data", "format", "top_k", "temperatures", "seq_len",
                "rows", "tokens", "shards", "device", "finished_at", "command", "software"):
        why = f"  ({EXPLAINED[key]})" if key in EXPLAINED else ""
        click.echo(f"{key + ':':16} {summary[key]}{why}")
    click.echo(f"{'encoding:':16} {describe_encoding(summary)}")
    click.echo(f"{'size:':16} {summary['bytes'] / 2**20:.2f} MiB ({summary['bytes_per_token']:.1f} B/token)")
    click.echo(f"mean tail mass over {summary['sampled_rows']} sampled rows (probability outside the top-k):")
    for t, mass in summary["mean_tail_mass"].items():
        click.echo(f"  T={t:<6} {_number(mass, '.4f')}")


def _number(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _print_fidelity(report: dict) -> None:
    click.echo(f"fidelity against the dense teacher {report['teacher']} on the first {report['rows']} rows "
               f"({report['positions']} positions, {report['device']}):")
    click.echo(f"  encoding:     {describe_encoding(report['encoding'])}; {report['bytes_per_token']:.1f} B/token")
    click.echo(f"  cache loss:   {report['cache_loss']}")
    click.echo(f"  student:      {report['student']}")
    click.echo(f"  {'T':<7}{'kl_bins (nats/token)':>22}{'mass_covered':>14}{'tail_mass':>11}{'grad_cosine':>13}")
    for t, row in report["by_temperature"].items():
        click.echo(f"  {t:<7}{_number(row['kl_bins'], '.3g'):>22}{_number(row['mass_covered'], '.4f'):>14}"
                   f"{_number(row['tail_mass'], '.4f'):>11}{_number(row['grad_cosine'], '.5f'):>13}")
