"""``kdpipe reproduce PATH``: re-run the command that made a cache or a training run, compare the bytes."""

from __future__ import annotations

import sys

import click

from kdpipe.pipeline import reproduce as rep
from kdpipe.pipeline.cache.storage.location import parse_storage_options
from kdpipe.pipeline.provenance import redact_url
from kdpipe.stages import display
from kdpipe.stages.options import storage_options_flag, user_errors


@click.command("reproduce")
@click.argument("path")
@click.option("--out", default=None, help="Where the re-run writes (a folder or an s3:// URL; must not exist yet) [default: PATH-reproduced, beside PATH].")
@storage_options_flag
@user_errors(on_interrupt="the re-run's output (--out, default PATH-reproduced) is incomplete; remove it and re-run the same command")
def reproduce(path, out, storage_options):
    """Re-run the recorded command of PATH (a cache or a train-student run directory) into --out, in
    this environment, and compare: every shard's sha256 for a cache; the model's files and the final
    metrics for a run. Prints what matched, what did not, and every recorded package version or
    machine fact that differs from this environment (the usual reason for a mismatch).

    Exit 0 only when everything matches; 1 when something differs or the re-run fails; 2 when PATH
    was changed after it was written (checksums) or records no command. Bit-reproducible: capture
    and training on the CPU with the same packages and thread count; not GPU kernels or other torch builds.
    """
    options = parse_storage_options(storage_options)
    recorded = rep.load_recorded(path, storage_options=options)
    out = out or rep.default_out(path)
    rep.check_new_out(out, storage_options=options)
    commands = rep.rerun_commands(recorded, out, storage_options=storage_options)
    what = "cache" if recorded.kind == "cache" else "training run"
    click.echo(f"reproducing the {what} {redact_url(path)} into {redact_url(out)}")
    for note in rep.reproducibility_notes(recorded):
        click.echo(f"note: {note}")
    for command in commands:
        display.note(f"running in {command.cwd}: {redact_url(command.shown())}")
        code = rep.run_command(command)
        if code != 0:
            click.echo(f"error: the re-run failed (exit {code}; its error is above); nothing was compared", err=True)
            _print_differences(rep.environment_differences(recorded))
            sys.exit(1)
    rerun = rep.load_recorded(out, storage_options=options)
    comparison = rep.compare(recorded, rerun)
    for line in comparison.matched:
        click.echo(f"same     {line}")
    for line in comparison.differed:
        click.echo(f"DIFFERS  {line}")
    _print_differences(rep.environment_differences(recorded, rerun))
    if comparison.identical:
        click.echo(f"identical: {len(comparison.matched)} outputs match the recorded ones")
        return
    click.echo(f"not identical: {len(comparison.differed)} of {len(comparison.matched) + len(comparison.differed)} "
               "outputs differ from the recorded ones")
    sys.exit(1)


def _print_differences(differences: list[str]) -> None:
    if not differences:
        click.echo("environment: every recorded package version and machine fact is the same here")
        return
    click.echo(f"environment: {len(differences)} recorded versions differ from this environment:")
    for line in differences:
        click.echo(f"  {line}")
